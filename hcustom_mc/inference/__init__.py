"""Sampling: scheduler and guidance (scheduler.py), conditions from files (inputs.py), the parallel denoising loop (pipeline.py), outputs (output.py)."""
