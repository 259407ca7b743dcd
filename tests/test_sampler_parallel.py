"""The sampler end to end: checkpoints trained by pretrain_custom.py sample into playable mp4s; TP, CP (both
modes), CFG-parallel and TP x CFG give the single-process latents; bad inputs fail before any model work."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.torchrun import REPO, _free_port, backend_env, child_pythonpath

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": child_pythonpath()}


def _run(nproc: int, module_or_script: list[str], *args, expect=0, timeout=300) -> str:
    if nproc == 1:
        cmd = [sys.executable, *module_or_script, *map(str, args)]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--master_addr=127.0.0.1",
               f"--master_port={_free_port()}", *module_or_script, *map(str, args)]
    proc = subprocess.run(cmd, cwd=REPO, env={**ENV, **backend_env(nproc)}, capture_output=True, text=True,
                          timeout=timeout)
    out = proc.stdout + proc.stderr
    assert proc.returncode == expect, f"exit {proc.returncode} (expected {expect})\n{out[-6000:]}"
    return out


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny dataset + encoders, and audio- and editing-variant checkpoints trained for 2 steps."""
    from hcustom_mc.data.tiny_dataset import make_tiny_dataset
    from hcustom_mc.encoders.tiny import save_tiny_encoders
    from hcustom_mc.model.config import get_model_config

    root = tmp_path_factory.mktemp("sampler")
    make_tiny_dataset(root / "data", num_samples=5, size="64x48", frames=13, seed=0)
    save_tiny_encoders(root / "enc", get_model_config("tiny", "audio"))
    for variant in ("audio", "editing"):
        _run(1, ["pretrain_custom.py"], "--config", "examples/tiny_3d.yaml", "--variant", variant, "--train-iters", 2,
             "--set", "data.task_weights={t2v: 1}", "--set", "zero_init=false", "--save", root / f"ck_{variant}",
             "--run-dir", root / f"run_{variant}")
    return root


def _sample(setup, nproc, out, *layout, task="audio", extra=(), expect=0):
    d = setup / "data"
    job = {"audio": ["--image", f"circle={d}/images/s0003_0.png", "--audio", d / "audio/s0003.wav",
                     "--prompt", "A blue circle moves down."],
           "editing": ["--image", f"square={d}/images/s0004_0.png", "--source-video", d / "videos/s0004_source.mp4",
                       "--mask-video", d / "masks/s0004.mp4", "--prompt", "A purple square moves down."]}[task]
    size = [] if task == "editing" else ["--height", 32, "--width", 48, "--frames", 9]
    return _run(nproc, ["-m", "hcustom_mc.sample"], "--checkpoint", setup / f"ck_{task}", "--encoders-dir", setup / "enc",
                "--text-len", 256, "--task", task, *job, *size, "--steps", 3, "--seed", 7, "--out", out,
                "--no-progress", *layout, *extra, expect=expect)


@pytest.fixture(scope="module")
def reference(setup):
    out = setup / "single"
    _sample(setup, 1, out)
    return out


def test_audio_job_writes_a_playable_mp4_with_its_audio_track(reference):
    from hcustom_mc.inference.output import read_mp4

    frames, fps, audio, rate = read_mp4(reference / "000_audio.mp4")
    assert frames.shape == (9, 32, 48, 3) and fps == 25
    assert audio is not None and rate and audio.size >= 0.3 * rate  # the tone, ~9/25 s
    assert (reference / "000_audio.png").stat().st_size > 0
    sidecar = json.loads((reference / "000_audio.json").read_text())
    assert sidecar["job"]["seed"] == 7 and sidecar["job"]["steps"] == 3 and sidecar["denoise"]["steps"] == 3
    assert len(sidecar["denoise"]["step_s"]) == 3 and all(t > 0 for t in sidecar["denoise"]["step_s"])


@pytest.mark.parametrize("nproc,layout", [
    (2, ["--tp", 2]),
    pytest.param(2, ["--cp", 2, "--cp-mode", "ulysses"], marks=pytest.mark.slow),
    (2, ["--cp", 2, "--cp-mode", "ring"]),
    (2, ["--cfg-parallel", 2]),
    pytest.param(4, ["--tp", 2, "--cfg-parallel", 2], marks=pytest.mark.slow),
], ids=["tp2", "cp2-ulysses", "cp2-ring", "cfg2", "tp2xcfg2"])
def test_parallel_layouts_give_the_single_process_latents(setup, reference, tmp_path, nproc, layout):
    _sample(setup, nproc, tmp_path, *layout)
    want = torch.load(reference / "000_audio.latents.pt")
    got = torch.load(tmp_path / "000_audio.latents.pt")
    torch.testing.assert_close(got, want, rtol=1e-4, atol=2e-5)


