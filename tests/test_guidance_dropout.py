"""Guidance dropout trains on what guidance feeds at sampling time (hcustom_mc.data.nulls): the null prompt's
LLaVA + CLIP encoding with white identity images, the white image's VAE latent, zero audio."""

import json

import pytest
import torch

from hcustom_mc.data.nulls import NullConditions, encode_null_conditions, stand_in_null_conditions
from hcustom_mc.data.synthetic import SyntheticLatentDataset, collate, drop_conditions
from hcustom_mc.model import get_model_config
from hcustom_mc.training.config import DataConfig


def test_dropped_conditions_are_the_null_conditions():
    model_cfg = get_model_config("tiny", "audio")
    data = DataConfig(task_weights={"audio": 1.0}, text_drop=1.0, identity_drop=1.0, audio_drop=1.0)
    ds = SyntheticLatentDataset(model_cfg, data)
    nulls = ds.null_conditions()
    batch = collate([ds[i] for i in range(3)])
    K = batch["identity_latents"].shape[2]
    drop_conditions(batch, data, [(1, p) for p in range(3)], nulls)
    for row in range(3):
        for name in ("text_states", "text_mask", "text_pooled"):
            assert torch.equal(batch[name][row], nulls.text_for(K)[name]), name
        assert torch.equal(batch["identity_latents"][row], nulls.identity_for(K, data.latent_height, data.latent_width))
        assert not batch["audio_features"][row].any()
    # a fixed stand-in: the same at every step and on every rank, not zeros
    again = SyntheticLatentDataset(model_cfg, data).null_conditions()
    assert torch.equal(again.text_for(K)["text_states"], nulls.text_for(K)["text_states"])
    assert nulls.text_for(K)["text_states"].abs().sum() > 0 and nulls.identity_for(1, 4, 4).abs().sum() > 0


def test_nothing_dropped_at_zero_rates():
    model_cfg = get_model_config("tiny", "audio")
    data = DataConfig(task_weights={"audio": 1.0}, text_drop=0.0, identity_drop=0.0, audio_drop=0.0)
    ds = SyntheticLatentDataset(model_cfg, data)
    batch = collate([ds[i] for i in range(2)])
    before = {k: v.clone() for k, v in batch.items()}
    drop_conditions(batch, data, [(1, 0), (1, 1)], ds.null_conditions())
    assert all(torch.equal(before[k], batch[k]) for k in batch)


def test_null_conditions_round_trip(tmp_path):
    nulls = stand_in_null_conditions(get_model_config("tiny", "base"), 8, (4, 6), seed=5, max_identity=2)
    back = NullConditions.load(nulls.save(tmp_path / "n.safetensors"))
    assert sorted(back.text) == [0, 1, 2] and sorted(back.identity) == [(4, 6)]
    assert torch.equal(back.text_for(2)["text_mask"], nulls.text_for(2)["text_mask"])
    with pytest.raises(FileNotFoundError, match="re-run tools/preprocess.py"):
        NullConditions.load(tmp_path / "missing.safetensors")


def test_encoded_nulls_equal_the_samplers_unconditional_branch(tmp_path):
    """The preprocessing / online encoding of the null condition equals what the sampler builds for its
    unconditional branch from the same encoders (the tiny LLaVA, CLIP and VAE). The sampler writes the job's
    subject names into the white images' phrase; training cannot know them and uses the default name, which
    the job here uses too."""
    from PIL import Image

    from hcustom_mc.encoders.text import DEFAULT_NAME

    from hcustom_mc.data.encode import ClipSpec, SampleEncoder
    from hcustom_mc.encoders.tiny import save_tiny_encoders
    from hcustom_mc.inference.inputs import EncoderSet, SampleJob, prepare_conditions
    from hcustom_mc.training.config import EncoderPaths

    model_cfg = get_model_config("tiny", "base")
    paths = EncoderPaths(**{k: v for k, v in save_tiny_encoders(tmp_path / "enc", model_cfg).items() if k != "whisper"})
    text_len = 80
    encoder = SampleEncoder(paths, mode="release", text_len=text_len, max_identity=1,
                            spec=ClipSpec(frames=5, stride=1, short_side=32), seed=0)
    nulls = encode_null_conditions(encoder, "", [(4, 4)], max_identity=1)
    Image.new("RGB", (20, 24), (200, 30, 30)).save(tmp_path / "face.png")
    job = SampleJob(task="identity", prompt="a person walks", negative_prompt="", subjects=[(DEFAULT_NAME, str(tmp_path / "face.png"))],
                    height=32, width=32, frames=5, ip_cfg_scale=2.0)
    sampler = EncoderSet.from_paths(paths, needs_audio=False, text_len=text_len)
    uncond = prepare_conditions(job, sampler, model_cfg, "cpu", torch.float32)["branches"]["uncond"]
    for name in ("text_states", "text_mask", "text_pooled"):
        assert torch.allclose(uncond[name][0].float(), nulls.text_for(1)[name].float(), atol=1e-6), name
    # ip-cfg's unconditional identity: the VAE latent (a posterior sample) of a white image, one frame per image
    from hcustom_mc.data.encode import _generator

    white = nulls.identity_for(1, 4, 4)
    want = sampler.vae.encode_image(torch.ones(1, 3, 32, 32), generator=_generator(0, -1, "null_identity"))[0]
    assert white.shape == uncond["identity_latents"][0].shape
    assert torch.allclose(white, want, atol=1e-6)
