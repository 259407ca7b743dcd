"""The causal 3D VAE (884-16c: 4x time, 8x8 space, 16 channels) around diffusers `AutoencoderKLHunyuanVideo`.

Two on-disk layouts load through the same strict path:
  * diffusers folder: config.json (`AutoencoderKLHunyuanVideo`) + diffusion_pytorch_model.safetensors/.bin;
  * release: `pytorch_model.pt` (keys prefixed `vae.`, possibly wrapped in "state_dict"/"module") next to
    the original `AutoencoderKLCausal3D` config.json (facts 1.7, 3.2).
Key names: the release's module tree (resnets/norm1/conv1.conv/downsamplers.0.conv.conv/mid_block.attentions.0.to_q
...) is the one diffusers re-implemented; diffusers' own conversion script has an *empty* VAE rename table
(`VAE_KEYS_RENAME_DICT = {}` in scripts/convert_hunyuan_video_to_diffusers.py). So the only key change is
dropping the `vae.` prefix; `RELEASE_KEY_RENAMES` below is kept as the explicit (empty) table.
The config does differ and is translated by `RELEASE_CONFIG_KEYS`.

Latent convention (release sample_batch.py): encode -> latent_dist.sample() * scaling_factor; decode divides.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from hcustom_mc.checkpoint.release import CheckpointFormatError, _safe_torch_load

RELEASE_WEIGHTS = "pytorch_model.pt"
RELEASE_PREFIX = "vae."
RELEASE_KEY_RENAMES: dict[str, str] = {}  # release substring -> diffusers substring; none needed (see above)
# release config key -> diffusers config key (None: informational, dropped)
RELEASE_CONFIG_KEYS = {
    "in_channels": "in_channels", "out_channels": "out_channels", "latent_channels": "latent_channels",
    "block_out_channels": "block_out_channels", "layers_per_block": "layers_per_block", "act_fn": "act_fn",
    "norm_num_groups": "norm_num_groups", "scaling_factor": "scaling_factor",
    "mid_block_add_attention": "mid_block_add_attention", "time_compression_ratio": "temporal_compression_ratio",
    "spatial_compression_ratio": "spatial_compression_ratio",
    # Block type names are the original classes; diffusers builds its own blocks (one per block_out_channels).
    "down_block_types": None, "up_block_types": None,
    # The original tiling sizes; diffusers tiling is configured by VideoVAE.tile_sizes instead.
    "sample_size": None, "sample_tsize": None, "_class_name": None, "_diffusers_version": None,
    "shift_factor": None,  # only accepted when null (checked below)
}
DEFAULT_TILES = dict(height=256, width=256, frames=16, stride_height=192, stride_width=192, stride_frames=12)


def release_config_to_diffusers(raw: dict) -> dict:
    """Original AutoencoderKLCausal3D config.json -> AutoencoderKLHunyuanVideo kwargs (errors on unknown keys)."""
    unknown = sorted(k for k in raw if k not in RELEASE_CONFIG_KEYS)
    if unknown:
        raise CheckpointFormatError(f"release VAE config has keys with no known diffusers meaning: {unknown}")
    if raw.get("shift_factor") not in (None, 0, 0.0):
        raise CheckpointFormatError(f"VAE shift_factor {raw['shift_factor']} is not supported (the 884-16c VAE has none)")
    cfg = {RELEASE_CONFIG_KEYS[k]: v for k, v in raw.items() if RELEASE_CONFIG_KEYS[k]}
    n = len(cfg.get("block_out_channels", (128, 256, 512, 512)))
    for key in ("down_block_types", "up_block_types"):
        if key in raw and len(raw[key]) != n:
            raise CheckpointFormatError(f"release VAE config: {len(raw[key])} {key} for {n} block_out_channels")
    cfg["down_block_types"] = ("HunyuanVideoDownBlock3D",) * n
    cfg["up_block_types"] = ("HunyuanVideoUpBlock3D",) * n
    return cfg


def release_to_diffusers_keys(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Unwrap, keep the `vae.`-prefixed entries (as the release loader does) and strip the prefix."""
    for wrapper in ("state_dict", "module"):
        if wrapper in sd and isinstance(sd[wrapper], dict):
            sd = sd[wrapper]
    if any(k.startswith(RELEASE_PREFIX) for k in sd):
        sd = {k[len(RELEASE_PREFIX):]: v for k, v in sd.items() if k.startswith(RELEASE_PREFIX)}
    out = {}
    for key, value in sd.items():
        for old, new in RELEASE_KEY_RENAMES.items():
            key = key.replace(old, new)
        out[key] = value
    return out


