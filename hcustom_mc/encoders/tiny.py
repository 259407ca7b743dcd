"""Tiny random encoders shaped for the tiny DiT, saved as local folders: the demo's and the tests' stand-ins
for llava-llama-3-8b, CLIP-L, whisper-tiny and the HunyuanVideo VAE (loaded through the same code)."""

from __future__ import annotations

from pathlib import Path


def save_tiny_encoders(folder: str | Path, model_cfg, seed: int = 0, vae_format: str = "diffusers") -> dict[str, str]:
    """Writes folder/{llava,clip,whisper,vae}; returns the paths by DataConfig.encoders field name."""
    from hcustom_mc.encoders.audio import save_tiny_whisper
    from hcustom_mc.encoders.text import save_tiny_clip, save_tiny_llava
    from hcustom_mc.encoders.vae import save_tiny_vae

    folder = Path(folder)
    paths = {name: folder / name for name in ("llava", "clip", "whisper", "vae")}
    save_tiny_llava(paths["llava"], hidden_size=model_cfg.text_dim, seed=seed)
    save_tiny_clip(paths["clip"], hidden_size=model_cfg.pooled_text_dim, seed=seed)
    # whisper hidden states = embeddings + one per layer
    save_tiny_whisper(paths["whisper"], d_model=model_cfg.audio_channels, layers=model_cfg.audio_layers - 1, seed=seed)
    save_tiny_vae(paths["vae"], fmt=vae_format, latent_channels=model_cfg.in_channels, seed=seed)
    return {k: str(v) for k, v in paths.items()}
