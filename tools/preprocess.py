"""Encode a dataset manifest into training shards (VAE latents, LLaVA/CLIP text states, Whisper features).

    python -m hcustom_mc.launch --nproc-per-node 8 tools/preprocess.py --config train.yaml \\
        --data-path data/manifest.jsonl --out shards/

Re-running the same command after a crash skips finished shards. Then train with
`--data-type shards --data-path shards/`. See hcustom_mc/data/preprocess.py.
"""

import sys

if __name__ == "__main__":
    if "-h" in sys.argv[1:] or "--help" in sys.argv[1:]:  # without loading torch (the encoders' module needs it)
        from hcustom_mc.data.preprocess_args import parse_args

        parse_args()
    from hcustom_mc.data.preprocess import main
    from hcustom_mc.parallel.state import exit_process

    exit_process(main())
