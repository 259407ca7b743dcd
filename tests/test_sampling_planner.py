"""The sampling memory planner (hcustom_mc/inference/memory.py) and `python -m hcustom_mc.plan --sample`: its terms
against exact parameter counts, and the mode it picks for 24, 48 and 80 GB at 720p x 129 frames (13B), consistent
with its own estimates."""

import io
from contextlib import redirect_stdout

import pytest
import torch

GB = 10**9


def _cfg(name="13b", variant="base", **kw):
    from hcustom_mc.model.config import get_model_config

    return get_model_config(name, variant, **kw)


@pytest.mark.parametrize("name,variant", [("tiny", "audio"), ("13b", "base"), ("13b", "audio")])
def test_dit_size_counts_the_built_model(name, variant, single_process):
    """dit_size (arithmetic on the config, model/parameters.py) against the model built on the meta device: the
    total, the blocks in run order, and the rest."""
    from hcustom_mc.inference.memory import dit_size
    from hcustom_mc.inference.offload import model_blocks
    from hcustom_mc.training.loop import whole_model

    cfg = _cfg(name, variant)
    size = dit_size(cfg)
    with torch.device("meta"):
        model = whole_model(cfg)
    assert size.total == sum(p.numel() for p in model.parameters())
    assert size.blocks == tuple(sum(p.numel() for p in b.parameters()) for b in model_blocks(model))
    # double blocks (two streams) are the largest; the non-block modules are the embedders, refiner, final layer
    assert size.largest_block == size.blocks[0] > size.blocks[-1]
    assert 0 < size.non_block < size.largest_block * 3


def test_estimate_terms_follow_the_parameter_counts():
    from hcustom_mc.inference.memory import JobSize, dit_size, sampling_estimate

    cfg = _cfg()
    size = dit_size(cfg)
    job = JobSize(1280, 720, 129)
    enc = {"llava": 7, "clip": 5, "vae": 3}
    rb = sampling_estimate(cfg, job, "resident", "bf16", encoders=enc)
    rf = sampling_estimate(cfg, job, "resident", "fp8", encoders=enc)
    b2 = sampling_estimate(cfg, job, "blocks", "bf16", encoders=enc, ahead=2)
    bf = sampling_estimate(cfg, job, "blocks", "fp8", encoders=enc, ahead=1)
    assert rb.phases["denoise"]["DiT weights"] == 2 * size.total
    assert rf.phases["denoise"]["DiT weights"] == 2 * size.non_block + sum(size.blocks) + 2 * size.largest_block
    assert b2.phases["denoise"]["DiT weights"] == 2 * size.non_block + 3 * 2 * size.largest_block
    assert bf.phases["denoise"]["DiT weights"] == 2 * size.non_block + 2 * size.largest_block + 2 * size.largest_block
    tp2 = sampling_estimate(cfg, job, "resident", "bf16", encoders=enc, tp=2)
    assert tp2.phases["denoise"]["DiT weights"] == size.total
    # the encoders: all of them in every phase when resident; in turn (none while denoising, the VAE to decode)
    assert all(p["encoders"] == 15 for p in rb.phases.values())
    assert [b2.phases[p]["encoders"] for p in ("encode", "denoise", "decode")] == [15, 0, 3]
    assert b2.phases["encode"]["DiT weights"] == b2.phases["decode"]["DiT weights"] == 0
    # activations: one branch per forward offloaded, all batched when resident (CFG-parallel: one per rank)
    assert rb.phases["denoise"]["DiT activations"] == 2 * b2.phases["denoise"]["DiT activations"]
    one = sampling_estimate(cfg, job, "resident", "bf16", encoders=enc, cfg_parallel=2)
    assert one.phases["denoise"]["DiT activations"] == b2.phases["denoise"]["DiT activations"]
    H, M = cfg.hidden_size, cfg.mlp_hidden
    tokens = (1 + 33) * (720 // 16) * (1280 // 16) + 256
    assert b2.phases["denoise"]["DiT activations"] == tokens * (7 * H + 3 * M) * 2
    assert rb.peak == max(sum(p.values()) for p in rb.phases.values())


def test_nominal_encoder_sizes_are_the_released_architectures():
    """ENCODER_PARAMS against the architectures built on the meta device (nothing downloaded): LLaVA-LLaMA-3-8B
    v1.1's config, CLIP ViT-L/14's text model, the 884-16c VAE (diffusers' default config) and whisper-tiny."""
    from diffusers import AutoencoderKLHunyuanVideo
    from transformers import (CLIPTextConfig, CLIPTextModel, CLIPVisionConfig, LlamaConfig, LlavaConfig,
                              LlavaForConditionalGeneration, WhisperConfig, WhisperModel)

    from hcustom_mc.inference.memory import ENCODER_PARAMS

    llava = LlavaConfig(
        text_config=LlamaConfig(vocab_size=128320, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                                num_attention_heads=32, num_key_value_heads=8).to_dict(),
        vision_config=CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                                       num_attention_heads=16, image_size=336, patch_size=14, projection_dim=768).to_dict())
    with torch.device("meta"):
        built = {
            "llava": LlavaForConditionalGeneration(llava),
            "clip": CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_attention_heads=12,
                                                 num_hidden_layers=12, projection_dim=768)),
            "vae": AutoencoderKLHunyuanVideo(),
            "whisper": WhisperModel(WhisperConfig(d_model=384, encoder_layers=4, decoder_layers=4,
                                                  encoder_attention_heads=6, decoder_attention_heads=6,
                                                  encoder_ffn_dim=1536, decoder_ffn_dim=1536)),
        }
    assert {k: sum(p.numel() for p in m.parameters()) for k, m in built.items()} == ENCODER_PARAMS


