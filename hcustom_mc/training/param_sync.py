"""Complete parameters between steps, under megatron's overlap_param_gather (training/overlap.py decides it).

With overlap_param_gather the distributed optimizer's parameter all-gather runs during the next forward,
so the parameters are only complete after it: anything that reads them between steps (checkpoint saving,
weight averaging) first calls `params_ready(model_chunks)`. Below both training/checkpoint.py and
training/overlap.py (overlap reads the checkpoint being resumed; the checkpoint saver needs this).
"""

from __future__ import annotations


def params_ready(model_chunks) -> None:
    """Force the pending parameter all-gather of overlap_param_gather, so the parameters are complete."""
    for m in model_chunks:
        ddp_config = getattr(m, "ddp_config", None)
        if ddp_config is not None and ddp_config.overlap_param_gather:
            m.start_param_sync(force_sync=True)
