"""Clip reading: buckets, clip sampling, the DALI CPU / PyAV backends against each other, error kinds,
identity images and masks, the tiny real dataset and the data benchmark.

Clips are made here with PyAV: a red square crossing a white 64x48 frame, 17 frames, as h264 (.mp4)
and VP9 (.webm). DALI runs on the CPU (device_id=None); the dali-gpu path needs CUDA and is only
checked for being refused here.
"""

import json
import logging
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from hcustom_mc.console import log_once
from hcustom_mc.data import video as V
from hcustom_mc.data.buckets import BUCKET_RATIOS, bucket_for, buckets
from hcustom_mc.data.errors import DataError
from hcustom_mc.data.tiny_dataset import make_tiny_dataset, write_video
from tests.torchrun import REPO, child_pythonpath

HAVE_DALI = V.dali_available()
needs_dali = pytest.mark.skipif(not HAVE_DALI, reason="nvidia-dali not installed")
LEVEL = 1 / 127.5  # one uint8 step in [-1, 1] units


def square_video(frames=17, h=48, w=64, side=16):
    video = np.full((frames, h, w, 3), 255, np.uint8)
    region = np.zeros((frames, h, w), bool)
    for f in range(frames):
        x = 2 + 2 * f
        video[f, 10:10 + side, x:x + side] = (220, 30, 30)
        region[f, 10:10 + side, x:x + side] = True
    return video, region


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    root = tmp_path_factory.mktemp("clips")
    video, region = square_video()
    paths = {"h264": root / "square.mp4", "vp9": root / "square.webm", "short": root / "short.webm",
             "mask": root / "mask.mp4"}
    write_video(paths["h264"], video)
    write_video(paths["vp9"], video)
    write_video(paths["short"], video[:5])
    write_video(paths["mask"], np.repeat(region[..., None].astype(np.uint8) * 255, 3, -1))
    return paths, region


# ---------------------------------------------------------------- buckets and clip sampling


def test_buckets():
    assert BUCKET_RATIOS == ((1, 1), (3, 4), (4, 3), (9, 16), (16, 9))
    assert buckets(720) == [(720, 720), (720, 960), (960, 720), (720, 1280), (1280, 720)]
    assert buckets(512) == [(512, 512), (512, 688), (688, 512), (512, 912), (912, 512)]
    assert all(h % 16 == 0 and w % 16 == 0 for s in (32, 64, 512, 720) for h, w in buckets(s))
    assert bucket_for(720, 1280, 720) == (720, 1280)
    assert bucket_for(1080, 1920, 512) == (512, 912)
    assert bucket_for(1920, 1080, 720) == (1280, 720)
    assert bucket_for(480, 640, 512) == (512, 688)  # 3:4 (height:width)
    assert bucket_for(500, 510, 720) == (720, 720)
    assert bucket_for(48, 64, 32) == (32, 48)
    assert bucket_for(1000, 600, 64) == (112, 64)  # 5:3 tall -> 16:9 tall is nearer than 4:3
    for h in range(16, 400, 7):  # transposing the frame transposes the bucket (no orientation bias)
        for w in (16, 99, 240, 401):
            assert bucket_for(w, h, 64) == bucket_for(h, w, 64)[::-1]
    # Integer sizes never fall exactly between two ratios; a float one can: the first listed ratio wins.
    assert bucket_for((3 / 4) ** 0.5, 1.0, 64) == (64, 64)  # between 1:1 and 3:4 -> 1:1
    assert bucket_for((4 / 3) ** 0.5, 1.0, 64) == (64, 64)  # between 1:1 and 4:3 -> 1:1
    with pytest.raises(ValueError):
        bucket_for(48, 64, 500)


def test_clip_indices_and_start():
    assert V.clip_indices(17, 5, 4, 0) == [0, 4, 8, 12, 16]
    assert V.clip_indices(20, 5, 2, 3) == [3, 5, 7, 9, 11]
    with pytest.raises(DataError) as e:
        V.clip_indices(16, 5, 4, 0, path="x.mp4")
    assert e.value.kind == "too_short" and e.value.path == "x.mp4"
    with pytest.raises(ValueError):
        V.clip_indices(40, 6, 1, 0)  # not 4k+1
    with pytest.raises(ValueError):
        V.clip_indices(17, 5, 1, 13)  # start past the last possible clip
    starts = [V.choose_start(100, 17, 2, seed=0, index=i) for i in range(50)]
    assert starts == [V.choose_start(100, 17, 2, seed=0, index=i) for i in range(50)]
    assert all(0 <= s <= 100 - 33 for s in starts) and len(set(starts)) > 10
    assert starts != [V.choose_start(100, 17, 2, seed=1, index=i) for i in range(50)]
    with pytest.raises(DataError):
        V.choose_start(10, 17, 1, seed=0, index=0)