@pytest.fixture(scope="module")
def choices():
    from hcustom_mc.inference.memory import JobSize, budget_of, choose_mode

    cfg = _cfg()
    return {gb: choose_mode(cfg, JobSize(1280, 720, 129), budget_of(gb * GB)) for gb in (24, 48, 80)}


def test_the_choice_for_24_48_80_gb_is_the_fastest_that_fits(choices):
    from hcustom_mc.inference.memory import MODE_ORDER

    for gb, choice in choices.items():
        assert [(r.mode, r.weights) for r in choice.rows] == list(MODE_ORDER)
        assert choice.chosen is not None, f"{gb} GB: {choice.reason}"
        k = choice.rows.index(choice.chosen)
        assert choice.chosen.peak <= choice.budget
        assert all(r.peak > choice.budget for r in choice.rows[:k])  # every faster mode does not fit
        for r in choice.rows[:k]:  # and the reason names them with their estimate
            assert f"{r.name} needs {r.peak / 2**30:.1f} GiB" in choice.reason
        assert choice.reason.startswith(choice.chosen.name)
        assert f"{choice.chosen.peak / 2**30:.1f} GiB at its peak ({choice.chosen.peak_phase}" in choice.reason
    # a larger GPU never gets a slower mode; 80 GB keeps the DiT resident (the encoders in turn), 24 GB must stream
    # its blocks
    order = [choices[gb].rows.index(choices[gb].chosen) for gb in (24, 48, 80)]
    assert order == sorted(order, reverse=True)
    assert (choices[80].chosen.mode, choices[80].chosen.weights) == ("encoders", "bf16")
    assert choices[24].chosen.mode == "blocks"
    # encoders in turn: the same DiT on the device as resident, none of the encoders beside it while it denoises
    resident, encoders = choices[80].rows[0], choices[80].rows[1]
    assert resident.phases["denoise"]["DiT weights"] == encoders.phases["denoise"]["DiT weights"]
    assert encoders.phases["denoise"]["encoders"] == 0 < resident.phases["denoise"]["encoders"]
    # the whole bf16 DiT alone (its exact parameter count x 2 bytes) is more than 24 GB can hold
    assert choices[24].rows[0].phases["denoise"]["DiT weights"] > choices[24].budget


def test_nothing_fits_says_what_the_smallest_needs():
    from hcustom_mc.inference.memory import JobSize, budget_of, choose_mode

    choice = choose_mode(_cfg(), JobSize(1280, 720, 129), budget_of(8 * GB))
    least = min(choice.rows, key=lambda r: r.peak)
    assert choice.chosen is None and all(not r.fits for r in choice.rows)
    assert choice.reason.startswith(f"nothing fits: the smallest, {least.name}, needs {least.peak / 2**30:.1f} GiB")


def _plan(*argv) -> tuple[int, str]:
    from hcustom_mc.plan.__main__ import main

    out = io.StringIO()
    with redirect_stdout(out):
        code = main(list(map(str, argv)))
    return code, out.getvalue()


