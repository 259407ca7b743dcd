"""Fixes for megatron-core bugs we hit on every device (not CPU shims: see cpu_compat.py for those).

Each fix is checked by a test that fails without it; each is idempotent and checks the symptom
before patching, so a megatron-core release that fixes the bug is left alone.
"""

from __future__ import annotations

import functools


def _skip_missing_step_on_reshardable_load() -> None:
    # megatron-core 0.16, DistributedOptimizer over a plain torch Adam (no transformer-engine/apex):
    # loading 'fully_reshardable' optimizer state copies every key of the live per-parameter state,
    # including torch Adam's 'step', but the checkpoint's per-parameter tensors have no 'step' (it is
    # restored from the param groups) -> KeyError('step'). Copy only the keys the checkpoint has.
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    original = DistributedOptimizer._set_main_param_and_optimizer_states
    if getattr(original, "__hcustom_fix__", False):
        return

    @functools.wraps(original)
    def set_states(self, model_param, tensors):
        if "step" not in tensors and not self.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8:
            group_index, group_order = self.model_param_group_index_map[model_param]
            main_param = self.optimizer.param_groups[group_index]["params"][group_order]
            state = self.optimizer.state[main_param]
            if "step" in state:
                for key, value in {"param": main_param, **state}.items():
                    if key != "step":
                        value.copy_(tensors[key])
                return
        original(self, model_param, tensors)

    set_states.__hcustom_fix__ = True
    DistributedOptimizer._set_main_param_and_optimizer_states = set_states


def apply_megatron_fixes() -> None:
    _skip_missing_step_on_reshardable_load()
