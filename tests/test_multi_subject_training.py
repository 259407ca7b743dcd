"""Multi-subject fine-tuning (issue 24, training): a release-format checkpoint fine-tuned in paper mode on K = 1..3
identity images.

- RoPE: the positions of the k-th identity image, written here from the paper's equations 1-2, against
  hcustom_mc/model/rope.py, against the rotation the model applies in a forward, and against the fused kernel;
  and the `release_spatial` option (the paper's time index, the release's spatial offsets).
- Per-subject null-condition dropout: each subject drops on its own draw, to the null (white) identity latent.
- Mixed K: a manifest of K = 1, 2 and 3 samples through the bucketed sampler: no step mixes K or pads subjects.
- Parity: `--pretrained` tiny release checkpoint -> paper mode, K in {1, 2, 3}: TP 2 and CP 2 give the losses and
  gradient norms of one process (fp32 tolerance).
"""

import json
import math
import subprocess
import sys

import pytest
import torch

from tests.conftest import tiny_inputs
from tests.torchrun import REPO, child_pythonpath, torchrun

THETA = 256.0


# ------------------------------------------------------------------ the paper's positions, written from its text
def paper_positions(K: int, frames: int, Hp: int, Wp: int) -> list[tuple[int, int, int]]:
    """(t, h, w) of every image token in sequence order [image 1 ; ... ; image K ; video frames], from the paper.

    Section 3.2: a video token at frame f, width index i, height index j gets RoPE(f, i, j). Eq. 1-2: the k-th
    identity image's token (i, j) gets RoPE_{z_I,k}(f, i, j) = RoPE(-k, i + w, j + h), w and h the latent width and
    height. The model's axes are (t, h, w) and its tokens run row (height) by row, so a token at row r and column c
    of image k sits at (t, h, w) = (-k, r + h, c + w) = (-k, r + Hp, c + Wp)."""
    out = []
    for k in range(1, K + 1):
        for r in range(Hp):  # height index j = r
            for c in range(Wp):  # width index i = c
                i, j, w, h = c, r, Wp, Hp
                t_, width_pos, height_pos = -k, i + w, j + h  # RoPE(-k, i + w, j + h)
                out.append((t_, height_pos, width_pos))
    out += [(f, r, c) for f in range(frames) for r in range(Hp) for c in range(Wp)]  # RoPE(f, i, j)
    return out


def release_spatial_positions(K: int, frames: int, Hp: int, Wp: int) -> list[tuple[int, int, int]]:
    """The paper's time index -k with the released code's spatial offsets (facts 2.2: h = i, w = j + W')."""
    ids = [(-k, r, c + Wp) for k in range(1, K + 1) for r in range(Hp) for c in range(Wp)]
    return ids + [(f, r, c) for f in range(frames) for r in range(Hp) for c in range(Wp)]


EXPECTED = {"paper": paper_positions, "release_spatial": release_spatial_positions}