def test_probe(clips):
    paths, _ = clips
    for codec in ("h264", "vp9"):  # WebM has no frame count in its header: counted from packets
        assert V.probe_video(paths[codec]) == V.VideoInfo(17, 25.0, 48, 64, codec)


# ---------------------------------------------------------------- backends against each other


@needs_dali
def test_dali_decoder_equals_pyav_fed_dali(clips):
    """VP9: DALI's own CPU decoder and PyAV frames fed to the same DALI ops are bit-identical."""
    paths, _ = clips
    for size, stride, start in (((32, 48), 2, 1), ((48, 48), 1, 0), ((64, 96), 4, 0)):
        frames = 5 if stride > 1 else 17
        dali = V.read_clip(paths["vp9"], frames, stride, size, start=start, backend="dali-cpu", decoder="dali")
        fed = V.read_clip(paths["vp9"], frames, stride, size, start=start, backend="dali-cpu", decoder="pyav")
        assert dali.shape == (3, frames, *size) and dali.dtype == torch.float32
        assert torch.equal(dali, fed)


@needs_dali
def test_dali_cpu_matches_pyav_backend(clips):
    """Same frames and crop window; only the resize kernels differ (DALI's vs torch's antialiased bilinear).
    Tolerance: at most 2 uint8 levels anywhere, 0.05 levels on average (measured: max 1, mean <= 0.007).
    On high-frequency content (noise) the two antialias filters differ more, up to ~12 levels."""
    paths, _ = clips
    for codec in ("h264", "vp9"):
        for size in ((32, 32), (32, 48), (48, 48), (64, 96)):
            a = V.read_clip(paths[codec], 9, 2, size, start=0, backend="dali-cpu")
            b = V.read_clip(paths[codec], 9, 2, size, start=0, backend="pyav")
            diff = (a - b).abs()
            assert diff.mean() < 0.05 * LEVEL and diff.max() <= 2 * LEVEL + 1e-6, (codec, size, diff.max() / LEVEL)
        # no resize at all (bucket == frame): the backends agree exactly
        assert torch.equal(V.read_clip(paths[codec], 17, 1, (48, 64), backend="dali-cpu"),
                           V.read_clip(paths[codec], 17, 1, (48, 64), backend="pyav"))


@needs_dali
def test_h264_via_dali_cpu_is_pyav_fed(clips, caplog):
    """DALI's CPU decoder has no h264: dali-cpu decodes it with PyAV and runs the same DALI ops."""
    paths, _ = clips
    log_once.cache_clear()
    with caplog.at_level(logging.INFO, logger="hcustom_mc.data.video"):
        got = V.read_clip(paths["h264"], 5, 3, (32, 48), start=2, backend="dali-cpu")
        V.read_clip(paths["h264"], 5, 3, (32, 48), start=2, backend="dali-cpu")
    assert sum("h264 is decoded by PyAV" in r.message for r in caplog.records) == 1  # logged once
    want = V.dali_resize_crop(V.decode_frames(paths["h264"], [2, 5, 8, 11, 14]), (32, 48))
    assert torch.equal(got, want)
    with pytest.raises(DataError) as e:  # insisting on DALI's decoder for h264 is a codec error
        V.read_clip(paths["h264"], 5, 3, (32, 48), backend="dali-cpu", decoder="dali")
    assert e.value.kind == "codec"
    # the h264 and VP9 encodings of one source decode to nearly the same pictures, in the same order
    h264, vp9 = (V.decode_frames(paths[c], list(range(17))).astype(int) for c in ("h264", "vp9"))
    assert np.abs(h264 - vp9).mean() < 3


def test_frames_in_order(clips):
    paths, region = clips
    backends = ("dali-cpu", "pyav") if HAVE_DALI else ("pyav",)
    for backend in backends:
        clip = V.read_clip(paths["vp9"], 9, 2, (48, 64), start=0, backend=backend)
        red = (clip[0] > 0.5) & (clip[1] < -0.5)  # [F, H, W]
        xs = [torch.nonzero(red[f])[:, 1].float().mean().item() for f in range(9)]
        true = [np.nonzero(region[f])[1].mean() for f in range(0, 17, 2)]
        assert np.allclose(xs, true, atol=0.6), (backend, xs, true)


