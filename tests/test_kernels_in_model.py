"""The full tiny model with the Triton kernels (interpreter on CPU) equals the PyTorch path:
output and every gradient, through the model's one dispatch point (hcustom_mc.model.ops)."""

import pytest
import torch

from tests.conftest import tiny_inputs


@pytest.mark.parametrize("variant, mode, identity", [("audio", "release", 1), ("editing", "paper", 2)])
def test_triton_kernels_equal_torch_path_in_the_model(single_process, variant, mode, identity):
    from hcustom_mc.model import HunyuanCustomDiT, get_model_config, initialize_weights
    from hcustom_mc.model.ops import set_kernel_backend
    from hcustom_mc.parallel.sharding import full_state_dict

    cfg = get_model_config("tiny", variant, mode=mode, max_identity_images=1 if mode == "release" else 3,
                           num_double_blocks=1, num_single_blocks=1, audio_insert_blocks=(0,))
    model = HunyuanCustomDiT(cfg)
    initialize_weights(model, seed=5, zero_init=False)
    inputs = tiny_inputs(cfg, identity=identity, seed=4)
    results = {}
    try:
        for backend in ("torch", "triton"):
            set_kernel_backend(backend)
            model.zero_grad(set_to_none=True)
            out = model(**inputs)
            (out.float() ** 2).mean().backward()
            results[backend] = (out.detach(), full_state_dict(model, grads=True))
    finally:
        set_kernel_backend(None)
    (ref_out, ref_grads), (out, grads) = results["torch"], results["triton"]
    torch.testing.assert_close(out, ref_out, atol=2e-5, rtol=1e-4)
    for name, g in ref_grads.items():
        err = (grads[name] - g).norm()
        assert err <= 1e-4 * g.norm() + 1e-9, f"{name}: |diff| {err:.3g} vs |grad| {g.norm():.3g}"
