"""Parallel setup: config validation, megatron parallel_state, TP sharding, CPU compatibility."""
