"""examples/13b recipes: each loads and validates at the world size its header states, and is the layout the
planner ranks first for its GPU count on 80 GB GPUs (and says fits), with the header's planner command."""

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from tests.torchrun import REPO, child_pythonpath

RECIPES = sorted((REPO / "examples" / "13b").glob("*.yaml"))


def _header(path: Path) -> tuple[int, list[str]]:
    text = path.read_text()
    world = int(re.search(r"\(world (\d+)\)", text).group(1))
    plan = next(line.lstrip("# ").strip() for line in text.splitlines() if "python -m hcustom_mc.plan" in line
                and "--tp" in line)
    return world, shlex.split(plan)[3:]  # drop "python -m hcustom_mc.plan"


def _flag(args: list[str], name: str) -> str:
    return args[args.index(name) + 1]


def test_there_are_recipes_for_every_kind_resolution_and_gpu_count():
    names = {p.stem for p in RECIPES}
    assert names == ({f"{k}_{r}_{g}gpu" for k in ("full", "audio", "editing") for r in ("720p", "512p") for g in (8, 64)}
                     | {f"multi_subject_720p_{g}gpu" for g in (8, 64)})


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_recipe_validates_and_is_the_planners_first_choice(path, tmp_path):
    from hcustom_mc.training.config import build_config

    world, plan_args = _header(path)
    # the paths a user passes on the command line (validation checks that they exist)
    (tmp_path / "shards").mkdir()
    (tmp_path / "base.pt").write_bytes(b"")
    cfg = build_config(["--config", str(path), "--data-path", str(tmp_path / "shards"),
                        "--pretrained", str(tmp_path / "base.pt")])
    cfg.validate(world)
    model_cfg = cfg.model_config()
    cfg.parallel.validate(world, model_cfg)
    p = cfg.parallel
    dp = p.data_parallel(world)
    # the header's planner command describes this file
    assert [int(_flag(plan_args, f)) for f in ("--tp", "--pp", "--cp", "--dp")] == [
        p.tensor_parallel, p.pipeline_parallel, p.context_parallel, dp]
    assert ("--sequence-parallel" in plan_args) == p.sequence_parallel
    assert _flag(plan_args, "--variant") == cfg.variant and _flag(plan_args, "--trainable") == cfg.trainable
    # the planner sizes the recipe's mode and its worst case: every sample with all the identity images it may have
    assert (_flag(plan_args, "--mode") if "--mode" in plan_args else "release") == model_cfg.mode
    identity_images = int(_flag(plan_args, "--identity-images")) if "--identity-images" in plan_args else 1
    assert identity_images == model_cfg.max_identity_images
    assert int(_flag(plan_args, "--global-batch-size")) == cfg.global_batch_size
    assert int(_flag(plan_args, "--frames")) == cfg.data.frames
    assert min(map(int, _flag(plan_args, "--size").split("x"))) == cfg.data.short_side
    assert ("--ema" in plan_args) == bool(cfg.ema_decay) and cfg.bf16 and cfg.recompute_granularity == "full"
    run = [sys.executable, "-m", "hcustom_mc.plan", *plan_args]
    env = {**os.environ, "PYTHONPATH": child_pythonpath()}
    fits = subprocess.run(run, cwd=REPO, capture_output=True, text=True, timeout=60, env=env)
    assert fits.returncode == 0, fits.stdout + fits.stderr  # 0: fits in --gpu-memory
    # the header's wall time is the planner's, for the recipe's own number of steps
    from hcustom_mc.plan.__main__ import wall_time

    assert int(_flag(plan_args, "--train-iters")) == cfg.train_steps
    est = json.loads(subprocess.run([*run, "--json"], cwd=REPO, capture_output=True, text=True, timeout=60,
                                    env=env).stdout)
    assert (f"# Wall time: ~{est['step_time_s']:.0f} s per step (50% MFU of 989 TFLOP/s, full recompute and pipeline "
            f"bubble included), {cfg.train_steps} steps = {wall_time(est['run_time_s'])}.") in path.read_text()
    # and nothing ranks above it among the layouts of this many GPUs
    search = [a for i, a in enumerate(plan_args) if a not in ("--tp", "--pp", "--cp", "--dp", "--cp-comm-type")
              and plan_args[i - 1] not in ("--tp", "--pp", "--cp", "--dp", "--cp-comm-type")]
    ranked = subprocess.run([sys.executable, "-m", "hcustom_mc.plan", *search, "--gpus", str(world), "--top", "1"],
                            cwd=REPO, capture_output=True, text=True, timeout=60, env=env)
    first = next(line for line in ranked.stdout.splitlines() if line.startswith("TP "))
    mode = f" ({p.cp_mode})" if p.context_parallel > 1 else ""
    expected = (f"TP {p.tensor_parallel}{' +SP' if p.sequence_parallel else ''} x PP {p.pipeline_parallel} x "
                f"CP {p.context_parallel}{mode} x DP {dp}")
    assert first.startswith(expected), ranked.stdout


