"""What every entry point prints: rank 0 speaks, the other ranks report only their own errors.

- `setup(verbose)`: logging (rank 0 at INFO, other ranks at ERROR) and a warnings hook that counts the known
  third-party warnings (KNOWN_WARNINGS) instead of printing them; `--verbose` shows them, and every rank's.
- `ArgumentParser`: a misspelt flag is one line (with the closest flag), printed once under torchrun.
- `report_error(message)`: an error every rank hits in the same way is printed once (by rank 0); a rank whose
  message differs prints its own. Every rank waits (bounded) for the others first, so torchrun does not stop a
  rank before it has spoken.
- `log_once(message)`: a choice made on every call (a backend, a fallback), logged the first time only.
- `run_entry_point(main, errors)`: the one way an entry point's `__main__` runs `main()` and ends the process
  (the expected errors reported as above, exit 2; any other error is a traceback).

Nothing here imports torch at module level: the parsers use it before `--help` returns.
"""

from __future__ import annotations

import argparse
import datetime
import difflib
import functools
import logging
import os
import re
import sys
import time
import warnings
from collections import Counter
from typing import Callable, NoReturn

# Warnings megatron-core, torch and mlflow give on every CPU / no-Apex / no-TE run; nothing the user can act on.
KNOWN_WARNINGS = tuple(re.compile(p) for p in (
    r"Transformer Engine and Apex are not installed",
    r"Apex is not installed",
    r"full scope is deprecated",
    r"`torch\.distributed\.\w+` is deprecated",  # megatron still calls the old collective names
    r"`load_state_dict` is deprecated and will be removed",  # megatron's dist-checkpoint loader (torch dcp)
    r"The \.grad attribute of a Tensor that is not a leaf Tensor",  # megatron's optimizer probes main_grad
    r"torch\.cuda\.amp\.\w+\(args\.\.\.\)` is deprecated",
    r"TypedStorage is deprecated",
    r"CUDA initialization|CUDA is not available",
    r"No device id is provided via `init_process_group` or `barrier`",
    # megatron-core 0.19's own calls: its loader calls torch dcp with a positional reader and no_dist=True, its
    # synchronous save goes through its deprecated 'mcore' async path, and it asks for absl-py, which it does not declare
    r"The argument order of load has been changed",
    r"torch\.distributed is disabled, unavailable or uninitialized, assuming the intent is to (load|save) in a single",
    r"MCore's async save is deprecated",
    r"absl\.logging is not installed",
    r"MimoModelConfig is experimental",  # megatron-core 0.19 defines it at import, whether used or not
    # torch's CUDA build (what PyPI serves on Linux) on a machine without a GPU, once per process
    r"No CUDA runtime is found, using CUDA_HOME",
    # insightface's face alignment (face_sim) calls scikit-image 0.26's deprecated SimilarityTransform.estimate
    r"`estimate` is deprecated since version 0\.26",
))
# third-party loggers that report routine steps at INFO (mlflow's "Creating initial MLflow database tables")
QUIET_LOGGERS = ("mlflow", "alembic", "megatron", "urllib3", "git")
LOG_FORMAT = "%(asctime)s %(levelname)s %(message)s"

_hidden: Counter = Counter()
_verbose = False


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def verbose_requested(argv=None) -> bool:
    """`--verbose` in argv, looked at before the parsers run (the warnings hook goes in first)."""
    return "--verbose" in (sys.argv[1:] if argv is None else argv)


def setup(verbose: bool = False) -> None:
    """Console of this process: call first thing in an entry point's main()."""
    global _verbose
    _verbose = verbose
    main_rank = rank() == 0
    logging.basicConfig(level=logging.INFO if main_rank else (logging.WARNING if verbose else logging.ERROR),
                        format=LOG_FORMAT, datefmt="%H:%M:%S", force=True)
    quiet_third_party_loggers()
    for handler in logging.getLogger().handlers:
        handler.addFilter(_known_record)
    logging.getLogger("torch.utils.cpp_extension").addFilter(_known_record)  # torch's own handler, not the root's
    warnings.showwarning = _showwarning
    if not verbose:
        os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")  # c10's own warnings, for workers started later
        # transformers / huggingface_hub progress bars ("Loading weights", "Writing model shards") on every rank
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def quiet_third_party_loggers() -> None:
    """QUIET_LOGGERS at WARNING (INFO with --verbose); again after importing a library that sets its own level."""
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.INFO if _verbose else logging.WARNING)


def hidden_warnings() -> int:
    return sum(_hidden.values())


def hidden_note() -> str | None:
    """The summary's line about what was hidden, or None."""
    n = hidden_warnings()
    if not n:
        return None
    return f"{n} known third-party warning{'s' if n > 1 else ''} hidden on this rank (--verbose shows them)"


@functools.lru_cache(maxsize=None)
def log_once(message: str, logger: str = "hcustom_mc") -> None:
    """Log `message` at INFO the first time this process asks (`log_once.cache_clear()` forgets)."""
    logging.getLogger(logger).info(message)