def applied_positions(before: torch.Tensor, after: torch.Tensor, dims) -> torch.Tensor:
    """The (t, h, w) positions a rotation applied, read off the rotation itself: for each adjacent pair (2i, 2i+1)
    the angle between the vector before and after, which HunyuanVideo's 3D RoPE sets to pos * theta^(-2i/d) per axis.

    before/after: [S, ...rest, D] (rest averaged). Each axis's position comes from its lowest frequency (no wrap for
    |pos| < pi / freq), and every other pair of the axis is checked to agree with it."""
    z0 = torch.view_as_complex(before.double().unflatten(-1, (-1, 2)).contiguous())
    z1 = torch.view_as_complex(after.double().unflatten(-1, (-1, 2)).contiguous())
    angle = torch.angle(z1 * z0.conj())  # [S, ..., D/2]
    angle = torch.angle(torch.polar(torch.ones_like(angle), angle).flatten(1, -2).mean(1))  # one angle per pair
    positions, start = [], 0
    for d in dims:
        freqs = THETA ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
        part = angle[:, start : start + d // 2]
        pos = part[:, -1] / freqs[-1]
        assert (pos - pos.round()).abs().max() < 1e-3, "a rotation that is no whole position"
        pos = pos.round()
        wrapped = torch.remainder(part - pos[:, None] * freqs + math.pi, 2 * math.pi) - math.pi
        assert wrapped.abs().max() < 1e-4, "the axis's pairs disagree on the position"
        positions.append(pos)
        start += d // 2
    return torch.stack(positions, -1).long()


@pytest.mark.parametrize("identity_rope", ["paper", "release_spatial"])
@pytest.mark.parametrize("K", [1, 2, 3])
def test_rope_module_positions_are_the_papers(K, identity_rope):
    from hcustom_mc.model.rope import image_positions

    f, Hp, Wp = 2, 3, 4
    got = image_positions(K, f, Hp, Wp, "paper", identity_rope=identity_rope)
    assert [tuple(p) for p in got.tolist()] == EXPECTED[identity_rope](K, f, Hp, Wp)
    assert [t for t, _, _ in got.tolist()[: K * Hp * Wp : Hp * Wp]] == [-k for k in range(1, K + 1)]


@pytest.mark.parametrize("identity_rope", ["paper", "release_spatial"])
def test_the_model_applies_the_papers_positions_in_a_forward(single_process, monkeypatch, identity_rope):
    """A paper-mode forward with K = 3: the rotation of every image token of every block (double and single) is that
    of the paper's position (t = -k for image k). Read off the rotated q, not from our position tables."""
    from hcustom_mc.model import HunyuanCustomDiT, get_model_config
    from hcustom_mc.model.init import initialize_weights
    from hcustom_mc.model.ops import Rotary

    cfg = get_model_config("tiny", "base", mode="paper", max_identity_images=3, identity_rope=identity_rope)
    model = HunyuanCustomDiT(cfg)
    initialize_weights(model, seed=0, zero_init=False)
    seen = []
    original = Rotary.norm_and_rotate

    def spy(self, q, k, q_norm, k_norm, image_len):
        q_out, k_out = original(self, q, k, q_norm, k_norm, image_len)
        if image_len:
            seen.append((q_norm(q)[:image_len].detach(), q_out[:image_len].detach()))
        return q_out, k_out

    monkeypatch.setattr(Rotary, "norm_and_rotate", spy)
    K, frames, h, w = 3, 2, 4, 6  # latent 4 x 6 -> token grid 2 x 3
    with torch.no_grad():
        model(**tiny_inputs(cfg, frames=frames, height=h, width=w, identity=K))
    assert len(seen) == cfg.num_double_blocks + cfg.num_single_blocks
    want = torch.tensor(EXPECTED[identity_rope](K, frames, h // 2, w // 2))
    for before, after in seen:
        assert torch.equal(applied_positions(before, after, cfg.rope_dims), want)


@pytest.mark.parametrize("identity_rope", ["paper", "release_spatial"])
def test_the_fused_kernel_applies_the_papers_positions(kernel_device, identity_rope):
    """The Triton kernel (the model's path on GPUs; interpreted on CPU), on a CP rank's frames too."""
    from hcustom_kernels.rope import qk_norm_rope

    K, grid, dims = 3, (2, 2, 3), (4, 6, 6)
    hw = grid[1] * grid[2]
    want = torch.tensor(EXPECTED[identity_rope](K, grid[0], grid[1], grid[2]))
    for first, count in ((0, K + grid[0]), (2, 3)):  # all frames; a rank holding image 3 and the video
        g = torch.Generator().manual_seed(first)
        q = torch.randn(count * hw + 2, 1, 2, sum(dims), generator=g).to(kernel_device)
        ones = torch.ones(sum(dims), device=kernel_device)
        out, _ = qk_norm_rope(q, q.clone(), ones, ones, grid=grid, num_identity=K, mode="paper", rope_dims=dims,
                              eps=1e-6, image_len=count * hw, frame_offset=first, identity_rope=identity_rope)
        normed = q * torch.rsqrt(q.pow(2).mean(-1, keepdim=True) + 1e-6)
        got = applied_positions(normed[: count * hw].cpu(), out[: count * hw].cpu(), dims)
        assert torch.equal(got, want[first * hw : (first + count) * hw])


def test_release_spatial_is_a_paper_mode_option():
    from hcustom_mc.model import get_model_config
    from hcustom_mc.model.config import ConfigError
    from hcustom_mc.training.config import build_config

    with pytest.raises(ConfigError, match="paper-mode option"):
        get_model_config("tiny", "base", identity_rope="release_spatial")
    with pytest.raises(ConfigError, match=r"identity_rope must be one of \('paper', 'release_spatial'\)"):
        get_model_config("tiny", "base", mode="paper", identity_rope="paper_spatial")
    with pytest.raises(ConfigError, match=r"--identity-rope\) is a paper-mode option: add --mode paper"):
        build_config(["--identity-rope", "release_spatial"]).validate(1)
    cfg = build_config(["--mode", "paper", "--identity-rope", "release_spatial", "--max-identity-images", "2"])
    model_cfg = cfg.validate(1).model_config()
    assert (model_cfg.identity_rope, model_cfg.max_identity_images) == ("release_spatial", 2)
    assert build_config(["--mode", "paper"]).model_config().identity_rope == "paper"  # the paper's by default


# ------------------------------------------------------------------ per-subject null-condition dropout
def _three_subject_batch(identity_drop: float, rows: int):
    from hcustom_mc.data.synthetic import SyntheticLatentDataset, collate
    from hcustom_mc.model import get_model_config
    from hcustom_mc.training.config import DataConfig

    model_cfg = get_model_config("tiny", "base", mode="paper", max_identity_images=3)
    data = DataConfig(task_weights={"multi_identity": 1.0}, text_drop=0.0, identity_drop=identity_drop, audio_drop=0.0,
                      seed=1234)
    ds = SyntheticLatentDataset(model_cfg, data)
    sample = ds[next(i for i in range(len(ds)) if ds.identity_count(i) == 3)]
    nulls = ds.null_conditions()
    return data, nulls, collate([sample] * rows), nulls.identity_for(1, data.latent_height, data.latent_width)[:, 0]


def _dropped(ids: torch.Tensor, original: torch.Tensor, white: torch.Tensor) -> torch.Tensor:
    """[rows, K] bool: which subjects hold the null image; every other subject must hold its own image, unchanged."""
    is_white = (ids == white[None, :, None]).flatten(3).all(-1).all(1)
    is_own = (ids == original[:, :, :]).flatten(3).all(-1).all(1)
    assert (is_white ^ is_own).all(), "a subject that is neither its own image nor the null image"
    return is_white


def test_identity_dropout_is_per_subject_with_the_null_image():
    """Fixed seed, 32 samples of K = 3 at identity_drop 0.5: subjects drop one by one (some samples lose one or two
    of their three images, not all or none), each dropped subject holds exactly the null identity (the white image's
    latent: what the sampler's unconditional identity branch feeds), the others their own image, K stays 3 and the
    text, pooled text and latents are untouched. A sample drops the same way wherever it sits in the batch (keys)."""
    from hcustom_mc.data.synthetic import drop_conditions

    data, nulls, batch, white = _three_subject_batch(0.5, 32)
    before = {k: v.clone() for k, v in batch.items()}
    assert not (before["identity_latents"][0] == white[:, None]).all(0).flatten(1).all(-1).any()  # none white yet
    keys = [(7, p) for p in range(32)]
    drop_conditions(batch, data, keys, nulls)
    ids = batch["identity_latents"]
    assert ids.shape == before["identity_latents"].shape and ids.shape[2] == 3
    dropped = _dropped(ids, before["identity_latents"], white)
    per_sample = dropped.sum(1)
    assert ((per_sample == 1) | (per_sample == 2)).any(), dropped  # some but not all of a sample's subjects
    assert len({tuple(r) for r in dropped.tolist()}) >= 5, dropped  # many patterns: one draw per subject
    assert all(torch.equal(batch[k], before[k]) for k in batch if k != "identity_latents")
    # the same keys in another order (another layout's micro batches): the same subjects drop
    again = {k: v.clone() for k, v in before.items()}
    drop_conditions(again, data, keys[::-1], nulls)
    assert torch.equal(_dropped(again["identity_latents"], before["identity_latents"], white), dropped.flip(0))


def test_subjects_drop_independently_at_the_configured_rate():
    """Over many samples each subject drops at identity_drop, and two subjects drop together at the product of their
    rates (independent draws), not at identity_drop (which one draw for the whole sample would give)."""
    from hcustom_mc.data.synthetic import drop_conditions

    n = 4000
    data, nulls, batch, white = _three_subject_batch(0.3, n)
    before = batch["identity_latents"].clone()
    drop_conditions(batch, data, [(s, 0) for s in range(n)], nulls)
    dropped = _dropped(batch["identity_latents"], before, white)
    rates = dropped.double().mean(0)
    assert ((rates - 0.3).abs() < 0.03).all(), rates
    for a, b in ((0, 1), (0, 2), (1, 2)):
        both = (dropped[:, a] & dropped[:, b]).double().mean()
        assert abs(both - 0.09) < 0.02, (a, b, both)  # 0.3 * 0.3
    assert abs(dropped.all(1).double().mean() - 0.027) < 0.01  # all three: 0.3 ** 3


# ------------------------------------------------------------------ mixed K: one K per step, no padding
def test_a_manifest_of_k_1_to_3_batches_one_k_per_step_without_padding(tmp_path):
    """A real tiny dataset (videos, subject crops) with K = 1, 2 and 3 samples, indexed by the manifest dataset and
    drawn by the bucketed sampler: every global batch is one K, and every sample's identity latents have exactly
    its manifest's number of subjects (no padded subject), encoded by the tiny encoders through BatchMaker."""
    from hcustom_mc.data.manifest import load_manifest
    from hcustom_mc.data.tiny_dataset import make_tiny_dataset
    from hcustom_mc.encoders.tiny import save_tiny_encoders
    from hcustom_mc.model import get_model_config
    from hcustom_mc.training.batches import BatchMaker
    from hcustom_mc.training.config import build_config

    root = tmp_path / "data"
    make_tiny_dataset(root, num_samples=12, size="32x32", frames=5, tasks=("identity", "multi_identity"),
                      multi_subjects=(2, 3))
    counts = [len(e.subjects) for e in load_manifest(root / "manifest.jsonl")]
    assert sorted(set(counts)) == [1, 2, 3]
    enc = save_tiny_encoders(tmp_path / "enc", get_model_config("tiny", "base"))
    cfg = build_config(["--mode", "paper", "--data-type", "manifest", "--data-path", str(root / "manifest.jsonl"),
                        "--global-batch-size", "2", "--micro-batch-size", "1",
                        "--set", "data.task_weights={identity: 1.0, multi_identity: 1.0}",
                        "--set", f"data.encoders={{llava: {enc['llava']}, clip: {enc['clip']}, vae: {enc['vae']}}}",
                        "--set", "data.frames=5", "--set", "data.short_side=32", "--set", "data.text_len=256",
                        "--set", "data.identity_drop=0.0", "--set", "data.text_drop=0.0"])
    cfg.validate(1)
    maker = BatchMaker(cfg, cfg.model_config(), dp_rank=0, dp_size=1, num_micro=2, log_events=False)
    groups = {maker.dataset.group_of(i) for i in range(len(maker.dataset))}
    k_of = {str(e.video): len(e.subjects) for e in maker.dataset.entries}
    assert {g.rsplit("|", 1)[1] for g in groups} == {"1id", "2id", "3id"}
    seen = set()
    for step in range(1, maker.sampler.batches_per_epoch + 1):
        _, micro = maker.microbatches(step)
        ks = {mb["inputs"]["identity_latents"].shape[2] for mb in micro}
        assert len(ks) == 1, f"step {step} mixes K {ks}"
        want = {k_of[str(n)] for mbs in maker.sources for n in mbs}
        assert want == ks, f"step {step}: samples with {want} subjects batched as K = {ks}"
        seen |= ks
    assert seen == {1, 2, 3} and not maker.bad.seen  # every K drawn, no sample replaced


# ------------------------------------------------------------------ parity: TP 2 and CP 2 equal one process
@pytest.fixture(scope="module")
def release(tmp_path_factory):
    """examples/make_tiny_release.py's checkpoint, rescaled like trained weights: RMSNorm weights 1 and matrices of
    std 1/sqrt(fan_in) instead of 0.02 everywhere. At std 0.02 the q/k norms shrink every attention logit to ~0 and
    the identity tokens' positions move the loss by ~1e-7, below the parity tolerance; rescaled, the two position
    options differ by ~1e-2 (checked in the slow test), so a layout that misplaced identity tokens would fail."""
    from hcustom_mc.checkpoint.release import load_release_state_dict, save_release_state_dict

    made = tmp_path_factory.mktemp("made")
    proc = subprocess.run([sys.executable, "examples/make_tiny_release.py", str(made), "--variant", "base"], cwd=REPO,
                          capture_output=True, text=True, timeout=300,
                          env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin", "PYTHONPATH": child_pythonpath()})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    weights = {}
    for name, t in load_release_state_dict(made, load_key="module").items():
        if name.endswith("norm.weight"):
            t = torch.ones_like(t)
        elif t.ndim >= 2:
            t = t / (0.02 * math.sqrt(t[0].numel()))
        weights[name] = t.clone()
    out = tmp_path_factory.mktemp("release")
    save_release_state_dict(weights, out)
    return out


STEPS = 4
SEED = 1238  # data seed whose first STEPS steps draw K = 3, 3, 1, 2 (test_the_parity_runs_see_k_1_2_and_3)


def run_args(release, identity_rope="paper") -> list[str]:
    return ["--config", "examples/tiny_3d.yaml", "--variant", "base", "--mode", "paper", "--max-identity-images", "3",
            "--identity-rope", identity_rope, "--pretrained", str(release), "--train-iters", str(STEPS),
            "--seed", str(SEED),
            "--set", "data.task_weights={identity: 1.0, multi_identity: 2.0}", "--set", "data.identity_drop=0.3",
            "--set", "checkpoint.save_interval=0", "--set", "logging.log_interval=1"]


def train(nproc: int, run_dir, *args) -> dict:
    argv = [*map(str, args), "--run-dir", str(run_dir)]
    if nproc == 1:
        proc = subprocess.run([sys.executable, "pretrain_custom.py", *argv], cwd=REPO, capture_output=True, text=True,
                              timeout=600, env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin",
                                                "PYTHONPATH": child_pythonpath()})
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    else:
        torchrun(nproc, "pretrain_custom.py", *argv)
    return json.loads((run_dir / "history.json").read_text())


def test_the_parity_runs_see_k_1_2_and_3():
    """The steps of the runs below (the synthetic sampler is a pure function of seed and step) cover every K."""
    from hcustom_mc.data.synthetic import SyntheticLatentDataset, TaskBatchSampler
    from hcustom_mc.training.config import build_config

    cfg = build_config(run_args(REPO))
    ds = SyntheticLatentDataset(cfg.model_config(), cfg.data)
    sampler = TaskBatchSampler(ds, cfg.data.task_weights, cfg.global_batch_size, cfg.data.seed)
    ks = [{ds.identity_count(i) for i in sampler.global_batch_indices(step)[1]} for step in range(1, STEPS + 1)]
    assert all(len(k) == 1 for k in ks) and set().union(*ks) == {1, 2, 3}, ks


@pytest.fixture(scope="module")
def reference(release, tmp_path_factory):
    return train(1, tmp_path_factory.mktemp("single"), *run_args(release))


def assert_same_history(got, reference):
    assert len(got["losses"]) == len(reference["losses"]) == STEPS
    for name in ("losses", "grad_norms"):
        for step, (a, b) in enumerate(zip(got[name], reference[name]), 1):
            assert abs(a - b) <= 1e-5 * abs(b) + 1e-6, f"step {step} {name} {a} != {b}"


LAYOUTS = {"tp2": ["--tensor-model-parallel-size", 2], "cp2": ["--context-parallel-size", 2, "--cp-comm-type", "ring"]}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_release_checkpoint_fine_tuned_to_k_subjects_equals_one_process(release, reference, tmp_path, layout):
    assert_same_history(train(2, tmp_path, *run_args(release), *LAYOUTS[layout]), reference)


@pytest.mark.slow
def test_release_spatial_positions_at_cp2_and_tp2_cp2_equal_one_process_and_are_saved(release, reference, tmp_path):
    """The other position option, saved with the checkpoint's model config, which the sampler reads back. Its losses
    differ from the paper positions' far beyond the parity tolerance: the parity tests see where identity tokens sit."""
    from hcustom_mc.inference.pipeline import model_config_for, resolve_checkpoint

    args = run_args(release, "release_spatial")
    ref = train(1, tmp_path / "one", *args, "--save", tmp_path / "ck")
    assert max(abs(a - b) / abs(b) for a, b in zip(ref["losses"], reference["losses"])) > 1e-3
    fmt, path = resolve_checkpoint(tmp_path / "ck", "auto", "full")
    assert model_config_for(path, fmt, None).identity_rope == "release_spatial"
    # the sampler takes the saved positions; a flag that contradicts them is refused before anything loads
    proc = subprocess.run([sys.executable, "-m", "hcustom_mc.sample", "--checkpoint", str(tmp_path / "ck"),
                           "--identity-rope", "paper", "--out", str(tmp_path / "samples")], cwd=REPO, capture_output=True,
                          text=True, timeout=300, env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin",
                                                       "PYTHONPATH": child_pythonpath()})
    assert proc.returncode != 0 and "was trained with identity_rope=release_spatial" in proc.stdout + proc.stderr
    assert_same_history(train(2, tmp_path / "cp2", *args, "--context-parallel-size", 2, "--cp-comm-type", "ulysses"), ref)
    assert_same_history(train(4, tmp_path / "tp2cp2", *args, "--tensor-model-parallel-size", 2,
                              "--context-parallel-size", 2), ref)
