"""One parallel configuration (TP, PP, VPP, CP, DP) and its up-front validation.

Every rank validates the same config before any collective runs, so a bad layout fails on all
ranks with the same message instead of hanging in the first all-reduce. The model's sizes come in as
any object with `num_heads`, `hidden_size`, `mlp_hidden`, `num_double_blocks` and `num_single_blocks`
(a ModelConfig): the parallel layer does not import the model.
"""

from __future__ import annotations

from dataclasses import dataclass

from hcustom_mc.errors import ConfigError

CP_MODES = ("ulysses", "ring", "usp")


@dataclass
class ParallelConfig:
    tensor_parallel: int = 1
    pipeline_parallel: int = 1
    virtual_pipeline_parallel: int | None = None
    context_parallel: int = 1
    cp_mode: str = "ulysses"
    ulysses_degree: int | None = None  # usp only: Ulysses group size (divides context_parallel)
    sequence_parallel: bool = False

    def cp_sub_sizes(self) -> list[int] | None:
        """[ulysses, ring] sub-group sizes of the CP group under usp (megatron's hierarchical CP groups)."""
        if self.cp_mode != "usp" or self.context_parallel == 1:
            return None
        return [self.ulysses_degree, self.context_parallel // self.ulysses_degree]

    def data_parallel(self, world_size: int) -> int:
        return world_size // (self.tensor_parallel * self.pipeline_parallel * self.context_parallel)

    def validate(self, world_size: int, model=None) -> "ParallelConfig":
        tp, pp, cp, vpp = self.tensor_parallel, self.pipeline_parallel, self.context_parallel, self.virtual_pipeline_parallel
        errors = []
        for name, value in (("tensor_parallel", tp), ("pipeline_parallel", pp), ("context_parallel", cp)):
            if not isinstance(value, int) or value < 1:
                errors.append(f"{name} must be a positive integer, got {value!r}")
        if errors:
            raise ConfigError("invalid parallel config:\n  - " + "\n  - ".join(errors))
        if world_size % (tp * pp * cp):
            errors.append(
                f"world size {world_size} is not divisible by TP x PP x CP = {tp} x {pp} x {cp} = {tp * pp * cp}"
                + (f" (this is one process: launch {tp * pp * cp} or a multiple with `torchrun --nproc-per-node "
                   f"{tp * pp * cp} ...` or `python -m hcustom_mc.launch --nproc-per-node {tp * pp * cp} ...`)"
                   if world_size == 1 else "")
            )
        if self.cp_mode not in CP_MODES:
            errors.append(f"cp_mode must be one of {CP_MODES}, got {self.cp_mode!r}")
        if self.cp_mode == "usp":
            u = self.ulysses_degree
            if not isinstance(u, int) or u < 1 or cp % u:
                errors.append(f"cp_mode usp needs --ulysses-degree dividing context_parallel {cp}, got {u!r}")
        elif self.ulysses_degree not in (None, 1) and self.ulysses_degree != cp:
            errors.append(f"--ulysses-degree {self.ulysses_degree} needs --cp-comm-type usp")
        if vpp is not None:
            if vpp < 1:
                errors.append(f"virtual_pipeline_parallel must be >= 1, got {vpp}")
            elif vpp > 1 and pp < 2:
                errors.append("virtual pipeline stages need pipeline_parallel >= 2")
        if model is not None:
            if model.num_heads % tp:
                errors.append(f"num_heads {model.num_heads} is not divisible by tensor_parallel {tp}")
            elif cp > 1 and self.cp_mode == "ulysses" and (model.num_heads // tp) % cp:
                errors.append(
                    f"Ulysses context parallel splits the {model.num_heads // tp} heads per TP rank across CP; "
                    f"{model.num_heads // tp} is not divisible by context_parallel {cp} (use cp_mode='ring')"
                )
            elif cp > 1 and self.cp_mode == "usp" and isinstance(self.ulysses_degree, int) and self.ulysses_degree > 0 \
                    and (model.num_heads // tp) % self.ulysses_degree:
                errors.append(
                    f"usp splits the {model.num_heads // tp} heads per TP rank over the Ulysses degree "
                    f"{self.ulysses_degree}: not divisible (use a smaller --ulysses-degree or cp_mode='ring')"
                )
            if model.hidden_size % tp:
                errors.append(f"hidden_size {model.hidden_size} is not divisible by tensor_parallel {tp}")
            if model.mlp_hidden % tp:
                errors.append(f"MLP width {model.mlp_hidden} is not divisible by tensor_parallel {tp}")
            layers = model.num_double_blocks + model.num_single_blocks
            stages = pp * (vpp or 1)
            if stages > layers:
                errors.append(
                    f"{stages} pipeline stages (PP {pp} x VPP {vpp or 1}) exceed the {layers} transformer blocks"
                )
        if self.sequence_parallel and tp == 1:
            errors.append("sequence_parallel needs tensor_parallel > 1")
        if errors:
            raise ConfigError("invalid parallel config:\n  - " + "\n  - ".join(errors))
        return self
