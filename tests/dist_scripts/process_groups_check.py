"""Models built on handed-in process groups (hcustom_mc.parallel.groups), under torchrun.

usage: torchrun --nproc_per_node N process_groups_check.py CHECK ARGS...

  two_layouts WEIGHTS INPUTS OUT (2 ranks): one model at TP 2 and one at CP 2 (ring), each on its own new
      groups, built and run side by side in the same processes while megatron's global layout is DP 2 (which
      neither uses); rank 0 saves both outputs (whole frames) and full gradients.
  warnings OUT (8 ranks): build and run (forward + backward through both pipeline stages) the tiny model
      at TP 2 x CP 2 x PP 2 on the layout's groups, every warning recorded with the stack that raised it;
      rank 0 saves every rank's list.
"""

import sys
import traceback
import warnings

import torch
import torch.distributed as dist


def _run(model, inputs, cp_group=None):
    """Forward + backward of the mean of out^2 over the whole video: (whole-frame output, full gradients).
    Under CP each rank holds some frames: its loss is their share of the global mean (as training's), so the
    full gradient is the sum of the CP ranks' gradients."""
    from hcustom_mc.parallel.groups import group_size
    from hcustom_mc.parallel.sharding import full_state_dict

    out = model(**inputs)
    latents = inputs["latents"]
    whole = latents.shape[0] * model.cfg.out_channels * latents[0, 0].numel()
    (out.float().pow(2).sum() / whole).backward()
    grads = full_state_dict(model, grads=True)
    model.zero_grad(set_to_none=True)
    if cp_group is not None and group_size(cp_group) > 1:
        for g in grads.values():
            dist.all_reduce(g, group=cp_group)
        parts = [None] * group_size(cp_group)
        dist.all_gather_object(parts, out.detach(), group=cp_group)
        out = torch.cat(parts, dim=2)
    return out.detach(), grads


def two_layouts(weights_path, inputs_path, out_path):
    from hcustom_mc.model import HunyuanCustomDiT, get_model_config
    from hcustom_mc.parallel.config import ParallelConfig
    from hcustom_mc.parallel.groups import new_process_groups
    from hcustom_mc.parallel.sharding import load_full_state_dict
    from hcustom_mc.parallel.state import destroy_parallel, initialize_parallel

    cfg = get_model_config("tiny", "audio")
    info = initialize_parallel(ParallelConfig(), cfg)  # the global layout: DP 2, used by neither model
    weights, inputs = torch.load(weights_path, weights_only=True), torch.load(inputs_path, weights_only=True)
    tp2, cp2 = new_process_groups(tensor_parallel=2), new_process_groups(context_parallel=2)
    models = {"tp2": HunyuanCustomDiT(cfg, pg_collection=tp2),
              "cp2": HunyuanCustomDiT(cfg, pg_collection=cp2, cp_mode="ring")}
    for model in models.values():
        load_full_state_dict(model, weights)
    assert [dist.get_world_size(m.pg_collection.tp) for m in models.values()] == [2, 1]
    assert [m.context_parallel.size for m in models.values()] == [1, 2]
    results = {"tp2": _run(models["tp2"], inputs), "cp2": _run(models["cp2"], inputs, cp2.cp)}
    # and once more interleaved the other way round: neither model's run depends on the other's
    again = {"cp2": _run(models["cp2"], inputs, cp2.cp), "tp2": _run(models["tp2"], inputs)}
    for name in results:
        torch.testing.assert_close(again[name][0], results[name][0], rtol=0, atol=0)
    if info.rank == 0:
        torch.save({name: {"out": out, "grads": grads} for name, (out, grads) in results.items()}, out_path)
    destroy_parallel()


def warnings_at_tp2_cp2_pp2(out_path):
    from hcustom_mc.model import HunyuanCustomDiT, get_model_config, initialize_weights
    from hcustom_mc.parallel.config import ParallelConfig
    from hcustom_mc.parallel.groups import group_rank, layout_process_groups
    from hcustom_mc.parallel.state import destroy_parallel, initialize_parallel
    from tests.conftest import tiny_inputs

    seen = []

    def record(message, category, filename, lineno, file=None, line=None):
        seen.append({"category": category.__name__, "message": str(message), "filename": filename,
                     "stack": [(f.filename, f.lineno, f.name) for f in traceback.extract_stack()[:-1]]})

    warnings.simplefilter("always")
    warnings.showwarning = record
    cfg = get_model_config("tiny", "audio")
    initialize_parallel(ParallelConfig(tensor_parallel=2, context_parallel=2, pipeline_parallel=2, cp_mode="ulysses"),
                        cfg)
    groups = layout_process_groups()
    model = HunyuanCustomDiT(cfg, pg_collection=groups)
    initialize_weights(model, seed=3, zero_init=False)
    inputs = tiny_inputs(cfg, seed=4)
    pp_ranks = dist.get_process_group_ranks(groups.pp)
    stage = group_rank(groups.pp)
    if stage == 0:
        hidden = model(**inputs)
        dist.send(hidden.detach().contiguous(), pp_ranks[1], group=groups.pp)
        grad = torch.empty_like(hidden)
        dist.recv(grad, pp_ranks[1], group=groups.pp)
        hidden.backward(grad)
    else:
        _, ctx = model.conditioning(*(inputs.get(k) for k in ("latents", "timestep", "text_mask", "text_pooled",
                                                               "guidance", "identity_latents", "audio_features")))
        hidden = torch.empty(ctx.layout.local_rows, inputs["latents"].shape[0], cfg.hidden_size, requires_grad=True)
        with torch.no_grad():
            dist.recv(hidden, pp_ranks[0], group=groups.pp)
        out = model(**inputs, hidden=hidden)
        out.float().pow(2).mean().backward()
        dist.send(hidden.grad.contiguous(), pp_ranks[0], group=groups.pp)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
    every = [None] * dist.get_world_size()
    dist.all_gather_object(every, seen)
    if dist.get_rank() == 0:
        torch.save(every, out_path)
    destroy_parallel()


if __name__ == "__main__":
    from hcustom_mc.console import exit_process

    check, args = sys.argv[1], sys.argv[2:]
    {"two_layouts": two_layouts, "warnings": warnings_at_tp2_cp2_pp2}[check](*args)
    exit_process(0)  # only reached when every check passed
