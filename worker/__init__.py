"""The worker service: trains the global model on this board's private data."""
