"""fedmoe as a Flower app: the ServerApp runs fedmoe's alignment strategy, the ClientApp trains a fedmoe
model on the node's partition."""
