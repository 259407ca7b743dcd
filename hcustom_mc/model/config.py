"""Typed model configuration for the HunyuanCustom DiT, with the `tiny` and `13b` presets.

The 13B numbers are those of the released `HYVideo-T/2` config (see the facts file, section 1.4).
`mode` selects where the release and the paper differ: identity RoPE positions, audio alignment,
video-condition alignment and (in the encoders) the LLaVA template. In paper mode, `identity_rope` picks the
identity images' RoPE positions (hcustom_mc/model/rope.py): `paper` (t=-k, h=i+H', w=j+W', eqs. 1-2, the default)
or `release_spatial` (t=-k, h=i, w=j+W': the spatial offsets the released weights learned). It is saved with the
model config (hcustom_model.json beside every checkpoint), so sampling uses the positions training used.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hcustom_mc.errors import ConfigError  # noqa: F401  (raised here; the model config's error type)

MODES = ("release", "paper")
IDENTITY_ROPES = ("paper", "release_spatial")  # paper mode's identity-image RoPE positions (model/rope.py)
VARIANTS = ("base", "audio", "editing")


def load_yaml(text: str, source: str = "<text>"):
    """yaml.safe_load, except that `1e-5` is a float: YAML 1.1 (PyYAML) wants a dot (`1.0e-5`) and would
    otherwise hand a learning rate over as the string '1e-5'. Malformed YAML raises one ConfigError naming
    `source` (the file, or the flag the text came from), the line and the column."""
    import re

    import yaml

    class Loader(yaml.SafeLoader):
        pass

    Loader.add_implicit_resolver("tag:yaml.org,2002:float", re.compile(r"^[-+]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)[eE][-+]?[0-9]+$"),
                                 list("-+0123456789."))
    try:
        return yaml.load(text, Loader=Loader)  # noqa: S506 (a SafeLoader subclass: no object construction)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{source}:{mark.line + 1}:{mark.column + 1}" if mark is not None else source
        problem = " ".join(filter(None, [getattr(exc, "context", None), getattr(exc, "problem", None)]))
        raise ConfigError(f"{where}: not valid YAML: {problem or str(exc).splitlines()[0]}") from None


@dataclass
class ModelConfig:
    # Backbone (HunyuanVideo 13B defaults).
    in_channels: int = 16
    out_channels: int = 16
    hidden_size: int = 3072
    num_heads: int = 24
    mlp_ratio: float = 4.0
    num_double_blocks: int = 20
    num_single_blocks: int = 40
    num_refiner_blocks: int = 2
    patch_size: tuple[int, int, int] = (1, 2, 2)
    rope_dims: tuple[int, int, int] = (16, 56, 56)
    rope_theta: float = 256.0
    text_dim: int = 4096
    pooled_text_dim: int = 768
    guidance_embed: bool = False
    norm_eps: float = 1e-6

    # HunyuanCustom.
    mode: str = "release"
    max_identity_images: int = 1  # release supports exactly one; paper mode allows K >= 1
    identity_rope: str = "paper"  # paper mode: paper (t=-k, h=i+H', w=j+W') | release_spatial (t=-k, h=i, w=j+W')
    audio: bool = False
    audio_insert_blocks: tuple[int, ...] = (1, 3, 5, 7, 9, 11)
    audio_window: int = 10  # whisper frames per video frame
    audio_layers: int = 5  # whisper hidden states stacked
    audio_channels: int = 384  # whisper-tiny width
    audio_proj_dim: int = 1024
    audio_tokens_per_frame: int = 4  # tokens per *video* frame; 16 per latent frame
    audio_head_dim: int = 1024
    audio_strength: float = 1.0  # lambda_A
    video_condition: bool = False
    video_condition_channels: int = 32

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def mlp_hidden(self) -> int:
        return int(self.hidden_size * self.mlp_ratio)

    @property
    def temporal_compression(self) -> int:
        return 4  # the causal 3D VAE: 4x in time (frames must be 4k+1)

    @property
    def audio_input_dim(self) -> int:
        return self.audio_window * self.audio_layers * self.audio_channels

    def validate(self) -> "ModelConfig":
        errors = []
        if self.mode not in MODES:
            errors.append(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.hidden_size % self.num_heads:
            errors.append(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        elif sum(self.rope_dims) != self.head_dim:
            errors.append(f"rope_dims {tuple(self.rope_dims)} must sum to head_dim {self.head_dim}")
        if any(d % 2 for d in self.rope_dims):
            errors.append(f"every rope dim must be even (pairs are rotated), got {tuple(self.rope_dims)}")
        if len(self.patch_size) != 3 or self.patch_size[0] != 1:
            errors.append(f"patch_size must be (1, p, p) (the VAE already compresses time), got {self.patch_size}")
        if self.max_identity_images < 1:
            errors.append("max_identity_images must be >= 1")
        if self.mode == "release" and self.max_identity_images != 1:
            errors.append("release mode supports exactly one identity image; use mode='paper' for K > 1")
        if self.identity_rope not in IDENTITY_ROPES:
            errors.append(f"identity_rope must be one of {IDENTITY_ROPES}, got {self.identity_rope!r}")
        elif self.mode == "release" and self.identity_rope != "paper":
            errors.append(f"identity_rope={self.identity_rope!r} is a paper-mode option (release mode places its one "
                          "identity image at t=-1, h=i, w=j+W'); use mode='paper'")
        if self.audio:
            bad = [i for i in self.audio_insert_blocks if not 0 <= i < self.num_double_blocks]
            if bad:
                errors.append(f"audio_insert_blocks {bad} are outside the {self.num_double_blocks} double blocks")
        if errors:
            raise ConfigError("invalid model config:\n  - " + "\n  - ".join(errors))
        return self

    # Serialisation: configs are data.
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ModelConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ConfigError(f"unknown model config keys: {unknown}")
        data = dict(data)
        for key in ("patch_size", "rope_dims", "audio_insert_blocks"):
            if key in data:
                data[key] = tuple(data[key])
        return cls(**data).validate()


def _tiny(**overrides) -> ModelConfig:
    base = dict(
        in_channels=4, out_channels=4, hidden_size=64, num_heads=4, mlp_ratio=4.0,
        num_double_blocks=2, num_single_blocks=2, num_refiner_blocks=1, rope_dims=(4, 6, 6),
        text_dim=32, pooled_text_dim=16, audio_insert_blocks=(0, 1), audio_channels=8,
        audio_layers=2, audio_window=10, audio_proj_dim=32, audio_head_dim=32, video_condition_channels=8,
    )
    base.update(overrides)
    return ModelConfig(**base)


PRESETS = {"tiny": _tiny, "13b": ModelConfig}
VARIANT_FLAGS = {
    "base": dict(audio=False, video_condition=False),
    "audio": dict(audio=True, video_condition=False),
    "editing": dict(audio=False, video_condition=True),
}


PAPER_IDENTITY_IMAGES = 3  # identity images a paper-mode run takes when it does not say (the release takes 1)


def mode_overrides(mode: str, max_identity_images: int | None = None, identity_rope: str | None = None) -> dict:
    """The ModelConfig overrides of a run's mode, for get_model_config (training and sampling alike)."""
    if max_identity_images is None and mode == "paper":
        max_identity_images = PAPER_IDENTITY_IMAGES
    return ({"mode": mode} | ({} if max_identity_images is None else {"max_identity_images": max_identity_images})
            | ({} if identity_rope is None else {"identity_rope": identity_rope}))


