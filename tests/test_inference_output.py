"""Sample outputs: mp4 round trip through PyAV (video + AAC), contact sheet, sidecar, progress line."""

import io
import json
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from hcustom_mc.inference.output import (
    LABEL_HEIGHT,
    StepProgress,
    read_mp4,
    to_uint8_frames,
    write_contact_sheet,
    write_mp4,
    write_sidecar,
)

F, H, W, FPS, SR = 9, 32, 48, 25, 16000


def smooth_frames():
    """Gradients that drift over time: smooth content, where h264 at crf 18 is near-transparent."""
    t = np.linspace(0, 1, F)[:, None, None, None]
    y = np.linspace(0, 1, H)[None, :, None, None]
    x = np.linspace(0, 1, W)[None, None, :, None]
    colour = np.array([1.0, 0.6, 0.3])[None, None, None, :]
    return (40 + 150 * (0.5 * y + 0.3 * x + 0.2 * t) * colour).round().astype(np.uint8)


def tone(seconds, hz=440.0):
    return (0.5 * np.sin(2 * np.pi * hz * np.arange(int(seconds * SR)) / SR)).astype(np.float32)


def test_to_uint8_frames_rounds_and_clamps():
    video = torch.zeros(3, 2, 2, 4)
    video[0, 0, 0, :] = torch.tensor([-1.0, 1.0, -3.0, 3.0])
    video[2, 1, 1, 1] = 1.6 / 127.5 - 1.0  # 1.6 levels -> 2 (truncation would give 1)
    out = to_uint8_frames(video)
    assert out.shape == (2, 2, 4, 3) and out.dtype == np.uint8
    assert out[0, 0, :, 0].tolist() == [0, 255, 0, 255]
    assert out[0, 1, 0].tolist() == [128, 128, 128]  # 0.0 -> 127.5 -> 128
    assert out[1, 1, 1, 2] == 2
    with pytest.raises(ValueError):
        to_uint8_frames(torch.zeros(4, 2, 2, 2))


def test_mp4_round_trip_with_audio(tmp_path):
    frames = smooth_frames()
    path = write_mp4(tmp_path / "sub" / "clip.mp4", frames, FPS, audio=tone(1.0))  # longer audio gets trimmed
    assert path.exists() and not list(path.parent.glob(".*tmp*"))  # the temp file was renamed away
    decoded, fps, audio, rate = read_mp4(path)
    assert decoded.shape == frames.shape and fps == Fraction(FPS)
    # h264 is lossy; on smooth content at crf 18 the mean error is ~1-2 levels (tolerance 6)
    assert np.abs(decoded.astype(np.float64) - frames).mean() < 6.0
    assert rate == SR and audio is not None
    # AAC works in 1024-sample frames: decoded length is the video duration rounded up to a frame
    wanted = F * SR // FPS
    assert wanted <= audio.size <= wanted + 2 * 1024
    spectrum = np.abs(np.fft.rfft(audio[:wanted]))
    assert abs(np.fft.rfftfreq(wanted, 1 / SR)[spectrum.argmax()] - 440) < 10

    import av

    with av.open(str(path)) as container:
        assert {s.type for s in container.streams} == {"video", "audio"}
        assert container.streams.video[0].codec_context.name == "h264"
        assert container.streams.audio[0].codec_context.name == "aac"
        assert container.duration / 1e6 == pytest.approx(F / FPS, abs=0.05)


def test_mp4_without_audio_and_short_audio(tmp_path):
    frames = smooth_frames()
    _, fps, audio, rate = read_mp4(write_mp4(tmp_path / "silent.mp4", frames, FPS))
    assert audio is None and rate is None and fps == FPS
    # audio shorter than the video is zero-padded, so the stream still spans the whole clip
    _, _, audio, _ = read_mp4(write_mp4(tmp_path / "short.mp4", frames, FPS, audio=tone(0.1)))
    assert audio.size >= F * SR // FPS


def test_mp4_validation(tmp_path):
    with pytest.raises(ValueError):
        write_mp4(tmp_path / "odd.mp4", np.zeros((2, 31, 48, 3), np.uint8), FPS)
    with pytest.raises(ValueError):
        write_mp4(tmp_path / "float.mp4", np.zeros((2, 32, 48, 3), np.float32), FPS)
    assert not list(tmp_path.iterdir())