@needs_dali
def test_pipelines_are_cached_and_rebuilt_after_failure(clips):
    paths, _ = clips
    V.read_clip(paths["vp9"], 5, 1, (32, 32), backend="dali-cpu")
    pipe = V._pipelines[("cpu", "decode", (32, 32), False)]
    V.read_clip(paths["vp9"], 9, 2, (32, 32), backend="dali-cpu")  # other clip length: same pipeline
    assert V._pipelines[("cpu", "decode", (32, 32), False)] is pipe
    with pytest.raises(DataError) as e:  # bytes that pass no demuxer: DALI fails, the pipeline is dropped
        V._run_dali(False, "decode", (32, 32), False, "junk.webm", encoded=np.arange(4096, dtype=np.uint8) % 7,
                    indices=[0])
    assert e.value.kind == "corrupt" and e.value.path == "junk.webm"
    assert ("cpu", "decode", (32, 32), False) not in V._pipelines
    assert V.read_clip(paths["vp9"], 5, 1, (32, 32), backend="dali-cpu").shape == (3, 5, 32, 32)


# ---------------------------------------------------------------- backend choice


def test_backend_selection_on_cpu(monkeypatch, caplog):
    from hcustom_mc.device import uses_cuda

    if uses_cuda():
        pytest.skip("checks the choice of a process that computes on the CPU (no CUDA, or HCUSTOM_DIST_BACKEND=gloo)")
    log_once.cache_clear()
    with caplog.at_level(logging.INFO, logger="hcustom_mc.data.video"):
        expected = "dali-cpu" if HAVE_DALI else "pyav"
        assert V.resolve_backend("auto") == expected
        assert V.resolve_backend("auto") == expected
    assert [r.message for r in caplog.records if "video backend" in r.message] == [
        f"video backend: {expected} (" + ("nvidia-dali is installed but CUDA is not available)" if HAVE_DALI
                                          else "nvidia-dali is not installed)")]
    with pytest.raises(RuntimeError, match="dali-gpu.*needs CUDA"):
        V.resolve_backend("dali-gpu")
    with pytest.raises(ValueError):
        V.resolve_backend("ffmpeg")
    monkeypatch.setattr(V, "dali_available", lambda: False)
    assert V.resolve_backend("auto") == "pyav"
    with pytest.raises(RuntimeError, match="needs nvidia-dali"):
        V.resolve_backend("dali-cpu")


# ---------------------------------------------------------------- errors


