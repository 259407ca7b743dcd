"""The flags of tools/preprocess.py, apart from the module that encodes (which loads torch): `--help` stays fast."""

from __future__ import annotations


def parse_args(argv=None):
    """The preprocessing flags; the rest are training-config flags. No torch is needed to parse them."""
    from hcustom_mc.console import ArgumentParser

    p = ArgumentParser(prog="tools/preprocess.py", description="Encode a manifest into training shards (run under "
                       "torchrun or `python -m hcustom_mc.launch` for many ranks). Other arguments are the training "
                       "config's (--config, --set, --data-path the manifest.jsonl, ...; see pretrain_custom.py --help).")
    p.add_argument("--out", required=True, help="shard folder (created; re-running resumes) (required)")
    p.add_argument("--shard-size", type=int, default=64, help="samples per shard file (default: 64)")
    p.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default="float32",
                   help="stored tensor dtype (default: float32)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (switch; default: off)")
    p.add_argument("--verbose", action="store_true", help="show known third-party warnings and every rank's "
                   "warnings (switch; default: off)")
    return p.parse_known_args(argv)
