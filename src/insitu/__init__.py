"""insitu: federated learning for PyTorch."""
