"""Privacy: differential privacy (central and local) with an accountant, secure aggregation, HE."""
