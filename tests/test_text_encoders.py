"""LLaVA / CLIP text encoders on tiny random models saved to disk and loaded through `from_pretrained`.

Expectations are built independently of the encoder where it matters: hand-written template strings,
hand-expanded image tokens, the HF model run directly with a hook on the decoder layer that
`hidden_states[-3]` must come from.
"""

import logging

import pytest
import torch
from PIL import Image

from hcustom_mc.encoders.text import (
    CLIP_MEAN, CLIP_STD, ClipTextEncoder, LlavaTextEncoder, preprocess_llava_image, save_tiny_clip, save_tiny_llava,
)

TEXT_LEN = 24
SYSTEM = ("<|start_header_id|>system<|end_header_id|>\n\nDescribe the video by detailing the following aspects: "
          "1. The main content and theme of the video."
          "2. The color, shape, size, texture, quantity, text, and spatial relationships of the objects."
          "3. Actions, events, behaviors temporal relationships, physical movement changes of the objects."
          "4. background environment, light, style and atmosphere."
          "5. camera angles, movements, and transitions used in the video:<|eot_id|>"
          "<|start_header_id|>user<|end_header_id|>\n\n")


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("text_encoders")
    return save_tiny_llava(root / "llava"), save_tiny_clip(root / "clip")


@pytest.fixture(scope="module")
def release(folders):
    return LlavaTextEncoder.from_pretrained(folders[0], mode="release", text_len=TEXT_LEN)


@pytest.fixture(scope="module")
def paper(folders):
    return LlavaTextEncoder.from_pretrained(folders[0], mode="paper", text_len=32, max_subjects=2)


def solid(color, size=(40, 20)):
    return Image.new("RGB", size, color)


def reference_states(enc, text, image):
    """Run the HF model directly: hand-expanded <image>, inline mask, output of decoder layer L-3 (= hidden_states[-3])."""
    tok, model, N = enc.tokenizer, enc.model, enc.num_image_tokens
    ids = tok(text, add_special_tokens=True)["input_ids"]
    token_len = len(ids)
    pos = ids.index(model.config.image_token_id)
    ids = ids[:pos] + [model.config.image_token_id] * N + ids[pos + 1:]
    pad = enc.crop_start + TEXT_LEN + N - 1 - len(ids)
    input_ids = torch.tensor([ids + [tok.pad_token_id] * pad])
    mask = torch.tensor([[1] * len(ids) + [0] * pad])
    layers = model.model.language_model.layers
    captured = {}
    hook = layers[len(layers) - 3].register_forward_hook(lambda m, a, out: captured.update(h=out[0] if isinstance(out, tuple) else out))
    with torch.no_grad():
        model(input_ids=input_ids, attention_mask=mask, pixel_values=preprocess_llava_image(image, 28)[None])
    hook.remove()
    return captured["h"], token_len, pos


def test_preprocess_pads_white_and_normalises():
    mean, std = torch.tensor(CLIP_MEAN).view(3, 1, 1), torch.tensor(CLIP_STD).view(3, 1, 1)
    white = preprocess_llava_image(solid((255, 255, 255), (50, 30)), size=28)
    assert white.shape == (3, 28, 28)
    torch.testing.assert_close(white, ((1 - mean) / std).expand(3, 28, 28))
    # A wide black image: white bands top and bottom (centred), black in the middle rows.
    x = preprocess_llava_image(solid((0, 0, 0), (40, 20)), size=28)
    torch.testing.assert_close(x[:, :5], ((1 - mean) / std).expand(3, 5, 28))
    torch.testing.assert_close(x[:, -5:], ((1 - mean) / std).expand(3, 5, 28))
    torch.testing.assert_close(x[:, 9:19], ((0 - mean) / std).expand(3, 10, 28))


def test_crop_start_is_computed_from_tokenizer(release, caplog, folders):
    tok = release.tokenizer
    a = tok(SYSTEM + "dog runs<|eot_id|>")["input_ids"]
    b = tok(SYSTEM + "cat sits<|eot_id|>")["input_ids"]
    common = next(i for i, (x, y) in enumerate(zip(a, b)) if x != y)
    assert release.crop_start == common  # the tokens shared by every prompt = template before the prompt
    assert tok.convert_ids_to_tokens(a[0]) == "<|begin_of_text|>"
    with caplog.at_level(logging.WARNING):
        enc = LlavaTextEncoder.from_pretrained(folders[0], text_len=TEXT_LEN, crop_start=95)
    assert "crop_start=95" in caplog.text and enc.crop_start == 95


