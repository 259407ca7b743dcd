"""Parallel setup, below the model: layout config and validation (from plain sizes), megatron parallel_state,
the model's process groups (groups.py), how attention is split across ranks (context.py, ring.py), sequence
parallelism, TP sharding, CPU compatibility. Nothing here imports hcustom_mc.model."""
