"""The null conditions guidance dropout trains on: exactly what the sampler's unconditional branches feed.

At sampling time (hcustom_mc.inference.inputs) classifier-free guidance runs the model on
  text      LLaVA `encode_negative(prompt, K white images)` (the release masks the image tokens out) and the
            CLIP pooled vector of the same prompt: the empty prompt by default (`data.null_prompt`; set it
            to the negative prompt to train the release's negative branch instead),
  identity  the VAE latent of an all-white image of the video size (ip-cfg's unconditional identity),
  audio     zeros.
So condition dropout must replace a dropped condition by the same tensors, not by zeros. Preprocessing
encodes them once and stores them beside the shards (`null_conditions.safetensors`); online (manifest)
training encodes them once at start; the synthetic dataset uses fixed random stand-ins the same way.
The text nulls depend on K (the number of white images in the LLaVA prompt), the identity null on the
latent size, so both are stored per K and per bucket size.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from pathlib import Path

import torch

NULLS_FILE = "null_conditions.safetensors"
TEXT_KEYS = ("text_states", "text_mask", "text_pooled")


@dataclass
class NullConditions:
    text: dict[int, dict[str, torch.Tensor]]  # K -> {text_states [L, D], text_mask [L], text_pooled [P]}
    identity: dict[tuple[int, int], torch.Tensor] = field(default_factory=dict)  # latent (h, w) -> [C, 1, h, w]

    def text_for(self, num_identity: int) -> dict[str, torch.Tensor]:
        if num_identity not in self.text:
            raise KeyError(f"no null text condition for {num_identity} identity image(s) (have {sorted(self.text)})")
        return self.text[num_identity]

    def identity_for(self, num_identity: int, h: int, w: int) -> torch.Tensor:
        """[C, K, h, w]: one white-image latent frame per identity image."""
        if (h, w) not in self.identity:
            raise KeyError(f"no null identity latent for latent size {h}x{w} (have {sorted(self.identity)})")
        return self.identity[(h, w)].expand(-1, num_identity, -1, -1).clone()

    # ------------------------------------------------------------------ storage
    def save(self, path: str | Path) -> Path:
        from safetensors.torch import save_file

        tensors = {f"{k}.{n}": t.clone().contiguous() for n, parts in self.text.items() for k, t in parts.items()}
        tensors.update({f"identity.{h}x{w}": t.contiguous() for (h, w), t in self.identity.items()})
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        save_file(tensors, str(tmp))
        tmp.replace(path)  # atomic: a file that exists is whole
        return path

    @classmethod
    def load(cls, path: str | Path) -> "NullConditions":
        from safetensors.torch import load_file

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no null conditions for guidance dropout; re-run tools/preprocess.py with "
                                    "the same settings (finished shards are kept) to write them")
        text: dict[int, dict[str, torch.Tensor]] = {}
        identity = {}
        for key, t in load_file(str(path)).items():
            name, _, suffix = key.partition(".")
            if name == "identity":
                h, w = map(int, suffix.split("x"))
                identity[(h, w)] = t
            else:
                text.setdefault(int(suffix), {})[name] = t
        return cls(text, identity)


def encode_null_conditions(encoder, prompt: str, latent_sizes, max_identity: int) -> NullConditions:
    """With a SampleEncoder's LLaVA, CLIP and VAE (the same encoders and settings as the samples)."""
    text = {}
    pooled = encoder.clip.encode([prompt])[0].float().cpu()
    for k in range(max_identity + 1):
        states, mask = encoder.llava.encode_negative([prompt], k)
        text[k] = {"text_states": states[0].float().cpu(), "text_mask": mask[0].long().cpu(), "text_pooled": pooled}
    identity = {}
    for h, w in sorted(set(latent_sizes)):
        H, W = h * encoder.vae.spatial, w * encoder.vae.spatial
        white = torch.ones(3, 1, H, W)  # pixels in [-1, 1]: all white, as the sampler's white image
        identity[(h, w)] = encoder._vae(white, -1, "null_identity")
    return NullConditions(text, identity)


def stand_in_null_conditions(model_cfg, text_len: int, latent_size: tuple[int, int], seed: int,
                             max_identity: int) -> NullConditions:
    """Fixed random stand-ins for datasets without encoders (synthetic): a fixed 'empty prompt' encoding per K
    and a fixed, spatially constant 'white image' latent, the same at every step and rank."""
    g = torch.Generator().manual_seed(zlib.crc32(f"null:{seed}".encode()))
    text = {}
    pooled = torch.randn(model_cfg.pooled_text_dim, generator=g)
    for k in range(max_identity + 1):
        valid = min(text_len, 2 + k)  # the template's few tokens (and the image's, in paper mode)
        mask = (torch.arange(text_len) < valid).long()
        states = torch.randn(text_len, model_cfg.text_dim, generator=g) * mask[:, None]
        text[k] = {"text_states": states, "text_mask": mask, "text_pooled": pooled}
    h, w = latent_size
    white = torch.randn(model_cfg.in_channels, 1, 1, 1, generator=g).expand(-1, 1, h, w).clone()
    return NullConditions(text, {(h, w): white})


def latent_sizes_of_groups(groups, spatial: int) -> list[tuple[int, int]]:
    """Latent (h, w) of every group key 'task|HxW|Nf|Kid' (pixel size / the VAE's spatial ratio)."""
    sizes = set()
    for g in groups:
        H, W = map(int, g.split("|")[1].split("x"))
        if H and W:
            sizes.add((H // spatial, W // spatial))
    return sorted(sizes)
