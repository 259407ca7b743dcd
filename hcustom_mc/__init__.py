"""hcustom-mc: training and inference for HunyuanCustom on megatron-core."""

__version__ = "0.1.0"
