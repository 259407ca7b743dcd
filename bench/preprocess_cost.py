"""What preprocessing a dataset for a recipe costs: shard bytes per clip and encoder FLOPs per clip.

    python bench/preprocess_cost.py --config examples/13b/audio_720p_64gpu.yaml   # about a minute on CPU
    python bench/preprocess_cost.py --config examples/13b/audio_720p_64gpu.yaml --clips 100000 --gpus 64

Nothing is downloaded and no real encoder runs:
  bytes  one record of the recipe's tensor shapes (latents, LLaVA states and mask, CLIP pooled, identity latents,
         Whisper features or the editing condition, as tools/preprocess.py stores them) written by the real shard
         writer (hcustom_mc.data.shards) and measured on disk;
  FLOPs  counted by torch's FlopCounterMode on meta tensors (shapes only): the causal 3D VAE (diffusers'
         AutoencoderKLHunyuanVideo, HunyuanVideo's architecture) encoding the clip with the tiling the encoders use,
         and LLaVA's language model (Llama-3-8B's shape) over the prompt with its inline image tokens. CLIP-L
         (77 tokens) and whisper-tiny are under 1% of that and left out, as is CLIP's vision tower on the identity
         image (about 0.2 TFLOP).
Seconds are FLOPs / (peak x --mfu): an estimate, not a GPU measurement.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.checkout import use_checkout  # noqa: E402

use_checkout()  # hcustom_kernels from kernels/ when the checkout is not installed

LLAMA3_8B = dict(vocab_size=128320, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                 num_attention_heads=32, num_key_value_heads=8)  # llava-llama-3-8b-v1_1's language model
IMAGE_TOKENS = 576  # CLIP ViT-L/14 at 336 px: one <image> becomes 24 x 24 features inline
CROP_START = 95  # the release's video template tokens before the prompt (cropped from the states)


def record_shapes(cfg, model_cfg, latent_shape: tuple, task: str, identity: int) -> dict[str, tuple]:
    """The tensors tools/preprocess.py stores for one clip of `task` (hcustom_mc.data.encode.SampleEncoder);
    latent_shape = (C, f, h, w) of the clip's VAE latents."""
    from hcustom_mc.model.conditions import audio_frames_expected

    _, f, h, w = latent_shape
    text = cfg.data.text_len + identity * (IMAGE_TOKENS - 1)
    shapes = {"latents": (model_cfg.in_channels, f, h, w), "text_states": (text, model_cfg.text_dim),
              "text_mask": (text,), "text_pooled": (model_cfg.pooled_text_dim,)}
    if identity:
        shapes["identity_latents"] = (model_cfg.in_channels, identity, h, w)
    if task == "audio":
        shapes["audio_features"] = (audio_frames_expected(f, identity, model_cfg.mode), model_cfg.audio_window,
                                    model_cfg.audio_layers, model_cfg.audio_channels)
    if task == "editing":
        shapes["video_condition"] = (model_cfg.video_condition_channels, f, h, w)
    return shapes


def shard_bytes(shapes: dict[str, tuple], dtype: torch.dtype) -> int:
    """Bytes on disk of one record with these shapes, written by the project's shard writer."""
    from hcustom_mc.data.shards import write_shard

    tensors = {k: torch.zeros(s, dtype=torch.long if k == "text_mask" else dtype) for k, s in shapes.items()}
    with tempfile.TemporaryDirectory() as tmp:
        path = write_shard(tmp, 0, [{"id": "clip", "task": "t", "group": "g", "tensors": tensors}])
        return path.stat().st_size


def vae_encode_flops(frames: int, height: int, width: int) -> tuple[float, tuple]:
    """(FLOPs, latent shape [C, f, h, w]) of encoding one clip."""
    from diffusers import AutoencoderKLHunyuanVideo
    from torch.utils.flop_counter import FlopCounterMode

    from hcustom_mc.encoders.vae import VideoVAE

    with torch.device("meta"):
        model = AutoencoderKLHunyuanVideo()
    VideoVAE(model, tiling=True)  # the tiles the encoders use
    with FlopCounterMode(display=False) as counter:
        latents = model.encode(torch.empty(1, 3, frames, height, width, device="meta")).latent_dist.mode()
    return float(counter.get_total_flops()), tuple(latents.shape[1:])


def llava_flops(prompt_tokens: int) -> float:
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import LlamaConfig, LlamaModel

    with torch.device("meta"):
        model = LlamaModel(LlamaConfig(**LLAMA3_8B))
    with FlopCounterMode(display=False) as counter:
        model(input_ids=torch.zeros(1, prompt_tokens, dtype=torch.long, device="meta"))
    return float(counter.get_total_flops())


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python bench/preprocess_cost.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="a training recipe (its data sizes, tasks and model)")
    p.add_argument("--set", action="append", default=[], help="training-config overrides, KEY=VALUE (default: none)")
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"),
                   help="tools/preprocess.py --dtype (default: bfloat16)")
    p.add_argument("--peak-tflops", type=float, default=989.0, help="per-GPU dense bf16 peak (default: 989, H100)")
    p.add_argument("--mfu", type=float, default=0.4, help="assumed utilisation of the encoders (default: 0.4)")
    p.add_argument("--clips", type=int, default=0, help="dataset size, for totals (default: 0: per clip only)")
    p.add_argument("--gpus", type=int, default=1, help="GPUs preprocessing in parallel, for the total time (default: 1)")
    args = p.parse_args(argv)

    from hcustom_mc.data.buckets import bucket_for
    from hcustom_mc.training.config import build_config

    cfg = build_config(["--config", args.config, *[x for kv in args.set for x in ("--set", kv)]])
    model_cfg = cfg.model_config()
    height, width = sorted(bucket_for(9, 16, cfg.data.short_side))  # the landscape 16:9 bucket, e.g. 720x1280
    tasks = sorted(t for t, w in cfg.data.task_weights.items() if w > 0)
    dtype = getattr(torch, args.dtype)
    t0 = time.time()
    vae, latent_shape = vae_encode_flops(cfg.data.frames, height, width)
    image, _ = vae_encode_flops(1, height, width)
    print(f"preprocessing cost of {args.config}: {width}x{height} x {cfg.data.frames} frames, tasks {', '.join(tasks)}, "
          f"{args.dtype} shards (FLOPs counted on meta tensors in {time.time() - t0:.0f} s; seconds at "
          f"{args.mfu:.0%} of {args.peak_tflops:g} TFLOP/s are an estimate)")
    print(f"{'task':<10} {'bytes/clip':>12} {'GB/64-clip shard':>17} {'VAE TFLOP':>10} {'LLaVA TFLOP':>12} {'s/clip/GPU':>11}")
    for task in tasks:
        identity = 0 if task == "t2v" else 1
        shapes = record_shapes(cfg, model_cfg, latent_shape, task, identity)
        size = shard_bytes(shapes, dtype)
        video = vae * (3 if task == "editing" else 1) + identity * image  # editing: target, masked source, mask
        text = llava_flops(CROP_START + shapes["text_states"][0])
        seconds = (video + text) / (args.peak_tflops * 1e12 * args.mfu)
        print(f"{task:<10} {size:12d} {64 * size / 1e9:17.2f} {video / 1e12:10.3f} {text / 1e12:12.3f} "
              f"{seconds:11.2f}")
        if args.clips:
            print(f"  {args.clips} clips: {args.clips * size / 1e12:.2f} TB of shards, "
                  f"{args.clips * seconds / args.gpus / 3600:.1f} h on {args.gpus} GPUs")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
