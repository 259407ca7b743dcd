"""The bucketed batch index and sampler: one group per batch, determinism, C++ == Python, exact resume."""

import logging
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from hcustom_mc.data import sampler as S
from hcustom_mc.data.sampler import (
    BucketBatchSampler,
    build_batch_index,
    build_batch_index_cpp,
    build_batch_index_python,
    cpp_available,
    group_ids_from_keys,
)
from tests.torchrun import child_pythonpath

BUILDERS = [build_batch_index_python] + ([build_batch_index_cpp] if cpp_available() else [])
needs_cpp = pytest.mark.skipif(
    not cpp_available(), reason=f"C++ extension not built ({S._EXT_PROBLEM}); `pip install -e .` builds it"
)


def random_case(rng):
    n = int(rng.integers(0, 400))
    groups = int(rng.integers(1, 9))
    ids = rng.integers(-2, groups, n)  # negative ids are legal too
    return ids, int(rng.integers(1, 12)), int(rng.integers(-(2**63), 2**63)), int(rng.integers(0, 6))


def keys_for(rng, n, groups):
    shapes = ["t2v/48x64/17f/0id", "identity/48x64/17f/1id", "identity/64x48/17f/1id", "multi_identity/48x64/9f/2id",
              "audio/48x64/17f/1id", "editing/64x64/17f/0id"][:groups]
    return [shapes[int(g)] for g in rng.integers(0, groups, n)]


# ----------------------------------------------------------------------------------------------
# build_batch_index


