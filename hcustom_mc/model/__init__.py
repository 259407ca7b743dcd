"""The HunyuanCustom DiT: config, blocks, conditions and the top-level model."""

from hcustom_mc.model.config import ConfigError, ModelConfig, get_model_config
from hcustom_mc.model.init import initialize_weights
from hcustom_mc.model.model import HunyuanCustomDiT, InputError

__all__ = ["ConfigError", "HunyuanCustomDiT", "InputError", "ModelConfig", "get_model_config", "initialize_weights"]
