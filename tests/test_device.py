"""The one device decision (hcustom_mc.device): backend and compute device from CUDA's presence and the
HCUSTOM_DIST_BACKEND override, its errors, the test launcher's choice of gloo when ranks outnumber GPUs,
and a 2-process run under the override that keeps every tensor on the CPU (on a CUDA host too)."""

import json
import os
import subprocess
import sys

import pytest
import torch

from hcustom_mc import device as D
from tests import torchrun as tr
from tests.torchrun import REPO, child_pythonpath, torchrun


@pytest.fixture
def host(monkeypatch):
    """Pretend a host with `n` GPUs (0 = none); the override starts unset."""
    monkeypatch.delenv(D.BACKEND_ENV, raising=False)

    def set_gpus(n: int):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: n > 0)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: n)
        monkeypatch.setattr(torch.cuda, "current_device", lambda: n - 1)  # the last GPU, to see the index used

    return set_gpus


@pytest.mark.parametrize("gpus, forced, backend, device", [
    (0, None, "gloo", "cpu"),
    (1, None, "nccl", "cuda:0"),
    (2, None, "nccl", "cuda:1"),
    (1, "gloo", "gloo", "cpu"),        # a CUDA host told to stay on the CPU
    (0, "gloo", "gloo", "cpu"),
    (1, " NCCL ", "nccl", "cuda:0"),  # case and spaces do not matter
    (2, "nccl", "nccl", "cuda:1"),
    (1, "", "nccl", "cuda:0"),         # empty = unset
])
def test_backend_and_device(host, monkeypatch, gpus, forced, backend, device):
    host(gpus)
    if forced is not None:
        monkeypatch.setenv(D.BACKEND_ENV, forced)
    assert D.dist_backend() == backend
    assert D.uses_cuda() is (backend == "nccl")
    assert D.compute_device() == torch.device(device)
    assert D.resolve_device(None) == torch.device(device)


def test_bad_value_is_an_error(host, monkeypatch):
    host(1)
    monkeypatch.setenv(D.BACKEND_ENV, "mpi")
    with pytest.raises(ValueError, match=r"HCUSTOM_DIST_BACKEND='mpi': expected one of nccl, gloo"):
        D.dist_backend()
    with pytest.raises(ValueError):
        D.compute_device()


def test_nccl_without_cuda_is_an_error(host, monkeypatch):
    host(0)
    monkeypatch.setenv(D.BACKEND_ENV, "nccl")
    with pytest.raises(RuntimeError, match="HCUSTOM_DIST_BACKEND=nccl but CUDA is not available"):
        D.dist_backend()
    with pytest.raises(RuntimeError):
        D.uses_cuda()


def test_explicit_devices_and_local_rank(host, monkeypatch):
    host(2)
    assert D.resolve_device("cpu") == torch.device("cpu")
    assert D.resolve_device("cuda") == torch.device("cuda", 1)  # a bare 'cuda' gets this rank's GPU
    assert D.resolve_device("cuda:0") == torch.device("cuda", 0)
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert D.local_cuda_index() == 1  # 3 mod 2 GPUs


def test_misplaced_names_strays():
    m = torch.nn.Linear(2, 2)
    assert D.misplaced(m, "cpu") == []
    assert D.misplaced(m, "meta") == ["weight (cpu)", "bias (cpu)"]
    assert D.place_module(m, "cpu") is m


@pytest.mark.parametrize("gpus, nproc, given, expected", [
    (0, 2, {}, {"HCUSTOM_DIST_BACKEND": "gloo"}),
    (0, 1, {}, {"HCUSTOM_DIST_BACKEND": "gloo"}),
    (1, 2, {}, {"HCUSTOM_DIST_BACKEND": "gloo"}),  # two ranks never share one GPU through NCCL
    (1, 1, {}, {}),                                # one rank per GPU: the default (NCCL)
    (8, 8, {}, {}),
    (1, 2, {"HCUSTOM_DIST_BACKEND": "nccl"}, {}),  # the caller's env wins
])
def test_launcher_chooses_gloo_when_ranks_outnumber_gpus(host, gpus, nproc, given, expected):
    host(gpus)
    assert tr.backend_env(nproc, given) == expected


def test_launcher_passes_this_process_override_on(host, monkeypatch):
    host(4)
    monkeypatch.setenv(D.BACKEND_ENV, "gloo")
    assert tr.backend_env(2) == {D.BACKEND_ENV: "gloo"}


def test_cpu_layer_is_installed_for_gloo_on_a_cuda_host():
    code = """
import torch
torch.cuda.is_available = lambda: True
from hcustom_mc.parallel import cpu_compat
assert cpu_compat.install_cpu_compat() is True and cpu_compat.cpu_compat_active()
from megatron.core.pipeline_parallel import schedules
assert schedules.torch.cuda.is_available() is False
assert schedules.torch.zeros(1, device="cuda").device.type == "cpu"
print("installed")
"""
    env = {**os.environ, D.BACKEND_ENV: "gloo", "PYTHONPATH": child_pythonpath()}
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "installed" in proc.stdout, proc.stderr[-3000:]


