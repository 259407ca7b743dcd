"""Exponential moving average of the weights, kept beside megatron's fp32 main weights and sharded like them.

After every optimizer step, `ema <- decay * ema + (1 - decay) * main` for each fp32 main weight the optimizer
holds on this rank: with the distributed optimizer that is this data-parallel rank's shard of each parameter
(so the EMA costs 4 bytes per parameter / (TP x PP x DP)), without it the whole (TP/PP-local) parameter.
Checkpoints store the EMA under the parameters' own sharding with the prefix "ema." (the same global keys as
the weights), so it reshards to any layout; the converter writes it as the release file's `ema` entry and the
sampler reads it with `--load-key ema`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

PREFIX = "ema."


@dataclass
class _Entry:
    param: torch.nn.Parameter  # the model parameter (its name and sharding)
    main: torch.Tensor  # the optimizer's fp32 main weight: the whole parameter, or this rank's flat shard
    start: int | None  # flat range of `param` that `main` holds (distributed optimizer); None = whole
    end: int | None
    group: object  # the group the shards are spread over (None without sharding)
    shadow: torch.Tensor | None = None


def _inner(optimizer):
    return getattr(optimizer, "chained_optimizers", [optimizer])


def main_weights(optimizer) -> list[_Entry]:
    """Every (model parameter, fp32 main weight) pair of megatron's optimizer on this rank."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    out = []
    for opt in _inner(optimizer):
        if isinstance(opt, DistributedOptimizer):
            pairs = [*zip(opt.model_float16_groups, opt.shard_fp32_from_float16_groups),
                     *zip(opt.model_fp32_groups, opt.shard_fp32_groups)]
            for models, mains in pairs:
                for param, main in zip(models, mains):
                    r = opt._get_model_param_range_map(param)["param"]
                    out.append(_Entry(param, main, r.start, r.end, opt.data_parallel_group))
        elif hasattr(opt, "float16_groups"):  # Float16OptimizerWithFloat16Params
            for models, mains in zip(opt.float16_groups, opt.fp32_from_float16_groups):
                out += [_Entry(p, m, None, None, None) for p, m in zip(models, mains)]
            out += [_Entry(p, p, None, None, None) for g in opt.fp32_from_fp32_groups for p in g]
        else:  # FP32Optimizer: the parameters are the main weights
            out += [_Entry(p, p, None, None, None) for g in opt.param_groups for p in g["params"]]
    return out


class WeightEMA:
    def __init__(self, optimizer, model_chunks, decay: float):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay}")
        self.decay = decay
        self.entries = main_weights(optimizer)
        # the distributed optimizer's group when it shards the main weights (None: each rank holds them whole)
        self.group = next((o.data_parallel_group for o in _inner(optimizer) if hasattr(o, "model_float16_groups")), None)
        for e in self.entries:
            e.shadow = e.main.detach().float().clone()
        # parameter -> (chunk index, name): the checkpoint keys
        self.names = {id(p): (i, n) for i, c in enumerate(model_chunks) for n, p in _unwrap(c).named_parameters()}
        self.chunks = [_unwrap(c) for c in model_chunks]

    @torch.no_grad()
    def update(self) -> None:
        shadows = [e.shadow for e in self.entries]
        mains = [e.main.detach().float() for e in self.entries]
        if shadows:
            torch._foreach_lerp_(shadows, mains, 1.0 - self.decay)

    # ------------------------------------------------------------------ checkpoints
    def _full(self, param, entry) -> torch.Tensor:
        """The EMA of one trainable parameter, shaped like it (fp32). Collective over the distributed optimizer's
        group: the shards are summed into place."""
        if self.group is None:
            return entry.shadow.view(param.shape).clone()
        flat = torch.zeros(param.numel(), dtype=torch.float32, device=param.device)
        if entry is not None:
            flat[entry.start : entry.end] = entry.shadow
        dist.all_reduce(flat, group=self.group)
        return flat.view(param.shape)

    @torch.no_grad()
    def full_tensors(self, trainable_only: bool = False) -> list[dict[str, torch.Tensor]]:
        """Per model chunk: parameter name -> EMA shaped like the (TP/PP-local) parameter. Collective over the
        distributed optimizer's group: a rank holds shards of only some parameters, so every rank walks every
        parameter in model order. `trainable_only` (LoRA adapter-only checkpoints): leave out the frozen weights,
        whose average is the base itself."""
        by_param = {id(e.param): e for e in self.entries}
        out: list[dict[str, torch.Tensor]] = [{} for _ in self.chunks]
        for i, chunk in enumerate(self.chunks):
            for name, param in chunk.named_parameters():
                if not param.requires_grad:  # frozen weights never change: their average is themselves
                    if not trainable_only:
                        out[i][name] = param.detach().float().clone()
                else:
                    out[i][name] = self._full(param, by_param.get(id(param)))
        return out

    @torch.no_grad()
    def swap_into_model(self) -> list[torch.Tensor]:
        """Put the EMA into the model's trainable parameters (in their dtype), one parameter at a time (no second
        copy of the model on the device); returns the weights it replaced, on the CPU, for `restore_model`.
        Collective, like `full_tensors`."""
        by_param = {id(e.param): e for e in self.entries}
        saved = []
        for chunk in self.chunks:
            for param in chunk.parameters():
                if param.requires_grad:
                    ema = self._full(param, by_param.get(id(param)))
                    saved.append(param.detach().to("cpu", copy=True))
                    param.data.copy_(ema)
        return saved

    @torch.no_grad()
    def restore_model(self, saved: list[torch.Tensor]) -> None:
        """Undo `swap_into_model`: the model's own weights back, bit for bit."""
        it = iter(saved)
        for chunk in self.chunks:
            for param in chunk.parameters():
                if param.requires_grad:
                    param.data.copy_(next(it))

    def sharded_state_dict(self, trainable_only: bool = False) -> dict:
        from hcustom_mc.checkpoint.mcore import model_sharded_state_dict

        return {f"ema{i}": model_sharded_state_dict(chunk, prefix=PREFIX, tensors=tensors)
                for i, (chunk, tensors) in enumerate(zip(self.chunks, self.full_tensors(trainable_only)))}

    @torch.no_grad()
    def load_full_tensors(self, loaded: dict) -> None:
        """Inverse of `full_tensors`: `loaded["ema{i}"][name]` is the full local EMA of that parameter."""
        for e in self.entries:
            i, name = self.names[id(e.param)]
            full = loaded[f"ema{i}"][name].float().reshape(-1)
            # whole (no distributed optimizer): the shadow has the parameter's shape; a shard: flat
            e.shadow.copy_(full.view(e.shadow.shape) if e.start is None else full[e.start : e.end])


def _unwrap(module):
    while hasattr(module, "module"):
        module = module.module
    return module
