"""The memory and FLOP planner: `python -m hcustom_mc.plan --help` (pure arithmetic, no torch import)."""

from hcustom_mc.plan.memory import Estimate, Layout, Training, Workload, estimate, stage_parameters

__all__ = ["Estimate", "Layout", "Training", "Workload", "estimate", "stage_parameters"]