def test_two_ranks_under_gloo_override_keep_everything_on_cpu(tmp_path):
    """Two training steps of the project's loop on 2 ranks with HCUSTOM_DIST_BACKEND=gloo. On a CUDA
    host this is the path a one-GPU machine takes for multi-process tests: CUDA is never initialised."""
    run = tmp_path / "run"
    out = torchrun(2, REPO / "tests" / "dist_scripts" / "backend_check.py", run, timeout=300, env={D.BACKEND_ENV: "gloo"})
    reports = [json.loads(f.read_text()) for f in sorted(run.glob("backend_rank*.json"))]
    assert [r["rank"] for r in reports] == [0, 1], out[-3000:]
    for r in reports:
        assert r["world"] == 2 and r["backend"] == "gloo" and r["dist_backend"] == "gloo"
        assert r["device"] == "cpu" and r["param_devices"] == ["cpu"] and r["allreduce"] == [3.0, "cpu"]
        assert r["cpu_compat"] is True
        assert r["cuda_initialized"] is False, "a gloo rank initialised CUDA"
        assert len(r["losses"]) == 2 and all(l == l for l in r["losses"])
    assert reports[0]["losses"] == reports[1]["losses"]  # data-parallel replicas agree


@pytest.fixture
def fake_apex(monkeypatch):
    """An importable `apex.normalization.FusedLayerNorm` (apex is not installable here); the choice is cached."""
    import types

    from hcustom_mc.model import layers

    class FusedLayerNorm(torch.nn.LayerNorm):
        pass

    apex, normalization = types.ModuleType("apex"), types.ModuleType("apex.normalization")
    normalization.FusedLayerNorm = FusedLayerNorm
    apex.normalization = normalization
    monkeypatch.setitem(sys.modules, "apex", apex)
    monkeypatch.setitem(sys.modules, "apex.normalization", normalization)
    # apex's CUDA extension, which FusedLayerNorm.__init__ imports
    monkeypatch.setitem(sys.modules, "fused_layer_norm_cuda", types.ModuleType("fused_layer_norm_cuda"))
    layers._apex_fused_layer_norm.cache_clear()
    yield FusedLayerNorm
    layers._apex_fused_layer_norm.cache_clear()


def test_affine_norms_skip_apex_built_without_its_cuda_extension(fake_apex, monkeypatch):
    """A Python-only apex build imports, but its FusedLayerNorm cannot be constructed (no
    fused_layer_norm_cuda): the norms must fall back to torch instead of failing the model build."""
    from hcustom_mc.model import layers

    monkeypatch.setitem(sys.modules, "fused_layer_norm_cuda", None)  # `import` raises ImportError
    layers._apex_fused_layer_norm.cache_clear()
    assert type(layers.affine_layer_norm(8, device="cuda")) is torch.nn.LayerNorm


def test_affine_norms_take_apex_on_cuda_only(fake_apex):
    from hcustom_mc.model.layers import affine_layer_norm

    on_cuda, on_cpu = affine_layer_norm(8, eps=1e-6, device="cuda"), affine_layer_norm(8, eps=1e-6, device="cpu")
    assert type(on_cuda) is fake_apex and on_cuda.eps == 1e-6
    assert type(on_cpu) is torch.nn.LayerNorm
    assert on_cuda.state_dict().keys() == on_cpu.state_dict().keys() == {"weight", "bias"}
    with torch.device("meta"):  # the build device is read from the context the model is built under
        assert type(affine_layer_norm(8)) is torch.nn.LayerNorm


def test_affine_norms_without_apex_are_torch_on_every_device():
    from hcustom_mc.model import layers

    layers._apex_fused_layer_norm.cache_clear()
    if layers._apex_fused_layer_norm() is not None:
        pytest.skip("apex is installed on this host")
    assert type(layers.affine_layer_norm(8, device="cuda")) is torch.nn.LayerNorm


@pytest.mark.parametrize("module, expected", [("apex.optimizers.fused_adam", "apex FusedAdam"),
                                              ("transformer_engine.pytorch.optimizers", "transformer-engine FusedAdam"),
                                              ("torch.optim.adamw", "torch AdamW")])
def test_optimizer_implementation_is_named(monkeypatch, module, expected):
    from megatron.core import optimizer as megatron_optimizer

    from hcustom_mc.training.step import adam_implementation

    cls = type("AdamW" if module.startswith("torch") else "FusedAdam", (), {"__module__": module})
    monkeypatch.setattr(megatron_optimizer, "Adam", cls)
    assert adam_implementation().startswith(expected)



CHILD_INIT = """
from hcustom_mc.parallel.state import _init_process_group
_init_process_group(30)
print("child ok")
"""
PARENT_INIT = """
import os, subprocess, sys
from hcustom_mc.parallel.state import _init_process_group
_init_process_group(30)
assert "MASTER_PORT" not in os.environ, os.environ["MASTER_PORT"]
subprocess.run([sys.executable, "-c", sys.argv[1]], check=True)  # inherits this process's environment
print("parent ok")
"""


def test_a_world_of_one_leaves_no_port_for_its_children_to_collide_on():
    """The single-process store binds port 0 and keeps the port out of os.environ: a child once inherited it
    and failed with EADDRINUSE (the gpu_check dry run after a single_process test)."""
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_PORT", "MASTER_ADDR", "WORLD_SIZE", "RANK")}
    proc = subprocess.run([sys.executable, "-c", PARENT_INIT, CHILD_INIT], cwd=REPO,
                          env={**env, "PYTHONPATH": child_pythonpath()}, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.split("\n")[:2] == ["child ok", "parent ok"], proc.stdout + proc.stderr[-3000:]


def test_encoder_dtype_is_fp16_on_a_gpu_and_fp32_elsewhere():
    from hcustom_mc.device import encoder_dtype

    assert encoder_dtype("cuda") is torch.float16 and encoder_dtype(torch.device("cuda", 1)) is torch.float16
    assert encoder_dtype("cpu") is torch.float32 and encoder_dtype(torch.device("meta")) is torch.float32
