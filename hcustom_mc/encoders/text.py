"""Text encoders: LLaVA text-image fusion (`LlavaTextEncoder`) and CLIP-L pooled text (`ClipTextEncoder`).

LLaVA template, two modes (facts file 2.3 and 7):

* ``release`` reproduces the released HunyuanCustom code: the HunyuanVideo video system template around the
  prompt, then ``"\\nThe {name} looks like<image>"`` appended; tokens right-padded/truncated to
  ``crop_start + text_len``; the single ``<image>`` becomes N = (image_size/patch)^2 CLIP features *inline*;
  ``hidden_states[-3]``; the first ``crop_start`` positions cropped. The mask is the release quirk: the
  token mask with N-1 ones appended *at the end* (not at the image position), so the output is
  ``text_len + N - 1`` long (831 for the real model). Only one identity image (or none, text-to-video).
  Negative branch: all-white image, mask rewritten to ``sum - (N-1)`` leading ones.
  NB: the quirk mask is not right-padded when the prompt is shorter than ``text_len``; a consumer that
  requires right padding must accept it in release mode (the released DiT uses only ``mask.sum()`` for
  the joint attention, and the mask positions as they are in the token refiner).
* ``paper`` follows the paper: the user turn is ``"{prompt}<SEP>The {name_1} looks like <image>. ..."``,
  one phrase per subject (K <= ``max_subjects``), and the mask is the true inline mask (expanded image
  positions valid, right-padded). Output length ``text_len + max_subjects * (N - 1)``. The negative branch
  uses white images with the same inline mask: the paper says nothing about it, the white image is already
  the "no identity" input, and masking the image positions out would leave holes in a right-padded mask.

``<SEP>``: the released LLaVA tokenizer has no such token and the encoder is frozen, so adding one with a
fresh random embedding would give the model a meaningless input. Paper mode therefore requires the
separator (``sep_token``, default ``"<SEP>"``) to already be a single token of the tokenizer and raises a
clear error otherwise; with the real Llama-3 tokenizer pass e.g. ``sep_token="<|reserved_special_token_0|>"``
or add the token and fine-tune. The tiny test tokenizer has ``<SEP>``.

A prompt whose identity phrase would be truncated (too long for ``text_len``) raises ValueError, as the
release does (its LLaVA then finds fewer image tokens than images).

`save_tiny_llava` / `save_tiny_clip` build small random models and byte-level BPE tokenizers in memory
(no download), deterministic given a seed, saved with `save_pretrained` so tests load them through the
same `from_pretrained` path as the real weights.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from PIL import Image

log = logging.getLogger(__name__)

CLIP_MEAN = (0.48145466, 0.4578275, 0.4082107)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# HunyuanVideo `dit-llm-encode-video` (= HunyuanCustom `li-dit-encode-video`); crop_start 95 with Llama-3.
VIDEO_TEMPLATE = (
    "<|start_header_id|>system<|end_header_id|>\n\nDescribe the video by detailing the following aspects: "
    "1. The main content and theme of the video."
    "2. The color, shape, size, texture, quantity, text, and spatial relationships of the objects."
    "3. Actions, events, behaviors temporal relationships, physical movement changes of the objects."
    "4. background environment, light, style and atmosphere."
    "5. camera angles, movements, and transitions used in the video:<|eot_id|>"
    "<|start_header_id|>user<|end_header_id|>\n\n{}<|eot_id|>"
)
RELEASE_IMAGE_PHRASE = "\nThe {} looks like<image>"  # appended after the templated text, no space before <image>
PAPER_IMAGE_PHRASE = "The {} looks like <image>."
DEFAULT_NAME = "object"  # the release's default `item_prompt`
HIDDEN_STATE_SKIP_LAYER = 2  # use hidden_states[-3], no final norm
MODES = ("release", "paper")


def preprocess_llava_image(image: Image.Image, size: int = 336) -> torch.Tensor:
    """Pad to a centred white square (aspect kept), bilinear resize to `size`, CLIP-normalise -> [3, size, size]."""
    image = image.convert("RGB")
    side = max(image.size)
    canvas = Image.new("RGB", (side, side), (255, 255, 255))
    canvas.paste(image, ((side - image.width) // 2, (side - image.height) // 2))
    canvas = canvas.resize((size, size), Image.BILINEAR)
    x = torch.frombuffer(bytearray(canvas.tobytes()), dtype=torch.uint8).view(size, size, 3)
    x = x.permute(2, 0, 1).float() / 255.0
    mean = torch.tensor(CLIP_MEAN).view(3, 1, 1)
    std = torch.tensor(CLIP_STD).view(3, 1, 1)
    return (x - mean) / std


def white_image(size: int) -> Image.Image:
    return Image.new("RGB", (size, size), (255, 255, 255))


def template_crop_start(tokenizer, template: str = VIDEO_TEMPLATE) -> int:
    """Number of tokens (BOS included) of the templated text before the user prompt."""
    prefix = template.split("{}")[0]
    return len(tokenizer(prefix, add_special_tokens=True)["input_ids"])


class _ConfigOnly:
    """Stands in for the LLaVA model where only its config is needed (no weights loaded)."""

    def __init__(self, config):
        self.config = config

    def eval(self):
        return self

    def requires_grad_(self, flag: bool = True):
        return self


class LlavaTextEncoder:
    """Frozen LLaVA encoder of prompt + identity images -> (states [B, L, D] float32, mask [B, L] long)."""

    def __init__(self, model, tokenizer, mode: str = "release", text_len: int = 256, crop_start: int | None = None,
                 max_subjects: int | None = None, sep_token: str = "<SEP>"):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        max_subjects = 1 if max_subjects is None else max_subjects
        if mode == "release" and max_subjects != 1:
            raise ValueError(f"release mode supports exactly one identity image (max_subjects=1), got {max_subjects}; "
                             "use mode='paper' for multi-subject customization")
        if max_subjects < 1:
            raise ValueError(f"max_subjects must be >= 1, got {max_subjects}")
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.tokenizer.padding_side = "right"
        self.mode, self.text_len, self.max_subjects, self.sep_token = mode, text_len, max_subjects, sep_token
        cfg = model.config
        self.image_token_id = cfg.image_token_id
        if tokenizer.convert_tokens_to_ids("<image>") != self.image_token_id:
            raise ValueError(f"tokenizer maps '<image>' to {tokenizer.convert_tokens_to_ids('<image>')} but the model's "
                             f"image token id is {self.image_token_id}; tokenizer and checkpoint do not belong together")
        if tokenizer.pad_token_id is None:
            raise ValueError("the LLaVA tokenizer has no pad token; right padding needs one")
        if mode == "paper":
            sep_id = tokenizer.convert_tokens_to_ids(sep_token)
            if sep_id is None or sep_id == tokenizer.unk_token_id or \
                    tokenizer(sep_token, add_special_tokens=False)["input_ids"] != [sep_id]:
                raise ValueError(f"paper mode needs {sep_token!r} as a single token of the tokenizer; it is not in the "
                                 "vocabulary. Add it as a special token (and train its embedding) or pass sep_token= an "
                                 "existing reserved special token such as '<|reserved_special_token_0|>'")
            self.sep_token_id = sep_id
        vision = cfg.vision_config
        self.image_size = vision.image_size
        full = cfg.vision_feature_select_strategy == "full"  # "full" keeps the CLS feature
        self.num_image_tokens = (vision.image_size // vision.patch_size) ** 2 + int(full)
        computed = template_crop_start(tokenizer)
        if crop_start is not None and crop_start != computed:
            log.warning("crop_start=%d given but the tokenizer puts %d template tokens before the prompt; using %d",
                        crop_start, computed, crop_start)
        self.crop_start = computed if crop_start is None else crop_start

    @classmethod
    def from_pretrained(cls, path: str | Path, mode: str = "release", dtype: torch.dtype = torch.float32,
                        device: str | torch.device = "cpu", text_len: int = 256, crop_start: int | None = None,
                        max_subjects: int | None = None, sep_token: str = "<SEP>",
                        tokenizer_path: str | Path | None = None) -> "LlavaTextEncoder":
        """Load a local `LlavaForConditionalGeneration` folder and its tokenizer (same folder unless given)."""
        from transformers import AutoTokenizer, LlavaForConditionalGeneration

        model = LlavaForConditionalGeneration.from_pretrained(str(path), dtype=dtype, local_files_only=True).to(device)
        tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_path or path), local_files_only=True)
        return cls(model, tokenizer, mode, text_len, crop_start, max_subjects, sep_token)

    @classmethod
    def tokenizer_only(cls, path: str | Path, mode: str = "release", text_len: int = 256, max_subjects: int | None = None,
                       sep_token: str = "<SEP>") -> "LlavaTextEncoder":
        """Tokenizer and config, no weights: checks prompts (`tokenize`) before anything heavy is loaded."""
        from transformers import AutoConfig, AutoTokenizer

        config = AutoConfig.from_pretrained(str(path), local_files_only=True)
        tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        return cls(_ConfigOnly(config), tokenizer, mode, text_len, None, max_subjects, sep_token)

    @property
    def output_len(self) -> int:
        return self.text_len + self.max_subjects * (self.num_image_tokens - 1)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def build_text(self, prompt: str, names: list[str]) -> str:
        """The templated string for one sample (`names`: one per identity image, may be empty)."""
        if not names:
            return VIDEO_TEMPLATE.format(prompt)
        if self.mode == "release":
            return VIDEO_TEMPLATE.format(prompt) + RELEASE_IMAGE_PHRASE.format(names[0])
        phrases = " ".join(PAPER_IMAGE_PHRASE.format(n) for n in names)
        return VIDEO_TEMPLATE.format(f"{prompt}{self.sep_token}{phrases}")

    def tokenize(self, prompts: list[str], names: list[list[str]]):
        """Token ids with every `<image>` expanded to N image tokens.

        Returns (input_ids [B, S], inline_mask [B, S], token_mask [B, crop_start + text_len]) where
        S = crop_start + text_len + max_subjects * (N - 1) and token_mask is the mask before expansion.
        """
        max_len = self.crop_start + self.text_len
        enc = self.tokenizer([self.build_text(p, n) for p, n in zip(prompts, names)], padding="max_length",
                             max_length=max_len, truncation=True, return_tensors="pt")
        ids, token_mask = enc["input_ids"], enc["attention_mask"]
        N = self.num_image_tokens
        S = max_len + self.max_subjects * (N - 1)
        out_ids = torch.full((len(prompts), S), self.tokenizer.pad_token_id, dtype=torch.long)
        out_mask = torch.zeros(len(prompts), S, dtype=torch.long)
        for i, row in enumerate(ids):
            valid = row[token_mask[i].bool()]
            found = int((valid == self.image_token_id).sum())
            if found != len(names[i]):
                raise ValueError(f"sample {i}: {len(names[i])} identity image(s) but {found} <image> token(s) survive "
                                 f"tokenization to {max_len} tokens; the prompt is too long for text_len="
                                 f"{self.text_len} (or contains '<image>' itself)")
            # Repeat each <image> N times (transformers v5 LLaVA scatters features over the image tokens).
            repeats = torch.where(valid == self.image_token_id, N, 1)
            expanded = valid.repeat_interleave(repeats)
            out_ids[i, : len(expanded)] = expanded
            out_mask[i, : len(expanded)] = 1
        return out_ids, out_mask, token_mask

    @torch.inference_mode()
    def _hidden_states(self, input_ids, mask, images: list[Image.Image]) -> torch.Tensor:
        pixels = None
        if images:
            pixels = torch.stack([preprocess_llava_image(im, self.image_size) for im in images])
            pixels = pixels.to(self.device, self.model.dtype)
        out = self.model(input_ids=input_ids.to(self.device), attention_mask=mask.to(self.device),
                         pixel_values=pixels, output_hidden_states=True)
        return out.hidden_states[-(HIDDEN_STATE_SKIP_LAYER + 1)]

    def _check_batch(self, prompts, subjects):
        if len(prompts) != len(subjects):
            raise ValueError(f"{len(prompts)} prompts but {len(subjects)} subject lists")
        for i, subs in enumerate(subjects):
            if self.mode == "release" and len(subs) > 1:
                raise ValueError(f"sample {i}: release mode takes exactly one identity image (got {len(subs)}); "
                                 "the released checkpoint is single-subject, use mode='paper' for several")
            if len(subs) > self.max_subjects:
                raise ValueError(f"sample {i}: {len(subs)} subjects but this encoder has max_subjects={self.max_subjects}")
            for name, image in subs:
                if not isinstance(name, str) or not isinstance(image, Image.Image):
                    raise ValueError(f"sample {i}: subjects must be (name: str, image: PIL.Image) pairs")

    def encode(self, prompts: list[str], subjects: list[list[tuple[str, Image.Image]]]):
        """states [B, output_len, D] float32 and mask [B, output_len] long; `subjects[i]` may be empty (text-to-video)."""
        self._check_batch(prompts, subjects)
        return self._encode(prompts, subjects, negative=False)

    def encode_negative(self, prompts: list[str], num_subjects: int = 1, names: list[list[str]] | None = None):
        """Unconditional branch for CFG: the (negative) prompts with `num_subjects` all-white identity images."""
        if names is None:
            names = [[DEFAULT_NAME] * num_subjects for _ in prompts]
        elif any(len(n) != num_subjects for n in names):
            raise ValueError(f"names must hold num_subjects={num_subjects} entries per prompt")
        white = white_image(self.image_size)
        subjects = [[(n, white) for n in row] for row in names]
        self._check_batch(prompts, subjects)
        return self._encode(prompts, subjects, negative=True)

    def _encode(self, prompts, subjects, negative: bool):
        names = [[n for n, _ in subs] for subs in subjects]
        images = [im for subs in subjects for _, im in subs]  # row-major: the order of image tokens in input_ids
        ids, inline_mask, token_mask = self.tokenize(prompts, names)
        states = self._hidden_states(ids, inline_mask, images)[:, self.crop_start:].float().cpu()
        if self.mode == "paper":
            return states, inline_mask[:, self.crop_start:]
        # Release quirk: the N-1 extra ones go at the end of the token mask, not where the features are.
        extra = self.num_image_tokens - 1
        has_image = torch.tensor([len(n) for n in names], dtype=torch.long).view(-1, 1)
        mask = torch.cat([token_mask, has_image.expand(-1, extra)], dim=1)[:, self.crop_start:]
        if negative:
            # Released CFG: uncond mask = sum - (N-1) leading ones, i.e. the image tokens' share masked out.
            keep = mask.sum(dim=1) - extra * has_image.view(-1)
            mask = (torch.arange(mask.shape[1]).view(1, -1) < keep.view(-1, 1)).long()
        return states, mask


class ClipTextEncoder:
    """CLIP-L text model on the raw prompt (max 77 tokens) -> pooler_output [B, P]."""

    max_length = 77

    def __init__(self, model, tokenizer):
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer

    @classmethod
    def from_pretrained(cls, path: str | Path, dtype: torch.dtype = torch.float32,
                        device: str | torch.device = "cpu", tokenizer_path: str | Path | None = None) -> "ClipTextEncoder":
        from transformers import AutoTokenizer, CLIPTextModel

        model = CLIPTextModel.from_pretrained(str(path), dtype=dtype, local_files_only=True).to(device)
        tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_path or path), local_files_only=True)
        return cls(model, tokenizer)

    @torch.inference_mode()
    def encode(self, prompts: list[str]) -> torch.Tensor:
        enc = self.tokenizer(list(prompts), padding="max_length", max_length=self.max_length, truncation=True,
                             return_tensors="pt")
        device = next(self.model.parameters()).device
        out = self.model(input_ids=enc["input_ids"].to(device), attention_mask=enc["attention_mask"].to(device))
        return out.pooler_output.float().cpu()


# ---- tiny random models for tests and the demo dataset -------------------------------------------------------

_TINY_WORDS = (
    "a an the man woman boy girl dog cat red panda object person guitar piano car ball hat shirt dress bottle "
    "is are plays playing holds holding walks walking runs running sits sitting dances talking speaking smiles "
    "in on at with and of by to park street room beach kitchen stage garden forest city night day sun rain "
    "describe video detailing following aspects main content theme color shape size texture quantity text "
    "spatial relationships objects actions events behaviors temporal physical movement changes background "
    "environment light style atmosphere camera angles movements transitions used system user looks like"
).split()


def _tiny_bpe(specials: list[str], bos: str, eos: str | None):
    """Byte-level BPE trained in memory on a fixed word list (deterministic; any text encodes, no <unk>)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    # Newlines as their own pieces, so "\n\n" tokenizes the same whatever follows (crop_start stays exact).
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(r"\n"), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False),
    ])
    tok.decoder = decoders.ByteLevel()
    corpus = [" ".join(_TINY_WORDS), *(" " + w for w in _TINY_WORDS), *_TINY_WORDS]
    trainer = trainers.BpeTrainer(vocab_size=512, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus, trainer)
    single = f"{bos} $A" + (f" {eos}" if eos else "")
    ends = [(t, tok.token_to_id(t)) for t in dict.fromkeys([bos, eos]) if t]
    tok.post_processor = processors.TemplateProcessing(single=single, pair=f"{single} $B", special_tokens=ends)
    return tok


