"""LoRA adapters outside training: read them from a training checkpoint, export them, merge them.

  python -m hcustom_mc.checkpoint.lora export --ckpt RUN_OR_CKPT --format {original,diffusers} --out FILE.safetensors

RUN_OR_CKPT is a training `--save` folder (its `latest`) or one `iter_*` folder, adapter-only (LoRA run) or full,
saved at any TP/PP/VPP layout: the adapters are stored as global tensors (TP segments `#seg<i>`) and are read whole
into this one process. `--ema` exports the adapters' EMA (runs with --ema-decay).

Exported layouts (safetensors; the LoRA scale alpha/rank is folded into B, so every loader's scale is 1):
  original   `diffusion_model.<release module>.lora_A.weight` [r, in] and `.lora_B.weight` [out, r] on the
             released module names (fused img_attn_qkv, linear1, ...): the layout diffusers'
             `HunyuanVideoLoraLoaderMixin.lora_state_dict` recognises (by its `img_attn_qkv` keys) and converts.
             diffusers ignores `alpha` keys and rejects keys without "lora" (so no kohya `alpha`/`lora_down`),
             and it splits single_blocks.*.linear1 at a hard-coded hidden size 3072 (13B only).
             Every adapted module is written, HunyuanCustom-only ones (AudioNet, ...) included.
  diffusers  `transformer.<diffusers module>.lora_A.weight` / `.lora_B.weight` on HunyuanVideoTransformer3DModel
             (what diffusers' own save_lora_weights writes; loads with pipe.load_lora_weights at any size).
             A fused release linear with A shared and B stacked becomes one LoRA per projection: the same A
             and B's row block (q, k, v[, mlp]); modules diffusers has no counterpart for are skipped (logged).
Safetensors metadata `hcustom_mc_lora` (JSON) records the layout, rank, alpha, model config and the base
fingerprint, which `--lora` (sampler) and `--merge-lora` (converter) check against the checkpoint they load.
Loading is safe throughout: megatron checkpoints through checkpoint.safe_load, adapter files as safetensors.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

from hcustom_mc.checkpoint.verify_modes import DEFAULT_VERIFY, VERIFY_MODES, flag_help
from hcustom_mc.model.config import ConfigError

log = logging.getLogger("hcustom_mc")
FORMATS = ("original", "diffusers")
PREFIX = {"original": "diffusion_model.", "diffusers": "transformer."}
META_KEY = "hcustom_mc_lora"


class AdapterError(ConfigError):
    """An adapter file or checkpoint that cannot be used as asked; the message says why and what to do."""


@dataclass
class Adapters:
    """Full (TP=1) fp32 adapters: module -> (A [r, in], B [out, r] with the scale alpha/rank folded in)."""
    tensors: dict[str, tuple[torch.Tensor, torch.Tensor]]
    source: str
    base: dict | None = None  # base_fingerprint of the weights they were trained on
    model_config: dict | None = None
    info: dict = field(default_factory=dict)  # rank, alpha, targets


def base_fingerprint(pretrained: str | None, init_seed: int) -> dict:
    """What an adapter-only checkpoint's frozen base is: the --pretrained source (path, size and a sha256 of its
    first 4 MiB per file, cheap even for 13B files) or the seeded fresh init."""
    if not pretrained:
        return {"init_seed": init_seed}
    root = Path(pretrained)
    files = sorted(p for p in root.rglob("*") if p.is_file()) if root.is_dir() else [root]
    digest = hashlib.sha256()
    for f in files:
        digest.update(f"{f.relative_to(root) if root.is_dir() else f.name}:{f.stat().st_size}".encode())
        with open(f, "rb") as fh:
            digest.update(fh.read(4 << 20))
    return {"pretrained": str(root.resolve()), "sha256_head": digest.hexdigest()}


# ----------------------------------------------------------------------------- reading
def _ensure_process_group() -> bool:
    """megatron's checkpoint loader is collective: a world of one when nothing set one up (True = we did)."""
    import torch.distributed as dist

    if dist.is_initialized():
        return False
    from hcustom_mc.parallel.config import ParallelConfig
    from hcustom_mc.parallel.state import initialize_parallel

    initialize_parallel(ParallelConfig())
    return True


