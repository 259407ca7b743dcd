"""How a checkpoint is checked before it is loaded (`--verify-checkpoint`); no torch here: the parsers use it
before `--help` returns. The checks themselves are in hcustom_mc.checkpoint.integrity."""

VERIFY_MODES = ("full", "size", "off")
DEFAULT_VERIFY = "full"
# measured with tools/measure_verify.py on the 2-core CPU development host (sha256 with SHA-NI, files in the
# page cache; a cold read adds the disk's own time): what the default costs per GB of checkpoint per rank; the
# ranks hash their own files side by side, so a sharded checkpoint costs its largest rank's share
VERIFY_COST = "about 1 s per GB per rank (measured 0.7-1.2 s/GB)"
VERIFY_HELP = (  # the training flag table adds "(default: full)" itself; argparse flags use flag_help()f"check the checkpoint about to be loaded against its manifest: full (sizes + sha256 of every file, "
               f"each rank hashing its own files; {VERIFY_COST}; catches same-size damage) | size (sizes only: "
               f"misses a flipped byte) | off (no check; also loads a folder whose manifest is missing)")


def flag_help(what: str = "") -> str:
    """`--verify-checkpoint`'s help for an argparse entry point, `what` naming the checkpoint it checks."""
    return f"{what}{VERIFY_HELP} (default: {DEFAULT_VERIFY})"
