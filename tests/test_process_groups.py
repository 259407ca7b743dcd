"""Models handed their process groups: two layouts side by side in the same processes, each equal to one
process; and no megatron-core deprecation caused by our own call sites (TP 2 x CP 2 x PP 2 build and run)."""

import torch

from tests.conftest import tiny_inputs
from tests.torchrun import torchrun

SCRIPT = "tests/dist_scripts/process_groups_check.py"


def test_tp2_and_cp2_models_side_by_side_equal_one_process(single_process, tmp_path):
    from hcustom_mc.model import HunyuanCustomDiT, get_model_config, initialize_weights
    from hcustom_mc.parallel.sharding import full_state_dict

    cfg = get_model_config("tiny", "audio")
    model = HunyuanCustomDiT(cfg)
    initialize_weights(model, seed=5, zero_init=False)
    inputs = tiny_inputs(cfg, frames=4, seed=6)
    torch.save(model.weight_state_dict(), tmp_path / "weights.pt")
    torch.save(inputs, tmp_path / "inputs.pt")
    out = model(**inputs)
    (out.float() ** 2).mean().backward()
    grads = full_state_dict(model, grads=True)
    torchrun(2, SCRIPT, "two_layouts", tmp_path / "weights.pt", tmp_path / "inputs.pt", tmp_path / "both.pt")
    both = torch.load(tmp_path / "both.pt", weights_only=True)
    assert set(both) == {"tp2", "cp2"}
    for name, result in both.items():
        torch.testing.assert_close(result["out"], out.detach(), atol=1e-5, rtol=1e-5, msg=lambda m: f"{name}: {m}")
        assert set(result["grads"]) == set(grads)
        for key, grad in grads.items():
            err = (result["grads"][key] - grad).norm()
            assert err <= 1e-4 * grad.norm() + 1e-12, f"{name} {key}: |diff| {err:.3g} vs |grad| {grad.norm():.3g}"


LIBRARIES = ("/megatron/", "/torch/distributed/")  # what our parallel code calls into


def caused_by_our_call(warning) -> bool:
    """A warning reported at our code, or raised inside megatron-core or torch.distributed entered straight from
    our code (the frame that called into the library is ours: e.g. a mapping or a layer constructor we call
    without a group, a deprecated collective). A library entered through torch (a layer's forward via
    nn.Module.__call__, an autograd backward) or through megatron is the library's own call."""
    if "/hcustom_mc/" in warning["filename"]:
        return True
    stack = warning["stack"]
    for library in LIBRARIES:
        first = next((i for i, frame in enumerate(stack) if library in frame[0]), None)
        if first is not None and first > 0 and "/hcustom_mc/" in stack[first - 1][0]:
            return True
    return False


def test_the_call_site_rule():
    """Our code calling a library directly is ours; a library reached through a torch layer call is not."""
    direct = [("/r/hcustom_mc/parallel/context.py", 90, "backward"), ("/v/torch/distributed/c10d_logger.py", 81, "wrapper")]
    built = [("/r/hcustom_mc/model/spec.py", 100, "build_column"), ("/v/megatron/core/transformer/spec_utils.py", 1, "b"),
             ("/v/megatron/core/utils.py", 585, "get_tensor_model_parallel_group_if_none")]
    via_layer = [("/r/hcustom_mc/model/blocks.py", 108, "forward"), ("/v/torch/nn/modules/module.py", 1789, "_call_impl"),
                 ("/v/megatron/core/tensor_parallel/layers.py", 1459, "forward")]
    assert caused_by_our_call({"filename": "/v/torch/distributed/c10d_logger.py", "stack": direct})
    assert caused_by_our_call({"filename": "/v/megatron/core/transformer/spec_utils.py", "stack": built})
    assert not caused_by_our_call({"filename": "/v/megatron/core/tensor_parallel/layers.py", "stack": via_layer})


def test_no_deprecation_from_our_call_sites_at_tp2_cp2_pp2(tmp_path):
    torchrun(8, SCRIPT, "warnings", tmp_path / "warnings.pt", timeout=900)
    every = torch.load(tmp_path / "warnings.pt", weights_only=False)
    assert len(every) == 8
    seen = [w for rank in every for w in rank]
    tp_group_none = [w for w in seen if "tp_group is None" in w["message"]]
    assert not tp_group_none, "megatron fell back to its global TP group:\n" + "\n".join(
        "".join(f"\n    {f}" for f in w["stack"][-8:]) for w in tp_group_none[:3])
    ours = [w for w in seen if w["category"] in ("DeprecationWarning", "FutureWarning", "PendingDeprecationWarning")
            and caused_by_our_call(w)]
    assert not ours, "deprecations caused by our call sites:\n" + "\n".join(
        f"{w['category']}: {w['message']}\n    at {w['stack'][-4:]}" for w in ours[:5])
