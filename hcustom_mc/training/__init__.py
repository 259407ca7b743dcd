"""Training: config, objective, loop, checkpoints, tracking."""
