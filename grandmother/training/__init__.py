"""Training on one device: the loop, the optimizer, checkpoints and the process runtime."""
