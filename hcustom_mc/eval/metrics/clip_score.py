"""CLIP-B text-video alignment (the paper's CLIP-B-T): torchmetrics' CLIPScore of the prompt against the frames.

Definition followed: torchmetrics `CLIPScore` (torchmetrics/functional/multimodal/clip_score.py,
`_get_features` / `_clip_score_update`, and multimodal/clip_score.py `CLIPScore.compute`), with the
HunyuanCustom paper's model, CLIP ViT-B/32 (paper section 4.1, "Text-video alignment ... CLIP-B"):

    per frame   s_i = 100 * cos(E_image(frame_i), E_text(prompt))
    per video   clip_score = max(mean_i s_i, 0)

torchmetrics clamps the *mean* at 0 (`compute` returns max(sum / n, 0)), not each pair, so this does the same;
the frames of one video are one `CLIPScore.update` with the prompt repeated per frame. The paper's Table 1
writes the same number on the 0-1 scale (CLIP-B-T 0.306 = 30.6 here).

Pre-processing is the checkpoint's own `CLIPProcessor`, given [3, H, W] uint8 tensors as torchmetrics gives
them (shortest side to 224, bicubic, centre crop 224, OpenAI mean/std for openai/clip-vit-base-patch32).

Long prompts: torchmetrics tokenizes without truncation and then keeps the first `max_position_embeddings`
(77) tokens (`_get_features`, with a UserWarning). That drops the end-of-text token, and CLIP pools its text
feature at that token (for the OpenAI checkpoints, whose config has the legacy eos_token_id 2, at the highest
token id in the row), so a cut prompt is pooled at some word instead. `long_prompt="torchmetrics"` (default)
does exactly this, so scores equal torchmetrics'; `long_prompt="keep_end"` lets the tokenizer truncate to 77
with the end-of-text token kept last, as OpenAI's `clip.tokenize(truncate=True)` does. Each score reports the
prompt's token count and whether it was cut.
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path
from typing import Any

import numpy as np

from hcustom_mc.eval.common import MissingModelError, VideoSample, uniform_frame_indices

log = logging.getLogger(__name__)

CLIP_DIR = "clip-vit-base-patch32"
CLIP_HOW_TO_GET = "hf download openai/clip-vit-base-patch32 --local-dir models/clip-vit-base-patch32"
LONG_PROMPT_MODES = ("torchmetrics", "keep_end")
DEFAULT_FRAMES = 32  # OpenS2V-Eval scores 32 uniformly sampled frames per video
BATCH = 32  # frames per forward pass


def clip_path(models_dir: Path | str) -> Path:
    return Path(models_dir) / CLIP_DIR


def load_clip(models_dir: Path | str, metric: str, device: Any = "cpu") -> tuple[Any, Any]:
    """(CLIPModel in eval mode on `device`, CLIPProcessor) from models_dir/clip-vit-base-patch32."""
    path = clip_path(models_dir)
    if not (path / "config.json").is_file():
        raise MissingModelError(metric, path, CLIP_HOW_TO_GET)
    return _load_clip(str(path.resolve()), str(device))


@functools.lru_cache(maxsize=2)
def _load_clip(path: str, device: str) -> tuple[Any, Any]:
    # cached: ClipScore and TemporalConsistency share one copy of the weights
    from transformers import CLIPModel, CLIPProcessor

    model = CLIPModel.from_pretrained(path).to(device).eval()
    return model, CLIPProcessor.from_pretrained(path)


def _pooled(output: Any) -> Any:
    """transformers 5 returns a BaseModelOutputWithPooling from get_*_features (4.x returned the tensor);
    its pooler_output is the projected embedding."""
    import torch

    return output if isinstance(output, torch.Tensor) else output.pooler_output


def frames_to_tensors(frames: np.ndarray) -> list[Any]:
    """uint8 [F, H, W, 3] -> list of uint8 [3, H, W] tensors, the form torchmetrics hands to the processor."""
    import torch

    return list(torch.from_numpy(np.require(frames, requirements=["C", "W"])).permute(0, 3, 1, 2))


def clip_image_features(model: Any, processor: Any, frames: np.ndarray, batch: int = BATCH) -> Any:
    """CLIP image embeddings (projected, not normalised) [F, D] of uint8 [F, H, W, 3] frames."""
    import torch

    device = next(model.parameters()).device
    out = []
    with torch.no_grad():
        for start in range(0, len(frames), batch):
            pixels = processor(images=frames_to_tensors(frames[start:start + batch]), return_tensors="pt")
            out.append(_pooled(model.get_image_features(pixels["pixel_values"].to(device))).float())
    return torch.cat(out)


def clip_text_features(model: Any, processor: Any, prompt: str, long_prompt: str = "torchmetrics"
                       ) -> tuple[Any, int, bool]:
    """(CLIP text embedding [1, D], the prompt's token count untruncated, whether it was cut)."""
    import torch

    if long_prompt not in LONG_PROMPT_MODES:
        raise ValueError(f"long_prompt must be one of {LONG_PROMPT_MODES}, not {long_prompt!r}")
    device = next(model.parameters()).device
    limit = model.config.text_config.max_position_embeddings
    tokenizer = processor.tokenizer
    # verbose=False: the length is reported in the score instead of the tokenizer's warning
    full = tokenizer([prompt], return_tensors="pt", padding=True, verbose=False)
    count = int(full["attention_mask"].sum())
    cut = full["input_ids"].shape[-1] > limit
    if long_prompt == "torchmetrics" or not cut:
        ids, mask = full["input_ids"][..., :limit], full["attention_mask"][..., :limit]
    else:
        kept = tokenizer([prompt], return_tensors="pt", padding=True, truncation=True, max_length=limit)
        ids, mask = kept["input_ids"], kept["attention_mask"]
    with torch.no_grad():
        features = _pooled(model.get_text_features(ids.to(device), mask.to(device))).float()
    return features, count, cut


class ClipScore:
    """CLIP-B text-video alignment: torchmetrics' CLIPScore (0-100) of the prompt against the sampled frames.

    Options: frames (how many frames, uniformly spread; None = every frame; default 32, as OpenS2V-Eval),
    long_prompt ("torchmetrics": keep the first 77 tokens, as torchmetrics does; "keep_end": tokenizer
    truncation that keeps the end-of-text token)."""

    name = "clip_score"
    how_to_get = CLIP_HOW_TO_GET

    @staticmethod
    def expected_path(models_dir: Path) -> Path:
        return clip_path(models_dir)

    def __init__(self, models_dir: Path, device: Any = "cpu", frames: int | None = DEFAULT_FRAMES,
                 long_prompt: str = "torchmetrics"):
        if long_prompt not in LONG_PROMPT_MODES:
            raise ValueError(f"long_prompt must be one of {LONG_PROMPT_MODES}, not {long_prompt!r}")
        self.model, self.processor = load_clip(models_dir, self.name, device)
        self.frames, self.long_prompt = frames, long_prompt

    def score(self, sample: VideoSample) -> dict[str, float | int | str | None]:
        import torch

        picked = (range(len(sample.frames)) if self.frames is None
                  else uniform_frame_indices(len(sample.frames), self.frames))
        images = clip_image_features(self.model, self.processor, sample.frames[list(picked)])
        text, tokens, cut = clip_text_features(self.model, self.processor, sample.prompt, self.long_prompt)
        if cut:
            log.info("%s: prompt of %d tokens cut to %d (%s)", sample.name, tokens,
                     self.model.config.text_config.max_position_embeddings, self.long_prompt)
        per_frame = 100 * torch.nn.functional.cosine_similarity(images, text, dim=-1)
        return {
            self.name: max(float(per_frame.mean()), 0.0),
            f"{self.name}_frames": len(images),
            f"{self.name}_prompt_tokens": tokens,
            f"{self.name}_prompt_truncated": int(cut),
            f"{self.name}_model": CLIP_DIR,
        }
