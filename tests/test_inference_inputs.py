"""Sampling jobs: validation lists every problem up front; prepare_conditions builds DiT inputs per branch."""

import re
import wave
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from hcustom_mc.data.tiny_dataset import write_video
from hcustom_mc.encoders.tiny import save_tiny_encoders
from hcustom_mc.inference.inputs import (
    EncoderSet, InputError, SampleJob, _generator, dilate_mask, prepare_conditions, resolve_job, validate_job,
)
from hcustom_mc.model.config import get_model_config
from hcustom_mc.training.config import EncoderPaths

H, W, SRC_FRAMES = 32, 48, 11  # editing source: 11 frames -> 9 used (largest 4k+1)


def _tone(path: Path, seconds: float, rate: int = 16000) -> str:
    t = np.arange(int(seconds * rate)) / rate
    with wave.open(str(path), "wb") as f:
        f.setnchannels(1), f.setsampwidth(2), f.setframerate(rate)
        f.writeframes((0.3 * 32767 * np.sin(2 * np.pi * 440 * t)).astype(np.int16).tobytes())
    return str(path)


def _box_video(path: Path, frames: int, h: int, w: int, box: bool) -> str:
    video = np.zeros((frames, h, w, 3), np.uint8)
    if box:
        video[:, h // 4: h // 2, w // 4: w // 2] = 255  # the mask region (white)
    else:
        video[:] = np.linspace(0, 255, w, dtype=np.uint8)[None, None, :, None]
    write_video(path, video, fps=25)
    return str(path)


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    d = tmp_path_factory.mktemp("media")
    Image.new("RGB", (20, 30), (200, 30, 30)).save(d / "red.png")
    Image.new("RGB", (30, 20), (30, 30, 200)).save(d / "blue.png")
    (d / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    (d / "file").write_text("a file, not a folder")
    return dict(
        red=str(d / "red.png"), blue=str(d / "blue.png"), broken=str(d / "broken.png"),
        audio=_tone(d / "tone.wav", 0.5), short_audio=_tone(d / "short.wav", 0.2),
        source=_box_video(d / "source.mp4", SRC_FRAMES, H, W, box=False),
        mask=_box_video(d / "mask.mp4", SRC_FRAMES, H, W, box=True),
        small_mask=_box_video(d / "small_mask.mp4", SRC_FRAMES, H, 32, box=True),
        short_mask=_box_video(d / "short_mask.mp4", 7, H, W, box=True),
        out=str(d / "out" / "video.mp4"), unwritable=str(d / "file" / "video.mp4"),
    )


def job(media, task, **kw):
    base = dict(task=task, prompt="a red square moves to the right", seed=3, output=media["out"])
    if task != "editing":
        base.update(height=H, width=W, frames=9)
    if task in ("identity", "audio", "editing"):
        base["subjects"] = [("square", media["red"])]
    if task == "multi_identity":
        base["subjects"] = [("square", media["red"]), ("circle", media["blue"])]
        base["prompt"] = "a red square and a blue circle move to the right"
    if task == "audio":
        base["audio"] = media["audio"]
    if task == "editing":
        base.update(source_video=media["source"], mask_video=media["mask"])
    base.update(kw)
    return SampleJob(**base)


CFG = {task: get_model_config("tiny", variant) for task, variant in
       (("t2v", "base"), ("identity", "base"), ("audio", "audio"), ("editing", "editing"))}
CFG["multi_identity"] = get_model_config("tiny", "base", mode="paper", max_identity_images=2)


def _problems(j, cfg, **par):
    with pytest.raises(InputError) as e:
        validate_job(j, cfg, **par)
    return str(e.value)


# ------------------------------------------------------------------------------------------ the job itself


def test_from_dict_round_trip_and_unknown_keys(media):
    j = job(media, "multi_identity", ip_cfg_scale=2.0)
    assert SampleJob.from_dict(j.to_dict()) == j
    assert SampleJob.from_dict({"task": "identity", "prompt": "x", "subjects": [{"name": "dog", "image": "d.png"}]}
                               ).subjects == [("dog", "d.png")]
    with pytest.raises(InputError, match=r"unknown job keys \['cfg', 'heigth'\]"):
        SampleJob.from_dict({"task": "t2v", "prompt": "x", "heigth": 16, "cfg": 1})


def test_editing_dims_come_from_the_source_video(media):
    r = resolve_job(job(media, "editing"))
    assert (r.height, r.width, r.frames, r.fps) == (H, W, 9, 25.0)
    assert r.mask_dilation == 8 and resolve_job(job(media, "editing", edit_mode="insert")).mask_dilation == 0
    assert (r.steps, r.shift) == (50, 5.0) and resolve_job(job(media, "identity")).shift == 13.0


# ------------------------------------------------------------------------------------------ validation


@pytest.mark.parametrize("task", list(CFG))
def test_valid_jobs_pass(media, task):
    validate_job(job(media, task), CFG[task], world_size=1)
    validate_job(job(media, task), CFG[task], world_size=4, tp=2, cp=1, cfg_parallel=2)


@pytest.mark.parametrize("task,change,cfg,match", [
    ("identity", dict(subjects=[("square", "/nope.png")]), "identity", r"identity image /nope.png \('square'\): file not found"),
    ("identity", dict(subjects=[("square", "broken")]), "identity", r"broken.png \('square'\): unreadable"),
    ("audio", dict(audio="short_audio"), "audio", r"lasts 0.200 s, shorter than the video \(9 frames at 25 fps = 0.360 s\)"),
    ("editing", dict(mask_video="small_mask"), "editing", "mask_video is 32x32 but source_video is 48x32"),
    ("editing", dict(mask_video="short_mask"), "editing", "mask_video has 7 frames but source_video has 11"),
    ("identity", dict(frames=8), "identity", "frames must be 4k\\+1"),
    ("identity", dict(subjects=[("a", "red"), ("b", "blue")]), "identity", "2 identity images .* release mode takes exactly 1"),
    ("multi_identity", dict(subjects=[("a", "red")] * 3), "multi_identity", "3 identity images .* takes 1..2"),
    ("multi_identity", dict(subjects=[("square", "red"), ("dog", "blue")]), "multi_identity",
     r"subject phrase\(s\) 'dog' not in the prompt"),
    ("multi_identity", dict(subjects=[("Square", "red"), ("square", "blue")]), "multi_identity",
     "subject names must differ"),
    ("audio", {}, "identity", "task 'audio' needs an audio model"),
    ("editing", {}, "identity", "task 'editing' needs an editing model"),
    ("identity", dict(height=40), "identity", "height must be a positive multiple of 16, got 40"),
    ("identity", dict(width=20), "identity", "width must be a positive multiple of 16, got 20"),
    ("identity", dict(output="unwritable"), "identity", "output folder .*file .* is not writable"),
])
def test_each_bad_input_is_named(media, task, change, cfg, match):
    change = {k: media.get(v, v) if isinstance(v, str) else v for k, v in change.items()}
    if "subjects" in change:
        change["subjects"] = [(n, media.get(p, p)) for n, p in change["subjects"]]
    assert len(re.findall(match, _problems(job(media, task, **change), CFG[cfg]))) == 1


@pytest.mark.parametrize("par,scales,match", [
    (dict(world_size=4, tp=2, cp=1, cfg_parallel=1), {}, r"tp x cp x cfg_parallel = 2 x 1 x 1 = 2 must equal the world size 4"),
    (dict(world_size=3, tp=1, cp=1, cfg_parallel=3), {}, r"cfg_parallel must be 1 or the number of guidance branches \(2: uncond, cond\), got 3"),
    (dict(world_size=2, tp=1, cp=1, cfg_parallel=2), dict(ip_cfg_scale=1.5), r"branches \(3: uncond, cond, ip\), got 2"),
    (dict(world_size=2, tp=1, cp=1, cfg_parallel=2), dict(cfg_scale=1.0), r"branches \(1: cond\), got 2"),
    (dict(world_size=3, tp=3, cp=1, cfg_parallel=1), {}, "num_heads 4 is not divisible by tensor_parallel 3"),
    (dict(world_size=4, tp=1, cp=4, cfg_parallel=1), dict(frames=5), "context_parallel 4 exceeds the 3 latent frames"),
])
def test_parallel_layout(media, par, scales, match):
    assert re.search(match, _problems(job(media, "identity", **scales), CFG["identity"], **par))
    validate_job(job(media, "identity", ip_cfg_scale=1.5), CFG["identity"], world_size=3, cfg_parallel=3)


def test_ulysses_needs_heads_divisible_by_cp_ring_does_not(media):
    j = job(media, "identity", frames=17)  # 5 video + 1 identity latent frames
    assert "not divisible by context_parallel 3" in _problems(j, CFG["identity"], world_size=3, cp=3)
    validate_job(j, CFG["identity"], world_size=3, cp=3, cp_mode="ring")


def test_every_problem_is_listed_at_once(media):
    bad = job(media, "audio", frames=10, height=40, audio=media["short_audio"],
              subjects=[("square", "/nope.png")], output=media["unwritable"])
    msg = _problems(bad, CFG["identity"], world_size=2, tp=1, cp=1, cfg_parallel=1)
    for part in ("needs an audio model", "/nope.png", "frames must be 4k+1", "height must be", "shorter than the video",
                 "must equal the world size 2", "not writable"):
        assert part in msg, part


# ------------------------------------------------------------------------------------------ conditions


@pytest.fixture(scope="module")
def encoders(tmp_path_factory):
    folder = tmp_path_factory.mktemp("encoders")
    paths = EncoderPaths(**save_tiny_encoders(folder, CFG["identity"]))
    release = EncoderSet.from_paths(paths, True, "cpu", torch.float32, video_backend="pyav")
    paper = EncoderSet.from_paths(paths, False, "cpu", torch.float32, mode="paper", max_subjects=2,
                                  video_backend="pyav")
    assert paper.whisper is None
    return {"release": release, "paper": paper}


def _conditions(media, encoders, task, **kw):
    cfg = CFG[task]
    return prepare_conditions(job(media, task, **kw), encoders[cfg.mode], cfg, "cpu", torch.float32)


@pytest.mark.parametrize("task", list(CFG))
def test_branches_run_through_the_dit(media, encoders, single_process, task):
    from hcustom_mc.model import HunyuanCustomDiT, initialize_weights

    cfg = CFG[task]
    out = _conditions(media, encoders, task)
    C, f, h, w = out["latent_shape"]
    assert (C, f, h, w) == (cfg.in_channels, 3, H // 8, W // 8)
    K = {"t2v": 0, "multi_identity": 2}.get(task, 1)
    for branch in ("cond", "uncond"):
        got = out["branches"][branch]
        assert ("identity_latents" in got) == (K > 0) and ("audio_features" in got) == (task == "audio")
        assert ("video_condition" in got) == (task == "editing")
        if K:
            assert got["identity_latents"].shape == (1, C, K, h, w)
    # equal keys and shapes: the sampler batches the branches with torch.cat
    shapes = {n: {k: v.shape for k, v in b.items()} for n, b in out["branches"].items()}
    assert shapes["cond"] == shapes["uncond"]
    model = HunyuanCustomDiT(cfg).eval()
    initialize_weights(model, seed=0, zero_init=False)  # random, not zero, so the output says something
    latents = torch.randn(1, *out["latent_shape"])
    with torch.no_grad():
        v = model(latents, torch.tensor([500.0]), **out["branches"]["cond"])  # check_inputs runs inside
        model.check_inputs(latents, torch.tensor([500.0]), **out["branches"]["uncond"])
    assert v.shape == latents.shape and torch.isfinite(v).all()


def test_encoders_must_match_the_model_mode(media, encoders):
    with pytest.raises(InputError, match="LLaVA encoder loaded for mode 'release'"):
        prepare_conditions(job(media, "multi_identity"), encoders["release"], CFG["multi_identity"], "cpu", torch.float32)


def test_uncond_audio_is_zeros(media, encoders):
    out = _conditions(media, encoders, "audio")
    assert out["branches"]["cond"]["audio_features"].abs().sum() > 0
    assert torch.equal(out["branches"]["uncond"]["audio_features"], torch.zeros_like(out["branches"]["cond"]["audio_features"]))


def test_negative_mask_hides_the_image_tokens(media, encoders):
    llava = encoders["release"].llava
    out = _conditions(media, encoders, "identity", negative_prompt="blurry")
    white = Image.new("RGB", (28, 28), "white")
    _, unmasked = llava.encode(["blurry"], [[("square", white)]])  # same text, image tokens kept
    m = out["branches"]["uncond"]["text_mask"][0]
    assert m.sum() == unmasked.sum() - (llava.num_image_tokens - 1)
    assert m[: int(m.sum())].all() and not m[int(m.sum()):].any()  # leading ones only
    assert out["branches"]["cond"]["text_mask"].sum() > m.sum()


def test_identity_latents_shared_without_ip_cfg(media, encoders):
    out = _conditions(media, encoders, "identity")
    assert torch.equal(out["branches"]["cond"]["identity_latents"], out["branches"]["uncond"]["identity_latents"])
    assert list(out["branches"]) == ["uncond", "cond"]


def test_ip_cfg_cond_uses_white_image_latents(media, encoders):
    out = _conditions(media, encoders, "identity", ip_cfg_scale=2.0)
    vae = encoders["release"].vae
    white = vae.encode_image(torch.ones(1, 3, H, W), generator=_generator(3, "white0"))
    assert torch.equal(out["branches"]["cond"]["identity_latents"], white)
    assert torch.equal(out["branches"]["uncond"]["identity_latents"], white)
    real = _conditions(media, encoders, "identity")["branches"]["cond"]["identity_latents"]
    assert torch.equal(out["branches"]["ip"]["identity_latents"], real) and not torch.equal(real, white)
    assert torch.equal(out["branches"]["ip"]["text_states"], out["branches"]["cond"]["text_states"])
    assert {k: v.shape for k, v in out["branches"]["ip"].items()} == {k: v.shape for k, v in out["branches"]["cond"].items()}


def test_dilation_grows_a_pixel_into_a_disc():
    mask = torch.zeros(1, 2, 21, 21)
    mask[:, :, 10, 10] = 1
    grown = dilate_mask(mask, 3)
    yy, xx = torch.meshgrid(torch.arange(21), torch.arange(21), indexing="ij")
    disc = ((yy - 10) ** 2 + (xx - 10) ** 2 <= 9).float()
    assert torch.equal(grown[0, 0], disc) and torch.equal(grown[0, 1], disc)
    assert grown[0, 0, 10, 13] == 1 and grown[0, 0, 10, 14] == 0 and grown[0, 0, 12, 12] == 1 and grown[0, 0, 12, 13] == 0  # radius 3, round: (2, 2) in, (2, 3) out
    assert torch.equal(dilate_mask(mask, 0), mask)


def test_editing_condition_blacks_out_the_dilated_mask(media, encoders, monkeypatch):
    import hcustom_mc.inference.inputs as inputs

    seen = []
    encode = encoders["release"].vae.encode
    monkeypatch.setattr(encoders["release"].vae, "encode", lambda x, **kw: seen.append(x) or encode(x, **kw))
    out = _conditions(media, encoders, "editing", mask_dilation=2)
    masked, mask3 = seen[-2], seen[-1]
    assert masked.shape == (1, 3, 9, H, W) and mask3.shape == masked.shape
    inside = mask3[0, 0] > 0
    assert inside.float().mean() > 1 / 16  # the 8x12 box grown by 2 px
    assert torch.allclose(masked[0][:, inside], torch.tensor(-1.0))  # black where the subject is regenerated
    assert out["branches"]["cond"]["video_condition"].shape == (1, 2 * 4, 3, H // 8, W // 8)
    assert torch.equal(out["branches"]["cond"]["video_condition"], out["branches"]["uncond"]["video_condition"])
    assert inputs.DEFAULT_DILATION["replace"] == 8
