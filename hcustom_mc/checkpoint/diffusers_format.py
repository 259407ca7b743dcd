"""Conversion between the release layout and diffusers' `HunyuanVideoTransformer3DModel`.

The mapping is the data in the tables below (facts file section 4), one row per module:
`(release module, diffusers module(s), kind, parameter names)`. Kinds:

* `COPY`   : same tensor, renamed.
* `QKV`    : one fused [q; k; v] Linear in the release <-> three Linears in diffusers
             (chunk 3 on dim 0, weight and bias).
* `LINEAR1`: the single block's fused `linear1` [q; k; v; mlp] <-> `attn.to_q`, `attn.to_k`,
             `attn.to_v`, `proj_mlp`, with sizes [H, H, H, rest], H = hidden size = in-features.
* `SWAP`   : the final layer's adaLN Linear: release output order (shift, scale), diffusers'
             `norm_out.linear` order (scale, shift); halves swapped on dim 0, weight and bias.

Block tables use `{i}` for the block index. `guidance_in` (HunyuanVideo's cfg-distilled model)
is optional: present in both or absent in both. The HunyuanCustom-only modules (`bg_in`,
`bg_proj`, `audio_proj`, `audio_models`) have no diffusers counterpart and are refused.
Conversions only rename, split and concatenate: values and dtypes are bit-exact both ways.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch

from hcustom_mc.checkpoint.release import CheckpointFormatError
from hcustom_mc.model.config import ModelConfig

__all__ = [
    "DIFFUSERS_CLASS_NAME",
    "TOP_LEVEL",
    "GUIDANCE",
    "REFINER_BLOCK",
    "DOUBLE_BLOCK",
    "SINGLE_BLOCK",
    "FINAL_LAYER",
    "CUSTOM_ONLY_PREFIXES",
    "release_to_diffusers",
    "diffusers_to_release",
    "release_keys",
    "diffusers_keys",
    "diffusers_config_from_model_config",
    "model_config_from_diffusers_config",
    "save_diffusers_folder",
    "load_diffusers_folder",
]

DIFFUSERS_CLASS_NAME = "HunyuanVideoTransformer3DModel"
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
WEIGHTS_INDEX_NAME = "diffusion_pytorch_model.safetensors.index.json"
CONFIG_NAME = "config.json"

COPY, QKV, LINEAR1, SWAP = "copy", "qkv", "linear1", "swap"
WB = ("weight", "bias")
W = ("weight",)
TO_QKV = ("attn.to_q", "attn.to_k", "attn.to_v")

# ---------------------------------------------------------------------------------------------
# The mapping table: (release module, diffusers module or modules, kind, parameters)
# ---------------------------------------------------------------------------------------------

TOP_LEVEL = [
    ("img_in.proj",                "x_embedder.proj",                                                  COPY, WB),
    ("txt_in.input_embedder",      "context_embedder.proj_in",                                         COPY, WB),
    ("txt_in.t_embedder.mlp.0",    "context_embedder.time_text_embed.timestep_embedder.linear_1",      COPY, WB),
    ("txt_in.t_embedder.mlp.2",    "context_embedder.time_text_embed.timestep_embedder.linear_2",      COPY, WB),
    ("txt_in.c_embedder.linear_1", "context_embedder.time_text_embed.text_embedder.linear_1",          COPY, WB),
    ("txt_in.c_embedder.linear_2", "context_embedder.time_text_embed.text_embedder.linear_2",          COPY, WB),
    ("time_in.mlp.0",              "time_text_embed.timestep_embedder.linear_1",                       COPY, WB),
    ("time_in.mlp.2",              "time_text_embed.timestep_embedder.linear_2",                       COPY, WB),
    ("vector_in.in_layer",         "time_text_embed.text_embedder.linear_1",                           COPY, WB),
    ("vector_in.out_layer",        "time_text_embed.text_embedder.linear_2",                           COPY, WB),
]

GUIDANCE = [  # optional: HunyuanVideo's cfg-distilled checkpoint only
    ("guidance_in.mlp.0",          "time_text_embed.guidance_embedder.linear_1",                       COPY, WB),
    ("guidance_in.mlp.2",          "time_text_embed.guidance_embedder.linear_2",                       COPY, WB),
]

REFINER_PREFIX = ("txt_in.individual_token_refiner.blocks.{i}.", "context_embedder.token_refiner.refiner_blocks.{i}.")
REFINER_BLOCK = [
    ("norm1",                      "norm1",                                                            COPY, WB),
    ("self_attn_qkv",              TO_QKV,                                                             QKV,  WB),
    ("self_attn_proj",             "attn.to_out.0",                                                    COPY, WB),
    ("norm2",                      "norm2",                                                            COPY, WB),
    ("mlp.fc1",                    "ff.net.0.proj",                                                    COPY, WB),
    ("mlp.fc2",                    "ff.net.2",                                                         COPY, WB),
    ("adaLN_modulation.1",         "norm_out.linear",                                                  COPY, WB),  # (gate_msa, gate_mlp) in both
]

DOUBLE_PREFIX = ("double_blocks.{i}.", "transformer_blocks.{i}.")
DOUBLE_BLOCK = [
    ("img_mod.linear",             "norm1.linear",                                                     COPY, WB),
    ("img_attn_qkv",               TO_QKV,                                                             QKV,  WB),
    ("img_attn_q_norm",            "attn.norm_q",                                                      COPY, W),
    ("img_attn_k_norm",            "attn.norm_k",                                                      COPY, W),
    ("img_attn_proj",              "attn.to_out.0",                                                    COPY, WB),
    ("img_mlp.fc1",                "ff.net.0.proj",                                                    COPY, WB),
    ("img_mlp.fc2",                "ff.net.2",                                                         COPY, WB),
    ("txt_mod.linear",             "norm1_context.linear",                                             COPY, WB),
    ("txt_attn_qkv",               ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),          QKV,  WB),
    ("txt_attn_q_norm",            "attn.norm_added_q",                                                COPY, W),
    ("txt_attn_k_norm",            "attn.norm_added_k",                                                COPY, W),
    ("txt_attn_proj",              "attn.to_add_out",                                                  COPY, WB),
    ("txt_mlp.fc1",                "ff_context.net.0.proj",                                            COPY, WB),
    ("txt_mlp.fc2",                "ff_context.net.2",                                                 COPY, WB),
]

SINGLE_PREFIX = ("single_blocks.{i}.", "single_transformer_blocks.{i}.")
SINGLE_BLOCK = [
    ("linear1",                    TO_QKV + ("proj_mlp",),                                             LINEAR1, WB),
    ("linear2",                    "proj_out",                                                         COPY, WB),
    ("q_norm",                     "attn.norm_q",                                                      COPY, W),
    ("k_norm",                     "attn.norm_k",                                                      COPY, W),
    ("modulation.linear",          "norm.linear",                                                      COPY, WB),
]

FINAL_LAYER = [
    ("final_layer.linear",         "proj_out",                                                         COPY, WB),
    ("final_layer.adaLN_modulation.1", "norm_out.linear",                                              SWAP, WB),  # (shift, scale) <-> (scale, shift)
]

# HunyuanCustom additions with no diffusers module.
CUSTOM_ONLY_PREFIXES = ("bg_in.", "bg_proj.", "audio_proj.", "audio_models.")

# Block-index patterns, per layout.
_RELEASE_INDEX = {
    "refiner": re.compile(r"^txt_in\.individual_token_refiner\.blocks\.(\d+)\."),
    "double": re.compile(r"^double_blocks\.(\d+)\."),
    "single": re.compile(r"^single_blocks\.(\d+)\."),
}
_DIFFUSERS_INDEX = {
    "refiner": re.compile(r"^context_embedder\.token_refiner\.refiner_blocks\.(\d+)\."),
    "double": re.compile(r"^transformer_blocks\.(\d+)\."),
    "single": re.compile(r"^single_transformer_blocks\.(\d+)\."),
}
_GUIDANCE_PREFIX = {"release": "guidance_in.", "diffusers": "time_text_embed.guidance_embedder."}


# ---------------------------------------------------------------------------------------------
# Expanding the table
# ---------------------------------------------------------------------------------------------


def _rows(n_refiner: int, n_double: int, n_single: int, guidance: bool) -> list[tuple[str, tuple[str, ...], str]]:
    """Parameter-level rules `(release key, diffusers keys, kind)` for a model of this shape."""
    modules: list[tuple[str, tuple[str, ...], str, tuple[str, ...]]] = []

    def add(table, prefixes=("", ""), i=None):
        rp, dp = (p.format(i=i) for p in prefixes)
        for rel, dif, kind, params in table:
            dif = (dif,) if isinstance(dif, str) else dif
            modules.append((rp + rel, tuple(dp + d for d in dif), kind, params))

    add(TOP_LEVEL)
    if guidance:
        add(GUIDANCE)
    for i in range(n_refiner):
        add(REFINER_BLOCK, REFINER_PREFIX, i)
    for i in range(n_double):
        add(DOUBLE_BLOCK, DOUBLE_PREFIX, i)
    for i in range(n_single):
        add(SINGLE_BLOCK, SINGLE_PREFIX, i)
    add(FINAL_LAYER)
    return [
        (f"{rel}.{p}", tuple(f"{d}.{p}" for d in dif), kind)
        for rel, dif, kind, params in modules
        for p in params
    ]


def release_keys(n_refiner: int, n_double: int, n_single: int, guidance: bool = False) -> list[str]:
    """The release-layout keys of a base (no audio / video-condition) model of this shape."""
    return [r for r, _, _ in _rows(n_refiner, n_double, n_single, guidance)]


def diffusers_keys(n_refiner: int, n_double: int, n_single: int, guidance: bool = False) -> list[str]:
    """The diffusers keys of a `HunyuanVideoTransformer3DModel` of this shape."""
    return [d for _, ds, _ in _rows(n_refiner, n_double, n_single, guidance) for d in ds]


def _natural(key: str) -> list:
    return [int(s) if s.isdigit() else s for s in re.split(r"(\d+)", key)]


def _listing(keys: Iterable[str], limit: int = 200) -> str:
    keys = sorted(keys, key=_natural)
    shown = ", ".join(keys[:limit])
    return shown + (f", ... and {len(keys) - limit} more" if len(keys) > limit else "")


def _shape_of(sd: Mapping[str, torch.Tensor], layout: str) -> tuple[int, int, int, bool]:
    """Block counts (max index + 1, so gaps show up as missing keys) and guidance presence."""
    patterns = _RELEASE_INDEX if layout == "release" else _DIFFUSERS_INDEX
    counts = []
    for kind in ("refiner", "double", "single"):
        idx = [int(m.group(1)) for k in sd if (m := patterns[kind].match(k))]
        counts.append(max(idx) + 1 if idx else 0)
    guidance = any(k.startswith(_GUIDANCE_PREFIX[layout]) for k in sd)
    return counts[0], counts[1], counts[2], guidance


def _check_keys(sd: Mapping[str, Any], expected: Iterable[str], layout: str) -> None:
    if not isinstance(sd, Mapping):
        raise CheckpointFormatError(f"expected a {layout} state dict (dict of tensors), got {type(sd).__name__}")
    expected = set(expected)
    errors = []
    if layout == "release":
        custom = [k for k in sd if k.startswith(CUSTOM_ONLY_PREFIXES)]
        if custom:
            errors.append(
                "HunyuanCustom-only modules (video condition bg_in/bg_proj, audio audio_proj/audio_models) "
                f"have no counterpart in diffusers' {DIFFUSERS_CLASS_NAME}, so this checkpoint cannot be "
                f"converted (drop them deliberately if you want the base DiT only): {_listing(custom)}"
            )
    else:
        custom = []
    unknown = [k for k in sd if k not in expected and k not in custom]
    if unknown:
        errors.append(f"unknown {layout} keys: {_listing(unknown)}")
    missing = [k for k in expected if k not in sd]
    if missing:
        errors.append(f"missing {layout} keys: {_listing(missing)}")
    not_tensor = [k for k, v in sd.items() if not isinstance(v, torch.Tensor)]
    if not_tensor:
        errors.append(f"entries that are not tensors: {_listing(not_tensor)}")
    if errors:
        raise CheckpointFormatError(f"cannot convert the {layout} state dict:\n  - " + "\n  - ".join(errors))


def _fresh(t: torch.Tensor) -> torch.Tensor:
    return t.clone(memory_format=torch.contiguous_format)


# ---------------------------------------------------------------------------------------------
# Conversions
# ---------------------------------------------------------------------------------------------


def release_to_diffusers(sd: Mapping[str, torch.Tensor], *, copy: bool = True) -> dict[str, torch.Tensor]:
    """Release-layout state dict -> diffusers `HunyuanVideoTransformer3DModel` state dict.

    Bit-exact (no dtype change). With `copy=True` every output tensor is new; with `copy=False`
    renamed tensors are the input objects themselves (split / swapped ones are always new and
    never share storage).
    """
    rows = _rows(*_shape_of(sd, "release"))
    _check_keys(sd, (r for r, _, _ in rows), "release")
    out: dict[str, torch.Tensor] = {}
    for rel, difs, kind in rows:
        t = sd[rel]
        if kind == COPY:
            parts = [_fresh(t) if copy else t]
        elif kind == QKV:
            if t.shape[0] % 3:
                raise CheckpointFormatError(f"{rel} has shape {tuple(t.shape)}: dim 0 is not divisible by 3 (q, k, v)")
            parts = [_fresh(p) for p in t.chunk(3, dim=0)]
        elif kind == LINEAR1:
            weight = sd[rel.rsplit(".", 1)[0] + ".weight"]
            hidden = weight.shape[1]
            rest = t.shape[0] - 3 * hidden
            if weight.ndim != 2 or rest <= 0:
                raise CheckpointFormatError(
                    f"{rel} has shape {tuple(t.shape)}; expected [3*H + mlp, ...] with H = {hidden} (linear1 in-features)"
                )
            parts = [_fresh(p) for p in t.split([hidden, hidden, hidden, rest], dim=0)]
        elif kind == SWAP:
            if t.shape[0] % 2:
                raise CheckpointFormatError(f"{rel} has shape {tuple(t.shape)}: dim 0 is not even (shift, scale)")
            shift, scale = t.chunk(2, dim=0)
            parts = [torch.cat([scale, shift], dim=0)]
        else:  # pragma: no cover - table error
            raise AssertionError(kind)
        out.update(zip(difs, parts))
    return out


def diffusers_to_release(sd: Mapping[str, torch.Tensor], *, copy: bool = True) -> dict[str, torch.Tensor]:
    """Diffusers `HunyuanVideoTransformer3DModel` state dict -> release-layout state dict.

    Bit-exact (no dtype change); `copy` as in `release_to_diffusers`.
    """
    rows = _rows(*_shape_of(sd, "diffusers"))
    _check_keys(sd, (d for _, ds, _ in rows for d in ds), "diffusers")
    return {rel: fuse_release_tensor(rel, difs, kind, [sd[d] for d in difs], copy=copy) for rel, difs, kind in rows}


def diffusers_rows(keys: Iterable[str]) -> list[tuple[str, tuple[str, ...], str]]:
    """The (release key, diffusers keys, kind) rules for a diffusers checkpoint holding `keys`."""
    return _rows(*_shape_of(dict.fromkeys(keys), "diffusers"))


def fuse_release_tensor(rel: str, difs: tuple[str, ...], kind: str, parts: list[torch.Tensor], *,
                        copy: bool = True) -> torch.Tensor:
    """One release tensor from its diffusers parts (one row of the table)."""
    if kind == COPY:
        return _fresh(parts[0]) if copy else parts[0]
    dtypes = {p.dtype for p in parts}
    trailing = {tuple(p.shape[1:]) for p in parts}
    if len(dtypes) != 1 or len(trailing) != 1:
        raise CheckpointFormatError(
            f"cannot fuse {list(difs)} into {rel}: parts differ in dtype or trailing shape "
            f"({[(str(p.dtype), tuple(p.shape)) for p in parts]})"
        )
    if kind == QKV:
        if len({p.shape[0] for p in parts}) != 1:
            raise CheckpointFormatError(f"cannot fuse {list(difs)} into {rel}: q, k, v sizes differ")
        return torch.cat(parts, dim=0)
    if kind == LINEAR1:
        return torch.cat(parts, dim=0)
    if kind == SWAP:
        if parts[0].shape[0] % 2:
            raise CheckpointFormatError(f"{difs[0]} has shape {tuple(parts[0].shape)}: dim 0 is not even")
        scale, shift = parts[0].chunk(2, dim=0)
        return torch.cat([shift, scale], dim=0)
    raise AssertionError(kind)  # pragma: no cover - table error


# ---------------------------------------------------------------------------------------------
# Configs
# ---------------------------------------------------------------------------------------------

# diffusers' constructor defaults (facts file section 4): a config.json lacking a key means this.
DIFFUSERS_DEFAULTS: dict[str, Any] = {
    "in_channels": 16, "out_channels": 16, "num_attention_heads": 24, "attention_head_dim": 128,
    "num_layers": 20, "num_single_layers": 40, "num_refiner_layers": 2, "mlp_ratio": 4.0,
    "patch_size": 2, "patch_size_t": 1, "qk_norm": "rms_norm", "guidance_embeds": True,
    "text_embed_dim": 4096, "pooled_projection_dim": 768, "rope_theta": 256.0,
    "rope_axes_dim": (16, 56, 56), "image_condition_type": None,
}
_DIFFUSERS_NORM_EPS = 1e-6  # diffusers hard-codes eps 1e-6 in every HunyuanVideo norm


def diffusers_config_from_model_config(cfg: ModelConfig) -> dict[str, Any]:
    """The `HunyuanVideoTransformer3DModel(**kwargs)` arguments for a base (non-audio,
    non-editing) model config. `mode` has no diffusers counterpart and is not recorded."""
    cfg.validate()
    errors = []
    if cfg.audio:
        errors.append("audio=True: diffusers has no audio modules (audio_proj / audio_models)")
    if cfg.video_condition:
        errors.append("video_condition=True: diffusers has no video-condition modules (bg_in / bg_proj)")
    if cfg.patch_size[1] != cfg.patch_size[2]:
        errors.append(f"patch_size {tuple(cfg.patch_size)}: diffusers supports square spatial patches only")
    if cfg.norm_eps != _DIFFUSERS_NORM_EPS:
        errors.append(f"norm_eps {cfg.norm_eps}: diffusers uses {_DIFFUSERS_NORM_EPS} in every norm")
    if errors:
        raise CheckpointFormatError("model config not representable in diffusers:\n  - " + "\n  - ".join(errors))
    return {
        "in_channels": cfg.in_channels,
        "out_channels": cfg.out_channels,
        "num_attention_heads": cfg.num_heads,
        "attention_head_dim": cfg.head_dim,
        "num_layers": cfg.num_double_blocks,
        "num_single_layers": cfg.num_single_blocks,
        "num_refiner_layers": cfg.num_refiner_blocks,
        "mlp_ratio": float(cfg.mlp_ratio),
        "patch_size": int(cfg.patch_size[1]),
        "patch_size_t": int(cfg.patch_size[0]),
        "qk_norm": "rms_norm",
        "guidance_embeds": bool(cfg.guidance_embed),
        "text_embed_dim": cfg.text_dim,
        "pooled_projection_dim": cfg.pooled_text_dim,
        "rope_theta": float(cfg.rope_theta),
        "rope_axes_dim": list(cfg.rope_dims),
        "image_condition_type": None,
    }


def model_config_from_diffusers_config(d: Mapping[str, Any], **overrides) -> ModelConfig:
    """A ModelConfig from a diffusers `HunyuanVideoTransformer3DModel` config (dict or
    `model.config`). Keys starting with `_` are metadata and ignored; missing keys take diffusers'
    defaults. `overrides` set ModelConfig fields diffusers does not describe (e.g. `mode`)."""
    d = dict(d)
    cls = d.get("_class_name")
    if cls is not None and cls != DIFFUSERS_CLASS_NAME:
        raise CheckpointFormatError(f"diffusers config is for {cls!r}, not {DIFFUSERS_CLASS_NAME!r}")
    d = {k: v for k, v in d.items() if not k.startswith("_")}
    unknown = sorted(set(d) - set(DIFFUSERS_DEFAULTS))
    if unknown:
        raise CheckpointFormatError(f"unknown {DIFFUSERS_CLASS_NAME} config keys: {unknown}")
    c = {**DIFFUSERS_DEFAULTS, **d}
    errors = []
    if c["image_condition_type"] is not None:
        errors.append(
            f"image_condition_type={c['image_condition_type']!r} (HunyuanVideo-I2V) is not supported; only None"
        )
    if c["qk_norm"] != "rms_norm":
        errors.append(f"qk_norm={c['qk_norm']!r} is not supported; only 'rms_norm'")
    if c["patch_size_t"] != 1:
        errors.append(f"patch_size_t={c['patch_size_t']} is not supported; only 1")
    if c["out_channels"] is None:
        c["out_channels"] = c["in_channels"]  # diffusers: out_channels or in_channels
    if errors:
        raise CheckpointFormatError("unsupported diffusers config:\n  - " + "\n  - ".join(errors))
    fields = dict(
        in_channels=int(c["in_channels"]),
        out_channels=int(c["out_channels"]),
        hidden_size=int(c["num_attention_heads"]) * int(c["attention_head_dim"]),
        num_heads=int(c["num_attention_heads"]),
        mlp_ratio=float(c["mlp_ratio"]),
        num_double_blocks=int(c["num_layers"]),
        num_single_blocks=int(c["num_single_layers"]),
        num_refiner_blocks=int(c["num_refiner_layers"]),
        patch_size=(int(c["patch_size_t"]), int(c["patch_size"]), int(c["patch_size"])),
        rope_dims=tuple(int(x) for x in c["rope_axes_dim"]),
        rope_theta=float(c["rope_theta"]),
        text_dim=int(c["text_embed_dim"]),
        pooled_text_dim=int(c["pooled_projection_dim"]),
        guidance_embed=bool(c["guidance_embeds"]),
        norm_eps=_DIFFUSERS_NORM_EPS,
        audio=False,
        video_condition=False,
    )
    fields.update(overrides)
    return ModelConfig(**fields).validate()


def _check_against_config(sd: Mapping[str, torch.Tensor], cfg: ModelConfig, what: str) -> None:
    """Release-layout `sd` must be exactly the base model `cfg` describes (keys and key shapes)."""
    expected = release_keys(cfg.num_refiner_blocks, cfg.num_double_blocks, cfg.num_single_blocks, cfg.guidance_embed)
    _check_keys(sd, expected, "release")
    H, (pt, ph, pw) = cfg.hidden_size, cfg.patch_size
    shapes = {
        "img_in.proj.weight": (H, cfg.in_channels, pt, ph, pw),
        "txt_in.input_embedder.weight": (H, cfg.text_dim),
        "vector_in.in_layer.weight": (H, cfg.pooled_text_dim),
        "final_layer.linear.weight": (pt * ph * pw * cfg.out_channels, H),
    }
    if cfg.num_double_blocks:
        shapes["double_blocks.0.img_mlp.fc1.weight"] = (cfg.mlp_hidden, H)
        shapes["double_blocks.0.img_attn_q_norm.weight"] = (cfg.head_dim,)
    if cfg.num_single_blocks:
        shapes["single_blocks.0.linear1.weight"] = (3 * H + cfg.mlp_hidden, H)
    bad = [f"{k}: {tuple(sd[k].shape)} != {v}" for k, v in shapes.items() if tuple(sd[k].shape) != v]
    if bad:
        raise CheckpointFormatError(f"{what}: weights do not match the config:\n  - " + "\n  - ".join(bad))


# ---------------------------------------------------------------------------------------------
# Folders
# ---------------------------------------------------------------------------------------------


def _diffusers_version() -> str:
    try:
        import diffusers

        return diffusers.__version__
    except Exception:  # pragma: no cover - diffusers is optional for writing
        return "0.32.0"


def save_diffusers_folder(release_sd: Mapping[str, torch.Tensor], cfg: ModelConfig, path: str | os.PathLike) -> Path:
    """Write `config.json` + `diffusion_pytorch_model.safetensors` (one file) into directory `path`,
    loadable by `HunyuanVideoTransformer3DModel.from_pretrained(path)`."""
    from safetensors.torch import save_file

    config = diffusers_config_from_model_config(cfg)
    _check_against_config(release_sd, cfg, "save_diffusers_folder")
    tensors = release_to_diffusers(release_sd, copy=False)
    seen: set[tuple[int, int]] = set()
    for k, t in tensors.items():  # safetensors refuses shared or non-contiguous storage
        t = t.detach().cpu()
        key = (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        if not t.is_contiguous() or key in seen or t.untyped_storage().nbytes() != t.numel() * t.element_size():
            t = _fresh(t)
        seen.add((t.untyped_storage().data_ptr(), t.untyped_storage().nbytes()))
        tensors[k] = t
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / WEIGHTS_NAME), metadata={"format": "pt"})
    meta = {"_class_name": DIFFUSERS_CLASS_NAME, "_diffusers_version": _diffusers_version(), **config}
    (out / CONFIG_NAME).write_text(json.dumps(meta, indent=2) + "\n")
    return out


def load_diffusers_folder(path: str | os.PathLike, **overrides) -> tuple[dict[str, torch.Tensor], ModelConfig]:
    """Read a diffusers `HunyuanVideoTransformer3DModel` folder (`config.json` plus one
    `diffusion_pytorch_model.safetensors` or its sharded `.safetensors.index.json` form; never
    pickle) -> `(release_sd, ModelConfig)`. A pipeline folder's `transformer/` is found too."""
    from safetensors.torch import load_file

    folder = Path(path)
    if not (folder / CONFIG_NAME).is_file() and (folder / "transformer" / CONFIG_NAME).is_file():
        folder = folder / "transformer"
    config_file = folder / CONFIG_NAME
    if not config_file.is_file():
        raise CheckpointFormatError(f"{folder} has no {CONFIG_NAME}")
    cfg = model_config_from_diffusers_config(json.loads(config_file.read_text()), **overrides)

    single, index = folder / WEIGHTS_NAME, folder / WEIGHTS_INDEX_NAME
    if single.is_file():
        sd = load_file(str(single))
    elif index.is_file():
        weight_map = json.loads(index.read_text()).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointFormatError(f"{index} has no weight_map")
        sd = {}
        for shard in sorted(set(weight_map.values())):
            shard_file = folder / shard
            if not shard_file.is_file() or Path(shard).name != shard:
                raise CheckpointFormatError(f"{index} names the shard {shard!r}, which is not a file in {folder}")
            part = load_file(str(shard_file))
            sd.update({k: v for k, v in part.items() if weight_map.get(k) == shard})
        absent = sorted(set(weight_map) - set(sd))
        if absent:
            raise CheckpointFormatError(f"{index}: keys listed but not found in their shards: {_listing(absent)}")
    else:
        found = sorted(p.name for p in folder.iterdir())
        raise CheckpointFormatError(
            f"{folder} has neither {WEIGHTS_NAME} nor {WEIGHTS_INDEX_NAME} (safetensors only); files: {found}"
        )
    release_sd = diffusers_to_release(sd, copy=False)
    _check_against_config(release_sd, cfg, str(folder))
    return release_sd, cfg
