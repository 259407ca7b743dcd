"""torchrun with a short console: `python -m hcustom_mc.launch [torchrun flags] SCRIPT [args]` (or `-m MODULE`).

It takes torchrun's own flags and runs the same elastic agent; what differs is what a failure prints. When a
worker exits non-zero, torchrun logs every worker's exit, each SIGTERM it sends, and raises ChildFailedError
with a ~40-line traceback and failure table. Here a worker that exits 2 (a usage or config error it has already
reported, hcustom_mc.console.report_error) ends the launch with the same code and nothing more; any other
failure gets one line naming the rank and exit code. The exit status is the first failed worker's.
"""

from __future__ import annotations

import logging
import signal
import sys

REPORTED = 2  # the workers' exit status for an error they have printed themselves


def main(argv=None) -> int:
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    args = parse_args(argv)
    # the agent's per-worker exit and SIGTERM logs: the failure is summarised below instead
    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
    try:
        run(args)
    except ChildFailedError as exc:
        rank, failure = exc.get_first_failure()
        code = failure.exitcode
        if code < 0:  # killed by a signal
            name = signal.Signals(-code).name if -code in signal.Signals._value2member_map_ else str(-code)
            print(f"launch: rank {rank} was killed by {name}; the other ranks were stopped", file=sys.stderr)
            return 128 - code
        if code != REPORTED:
            print(f"launch: rank {rank} exited with code {code} (its output is above); the other ranks were stopped",
                  file=sys.stderr)
        return code
    return 0


if __name__ == "__main__":
    sys.exit(main())
