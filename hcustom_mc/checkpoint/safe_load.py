"""Reading megatron-core distributed checkpoints without ever running code stored in them.

What megatron-core 0.16 and 0.19 (over torch 2.13 distributed checkpointing) read from a checkpoint folder:

    metadata.json   json.load (megatron `maybe_load_config`)                              safe as is
    .metadata       plain `pickle.load` (torch `FileSystemReader.read_metadata`)          -> restricted unpickler
    common.pt       `torch.load(path)`, no weights_only (megatron `load_common`; 0.19 writes the common state
                    into the .distcp files instead but still reads a common.pt it finds)  -> weights_only forced
    <key>.pt        ShardedObject files, `torch.load(path)` (megatron `load_sharded_objects`) -> weights_only forced
    __R_K.distcp    tensors: torch.load(weights_only=True) (torch); BYTE_IO items: torch.load(weights_only=False)
                    in `DefaultLoadPlanner.load_bytes`                                    -> weights_only forced

`install_safe_readers()` replaces those readers process-wide (idempotent); `preflight(folder)` reads the
same files once, up front, so a damaged or malicious file fails with a `CheckpointReadError` that names
it instead of a traceback from deep inside a collective. `dist_load` / `dist_load_tensors_metadata` are
the only way the project calls megatron's loaders. (MultiStorageClient paths, `msc.torch.load`, are not
used by this project and not covered.)
"""

from __future__ import annotations

import io
import json
import pickle
import re
import types
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint.api import CheckpointException  # a BaseException: caught by name

from hcustom_mc.checkpoint.release import CheckpointFormatError

METADATA_FILE = ".metadata"
COMMON_FILE = "common.pt"
MCORE_CONFIG_FILE = "metadata.json"
DAMAGED_FIX = "the file is damaged or was not written by a complete save: load an older checkpoint (iter_*) or re-save it"


class CheckpointReadError(CheckpointFormatError):
    """A checkpoint file that cannot be read (damaged) or must not be read (unsafe); the message names it."""


class UnsafeCheckpointError(CheckpointReadError):
    """A checkpoint file that would need arbitrary unpickling: refused, nothing in it was run."""


# ----------------------------------------------------------------------------- the .metadata allowlist
def _allowed_globals() -> dict[tuple[str, str], Any]:
    """Every global a torch/megatron `.metadata` pickle needs, enumerated from saved checkpoints
    (training: model + fully_reshardable optimizer; converter: model only; fp32 and bf16): the
    torch.distributed.checkpoint dataclasses and enums, torch.Size, dtypes, and the layout lookup."""
    import torch.distributed.checkpoint.filesystem as fs
    import torch.distributed.checkpoint.metadata as md
    import torch.distributed.checkpoint.planner as pl
    import torch.serialization as ser

    allowed = {}
    for module, names in ((md, ("Metadata", "TensorStorageMetadata", "BytesStorageMetadata", "TensorProperties",
                                "ChunkStorageMetadata", "MetadataIndex", "StorageMeta", "_MEM_FORMAT_ENCODING")),
                          (pl, ("SavePlan", "WriteItem", "WriteItemType", "TensorWriteData", "BytesIOWriteData")),
                          (fs, ("_StorageInfo",))):
        for name in names:
            if hasattr(module, name):
                allowed[(module.__name__, name)] = getattr(module, name)
    # _get_layout maps a layout's name ("torch.strided") to the layout object: a lookup, nothing else
    allowed[("torch.serialization", "_get_layout")] = ser._get_layout
    allowed[("torch", "Size")] = torch.Size
    for name in dir(torch):  # dtypes are pickled by reference, e.g. torch.bfloat16
        if isinstance(getattr(torch, name, None), torch.dtype):
            allowed[("torch", name)] = getattr(torch, name)
    allowed[("collections", "OrderedDict")] = __import__("collections").OrderedDict
    return allowed


_ALLOWED: dict[tuple[str, str], Any] | None = None


class _MetadataUnpickler(pickle.Unpickler):
    def __init__(self, file, source: str):
        super().__init__(file)
        self.source = source

    def find_class(self, module: str, name: str):
        global _ALLOWED
        if _ALLOWED is None:
            _ALLOWED = _allowed_globals()
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise UnsafeCheckpointError(
                f"refusing to load {self.source}: it references {module}.{name}, which checkpoint metadata never "
                f"needs (only torch.distributed.checkpoint metadata classes, torch.Size and dtypes are allowed); "
                f"nothing in the file was run. Do not use this checkpoint unless you know who wrote it.") from None

    def persistent_load(self, pid):
        raise UnsafeCheckpointError(f"refusing to load {self.source}: persistent ids are not part of checkpoint metadata")


