"""Audio decoding (PyAV) and Whisper per-frame features for AudioNet (tiny random Whisper)."""

import wave

import numpy as np
import pytest
import torch

from hcustom_mc.data.errors import DataError
from hcustom_mc.encoders.audio import (
    LEAD_ZEROS, WINDOW, AudioFileError, WhisperAudioEncoder, encoder_stride, frame_windows, load_audio, save_tiny_whisper,
)


# --------------------------------------------------------------------------- window formulas


def loop_windows(states, num_frames, audio_len, stride):
    """Reference written the plain way: frame f < audio_len, slot w reads state stride*f + w - 4."""
    out = torch.zeros(num_frames, WINDOW, *states.shape[1:])
    for f in range(min(num_frames, audio_len)):
        for w in range(WINDOW):
            src = stride * f + w - LEAD_ZEROS
            if 0 <= src < states.shape[0]:
                out[f, w] = states[src]
    return out


@pytest.mark.parametrize("T,num_frames,audio_len,stride", [
    (40, 12, 12, 2), (40, 30, 30, 2),  # the last windows run past the 40 states
    (40, 20, 7, 2), (40, 5, 50, 2), (13, 9, 0, 2), (60, 11, 11, 4), (30, 8, 8, 5),
])
def test_windows_match_loop_reference(T, num_frames, audio_len, stride):
    states = torch.randn(T, 3, 2)
    got = frame_windows(states, num_frames, audio_len, stride)
    assert got.shape == (num_frames, WINDOW, 3, 2)
    assert torch.equal(got, loop_windows(states, num_frames, audio_len, stride))


def test_windows_hand_checked():
    states = torch.arange(1, 21, dtype=torch.float32)[:, None]  # state i has value i+1, never 0
    w = frame_windows(states, num_frames=8, audio_len=5, stride=2)[..., 0]
    assert w[0].tolist() == [0, 0, 0, 0, 1, 2, 3, 4, 5, 6]  # 4 zeros + first 6 states
    assert w[1].tolist() == [0, 0, 1, 2, 3, 4, 5, 6, 7, 8]
    assert w[2].tolist() == list(range(1, 11))  # frame f window starts at state 2f-4
    assert w[4].tolist() == list(range(5, 15))
    assert (w[5:] == 0).all()  # audio shorter than video: zero after audio_len
    tail = frame_windows(states, num_frames=11, audio_len=11, stride=2)[..., 0]
    assert tail[10].tolist() == [17, 18, 19, 20, 0, 0, 0, 0, 0, 0]  # window past the last state


def test_encoder_stride_validates_fps():
    assert encoder_stride(25) == 2 and encoder_stride(12.5) == 4 and encoder_stride(10) == 5
    for bad in (24, 30, 0):
        with pytest.raises(ValueError, match="fps"):
            encoder_stride(bad)


# --------------------------------------------------------------------------- tiny Whisper


@pytest.fixture(scope="module")
def whisper(tmp_path_factory):
    return WhisperAudioEncoder.from_pretrained(save_tiny_whisper(tmp_path_factory.mktemp("whisper")))


def _tone(seconds, freq=220.0, rate=16000):
    t = torch.arange(int(seconds * rate)) / rate
    return 0.5 * torch.sin(2 * torch.pi * freq * t) + 0.05 * torch.randn(t.shape, generator=torch.Generator().manual_seed(0))


