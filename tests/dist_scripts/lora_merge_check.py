"""LoRA merge on a TP-sharded model: live adapters, merge_lora (each rank's shard) and merge_into_model (full
adapters sharded on the fly) give the same output. Rank 0 saves the three outputs.

usage: torchrun --nproc_per_node N lora_merge_check.py WEIGHTS INPUTS OUT TP
"""

import sys

import torch


def seeded_b(name: str, shape) -> torch.Tensor:
    import zlib

    return torch.randn(shape, generator=torch.Generator().manual_seed(zlib.crc32(name.encode()))) * 0.05


def build(weights, adapters: bool):
    from hcustom_mc.model import HunyuanCustomDiT, get_model_config
    from hcustom_mc.model.lora import apply_lora, lora_modules
    from hcustom_mc.parallel.sharding import get_tp_split, load_full_state_dict, shard_full_tensor

    model = HunyuanCustomDiT(get_model_config("tiny", "base")).eval()
    load_full_state_dict(model, torch.load(weights, weights_only=True))
    if adapters:
        from megatron.core import parallel_state as ps

        rank, tp = ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_world_size()
        apply_lora(model, rank=4, alpha=8.0, seed=0)
        with torch.no_grad():
            for name, m in lora_modules(model):
                split = get_tp_split(m.lora_B)
                full_shape = list(m.lora_B.shape)
                if split is not None:
                    full_shape[split.dim] = sum(split.segments)
                full = seeded_b(name, full_shape)
                m.lora_B.copy_(shard_full_tensor(full, split, rank, tp) if split is not None and tp > 1 else full)
    return model


def main():
    weights, inputs_path, out_path, tp = sys.argv[1:5]
    from hcustom_mc.checkpoint.lora import Adapters, merge_into_model
    from hcustom_mc.model.lora import lora_modules, merge_lora
    from hcustom_mc.parallel.config import ParallelConfig
    from hcustom_mc.parallel.sharding import full_state_dict
    from hcustom_mc.parallel.state import destroy_parallel, initialize_parallel

    info = initialize_parallel(ParallelConfig(tensor_parallel=int(tp)))
    inputs = torch.load(inputs_path, weights_only=True)
    model = build(weights, adapters=True)
    with torch.no_grad():
        live = model(**inputs)
        full = full_state_dict(model)  # adapters gathered to full (release-layout) tensors
        adapters = Adapters({n: (full[f"{n}.lora_A"], full[f"{n}.lora_B"] * m.lora_scale) for n, m in lora_modules(model)},
                            "tp-gathered")
        assert merge_lora(model) == 20
        merged = model(**inputs)
        other = build(weights, adapters=False)
        assert merge_into_model(other, adapters, 1.0) == 20
        merged_full = other(**inputs)
    if info.rank == 0:
        torch.save({"live": live, "merged": merged, "merged_full": merged_full,
                    "adapters": {n: ab for n, ab in adapters.tensors.items()}}, out_path)
    destroy_parallel()


if __name__ == "__main__":
    from hcustom_mc.console import exit_process

    main()
    exit_process(0)
