"""Bucketed global-batch sampling: every global batch holds samples of one shape group only.

A *group* is everything that must agree for samples to stack into one tensor: task, bucket H x W,
frame count, number of identity images. The caller computes a string key per sample; keys map to
integer ids in sorted order, so the ids (and hence the batches) never depend on dataset order
quirks such as dict iteration.

Epoch `e` of the index is a pure function of (group ids, global batch, seed, e):
  1. the members of each group are shuffled (stream `(seed, e, GROUP, group id)`),
  2. cut into full global batches per group (the remainder is dropped, or with drop_last=False
     topped up from the start of the group's own shuffled members),
  3. the order of all batches is shuffled (stream `(seed, e, ORDER, 0)`).
So within an epoch a sample of a full group appears at most once, and a resumed run only needs
(epoch, position) to continue with exactly the batches an uninterrupted run would have drawn.

The shuffles use a PRNG defined here and in csrc/bucket_index.cpp identically (splitmix64 streams,
Fisher-Yates with an unbiased bounded integer), so the C++ builder and the pure-Python fallback give
bit-identical indices. The C++ one (`hcustom_mc._bucket_index`, an optional extension built by
setup.py) is used when present; HCUSTOM_INDEX_BUILDER=python|cpp forces one.
"""

from __future__ import annotations

import hashlib
import json
import logging
import operator
import os
from collections.abc import Iterator, Sequence

import numpy as np

log = logging.getLogger("hcustom_mc")

# Bump together with kAlgorithm in csrc/bucket_index.cpp whenever the index it produces changes: an
# extension built from older sources is then refused instead of silently disagreeing with Python.
ALGORITHM = "splitmix64-fisher-yates-v1"

_MASK = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15
_KEY_INIT = 0x6863757374626B74  # "hcustbkt"
_TAG_GROUP, _TAG_ORDER, _TAG_REPLACE = 1, 2, 3


# ----------------------------------------------------------------------------------------------
# The PRNG (mirrors csrc/bucket_index.cpp; all arithmetic modulo 2**64)


def _mix64(z: int) -> int:
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK
    return z ^ (z >> 31)


def _mix64_np(z: np.ndarray) -> np.ndarray:
    # uint64 array arithmetic wraps silently, which is exactly the modulo-2**64 the C++ side does
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def _key(a: int, b: int, c: int, d: int) -> int:
    """The seed of one independent stream; negative or huge parts are taken modulo 2**64."""
    h = _KEY_INIT
    for x in (a, b, c, d):
        h = _mix64(((h ^ (x & _MASK)) + _GOLDEN) & _MASK)
    return h


class _Stream:
    """splitmix64: draw i (1-based) of the stream with key k is mix64(k + i * GOLDEN)."""

    def __init__(self, key: int):
        self.state = key & _MASK

    def next(self) -> int:
        self.state = (self.state + _GOLDEN) & _MASK
        return _mix64(self.state)

    def below(self, n: int) -> int:
        """Unbiased integer in [0, n): draws under 2**64 mod n are rejected so every residue is equally likely."""
        threshold = (1 << 64) % n
        while True:
            r = self.next()
            if r >= threshold:
                return r % n


def _shuffle(values: np.ndarray, key: int) -> np.ndarray:
    """Fisher-Yates, i = n-1 .. 1: swap(a[i], a[below(i + 1)]), same draws as the C++ `shuffle`."""
    n = len(values)
    out = values.tolist()
    if n < 2:
        return np.array(out, dtype=np.int64)
    # Fast path: the draws of a splitmix64 stream are independent of each other, so all n-1 of them come
    # from one vectorised expression; only the swaps themselves are sequential.
    bounds = np.arange(n, 1, -1, dtype=np.uint64)  # i + 1 for i = n-1 .. 1
    draws = _mix64_np(np.uint64(key) + np.arange(1, n, dtype=np.uint64) * np.uint64(_GOLDEN))
    if np.any(draws < (np.uint64(0) - bounds) % bounds):
        # A rejection (odds ~ n / 2**64 per draw) shifts every later draw: replay the stream one by one.
        stream = _Stream(key)
        js = [stream.below(i + 1) for i in range(n - 1, 0, -1)]
    else:
        js = (draws % bounds).tolist()
    for i, j in zip(range(n - 1, 0, -1), js):
        out[i], out[j] = out[j], out[i]
    return np.array(out, dtype=np.int64)


