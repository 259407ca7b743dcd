import os

import pytest
import torch

from bench.checkout import use_checkout

use_checkout()  # this checkout's hcustom_mc and hcustom_kernels, installed or not

os.environ.setdefault("OMP_NUM_THREADS", "1")
HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    # Triton kernels run in the interpreter on CPU; triton reads this when a kernel is decorated
    os.environ.setdefault("TRITON_INTERPRET", "1")
# How the kernels/ modules are built in this process: triton.jit reads TRITON_INTERPRET once, when it
# decorates a kernel (at import, after this file), so one process holds interpreted kernels (CPU
# tensors only work there) or compiled ones (CUDA tensors only), never both.
KERNELS_INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"
NEEDS_CUDA = "needs CUDA (torch.cuda.is_available() is False on this host)"


def mcore_writes_common_pt() -> bool:
    """Whether this megatron-core saves the common state as common.pt (0.16); 0.19 writes it into the .distcp
    files (and still reads a common.pt it finds, so tests plant one there)."""
    from megatron.core.dist_checkpointing import serialization

    return not hasattr(serialization, "load_common_state_dict")


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU; skipped without one (run them with `pytest -m gpu`)")
    config.addinivalue_line("markers", "slow: long trials (minutes); run with `-m slow` or HCUSTOM_RUN_SLOW=1")


def pytest_collection_modifyitems(config, items):
    no_cuda = pytest.mark.skip(reason=NEEDS_CUDA)
    # the default run stays short: slow tests run only when asked for
    run_slow = "slow" in (config.option.markexpr or "") or os.environ.get("HCUSTOM_RUN_SLOW") == "1"
    not_asked = pytest.mark.skip(reason="slow: run with -m slow or HCUSTOM_RUN_SLOW=1")
    for item in items:
        if not HAS_CUDA and item.get_closest_marker("gpu") is not None:
            item.add_marker(no_cuda)
        if not run_slow and item.get_closest_marker("slow") is not None:
            item.add_marker(not_asked)


@pytest.fixture(params=["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def device(request) -> torch.device:
    """Every device of this host: the CPU always, CUDA when present (the cuda variant is a `gpu` test)."""
    return torch.device(request.param)


@pytest.fixture
def kernel_device(device) -> torch.device:
    """`device`, where this process's Triton kernels can run on it: the interpreter on CPU tensors,
    compiled kernels on CUDA tensors."""
    if device.type == "cpu" and not KERNELS_INTERPRETED:
        pytest.skip("Triton kernels are compiled in this process (CUDA host, TRITON_INTERPRET unset) and cannot "
                    "take CPU tensors; run with TRITON_INTERPRET=1 for the interpreter variant")
    if device.type == "cuda" and KERNELS_INTERPRETED:
        pytest.skip("TRITON_INTERPRET=1: the kernels are interpreted in this process; the cuda variant tests the "
                    "compiled kernels (run without TRITON_INTERPRET)")
    return device


@pytest.fixture(scope="session")
def single_process():
    """A world of one (gloo on CPU, NCCL on a CUDA host) with megatron parallel_state at TP=PP=CP=1."""
    from hcustom_mc.parallel.config import ParallelConfig
    from hcustom_mc.parallel.state import initialize_parallel

    torch.manual_seed(0)
    return initialize_parallel(ParallelConfig())


def tiny_inputs(cfg, batch=2, frames=3, height=4, width=6, text_len=7, identity=1, seed=0, padded=True,
                device="cpu"):
    """Random model inputs for a tiny config (second sample's text is padded), on `device`."""
    from hcustom_mc.model.conditions import audio_frames_expected

    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(batch, text_len, dtype=torch.long)
    if padded and batch > 1:
        mask[1, text_len - 3 :] = 0
    inputs = dict(
        latents=torch.randn(batch, cfg.in_channels, frames, height, width, generator=g),
        timestep=torch.rand(batch, generator=g) * 1000,
        text_states=torch.randn(batch, text_len, cfg.text_dim, generator=g),
        text_mask=mask,
        text_pooled=torch.randn(batch, cfg.pooled_text_dim, generator=g),
    )
    if cfg.guidance_embed:
        inputs["guidance"] = torch.full((batch,), 6000.0)
    if identity:
        inputs["identity_latents"] = torch.randn(batch, cfg.in_channels, identity, height, width, generator=g)
    if cfg.audio:
        n = audio_frames_expected(frames, identity, cfg.mode)
        inputs["audio_features"] = torch.randn(batch, n, cfg.audio_window, cfg.audio_layers, cfg.audio_channels, generator=g)
    if cfg.video_condition:
        inputs["video_condition"] = torch.randn(batch, cfg.video_condition_channels, frames, height, width, generator=g)
    return {k: v.to(device) for k, v in inputs.items()}