def get_model_config(name_or_path: str | Path, variant: str = "base", **overrides) -> ModelConfig:
    """`tiny`, `13b`, or a JSON/YAML file of ModelConfig fields; `variant` sets the released flags."""
    if variant not in VARIANT_FLAGS:
        raise ConfigError(f"variant must be one of {VARIANTS}, got {variant!r}")
    name = str(name_or_path)
    if name in PRESETS:
        cfg = PRESETS[name](**{**VARIANT_FLAGS[variant], **overrides})
        return cfg.validate()
    path = Path(name)
    if not path.is_file():
        raise ConfigError(f"model config {name!r} is neither a preset {sorted(PRESETS)} nor a file")
    text = path.read_text()
    if path.suffix in (".yaml", ".yml"):
        data = load_yaml(text, str(path))
    else:
        data = json.loads(text)
    if not isinstance(data, dict):
        raise ConfigError(f"model config file {path} must hold a mapping of fields")
    data = {**data, **VARIANT_FLAGS[variant]} if variant != "base" else data
    return ModelConfig.from_dict({**data, **overrides})


def save_model_config(cfg: ModelConfig, path: str | Path) -> None:
    Path(path).write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")


__all__ = ["ConfigError", "ModelConfig", "PRESETS", "MODES", "VARIANTS", "get_model_config", "mode_overrides", "split_layers",
           "save_model_config"]


def split_layers(num_layers: int, chunks: int) -> list[range]:
    """`chunks` contiguous ranges covering range(num_layers); the first ones get the remainder (pipeline stages)."""
    size, extra = divmod(num_layers, chunks)
    bounds = [0]
    for c in range(chunks):
        bounds.append(bounds[-1] + size + (c < extra))
    return [range(bounds[c], bounds[c + 1]) for c in range(chunks)]
