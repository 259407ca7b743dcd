"""Audio for AudioNet: decode a file to 16 kHz mono, then Whisper-encoder features per video frame.

The procedure follows the release (`data_kits/data_tools.py` + `encode_audio`, facts 2.4):
  * samples at 16 kHz; the feature extractor runs on 30 s chunks (480000 samples -> 3000 mel frames each),
    the chunks are concatenated along time;
  * release quirk kept on purpose: only the first 3000 mel frames (the first 30 s) reach the encoder,
    because the Whisper encoder has 1500 positions. Later video frames therefore see zero windows;
  * `output_hidden_states=True`; all hidden states (embeddings + every layer, 5 for whisper-tiny)
    are stacked -> encoder states [1500, layers+1, channels] (one state per 320 samples = 20 ms);
  * 4 zero states are prepended; video frame f (25 fps) takes states [2f, 2f+10), so a frame sees
    a 200 ms window that ends 120 ms after it; `audio_len = len(samples) // 640` frames are real,
    the rest of the requested frames are zero.
The DiT's side of the contract (what shapes it expects, and the paper's (f+K)*4 padding) lives in
`hcustom_mc.model.conditions`; this module only produces per-video-frame rows for it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from hcustom_mc.model.conditions import audio_frames_expected, pad_audio_features_paper

SAMPLE_RATE = 16000
CHUNK_SAMPLES = 480000  # 30 s; the extractor turns this into 3000 mel frames
ENCODER_MEL_FRAMES = 3000  # what the Whisper encoder accepts (1500 positions x conv stride 2)
SAMPLES_PER_STATE = 320  # one encoder state per 20 ms (160-sample hop x conv stride 2)
LEAD_ZEROS = 4  # zero states prepended before frame 0
WINDOW = 10  # encoder states per video frame


class AudioFileError(Exception):
    """An audio file that cannot be used, of one `kind`; the data code turns it into its DataError (same kind)."""

    def __init__(self, kind: str, path, reason: str):
        self.kind, self.path, self.reason = kind, str(path), reason
        super().__init__(f"{kind}: {path}: {reason}")


def load_audio(path: str | Path, sample_rate: int = SAMPLE_RATE, expected_rate: int | None = None) -> torch.Tensor:
    """Decode the first audio stream of any file PyAV reads -> float32 mono samples [N] at `sample_rate`.

    Bad files raise AudioFileError naming the path: "missing", "corrupt" (undecodable / no audio stream),
    "codec" (no decoder for the stream), "sample_rate" (native rate != `expected_rate`), "too_short" (no samples).
    """
    import av

    path = Path(path)
    if not path.is_file():
        raise AudioFileError("missing", path, "audio file does not exist")
    try:
        container = av.open(str(path))
    except av.error.FFmpegError as e:
        raise AudioFileError("corrupt", path, f"cannot open: {e}") from e
    try:
        if not container.streams.audio:
            raise AudioFileError("corrupt", path, "no audio stream")
        stream = container.streams.audio[0]
        native = stream.codec_context.sample_rate or stream.rate
        if expected_rate is not None and native != expected_rate:
            raise AudioFileError("sample_rate", path, f"native sample rate {native} Hz, data contract requires {expected_rate} Hz")
        # Resample keeping the channel layout (planar float -> [channels, n]) and downmix by averaging,
        # as librosa.load(mono=True) in the release does; swresample's own stereo->mono matrix would
        # scale by sqrt(1/2) per channel instead of 1/2.
        resampler = av.AudioResampler(format="fltp", rate=sample_rate)
        chunks = []
        try:
            for frame in container.decode(stream):
                chunks += [f.to_ndarray().mean(axis=0) for f in resampler.resample(frame)]
            chunks += [f.to_ndarray().mean(axis=0) for f in resampler.resample(None)]  # flush the resampler delay
        except av.error.FFmpegError as e:
            kind = "codec" if isinstance(e, getattr(av.error, "DecoderNotFoundError", ())) else "corrupt"
            raise AudioFileError(kind, path, f"decoding failed: {e}") from e
    finally:
        container.close()
    if not chunks or sum(c.size for c in chunks) == 0:
        raise AudioFileError("too_short", path, "no audio samples decoded")
    return torch.from_numpy(np.concatenate(chunks).astype(np.float32, copy=False))


def encoder_stride(fps: float) -> int:
    """Encoder states per video frame: 50 states/s divided by fps; must be a whole number."""
    if not fps > 0:
        raise ValueError(f"fps must be positive, got {fps}")
    stride = 50.0 / float(fps)
    if abs(stride - round(stride)) > 1e-9:
        raise ValueError(f"fps {fps} gives {stride:.4g} Whisper states per video frame; need an integer (e.g. 25, 12.5, 10)")
    return int(round(stride))


def frame_windows(states: torch.Tensor, num_frames: int, audio_len: int, stride: int = 2) -> torch.Tensor:
    """[T, ...] encoder states -> [num_frames, WINDOW, ...]: LEAD_ZEROS zeros prepended, frame f takes
    [stride*f, stride*f + WINDOW); frames >= audio_len and window parts past the end are zero."""
    padded = torch.cat([states.new_zeros(LEAD_ZEROS, *states.shape[1:]), states], dim=0)
    out = states.new_zeros(num_frames, WINDOW, *states.shape[1:])
    real = min(audio_len, num_frames)
    if real > 0:
        # Pad the tail so every real window is a full slice, then gather all windows at once.
        need = stride * (real - 1) + WINDOW
        if padded.shape[0] < need:
            padded = torch.cat([padded, padded.new_zeros(need - padded.shape[0], *padded.shape[1:])], dim=0)
        idx = stride * torch.arange(real)[:, None] + torch.arange(WINDOW)[None, :]
        out[:real] = padded[idx.to(padded.device)]
    return out


class WhisperAudioEncoder:
    """Whisper feature extractor + encoder (weights from a local folder) producing AudioNet inputs."""

    def __init__(self, feature_extractor, encoder, dtype: torch.dtype, device: torch.device):
        self.feature_extractor, self.encoder = feature_extractor, encoder
        self.dtype, self.device = dtype, torch.device(device)
        cfg = encoder.config
        self.num_states, self.channels = cfg.encoder_layers + 1, cfg.d_model

    @classmethod
    def from_pretrained(cls, path: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
        from transformers import WhisperFeatureExtractor, WhisperModel

        path = Path(path)
        if not path.is_dir():
            raise FileNotFoundError(f"Whisper folder {path} does not exist (weights are never downloaded)")
        fe = WhisperFeatureExtractor.from_pretrained(str(path), local_files_only=True)
        if fe.sampling_rate != SAMPLE_RATE:
            raise ValueError(f"{path}: feature extractor expects {fe.sampling_rate} Hz, AudioNet uses {SAMPLE_RATE}")
        # Only the encoder is used; the decoder is dropped right after loading.
        model = WhisperModel.from_pretrained(str(path), dtype=dtype, local_files_only=True)
        encoder = model.get_encoder().to(device).eval()
        return cls(fe, encoder, dtype, device)

    def mel_features(self, samples: torch.Tensor) -> torch.Tensor:
        """[N] 16 kHz samples -> [1, n_mels, 3000 * chunks]: 30 s chunks, each padded to 3000 frames."""
        audio = samples.detach().float().cpu().numpy()
        chunks = [
            self.feature_extractor(audio[i : i + CHUNK_SAMPLES], sampling_rate=SAMPLE_RATE, return_tensors="pt").input_features
            for i in range(0, max(len(audio), 1), CHUNK_SAMPLES)
        ]
        return torch.cat(chunks, dim=-1)

    @torch.no_grad()
    def encoder_states(self, samples: torch.Tensor) -> torch.Tensor:
        """[N] samples -> [1500, layers+1, channels]; only the first 30 s are encoded (release quirk)."""
        feats = self.mel_features(samples)[:, :, :ENCODER_MEL_FRAMES]
        out = self.encoder(feats.to(self.device, self.dtype), output_hidden_states=True)
        return torch.stack(out.hidden_states, dim=2)[0]

    def per_frame_features(self, samples: torch.Tensor, num_frames: int, fps: float = 25) -> torch.Tensor:
        """[N] samples -> [num_frames, 10, layers+1, channels]; frames past the audio are zero."""
        stride = encoder_stride(fps)
        audio_len = samples.shape[-1] // (SAMPLES_PER_STATE * stride)  # 640 samples per frame at 25 fps
        if audio_len == 0:
            return torch.zeros(num_frames, WINDOW, self.num_states, self.channels, dtype=self.dtype, device=self.device)
        return frame_windows(self.encoder_states(samples), num_frames, audio_len, stride)

    def features_for_latents(
        self, samples: torch.Tensor, latent_frames: int, num_identity: int = 1, mode: str = "release", fps: float = 25
    ) -> torch.Tensor:
        """Rows the DiT expects for `latent_frames`: 4(f-1)+1 video frames (release), zero-padded in
        front to (f+K)*4 with conditions.pad_audio_features_paper (paper). Returns [rows, 10, L, C]."""
        frames = 4 * (latent_frames - 1) + 1
        feats = self.per_frame_features(samples, frames, fps)
        if mode == "paper":
            feats = pad_audio_features_paper(feats[None], latent_frames, num_identity)[0]
        elif mode != "release":
            raise ValueError(f"mode must be 'release' or 'paper', got {mode!r}")
        assert feats.shape[0] == audio_frames_expected(latent_frames, num_identity, mode)
        return feats


def save_tiny_whisper(folder: str | Path, d_model: int = 8, layers: int = 1, seed: int = 0) -> Path:
    """A tiny random WhisperModel + feature extractor saved like a real checkpoint folder (for tests)."""
    from transformers import WhisperConfig, WhisperFeatureExtractor, WhisperModel

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    cfg = WhisperConfig(
        vocab_size=16, num_mel_bins=80, d_model=d_model, encoder_layers=layers, decoder_layers=1,
        encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=2 * d_model, decoder_ffn_dim=2 * d_model,
        max_source_positions=1500, max_target_positions=8, pad_token_id=0, bos_token_id=1, eos_token_id=2,
        decoder_start_token_id=1, suppress_tokens=[], begin_suppress_tokens=[],
    )
    torch.manual_seed(seed)
    WhisperModel(cfg).save_pretrained(str(folder))
    WhisperFeatureExtractor(feature_size=80, sampling_rate=SAMPLE_RATE).save_pretrained(str(folder))
    return folder


__all__ = [
    "SAMPLE_RATE", "WINDOW", "LEAD_ZEROS", "WhisperAudioEncoder", "encoder_stride", "frame_windows",
    "load_audio", "save_tiny_whisper",
]
