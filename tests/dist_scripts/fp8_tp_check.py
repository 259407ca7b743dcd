"""fp8 weights at any TP: the sampler's fp8 loader (release fp8 pairs, per-tensor and per-channel, with a LoRA as
a side adapter; a bf16 checkpoint quantised on load with the LoRA merged first) and one forward each, in fp32.
Rank 0 saves the outputs and the fp8 tensors gathered to full (TP=1) layout.

usage: torchrun --nproc_per_node N fp8_tp_check.py ROOT TP   (ROOT: what tests/test_fp8_weights.py wrote)
"""

import sys
from pathlib import Path

import torch

CASES = {"per_tensor": "pt/mp_rank_00_model_states_fp8.pt", "per_channel": "pc/mp_rank_00_model_states_fp8.pt",
         "quantised_on_load": "bf16/mp_rank_00_model_states.pt"}


def run_cases(root: Path) -> dict:
    """Every case's output and gathered fp8 state (collective; the same on every rank)."""
    from hcustom_mc.checkpoint.lora import load_specs
    from hcustom_mc.inference.fp8 import load_fp8_model
    from hcustom_mc.model import get_model_config
    from hcustom_mc.parallel.sharding import full_state_dict

    cfg = get_model_config("tiny", "base")
    inputs = torch.load(root / "inputs.pt", weights_only=True)
    loras = load_specs([f"{root / 'lora.safetensors'}:0.5"], None)
    out = {}
    for case, rel in CASES.items():
        model, report = load_fp8_model(root / rel, "release", cfg, torch.float32, "ulysses", loras=loras)
        with torch.no_grad():
            out[case] = model(**inputs)
        out[f"{case}.state"] = {k: v for k, v in full_state_dict(model).items() if ".weight" in k}
        out[f"{case}.lora"] = report.lora
    return out


def main():
    root, tp = Path(sys.argv[1]), int(sys.argv[2])
    from hcustom_mc.parallel.config import ParallelConfig
    from hcustom_mc.parallel.state import destroy_parallel, initialize_parallel

    info = initialize_parallel(ParallelConfig(tensor_parallel=tp))
    out = run_cases(root)
    if info.rank == 0:
        torch.save({k: v for k, v in out.items() if not k.endswith(".lora")}, root / f"tp{tp}.pt")
    destroy_parallel()


if __name__ == "__main__":
    from hcustom_mc.console import exit_process

    main()
    exit_process(0)