# ----------------------------------------------------------------------------------------------
# The two builders


def _check_args(group_ids, global_batch, seed, epoch) -> tuple[np.ndarray, int, int, int]:
    ids = np.asarray(group_ids)
    if ids.size == 0:
        ids = ids.astype(np.int64)  # np.asarray([]) is float64
    if ids.ndim != 1:
        raise ValueError(f"group_ids must be one-dimensional, got shape {ids.shape}")
    if ids.dtype.kind not in "iu":
        raise TypeError(f"group_ids must be integers, got dtype {ids.dtype}")
    if ids.dtype == np.uint64 and ids.size and int(ids.max()) > np.iinfo(np.int64).max:
        raise ValueError("group_ids must fit in int64")
    global_batch, seed, epoch = operator.index(global_batch), operator.index(seed), operator.index(epoch)
    if global_batch < 1:
        raise ValueError(f"global_batch must be >= 1, got {global_batch}")
    if epoch < 0:
        raise ValueError(f"epoch must be >= 0, got {epoch}")
    return np.ascontiguousarray(ids, dtype=np.int64), global_batch, seed, epoch


def build_batch_index_python(group_ids, global_batch: int, seed: int, epoch: int, drop_last: bool = True) -> np.ndarray:
    """The pure-Python/numpy builder; same arguments and result as `build_batch_index`."""
    ids, B, seed, epoch = _check_args(group_ids, global_batch, seed, epoch)
    order = np.argsort(ids, kind="stable")  # members in ascending index order, groups in ascending id order
    sorted_ids = ids[order]
    chunks = []
    for members in np.split(order, np.flatnonzero(np.diff(sorted_ids)) + 1) if len(ids) else []:
        shuffled = _shuffle(members, _key(seed, epoch, _TAG_GROUP, int(ids[members[0]])))
        m = len(shuffled)
        nb = m // B if drop_last else -(-m // B)
        chunks.append(shuffled[np.arange(nb * B) % m])  # % m: the drop_last=False top-up wraps around
    grouped = np.concatenate(chunks).reshape(-1, B) if chunks else np.empty((0, B), dtype=np.int64)
    # Shuffling a permutation of batch numbers makes the same swaps as shuffling the rows themselves.
    perm = _shuffle(np.arange(len(grouped), dtype=np.int64), _key(seed, epoch, _TAG_ORDER, 0))
    return grouped[perm]


def _load_extension():
    try:
        from hcustom_mc import _bucket_index
    except ImportError as e:
        return None, f"hcustom_mc._bucket_index is not built ({e}); `pip install -e .` with a C++17 compiler builds it"
    if getattr(_bucket_index, "ALGORITHM", None) != ALGORITHM:
        return None, (
            f"hcustom_mc._bucket_index implements {getattr(_bucket_index, 'ALGORITHM', '?')!r}, this module "
            f"{ALGORITHM!r}: the build is stale, rebuild with `pip install -e .`"
        )
    return _bucket_index, None


_EXT, _EXT_PROBLEM = _load_extension()


def cpp_available() -> bool:
    return _EXT is not None


def build_batch_index_cpp(group_ids, global_batch: int, seed: int, epoch: int, drop_last: bool = True) -> np.ndarray:
    """The C++ builder; same arguments and result as `build_batch_index`. RuntimeError when not built."""
    if _EXT is None:
        raise RuntimeError(f"the C++ batch index builder is unavailable: {_EXT_PROBLEM}")
    ids, B, seed, epoch = _check_args(group_ids, global_batch, seed, epoch)
    raw = _EXT.build_batch_index(ids, B, seed, epoch, bool(drop_last))
    # frombuffer is read-only over the bytes object; callers get an ordinary writable array
    return np.frombuffer(raw, dtype=np.int64).reshape(-1, B).copy()


