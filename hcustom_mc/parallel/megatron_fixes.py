"""Fixes for megatron-core bugs we hit on every device (not CPU shims: see cpu_compat.py for those).

Each fix is checked by a test that fails without it; each is idempotent and checks the symptom
before patching, so a megatron-core release that fixes the bug is left alone.
"""

from __future__ import annotations

import functools

import torch


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


def _unshare_adam_step_after_load() -> None:
    # megatron-core 0.16, DistributedOptimizer over torch Adam: load_state_dict gives every
    # parameter's state the *same* 0-dim `step` tensor, and torch Adam increments it in place once
    # per parameter, so after a resume the bias correction runs ahead and the updates differ from
    # an uninterrupted run. Give each parameter its own copy.
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    original = DistributedOptimizer.load_state_dict
    if getattr(original, "__hcustom_fix__", False):
        return

    @functools.wraps(original)
    def load_state_dict(self, state_dict):
        original(self, state_dict)
        seen = set()
        for state in self.optimizer.state.values():
            step = state.get("step")
            if isinstance(step, torch.Tensor):
                if id(step) in seen:
                    state["step"] = step.clone()
                seen.add(id(state["step"]))

    load_state_dict.__hcustom_fix__ = True
    DistributedOptimizer.load_state_dict = load_state_dict


def apply_megatron_fixes() -> None:
    _skip_missing_step_on_reshardable_load()
    _unshare_adam_step_after_load()
