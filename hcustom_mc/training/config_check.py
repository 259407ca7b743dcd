"""Every TrainConfig field checked for type and range before anything runs, with one message for all of them.

Types come from the dataclass annotations themselves (int, float, str, bool, `X | None`, list[str],
dict[str, float], nested dataclasses), so a field added to any section is type-checked without touching this
file; every float must be finite. Ranges live in RANGES, keyed by dotted field name; a field not listed
there has only its type checked. `field_errors(cfg)` returns the problems; TrainConfig.validate raises them.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass
from typing import Any

from hcustom_mc.checkpoint.verify_modes import VERIFY_MODES
from hcustom_mc.model.config import IDENTITY_ROPES


@dataclass(frozen=True)
class Range:
    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False  # lo itself is not allowed
    hi_open: bool = False

    def check(self, v) -> bool:
        if self.lo is not None and (v < self.lo or (self.lo_open and v == self.lo)):
            return False
        if self.hi is not None and (v > self.hi or (self.hi_open and v == self.hi)):
            return False
        return True

    def __str__(self) -> str:
        def num(v):
            return str(v) if isinstance(v, int) else f"{v:g}"

        lo = "" if self.lo is None else f"{'>' if self.lo_open else '>='} {num(self.lo)}"
        hi = "" if self.hi is None else f"{'<' if self.hi_open else '<='} {num(self.hi)}"
        return " and ".join(x for x in (lo, hi) if x)


POSITIVE, NON_NEGATIVE, AT_LEAST_1 = Range(0, lo_open=True), Range(0), Range(1)
PROBABILITY = Range(0, 1)
RANGES: dict[str, Range] = {
    "micro_batch_size": AT_LEAST_1, "global_batch_size": AT_LEAST_1, "train_steps": AT_LEAST_1,
    "exit_after_steps": AT_LEAST_1, "max_identity_images": AT_LEAST_1,
    "init_seed": Range(0, 2**32 - 1),  # times 1_000_003 plus a crc32 it must still fit torch's 64-bit seeds
    "parallel.tensor_parallel": AT_LEAST_1, "parallel.pipeline_parallel": AT_LEAST_1,
    "parallel.virtual_pipeline_parallel": AT_LEAST_1, "parallel.context_parallel": AT_LEAST_1,
    "optim.lr": NON_NEGATIVE, "optim.min_lr": NON_NEGATIVE, "optim.warmup_steps": NON_NEGATIVE,
    "optim.weight_decay": NON_NEGATIVE, "optim.adam_beta1": Range(0, 1, hi_open=True),
    "optim.adam_beta2": Range(0, 1, hi_open=True), "optim.adam_eps": POSITIVE,
    "optim.clip_grad": NON_NEGATIVE,  # 0 turns clipping off (megatron's convention)
    "objective.logit_std": POSITIVE, "objective.shift": POSITIVE,
    "validation.interval": NON_NEGATIVE, "validation.frames": AT_LEAST_1, "validation.text_len": AT_LEAST_1,
    "data.num_samples": AT_LEAST_1, "data.frames": AT_LEAST_1, "data.frame_stride": AT_LEAST_1,
    "data.short_side": Range(16), "data.audio_rate": AT_LEAST_1, "data.latent_height": AT_LEAST_1,
    "data.latent_width": AT_LEAST_1, "data.text_len": AT_LEAST_1, "data.text_drop": PROBABILITY,
    "data.identity_drop": PROBABILITY, "data.audio_drop": PROBABILITY, "data.max_bad_sample_retries": NON_NEGATIVE,
    "data.seed": NON_NEGATIVE, "data.task_weights.*": NON_NEGATIVE,
    "checkpoint.save_interval": NON_NEGATIVE,
    "checkpoint.keep_last": AT_LEAST_1,  # 0 would delete the checkpoint just written
    "logging.log_interval": AT_LEAST_1, "logging.peak_tflops": POSITIVE,
    "ema_decay": Range(0, 1, lo_open=True, hi_open=True), "skip_nonfinite_steps": NON_NEGATIVE,
}
CHOICES: dict[str, tuple] = {"checkpoint.verify": VERIFY_MODES, "identity_rope": IDENTITY_ROPES,
                             "checkpoint.pretrained_format": ("auto", "release", "diffusers", "mcore"),
                             "checkpoint.pretrained_key": ("module", "ema")}


def _type_name(t) -> str:
    if typing.get_origin(t) is not None:  # list[str], int | None
        return str(t).replace("typing.", "")
    return getattr(t, "__name__", None) or str(t)


def _matches(value, t) -> bool:
    origin = typing.get_origin(t)
    if t is Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, a) for a in typing.get_args(t))
    if t is type(None):
        return value is None
    if t is bool:
        return isinstance(value, bool)
    if t is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if t is float:  # YAML writes 1 for 1.0
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if origin in (list, tuple):
        args = typing.get_args(t)
        return isinstance(value, (list, tuple)) and (not args or all(_matches(v, args[0]) for v in value))
    if origin is dict:
        k, v = typing.get_args(t) or (Any, Any)
        return isinstance(value, dict) and all(_matches(a, k) and _matches(b, v) for a, b in value.items())
    if isinstance(t, type):
        return isinstance(value, t)
    return True  # an annotation this checker does not understand is not second-guessed


def _numbers(value, name: str):
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _numbers(v, f"{name}.{k}")
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        yield name, value


def field_errors(cfg, prefix: str = "") -> list[str]:
    """Every field of the dataclass `cfg` (recursively) with a wrong type, a non-finite float or a value out
    of range, as 'name: problem' lines."""
    errors: list[str] = []
    hints = typing.get_type_hints(type(cfg))
    for f in dataclasses.fields(cfg):
        name, value, t = prefix + f.name, getattr(cfg, f.name), hints.get(f.name, Any)
        if dataclasses.is_dataclass(t):
            if dataclasses.is_dataclass(value):
                errors += field_errors(value, name + ".")
            else:
                errors.append(f"{name}: expected a section of fields ({_type_name(t)}), got {value!r}")
            continue
        if not _matches(value, t):
            errors.append(f"{name}: expected {_type_name(t)}, got {type(value).__name__} {value!r}")
            continue
        for num_name, num in _numbers(value, name):
            if isinstance(num, float) and not math.isfinite(num):
                errors.append(f"{num_name}: must be a finite number, got {num!r}")
                continue
            rule = RANGES.get(num_name) or RANGES.get(name + ".*" if num_name != name else "")
            if rule is not None and not rule.check(num):
                errors.append(f"{num_name}: must be {rule}, got {num!r}")
        if name in CHOICES and value not in CHOICES[name]:
            errors.append(f"{name}: must be one of {', '.join(map(str, CHOICES[name]))}, got {value!r}")
    return errors