def read_training_adapters(path: str | Path, ema: bool = False, verify: str = DEFAULT_VERIFY,
                           alpha: float | None = None) -> Adapters:
    """The adapters of a training checkpoint (save root or iter_* folder, any layout), whole, in fp32."""
    import torch
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    from hcustom_mc.checkpoint.integrity import STATE_FILE, select_checkpoint
    from hcustom_mc.checkpoint.mcore import CONFIG_FILE
    from hcustom_mc.checkpoint.safe_load import dist_load, dist_load_tensors_metadata, read_json

    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path} is not a training checkpoint folder")
    _ensure_process_group()
    folder = select_checkpoint(path, verify, complete=STATE_FILE)
    if folder is None:
        raise FileNotFoundError(f"{path} holds no complete training checkpoint")
    meta = read_json(folder / STATE_FILE)
    prefix = "ema." if ema else "model."
    if ema and not meta.get("ema"):
        raise AdapterError(f"{folder} has no EMA weights (trained without --ema-decay): export without --ema")
    stored = {k: t for k, t in dist_load_tensors_metadata(folder).items()
              if k.startswith(prefix) and k.split("#seg")[0].rsplit(".", 1)[-1] in ("lora_A", "lora_B")}
    if not stored:
        raise AdapterError(f"{folder} holds no LoRA adapters (no {prefix}*.lora_A / lora_B tensors)")
    request = {k: ShardedTensor.from_rank_offsets(k, torch.empty(t.global_shape, dtype=t.dtype), replica_id=0)
               for k, t in stored.items()}
    # megatron's naming: `unexpected` = asked for but not in the checkpoint (the rest of it is `missing`)
    loaded, _, unexpected = dist_load(request, folder, strict="return_all")
    if unexpected:
        raise AdapterError(f"{folder}: adapter tensors listed but not readable: {sorted(unexpected)[:10]}")
    # a TP-segmented adapter (B of a fused column linear, A of a segmented row linear) is stored per segment
    whole: dict[str, list[tuple[int, torch.Tensor]]] = {}
    for key in request:  # (the result also carries the checkpoint's common, non-tensor state)
        t = loaded[key]
        name, _, seg = key[len(prefix):].partition("#seg")
        whole.setdefault(name, []).append((int(seg or 0), t))
    full = {n: torch.cat([t for _, t in sorted(parts, key=lambda x: x[0])], 0 if n.endswith("lora_B") else 1).float()
            for n, parts in whole.items()}
    lora = meta.get("lora") or {}
    alpha = lora.get("alpha") if alpha is None else alpha
    if alpha is None:
        raise AdapterError(f"{folder} does not record the LoRA alpha (saved before it was recorded): pass --alpha "
                           "with the run's --lora-alpha (its --lora-rank when it had none)")
    tensors = {}
    for name in sorted({n.rsplit(".", 1)[0] for n in full}):
        A, B = full.get(f"{name}.lora_A"), full.get(f"{name}.lora_B")
        if A is None or B is None:
            raise AdapterError(f"{folder}: {name} has only one of lora_A / lora_B")
        tensors[name] = (A, B * (float(alpha) / A.shape[0]))
    cfg_file = folder / CONFIG_FILE
    return Adapters(tensors, str(folder), base=meta.get("adapter_base"),
                    model_config=read_json(cfg_file) if cfg_file.is_file() else None,
                    info={"rank": lora.get("rank", next(iter(tensors.values()))[0].shape[0]), "alpha": float(alpha),
                          "targets": lora.get("targets"), "ema": ema, "step": meta.get("step")})


