"""Train HunyuanCustom with megatron-core tensor, pipeline, context and data parallelism.

    torchrun --nproc-per-node 8 pretrain_custom.py --config examples/tiny_3d.yaml \\
        --tensor-model-parallel-size 2 --pipeline-model-parallel-size 2 --context-parallel-size 2

Flags override the YAML file; `--set key.sub=value` reaches any field. See `--help`.
"""

import logging
import sys

from hcustom_mc.model.config import ConfigError


def main(argv=None) -> int:
    from hcustom_mc.parallel.orphans import install_orphan_guard

    install_orphan_guard()  # workers die with their torchrun agent
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    logging.getLogger("megatron").setLevel(logging.WARNING)
    from hcustom_mc.checkpoint.pretrained import PretrainedError
    from hcustom_mc.checkpoint.integrity import CheckpointWriteError
    from hcustom_mc.checkpoint.release import CheckpointFormatError
    from hcustom_mc.training.checkpoint import CheckpointError
    from hcustom_mc.training.config import build_config
    from hcustom_mc.training.loop import run
    from hcustom_mc.training.step import NonFiniteError

    try:
        cfg = build_config(argv)
        from hcustom_mc.training.overlap import set_cuda_connections

        set_cuda_connections(cfg.parallel.tensor_parallel)  # before anything starts CUDA
        run(cfg)
    except NonFiniteError as exc:
        # every rank sees the same reduced loss / grad norm, so every rank stops here; the last checkpoint stands
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 3
    except (ConfigError, FileNotFoundError, PretrainedError, CheckpointFormatError, CheckpointWriteError,
            CheckpointError) as exc:
        # every rank validates the same config, so every rank exits here with the same message
        from hcustom_mc.parallel.state import wait_for_all_ranks_on_error

        print(f"error: {exc}", file=sys.stderr, flush=True)
        wait_for_all_ranks_on_error()
        return 2
    return 0


if __name__ == "__main__":  # required: megatron's checkpoint writer may spawn a process that re-imports this file
    from hcustom_mc.parallel.state import exit_process

    exit_process(main())
