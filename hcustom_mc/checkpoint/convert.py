"""Convert DiT checkpoints between the released, diffusers and megatron-core formats.

  python -m hcustom_mc.checkpoint.convert --src PATH --src-format {release,diffusers,mcore} \
      --dst PATH --dst-format {release,diffusers,mcore} --model-config {tiny,13b,FILE} \
      [--variant base|audio|editing] [--mode release|paper] [--guidance-embed] [--tp N] [--pp N]
      [--merge-lora FILE[:SCALE] ...] [--fp8 per-tensor|per-channel]

release   : `*_model_states.pt` with the weights under `module` (`_fp8.pt` + `_fp8_map.pt` are dequantised);
            with --fp8, written as the release's fp8 pair `mp_rank_00_model_states_fp8.pt` +
            `mp_rank_00_model_states_fp8_map.pt` (the blocks' linear weights in float8_e4m3fn, one scale per
            tensor as the release, or per output channel: a 1-D [out] scale), which `sample --fp8-weights on`
            keeps in fp8
diffusers : a HunyuanVideoTransformer3DModel folder (safetensors + config.json)
mcore     : a megatron-core distributed checkpoint, loadable at any TP

Conversions that touch `mcore` build the model at TP=--tp, so run them with that many processes
(`torchrun --nproc-per-node N -m hcustom_mc.checkpoint.convert ... --tp N`); the mcore checkpoint
itself stores global tensors and reshards to any TP on load. Tensors are copied bit-exactly:
no dtype change (except --fp8). Loading never unpickles arbitrary objects.
"""

from __future__ import annotations

import argparse
import logging
import os
import time
from pathlib import Path

from hcustom_mc import console
from hcustom_mc.checkpoint.verify_modes import DEFAULT_VERIFY, VERIFY_MODES, flag_help
from hcustom_mc.model.config import ConfigError, ModelConfig, get_model_config

log = logging.getLogger("hcustom_mc")
FORMATS = ("release", "diffusers", "mcore")


def read_full_state_dict(path: Path, fmt: str, load_key: str = "module") -> tuple[dict, ModelConfig | None]:
    """A release-layout state dict (and the config a diffusers folder carries) from a non-mcore source."""
    if fmt == "release":
        from hcustom_mc.checkpoint.release import load_release_state_dict

        return load_release_state_dict(path, load_key=load_key), None
    from hcustom_mc.checkpoint.diffusers_format import load_diffusers_folder

    return load_diffusers_folder(path)


def write_full_state_dict(sd: dict, path: Path, fmt: str, cfg: ModelConfig, load_key: str = "module",
                          ema: dict | None = None, fp8: str | None = None) -> None:
    if fmt == "release" and fp8:
        from hcustom_mc.checkpoint.release import save_release_fp8

        save_release_fp8(sd, path, granularity=fp8)  # a folder: the pair's fixed file names
    elif fmt == "release":
        from hcustom_mc.checkpoint.release import save_release_state_dict

        if path.suffix != ".pt":  # a folder, like the release's transformers/ folder
            path.mkdir(parents=True, exist_ok=True)
        save_release_state_dict(sd, path, load_key=load_key, extra={"ema": ema} if ema is not None else None)
    else:
        from hcustom_mc.checkpoint.diffusers_format import save_diffusers_folder

        save_diffusers_folder(sd, cfg, path)


def resolve_model_config(args, src_cfg: ModelConfig | None) -> ModelConfig:
    overrides = {"mode": args.mode}
    if args.guidance_embed:
        overrides["guidance_embed"] = True
    cfg = get_model_config(args.model_config, args.variant, **overrides)
    if src_cfg is not None:
        keys = ("hidden_size", "num_heads", "num_double_blocks", "num_single_blocks", "in_channels", "guidance_embed")
        diff = {k: (getattr(src_cfg, k), getattr(cfg, k)) for k in keys if getattr(src_cfg, k) != getattr(cfg, k)}
        if diff:
            raise ConfigError(f"--model-config disagrees with the source's config.json (source, flag): {diff}")
    return cfg


def build_model(cfg: ModelConfig, dtype: "torch.dtype", meta: bool = False, layers: range | None = None):
    from hcustom_mc.model import HunyuanCustomDiT

    return HunyuanCustomDiT(cfg, params_dtype=dtype, layers=layers, device="meta" if meta else None)