def read_adapter_file(path: str | Path) -> Adapters:
    """An `--format original` export (release module names). Safetensors only: nothing is unpickled."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"LoRA file {path} does not exist")
    if path.suffix != ".safetensors":
        raise AdapterError(f"LoRA file {path}: only .safetensors adapter files are read (export one with "
                           "`python -m hcustom_mc.checkpoint.lora export`), or pass a training checkpoint folder")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {}).get(META_KEY, "{}"))
            sd = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:  # SafetensorError (not a safetensors file: a renamed pickle, truncated), bad JSON
        raise AdapterError(f"LoRA file {path} is not a readable .safetensors adapter file ({type(exc).__name__}: "
                           f"{' '.join(str(exc).split())[:200]}); nothing in it was run") from None
    if not isinstance(meta, dict):
        raise AdapterError(f"LoRA file {path}: its {META_KEY!r} metadata is not a mapping")
    if meta.get("format") == "diffusers" or any(k.startswith("transformer.") for k in sd):
        raise AdapterError(f"{path} is in the diffusers layout (for diffusers pipelines); this needs the original "
                           "layout: export with --format original")
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in sd.items():
        name = key[len("diffusion_model."):] if key.startswith("diffusion_model.") else key
        for p in ("lora_A", "lora_B"):
            if name.endswith(f".{p}.weight"):
                parts.setdefault(name[: -len(f".{p}.weight")], {})[p] = t.float()
                break
        else:
            raise AdapterError(f"{path}: unexpected key {key!r} (want <module>.lora_A.weight / .lora_B.weight)")
    bad = sorted(n for n, p in parts.items() if set(p) != {"lora_A", "lora_B"})
    if bad:
        raise AdapterError(f"{path}: modules with only one of lora_A / lora_B: {bad[:10]}")
    return Adapters({n: (p["lora_A"], p["lora_B"]) for n, p in sorted(parts.items())}, str(path),
                    base=meta.get("base"), model_config=meta.get("model_config"), info=meta.get("info", {}))


def load_adapters(path: str | Path) -> Adapters:
    """A training checkpoint folder or an original-layout .safetensors export."""
    return read_training_adapters(path) if Path(path).is_dir() else read_adapter_file(path)


def parse_spec(spec: str) -> tuple[Path, float]:
    """`FILE[:scale]` -> (path, scale); scale defaults to 1."""
    head, sep, tail = str(spec).rpartition(":")
    if not sep or not head:
        return Path(spec), 1.0
    try:
        return Path(head), float(tail)
    except ValueError:
        if Path(spec).exists():  # a colon inside the file name
            return Path(spec), 1.0
        raise AdapterError(f"bad LoRA spec {spec!r}: want FILE or FILE:SCALE with a number for SCALE") from None


def check_base(adapters: Adapters, base_path: str | Path) -> None:
    """Refuse adapters trained on another --pretrained file than `base_path` (compared by content head)."""
    saved = adapters.base or {}
    if "sha256_head" not in saved:
        if saved:
            log.warning("LoRA %s was trained on %s, which cannot be checked against %s", adapters.source, saved, base_path)
        return
    got = base_fingerprint(str(base_path), 0)
    if got["sha256_head"] != saved["sha256_head"]:
        raise AdapterError(f"{adapters.source} holds LoRA adapters trained on the base {saved['pretrained']}, not "
                           f"{base_path} (fingerprints differ); use that base, or export the adapters with "
                           "--no-base-check to apply them anyway")


# ----------------------------------------------------------------------------- merging
def check_against_shapes(adapters: Adapters, weights: dict[str, tuple[int, ...]]) -> None:
    """Every adapter must sit on a 2-D weight of this model with matching in/out sizes (full shapes)."""
    problems = []
    for name, (A, B) in adapters.tensors.items():
        shape = weights.get(f"{name}.weight")
        if shape is None:
            problems.append(f"{name}: no such linear in this model")
        elif len(shape) != 2 or (B.shape[0], A.shape[1]) != tuple(shape) or A.shape[0] != B.shape[1]:
            problems.append(f"{name}: adapter {tuple(B.shape)} @ {tuple(A.shape)} does not fit weight {tuple(shape)}")
    if problems:
        raise AdapterError(f"LoRA {adapters.source} does not fit the model ({len(problems)} problems): "
                           + "; ".join(problems[:8]))


def merge_into_state_dict(sd: dict[str, torch.Tensor], adapters: Adapters, scale: float = 1.0) -> None:
    """W += scale * B @ A on full release-layout tensors, in fp32, cast back to each weight's dtype."""
    import torch

    check_against_shapes(adapters, {k: tuple(v.shape) for k, v in sd.items()})
    with torch.no_grad():
        for name, (A, B) in adapters.tensors.items():
            w = sd[f"{name}.weight"]
            sd[f"{name}.weight"] = (w.float() + scale * (B @ A)).to(w.dtype)