def test_release_matches_direct_model_run_and_quirk_mask(release):
    image, N = solid((200, 30, 30)), release.num_image_tokens
    assert N == 4
    text = SYSTEM + "A man is playing guitar<|eot_id|>\nThe man looks like<image>"
    assert release.build_text("A man is playing guitar", ["man"]) == text
    ref, token_len, pos = reference_states(release, text, image)
    states, mask = release.encode(["A man is playing guitar"], [[("man", image)]])
    assert states.shape == (1, TEXT_LEN + N - 1, 32) and mask.shape == (1, TEXT_LEN + N - 1)
    torch.testing.assert_close(states, ref[:, release.crop_start:])
    # Quirk: token mask (351 in the real model) + N-1 ones at the end, first crop_start positions cropped.
    expected = torch.tensor([[1] * token_len + [0] * (release.crop_start + TEXT_LEN - token_len) + [1] * (N - 1)])
    assert torch.equal(mask, expected[:, release.crop_start:])
    assert token_len - release.crop_start < TEXT_LEN  # padded prompt, so the appended ones really are apart


def test_release_image_features_are_inline(release):
    prompt, N, crop = "A dog is running in the park", release.num_image_tokens, release.crop_start
    a, _ = release.encode([prompt], [[("dog", solid((10, 200, 10)))]])
    b, _ = release.encode([prompt], [[("dog", solid((10, 10, 200), (20, 40)))]])
    ids, _, _ = release.tokenize([prompt], [["dog"]])
    start = int((ids[0] == release.image_token_id).nonzero()[0]) - crop
    assert torch.equal(a[:, :start], b[:, :start])  # causal LM: tokens before the image cannot see it
    assert not torch.allclose(a[:, start:start + N], b[:, start:start + N])
    assert int((ids[0] == release.image_token_id).sum()) == N


def test_release_batch_mixes_identity_and_text_only(release):
    image = solid((200, 30, 30))
    states, mask = release.encode(["A man is playing guitar", "a dog"], [[("man", image)], []])
    alone, alone_mask = release.encode(["A man is playing guitar"], [[("man", image)]])
    torch.testing.assert_close(states[:1], alone, atol=1e-5, rtol=1e-5)
    assert torch.equal(mask[:1], alone_mask)
    # Text-to-video: the plain template, same length, no image tokens so nothing appended to the mask.
    n = len(release.tokenizer(SYSTEM + "a dog<|eot_id|>")["input_ids"]) - release.crop_start
    assert mask[1].tolist() == [1] * n + [0] * (TEXT_LEN + release.num_image_tokens - 1 - n)


def test_release_negative_branch(release):
    N = release.num_image_tokens
    states, mask = release.encode_negative(["blurry, low quality"], num_subjects=1)
    white = Image.new("RGB", (7, 3), (255, 255, 255))
    pos_states, pos_mask = release.encode(["blurry, low quality"], [[("object", white)]])
    torch.testing.assert_close(states, pos_states)  # all-white image, default name "object"
    keep = int(pos_mask.sum()) - (N - 1)
    assert mask.tolist() == [[1] * keep + [0] * (mask.shape[1] - keep)]