def _choose_builder() -> str:
    forced = os.environ.get("HCUSTOM_INDEX_BUILDER", "").strip().lower()
    if forced not in ("", "cpp", "python"):
        raise ValueError(f"HCUSTOM_INDEX_BUILDER must be 'cpp' or 'python', got {forced!r}")
    if forced == "cpp" and _EXT is None:
        raise RuntimeError(f"HCUSTOM_INDEX_BUILDER=cpp but {_EXT_PROBLEM}")
    if forced == "python":
        log.info("batch index builder: Python fallback (forced by HCUSTOM_INDEX_BUILDER=python)")
        return "python"
    if _EXT is None:
        log.info("batch index builder: Python fallback (%s)", _EXT_PROBLEM)
        return "python"
    log.info("batch index builder: C++ (hcustom_mc._bucket_index)")
    return "cpp"


INDEX_BUILDER = _choose_builder()  # "cpp" or "python", fixed at import


def build_batch_index(group_ids, global_batch: int, seed: int, epoch: int, drop_last: bool = True) -> np.ndarray:
    """The epoch's global batches: int64 [num_batches, global_batch] of sample indices, one group per row.

    group_ids: one integer per sample (list or 1-D array); seed: any int (used modulo 2**64); epoch >= 0.
    drop_last=True drops each group's remainder (and groups smaller than global_batch entirely);
    drop_last=False tops the last batch of a group up with the group's first shuffled members.
    """
    build = build_batch_index_cpp if INDEX_BUILDER == "cpp" else build_batch_index_python
    return build(group_ids, global_batch, seed, epoch, drop_last)


# ----------------------------------------------------------------------------------------------
# The sampler training uses


def group_ids_from_keys(group_keys: Sequence[str]) -> tuple[list[str], np.ndarray]:
    """(sorted distinct keys, int64 id per sample) with id = position of the sample's key in the sorted list."""
    keys = list(group_keys)
    bad = next((i for i, k in enumerate(keys) if not isinstance(k, str)), None)
    if bad is not None:
        raise TypeError(f"group keys must be strings; sample {bad} has {type(keys[bad]).__name__}")
    names = sorted(set(keys))
    lookup = {k: i for i, k in enumerate(names)}
    return names, np.fromiter((lookup[k] for k in keys), dtype=np.int64, count=len(keys))