def weight_shapes(model: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    """name -> full (TP=1) shape of every parameter of `model` (a meta-device whole model is fine)."""
    from hcustom_mc.parallel.sharding import get_tp_split

    out = {}
    for n, p in model.named_parameters():
        shape, split = list(p.shape), get_tp_split(p)
        if split is not None:
            shape[split.dim] = sum(split.segments)
        out[n] = tuple(shape)
    return out


def load_specs(specs, base_path: str | Path | None) -> list[tuple[Adapters, float]]:
    """Read every `FILE[:scale]` (an original-layout export or a training checkpoint folder), each checked
    against the base it will be merged into (`base_path`, see check_base)."""
    loaded = []
    for spec in specs:
        path, scale = parse_spec(spec)
        if not path.exists():
            raise FileNotFoundError(f"LoRA {path} does not exist")
        adapters = load_adapters(path)
        if base_path is not None:
            check_base(adapters, base_path)
        loaded.append((adapters, scale))
    return loaded


def merge_into_model(model: torch.nn.Module, adapters: Adapters, scale: float = 1.0, full_shapes=None) -> int:
    """W += scale * B @ A on this rank's shards (TP) of the modules it holds (PP). `full_shapes` (name -> full
    shape of every weight of the whole model) checks the adapters first; default: this model's weights."""
    import torch
    from megatron.core import parallel_state as ps

    from hcustom_mc.parallel.sharding import get_tp_split, shard_full_tensor

    rank, tp = ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_world_size()
    params = dict(model.named_parameters())
    check_against_shapes(adapters, full_shapes or weight_shapes(model))
    merged = 0
    for name, (A, B) in adapters.tensors.items():
        w = params.get(f"{name}.weight")
        if w is None:  # another pipeline stage's layer
            continue
        delta, split = scale * (B @ A), get_tp_split(w)
        if split is not None and tp > 1:
            delta = shard_full_tensor(delta, split, rank, tp)
        with torch.no_grad():
            w.copy_((w.float() + delta.to(w.device)).to(w.dtype))
        merged += 1
    return merged


# ----------------------------------------------------------------------------- exporting
def to_original(adapters: Adapters, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    out = {}
    for name, (A, B) in adapters.tensors.items():
        out[f"{PREFIX['original']}{name}.lora_A.weight"] = A.to(dtype or A.dtype).contiguous()
        out[f"{PREFIX['original']}{name}.lora_B.weight"] = B.to(dtype or B.dtype).contiguous()
    return out


def _diffusers_modules(cfg) -> dict[str, tuple[tuple[str, ...], str]]:
    """release linear -> (its diffusers modules, how its output rows are laid out there)."""
    from hcustom_mc.checkpoint.diffusers_format import _rows

    rows = _rows(cfg.num_refiner_blocks, cfg.num_double_blocks, cfg.num_single_blocks, cfg.guidance_embed)
    return {rel[: -len(".weight")]: (tuple(d[: -len(".weight")] for d in difs), kind)
            for rel, difs, kind in rows if rel.endswith(".weight")}


def to_diffusers(adapters: Adapters, cfg, dtype: torch.dtype | None = None) -> tuple[dict[str, torch.Tensor], list[str]]:
    """(diffusers/PEFT state dict, release modules skipped because diffusers has no such module)."""
    import torch

    from hcustom_mc.checkpoint.diffusers_format import COPY, LINEAR1, QKV, SWAP

    table = _diffusers_modules(cfg)
    out, skipped = {}, []
    for name, (A, B) in adapters.tensors.items():
        if name not in table:
            skipped.append(name)
            continue
        modules, kind = table[name]
        if kind == COPY:
            blocks = [B]
        elif kind == QKV:
            blocks = list(B.chunk(3, 0))
        elif kind == LINEAR1:  # [q; k; v; mlp] rows
            h = cfg.hidden_size
            blocks = list(B.split([h, h, h, B.shape[0] - 3 * h], 0))
        elif kind == SWAP:  # release (shift, scale) rows, diffusers (scale, shift)
            shift, scale = B.chunk(2, 0)
            blocks = [torch.cat([scale, shift], 0)]
        else:  # pragma: no cover - table error
            raise AssertionError(kind)
        for module, b in zip(modules, blocks, strict=True):
            out[f"{PREFIX['diffusers']}{module}.lora_A.weight"] = A.to(dtype or A.dtype).clone()  # own storage each
            out[f"{PREFIX['diffusers']}{module}.lora_B.weight"] = b.to(dtype or b.dtype).contiguous().clone()
    return out, skipped


# diffusers' original-layout converter splits these wrongly (it chunks lora_A too, or at hidden size 3072)
_DIFFUSERS_ORIGINAL_CAVEATS = ("self_attn_qkv", "final_layer.adaLN_modulation.1")


def export(ckpt: str | Path, fmt: str, out: str | Path, *, ema: bool = False, dtype: torch.dtype | None = None,
           alpha: float | None = None, base_check: bool = True, verify: str = DEFAULT_VERIFY) -> dict:
    """Write the adapters of training checkpoint `ckpt` as `out` (.safetensors); returns a summary."""
    from safetensors.torch import save_file

    from hcustom_mc.model.config import ModelConfig

    if fmt not in FORMATS:
        raise AdapterError(f"--format must be one of {FORMATS}, got {fmt!r}")
    adapters = read_training_adapters(ckpt, ema=ema, verify=verify, alpha=alpha)
    skipped: list[str] = []
    if fmt == "original":
        sd = to_original(adapters, dtype)
        if not any(".img_attn_qkv." in k for k in sd):
            log.warning("no img_attn_qkv adapters: diffusers recognises the original layout by those keys, so "
                        "diffusers pipelines will not convert this file (use --format diffusers for them)")
        odd = [n for n in adapters.tensors if n.endswith(_DIFFUSERS_ORIGINAL_CAVEATS)
               or (n.endswith(".linear1") and (adapters.model_config or {}).get("hidden_size", 3072) != 3072)]
        if odd:
            log.warning("diffusers' converter of this layout splits %d adapted modules wrongly (%s ...); "
                        "use --format diffusers for diffusers pipelines", len(odd), odd[0])
    else:
        if adapters.model_config is None:
            raise AdapterError(f"{adapters.source} has no model config ({'hcustom_model.json'}): cannot map to diffusers")
        sd, skipped = to_diffusers(adapters, ModelConfig.from_dict(adapters.model_config), dtype)
        if skipped:
            log.warning("diffusers format: skipped %d adapted modules diffusers' HunyuanVideo transformer does not "
                        "have (export --format original to keep them): %s", len(skipped), skipped)
        if not sd:
            raise AdapterError(f"{adapters.source}: none of its adapted modules exists in diffusers")
    meta = {"format": fmt, "scale_folded": True, "info": adapters.info, "model_config": adapters.model_config,
            "base": adapters.base if base_check else None, "source": adapters.source, "skipped": skipped}
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file(sd, str(out), metadata={"format": "pt", META_KEY: json.dumps(meta, default=str)})
    log.info("exported %d adapted modules (%d tensors, %s layout) from %s to %s", len(adapters.tensors) - len(skipped),
             len(sd), fmt, adapters.source, out)
    return {"modules": len(adapters.tensors), "tensors": len(sd), "skipped": skipped, "out": str(out)}


DTYPES = ("keep", "float32", "bfloat16", "float16")  # torch dtype names: torch is imported after parsing


def parse_args(argv=None):
    from hcustom_mc.console import ArgumentParser

    p = ArgumentParser(prog="python -m hcustom_mc.checkpoint.lora", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True, parser_class=ArgumentParser)
    e = sub.add_parser("export", help="write a training checkpoint's LoRA adapters as a .safetensors file")
    e.add_argument("--ckpt", required=True, type=Path,
                   help="training --save folder (its latest) or an iter_* folder (required)")
    e.add_argument("--format", required=True, choices=FORMATS, help="original: release module names; "
                   "diffusers: HunyuanVideoTransformer3DModel module names (see above) (required)")
    e.add_argument("--out", required=True, type=Path, help="the .safetensors file to write (required)")
    e.add_argument("--ema", action="store_true",
                   help="export the adapters' EMA (a run with --ema-decay) (switch; default: off)")
    e.add_argument("--dtype", default="keep", choices=DTYPES, help="tensor dtype; keep: as trained, fp32 (default: keep)")
    e.add_argument("--alpha", type=float, help="the run's --lora-alpha, for checkpoints that do not record it "
                   "(default: not set: the recorded one)")
    e.add_argument("--no-base-check", action="store_true", help="leave out the base fingerprint: --lora / "
                   "--merge-lora then apply it to any base (switch; default: off)")
    e.add_argument("--overwrite", action="store_true", help="replace an existing --out (switch; default: off)")
    e.add_argument("--verify-checkpoint", default=DEFAULT_VERIFY, choices=VERIFY_MODES, help=flag_help())
    e.add_argument("--verbose", action="store_true", help="show known third-party warnings (switch; default: off)")
    args = p.parse_args(argv)
    if args.out.suffix != ".safetensors":
        e.error(f"--out {args.out}: the file name must end in .safetensors")
    if args.out.exists() and not args.overwrite:
        e.error(f"--out {args.out} exists (pass --overwrite)")
    return args


def main(argv=None) -> int:
    from hcustom_mc import console

    console.setup(console.verbose_requested(argv))
    args = parse_args(argv)  # before torch is imported: --help and usage errors return at once
    import torch

    from hcustom_mc.parallel.state import destroy_parallel

    try:
        export(args.ckpt, args.format, args.out, ema=args.ema,
               dtype=None if args.dtype == "keep" else getattr(torch, args.dtype), alpha=args.alpha,
               base_check=not args.no_base_check, verify=args.verify_checkpoint)
    finally:
        destroy_parallel()
    return 0


if __name__ == "__main__":
    from hcustom_mc import console

    # ValueError includes AdapterError, CheckpointFormatError and damaged files
    console.run_entry_point(main, lambda: (ConfigError, FileNotFoundError, ValueError), key="hcustom_mc/lora_error")