def _seeded_init(seed: int, build):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


def save_tiny_llava(folder: str | Path, hidden_size: int = 32, image_size: int = 28, patch_size: int = 14,
                    num_layers: int = 3, vision_hidden_size: int = 16, seed: int = 0) -> Path:
    """A tiny random `LlavaForConditionalGeneration` + Llama-3-style tokenizer (with <image>, <SEP>, <pad>)."""
    from transformers import LlavaConfig, LlavaForConditionalGeneration, PreTrainedTokenizerFast

    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
                "<pad>", "<image>", "<SEP>"]
    tok = PreTrainedTokenizerFast(tokenizer_object=_tiny_bpe(specials, bos="<|begin_of_text|>", eos=None),
                                  bos_token="<|begin_of_text|>", eos_token="<|eot_id|>", pad_token="<pad>",
                                  additional_special_tokens=specials[2:5] + ["<image>", "<SEP>"],
                                  padding_side="right")
    ids = {t: tok.convert_tokens_to_ids(t) for t in specials}
    config = LlavaConfig(
        vision_config=dict(model_type="clip_vision_model", hidden_size=vision_hidden_size,
                           intermediate_size=2 * vision_hidden_size, num_hidden_layers=2, num_attention_heads=2,
                           image_size=image_size, patch_size=patch_size),
        text_config=dict(model_type="llama", vocab_size=len(tok), hidden_size=hidden_size,
                         intermediate_size=2 * hidden_size, num_hidden_layers=num_layers, num_attention_heads=2,
                         num_key_value_heads=2, max_position_embeddings=4096, pad_token_id=ids["<pad>"],
                         bos_token_id=ids["<|begin_of_text|>"], eos_token_id=ids["<|eot_id|>"]),
        image_token_index=ids["<image>"], image_seq_length=(image_size // patch_size) ** 2,
        pad_token_id=ids["<pad>"],
    )
    model = _seeded_init(seed, lambda: LlavaForConditionalGeneration(config))
    folder = Path(folder)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def save_tiny_clip(folder: str | Path, hidden_size: int = 16, num_layers: int = 2, seed: int = 0) -> Path:
    """A tiny random `CLIPTextModel` (pooled dim = hidden_size) + CLIP-style tokenizer, max 77 tokens."""
    from transformers import CLIPTextConfig, CLIPTextModel, PreTrainedTokenizerFast

    bos, eos = "<|startoftext|>", "<|endoftext|>"
    tok = PreTrainedTokenizerFast(tokenizer_object=_tiny_bpe([bos, eos], bos=bos, eos=eos), bos_token=bos,
                                  eos_token=eos, pad_token=eos, model_max_length=77, padding_side="right")
    config = CLIPTextConfig(vocab_size=len(tok), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                            num_hidden_layers=num_layers, num_attention_heads=2, max_position_embeddings=77,
                            projection_dim=hidden_size, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                            pad_token_id=tok.pad_token_id)
    model = _seeded_init(seed, lambda: CLIPTextModel(config))
    folder = Path(folder)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder
