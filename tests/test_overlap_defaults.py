"""The overlap / fusion defaults of a training run (training/overlap.py)."""

import os
from types import SimpleNamespace

from hcustom_mc.training.config import TrainConfig
from hcustom_mc.training.overlap import ddp_and_optimizer_overlap, set_cuda_connections


def info(dp):
    return SimpleNamespace(dp_size=dp, rank=1)


def base_cfg():
    cfg = TrainConfig(variant="base")
    cfg.data.task_weights = {"t2v": 1.0, "identity": 1.0}
    return cfg


def test_dp1_has_no_distributed_optimizer_and_no_overlap():
    o = ddp_and_optimizer_overlap(base_cfg(), info(1), fusion_usable=False)
    assert o.ddp == dict(use_distributed_optimizer=False, overlap_grad_reduce=False, overlap_param_gather=False)
    assert o.optimizer == dict(use_distributed_optimizer=False, overlap_param_gather=False)


def test_dp_gt1_overlaps_both():
    o = ddp_and_optimizer_overlap(base_cfg(), info(4), fusion_usable=True)
    assert o.ddp == dict(use_distributed_optimizer=True, overlap_grad_reduce=True, overlap_param_gather=True)
    assert o.model == dict(gradient_accumulation_fusion=True)


def test_user_switches_and_unused_branches():
    cfg = base_cfg()
    cfg.optim.use_distributed_optimizer = False
    o = ddp_and_optimizer_overlap(cfg, info(2), fusion_usable=False)
    assert o.ddp["overlap_grad_reduce"] and not o.ddp["overlap_param_gather"]
    cfg = base_cfg()
    cfg.optim.overlap_param_gather = False
    assert not ddp_and_optimizer_overlap(cfg, info(2), fusion_usable=False).ddp["overlap_param_gather"]
    # audio variant with t2v batches: the audio branch gets no gradient there, megatron's overlap would assert
    cfg = TrainConfig(variant="audio")
    cfg.data.task_weights = {"t2v": 1.0, "audio": 1.0}
    assert not ddp_and_optimizer_overlap(cfg, info(2), fusion_usable=False).ddp["overlap_grad_reduce"]
    cfg.data.task_weights = {"audio": 1.0}
    assert ddp_and_optimizer_overlap(cfg, info(2), fusion_usable=False).ddp["overlap_grad_reduce"]


def test_cuda_connections_only_with_tp(monkeypatch):
    monkeypatch.delenv("CUDA_DEVICE_MAX_CONNECTIONS", raising=False)
    set_cuda_connections(1)
    assert "CUDA_DEVICE_MAX_CONNECTIONS" not in os.environ
    set_cuda_connections(2)
    assert os.environ["CUDA_DEVICE_MAX_CONNECTIONS"] == "1"
    monkeypatch.setenv("CUDA_DEVICE_MAX_CONNECTIONS", "8")  # the user's choice wins
    set_cuda_connections(2)
    assert os.environ["CUDA_DEVICE_MAX_CONNECTIONS"] == "8"


def test_resume_keeps_the_checkpoint_optimizer_format(tmp_path):
    import json

    from hcustom_mc.checkpoint.integrity import seal_folder

    for flag, dp in ((True, 1), (False, 2)):
        root = tmp_path / str(flag)
        ck = root / "iter_0000002"
        ck.mkdir(parents=True)
        (root / "latest").write_text("iter_0000002\n")
        (ck / "train_state.json").write_text(json.dumps({"step": 2, "distributed_optimizer": flag}))
        seal_folder(ck)  # a folder we wrote carries its manifest (one without is not loaded: issue 20)
        cfg = base_cfg()
        cfg.checkpoint.load = str(root)
        assert ddp_and_optimizer_overlap(cfg, info(dp), fusion_usable=False).ddp["use_distributed_optimizer"] is flag