class BucketBatchSampler:
    """Global batches forever: epoch e is `build_batch_index(ids, global_batch, seed, e)`, read row by row.

    The position (epoch, batches taken in that epoch) is the whole state, so `state_dict` is tiny and
    resuming is exact. Groups smaller than global_batch are reported once and their samples never used.
    """

    def __init__(self, group_keys: Sequence[str], global_batch: int, seed: int):
        self.global_batch = operator.index(global_batch)
        if self.global_batch < 1:
            raise ValueError(f"global_batch must be >= 1, got {global_batch}")
        self.seed = operator.index(seed)
        self.group_names, self.group_ids = group_ids_from_keys(group_keys)
        if not len(self.group_ids):
            raise ValueError("BucketBatchSampler needs at least one sample, got an empty list of group keys")
        counts = np.bincount(self.group_ids, minlength=len(self.group_names))
        self.unused_groups = {k: int(c) for k, c in zip(self.group_names, counts) if c < self.global_batch}
        if self.unused_groups:
            listed = ", ".join(f"{k!r} ({c})" for k, c in list(self.unused_groups.items())[:20])
            more = len(self.unused_groups) - 20
            log.warning(
                "%d group(s) have fewer samples than global_batch=%d and are not used (%d samples): %s%s",
                len(self.unused_groups), self.global_batch, sum(self.unused_groups.values()), listed,
                f" and {more} more" if more > 0 else "",
            )
        self.batches_per_epoch = int(np.sum(counts // self.global_batch))
        if self.batches_per_epoch == 0:
            raise ValueError(
                f"no group has global_batch={self.global_batch} samples (largest has {int(counts.max())}): "
                "lower the global batch or coarsen the buckets"
            )
        # For replacement(): each group's members in ascending order and every sample's rank among them.
        order = np.argsort(self.group_ids, kind="stable")
        self._members = np.split(order, np.cumsum(counts)[:-1])
        self._rank = np.empty(len(order), dtype=np.int64)
        self._rank[order] = np.arange(len(order)) - np.repeat(np.cumsum(counts) - counts, counts)
        self.fingerprint = hashlib.sha256(
            json.dumps([self.global_batch, list(group_keys)], separators=(",", ":")).encode()
        ).hexdigest()
        self.epoch, self.position = 0, 0
        self._cached: tuple[int, np.ndarray] | None = None

    def _index(self, epoch: int) -> np.ndarray:
        if self._cached is None or self._cached[0] != epoch:
            self._cached = (epoch, build_batch_index(self.group_ids, self.global_batch, self.seed, epoch))
        return self._cached[1]

    def _row(self, index: np.ndarray, position: int) -> tuple[str, list[int]]:
        row = index[position]
        return self.group_names[self.group_ids[row[0]]], row.tolist()

    @property
    def step(self) -> int:
        """Global batches handed out so far (across epochs)."""
        return self.epoch * self.batches_per_epoch + self.position

    def next_batch(self) -> tuple[str, list[int]]:
        """(group key, global_batch sample indices); moves to the next epoch when this one is used up."""
        if self.position >= self.batches_per_epoch:
            self.epoch, self.position = self.epoch + 1, 0
        batch = self._row(self._index(self.epoch), self.position)
        self.position += 1
        return batch

    def __iter__(self) -> Iterator[tuple[str, list[int]]]:
        while True:
            yield self.next_batch()

    def global_batch_at(self, step: int) -> tuple[str, list[int]]:
        """The batch `next_batch` returns as the step-th call (0-based) from a fresh sampler; no state change.

        Every epoch holds the same number of batches, so step -> (epoch, position) is a division.
        """
        step = operator.index(step)
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        epoch, position = divmod(step, self.batches_per_epoch)
        if self._cached is not None and self._cached[0] == epoch:
            index = self._cached[1]
        else:  # built aside, so random access never evicts the epoch next_batch is reading
            index = build_batch_index(self.group_ids, self.global_batch, self.seed, epoch)
        return self._row(index, position)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed, "fingerprint": self.fingerprint}

    def load_state_dict(self, state: dict) -> None:
        missing = {"epoch", "position", "seed", "fingerprint"} - set(state)
        if missing:
            raise ValueError(f"sampler state is missing {sorted(missing)} (got keys {sorted(state)})")
        if state["fingerprint"] != self.fingerprint:
            raise ValueError(
                "the dataset changed since this sampler state was saved (group keys per sample or global_batch "
                f"differ: fingerprint {str(state['fingerprint'])[:12]}... != {self.fingerprint[:12]}...); resuming "
                "would not continue the saved run's batches. Restore the original manifest/buckets/global batch, "
                "or start the data order afresh"
            )
        if int(state["seed"]) != self.seed:
            raise ValueError(f"sampler state was saved with seed {state['seed']}, this sampler has seed {self.seed}")
        epoch, position = int(state["epoch"]), int(state["position"])
        if epoch < 0 or not 0 <= position <= self.batches_per_epoch:
            raise ValueError(
                f"invalid sampler state: epoch {epoch}, position {position} (epoch has {self.batches_per_epoch} batches)"
            )
        self.epoch, self.position = epoch, position

    def replacement(self, index: int, attempt: int) -> int:
        """A member of `index`'s group other than `index`, a pure function of (seed, index, attempt).

        Used when sample `index` cannot be read, so its batch keeps one shape. Attempts 0, 1, ... walk the
        other members from a seeded starting point: the first (group size - 1) attempts are all distinct,
        so retrying after a second broken sample never loops on it.
        """
        index, attempt = operator.index(index), operator.index(attempt)
        if not 0 <= index < len(self.group_ids):
            raise IndexError(f"sample {index} out of range [0, {len(self.group_ids)})")
        if attempt < 0:
            raise ValueError(f"attempt must be >= 0, got {attempt}")
        members = self._members[self.group_ids[index]]
        others = len(members) - 1
        if others == 0:
            raise ValueError(
                f"sample {index} is the only member of group {self.group_names[self.group_ids[index]]!r}: "
                "there is no replacement with the same shape"
            )
        start = _Stream(_key(self.seed, _TAG_REPLACE, index, 0)).below(others)
        k = (start + attempt) % others
        return int(members[k if k < self._rank[index] else k + 1])  # skip `index` itself
