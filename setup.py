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
    python_requires=">=3.10",
    packages=find_packages(include=["hcustom_mc", "hcustom_mc.*", "kernels", "kernels.*"]),
    ext_modules=[bucket_index],
    install_requires=[
        "torch>=2.4",
        "megatron-core>=0.16",
        "triton>=3.0; platform_system == 'Linux'",
        "einops>=0.7",
        # the MLflow client; sqlalchemy + alembic give it the embedded sqlite store (`pip install mlflow` adds the UI)
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
    ],
    extras_require={
        "gpu": ["transformer-engine[pytorch]>=1.12", "flash-attn>=2.6", "nvidia-dali-cuda130>=2.0"],
        # diffusers/transformers build the reference models and the tiny encoders; DALI's CPU path is tested
        "dev": ["pytest>=8", "diffusers>=0.32", "transformers>=4.45", "nvidia-dali-cuda130>=2.0"],
        # `mlflow ui` (the training summary prints the command): the full package, with its server (flask)
        "ui": ["mlflow>=3.0"],
    },
)