def load_metadata_file(path: str | Path):
    """The torch.distributed.checkpoint `Metadata` in `path`, unpickled with the allowlist above."""
    from torch.distributed.checkpoint.metadata import Metadata

    path = Path(path)
    try:
        with open(path, "rb") as f:
            meta = _MetadataUnpickler(f, str(path)).load()
    except CheckpointReadError:
        raise
    except FileNotFoundError:
        raise CheckpointReadError(f"{path} is missing: the checkpoint is incomplete ({DAMAGED_FIX})") from None
    except Exception as exc:  # EOFError, UnpicklingError, UnicodeDecodeError, ValueError, ...
        raise CheckpointReadError(f"cannot read {path} ({type(exc).__name__}: {exc}): {DAMAGED_FIX}") from None
    if not isinstance(meta, Metadata):
        raise CheckpointReadError(f"{path} holds a {type(meta).__name__}, not checkpoint metadata: {DAMAGED_FIX}")
    return meta


def weights_only_load(path_or_file, source: str | None = None, **kwargs) -> Any:
    """torch.load restricted to tensors and plain containers; errors name the file."""
    source = source or str(path_or_file)
    kwargs.pop("weights_only", None)
    kwargs.setdefault("map_location", "cpu")
    try:
        return torch.load(path_or_file, weights_only=True, **kwargs)
    except FileNotFoundError:
        raise
    except pickle.UnpicklingError as exc:
        text = " ".join(str(exc).split())
        # torch words it "Unsupported global: GLOBAL x" or "Trying to load unsupported GLOBAL x whose module is blocked"
        found = re.search(r"(unsupported global[^.]*|unsupported operand[^.]*)", text, re.IGNORECASE)
        if found:
            raise UnsafeCheckpointError(f"refusing to load {source}: it holds pickled Python objects other than tensors "
                                        f"and plain containers ({found.group(1)[:200]}); nothing in it was run") from None
        raise CheckpointReadError(f"cannot read {source} (UnpicklingError: {text[:200]}): {DAMAGED_FIX}") from None
    except Exception as exc:  # EOFError, RuntimeError (zip), UnicodeDecodeError, ...
        raise CheckpointReadError(f"cannot read {source} ({type(exc).__name__}: {str(exc)[:200]}): {DAMAGED_FIX}") from None


def read_json(path: str | Path) -> Any:
    """json.loads of a checkpoint file; a damaged one raises CheckpointReadError naming it."""
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointReadError(f"{path} is missing: the checkpoint is incomplete ({DAMAGED_FIX})") from None
    except (UnicodeDecodeError, json.JSONDecodeError, OSError) as exc:
        raise CheckpointReadError(f"cannot read {path} ({type(exc).__name__}: {exc}): {DAMAGED_FIX}") from None


# ----------------------------------------------------------------------------- the process-wide readers
class _WeightsOnlyTorch(types.ModuleType):
    """Stands in for `torch` inside the modules that call `torch.load` on checkpoint files."""

    def __init__(self):
        super().__init__("torch")

    def __getattr__(self, name):
        return getattr(torch, name)

    @staticmethod
    def load(f, *args, **kwargs):
        source = str(f) if isinstance(f, (str, Path)) else "a pickled item inside a .distcp file"
        return weights_only_load(f, source, *args, **kwargs)


def install_safe_readers() -> None:
    """Make every reader megatron-core and torch use on a checkpoint folder safe (idempotent)."""
    import megatron.core.dist_checkpointing.strategies.common as mcore_common
    import torch.distributed.checkpoint.default_planner as planner
    from torch.distributed.checkpoint.filesystem import FileSystemReader
    from torch.distributed.checkpoint.metadata import StorageMeta

    if getattr(FileSystemReader.read_metadata, "__hcustom_safe__", False):
        return

    def read_metadata(self, *args, **kwargs):
        # the same as torch's, with the allowlist unpickler in place of pickle.load
        path = self._get_metadata_path(kwargs.get("rank"))
        with self.fs.create_stream(path, "rb") as stream:
            data = stream.read()
        metadata = _load_metadata_bytes(data, str(path))
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata

    read_metadata.__hcustom_safe__ = True
    FileSystemReader.read_metadata = read_metadata
    shim = _WeightsOnlyTorch()
    mcore_common.torch = shim  # common.pt and ShardedObject files (megatron-core 0.16)
    if hasattr(mcore_common, "maybe_msc"):  # 0.19 reads a legacy common.pt through maybe_msc.torch.load
        mcore_common.maybe_msc = _SafeStorageClient(mcore_common.maybe_msc, shim)
    planner.torch = shim  # BYTE_IO items in .distcp files


