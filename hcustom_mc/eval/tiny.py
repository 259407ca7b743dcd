"""Tiny random models of the metrics' real architectures, saved in the layout `--models` expects: the tests' and
the validation demo's stand-ins for CLIP ViT-B/32, DINOv2-base and RAFT-large, loaded through the same code as the
real weights. Their scores mean nothing; they exercise the path."""

from __future__ import annotations

import json
from pathlib import Path

import torch


def save_tiny_clip_model(folder: Path, seed: int = 0) -> Path:
    """A tiny random CLIPModel + the real CLIPTokenizer (byte-level vocab, no merges: one token per character)
    + CLIPImageProcessor, laid out like openai/clip-vit-base-patch32 (end-of-text the highest id, the legacy
    eos_token_id 2 in the text config, so the text feature pools at the highest token id, as there)."""
    from tokenizers import pre_tokenizers
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    chars = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": len(chars) + i for i, c in enumerate(chars)})
    vocab.update({"<|startoftext|>": len(vocab), "<|endoftext|>": len(vocab) + 1})
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(vocab=str(folder / "vocab.json"), merges=str(folder / "merges.txt"),
                              model_max_length=77)
    images = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    config = CLIPConfig(
        text_config=dict(vocab_size=len(vocab), hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=77, bos_token_id=0, eos_token_id=2,
                         pad_token_id=1),
        vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                           image_size=32, patch_size=8),
        projection_dim=8)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CLIPModel(config)
    model.save_pretrained(folder)
    CLIPProcessor(image_processor=images, tokenizer=tokenizer).save_pretrained(folder)
    return folder


def save_tiny_dinov2(folder: Path, seed: int = 0) -> Path:
    """A tiny random Dinov2Model + BitImageProcessor configured like facebook/dinov2-base's (shortest side,
    bicubic, centre crop, ImageNet mean/std), at 32 px."""
    from transformers import BitImageProcessor, Dinov2Config, Dinov2Model

    config = Dinov2Config(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, mlp_ratio=2, patch_size=8,
                          image_size=32)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Dinov2Model(config)
    model.save_pretrained(folder)
    BitImageProcessor(size={"shortest_edge": 36}, crop_size={"height": 32, "width": 32}, resample=3,
                      image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225]).save_pretrained(folder)
    return folder


def save_tiny_raft(path: Path, seed: int = 0) -> Path:
    """torchvision's RAFT-large with random weights, saved as a state dict where the real C_T_V1 file goes (RAFT
    has no size knobs worth shrinking: it is 5M parameters)."""
    from torchvision.models.optical_flow import raft_large

    path.parent.mkdir(parents=True, exist_ok=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = raft_large(weights=None, progress=False)
    torch.save(model.state_dict(), path)
    return path


def save_tiny_eval_models(root: str | Path, seed: int = 0) -> Path:
    """root/clip-vit-base-patch32, root/dinov2-base and root/raft/<C_T_V1 file name>, tiny and random."""
    from hcustom_mc.eval.metrics.clip_score import CLIP_DIR
    from hcustom_mc.eval.metrics.dino import DINO_DIR
    from hcustom_mc.eval.metrics.motion import DynamicDegree

    root = Path(root)
    save_tiny_clip_model(root / CLIP_DIR, seed=seed)
    save_tiny_dinov2(root / DINO_DIR, seed=seed)
    save_tiny_raft(DynamicDegree.expected_path(root), seed=seed)
    return root
