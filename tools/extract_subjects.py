"""Cut identity images for the subjects a manifest names, from a later part of each video than the training clip.

    python -m hcustom_mc.launch --nproc-per-node 8 tools/extract_subjects.py --manifest data/raw.jsonl \\
        --out data/extracted --detector models/owlv2-large --segmenter models/sam-vit-huge

Then preprocess data/extracted/manifest.jsonl. Re-running the same command after a crash skips finished samples.
See hcustom_mc/data/subjects.py.
"""

if __name__ == "__main__":
    from hcustom_mc import console
    from hcustom_mc.extract_subjects import USER_ERRORS, main

    console.run_entry_point(main, lambda: USER_ERRORS)
