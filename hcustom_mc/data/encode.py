"""One manifest sample -> the latent-space sample the DiT trains on (shared by online training and preprocessing).

    video clip  -> VAE latents                      latents          [C, f, h, w]
    caption (+ subject words and images) -> LLaVA   text_states      [L, D], text_mask [L]
    caption     -> CLIP-L pooled                    text_pooled      [P]
    identity images (white-padded to the bucket)    identity_latents [C, K, h, w]
    audio (16 kHz) -> Whisper windows per frame     audio_features   [N, 10, layers, channels]
    source video * (1 - mask) ++ mask -> VAE        video_condition  [2C, f, h, w]

Every random choice (clip start, VAE posterior sample) is a function of (seed, sample position), so the
same sample encodes to the same tensors on every rank, in every run, online or preprocessed.
"""

from __future__ import annotations

import logging
import zlib
from dataclasses import dataclass

import torch

from hcustom_mc.data.errors import DataError
from hcustom_mc.data.manifest import ManifestEntry
from hcustom_mc.data.video import bucket_for, choose_start, probe_video, read_clip, read_image, read_mask_clip
from hcustom_mc.model.conditions import pad_audio_features_paper

log = logging.getLogger(__name__)

AUDIO_FPS = 25.0  # the Whisper window arithmetic (2 encoder frames per video frame) assumes 25 fps


@dataclass(frozen=True)
class ClipSpec:
    frames: int  # pixel frames, 4k+1
    stride: int
    short_side: int
    backend: str = "auto"
    audio_rate: int | None = None  # required native sample rate of audio files; None = resample any


def sample_shape(entry: ManifestEntry, spec: ClipSpec) -> tuple[int, int]:
    """The bucket (H, W) of a sample, from the manifest's metadata or by probing the video."""
    if entry.height and entry.width:
        return bucket_for(entry.height, entry.width, spec.short_side)
    info = probe_video(entry.video)
    return bucket_for(info.height, info.width, spec.short_side)


def group_key(task: str, size: tuple[int, int], frames: int, num_identity: int) -> str:
    """Samples with equal keys have equal tensor shapes, so they may share a batch."""
    return f"{task}|{size[0]}x{size[1]}|{frames}f|{num_identity}id"


def editing_condition(source: torch.Tensor, mask: torch.Tensor, encode) -> torch.Tensor:
    """The release's video condition: VAE(source with the masked region black, pixel 0) ++ VAE(the mask as 3
    channels in [-1, 1]) on channels. source [3, F, H, W] in [-1, 1], mask [1, F, H, W] in {0, 1};
    encode(pixels, tag) -> latents [C, f, h, w] (the tag names the input for seeding)."""
    masked = (source + 1) * (1 - mask) - 1
    return torch.cat([encode(masked, "masked"), encode((mask * 2 - 1).expand_as(source), "mask")], 0)


def read_audio(path, sample_rate: int = 16000, expected_rate: int | None = None) -> torch.Tensor:
    """The encoders' `load_audio`, with a bad file reported as the data layer's DataError (same kind and path)."""
    from hcustom_mc.encoders.audio import AudioFileError, load_audio

    try:
        return load_audio(path, sample_rate=sample_rate, expected_rate=expected_rate)
    except AudioFileError as exc:
        raise DataError(exc.kind, exc.path, exc.reason) from exc


def _generator(seed: int, position: int, what: str) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32(f"{what}:{seed}:{position}".encode()))


