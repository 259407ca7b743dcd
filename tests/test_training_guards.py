"""Fine-tuning guards: exact bf16 resume with the distributed optimizer, the EMA (values, resume, export),
LR-schedule changes on resume, non-finite losses and gradient norms, device placement, metadata builds that
allocate nothing."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.torchrun import REPO, backend_env, child_pythonpath, launch_command

ARGS = ["--config", "examples/tiny_3d.yaml", "--set", "zero_init=false", "--set", "checkpoint.save_interval=0"]
ENV = {"OMP_NUM_THREADS": "1", "PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PYTHONPATH": child_pythonpath()}


def run(nproc, *args, expect=0, env=None, timeout=400) -> subprocess.CompletedProcess:
    cmd = launch_command(nproc, "pretrain_custom.py", *ARGS, *args)
    proc = subprocess.run(cmd, cwd=REPO, env={**ENV, **backend_env(nproc, env), **(env or {})}, capture_output=True,
                          text=True, timeout=timeout)
    assert proc.returncode == expect, f"exit {proc.returncode}\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}"
    return proc


def history(run_dir: Path) -> dict:
    return json.loads((run_dir / "history.json").read_text())


def to_release(ckpt: Path, out: Path) -> dict:
    """Our converter: mcore training checkpoint -> release file (with its `ema` entry when present)."""
    subprocess.run([sys.executable, "-m", "hcustom_mc.checkpoint.convert", "--src", str(ckpt), "--src-format", "mcore",
                    "--dst", str(out), "--dst-format", "release", "--model-config", "tiny", "--variant", "audio"],
                   cwd=REPO, env=ENV, check=True, capture_output=True, timeout=300)
    return torch.load(out / "mp_rank_00_model_states.pt", weights_only=True)


# ----------------------------------------------------------------------------- exact resume (bf16) + EMA
@pytest.mark.slow
def test_bf16_distributed_optimizer_resume_is_exact_with_ema(tmp_path):
    common = ["--bf16", "--train-iters", 6, "--ema-decay", 0.9]
    run(2, *common, "--save", tmp_path / "straight", "--run-dir", tmp_path / "s")
    run(2, *common, "--exit-after-iters", 3, "--save", tmp_path / "ck", "--run-dir", tmp_path / "a")
    run(2, *common, "--load", tmp_path / "ck", "--save", tmp_path / "ck", "--run-dir", tmp_path / "b")
    s, a, b = history(tmp_path / "s"), history(tmp_path / "a"), history(tmp_path / "b")
    assert a["losses"] + b["losses"] == s["losses"], "bf16 resume changed the losses"
    assert a["grad_norms"] + b["grad_norms"] == s["grad_norms"], "bf16 resume changed the grad norms"
    straight = to_release(tmp_path / "straight" / "iter_0000006", tmp_path / "rel_s")
    resumed = to_release(tmp_path / "ck" / "iter_0000006", tmp_path / "rel_r")
    assert set(straight) == {"module", "ema"}
    for key in ("module", "ema"):
        for name, t in straight[key].items():
            assert torch.equal(t, resumed[key][name]), f"{key} {name} differs after resume"
    assert straight["ema"]["img_in.proj.weight"].dtype == torch.float32  # the fp32 shadow, not bf16 copies


def test_ema_is_the_moving_average_of_the_weights(tmp_path, single_process):
    """decay 0.5, one step from a known start (DP2, distributed optimizer): ema = (w0 + w1) / 2, every tensor."""
    from hcustom_mc.checkpoint.release import load_release_state_dict, save_release_state_dict
    from hcustom_mc.model import HunyuanCustomDiT, get_model_config
    from hcustom_mc.model.init import initialize_weights

    model = HunyuanCustomDiT(get_model_config("tiny", "audio"))
    initialize_weights(model, seed=3, zero_init=False)
    w0 = model.weight_state_dict()
    save_release_state_dict(w0, tmp_path / "w0.pt")
    run(2, "--train-iters", 1, "--pretrained", tmp_path / "w0.pt", "--ema-decay", 0.5, "--save", tmp_path / "ck",
        "--run-dir", tmp_path / "r", "--set", "freeze=[final_layer.]", "--lr-warmup-iters", 0)
    out = to_release(tmp_path / "ck" / "iter_0000001", tmp_path / "rel")
    w1, ema = out["module"], out["ema"]
    moved = 0
    for name, start in w0.items():
        want = 0.5 * start + 0.5 * w1[name]
        assert torch.allclose(ema[name], want, atol=1e-7), name
        moved += not torch.equal(start, w1[name])
    assert moved > 10, "the step did not move the weights"
    assert torch.equal(ema["final_layer.linear.weight"], w0["final_layer.linear.weight"])  # frozen: itself
    released = load_release_state_dict(tmp_path / "rel", load_key="ema")  # what the sampler's --load-key ema reads
    assert torch.equal(released["img_in.proj.weight"], ema["img_in.proj.weight"])


# ----------------------------------------------------------------------------- schedule changes on resume
@pytest.mark.slow
def test_schedule_change_on_resume_is_refused_unless_overridden(tmp_path):
    run(1, "--train-iters", 4, "--exit-after-iters", 2, "--save", tmp_path / "ck", "--run-dir", tmp_path / "a")
    proc = run(1, "--train-iters", 8, "--lr", 0.001, "--load", tmp_path / "ck", "--run-dir", tmp_path / "b", expect=2)
    assert "--lr (max_lr): checkpoint 0.005, this run 0.001" in proc.stderr
    assert "--train-iters (lr_decay_steps): checkpoint 4, this run 8" in proc.stderr
    assert "--override-schedule" in proc.stderr
    proc = run(1, "--train-iters", 8, "--lr", 0.001, "--load", tmp_path / "ck", "--override-schedule",
               "--run-dir", tmp_path / "c")
    h = history(tmp_path / "c")
    assert len(h["losses"]) == 6 and h["step"] == 8
    state = json.loads((tmp_path / "ck" / "iter_0000002" / "train_state.json").read_text())["scheduler"]
    assert state["max_lr"] == 0.005
    assert "the schedule follows this run's settings" in proc.stderr


# ----------------------------------------------------------------------------- non-finite steps
def test_poisoned_weights_stop_at_the_first_step(tmp_path, single_process):
    from hcustom_mc.model import HunyuanCustomDiT, get_model_config
    from hcustom_mc.model.init import initialize_weights
    from hcustom_mc.checkpoint.release import save_release_state_dict

    model = HunyuanCustomDiT(get_model_config("tiny", "audio"))
    initialize_weights(model, seed=1, zero_init=False)
    sd = model.weight_state_dict()
    sd["final_layer.linear.bias"] = torch.full_like(sd["final_layer.linear.bias"], float("inf"))
    save_release_state_dict(sd, tmp_path / "poisoned.pt")
    proc = run(1, "--train-iters", 3, "--pretrained", tmp_path / "poisoned.pt", "--save", tmp_path / "ck",
               "--run-dir", tmp_path / "r", expect=3)
    assert "step 1 (task" in proc.stderr and "the loss is inf in micro batch 0" in proc.stderr, proc.stderr[-2000:]
    assert "nothing of this step was saved" in proc.stderr
    assert not list((tmp_path / "ck").glob("iter_*")) and not (tmp_path / "ck" / "latest").exists()


@pytest.mark.parametrize("fault,message", [("loss:5", "the loss is nan in micro batch 0"),
                                           pytest.param("grad:5", "the gradient norm is inf", marks=pytest.mark.slow)])
def test_nonfinite_step_stops_and_latest_stays_good(tmp_path, fault, message):
    # every worker exits 3; torchrun reports the failed workers with 1
    proc = run(2, "--train-iters", 8, "--save", tmp_path / "ck", "--set", "checkpoint.save_interval=3",
               "--run-dir", tmp_path, expect=1, env={"HCUSTOM_FAULT_NONFINITE": fault})
    assert "exitcode  : 3" in proc.stderr and message in proc.stderr and "step 5 (task" in proc.stderr
    assert (tmp_path / "ck" / "latest").read_text().strip() == "iter_0000003"
    assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == ["iter_0000003", "latest"]


def test_nonfinite_message_names_step_and_micro_batch(tmp_path):
    proc = run(1, "--train-iters", 3, "--run-dir", tmp_path, expect=3, env={"HCUSTOM_FAULT_NONFINITE": "grad:2"})
    assert "step 2 (task" in proc.stderr and "the gradient norm is inf; the step was not applied" in proc.stderr


@pytest.mark.slow
def test_skip_nonfinite_steps(tmp_path):
    straight = tmp_path / "s"
    run(1, "--train-iters", 4, "--run-dir", straight)
    run(1, "--train-iters", 4, "--skip-nonfinite-steps", 1, "--run-dir", tmp_path / "k",
        env={"HCUSTOM_FAULT_NONFINITE": "loss:2"})
    s, k = history(straight), history(tmp_path / "k")
    assert k["skipped_steps"] == [2] and len(k["losses"]) == 3
    assert k["losses"][0] == s["losses"][0]


# ----------------------------------------------------------------------------- placement and metadata
def _device_params():
    cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
    return [pytest.param("cpu", id="cpu"), pytest.param("cuda", id="cuda", marks=[cuda, pytest.mark.gpu])]


@pytest.fixture(params=_device_params())
def train_device(request):
    from hcustom_mc.device import compute_device

    if compute_device().type != request.param:
        pytest.skip(f"this process trains on {compute_device()} (megatron's buffers follow the process-group backend; "
                    "HCUSTOM_DIST_BACKEND selects it)")
    return compute_device()


@pytest.mark.parametrize("bf16", [False, True])
@pytest.mark.parametrize("options", [{}, {"trainable": "new"}, {"freeze": ["double_blocks."]},
                                     {"distopt": False}], ids=["all", "new", "freeze", "no_distopt"])
def test_every_tensor_on_the_training_device(single_process, train_device, bf16, options):
    device = train_device
    """Model chunks, then DDP buffers and optimizer state, on `device` for every training option."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    from hcustom_mc.device import misplaced
    from hcustom_mc.training.config import TrainConfig
    from hcustom_mc.training.loop import build_model_chunks, check_placement

    cfg = TrainConfig(model="tiny", variant="audio", bf16=bf16, trainable=options.get("trainable", "all"),
                      freeze=options.get("freeze", []))
    cfg.optim.use_distributed_optimizer = options.get("distopt", True)
    chunks = build_model_chunks(cfg, cfg.model_config(), "ulysses", device)
    check_placement(chunks, device)
    assert not misplaced(chunks[0], device)
    ddp = [DistributedDataParallel(c.config, DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, use_distributed_optimizer=cfg.optim.use_distributed_optimizer), c) for c in chunks]
    opt = get_megatron_optimizer(OptimizerConfig(optimizer="adam", lr=1e-3, bf16=bf16,
                                                 use_distributed_optimizer=cfg.optim.use_distributed_optimizer), ddp)
    for p in chunks[0].parameters():
        assert p.device.type == device.type
        if p.requires_grad:
            assert p.main_grad.device.type == device.type
    for inner in getattr(opt, "chained_optimizers", [opt]):
        for group in inner.optimizer.param_groups:
            assert all(p.device.type == device.type for p in group["params"])


