"""Sequence parallelism with TP (parallel/sequence.py): the layout helpers, the model's forward + backward at
TP2 + SP, and 3 training steps at TP2 + SP (+ CP2, + LoRA) equal the single-process run, on sequence
lengths that are not multiples of TP x CP (each stream is then padded on the SP ranks)."""

import json

import pytest
import torch

from hcustom_mc.parallel.sequence import SequenceLayout
from tests.conftest import tiny_inputs
from tests.test_training_parity import BASE, assert_same_history, train
from tests.torchrun import torchrun

# -------------------------------------------------------------------------------- layout helpers


def test_layout_shards_each_stream_and_reindexing_round_trips():
    seq = SequenceLayout(image_len=5, text_len=3, tp=2)  # padded to 6 + 4: local rows [3 image ; 2 text]
    assert (seq.image_pad, seq.text_pad, seq.local_image, seq.local_rows, seq.padded) == (6, 4, 3, 5, True)
    x = torch.arange(8.0).reshape(8, 1, 1) + 1  # [image 1..5 ; text 6..8], no zero among the real rows
    padded = seq.pad(x)
    assert padded.flatten().tolist() == [1, 2, 3, 4, 5, 0, 6, 7, 8, 0]
    assert torch.equal(seq.unpad(padded), x)
    gathered = seq.interleave(padded)  # what rank r's scatter keeps: rows [5r, 5r + 5)
    assert gathered.flatten().tolist() == [1, 2, 3, 6, 7, 4, 5, 0, 8, 0]
    assert torch.equal(seq.streams(gathered), padded)
    img, txt = seq.split(gathered[5:])  # rank 1's local rows
    assert img.flatten().tolist() == [4, 5, 0] and txt.flatten().tolist() == [8, 0]


def test_layout_without_sequence_parallel_is_the_identity():
    seq = SequenceLayout.build(image_len=5, text_len=3, sequence_parallel=False)
    x = torch.randn(8, 2, 4)
    for op in (seq.pad, seq.unpad, seq.interleave, seq.streams, seq.scatter, seq.gather, seq.replicated):
        assert op(x) is x
    img, txt = seq.split(x)
    assert torch.equal(img, x[:5]) and torch.equal(txt, x[5:]) and seq.local_rows == 8


def test_sequence_parallel_needs_tensor_parallel():
    from hcustom_mc.model.config import ConfigError
    from hcustom_mc.parallel.config import ParallelConfig

    with pytest.raises(ConfigError, match="sequence_parallel needs tensor_parallel > 1"):
        ParallelConfig(sequence_parallel=True).validate(2)
    ParallelConfig(tensor_parallel=2, sequence_parallel=True).validate(2)


# -------------------------------------------------------------------------------- model forward + backward


@pytest.mark.parametrize("variant, mode, identity, frames", [
    ("audio", "release", 1, 2),  # (1 + 2) frames x 3x3 = 27 image tokens, 7 text; audio leaves the SP region
    ("editing", "paper", 2, 3),  # 45 image tokens, 7 text, video condition
])
def test_model_tp2_sp_equals_single_process(single_process, tmp_path, variant, mode, identity, frames):
    from hcustom_mc.model import HunyuanCustomDiT, get_model_config, initialize_weights
    from hcustom_mc.parallel.sharding import full_state_dict

    cfg = get_model_config("tiny", variant, mode=mode, max_identity_images=1 if mode == "release" else 3)
    model = HunyuanCustomDiT(cfg)
    initialize_weights(model, seed=11, zero_init=False)
    inputs = tiny_inputs(cfg, identity=identity, frames=frames, height=6, width=6, seed=2)
    torch.save(model.weight_state_dict(), tmp_path / "weights.pt")
    torch.save(inputs, tmp_path / "inputs.pt")
    out = model(**inputs)
    loss = (out.float() ** 2).mean()
    loss.backward()
    grads = full_state_dict(model, grads=True)

    torchrun(2, "tests/dist_scripts/model_parity.py", tmp_path / "weights.pt", tmp_path / "inputs.pt",
             tmp_path / "sp.pt", 2, variant, mode, "sp")
    got = torch.load(tmp_path / "sp.pt", weights_only=True)
    image_len = (identity + frames) * 9
    assert got["layout"] == [image_len, 7, 2, True]  # odd lengths: both streams padded on the SP ranks
    assert got["sp_linears"] and all(got["sp_linears"])
    torch.testing.assert_close(got["out"], out.detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got["loss"], loss.detach(), atol=1e-6, rtol=1e-5)
    assert set(got["grads"]) == set(grads)
    for name, grad in grads.items():
        err = (got["grads"][name] - grad).norm()
        assert err <= 1e-4 * grad.norm() + 1e-12, f"{name}: |diff| {err:.3g} vs |grad| {grad.norm():.3g}"


# -------------------------------------------------------------------------------- training parity

# 6x6 latents: 3 frames (1 identity + 2 video) x 3x3 = 27 image tokens, 7 text tokens; under CP2 the
# shards hold 18 and 9 image tokens: no stream length is a multiple of TP (2) or TP x CP (4)
ODD = ["--set", "data.latent_height=6", "--set", "data.latent_width=6", "--set", "data.text_len=7"]
SP = ["--tensor-model-parallel-size", 2, "--sequence-parallel"]
LORA = ["--lora-rank", 4, "--lora-alpha", 8]


def train_sp(nproc, run_dir, *args) -> dict:
    out = torchrun(nproc, "pretrain_custom.py", *BASE, "--run-dir", run_dir, *ODD, *map(str, args))
    assert "sequence parallel: on" in out, out[-3000:]
    return json.loads((run_dir / "history.json").read_text())


@pytest.fixture(scope="module")
def reference_odd(tmp_path_factory):
    return train(1, tmp_path_factory.mktemp("single_odd"), *ODD)


LAYOUTS = {
    "tp2_sp": (2, SP),
    "tp2_sp_cp2_ring": (4, [*SP, "--context-parallel-size", 2, "--cp-comm-type", "ring"]),
    "tp2_sp_cp2_ulysses": (4, [*SP, "--context-parallel-size", 2, "--cp-comm-type", "ulysses"]),
    "tp2_sp_pp2": (4, [*SP, "--pipeline-model-parallel-size", 2]),  # stages pass this rank's SP rows
    # selective recompute frees and refills the SP linears' local inputs (and the interleaved linear2 input)
    "tp2_sp_selective": (2, [*SP, "--recompute-granularity", "selective"]),
}


@pytest.mark.parametrize("layout", ["tp2_sp", *[pytest.param(n, marks=pytest.mark.slow) for n in LAYOUTS if n != "tp2_sp"]])
def test_sp_layout_equals_single_process(reference_odd, tmp_path, layout):
    nproc, args = LAYOUTS[layout]
    assert_same_history(train_sp(nproc, tmp_path, *args), reference_odd)


@pytest.fixture(scope="module")
def reference_odd_lora(tmp_path_factory):
    return train(1, tmp_path_factory.mktemp("single_odd_lora"), *ODD, *LORA)


def test_lora_tp2_sp_equals_single_process(reference_odd_lora, tmp_path):
    assert_same_history(train_sp(2, tmp_path, *SP, *LORA), reference_odd_lora)
