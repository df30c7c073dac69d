"""ServerApp: fedmoe's alignment strategy (`fedmoe.flower.FedMoEStrategy`) for the run config's experiment."""

from fedmoe.flower import server_app

app = server_app()
