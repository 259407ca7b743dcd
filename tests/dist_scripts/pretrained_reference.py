"""Single-process reference for --pretrained: the first training batch's loss of a model filled with
`load_release_state_dict` + `load_full_state_dict` (the path every other check of the model uses).

    python tests/dist_scripts/pretrained_reference.py RELEASE_FILE OUT.json [pretrain_custom flags...]
"""

import json
import sys

import torch


def main(release_file: str, out: str, argv: list[str]) -> None:
    from hcustom_mc.checkpoint.release import load_release_state_dict
    from hcustom_mc.model import HunyuanCustomDiT
    from hcustom_mc.model.init import initialize_weights
    from hcustom_mc.parallel.sharding import load_full_state_dict
    from hcustom_mc.parallel.state import destroy_parallel, initialize_parallel
    from hcustom_mc.training.batches import BatchMaker
    from hcustom_mc.training.config import build_config
    from hcustom_mc.training.objective import flow_matching_loss_sum

    cfg = build_config(argv)
    model_cfg = cfg.model_config()
    initialize_parallel(cfg.parallel, model_cfg, seed=cfg.init_seed)
    model = HunyuanCustomDiT(model_cfg)
    sd = load_release_state_dict(release_file)
    fresh = sorted(set(model.weight_state_dict()) - set(sd))  # modules the source lacks: initialised as training does
    if fresh:
        initialize_weights(model, seed=cfg.init_seed, zero_init=cfg.zero_init, names=set(fresh))
        sd = {**sd, **{k: v for k, v in model.weight_state_dict().items() if k in fresh}}
    load_full_state_dict(model, sd)
    num_micro = cfg.num_microbatches(1)
    batches = BatchMaker(cfg, model_cfg, 0, 1, num_micro, log_events=False)
    _, micro = batches.microbatches(1)
    model.train()
    with torch.no_grad():
        losses = [float(flow_matching_loss_sum(model(**mb["inputs"]), mb["target"]) / mb["target"].numel()) for mb in micro]
    json.dump({"loss": sum(losses) / len(losses), "fresh": fresh}, open(out, "w"))
    destroy_parallel()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3:])
