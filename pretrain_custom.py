"""Train HunyuanCustom with megatron-core tensor, pipeline, context and data parallelism.

    python -m hcustom_mc.launch --nproc-per-node 8 pretrain_custom.py --config examples/tiny_3d.yaml \\
        --tensor-model-parallel-size 2 --pipeline-model-parallel-size 2 --context-parallel-size 2

(`python -m hcustom_mc.launch` is torchrun with a short console; plain torchrun works too.)
Flags override the YAML file; `--set key.sub=value` reaches any field. See `--help`.
"""

from hcustom_mc import console
from hcustom_mc.model.config import ConfigError


def main(argv=None) -> int:
    from hcustom_mc.parallel.orphans import install_orphan_guard

    install_orphan_guard()  # workers die with their torchrun agent
    console.setup(console.verbose_requested(argv))  # before megatron is imported: its import-time warnings
    from hcustom_mc.training.config import build_config

    cfg = build_config(argv)  # --help and a misspelt flag end here, before torch and megatron load
    cfg.validate(console.world_size())  # every field's type and range, before anything uses them
    # the heavy imports come after the arguments are parsed
    from hcustom_mc.training.loop import run
    from hcustom_mc.training.overlap import set_cuda_connections
    from hcustom_mc.training.step import NonFiniteError
    from hcustom_mc.training.tracking import print_summary

    try:
        set_cuda_connections(cfg.parallel.tensor_parallel)  # before anything starts CUDA
        history = run(cfg)
    except NonFiniteError as exc:
        # every rank sees the same reduced loss / grad norm, so every rank stops here; the last checkpoint stands
        console.report_error(f"error: {exc}", key="hcustom_mc/nonfinite")
        return 3
    if console.rank() == 0:
        print_summary(history)
    return 0


def _user_errors() -> tuple:
    """Bad configs, paths and checkpoints: every rank validates the same ones, so each is said once (rank 0),
    unless a rank's message differs; exit 2."""
    from hcustom_mc.checkpoint.integrity import CheckpointWriteError
    from hcustom_mc.checkpoint.pretrained import PretrainedError
    from hcustom_mc.checkpoint.release import CheckpointFormatError
    from hcustom_mc.training.checkpoint import CheckpointError

    return ConfigError, FileNotFoundError, PretrainedError, CheckpointFormatError, CheckpointWriteError, CheckpointError


if __name__ == "__main__":  # required: megatron's checkpoint writer may spawn a process that re-imports this file
    console.run_entry_point(main, _user_errors, key="hcustom_mc/config_error")
