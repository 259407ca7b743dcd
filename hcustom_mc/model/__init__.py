"""The HunyuanCustom DiT: config, blocks, conditions and the top-level model.

The names are loaded on first use (PEP 562): `hcustom_mc.model.config` is imported by every command-line
parser, and importing the model itself pulls in torch and megatron-core (seconds), which `--help` must not wait for;
the planner's arithmetic (`config`, `flops`) needs neither.
"""

from importlib import import_module

_WHERE = {"ConfigError": "config", "ModelConfig": "config", "get_model_config": "config",
          "initialize_weights": "init", "HunyuanCustomDiT": "model", "InputError": "model"}
__all__ = sorted(_WHERE)


def __getattr__(name):
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(import_module(f"{__name__}.{_WHERE[name]}"), name)
    globals()[name] = value
    return value