def test_editing_job_takes_size_and_length_from_the_source_video(setup, tmp_path):
    from hcustom_mc.inference.output import read_mp4

    _sample(setup, 1, tmp_path, task="editing")
    frames, fps, audio, _ = read_mp4(tmp_path / "000_editing.mp4")
    assert frames.shape == (13, 48, 64, 3) and fps == 25 and audio is None


@pytest.mark.parametrize("extra,message", [
    (["--image", "ghost=/nonexistent.png"], "/nonexistent.png"),
    (["--frames", 10], "4k+1"),
    (["--tp", 4], "world size"),
    (["--text-len", 8], "prompts that do not fit"),
    (["--frames", 100001], "frames 100001 is more than the model supports (129"),  # fits in memory at 32x48
    (["--steps", 10**6], "steps 1000000 is more than the scheduler's 1000 timesteps"),
], ids=["missing-image", "frames", "layout", "prompt-too-long", "absurd-frames", "absurd-steps"])
def test_bad_inputs_fail_before_the_model_loads(setup, tmp_path, extra, message):
    out = _sample(setup, 1, tmp_path / "out", extra=extra, expect=2)
    assert message in out and "loaded" not in out and not (tmp_path / "out").exists()


def test_two_samplers_with_one_out_exactly_one_runs(setup, tmp_path):
    """Started together with one --out: one writes its outputs, the other exits 2 with one line (it found the
    folder locked, or, if the first had already finished, its outputs there)."""
    d = setup / "data"
    cmd = [sys.executable, "-m", "hcustom_mc.sample", "--checkpoint", setup / "ck_audio", "--encoders-dir", setup / "enc",
           "--task", "audio", "--image", f"circle={d}/images/s0003_0.png", "--audio", d / "audio/s0003.wav", "--prompt",
           "A blue circle moves down.", "--height", 32, "--width", 48, "--frames", 9, "--steps", 3, "--out", tmp_path,
           "--no-progress"]
    procs = [subprocess.Popen(list(map(str, cmd)), cwd=REPO, env={**ENV, **backend_env(1)}, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [(p.wait(timeout=300), p.stdout.read() + p.stderr.read()) for p in procs]
    codes = sorted(code for code, _ in results)
    assert codes == [0, 2], "\n\n".join(f"exit {code}:\n{out[-3000:]}" for code, out in results)
    refused = next(out for code, out in results if code == 2)
    errors = [ln for ln in refused.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in refused, refused
    assert (f"--out {tmp_path} is being written by another job" in errors[0]
            or "exists (an earlier run's output)" in errors[0]), errors
    assert not list(tmp_path.glob(".writer.lock")) and (tmp_path / "000_audio.mp4").is_file()


def test_bad_layout_fails_on_every_rank(setup, tmp_path):
    out = _sample(setup, 2, tmp_path, "--cfg-parallel", 3, expect=1)
    # every rank finds it; said once
    assert out.count("cfg_parallel must be 1 or the number of guidance branches") == 1 and "loaded" not in out


@pytest.mark.slow
def test_sampler_benchmark_runs_and_reports_scaling(tmp_path):
    out = _run(1, ["bench/sampler.py"], "--layouts", "1", "cfg=2", "--steps", 1, "--out", tmp_path / "s.md")
    table = (tmp_path / "s.md").read_text()
    assert "command: `python bench/sampler.py" in table and "| cfg=2 | 2 |" in table and "speedup" in out


def test_sampler_benchmark_mode_flags():
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_sampler", REPO / "bench" / "sampler.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    mode_flags = bench.mode_flags

    assert mode_flags("resident") == ["--offload", "none"]
    assert mode_flags("blocks+fp8+cache=0.1") == ["--offload", "blocks", "--fp8-weights", "on", "--cache-threshold", "0.1"]
    assert mode_flags("cache=0.05") == ["--offload", "none", "--cache-threshold", "0.05"]
    with pytest.raises(SystemExit, match="bad mode 'fast'"):
        mode_flags("fast")


@pytest.mark.slow
def test_sampler_benchmark_modes_side_by_side(tmp_path):
    """--modes: the real sampler per mode and eval compare against resident. The encoders mode samples the same
    latents as resident and x264 writes them at a fixed thread count, so its videos are identical: PSNR inf."""
    out = _run(1, ["bench/sampler.py"], "--modes", "encoders", "blocks+fp8+cache=0.5", "--size", "48x32", "--frames",
               5, "--steps", 6, "--work", tmp_path / "work", "--out", tmp_path / "m.md")
    table = (tmp_path / "m.md").read_text()
    assert "command: `python bench/sampler.py --modes" in table and "one process on CPU" in table
    rows = {line.split(" | ")[0].lstrip("| "): line for line in table.splitlines() if line.startswith("| ")}
    assert set(rows) >= {"resident", "encoders", "blocks+fp8+cache=0.5"}
    assert "| inf | 1.0000 |" in rows["encoders"], rows["encoders"]
    assert "`--offload blocks --fp8-weights on --cache-threshold 0.5`" in rows["blocks+fp8+cache=0.5"]
    assert "ms/step" in out


@pytest.mark.slow
def test_infer_parallel_script_trains_the_demo_model_and_writes_videos(tmp_path):
    from hcustom_mc.inference.output import read_mp4

    root = tmp_path / "tiny"
    proc = subprocess.run(["bash", "examples/infer_parallel.sh"], cwd=REPO, capture_output=True, text=True, timeout=900,
                          env={**ENV, "ROOT": str(root), "MASTER_PORT": str(_free_port()),
                               "EXTRA": "--height 32 --width 48 --frames 9 --steps 2 --text-len 256"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (root / "checkpoints" / "latest").is_file()
    for name in ("000_t2v", "001_identity", "002_audio"):
        frames, fps, audio, _ = read_mp4(root / "samples" / "latest" / f"{name}.mp4")  # a new folder per run
        assert frames.shape == (9, 32, 48, 3) and fps == 25
        assert (audio is not None) == (name == "002_audio")


@pytest.mark.slow
def test_infer_parallel_script_one_gpu_modes_combine(tmp_path):
    """MODE=blocks with fp8 weights and the step cache: one process, and each job's sidecar says all three."""
    import json

    root = tmp_path / "tiny"
    proc = subprocess.run(["bash", "examples/infer_parallel.sh", "--fp8-weights", "on", "--cache-threshold", "0.05"],
                          cwd=REPO, capture_output=True, text=True, timeout=900,
                          env={**ENV, "ROOT": str(root), "MASTER_PORT": str(_free_port()), "MODE": "blocks",
                               "EXTRA": "--height 32 --width 48 --frames 9 --steps 4 --text-len 256"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for name in ("000_t2v", "001_identity", "002_audio"):
        side = json.loads((root / "samples" / "latest" / f"{name}.json").read_text())
        assert side["world_size"] == 1 and side["memory"]["offload"] == "blocks"
        assert side["weights"]["fp8_weights"] == "on" and side["cache"]["threshold"] == 0.05


@pytest.mark.slow
def test_ip_cfg_three_branches_over_cfg_parallel_3(setup, tmp_path):
    _sample(setup, 1, tmp_path / "one", extra=["--ip-cfg-scale", 2.0])
    _sample(setup, 3, tmp_path / "three", "--cfg-parallel", 3, extra=["--ip-cfg-scale", 2.0])
    want = torch.load(tmp_path / "one" / "000_audio.latents.pt")
    torch.testing.assert_close(torch.load(tmp_path / "three" / "000_audio.latents.pt"), want, rtol=1e-4, atol=2e-5)
    sidecar = json.loads((tmp_path / "three" / "000_audio.json").read_text())
    assert sidecar["job"]["ip_cfg_scale"] == 2.0 and sidecar["layout"]["cfg_parallel"] == 3


def test_a_second_run_into_the_same_folder_is_refused_unless_overwrite(tmp_path):
    from hcustom_mc.model.config import ConfigError
    from hcustom_mc.sample import build_jobs, parse_args

    args = parse_args(["--checkpoint", "ck", "--task", "t2v", "--prompt", "a", "--out", str(tmp_path)])
    (job,) = build_jobs(args)  # nothing there yet
    first = tmp_path / (Path(job.output).name + ".png")
    first.write_bytes(b"an earlier run's contact sheet")
    with pytest.raises(ConfigError, match="exists \\(an earlier run's output\\); pass another --out or --overwrite"):
        build_jobs(args)
    assert first.read_bytes() == b"an earlier run's contact sheet"
    args.overwrite = True
    assert len(build_jobs(args)) == 1