def test_contact_sheet(tmp_path):
    frames = smooth_frames()
    path = write_contact_sheet(tmp_path / "sheet.png", frames, max_frames=4)
    with Image.open(path) as img:  # 4 frames -> 2x2 grid
        assert img.format == "PNG" and img.size == (2 * W, 2 * (H + LABEL_HEIGHT))
        sheet = np.asarray(img.convert("RGB"))
    np.testing.assert_array_equal(sheet[:H, :W], frames[0])  # first tile is frame 0 unchanged
    np.testing.assert_array_equal(sheet[H + LABEL_HEIGHT:2 * H + LABEL_HEIGHT, W:], frames[-1])  # last is frame F-1
    assert sheet[H:H + LABEL_HEIGHT, :W].max() > 0  # a label was drawn in the strip
    with Image.open(write_contact_sheet(tmp_path / "row.png", frames, columns=F)) as img:
        assert img.size == (F * W, H + LABEL_HEIGHT)


def test_contact_sheet_shows_the_references_first(tmp_path):
    """Two subjects: a row of their identity images (fitted, labelled) above the frames. A reference of the tile's
    own size is pasted unchanged; a wider one is scaled to the tile's width and centred on grey."""
    frames = smooth_frames()
    same = frames[2]
    wide = np.full((H // 2, 2 * W, 3), 200, np.uint8)  # twice as wide: half the width, a quarter of the height
    Image.fromarray(same).save(tmp_path / "man.png")
    Image.fromarray(wide).save(tmp_path / "dog.png")
    refs = [("man", str(tmp_path / "man.png")), ("dog", str(tmp_path / "dog.png"))]
    path = write_contact_sheet(tmp_path / "sheet.png", frames, max_frames=4, references=refs)
    with Image.open(path) as img:  # 2 columns: one row of references, two of frames
        assert img.size == (2 * W, 3 * (H + LABEL_HEIGHT))
        sheet = np.asarray(img.convert("RGB"))
    np.testing.assert_array_equal(sheet[:H, :W], same)
    dog = sheet[:H, W:]
    assert (dog[H // 2 - H // 8 + 1 : H // 2 + H // 8 - 1] == 200).all() and (dog[:H // 8] == 128).all()
    row = H + LABEL_HEIGHT
    np.testing.assert_array_equal(sheet[row:row + H, :W], frames[0])  # the frames start on the next row


def test_a_long_subject_name_is_cut_to_its_tile(tmp_path):
    """Each label stays inside its own tile's column: a long name never overprints its neighbour's label."""
    frames = smooth_frames()
    Image.fromarray(frames[0]).save(tmp_path / "ref.png")
    long = "a very long subject phrase that is much wider than one tile"
    refs = [(long, str(tmp_path / "ref.png")), ("x", str(tmp_path / "ref.png"))]
    with Image.open(write_contact_sheet(tmp_path / "sheet.png", frames, max_frames=4, references=refs)) as img:
        strip = np.asarray(img.convert("RGB"))[H:H + LABEL_HEIGHT]
    drawn = np.flatnonzero(strip.max(axis=(0, 2)) > 0)
    first, second = drawn[drawn < W], drawn[drawn >= W]
    assert W // 2 < first.max() < W - 1 and second.min() >= W + 2  # the first label fills its tile and ends in it


def test_sidecar_round_trip(tmp_path):
    settings = {"seed": 7, "size": (32, 48), "ckpt": Path("/ckpt/x.pt"), "dtype": torch.bfloat16,
                "fps": Fraction(24000, 1001), "cfg": 7.5, "nested": {"b": 1, "a": np.float32(0.5)}}
    path = write_sidecar(tmp_path / "clip.json", settings)
    text = path.read_text()
    loaded = json.loads(text)
    assert loaded == {"seed": 7, "size": [32, 48], "ckpt": "/ckpt/x.pt", "dtype": "torch.bfloat16",
                      "fps": "24000/1001", "cfg": 7.5, "nested": {"a": 0.5, "b": 1}}
    assert list(loaded) == sorted(loaded) and text.index('"a"') < text.index('"b"')


def test_step_progress_reports_eta():
    out = io.StringIO()
    progress = StepProgress(4, desc="denoise", stream=out)
    for seconds in (2.0, 1.0, 3.0):
        progress.update(seconds)
    summary = progress.close()
    lines = out.getvalue().splitlines()
    assert len(lines) == 3 and lines[0].startswith("denoise 1/4")
    assert "step 3.00s" in lines[-1] and "mean 2.00s" in lines[-1] and "ETA 00:02" in lines[-1]
    assert summary["steps"] == 3 and summary["total_s"] == 6.0 and summary["mean_s_per_step"] == 2.0
    assert summary["step_s"] == [2.0, 1.0, 3.0]  # each step's time, for the sidecar

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    tty = Terminal()
    live = StepProgress(2, stream=tty)
    live.update(1.0)
    live.update(1.0)
    live.close()
    assert tty.getvalue().count("\r") == 2 and tty.getvalue().endswith("ETA 00:00\n")  # redrawn in place
    quiet = io.StringIO()
    silent = StepProgress(2, enabled=False, stream=quiet)
    silent.update(1.0)
    assert quiet.getvalue() == "" and silent.close()["steps"] == 1
