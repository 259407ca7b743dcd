"""Forward + backward of the tiny DiT under the current world's TP; rank 0 saves outputs and full grads.

usage: torchrun --nproc_per_node N model_parity.py WEIGHTS INPUTS OUT TP [VARIANT MODE [sp]]
WEIGHTS: full release-layout state dict (torch.save); INPUTS: dict of model inputs; `sp`: sequence parallel.
"""

import sys

import torch


def main():
    weights, inputs_path, out_path, tp = sys.argv[1:5]
    variant = sys.argv[5] if len(sys.argv) > 5 else "base"
    mode = sys.argv[6] if len(sys.argv) > 6 else "release"
    sp = len(sys.argv) > 7 and sys.argv[7] == "sp"
    from hcustom_mc.model import HunyuanCustomDiT, get_model_config
    from hcustom_mc.parallel.config import ParallelConfig
    from hcustom_mc.parallel.sharding import full_state_dict, load_full_state_dict
    from hcustom_mc.parallel.state import destroy_parallel, initialize_parallel

    cfg = get_model_config("tiny", variant, mode=mode, max_identity_images=1 if mode == "release" else 3)
    info = initialize_parallel(ParallelConfig(tensor_parallel=int(tp), sequence_parallel=sp), cfg)
    model = HunyuanCustomDiT(cfg, config_overrides={"sequence_parallel": sp})
    load_full_state_dict(model, torch.load(weights, weights_only=True))
    inputs = torch.load(inputs_path, weights_only=True)
    out = model(**inputs)
    loss = (out.float() ** 2).mean()
    loss.backward()
    grads = full_state_dict(model, grads=True)
    # what ran: the blocks' linears' SP flags and the hidden state's layout (parallel/sequence.py)
    blocks = [m for n, m in model.named_modules() if n.startswith(("double_blocks", "single_blocks"))
              and hasattr(m, "sequence_parallel") and not n.endswith(("_mod.linear", "modulation.linear"))]
    _, ctx = model.conditioning(*(inputs.get(k) for k in ("latents", "timestep", "text_mask", "text_pooled",
                                                           "guidance", "identity_latents", "audio_features")))
    seq = ctx.layout
    if info.rank == 0:
        torch.save({"out": out.detach(), "loss": loss.detach(), "grads": grads,
                    "sp_linears": [bool(m.sequence_parallel) for m in blocks],
                    "layout": [seq.image_len, seq.text_len, seq.tp, seq.padded]}, out_path)
    destroy_parallel()


if __name__ == "__main__":
    from hcustom_mc.console import exit_process

    main()
    exit_process(0)  # only reached when every check passed