def test_paper_template_sep_and_multi_subject(paper):
    N, crop = paper.num_image_tokens, paper.crop_start
    assert paper.build_text("A man plays guitar", ["man", "guitar"]) == (
        SYSTEM + "A man plays guitar<SEP>The man looks like <image>. The guitar looks like <image>.<|eot_id|>")
    subjects = [[("man", solid((200, 30, 30))), ("guitar", solid((30, 30, 200)))], [("dog", solid((30, 200, 30)))]]
    states, mask = paper.encode(["A man plays guitar", "a dog"], subjects)
    assert states.shape == (2, 32 + 2 * (N - 1), 32)
    ids, inline, _ = paper.tokenize(["A man plays guitar", "a dog"], [["man", "guitar"], ["dog"]])
    assert (ids == paper.sep_token_id).sum(dim=1).tolist() == [1, 1]
    assert (ids == paper.image_token_id).sum(dim=1).tolist() == [2 * N, N]
    # Inline mask: exactly the non-pad expanded tokens, right-padded.
    assert torch.equal(mask, (ids != paper.tokenizer.pad_token_id).long()[:, crop:])
    assert not (mask[:, 1:] > mask[:, :-1]).any()
    # Changing the second image changes states from its first image token on, and nothing before.
    other = [[subjects[0][0], ("guitar", solid((250, 250, 0)))], subjects[1]]
    changed, _ = paper.encode(["A man plays guitar", "a dog"], other)
    second = int((ids[0] == paper.image_token_id).nonzero()[N]) - crop
    assert torch.equal(states[0, :second], changed[0, :second])
    assert not torch.allclose(states[0, second:second + N], changed[0, second:second + N])
    torch.testing.assert_close(states[1], changed[1])


def test_paper_text_only_and_negative(paper):
    states, mask = paper.encode(["a dog runs"], [[]])
    assert states.shape[1] == paper.output_len and "<SEP>" not in paper.build_text("a dog runs", [])
    neg, neg_mask = paper.encode_negative(["bad"], num_subjects=2)
    ids, inline, _ = paper.tokenize(["bad"], [["object", "object"]])
    assert torch.equal(neg_mask, inline[:, paper.crop_start:])


def test_clear_errors(release, paper, folders):
    im = solid((1, 2, 3))
    with pytest.raises(ValueError, match="exactly one identity image"):
        release.encode(["two people"], [[("man", im), ("woman", im)]])
    with pytest.raises(ValueError, match="max_subjects"):
        LlavaTextEncoder.from_pretrained(folders[0], mode="release", max_subjects=2)
    with pytest.raises(ValueError, match="max_subjects=2"):
        paper.encode(["x"], [[("a", im)] * 3])
    with pytest.raises(ValueError, match="prompts but"):
        release.encode(["a", "b"], [[]])
    with pytest.raises(ValueError, match="too long"):
        release.encode(["word " * 40], [[("man", im)]])
    with pytest.raises(ValueError, match="PIL.Image"):
        release.encode(["x"], [[("man", torch.zeros(3, 8, 8))]])
    with pytest.raises(ValueError, match="not in the vocabulary"):
        LlavaTextEncoder.from_pretrained(folders[0], mode="paper", sep_token="<NOSEP>")
    with pytest.raises(ValueError, match="mode must be"):
        LlavaTextEncoder.from_pretrained(folders[0], mode="both")


def test_clip_pooled_output(folders):
    clip = ClipTextEncoder.from_pretrained(folders[1])
    pooled = clip.encode(["a man plays guitar", "a red panda"])
    assert pooled.shape == (2, 16)
    enc = clip.tokenizer(["a man plays guitar"], padding="max_length", max_length=77, return_tensors="pt")
    assert enc["input_ids"].shape == (1, 77)
    with torch.no_grad():
        hidden = clip.model(**enc).last_hidden_state
    eos = int((enc["input_ids"][0] == clip.tokenizer.eos_token_id).nonzero()[0])
    torch.testing.assert_close(pooled[0], hidden[0, eos])  # pooled = final-LN state at the first EOS
    assert not torch.allclose(pooled[0], pooled[1])


def test_tiny_models_are_deterministic(tmp_path, folders):
    again = save_tiny_llava(tmp_path / "llava")
    assert (again / "tokenizer.json").read_text() == (folders[0] / "tokenizer.json").read_text()
    a = LlavaTextEncoder.from_pretrained(again, text_len=TEXT_LEN).model.state_dict()
    b = LlavaTextEncoder.from_pretrained(folders[0], text_len=TEXT_LEN).model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    c = LlavaTextEncoder.from_pretrained(save_tiny_llava(tmp_path / "other", seed=1), text_len=TEXT_LEN).model
    assert not torch.equal(c.state_dict()["lm_head.weight"], b["lm_head.weight"])
