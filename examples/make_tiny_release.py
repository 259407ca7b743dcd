"""Write a tiny random DiT as a *released* checkpoint (`{"module": ...}` in mp_rank_00_model_states.pt), the
stand-in for HunyuanCustom's / HunyuanVideo's released files in the fine-tuning demo.

usage: python examples/make_tiny_release.py OUT_DIR [--variant base|audio|editing] [--seed N]
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", type=Path, help="folder for mp_rank_00_model_states.pt (created)")
    p.add_argument("--variant", default="base", choices=("base", "audio", "editing"))
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    from hcustom_mc import console

    console.setup()  # before megatron is imported (its import-time warnings)
    from hcustom_mc.checkpoint.release import save_release_state_dict
    from hcustom_mc.model import HunyuanCustomDiT, get_model_config
    from hcustom_mc.model.init import initialize_weights
    from hcustom_mc.parallel.config import ParallelConfig
    from hcustom_mc.parallel.state import destroy_parallel, initialize_parallel

    cfg = get_model_config("tiny", args.variant)
    initialize_parallel(ParallelConfig(), cfg)
    model = HunyuanCustomDiT(cfg, device="cpu")
    initialize_weights(model, seed=args.seed, zero_init=False)  # a "trained" model: no zero-initialised layers
    args.out.mkdir(parents=True, exist_ok=True)
    file = save_release_state_dict(model.weight_state_dict(), args.out)
    destroy_parallel()
    print(f"wrote {file} (tiny {args.variant}, {sum(p.numel() for p in model.parameters())} parameters)")


if __name__ == "__main__":
    main()