def _readme_commands(script: str) -> list[list[str]]:
    """The README's torchrun command lines that run `script` (continuation lines joined), as the script's argv."""
    text = (REPO / "README.md").read_text().replace("\\\n", " ")
    found = []
    for line in text.splitlines():
        if line.startswith("torchrun ") and f" {script} " in line:
            words = shlex.split(line)
            nodes = int(_flag(words, "--nnodes")) if "--nnodes" in words else 1
            found.append((nodes * int(_flag(words, "--nproc-per-node")),
                          words[words.index(script) + 1:]))
    return found


def test_the_readme_preprocessing_command_names_a_recipe_with_the_released_encoders():
    from hcustom_mc.preprocess import parse_args
    from hcustom_mc.training.config import build_config

    (commands,) = [_readme_commands("tools/preprocess.py")]
    assert commands
    for world, argv in commands:
        cfg = build_config(args=parse_args(argv))
        assert Path(_flag(argv, "--config")).is_relative_to("examples/13b") and (REPO / _flag(argv, "--config")).is_file()
        enc = cfg.data.encoders
        assert (enc.llava, enc.clip, enc.whisper, enc.vae) == ("models/llava-llama-3-8b-v1_1",
                                                             "models/openai_clip-vit-large-patch14",
                                                             "models/whisper-tiny", "models/vae_3d/hyvae_v1_0801")
        cfg.parallel.validate(world)


def test_the_readme_training_commands_parse_and_fit_their_world():
    from hcustom_mc.model.config import get_model_config
    from hcustom_mc.training.config import build_config

    commands = _readme_commands("pretrain_custom.py")
    assert len(commands) >= 2
    for world, argv in commands:
        assert "--config" not in argv or (REPO / _flag(argv, "--config")).is_file(), argv
        cfg = build_config(argv)
        cfg.parallel.validate(world, get_model_config(cfg.model, cfg.variant))


def test_the_readme_download_commands_exist_in_the_installed_hf_cli():
    """huggingface-hub 2.x has no huggingface-cli: the README's `hf download` lines must parse with the `hf` that
    installs with transformers (nothing is downloaded: --help only)."""
    text = (REPO / "README.md").read_text().replace("\\\n", " ")
    assert "huggingface-cli download" not in text
    lines = [shlex.split(line) for line in text.splitlines() if line.startswith("hf download ")]
    assert len(lines) >= 2
    hf = Path(sys.executable).with_name("hf")
    if not hf.exists():
        pytest.skip("huggingface-hub's `hf` command is not installed beside this interpreter")
    usage = subprocess.run([str(hf), "download", "--help"], capture_output=True, text=True, timeout=60)
    assert usage.returncode == 0, usage.stderr
    # the released weights, and the metrics' models (README "Scoring videos")
    repos = {"tencent/HunyuanCustom", "openai/clip-vit-base-patch32", "facebook/dinov2-base", "public-data/insightface"}
    assert "tencent/HunyuanCustom" in {words[2] for words in lines}
    for words in lines:
        assert words[2] in repos, words
        words = [w for w in words if not w.startswith("#")]
        for flag in (w for w in words if w.startswith("--")):
            assert flag in usage.stdout, (flag, usage.stdout[:2000])