def test_errors_name_kind_and_path(clips, tmp_path):
    paths, _ = clips
    data = paths["h264"].read_bytes()
    cut_mp4, cut_webm, text, wav = (tmp_path / n for n in ("cut.mp4", "cut.webm", "notes.mp4", "sound.wav"))
    cut_mp4.write_bytes(data[: len(data) // 2])
    webm = paths["vp9"].read_bytes()
    cut_webm.write_bytes(webm[: len(webm) // 2])
    text.write_bytes(b"this is not a video\n" * 50)
    import av

    with av.open(str(wav), "w", format="wav") as c:  # a real media file with no video stream
        s = c.add_stream("pcm_s16le", rate=16000, layout="mono")
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 1600), np.int16), format="s16", layout="mono")
        frame.sample_rate = 16000
        for p in [*s.encode(frame), *s.encode()]:
            c.mux(p)
    cases = [(tmp_path / "nope.mp4", "missing"), (cut_mp4, "corrupt"), (cut_webm, "corrupt"), (text, "corrupt"),
             (wav, "corrupt"), (paths["short"], "too_short")]
    for backend in ("dali-cpu", "pyav") if HAVE_DALI else ("pyav",):
        for path, kind in cases:
            with pytest.raises(DataError) as e:
                V.read_clip(path, 17, 1, (32, 32), backend=backend)
            assert (e.value.kind, e.value.path) == (kind, str(path)), (backend, path, e.value)
    with pytest.raises(DataError) as e:
        V.read_mask_clip(tmp_path / "nope.mp4", 5, 1, (32, 32))
    assert e.value.kind == "missing"


# ---------------------------------------------------------------- images and masks


def test_read_image_pad_and_crop(tmp_path):
    red = np.zeros((10, 20, 3), np.uint8)
    red[..., 0] = 255
    Image.fromarray(red).save(tmp_path / "wide.png")
    img = V.read_image(tmp_path / "wide.png", (32, 32))  # 2:1 into a square: 16 rows of red, white above/below
    assert img.shape == (3, 32, 32)
    assert torch.equal(img[:, :8], torch.ones(3, 8, 32)) and torch.equal(img[:, 24:], torch.ones(3, 8, 32))
    assert torch.equal(img[:, 8:24], torch.tensor([1.0, -1.0, -1.0])[:, None, None].expand(3, 16, 32))
    crop = V.read_image(tmp_path / "wide.png", (32, 32), fit="crop")
    assert torch.equal(crop, torch.tensor([1.0, -1.0, -1.0])[:, None, None].expand(3, 32, 32))
    clear = np.zeros((8, 8, 4), np.uint8)  # fully transparent: composited onto the pad colour, not black
    Image.fromarray(clear, "RGBA").save(tmp_path / "clear.png")
    assert torch.equal(V.read_image(tmp_path / "clear.png", (16, 16)), torch.ones(3, 16, 16))
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    for name, kind in (("bad.png", "image"), ("none.png", "missing")):
        with pytest.raises(DataError) as e:
            V.read_image(tmp_path / name, (32, 32))
        assert (e.value.kind, e.value.path) == (kind, str(tmp_path / name))


def test_read_mask_clip_binary(clips):
    paths, region = clips
    backends = ("dali-cpu", "pyav") if HAVE_DALI else ("pyav",)
    masks = []
    for backend in backends:
        m = V.read_mask_clip(paths["mask"], 17, 1, (48, 64), backend=backend)
        assert m.shape == (1, 17, 48, 64) and set(m.unique().tolist()) <= {0.0, 1.0}
        assert torch.equal(m[0].bool(), torch.from_numpy(region))  # binarised: compression noise gone
        masks.append(V.read_mask_clip(paths["mask"], 9, 2, (32, 48), backend=backend))
        assert set(masks[-1].unique().tolist()) == {0.0, 1.0}
    assert all(torch.equal(masks[0], m) for m in masks)  # nearest resize picks the same pixels everywhere


# ---------------------------------------------------------------- tiny dataset and benchmark


def test_tiny_dataset(tmp_path):
    import av

    broken = make_tiny_dataset(tmp_path, num_samples=12, size="64x48", frames=17, seed=0, broken_fraction=0.5)
    lines = [json.loads(line) for line in (tmp_path / "manifest.jsonl").read_text().splitlines()]
    assert [r["id"] for r in lines] == [f"s{i:04d}" for i in range(12)]
    assert all(list(r)[:8] == ["id", "task", "video", "caption", "subjects", "audio", "source_video", "mask_video"]
               and len(r) == 8 for r in lines)
    kinds = json.loads((tmp_path / "broken.json").read_text())
    assert sorted(kinds) == broken and len(broken) == 6
    assert {k["file_kind"] for k in kinds.values()} == {"truncated", "missing", "garbage", "too_short", "bad_image",
                                                        "wrong_rate"}
    for r in lines:
        want = kinds.get(r["id"], {}).get("error_kind")
        nsub = {"t2v": 0, "identity": 1, "multi_identity": 2, "audio": 1, "editing": 1}[r["task"]]
        assert len(r["subjects"]) == nsub and r["caption"].startswith("A ")
        try:
            V.read_clip(tmp_path / r["video"], 17, 1, (32, 48), backend="pyav")
            for s in r["subjects"]:
                V.read_image(tmp_path / s["image"], (32, 48))
            if r["audio"]:
                with av.open(str(tmp_path / r["audio"])) as c:
                    rate = c.streams.audio[0].rate
                if rate != 16000:
                    raise DataError("sample_rate", r["audio"], f"{rate} Hz")
            if r["mask_video"]:
                assert set(V.read_mask_clip(tmp_path / r["mask_video"], 17, 1, (48, 64), backend="pyav")
                           .unique().tolist()) == {0.0, 1.0}
                V.read_clip(tmp_path / r["source_video"], 17, 1, (48, 64), backend="pyav")
            got = None
        except DataError as e:
            got = e.kind
        assert got == want, (r["id"], got, want)


def test_bench_data_runs_tiny(tmp_path):
    out = tmp_path / "data.md"
    proc = subprocess.run([sys.executable, "bench/data.py", "--size", "64x48", "--frames", "17", "--out", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": child_pythonpath()})
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = out.read_text()
    assert "command: `python bench/data.py --size 64x48 --frames 17" in table
    assert "| pyav: PyAV decode h264 + torch resize |" in table
    if HAVE_DALI:
        assert "| dali-cpu: DALI decode vp9 + DALI resize |" in table
        assert "| dali-cpu: PyAV decode h264 -> DALI resize |" in table
