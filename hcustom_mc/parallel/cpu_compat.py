"""Run megatron-core's training machinery on CPU / gloo.

megatron-core hard-codes CUDA in its pipeline schedules, DDP buffers, optimizers, gradient clipping,
RNG tracker, TP gather buffers and dist-checkpoint save (see cpu-machine-facts.md). On a machine
without CUDA we swap the module-level ``torch`` name inside exactly those modules for a proxy that:

* forwards every attribute to the real ``torch``;
* rewrites ``device="cuda"`` (and ``pin_memory=True``) in tensor factories to the CPU;
* exposes a ``cuda`` namespace whose ``current_device`` is the CPU, whose ``synchronize`` /
  ``empty_cache`` do nothing, whose RNG functions act on the CPU generator, and whose streams are
  null objects.

The optimizers also check ``tensor.type() == 'torch.cuda.FloatTensor'``; only while those specific
functions run, CPU tensors report the CUDA type name; gathering distributed-optimizer state always
uses the gloo group instead of `.cuda()` copies. Batched pipeline send/receive pairs go through
megatron's ordered point-to-point path, because gloo would match them by posting order. Finally, dist-checkpoint save collects its
write results through a spawned ``multiprocessing.Manager`` queue, which re-imports the launching
script and hangs if that child fails; a plain in-process queue is used instead.

Sequence parallelism needs no shim beyond the proxy (its gather buffers are allocated through the patched
`mappings`, `layers` and `utils` modules): the collectives megatron's SP uses, `all_gather_into_tensor` and
`reduce_scatter_tensor` (sync and async), are native in gloo on the torch this project pins (2.13), so nothing
is emulated; tests/dist_scripts/cpu_compat_check.py `sequence` checks them against plain PyTorch.

`install_cpu_compat()` does nothing (and returns False) when this process computes on CUDA
(`hcustom_mc.device.uses_cuda()`), so GPU runs use megatron-core unchanged; with gloo on a CUDA host
(`HCUSTOM_DIST_BACKEND=gloo`) it is installed, and the proxy reports no CUDA. Nothing outside megatron-core's own modules is touched.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import logging
import queue
import types

import torch

from hcustom_mc.device import uses_cuda

log = logging.getLogger("hcustom_mc")

# megatron-core modules whose module-level `torch` gets the proxy.
PATCHED_MODULES = (
    "megatron.core.pipeline_parallel.schedules",
    "megatron.core.pipeline_parallel.p2p_communication",
    "megatron.core.pipeline_parallel.utils",
    "megatron.core.distributed.param_and_grad_buffer",
    "megatron.core.distributed.distributed_data_parallel",
    "megatron.core.distributed.finalize_model_grads",
    "megatron.core.optimizer.optimizer",
    "megatron.core.optimizer.distrib_optimizer",
    "megatron.core.optimizer.clip_grads",
    "megatron.core.optimizer.grad_scaler",
    "megatron.core.utils",
    "megatron.core.tensor_parallel.mappings",
    "megatron.core.tensor_parallel.layers",
    "megatron.core.tensor_parallel.random",
    "megatron.core.tensor_parallel.utils",
    "megatron.core.tensor_parallel.data",
    "megatron.core.dist_checkpointing.strategies.filesystem_async",
    "megatron.core.dist_checkpointing.strategies.state_dict_saver",
    "megatron.core.dist_checkpointing.strategies.fully_parallel",
    "megatron.core.dist_checkpointing.exchange_utils",
    "megatron.core.rerun_state_machine",
)

_FACTORIES = (
    "zeros", "ones", "empty", "full", "tensor", "as_tensor", "arange", "randn", "rand", "randint",
    "zeros_like", "ones_like", "empty_like", "full_like",
)

_installed = False


def _cpu_device(device):
    """Map any CUDA device spec (str, int, torch.device) to the CPU; leave others alone."""
    if device is None:
        return None
    if isinstance(device, int):
        return torch.device("cpu")
    dev = torch.device(device)
    return torch.device("cpu") if dev.type == "cuda" else dev


def _factory(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if "device" in kwargs:
            kwargs["device"] = _cpu_device(kwargs["device"])
        if kwargs.get("pin_memory"):
            kwargs["pin_memory"] = False
        return fn(*args, **kwargs)

    return wrapper


class _NullStream:
    """Stands in for a CUDA stream or event: work on the CPU is already ordered."""

    def __init__(self, *args, **kwargs):
        pass

    def wait_stream(self, other):
        pass

    def wait_event(self, event):
        pass

    def record_event(self, event=None):
        return _NullStream()

    def record(self, stream=None):
        pass

    def synchronize(self):
        pass

    def query(self):
        return True


class _CpuCuda:
    """The `torch.cuda` seen by patched megatron modules: CPU device, CPU generator, no streams."""

    def __init__(self):
        self.random = types.SimpleNamespace(get_rng_state=self.get_rng_state, set_rng_state=self.set_rng_state)

    def __getattr__(self, name):
        return getattr(torch.cuda, name)

    @staticmethod
    def is_available():
        # also on a CUDA host running gloo (HCUSTOM_DIST_BACKEND=gloo): megatron's own CUDA checks
        # (straggler detector, TE import) must take their CPU branch
        return False

    @staticmethod
    def current_device():
        return torch.device("cpu")

    @staticmethod
    def synchronize(device=None):
        pass

    @staticmethod
    def empty_cache():
        pass

    @staticmethod
    def get_rng_state(device=None):
        return torch.get_rng_state()

    @staticmethod
    def set_rng_state(state, device=None):
        torch.set_rng_state(state)

    @staticmethod
    def manual_seed(seed):
        torch.default_generator.manual_seed(int(seed))

    @staticmethod
    def memory_allocated(device=None):
        return 0

    @staticmethod
    def max_memory_allocated(device=None):
        return 0

    Stream = _NullStream
    Event = _NullStream

    @staticmethod
    def default_stream(device=None):
        return _NullStream()

    @staticmethod
    def current_stream(device=None):
        return _NullStream()

    @staticmethod
    def stream(stream=None):
        return contextlib.nullcontext()


class _TorchProxy(types.ModuleType):
    """`torch` as seen by patched megatron modules."""

    def __init__(self):
        super().__init__("torch")
        self.cuda = _CpuCuda()
        for name in _FACTORIES:
            setattr(self, name, _factory(getattr(torch, name)))

    def __getattr__(self, name):
        return getattr(torch, name)

    @staticmethod
    def autocast(device_type="cuda", *args, **kwargs):
        return torch.autocast("cpu" if device_type == "cuda" else device_type, *args, **kwargs)


@contextlib.contextmanager
def _cuda_type_names():
    """Inside, a CPU tensor's `.type()` reports the CUDA name ('torch.cuda.FloatTensor')."""
    original = torch.Tensor.type

    def type_(self, dtype=None, non_blocking=False, **kwargs):
        if dtype is None and not kwargs and self.device.type == "cpu":
            return original(self).replace("torch.", "torch.cuda.", 1)
        return original(self, dtype, non_blocking, **kwargs)

    torch.Tensor.type = type_
    try:
        yield
    finally:
        torch.Tensor.type = original