def _is_known(text: str) -> bool:
    return any(p.search(text) for p in KNOWN_WARNINGS)


_show_original = warnings.showwarning


def _showwarning(message, category, filename, lineno, file=None, line=None):
    text = str(message)
    if not _verbose and (_is_known(text) or rank() != 0):
        _hidden[(category.__name__, text.splitlines()[0][:120] if text else "")] += 1
        return
    _show_original(message, category, filename, lineno, file, line)


def _known_record(record: logging.LogRecord) -> bool:
    """Logging filter: the same known warnings when a library logs them instead of warning."""
    if _verbose or record.levelno >= logging.ERROR or not _is_known(record.getMessage()):
        return True
    _hidden[("log", record.getMessage()[:120])] += 1
    return False


class ArgumentParser(argparse.ArgumentParser):
    """argparse with a one-line error: `PROG: error: MESSAGE (did you mean --x?); see --help`, exit 2.

    The stock parser prints the whole usage (dozens of lines here) on every rank."""

    def error(self, message):
        report_error(f"{self.prog}: error: {with_suggestion(message, self)}; see --help", key="hcustom_mc/usage_error")
        sys.exit(2)


def _option_strings(parser: argparse.ArgumentParser) -> list[str]:
    """Every flag of `parser` and of its subcommands (an unknown flag after a subcommand is reported by the
    top-level parser)."""
    flags = []
    for action in parser._actions:
        flags += action.option_strings
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                flags += _option_strings(sub)
    return flags


def with_suggestion(message: str, parser: argparse.ArgumentParser) -> str:
    """argparse's message, plus `(did you mean --x?)` for a misspelt flag."""
    unknown = re.match(r"unrecognized arguments: (\S+)", message)
    if unknown and unknown.group(1).startswith("--"):
        close = difflib.get_close_matches(unknown.group(1).split("=")[0], _option_strings(parser), n=1)
        if close:
            message += f" (did you mean {close[0]}?)"
    return message


def report_error(message: str, key: str = "hcustom_mc/error", timeout_s: float = 30.0) -> None:
    """Print `message` (an error this rank is about to exit on) once for all ranks that share it."""
    if world_size() == 1 or "MASTER_ADDR" not in os.environ or "MASTER_PORT" not in os.environ:
        print(message, file=sys.stderr, flush=True)
        return
    me, world = rank(), world_size()
    try:
        import torch.distributed as dist

        store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world, is_master=False,
                              timeout=datetime.timedelta(seconds=10))
        store.set(f"{key}/msg/{me}", message)
        _arrive(store, f"{key}/arrived", world, timeout_s)
        if me == 0:
            print(message, file=sys.stderr, flush=True)
        elif not store.check([f"{key}/msg/0"]) or store.get(f"{key}/msg/0").decode() != message:
            print(f"rank {me}: {message}", file=sys.stderr, flush=True)
        # nobody exits (and gets the others stopped by torchrun) before every rank has printed
        _arrive(store, f"{key}/printed", world, timeout_s)
    except Exception:  # the store is gone or unreachable: saying the error matters more than saying it once
        print(f"rank {me}: {message}", file=sys.stderr, flush=True)


def _arrive(store, key: str, world: int, timeout_s: float) -> None:
    arrived = store.add(key, 1)
    deadline = time.time() + timeout_s
    while arrived < world and time.time() < deadline:
        time.sleep(0.05)
        arrived = store.add(key, 0)


def exit_process(code: int = 0) -> NoReturn:
    """End an entry point that may have run torch.distributed: flush, then leave without interpreter finalization.

    With torch 2.13 + gloo a worker thread can still be releasing the last collective's tensors at
    interpreter shutdown; it then needs the GIL and aborts the process (intermittent, seen under
    load), turning a finished run into a crash. Everything is written and the process group is
    destroyed before this is called.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    logging.shutdown()
    os._exit(code)


def run_entry_point(main: Callable[[], int], errors: Callable[[], tuple] = tuple,
                    key: str = "hcustom_mc/error") -> NoReturn:
    """Run an entry point's `main()` and end the process with its code.

    `errors()` names the exception types that are the user's to fix (a bad flag, file or checkpoint): they are
    reported once for all ranks and exit 2. It is called only when something was raised, so the heavy modules
    that define those types are not imported for `--help`. A `SystemExit` with a message (an early input check)
    is reported the same way. When torch was imported, the process leaves through `exit_process`.
    """
    try:
        code = main()
    except SystemExit as exc:  # --help, argparse (already reported) and early checks that raise a message
        if exc.code is not None and not isinstance(exc.code, int):
            report_error(str(exc.code), key=key)
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 2)
    except Exception as exc:
        if not isinstance(exc, errors()):
            raise
        report_error(f"error: {exc}", key=key)
        code = 2
    if "torch" not in sys.modules:  # nothing distributed ran: a normal exit
        sys.exit(code)
    exit_process(code)
