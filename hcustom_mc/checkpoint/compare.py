"""Check a converted checkpoint against the diffusers reference model.

  python -m hcustom_mc.checkpoint.compare --reference-diffusers DIR --ckpt PATH --ckpt-format {release,mcore} [--tp N]

Runs diffusers' HunyuanVideoTransformer3DModel (loaded from DIR) and our DiT (loaded from the
checkpoint, at TP=N under `torchrun --nproc-per-node N`) on the same random inputs, with the
second sample's text padded, prints the max abs difference of the outputs and exits 1 when it is
above --tolerance. The model config comes from DIR/config.json.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from hcustom_mc import console
from hcustom_mc.checkpoint.verify_modes import DEFAULT_VERIFY, VERIFY_MODES, flag_help

DTYPES = {"fp32": "float32", "bf16": "bfloat16"}  # torch dtype names: torch is loaded after the flags are parsed


def random_inputs(cfg, batch: int, frames: int, height: int, width: int, text_len: int, seed: int, device) -> dict:
    import torch

    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(batch, text_len, dtype=torch.long)
    mask[-1, text_len // 2 :] = 0  # padded text in the last sample
    inputs = dict(
        latents=torch.randn(batch, cfg.in_channels, frames, height, width, generator=g),
        timestep=torch.rand(batch, generator=g) * 1000,
        text_states=torch.randn(batch, text_len, cfg.text_dim, generator=g),
        text_mask=mask,
        text_pooled=torch.randn(batch, cfg.pooled_text_dim, generator=g),
    )
    if cfg.guidance_embed:
        inputs["guidance"] = torch.full((batch,), 6000.0)
    return {k: v.to(device) for k, v in inputs.items()}


def reference_output(ref, inputs: dict) -> "torch.Tensor":
    return ref(
        hidden_states=inputs["latents"], timestep=inputs["timestep"], encoder_hidden_states=inputs["text_states"],
        encoder_attention_mask=inputs["text_mask"], pooled_projections=inputs["text_pooled"],
        guidance=inputs.get("guidance"), return_dict=False,
    )[0]


def parse_args(argv=None):
    p = console.ArgumentParser(prog="python -m hcustom_mc.checkpoint.compare", description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reference-diffusers", required=True, type=Path,
                   help="diffusers HunyuanVideoTransformer3DModel folder (required)")
    p.add_argument("--ckpt", required=True, type=Path, help="the checkpoint to check (required)")
    p.add_argument("--ckpt-format", required=True, choices=("release", "mcore"), help="its format (required)")
    p.add_argument("--tp", type=int, default=1, help="tensor parallel size: run with that many processes (default: 1)")
    p.add_argument("--tolerance", type=float, default=1e-5, help="max abs difference allowed (default: 1e-05, for fp32)")
    p.add_argument("--dtype", default="fp32", choices=sorted(DTYPES), help="compute dtype (default: fp32)")
    p.add_argument("--device", default=None, help="device (default: cuda when available, else cpu)")
    p.add_argument("--latent-shape", type=int, nargs=3, default=(3, 8, 8), metavar=("F", "H", "W"),
                   help="random latent frames, height, width (default: 3 8 8)")
    p.add_argument("--text-len", type=int, default=12, help="random text tokens (default: 12)")
    p.add_argument("--seed", type=int, default=0, help="input seed (default: 0)")
    p.add_argument("--verify-checkpoint", default=DEFAULT_VERIFY, choices=VERIFY_MODES,
                   help=flag_help("mcore --ckpt: "))
    p.add_argument("--verbose", action="store_true", help="show known third-party warnings and every rank's "
                   "warnings (switch; default: off)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    console.setup(console.verbose_requested(argv))
    args = parse_args(argv)
    import torch
    import torch.distributed as dist
    from diffusers import HunyuanVideoTransformer3DModel

    from hcustom_mc.checkpoint.convert import build_model
    from hcustom_mc.checkpoint.diffusers_format import model_config_from_diffusers_config
    from hcustom_mc.parallel.config import ParallelConfig
    from hcustom_mc.parallel.sharding import load_full_state_dict
    from hcustom_mc.parallel.state import destroy_parallel, initialize_parallel

    from hcustom_mc.device import uses_cuda

    args.device = args.device or ("cuda" if uses_cuda() else "cpu")
    import json

    cfg_file = args.reference_diffusers / "config.json"
    if not cfg_file.is_file():
        raise SystemExit(f"error: {cfg_file} not found (--reference-diffusers must be a diffusers model folder)")
    cfg = model_config_from_diffusers_config(json.loads(cfg_file.read_text()))
    dtype, device = getattr(torch, DTYPES[args.dtype]), torch.device(args.device)
    info = initialize_parallel(ParallelConfig(tensor_parallel=args.tp), cfg)
    try:
        model = build_model(cfg, dtype).to(device)
        if args.ckpt_format == "release":
            from hcustom_mc.checkpoint.release import load_release_state_dict

            load_full_state_dict(model, load_release_state_dict(args.ckpt))
        else:
            from hcustom_mc.checkpoint.mcore import load_mcore_checkpoint

            load_mcore_checkpoint(model, args.ckpt, verify=args.verify_checkpoint)
        inputs = random_inputs(cfg, 2, *args.latent_shape, args.text_len, args.seed, device)
        with torch.no_grad():
            ours = model(**inputs).float()
            diff = torch.zeros((), device=device)
            if info.rank == 0:
                ref = HunyuanVideoTransformer3DModel.from_pretrained(args.reference_diffusers, torch_dtype=dtype).to(device)
                diff = (ours - reference_output(ref, inputs).float()).abs().max()
        dist.broadcast(diff, src=0)
        ok = bool(diff <= args.tolerance)
        if info.rank == 0:
            print(f"{args.ckpt} ({args.ckpt_format}) at TP {args.tp} vs diffusers: max abs difference "
                  f"{diff.item():.3e} (tolerance {args.tolerance:.1e}) -> {'OK' if ok else 'MISMATCH'}")
    finally:
        destroy_parallel()
    return 0 if ok else 1


if __name__ == "__main__":
    # ValueError includes CheckpointReadError: a damaged or unsafe file, named
    console.run_entry_point(main, lambda: (ValueError, FileNotFoundError), key="hcustom_mc/compare_error")
