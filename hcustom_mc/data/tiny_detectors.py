"""Tiny random models of the real subject-extraction architectures (OWLv2, Grounding DINO, SAM), saved as local
transformers folders that tools/extract_subjects.py loads through the same code as the real weights. Their boxes and
masks mean nothing; they exercise the path (tests and the tiny demo)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

# Grounding DINO's word-piece vocabulary: the tiny dataset's colours and shapes plus a few test words
WORDS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", "a", "the", "and", "man", "woman", "dog", "cat", "ball",
         "red", "green", "blue", "yellow", "purple", "square", "circle", "triangle")


def _seeded(seed: int, build):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


def save_tiny_owlv2(folder: str | Path, seed: int = 0) -> Path:
    """Owlv2ForObjectDetection (32x32 input, 4x4 patches of 8: 16 boxes) + Owlv2Processor with a character-level
    CLIPTokenizer (byte-level vocabulary, no merges) and OWLv2's 16-token text limit."""
    from tokenizers import pre_tokenizers
    from transformers import CLIPTokenizer, Owlv2Config, Owlv2ForObjectDetection, Owlv2ImageProcessor, Owlv2Processor

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    chars = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": len(chars) + i for i, c in enumerate(chars)})
    vocab.update({"<|startoftext|>": len(vocab), "<|endoftext|>": len(vocab) + 1})
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(vocab=str(folder / "vocab.json"), merges=str(folder / "merges.txt"), model_max_length=16,
                              pad_token="!")  # OWL-ViT's own pad token
    # the class head scores image embeddings against text embeddings: projection_dim = the text width, as released
    config = Owlv2Config(
        text_config=dict(vocab_size=len(vocab), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=16, bos_token_id=vocab["<|startoftext|>"],
                         eos_token_id=vocab["<|endoftext|>"], pad_token_id=vocab["!"]),
        vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                           image_size=32, patch_size=8),
        projection_dim=16)
    _seeded(seed, lambda: Owlv2ForObjectDetection(config)).save_pretrained(folder)
    Owlv2Processor(image_processor=Owlv2ImageProcessor(size={"height": 32, "width": 32}),
                   tokenizer=tokenizer).save_pretrained(folder)
    return folder


def save_tiny_grounding_dino(folder: str | Path, seed: int = 0) -> Path:
    """GroundingDinoForObjectDetection (a 2-stage Swin backbone, 1-layer BERT, 10 queries; 2 decoder layers because
    the box heads are tied across layers) + GroundingDinoProcessor with a word-level BERT vocabulary (WORDS)."""
    from transformers import (BertConfig, BertTokenizer, GroundingDinoConfig, GroundingDinoForObjectDetection,
                              GroundingDinoImageProcessor, GroundingDinoProcessor, SwinConfig)

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = BertTokenizer(vocab={w: i for i, w in enumerate(WORDS)})
    config = GroundingDinoConfig(
        backbone_config=SwinConfig(image_size=32, patch_size=4, embed_dim=8, depths=[1, 1], num_heads=[1, 1],
                                   window_size=2, out_indices=[1, 2]),
        text_config=BertConfig(vocab_size=len(WORDS), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                               intermediate_size=32, max_position_embeddings=64),
        d_model=32, encoder_layers=1, decoder_layers=2, encoder_attention_heads=2, decoder_attention_heads=2,
        encoder_ffn_dim=32, decoder_ffn_dim=32, num_queries=10, num_feature_levels=2, encoder_n_points=2,
        decoder_n_points=2, max_text_len=32)
    _seeded(seed, lambda: GroundingDinoForObjectDetection(config)).save_pretrained(folder)
    GroundingDinoProcessor(image_processor=GroundingDinoImageProcessor(size={"shortest_edge": 32, "longest_edge": 64}),
                           tokenizer=tokenizer).save_pretrained(folder)
    return folder


def save_tiny_sam(folder: str | Path, seed: int = 0) -> Path:
    """SamModel (64x64 input, one ViT layer, 8-wide prompt encoder and mask decoder) + SamProcessor."""
    from transformers import SamConfig, SamImageProcessor, SamModel, SamProcessor

    folder = Path(folder)
    config = SamConfig(
        vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                           image_size=64, patch_size=16, output_channels=8, global_attn_indexes=[0], window_size=0,
                           mlp_dim=32, num_pos_feats=4),
        prompt_encoder_config=dict(hidden_size=8, image_size=64, patch_size=16, mask_input_channels=4),
        mask_decoder_config=dict(hidden_size=8, num_hidden_layers=1, num_attention_heads=2, mlp_dim=16,
                                 iou_head_hidden_dim=8))
    _seeded(seed, lambda: SamModel(config)).save_pretrained(folder)
    SamProcessor(image_processor=SamImageProcessor(size={"longest_edge": 64},
                                                   pad_size={"height": 64, "width": 64})).save_pretrained(folder)
    return folder
