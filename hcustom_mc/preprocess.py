"""The preprocessing entry point (tools/preprocess.py, `python -m hcustom_mc.preprocess`): the training-config
flags plus the preprocessing ones, parsed (and --help answered) before the encoding module loads torch, then
hcustom_mc/data/preprocess.py encodes the manifest. An entry point like hcustom_mc/sample.py: it sits above
training (whose config it reads) and data."""

from __future__ import annotations

import os


def parse_args(argv=None):
    from hcustom_mc.training.config import training_parser

    p = training_parser(prog="tools/preprocess.py", description="Encode a manifest (--data-path, the manifest.jsonl) "
                        "into training shards with the config's encoders and sizes; run under torchrun or `python -m "
                        "hcustom_mc.launch` for many ranks. The training-config flags choose what is encoded.")
    g = p.add_argument_group("preprocessing")
    g.add_argument("--out", required=True, help="shard folder (created; re-running resumes) (required)")
    g.add_argument("--shard-size", type=int, default=64, help="samples per shard file (default: 64)")
    g.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default="float32",
                   help="stored tensor dtype (default: float32)")
    g.add_argument("--no-progress", action="store_true", help="no progress bar (switch; default: off)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    from hcustom_mc import console
    from hcustom_mc.model.config import ConfigError
    from hcustom_mc.training.config import build_config

    console.setup(console.verbose_requested(argv))  # before torch and megatron are imported
    args = parse_args(argv)
    cfg = build_config(args=args)
    if not cfg.data.path:
        raise ConfigError("--data-path (the manifest.jsonl) is required")
    if args.shard_size < 1:
        raise ConfigError(f"--shard-size must be >= 1, got {args.shard_size}")
    import torch
    import torch.distributed as dist

    from hcustom_mc.data.preprocess import preprocess
    from hcustom_mc.device import local_cuda_index, uses_cuda

    if uses_cuda():  # one GPU per rank (DALI and the encoders use the current device)
        torch.cuda.set_device(local_cuda_index())
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        dist.init_process_group("gloo")  # only barriers: encoders run independently on each rank
    try:
        preprocess(cfg, cfg.data.path, args.out, args.shard_size, args.dtype, progress=not args.no_progress)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


# what tools/preprocess.py reports as the user's to fix (ConfigError is a ValueError), once for all ranks, exit 2
USER_ERRORS = (ValueError, FileNotFoundError)


if __name__ == "__main__":
    from hcustom_mc import console

    console.run_entry_point(main, lambda: USER_ERRORS)