def load_strict(model: torch.nn.Module, sd: dict[str, torch.Tensor], source: Path) -> None:
    """load_state_dict(strict=True) with an error that names the offending keys and the file."""
    own = model.state_dict()
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    shapes = sorted(f"{k}: {tuple(sd[k].shape)} vs {tuple(own[k].shape)}" for k in set(sd) & set(own) if sd[k].shape != own[k].shape)
    if missing or unexpected or shapes:
        parts = [f"{name} ({len(keys)}): {keys[:10]}" for name, keys in
                 (("missing", missing), ("unexpected", unexpected), ("shape mismatch", shapes)) if keys]
        raise CheckpointFormatError(f"VAE weights in {source} do not match the model; " + "; ".join(parts))
    model.load_state_dict(sd, strict=True)


def _read_diffusers_weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    index = folder / "diffusion_pytorch_model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return {k: v for s in shards for k, v in load_file(str(folder / s)).items()}
    if (folder / "diffusion_pytorch_model.safetensors").is_file():
        return load_file(str(folder / "diffusion_pytorch_model.safetensors"))
    if (folder / "diffusion_pytorch_model.bin").is_file():
        return _safe_torch_load(folder / "diffusion_pytorch_model.bin")
    raise CheckpointFormatError(f"{folder} has a config.json but no diffusion_pytorch_model weights")


def _resolve(path: Path) -> tuple[str, Path, Path]:
    """-> (format, config file, weights file or folder)."""
    if path.is_file():
        return "release", path.parent / "config.json", path
    if (path / RELEASE_WEIGHTS).is_file():
        return "release", path / "config.json", path / RELEASE_WEIGHTS
    if (path / "config.json").is_file():
        return "diffusers", path / "config.json", path
    raise FileNotFoundError(f"no VAE at {path}: expected a diffusers folder or {RELEASE_WEIGHTS} + config.json")


# What set_tiling relies on beyond diffusers' public API: the framewise switches (instance attributes) and
# the keyword names of enable_tiling. Checked on the built model, so a diffusers release that renames them
# fails here with one clear message instead of tiling silently doing something else.
FRAMEWISE_ATTRS = ("use_framewise_encoding", "use_framewise_decoding")
TILING_KWARGS = ("tile_sample_min_height", "tile_sample_min_width", "tile_sample_min_num_frames",
                 "tile_sample_stride_height", "tile_sample_stride_width", "tile_sample_stride_num_frames")


def check_vae_api(model) -> None:
    import inspect

    missing = [a for a in FRAMEWISE_ATTRS if not hasattr(model, a)]
    params = inspect.signature(model.enable_tiling).parameters
    missing += [f"enable_tiling({k}=)" for k in TILING_KWARGS if k not in params]
    if missing:
        try:
            from importlib.metadata import version

            found = version("diffusers")
        except Exception:  # a source tree without metadata
            found = "unknown"
        raise RuntimeError(f"diffusers {found}: AutoencoderKLHunyuanVideo lacks {', '.join(missing)}, which the VAE "
                           "tiling uses; install a diffusers release that has them (tested: 0.42)")


