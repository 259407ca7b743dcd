"""Write tiny random stand-ins for the metrics' models in the `--models` layout (README "Scoring videos"):
clip-vit-base-patch32/, dinov2-base/ and raft/raft_large_C_T_V1-22a6c225.pth. For the validation demo and tests;
their scores mean nothing (real models: the README's `hf download` / `curl` lines).

usage: python examples/make_tiny_eval_models.py OUT_DIR [--seed N]
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", type=Path, help="models folder (created)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    from hcustom_mc import console

    console.setup()
    from hcustom_mc.eval.tiny import save_tiny_eval_models

    save_tiny_eval_models(args.out, seed=args.seed)
    print(f"tiny eval models: {args.out}")


if __name__ == "__main__":
    main()