class _SafeStorageClient:
    """megatron's MaybeMultiStorageClient with `torch` replaced by the weights-only shim."""

    def __init__(self, inner, shim):
        self._inner, self._shim = inner, shim

    def __getattr__(self, name):
        return self._shim if name == "torch" else getattr(self._inner, name)


def _load_metadata_bytes(data: bytes, source: str):
    from torch.distributed.checkpoint.metadata import Metadata

    try:
        meta = _MetadataUnpickler(io.BytesIO(data), source).load()
    except CheckpointReadError:
        raise
    except Exception as exc:
        raise CheckpointReadError(f"cannot read {source} ({type(exc).__name__}: {exc}): {DAMAGED_FIX}") from None
    if not isinstance(meta, Metadata):
        raise CheckpointReadError(f"{source} holds a {type(meta).__name__}, not checkpoint metadata: {DAMAGED_FIX}")
    return meta


def storage_problems(folder: str | Path, meta=None) -> list[str]:
    """Data files of `folder` that are missing or shorter than the byte ranges its `.metadata` records (a check
    that needs no manifest). A `.metadata` that cannot be read safely is itself the problem."""
    folder = Path(folder)
    if meta is None:
        try:
            meta = load_metadata_file(folder / METADATA_FILE)
        except CheckpointReadError as exc:
            return [str(exc)]
    need: dict[str, int] = {}
    for info in (getattr(meta, "storage_data", None) or {}).values():
        rel = str(getattr(info, "relative_path", ""))
        need[rel] = max(need.get(rel, 0), int(getattr(info, "offset", 0)) + int(getattr(info, "length", 0)))
    problems = []
    for rel, end in sorted(need.items()):
        path = folder / rel
        if Path(rel).is_absolute() or ".." in Path(rel).parts:
            problems.append(f"{folder / METADATA_FILE} points at {rel!r}, outside the checkpoint folder")
        elif not path.is_file():
            problems.append(f"{path} is missing ({DAMAGED_FIX})")
        elif path.stat().st_size < end:
            problems.append(f"{path} has {path.stat().st_size} bytes, its .metadata needs {end} (truncated: {DAMAGED_FIX})")
    return problems


def preflight(folder: str | Path) -> None:
    """Read every small file megatron will read from `folder`, safely, before any collective load: a damaged
    or unsafe file raises here, on every rank alike, naming the file."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointReadError(f"{folder} is not a checkpoint folder")
    config = read_json(folder / MCORE_CONFIG_FILE)
    if not isinstance(config, dict) or "sharded_backend" not in config:
        raise CheckpointReadError(f"{folder / MCORE_CONFIG_FILE} is not megatron-core checkpoint metadata: {DAMAGED_FIX}")
    problems = storage_problems(folder, load_metadata_file(folder / METADATA_FILE))
    if problems:
        raise CheckpointReadError("; ".join(problems))
    for pt in sorted(folder.rglob("*.pt")):  # common.pt, ShardedObject files, our rng/ files
        weights_only_load(pt)


def _translate(exc: BaseException, folder: Path) -> BaseException:
    """Find our own error inside torch/megatron wrappers (CheckpointException gathers per-rank failures)."""
    seen, todo = set(), [exc]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, CheckpointReadError):
            return e
        failures = getattr(e, "failures", None)  # torch CheckpointException: {rank: exception}
        if isinstance(failures, dict):  # {rank: (exception, traceback summary)}
            todo += [v[0] if isinstance(v, tuple) else v for v in failures.values()]
        todo += [e.__cause__, e.__context__]
    return CheckpointReadError(f"cannot load the checkpoint in {folder} ({type(exc).__name__}: "
                               f"{' '.join(str(exc).split())[:400]}): {DAMAGED_FIX}")


def dist_load(sharded_state_dict: dict, folder: str | Path, strict: str):
    """megatron `dist_checkpointing.load`, safely (collective)."""
    from megatron.core import dist_checkpointing

    install_safe_readers()
    folder = Path(folder)
    preflight(folder)
    try:
        return dist_checkpointing.load(sharded_state_dict, str(folder), strict=strict)
    except CheckpointReadError:
        raise
    except (CheckpointException, ValueError, RuntimeError, OSError, EOFError, pickle.UnpicklingError) as exc:
        # (megatron's CheckpointingException for mismatched keys is none of these and passes through)
        raise _translate(exc, folder) from exc


def dist_load_tensors_metadata(folder: str | Path) -> dict:
    """megatron `dist_checkpointing.load_tensors_metadata`, safely."""
    from megatron.core import dist_checkpointing

    install_safe_readers()
    folder = Path(folder)
    preflight(folder)
    try:
        return dist_checkpointing.load_tensors_metadata(str(folder))
    except CheckpointReadError:
        raise
    except (CheckpointException, Exception) as exc:
        raise _translate(exc, folder) from exc