@pytest.mark.parametrize("gb", [24, 48, 80])
def test_plan_cli_prints_the_table_and_the_choice(gb, choices):
    code, out = _plan("--sample", "--model", "13b", "--variant", "base", "--size", "1280x720", "--frames", 129,
                      "--gpu-memory", f"{gb}GB")
    chosen = choices[gb].chosen
    assert code == 0
    assert "ESTIMATE: sampling 13b (base, release) at 1280x720 x 129 frames" in out
    for r in choices[gb].rows:
        assert f"{r.peak / 2**30:9.2f}  {'yes' if r.fits else 'no'}" in out and r.name in out
    assert f"choice: {choices[gb].reason}" in out
    assert f"sampler: --offload {'none' if chosen.mode == 'resident' else chosen.mode}" in out


def test_plan_cli_sampling_input_errors(capsys):
    from hcustom_mc.plan.__main__ import main

    common = ["--sample", "--model", "13b", "--size", "1280x720", "--frames", "129"]
    assert main(common) == 2
    assert "--sample needs --gpu-memory" in capsys.readouterr().err
    assert main(common + ["--gpu-memory", "80GB", "--pp", "2"]) == 2
    assert "--pp: training flag(s)" in capsys.readouterr().err
    assert main(common + ["--gpu-memory", "8GB"]) == 1  # nothing fits
    assert "choice: nothing fits" in capsys.readouterr().out


def test_plan_cli_json(choices, capsys):
    import json

    from hcustom_mc.plan.__main__ import main

    assert main(["--sample", "--model", "13b", "--size", "1280x720", "--frames", "129", "--gpu-memory", "24GB",
                 "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["chosen"] == [choices[24].chosen.mode, choices[24].chosen.weights]
    assert [r["fits"] for r in data["rows"]] == [r.fits for r in choices[24].rows]
    assert data["reason"] == choices[24].reason


def test_resolve_offload_flags():
    from hcustom_mc.inference.memory import resolve_offload

    cpu = torch.device("cpu")
    assert resolve_offload("none", [], _cfg("tiny"), torch.float32, cpu, 1, 1, 1)[0] == "resident"
    assert resolve_offload("blocks", [], _cfg("tiny"), torch.float32, cpu, 1, 1, 1)[0] == "blocks"
    mode, why = resolve_offload("auto", [], _cfg("tiny"), torch.float32, cpu, 1, 1, 1)
    assert mode == "resident" and "CPU" in why
    with pytest.raises(ValueError, match="auto, none, encoders or blocks"):
        resolve_offload("all", [], _cfg("tiny"), torch.float32, cpu, 1, 1, 1)


@pytest.mark.parametrize("free_gb,mode", [(200, "resident"), (60, "blocks"), (24, "blocks")])
def test_auto_on_a_gpu_takes_the_planner_choice_and_the_fit_check_follows_it(monkeypatch, free_gb, mode):
    """`--offload auto` on a (stand-in) GPU with `free_gb` free: the mode the planner picks for the job in bf16, and
    check_jobs_fit then measures the job in that mode; 16 GB free is too little for any mode (the encoders not
    counted: no folders given, as the fit check reads their files)."""
    import hcustom_mc.inference.memory as memory
    from hcustom_mc.inference.inputs import InputError, SampleJob, resolve_job

    job = resolve_job(SampleJob(task="identity", prompt="p", subjects=[("man", "man.png")], height=720, width=1280,
                                frames=129))
    cfg = _cfg()
    gpu = torch.device("cuda", 0)
    monkeypatch.setattr(memory, "available_bytes", lambda device: (free_gb * GB, "free memory of a stand-in GPU"))
    got, why = memory.resolve_offload("auto", [job], cfg, torch.bfloat16, gpu, 1, 1, 1)
    choice = memory.choose_mode(cfg, memory.JobSize.of(job), int(free_gb * GB * memory.HEADROOM), weights=("bf16",),
                                encoders={})  # no encoder folders given: none counted, as check_jobs_fit
    assert got == mode == choice.chosen.mode and why == f"auto (free memory of a stand-in GPU): {choice.reason}"
    memory.check_jobs_fit([job], cfg, torch.bfloat16, gpu, 1, 1, 1, mode=got)
    if mode != "resident":
        with pytest.raises(InputError, match=r"resident bf16, denoise\).*or --offload blocks"):
            memory.check_jobs_fit([job], cfg, torch.bfloat16, gpu, 1, 1, 1, mode="resident")
    monkeypatch.setattr(memory, "available_bytes", lambda device: (16 * GB, "free memory of a stand-in GPU"))
    with pytest.raises(InputError, match=r"job 0 \(1280x720, 129 frames\) needs about .*blocks bf16 \(ahead 1\), denoise"):
        memory.check_jobs_fit([job], cfg, torch.bfloat16, gpu, 1, 1, 1, mode="blocks")