class SampleEncoder:
    """Holds the encoders (loaded once) and encodes manifest entries."""

    def __init__(self, encoders, mode: str, text_len: int, max_identity: int, spec: ClipSpec, seed: int,
                 device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
        from hcustom_mc.encoders.text import ClipTextEncoder, LlavaTextEncoder
        from hcustom_mc.encoders.vae import VideoVAE

        self.mode, self.spec, self.seed, self.device = mode, spec, seed, torch.device(device)
        self.max_identity = max_identity
        self.llava = LlavaTextEncoder.from_pretrained(encoders.llava, mode=mode, dtype=dtype, device=device,
                                                      text_len=text_len, max_subjects=max_identity)
        self.clip = ClipTextEncoder.from_pretrained(encoders.clip, dtype=dtype, device=device)
        self.vae = VideoVAE.from_pretrained(encoders.vae, dtype=dtype, device=device)
        self.whisper = None
        if encoders.whisper:
            from hcustom_mc.encoders.audio import WhisperAudioEncoder

            self.whisper = WhisperAudioEncoder.from_pretrained(encoders.whisper, dtype=dtype, device=device)

    # --------------------------------------------------------------- pieces
    def _vae(self, pixels: torch.Tensor, position: int, what: str) -> torch.Tensor:
        g = _generator(self.seed, position, what)
        return self.vae.encode(pixels[None].to(self.device), generator=g)[0].float().cpu()

    def _subject_images(self, entry: ManifestEntry):
        from PIL import Image

        out = []
        for subject in entry.subjects:
            try:
                with Image.open(subject.image) as im:
                    out.append((subject.name, im.convert("RGB")))
            except FileNotFoundError:
                raise DataError("missing", subject.image, "identity image not found") from None
            except Exception as exc:  # PIL raises several types for unreadable files
                raise DataError("image", subject.image, f"unreadable image: {exc}") from None
        return out

    def _audio(self, entry: ManifestEntry, start: int, fps: float, latent_frames: int, num_identity: int):
        if self.whisper is None:
            raise ValueError(f"sample {entry.id} has audio but data.encoders.whisper is not set")
        samples = read_audio(entry.audio, sample_rate=16000, expected_rate=self.spec.audio_rate)
        if not fps > 0:
            raise DataError("mismatch", entry.video, "the video has no frame rate: cannot align its audio")
        offset = int(round(start / fps * 16000))  # the clip's first frame, in audio samples
        clip_fps = fps / self.spec.stride
        if abs(clip_fps - AUDIO_FPS) > 1e-3:
            raise DataError("mismatch", entry.video, f"audio samples need {AUDIO_FPS:g} fps clips, got {clip_fps:g} "
                            f"(source {fps:g} fps / stride {self.spec.stride})")
        feats = self.whisper.per_frame_features(samples[offset:], num_frames=self.spec.frames, fps=clip_fps)
        if self.mode == "paper":
            feats = pad_audio_features_paper(feats[None], latent_frames, num_identity)[0]
        return feats.float().cpu()

    # --------------------------------------------------------------- sample
    def encode(self, entry: ManifestEntry, position: int) -> dict[str, torch.Tensor]:
        spec = self.spec
        info = probe_video(entry.video)
        size = bucket_for(info.height, info.width, spec.short_side)
        if size != sample_shape(entry, spec):  # stale manifest metadata would put it in the wrong batch shape
            raise DataError("mismatch", entry.video, f"video is {info.height}x{info.width} (bucket {size}) but the "
                            f"manifest says {entry.height}x{entry.width} (bucket {sample_shape(entry, spec)})")
        if entry.task == "editing":  # source and mask are read at the target's clip start: same frames, same size
            for other in (entry.source_video, entry.mask_video):
                o = probe_video(other)
                if (o.num_frames, o.height, o.width) != (info.num_frames, info.height, info.width):
                    raise DataError("mismatch", other, f"{o.num_frames} frames of {o.height}x{o.width}, the video "
                                    f"{entry.video} has {info.num_frames} of {info.height}x{info.width}")
        start = choose_start(info.num_frames, spec.frames, spec.stride, self.seed, position, path=str(entry.video))
        video = read_clip(entry.video, spec.frames, spec.stride, size=size, start=start, backend=spec.backend)
        latents = self._vae(video, position, "video")
        subjects = self._subject_images(entry)
        if len(subjects) > self.max_identity:
            raise DataError("mismatch", entry.video, f"{len(subjects)} identity images, the model takes at most "
                            f"{self.max_identity} (mode {self.mode})")
        try:
            states, mask = self.llava.encode([entry.caption], [subjects])
        except ValueError as exc:  # a caption too long for text_len would lose its identity phrase
            raise DataError("caption", entry.video, str(exc)) from None
        sample = {"latents": latents, "text_states": states[0].float().cpu(), "text_mask": mask[0].long().cpu(),
                  "text_pooled": self.clip.encode([entry.caption])[0].float().cpu()}
        if subjects:
            ids = [self._vae(read_image(s.image, size=size, fit="pad")[:, None], position, f"identity{k}")
                   for k, s in enumerate(entry.subjects)]
            sample["identity_latents"] = torch.cat(ids, dim=1)  # [C, K, h, w]: one latent frame per image
        if entry.task == "audio":
            sample["audio_features"] = self._audio(entry, start, info.fps, latents.shape[1], len(subjects))
        if entry.task == "editing":
            source = read_clip(entry.source_video, spec.frames, spec.stride, size=size, start=start, backend=spec.backend)
            mask = read_mask_clip(entry.mask_video, spec.frames, spec.stride, size=size, start=start,
                                  backend=spec.backend).to(source.device)
            sample["video_condition"] = editing_condition(source, mask,
                                                          lambda pixels, tag: self._vae(pixels, position, tag))
        return sample