class VideoVAE:
    """encode/decode in the DiT's latent convention (scaled), with optional spatial+temporal tiling."""

    def __init__(self, model, tiling: bool = True, tile_sizes: dict | None = None):
        check_vae_api(model)
        self.model = model.eval().requires_grad_(False)
        self.scaling_factor = float(model.config.scaling_factor)
        self.spatial = int(model.config.spatial_compression_ratio)
        self.temporal = int(model.config.temporal_compression_ratio)
        self.set_tiling(tiling, tile_sizes)

    @classmethod
    def from_pretrained(cls, path: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                        tiling: bool = True, tile_sizes: dict | None = None) -> "VideoVAE":
        from diffusers import AutoencoderKLHunyuanVideo

        fmt, config_file, weights = _resolve(Path(path))
        if not config_file.is_file():
            raise FileNotFoundError(f"VAE config {config_file} not found (needed next to {weights})")
        raw = json.loads(config_file.read_text())
        if fmt == "release":
            config = release_config_to_diffusers(raw)
            sd = release_to_diffusers_keys(_safe_torch_load(weights))
        else:
            config = {k: v for k, v in raw.items() if not k.startswith("_")}
            sd = _read_diffusers_weights(weights)
        model = AutoencoderKLHunyuanVideo(**config)
        load_strict(model, sd, weights)
        model.to(device=device)
        if dtype != torch.float32:  # diffusers warns on any dtype cast, so only cast when needed
            model.to(dtype=dtype)
        return cls(model, tiling, tile_sizes)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def set_tiling(self, tiling: bool, tile_sizes: dict | None = None) -> None:
        """Tiles in pixels/frames (keys of DEFAULT_TILES). Spatial sizes must be multiples of the spatial
        ratio and frame sizes of the temporal ratio, or the stitched latent grid would not line up."""
        m = self.model
        if not tiling:
            m.disable_tiling()
            # diffusers also splits long videos in time whenever "framewise" is on, even untiled; turn it off
            # so that tiling=False really means one pass.
            m.use_framewise_encoding = m.use_framewise_decoding = False
            return
        t = {**DEFAULT_TILES, **(tile_sizes or {})}
        if set(t) != set(DEFAULT_TILES):
            raise ValueError(f"unknown tile size keys {sorted(set(t) - set(DEFAULT_TILES))}; known {sorted(DEFAULT_TILES)}")
        for key, ratio in (("height", self.spatial), ("width", self.spatial), ("frames", self.temporal)):
            size, stride = t[key], t[f"stride_{key}"]
            if size % ratio or stride % ratio or not 0 < stride <= size:
                raise ValueError(f"tile {key}={size}, stride {stride}: need multiples of {ratio} and 0 < stride <= size")
        m.enable_tiling(
            tile_sample_min_height=t["height"], tile_sample_min_width=t["width"], tile_sample_min_num_frames=t["frames"],
            tile_sample_stride_height=t["stride_height"], tile_sample_stride_width=t["stride_width"],
            tile_sample_stride_num_frames=t["stride_frames"],
        )
        m.use_framewise_encoding = m.use_framewise_decoding = True

    def latent_shape(self, frames: int, height: int, width: int) -> tuple[int, int, int]:
        if (frames - 1) % self.temporal:
            raise ValueError(f"{frames} frames: the causal VAE needs {self.temporal}k+1 frames (e.g. 1, 5, ..., 129)")
        if height % self.spatial or width % self.spatial:
            raise ValueError(f"{height}x{width}: height and width must be multiples of {self.spatial}")
        return (frames - 1) // self.temporal + 1, height // self.spatial, width // self.spatial

    @torch.no_grad()
    def encode(self, video: torch.Tensor, sample: bool = True, generator: torch.Generator | None = None) -> torch.Tensor:
        """video [B, 3, F, H, W] in [-1, 1], F = 4k+1 -> scaled latents [B, C, k+1, H/8, W/8]."""
        if video.ndim != 5:
            raise ValueError(f"video must be [B, C, F, H, W], got shape {tuple(video.shape)}")
        self.latent_shape(*video.shape[2:])
        dist = self.model.encode(video.to(self.device, self.dtype)).latent_dist
        # DiagonalGaussianDistribution.sample draws on the distribution's device with `generator`.
        z = dist.sample(generator=generator) if sample else dist.mode()
        return z * self.scaling_factor

    def encode_image(self, image: torch.Tensor, **kw) -> torch.Tensor:
        """Identity image [B, 3, H, W] in [-1, 1] -> [B, C, 1, H/8, W/8] (a 1-frame video, as the release)."""
        return self.encode(image.unsqueeze(2), **kw)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents [B, C, f, h, w] -> video [B, 3, 4(f-1)+1, 8h, 8w] clipped to [-1, 1]."""
        if latents.ndim != 5:
            raise ValueError(f"latents must be [B, C, f, h, w], got shape {tuple(latents.shape)}")
        out = self.model.decode(latents.to(self.device, self.dtype) / self.scaling_factor).sample
        return out.clamp(-1, 1)


def save_tiny_vae(folder: str | Path, fmt: str = "diffusers", latent_channels: int = 4, seed: int = 0) -> Path:
    """Tiny random VAE (4 levels of 8 channels) saved as a diffusers folder or in the release layout."""
    from diffusers import AutoencoderKLHunyuanVideo

    if fmt not in ("diffusers", "release"):
        raise ValueError(f"fmt must be 'diffusers' or 'release', got {fmt!r}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    kw = dict(in_channels=3, out_channels=3, latent_channels=latent_channels, block_out_channels=(8, 8, 8, 8),
              layers_per_block=1, norm_num_groups=4, scaling_factor=0.476986)
    model = AutoencoderKLHunyuanVideo(**kw)
    if fmt == "diffusers":
        model.save_pretrained(str(folder))
        return folder
    release_cfg = {
        "_class_name": "AutoencoderKLCausal3D", "act_fn": "silu", "block_out_channels": list(kw["block_out_channels"]),
        "down_block_types": ["DownEncoderBlockCausal3D"] * 4, "up_block_types": ["UpDecoderBlockCausal3D"] * 4,
        "in_channels": 3, "out_channels": 3, "latent_channels": latent_channels, "layers_per_block": 1,
        "norm_num_groups": 4, "sample_size": 256, "sample_tsize": 64, "scaling_factor": 0.476986,
        "time_compression_ratio": 4, "mid_block_add_attention": True,
    }
    (folder / "config.json").write_text(json.dumps(release_cfg, indent=2) + "\n")
    torch.save({RELEASE_PREFIX + k: v.contiguous() for k, v in model.state_dict().items()}, folder / RELEASE_WEIGHTS)
    return folder


__all__ = [
    "VideoVAE", "save_tiny_vae", "release_config_to_diffusers", "release_to_diffusers_keys", "load_strict",
    "RELEASE_KEY_RENAMES", "RELEASE_CONFIG_KEYS", "DEFAULT_TILES",
]