class _CountAllocations(torch.utils._python_dispatch.TorchDispatchMode):
    """Bytes of every tensor produced on a real device (not meta) while active."""

    def __init__(self):
        super().__init__()
        self.bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                self.bytes += t.untyped_storage().nbytes()
        return out


def test_metadata_builds_allocate_nothing(single_process, device):
    """The stage-shared names and the converter's key check of the 13B model come from a meta build; on CUDA
    (a `gpu` variant, so `pytest -m gpu` runs it) not a byte of GPU memory either."""
    from hcustom_mc.checkpoint.convert import build_model
    from hcustom_mc.model import get_model_config
    from hcustom_mc.training.loop import stage_shared_names, whole_model

    cfg = get_model_config("13b", "audio")
    with _CountAllocations() as counter:
        names = stage_shared_names(cfg)
        whole = whole_model(cfg)
        build_model(cfg, torch.bfloat16, meta=True)
    assert counter.bytes < 1 << 20, f"{counter.bytes} bytes allocated"
    assert sum(p.numel() for p in whole.parameters()) > 12e9 and any(n.startswith("time_in.") for n, _ in names)
    if device.type == "cuda":
        before = torch.cuda.memory_allocated()
        whole_model(cfg)
        assert torch.cuda.memory_allocated() - before < 1 << 20
