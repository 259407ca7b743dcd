"""The CPU compatibility layer: megatron-core schedules, DDP, distributed optimizer and dist-checkpoint
on gloo equal plain PyTorch (on any host: the ranks are told HCUSTOM_DIST_BACKEND=gloo); and the layer
does nothing when the process computes on CUDA."""

import os
import subprocess
import sys

import pytest
import torch

from hcustom_mc.device import BACKEND_ENV, uses_cuda
from tests.torchrun import REPO, child_pythonpath, torchrun

SCRIPT = REPO / "tests" / "dist_scripts" / "cpu_compat_check.py"
GLOO = {BACKEND_ENV: "gloo"}
# in-process tests install the shims into this pytest process's megatron for good: only where it computes on CPU
in_process_cpu_only = pytest.mark.skipif(uses_cuda(), reason="would patch megatron-core for the rest of this CUDA "
                                         "test process; the torchrun tests cover the layer on this host")


def test_pipeline_1f1b_and_interleaved_equal_single_process():
    out = torchrun(2, SCRIPT, "pipeline", env=GLOO)
    assert "pipeline vpp=None OK pipeline vpp=2 OK" in out


def test_ddp_distributed_optimizer_equals_torch_adam():
    assert "ddp OK" in torchrun(2, SCRIPT, "ddp", env=GLOO)


def test_dist_checkpoint_save_load_and_reshard(tmp_path):
    assert "checkpoint OK" in torchrun(2, SCRIPT, "checkpoint", tmp_path, env=GLOO)


def test_sequence_parallel_collectives_and_linears_on_gloo():
    assert "sequence OK" in torchrun(2, SCRIPT, "sequence", env=GLOO)


def test_noop_when_cuda_is_available():
    code = """
import importlib, torch
torch.cuda.is_available = lambda: True
from hcustom_mc.parallel import cpu_compat
assert cpu_compat.install_cpu_compat() is False and not cpu_compat.cpu_compat_active()
for name in cpu_compat.PATCHED_MODULES:
    try:
        mod = importlib.import_module(name)
    except ImportError:
        continue
    assert getattr(mod, "torch", torch) is torch, name
from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer
from megatron.core.pipeline_parallel import p2p_communication
assert not hasattr(DistributedOptimizer.__init__, "__hcustom_cpu_compat__")
assert not hasattr(p2p_communication._batched_p2p_ops, "__hcustom_cpu_compat__")
print("untouched")
"""
    env = {**{k: v for k, v in os.environ.items() if k != BACKEND_ENV}, "PYTHONPATH": child_pythonpath()}
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "untouched" in proc.stdout, proc.stderr[-3000:]


@in_process_cpu_only
def test_proxy_maps_cuda_to_cpu_only_inside_megatron():
    from hcustom_mc.parallel.cpu_compat import _cuda_type_names, install_cpu_compat

    assert install_cpu_compat() is True and install_cpu_compat() is True  # idempotent
    from megatron.core.pipeline_parallel import schedules

    t = schedules.torch.zeros([], dtype=torch.int, device="cuda")
    assert t.device.type == "cpu"
    assert schedules.torch.cuda.current_device() == torch.device("cpu")
    assert schedules.torch.cuda.is_available() is False  # megatron's own CUDA checks take the CPU branch
    assert torch.zeros(1).type() == "torch.FloatTensor"  # the real torch is untouched
    with _cuda_type_names():
        assert torch.zeros(1).type() == "torch.cuda.FloatTensor"
        assert torch.zeros(1, dtype=torch.bfloat16).type() == "torch.cuda.BFloat16Tensor"
    assert torch.zeros(1).type() == "torch.FloatTensor"
    with pytest.raises((AssertionError, RuntimeError)):  # plain torch still has no CUDA
        torch.zeros(1, device="cuda")