@pytest.mark.parametrize("build", BUILDERS, ids=lambda b: b.__name__)
def test_batches_never_mix_groups_and_cover_each_sample_at_most_once(build):
    rng = np.random.default_rng(1)
    for _ in range(150):
        ids, B, seed, epoch = random_case(rng)
        index = build(ids, B, seed, epoch)
        assert index.dtype == np.int64 and index.shape[1] == B
        values, counts = np.unique(ids, return_counts=True)
        assert len(index) == int(np.sum(counts // B))  # every full batch of every group, remainders dropped
        assert all(len(set(ids[row].tolist())) == 1 for row in index)
        assert len(np.unique(index)) == index.size  # no sample twice within the epoch
        used = ids[index.ravel()]
        for g, c in zip(values, counts):
            assert np.sum(used == g) == (c // B) * B  # each group gives exactly its full batches


@pytest.mark.parametrize("build", BUILDERS, ids=lambda b: b.__name__)
def test_keep_remainder_tops_up_from_the_same_group(build):
    rng = np.random.default_rng(2)
    for _ in range(100):
        ids, B, seed, epoch = random_case(rng)
        index = build(ids, B, seed, epoch, drop_last=False)
        assert all(len(set(ids[row].tolist())) == 1 for row in index)
        assert set(index.ravel().tolist()) == set(range(len(ids)))  # every sample seen, small groups included
        assert len(index) == sum(-(-c // B) for c in np.unique(ids, return_counts=True)[1])


def test_deterministic_and_varies_with_epoch_and_seed():
    ids = np.random.default_rng(3).integers(0, 4, 500)
    a = build_batch_index(ids, 8, seed=5, epoch=0)
    assert np.array_equal(a, build_batch_index(ids.tolist(), 8, seed=5, epoch=0))
    assert not np.array_equal(a, build_batch_index(ids, 8, seed=5, epoch=1))
    assert not np.array_equal(a, build_batch_index(ids, 8, seed=6, epoch=0))
    # Same batches per epoch, only reshuffled: the group sizes fix how many batches each group gets.
    assert sorted(ids[build_batch_index(ids, 8, 5, 1)[:, 0]]) == sorted(ids[a[:, 0]])


def test_known_answer():
    """Pins the algorithm: resumed runs and saved sampler states rely on it. Changing the algorithm on purpose
    means bumping ALGORITHM here and kAlgorithm in csrc/bucket_index.cpp, then updating these numbers."""
    ids = [0, 1, 0, 1, 0, 1, 2, 2, 0]
    for build in BUILDERS:
        assert build(ids, 2, seed=1234, epoch=0).tolist() == [[4, 8], [0, 2], [1, 3], [7, 6]]
        assert build(ids, 2, seed=1234, epoch=1).tolist() == [[7, 6], [4, 2], [5, 3], [0, 8]]
        assert build(ids, 3, 1234, 0, drop_last=False).tolist() == [[8, 0, 2], [0, 2, 4], [1, 3, 5], [7, 6, 7]]


@needs_cpp
def test_cpp_and_python_builders_give_identical_arrays():
    rng = np.random.default_rng(4)
    for case in range(400):
        ids, B, seed, epoch = random_case(rng)
        drop_last = bool(case % 2)
        py = build_batch_index_python(ids, B, seed, epoch, drop_last)
        cpp = build_batch_index_cpp(ids, B, seed, epoch, drop_last)
        assert py.shape == cpp.shape and np.array_equal(py, cpp), (case, B, seed, epoch, drop_last)
    big = rng.integers(0, 37, 200_000)
    assert np.array_equal(build_batch_index_python(big, 16, 9, 3), build_batch_index_cpp(big, 16, 9, 3))
    # Other integer inputs reach the extension's sequence path, with the same result.
    assert np.array_equal(build_batch_index_cpp(big.astype(np.int32), 16, 9, 3), build_batch_index_python(big, 16, 9, 3))
    assert np.array_equal(S._EXT.build_batch_index(big[:999].tolist(), 4, 9, 3), build_batch_index_cpp(big[:999], 4, 9, 3).tobytes())


def test_extension_is_built_where_a_compiler_exists():
    if shutil.which("c++") is None and shutil.which("g++") is None:
        pytest.skip("no C++ compiler here, so the Python fallback is expected")
    assert cpp_available(), (
        f"a C++ compiler is present but the extension is unavailable: {S._EXT_PROBLEM}. Run `pip install -e .`"
    )


def test_vectorised_shuffle_matches_stream_replay():
    # The Python fast path computes all draws at once; it must equal drawing them one by one.
    rng = np.random.default_rng(5)
    for n in [0, 1, 2, 3, 10, 257, 1000]:
        key = int(rng.integers(0, 2**63)) * 2 + 1
        stream, ref = S._Stream(key), list(range(n))
        for i in range(n - 1, 0, -1):
            j = stream.below(i + 1)
            ref[i], ref[j] = ref[j], ref[i]
        assert S._shuffle(np.arange(n), key).tolist() == ref


def test_bounded_draw_rejects_the_biased_low_range():
    # n just above 2**63: about half of all 64-bit draws are under 2**64 mod n and must be rejected.
    n = 2**63 + 1
    stream, replay = S._Stream(77), S._Stream(77)
    for _ in range(200):
        got = stream.below(n)
        while (r := replay.next()) < (1 << 64) % n:
            pass
        assert got == r % n < n


def test_build_errors_and_empty_input():
    assert build_batch_index([], 4, 0, 0).shape == (0, 4)
    with pytest.raises(ValueError, match="global_batch must be >= 1"):
        build_batch_index([0, 1], 0, 0, 0)
    with pytest.raises(ValueError, match="epoch must be >= 0"):
        build_batch_index([0, 1], 1, 0, -1)
    with pytest.raises(ValueError, match="one-dimensional"):
        build_batch_index([[0, 1]], 1, 0, 0)
    with pytest.raises(TypeError, match="integers"):
        build_batch_index([0.5, 1.0], 1, 0, 0)


def test_env_var_forces_the_builder():
    def run(value, block_extension=False):
        block = (
            "import sys\nclass Block:\n def find_spec(self, name, *a):\n"
            "  if name == 'hcustom_mc._bucket_index': raise ImportError('blocked for the test')\n"
            "sys.meta_path.insert(0, Block())\n" if block_extension else ""
        )
        code = block + "import logging; logging.basicConfig(level=logging.INFO)\n" \
            "from hcustom_mc.data import sampler; print('BUILDER', sampler.INDEX_BUILDER)"
        env = {**os.environ, "HCUSTOM_INDEX_BUILDER": value, "PYTHONPATH": child_pythonpath()}
        return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)

    out = run("python")
    assert "BUILDER python" in out.stdout and "Python fallback (forced" in out.stderr
    out = run("cpp", block_extension=True)
    assert out.returncode != 0 and "HCUSTOM_INDEX_BUILDER=cpp but hcustom_mc._bucket_index is not built" in out.stderr
    out = run("", block_extension=True)
    assert "BUILDER python" in out.stdout and "Python fallback (hcustom_mc._bucket_index is not built" in out.stderr
    out = run("rust")
    assert out.returncode != 0 and "HCUSTOM_INDEX_BUILDER must be 'cpp' or 'python'" in out.stderr
    if cpp_available():
        out = run("cpp")
        assert "BUILDER cpp" in out.stdout and "batch index builder: C++" in out.stderr
        out = run("")
        assert "BUILDER cpp" in out.stdout


# ----------------------------------------------------------------------------------------------
# BucketBatchSampler


def test_group_keys_map_to_sorted_ids():
    names, ids = group_ids_from_keys(["b", "a", "c", "a"])
    assert names == ["a", "b", "c"] and ids.tolist() == [1, 0, 2, 0]


def test_sampler_batches_are_single_group_and_cross_epochs():
    rng = np.random.default_rng(6)
    keys = keys_for(rng, 300, 5)
    sampler = BucketBatchSampler(keys, global_batch=7, seed=11)
    bpe = sampler.batches_per_epoch
    seen = []
    for step in range(2 * bpe + 3):
        key, batch = sampler.next_batch()
        assert len(batch) == 7 and all(keys[i] == key for i in batch)
        assert (key, batch) == sampler.global_batch_at(step)
        seen.append(batch)
    first_epoch = [i for b in seen[:bpe] for i in b]
    assert len(first_epoch) == len(set(first_epoch))  # coverage: at most once within an epoch
    assert seen[:bpe] != seen[bpe : 2 * bpe]  # the next epoch is a new shuffle
    assert sampler.epoch == 2 and sampler.position == 3 and sampler.step == 2 * bpe + 3


@pytest.mark.parametrize("stop", ["mid", "last", "boundary", "next_epoch"])
def test_resume_continues_exactly(stop):
    rng = np.random.default_rng(7)
    keys = keys_for(rng, 120, 3)
    reference = BucketBatchSampler(keys, 4, seed=3)
    bpe = reference.batches_per_epoch
    n = {"mid": bpe // 2, "last": bpe - 1, "boundary": bpe, "next_epoch": bpe + 2}[stop]
    uninterrupted = [reference.next_batch() for _ in range(n + 2 * bpe)]

    first = BucketBatchSampler(keys, 4, seed=3)
    for _ in range(n):
        first.next_batch()
    state = first.state_dict()
    assert set(state) == {"epoch", "position", "seed", "fingerprint"}

    resumed = BucketBatchSampler(list(keys), 4, seed=3)
    resumed.load_state_dict(dict(state))
    assert [resumed.next_batch() for _ in range(2 * bpe)] == uninterrupted[n:]


def test_changed_dataset_or_batch_or_seed_is_refused():
    keys = ["a"] * 10 + ["b"] * 10
    state = BucketBatchSampler(keys, 4, seed=0).state_dict()
    for other in (BucketBatchSampler(keys[:-1] + ["a"], 4, 0), BucketBatchSampler(keys + ["b"], 4, 0),
                  BucketBatchSampler(keys, 5, 0)):
        with pytest.raises(ValueError, match="dataset changed"):
            other.load_state_dict(state)
    with pytest.raises(ValueError, match="seed"):
        BucketBatchSampler(keys, 4, seed=1).load_state_dict(state)
    with pytest.raises(ValueError, match="missing"):
        BucketBatchSampler(keys, 4, 0).load_state_dict({"epoch": 0})
    with pytest.raises(ValueError, match="invalid sampler state"):
        BucketBatchSampler(keys, 4, 0).load_state_dict({**state, "position": 99})


def test_replacement_stays_in_group_and_is_deterministic():
    rng = np.random.default_rng(8)
    keys = keys_for(rng, 200, 4)
    a, b = BucketBatchSampler(keys, 3, seed=21), BucketBatchSampler(keys, 3, seed=21)
    for index in range(0, 200, 7):
        group = [i for i, k in enumerate(keys) if k == keys[index]]
        picks = [a.replacement(index, attempt) for attempt in range(len(group) - 1)]
        assert picks == [b.replacement(index, t) for t in range(len(group) - 1)]
        assert all(keys[p] == keys[index] for p in picks) and index not in picks
        assert sorted(picks) == sorted(set(group) - {index})  # attempts walk all the other members
        assert a.replacement(index, len(group) - 1) == picks[0]  # then cycle
    starts = {BucketBatchSampler(keys, 3, seed=s).replacement(0, 0) for s in range(20)}
    assert len(starts) > 1  # the seed matters
    lonely = BucketBatchSampler(["x"] * 4 + ["y"], 2, 0)
    with pytest.raises(ValueError, match="only member"):
        lonely.replacement(4, 0)
    with pytest.raises(IndexError):
        lonely.replacement(5, 0)


def test_small_groups_are_reported_and_unused(caplog):
    keys = ["big"] * 9 + ["tiny"] * 2 + ["small"] * 3
    with caplog.at_level(logging.WARNING, logger="hcustom_mc"):
        sampler = BucketBatchSampler(keys, 4, seed=0)
    assert "2 group(s) have fewer samples than global_batch=4" in caplog.text
    assert "'small' (3)" in caplog.text and "'tiny' (2)" in caplog.text
    assert sampler.unused_groups == {"small": 3, "tiny": 2} and sampler.batches_per_epoch == 2
    assert {sampler.next_batch()[0] for _ in range(10)} == {"big"}


def test_sampler_argument_errors():
    with pytest.raises(ValueError, match="empty"):
        BucketBatchSampler([], 4, 0)
    with pytest.raises(ValueError, match="global_batch must be >= 1"):
        BucketBatchSampler(["a"], 0, 0)
    with pytest.raises(ValueError, match="no group has global_batch=8"):
        BucketBatchSampler(["a"] * 3 + ["b"] * 5, 8, 0)
    with pytest.raises(TypeError, match="strings"):
        BucketBatchSampler(["a", 3], 1, 0)
