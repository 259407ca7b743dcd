"""Our DiT equals the diffusers HunyuanVideoTransformer3DModel (an implementation we did not write)."""

import pytest
import torch

from hcustom_mc.checkpoint.compare import random_inputs, reference_output


def tiny_diffusers(guidance: bool, seed: int = 0):
    from diffusers import HunyuanVideoTransformer3DModel

    torch.manual_seed(seed)
    ref = HunyuanVideoTransformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=4, attention_head_dim=16, num_layers=2,
        num_single_layers=2, num_refiner_layers=1, patch_size=2, patch_size_t=1, guidance_embeds=guidance,
        text_embed_dim=32, pooled_projection_dim=16, rope_axes_dim=(4, 6, 6),
    ).eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # many weights start at zero; randomise all so every path is exercised
        for p in ref.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return ref


def ours_from_diffusers(ref):
    from hcustom_mc.checkpoint.diffusers_format import diffusers_to_release, model_config_from_diffusers_config
    from hcustom_mc.model import HunyuanCustomDiT
    from hcustom_mc.parallel.sharding import load_full_state_dict

    cfg = model_config_from_diffusers_config(dict(ref.config))
    model = HunyuanCustomDiT(cfg).eval()
    sd = diffusers_to_release(ref.state_dict())
    load_full_state_dict(model, sd)
    return model, sd


@pytest.mark.parametrize("guidance", [False, True])
def test_matches_diffusers_with_padded_text(single_process, guidance):
    ref = tiny_diffusers(guidance)
    ours, _ = ours_from_diffusers(ref)
    inputs = random_inputs(ours.cfg, batch=2, frames=3, height=4, width=6, text_len=9, seed=3, device="cpu")
    assert inputs["text_mask"][-1].sum() < inputs["text_mask"].shape[1]  # really padded
    with torch.no_grad():
        expected = reference_output(ref, inputs)
        got = ours(**inputs)
    assert got.shape == expected.shape
    assert (got - expected).abs().max().item() < 1e-5


def test_matches_diffusers_through_release_format(single_process, tmp_path):
    from hcustom_mc.checkpoint.release import load_release_state_dict, save_release_state_dict
    from hcustom_mc.model import HunyuanCustomDiT
    from hcustom_mc.parallel.sharding import load_full_state_dict

    ref = tiny_diffusers(False, seed=5)
    ours, sd = ours_from_diffusers(ref)
    save_release_state_dict(sd, tmp_path)
    reloaded = HunyuanCustomDiT(ours.cfg).eval()
    load_full_state_dict(reloaded, load_release_state_dict(tmp_path))
    inputs = random_inputs(ours.cfg, batch=2, frames=2, height=4, width=4, text_len=6, seed=4, device="cpu")
    with torch.no_grad():
        assert (reloaded(**inputs) - reference_output(ref, inputs)).abs().max().item() < 1e-5


def test_padding_never_leaks_into_valid_tokens(single_process):
    """Changing the padded text states must not change the output (release varlen semantics)."""
    ref = tiny_diffusers(False, seed=7)
    ours, _ = ours_from_diffusers(ref)
    inputs = random_inputs(ours.cfg, batch=2, frames=2, height=4, width=4, text_len=8, seed=1, device="cpu")
    noisy = dict(inputs)
    noisy["text_states"] = inputs["text_states"].clone()
    noisy["text_states"][-1, 4:] += 100.0
    with torch.no_grad():
        torch.testing.assert_close(ours(**inputs), ours(**noisy), rtol=0, atol=1e-6)
