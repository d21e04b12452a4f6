"""The learnt prior: the eps-network, its seeded batches, loss and training, and its exported files."""
