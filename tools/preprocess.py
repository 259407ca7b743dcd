"""Encode a dataset manifest into training shards (VAE latents, LLaVA/CLIP text states, Whisper features).

    python -m hcustom_mc.launch --nproc-per-node 8 tools/preprocess.py --config train.yaml \\
        --data-path data/manifest.jsonl --out shards/

Re-running the same command after a crash skips finished shards. Then train with
`--data-type shards --data-path shards/`. See hcustom_mc/data/preprocess.py.
"""

if __name__ == "__main__":
    from hcustom_mc import console
    from hcustom_mc.preprocess import USER_ERRORS, main

    console.run_entry_point(main, lambda: USER_ERRORS)
