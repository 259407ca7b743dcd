import os

import pytest
import torch

os.environ.setdefault("OMP_NUM_THREADS", "1")
if not torch.cuda.is_available():
    # Triton kernels run in the interpreter on CPU; triton reads this when a kernel is decorated
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: long variants, left out of the default run (-m 'not slow')")


@pytest.fixture(scope="session")
def single_process():
    """A world of one (gloo) with megatron parallel_state initialised at TP=PP=CP=1."""
    from hcustom_mc.parallel.config import ParallelConfig
    from hcustom_mc.parallel.state import initialize_parallel

    torch.manual_seed(0)
    return initialize_parallel(ParallelConfig())


def tiny_inputs(cfg, batch=2, frames=3, height=4, width=6, text_len=7, identity=1, seed=0, padded=True):
    """Random model inputs for a tiny config (second sample's text is padded)."""
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
    return inputs
