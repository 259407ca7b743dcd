"""The HunyuanCustom DiT: config, blocks, conditions and the top-level model.

The torch / megatron parts are imported on first use, so the pure config and FLOP arithmetic
(`hcustom_mc.model.config`, `hcustom_mc.model.flops`) load without them (the planner's --help).
"""

from hcustom_mc.model.config import ConfigError, ModelConfig, get_model_config

_LAZY = {"initialize_weights": "hcustom_mc.model.init", "HunyuanCustomDiT": "hcustom_mc.model.model",
         "InputError": "hcustom_mc.model.model"}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["ConfigError", "HunyuanCustomDiT", "InputError", "ModelConfig", "get_model_config", "initialize_weights"]