def test_tiny_whisper_saves_deterministically(tmp_path):
    from safetensors.torch import load_file

    a = load_file(str(save_tiny_whisper(tmp_path / "a") / "model.safetensors"))
    b = load_file(str(save_tiny_whisper(tmp_path / "b") / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_encoder_states_follow_release_procedure(whisper):
    samples = _tone(2.0)
    states = whisper.encoder_states(samples)
    assert states.shape == (1500, 2, 8)  # embeddings + 1 layer, d_model 8
    feats = whisper.feature_extractor(samples.numpy(), sampling_rate=16000, return_tensors="pt").input_features
    assert feats.shape == (1, 80, 3000)
    with torch.no_grad():
        hidden = whisper.encoder(feats, output_hidden_states=True).hidden_states
    assert torch.allclose(states, torch.stack(hidden, dim=2)[0])


def test_only_first_30_seconds_are_encoded(whisper):
    long = _tone(40.0)
    assert whisper.mel_features(long).shape == (1, 80, 6000)  # two 30 s chunks, concatenated
    assert torch.allclose(whisper.encoder_states(long), whisper.encoder_states(long[:480000]))


def test_per_frame_features_shapes_and_zero_tail(whisper):
    samples = _tone(1.0)  # 16000 samples = 25 frames of 640 at 25 fps
    feats = whisper.per_frame_features(samples, num_frames=33)
    assert feats.shape == (33, 10, 2, 8)
    assert (feats[25:] == 0).all() and (feats[24] != 0).any()
    assert (feats[0, :4] == 0).all() and (feats[0, 4:] != 0).any()
    ref = loop_windows(whisper.encoder_states(samples), 33, 25, 2)
    assert torch.allclose(feats, ref)
    slow = whisper.per_frame_features(samples, num_frames=9, fps=12.5)  # 1280 samples / frame, stride 4
    assert torch.allclose(slow, loop_windows(whisper.encoder_states(samples), 9, 12, 4))
    assert (whisper.per_frame_features(samples[:600], num_frames=3) == 0).all()  # < 1 frame of audio
    with pytest.raises(ValueError, match="fps"):
        whisper.per_frame_features(samples, 5, fps=30)


def test_features_for_latents_release_and_paper(whisper):
    samples = _tone(1.0)
    release = whisper.features_for_latents(samples, latent_frames=5, num_identity=1, mode="release")
    paper = whisper.features_for_latents(samples, latent_frames=5, num_identity=1, mode="paper")
    assert release.shape == (17, 10, 2, 8) and paper.shape == (24, 10, 2, 8)
    assert (paper[:7] == 0).all() and torch.equal(paper[7:], release)  # zeros in front, (f+K)*4 rows


# --------------------------------------------------------------------------- decoding files


def _write_tone(path, codec, rate, freq, seconds=1.0, channels=1):
    import av

    t = np.arange(int(rate * seconds)) / rate
    x = (0.5 * np.sin(2 * np.pi * freq * t)).astype(np.float32)
    layout = "mono" if channels == 1 else "stereo"
    with av.open(str(path), "w") as out:
        stream = out.add_stream(codec, rate=rate)
        stream.layout = layout
        for i in range(0, len(x), 1024):
            frame = av.AudioFrame.from_ndarray(np.tile(x[None, i : i + 1024], (channels, 1)), format="fltp", layout=layout)
            frame.sample_rate = rate
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)
    return path


def _peak_hz(y):
    spectrum = np.abs(np.fft.rfft(y.numpy()))
    return np.argmax(spectrum) * 16000 / len(y)


def test_load_wav_44k_resampled(tmp_path):
    y = load_audio(_write_tone(tmp_path / "tone.wav", "pcm_s16le", 44100, 440.0))
    assert y.dtype == torch.float32 and y.ndim == 1
    assert abs(len(y) - 16000) <= 2
    assert abs(_peak_hz(y) - 440.0) < 2
    assert abs(y.abs().max().item() - 0.5) < 0.02


@pytest.mark.parametrize("name,rate,channels", [("tone.m4a", 44100, 1), ("tone.mp4", 48000, 2)])
def test_load_aac(tmp_path, name, rate, channels):
    y = load_audio(_write_tone(tmp_path / name, "aac", rate, 1000.0, channels=channels))
    # AAC adds encoder priming (1024 samples) and pads the last 1024-sample frame; PyAV keeps both.
    assert 16000 <= len(y) <= 16000 + 2048 * 16000 // rate + 2
    assert abs(_peak_hz(y) - 1000.0) < 3
    # stereo is averaged (as librosa mono), not summed with a sqrt(1/2) matrix
    assert 0.4 < y[2000:14000].abs().max().item() < 0.6


def test_load_errors_name_the_path(tmp_path):
    missing = tmp_path / "absent.wav"
    with pytest.raises(AudioFileError, match="absent.wav") as err:
        load_audio(missing)
    assert err.value.kind == "missing"
    corrupt = tmp_path / "noise.m4a"
    corrupt.write_bytes(np.random.default_rng(0).integers(0, 256, 4000, dtype=np.uint8).tobytes())
    with pytest.raises(AudioFileError, match="noise.m4a") as err:
        load_audio(corrupt)
    assert err.value.kind == "corrupt"
    tone = _write_tone(tmp_path / "rate.wav", "pcm_s16le", 44100, 440.0)
    with pytest.raises(AudioFileError, match="rate.wav") as err:
        load_audio(tone, expected_rate=16000)
    assert err.value.kind == "sample_rate" and "44100" in str(err.value)
    assert len(load_audio(tone, expected_rate=44100)) > 0
    empty = tmp_path / "empty.wav"
    with wave.open(str(empty), "wb") as w:
        w.setnchannels(1), w.setsampwidth(2), w.setframerate(16000), w.writeframes(b"")
    with pytest.raises(AudioFileError, match="empty.wav") as err:
        load_audio(empty)
    assert err.value.kind == "too_short"



def test_data_code_reports_bad_audio_as_data_error(tmp_path):
    """The encoders raise their own AudioFileError; the data layer's read_audio turns it into its DataError."""
    from hcustom_mc.data.encode import read_audio

    with pytest.raises(DataError, match="absent.wav") as err:
        read_audio(tmp_path / "absent.wav")
    assert err.value.kind == "missing"
    assert len(read_audio(_write_tone(tmp_path / "ok.wav", "pcm_s16le", 16000, 440.0), expected_rate=16000)) > 0