"""Train HunyuanCustom with megatron-core tensor, pipeline, context and data parallelism.

    torchrun --nproc-per-node 8 pretrain_custom.py --config examples/tiny_3d.yaml \\
        --tensor-model-parallel-size 2 --pipeline-model-parallel-size 2 --context-parallel-size 2

Flags override the YAML file; `--set key.sub=value` reaches any field. See `--help`.
"""

import logging
import sys

from hcustom_mc.model.config import ConfigError


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    logging.getLogger("megatron").setLevel(logging.WARNING)
    from hcustom_mc.training.config import build_config
    from hcustom_mc.training.loop import run

    try:
        cfg = build_config(argv)
        from hcustom_mc.training.overlap import set_cuda_connections

        set_cuda_connections(cfg.parallel.tensor_parallel)  # before anything starts CUDA
        run(cfg)
    except (ConfigError, FileNotFoundError) as exc:
        # every rank validates the same config, so every rank exits here with the same message
        from hcustom_mc.parallel.state import wait_for_all_ranks_on_error

        print(f"error: {exc}", file=sys.stderr, flush=True)
        wait_for_all_ranks_on_error()
        return 2
    return 0


if __name__ == "__main__":  # required: megatron's checkpoint writer may spawn a process that re-imports this file
    from hcustom_mc.parallel.state import exit_process

    exit_process(main())
