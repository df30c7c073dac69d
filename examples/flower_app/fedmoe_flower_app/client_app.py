"""ClientApp: trains a fedmoe model on the node's partition (`partition-id` in its node config)."""

from fedmoe.flower import client_app

app = client_app()
