"""What a new user's first mistakes get: one line that names the file, the flag and what is wrong (broken YAML with
its line and column, an empty or mis-laid encoders folder, an empty checkpoint folder), and the released download's
folder names understood as they are."""

import pytest

from hcustom_mc.model.config import ConfigError


def test_broken_yaml_in_config_names_file_line_and_column(tmp_path):
    from hcustom_mc.training.config import build_config

    bad = tmp_path / "run.yaml"
    bad.write_text("model: tiny\nparallel:\n  tensor_parallel: [1\n  pipeline_parallel: 2\n")
    with pytest.raises(ConfigError) as err:
        build_config(["--config", str(bad)])
    message = str(err.value)
    assert message.startswith(f"--config {bad}:4:") and "not valid YAML" in message and "\n" not in message


def test_broken_yaml_in_set_names_the_flag():
    from hcustom_mc.training.config import build_config

    with pytest.raises(ConfigError, match=r"^--set optim\.lr=\[1e-5:1:\d+: not valid YAML"):
        build_config(["--set", "optim.lr=[1e-5"])


def test_broken_yaml_in_jobs_names_file_line_and_column(tmp_path):
    from hcustom_mc.sample import build_jobs, parse_args

    jobs = tmp_path / "jobs.yaml"
    jobs.write_text('- task: audio\n  prompt: "a man speaks\n- task: identity\n')
    args = parse_args(["--checkpoint", str(tmp_path), "--jobs", str(jobs), "--out", str(tmp_path / "out")])
    with pytest.raises(ConfigError) as err:
        build_jobs(args)
    message = str(err.value)
    assert message.startswith(f"--jobs {jobs}:") and "not valid YAML" in message and "\n" not in message
    line, column = message.split(":", 3)[1:3]
    assert line.isdigit() and column.isdigit()


def _encoder_args(tmp_path, *extra):
    from hcustom_mc.sample import parse_args

    return parse_args(["--checkpoint", str(tmp_path), "--prompt", "p", *map(str, extra)])


def test_an_empty_encoders_dir_names_what_it_looked_for(tmp_path):
    from hcustom_mc.sample import encoder_paths

    (tmp_path / "enc").mkdir()
    with pytest.raises(ConfigError) as err:
        encoder_paths(_encoder_args(tmp_path, "--encoders-dir", tmp_path / "enc"))
    message = str(err.value)
    assert f"--encoders-dir {tmp_path / 'enc'} has no llava, clip, vae encoder" in message
    assert "llava-llama-3-8b-v1_1/" in message and "not given" not in message
    with pytest.raises(ConfigError, match="is not a folder"):
        encoder_paths(_encoder_args(tmp_path, "--encoders-dir", tmp_path / "nowhere"))


def test_the_released_download_layout_is_found_by_encoders_dir(tmp_path):
    from hcustom_mc.sample import encoder_paths

    models = tmp_path / "models"
    for folder in ("llava-llama-3-8b-v1_1", "openai_clip-vit-large-patch14", "whisper-tiny", "vae_3d/hyvae_v1_0801"):
        (models / folder).mkdir(parents=True)
    paths = encoder_paths(_encoder_args(tmp_path, "--encoders-dir", models))
    assert paths.llava == str(models / "llava-llama-3-8b-v1_1") and paths.vae == str(models / "vae_3d/hyvae_v1_0801")
    assert paths.clip == str(models / "openai_clip-vit-large-patch14") and paths.whisper == str(models / "whisper-tiny")
    # a folder given by its own flag wins
    assert encoder_paths(_encoder_args(tmp_path, "--encoders-dir", models, "--clip", tmp_path)).clip == str(tmp_path)


def test_an_empty_checkpoint_folder_is_called_empty(tmp_path):
    from hcustom_mc.inference.pipeline import resolve_checkpoint

    (tmp_path / "ckpt").mkdir()
    with pytest.raises(ConfigError) as err:
        resolve_checkpoint(tmp_path / "ckpt")
    assert "is empty" in str(err.value) and "--checkpoint-format" not in str(err.value)
    (tmp_path / "ckpt" / "notes.txt").write_text("x")  # something else: say what was looked for
    with pytest.raises(ConfigError, match=r"no latest / iter_\* .*metadata\.json .*pass --checkpoint-format"):
        resolve_checkpoint(tmp_path / "ckpt")


def test_a_parallel_layout_started_without_torchrun_says_how_to_launch_it():
    from tests.torchrun import run_python

    out = run_python("pretrain_custom.py", "--config", "examples/tiny_3d.yaml", "--tensor-model-parallel-size", "2",
                     expect_ok=False, timeout=120)
    assert "this is one process: launch 2 or a multiple with `torchrun --nproc-per-node 2 ...`" in out, out
    assert "Traceback" not in out


def test_an_output_folder_that_cannot_be_made_is_refused_before_the_model_loads(tmp_path):
    """The sampler claims every output folder (sample.run calls claim_outputs before load_model): a folder that
    cannot be created is one line naming it. (A parent that is a file: permissions mean nothing to root.)"""
    from types import SimpleNamespace

    from hcustom_mc.sample import claim_outputs

    (tmp_path / "a_file").write_text("x")
    with pytest.raises(ConfigError, match=r"^--out: cannot create .*a_file"):
        claim_outputs([SimpleNamespace(output=str(tmp_path / "a_file" / "out" / "000_t2v"))], overwrite=False)
    locks = claim_outputs([SimpleNamespace(output=str(tmp_path / "fine" / "000_t2v"))], overwrite=False)
    assert (tmp_path / "fine").is_dir() and len(locks) == 1
    for lock in locks:
        lock.release()