def check_keys(cfg: ModelConfig, sd: dict) -> None:
    """The state dict must have exactly the model's keys and shapes (TP=1 layout); lists what differs."""
    from hcustom_mc.parallel.sharding import StateDictError

    from hcustom_mc.parallel.sharding import get_tp_split

    # All layers (whatever this rank's pipeline stage), full shapes (whatever its TP rank).
    import torch  # not at the top: --help returns without loading torch

    model = build_model(cfg, torch.float32, meta=True, layers=range(cfg.num_double_blocks + cfg.num_single_blocks))
    want = {}
    for k, v in model.state_dict(keep_vars=True).items():
        if k.endswith("_extra_state"):
            continue
        shape, split = list(v.shape), get_tp_split(v)
        if split is not None:
            shape[split.dim] = sum(split.segments)
        want[k] = tuple(shape)
    missing, unexpected = sorted(set(want) - set(sd)), sorted(set(sd) - set(want))
    wrong = sorted(f"{k}: {tuple(sd[k].shape)} != {want[k]}" for k in set(want) & set(sd) if tuple(sd[k].shape) != want[k])
    problems = [f"{label} ({len(items)}): {items}" for label, items in
                (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", wrong)) if items]
    if problems:
        raise StateDictError("checkpoint does not fit the model config:\n  - " + "\n  - ".join(problems))


def parse_args(argv=None):
    p = console.ArgumentParser(prog="python -m hcustom_mc.checkpoint.convert", description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--src", required=True, type=Path, help="the checkpoint to read (required)")
    p.add_argument("--src-format", required=True, choices=FORMATS, help="its format (required)")
    p.add_argument("--dst", required=True, type=Path, help="where to write; must not exist or be empty (required)")
    p.add_argument("--dst-format", required=True, choices=FORMATS, help="the format to write (required)")
    p.add_argument("--model-config", required=True, help="tiny, 13b, or a JSON/YAML file of ModelConfig fields (required)")
    p.add_argument("--variant", default="base", choices=("base", "audio", "editing"), help="model variant (default: base)")
    p.add_argument("--mode", default="release", choices=("release", "paper"),
                   help="conditioning mode of the model config (default: release)")
    p.add_argument("--guidance-embed", action="store_true",
                   help="the checkpoint has guidance_in (HunyuanVideo cfg-distilled) (switch; default: off)")
    p.add_argument("--tp", type=int, default=1, help="tensor parallel size of the run (mcore conversions) (default: 1)")
    p.add_argument("--pp", type=int, default=1, help="pipeline parallel size of the run (mcore conversions) (default: 1)")
    p.add_argument("--load-key", default="module",
                   help="key holding the weights in a release file: module or ema (default: module)")
    p.add_argument("--merge-lora", action="append", default=[], metavar="FILE[:SCALE]",
                   help="merge LoRA adapters into the output weights, times SCALE (default scale 1); repeatable. FILE: "
                        "an `hcustom_mc.checkpoint.lora export --format original` file or a training checkpoint folder "
                        "(default: none)")
    p.add_argument("--fp8", default=None, choices=("per-tensor", "per-channel"),
                   help="--dst-format release only: write the release fp8 pair into the folder --dst, the blocks' "
                        "linear weights quantised to float8_e4m3fn with one scale per tensor (as the released file) or "
                        "per output channel (smaller error); for `sample --fp8-weights on` (default: not set: no "
                        "quantisation)")
    p.add_argument("--overwrite", action="store_true",
                   help="allow writing into an existing, non-empty --dst (switch; default: off)")
    p.add_argument("--verify-checkpoint", default=DEFAULT_VERIFY, choices=VERIFY_MODES,
                   help=flag_help("mcore source: "))
    p.add_argument("--verbose", action="store_true", help="show known third-party warnings and every rank's "
                   "warnings (switch; default: off)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    console.setup(console.verbose_requested(argv))
    args = parse_args(argv)
    if not args.src.exists():
        raise SystemExit(f"error: --src {args.src} does not exist")
    if args.dst.exists() and (args.dst.is_file() or any(args.dst.iterdir())) and not args.overwrite:
        raise SystemExit(f"error: --dst {args.dst} exists and is not empty (pass --overwrite)")
    if args.fp8 and args.dst_format != "release":
        raise SystemExit(f"error: --fp8 writes the release fp8 pair: it needs --dst-format release, not {args.dst_format}")
    if args.fp8 and args.dst.suffix == ".pt":
        raise SystemExit(f"error: --fp8 writes two files with fixed names (mp_rank_00_model_states_fp8.pt and its "
                         f"_fp8_map.pt): give --dst as a folder, not {args.dst}")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world != args.tp * args.pp:
        raise SystemExit(f"error: --tp {args.tp} x --pp {args.pp} needs that many processes, this run has {world}: "
                         f"torchrun --nproc-per-node {args.tp * args.pp} -m hcustom_mc.checkpoint.convert ...")
    start = time.time()
    from hcustom_mc.parallel.config import ParallelConfig
    from hcustom_mc.parallel.sharding import StateDictError
    from hcustom_mc.parallel.state import destroy_parallel, initialize_parallel

    src_sd, src_cfg = (None, None)
    if args.src_format != "mcore":
        src_sd, src_cfg = read_full_state_dict(args.src, args.src_format, args.load_key)
    cfg = resolve_model_config(args, src_cfg)
    info = initialize_parallel(ParallelConfig(tensor_parallel=args.tp, pipeline_parallel=args.pp), cfg)
    try:
        _convert(args, cfg, info, src_sd)
        if info.rank == 0:
            log.info("converted %s (%s) -> %s (%s) in %.1fs", args.src, args.src_format, args.dst, args.dst_format,
                     time.time() - start)
    except StateDictError as exc:  # the keys or shapes of --src are not those of the model --model-config describes
        raise StateDictError(f"--src {args.src} does not fit --model-config {args.model_config} (--variant "
                             f"{args.variant}; is it the config of this checkpoint?): {exc}") from None
    finally:
        destroy_parallel()
    return 0


def _convert(args, cfg: ModelConfig, info, src_sd: dict | None) -> None:
    """Read --src into a model of `cfg` at this rank's layout and write --dst (collective)."""
    import torch

    if src_sd is not None:
        check_keys(cfg, src_sd)
    from hcustom_mc.checkpoint.lora import load_specs, merge_into_model, merge_into_state_dict, weight_shapes

    loras = load_specs(args.merge_lora, args.src)
    for adapters, scale in loras if src_sd is not None else ():
        merge_into_state_dict(src_sd, adapters, scale)
    if "mcore" not in (args.src_format, args.dst_format):
        if info.rank == 0:
            write_full_state_dict(src_sd, args.dst, args.dst_format, cfg, args.load_key, fp8=args.fp8)
    else:
        from hcustom_mc.checkpoint.integrity import select_checkpoint
        from hcustom_mc.checkpoint.mcore import has_mcore_prefix, load_mcore_checkpoint, save_mcore_checkpoint
        from hcustom_mc.parallel.sharding import full_state_dict, gather_pipeline_state_dict, load_full_state_dict

        src = args.src
        if src_sd is None:  # verified once here (hashing split over the ranks), before anything is read
            src = select_checkpoint(args.src, args.verify_checkpoint) or args.src
        dtype = next(iter(src_sd.values())).dtype if src_sd else _mcore_dtype(src)
        model = build_model(cfg, dtype)
        if src_sd is not None:
            load_full_state_dict(model, src_sd, strict=args.pp == 1)  # a stage holds a subset
        else:
            load_mcore_checkpoint(model, src, verify="off")
            shapes = weight_shapes(build_model(cfg, dtype, meta=True, layers=range(cfg.num_double_blocks
                                                                                  + cfg.num_single_blocks)))
            for adapters, scale in loras:  # this rank's shards of the layers it holds
                merge_into_model(model, adapters, scale, full_shapes=shapes)
        if args.dst_format == "mcore":
            save_mcore_checkpoint(model, args.dst, cfg)
        else:
            sd = gather_pipeline_state_dict(full_state_dict(model))
            ema = None
            if src_sd is None and args.dst_format == "release" and has_mcore_prefix(src, "ema.") and args.fp8:
                if info.rank == 0:
                    log.info("--fp8: the fp8 pair holds the `module` weights only; the source's EMA is not written")
            elif src_sd is None and args.dst_format == "release" and has_mcore_prefix(src, "ema."):
                if loras and info.rank == 0:
                    log.warning("--merge-lora: the adapters are merged into `module`, not into the `ema` entry")
                # a training run's EMA weights (fp32) become the release file's `ema` entry
                ema_model = build_model(cfg, torch.float32)
                load_mcore_checkpoint(ema_model, src, prefix="ema.", verify="off")
                ema = gather_pipeline_state_dict(full_state_dict(ema_model))
                del ema_model
            if info.rank == 0:
                write_full_state_dict(sd, args.dst, args.dst_format, cfg, args.load_key, ema=ema, fp8=args.fp8)


def _mcore_dtype(path: Path) -> "torch.dtype":
    """The parameter dtype stored in an mcore checkpoint (all weights share one dtype here)."""
    from hcustom_mc.checkpoint.safe_load import dist_load_tensors_metadata

    meta = dist_load_tensors_metadata(path)
    dtypes = {t.dtype for k, t in meta.items() if k.startswith("model.")}  # not the optimizer's or EMA's fp32
    if len(dtypes) != 1:
        raise SystemExit(f"error: {path} mixes parameter dtypes {dtypes}")
    return dtypes.pop()


def _user_errors() -> tuple:
    from hcustom_mc.checkpoint.integrity import CheckpointWriteError

    # ValueError includes CheckpointReadError (damaged or unsafe checkpoint files, named);
    # CheckpointWriteError: disk full, permissions, non-finite weights
    return ConfigError, KeyError, FileNotFoundError, ValueError, CheckpointWriteError


if __name__ == "__main__":
    console.run_entry_point(main, _user_errors, key="hcustom_mc/convert_error")
