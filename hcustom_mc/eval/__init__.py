"""Scoring sampled videos with the paper's metrics (python -m hcustom_mc.eval), for the CLI and for validation
during training. Every model loads from a local folder (`--models DIR`); nothing downloads."""