def _with_cuda_type_names(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with _cuda_type_names():
            return fn(*args, **kwargs)

    wrapper.__hcustom_cpu_compat__ = True
    return wrapper


def _patch_type_checks() -> None:
    from megatron.core.optimizer import clip_grads, distrib_optimizer, optimizer

    for cls in (optimizer.Float16OptimizerWithFloat16Params, distrib_optimizer.DistributedOptimizer):
        if not getattr(cls.__init__, "__hcustom_cpu_compat__", False):
            cls.__init__ = _with_cuda_type_names(cls.__init__)
    # Gathering distributed-optimizer state for a reshardable checkpoint moves shards with `.cuda()`
    # unless it is told to use the gloo group; on CPU every group is gloo, so always say so.
    gather = distrib_optimizer.DistributedOptimizer.get_parameter_state_dp_zero
    if not getattr(gather, "__hcustom_cpu_compat__", False):

        @functools.wraps(gather)
        def gather_on_gloo(self, use_gloo_comm=True, **kwargs):
            return gather(self, use_gloo_comm=True, **kwargs)

        gather_on_gloo.__hcustom_cpu_compat__ = True
        distrib_optimizer.DistributedOptimizer.get_parameter_state_dp_zero = gather_on_gloo
    clip = _with_cuda_type_names(clip_grads.clip_grad_by_total_norm_fp32)
    for mod in (clip_grads, optimizer):
        if not getattr(mod.clip_grad_by_total_norm_fp32, "__hcustom_cpu_compat__", False):
            mod.clip_grad_by_total_norm_fp32 = clip


def _patch_rng() -> None:
    # These helpers go through torch.cuda._lazy_call / default_generators, absent on CPU builds.
    from megatron.core.tensor_parallel import random

    random._get_cuda_rng_state = lambda device=None, clone=False, graph_safe=False: torch.get_rng_state()
    random._set_cuda_rng_state = lambda new_state, device=-1, graph_safe=False: torch.set_rng_state(new_state)


def _patch_batched_p2p() -> None:
    # NCCL keeps a batch's sends and receives apart; gloo matches messages between two ranks by
    # posting order, so in a 2-stage interleaved schedule (prev == next peer) a forward activation
    # and a backward gradient sent in one batch are received swapped. megatron's unbatched path
    # separates the two directions (a second process group when the pipeline group has 2 ranks).
    from megatron.core.pipeline_parallel import p2p_communication as p2p

    if getattr(p2p._batched_p2p_ops, "__hcustom_cpu_compat__", False):
        return

    def batched_as_ordered_p2p(**kwargs):
        return list(p2p._p2p_ops(**kwargs).values())

    batched_as_ordered_p2p.__hcustom_cpu_compat__ = True
    p2p._batched_p2p_ops = batched_as_ordered_p2p


def _patch_checkpoint_queue() -> None:
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if getattr(filesystem_async, "_results_queue", None) is None:
        filesystem_async._results_queue = queue.Queue()


def install_cpu_compat(force: bool = False) -> bool:
    """Install the CPU shims into megatron-core. Idempotent.

    Returns True when the shims are active, False when CUDA is available (nothing is changed).
    `force` installs them even with CUDA present (tests only).
    """
    global _installed
    if uses_cuda() and not force:
        return False
    if _installed:
        return True
    proxy = _TorchProxy()
    for name in PATCHED_MODULES:
        try:
            module = importlib.import_module(name)
        except ImportError:  # a module that moved in a newer megatron-core: nothing to patch there
            continue
        if getattr(module, "torch", None) is torch:
            module.torch = proxy
    _patch_type_checks()
    _patch_rng()
    _patch_batched_p2p()
    _patch_checkpoint_queue()
    _installed = True
    log.info("megatron-core CPU compatibility active (no CUDA): schedules, DDP, optimizer, checkpoint save on CPU")
    return True


def cpu_compat_active() -> bool:
    return _installed
