"""What the data pipeline reads from the training config: the tasks, the encoder folders and the data settings.

Here, not in training/, so that data/ and inference/ never import the training layer; training/config.py
holds these dataclasses inside TrainConfig (`data.*` fields and flags).
"""

from __future__ import annotations

from dataclasses import dataclass, field

TASKS = ("t2v", "identity", "multi_identity", "audio", "editing")


@dataclass
class EncoderPaths:
    """Local folders of the condition encoders (online encoding and tools/preprocess.py); none is downloaded."""

    llava: str | None = None  # LlavaForConditionalGeneration + tokenizer (llava-llama-3-8b-v1_1)
    clip: str | None = None  # CLIP-L text model + tokenizer
    whisper: str | None = None  # whisper-tiny (feature extractor + model); audio task only
    vae: str | None = None  # diffusers AutoencoderKLHunyuanVideo folder, or the released pytorch_model.pt + config.json


@dataclass
class DataConfig:
    dataset: str = "synthetic"  # synthetic | shards (tools/preprocess.py output) | manifest (raw files, online encoding)
    path: str | None = None  # shards: the shard folder; manifest: the manifest.jsonl file
    encoders: EncoderPaths = field(default_factory=EncoderPaths)
    num_samples: int = 256  # synthetic only
    frames: int = 5  # pixel frames per clip (4k+1); latent frames = (frames-1)/4 + 1
    frame_stride: int = 1  # real data: take every n-th source frame
    short_side: int = 512  # real data: bucket short side in pixels (buckets 1:1, 3:4, 9:16 and transposes)
    video_backend: str = "auto"  # auto | dali-gpu | dali-cpu | pyav
    encoder_dtype: str = "auto"  # auto (fp16 on GPU, fp32 on CPU) | float32 | float16 | bfloat16
    audio_rate: int | None = None  # demand this native audio rate (other rates = bad data); None resamples any
    latent_height: int = 4  # synthetic only
    latent_width: int = 4
    text_len: int = 8  # synthetic: caption tokens; real data: LLaVA prompt tokens (256 in the release)
    task_weights: dict[str, float] = field(default_factory=lambda: {"t2v": 1.0, "identity": 1.0})
    text_drop: float = 0.1  # condition dropout for classifier-free guidance (see hcustom_mc/data/nulls.py)
    null_prompt: str = ""  # dropped text = this prompt's encoding (the sampler's unconditional branch)
    identity_drop: float = 0.05
    audio_drop: float = 0.05
    max_bad_sample_retries: int = 8  # real data: replacements tried for a broken sample before giving up
    check_shards: bool = False  # shards: read every tensor at start and treat NaN/inf samples as bad data
    seed: int = 1234
