"""Bad inputs and bad configs fail before any compute, with a message naming the problem."""

import pytest
import torch
import torch.nn.functional as F

from hcustom_mc.model import ConfigError, HunyuanCustomDiT, InputError, get_model_config, initialize_weights
from hcustom_mc.parallel.config import ParallelConfig
from tests.conftest import tiny_inputs


@pytest.fixture(scope="module")
def audio_model(single_process):
    model = HunyuanCustomDiT(get_model_config("tiny", "audio"))
    initialize_weights(model, seed=0, zero_init=False)
    return model


@pytest.fixture(scope="module")
def editing_model(single_process):
    return HunyuanCustomDiT(get_model_config("tiny", "editing"))


def _fails(model, match, **changes):
    inputs = tiny_inputs(model.cfg)
    inputs.update(changes)
    with pytest.raises(InputError, match=match):
        model(**inputs)


def test_valid_inputs_run(audio_model):
    out = audio_model(**tiny_inputs(audio_model.cfg))
    assert out.shape == (2, 4, 3, 4, 6)


def test_wrong_latent_channels(audio_model):
    _fails(audio_model, "latents have 5 channels, the model expects 4", latents=torch.randn(2, 5, 3, 4, 6))


def test_audio_frames_not_4k_plus_1(audio_model):
    _fails(audio_model, r"audio_features have 8 frames but 3 latent frames need 9 = 4\*\(f-1\)\+1",
           audio_features=torch.randn(2, 8, 10, 2, 8))


def test_audio_feature_shape(audio_model):
    _fails(audio_model, "audio_features must be", audio_features=torch.randn(2, 9, 10, 3, 8))


def test_text_mask_shape_mismatch(audio_model):
    _fails(audio_model, r"text_mask shape \(2, 5\) does not match", text_mask=torch.ones(2, 5))


def test_text_mask_must_be_right_padded_in_paper_mode(single_process):
    mask = torch.ones(2, 7)
    mask[0, 2] = 0
    _fails(HunyuanCustomDiT(get_model_config("tiny", "audio", mode="paper")), "right-padded", text_mask=mask)


def test_release_mode_takes_the_llava_mask_with_appended_ones(audio_model):
    # the release's LLaVA mask: padding, then ones appended after it; joint attention counts sum(mask)
    inputs = tiny_inputs(audio_model.cfg)
    inputs["text_mask"] = torch.tensor([[1, 1, 1, 1, 1, 1, 1], [1, 1, 0, 0, 0, 1, 1]])
    assert torch.isfinite(audio_model(**inputs)).all()


def test_text_dim_and_pooled(audio_model):
    _fails(audio_model, "text_states must be", text_states=torch.randn(2, 7, 31))
    _fails(audio_model, "text_pooled must be", text_pooled=torch.randn(2, 15))


def test_identity_images(audio_model):
    _fails(audio_model, "2 identity images given; release mode", identity_latents=torch.randn(2, 4, 2, 4, 6))
    _fails(audio_model, "identity_latents must be", identity_latents=torch.randn(2, 4, 1, 4, 8))


def test_guidance_only_for_guidance_models(audio_model):
    _fails(audio_model, "no guidance embedder", guidance=torch.ones(2))


def test_condition_without_branch(audio_model, editing_model):
    _fails(audio_model, "no video-condition branch", video_condition=torch.randn(2, 8, 3, 4, 6))
    _fails(editing_model, "no AudioNet", audio_features=torch.randn(2, 9, 10, 2, 8))
    _fails(editing_model, "video_condition must be", video_condition=torch.randn(2, 8, 2, 4, 6))


def test_odd_spatial_size(audio_model):
    _fails(audio_model, "divisible by the patch size", latents=torch.randn(2, 4, 3, 5, 6),
           identity_latents=torch.randn(2, 4, 1, 5, 6))


def test_errors_are_collected(audio_model):
    with pytest.raises(InputError) as err:
        audio_model(**{**tiny_inputs(audio_model.cfg), "latents": torch.randn(2, 5, 3, 4, 6), "text_pooled": torch.randn(2, 1)})
    assert "channels" in str(err.value) and "text_pooled" in str(err.value)


def test_bad_model_configs():
    with pytest.raises(ConfigError, match="must sum to head_dim"):
        get_model_config("tiny", rope_dims=(4, 4, 4))
    with pytest.raises(ConfigError, match="use mode='paper'"):
        get_model_config("tiny", max_identity_images=3)
    with pytest.raises(ConfigError, match="variant must be one of"):
        get_model_config("tiny", "lora")
    with pytest.raises(ConfigError, match="neither a preset"):
        get_model_config("no_such_config.json")


@pytest.mark.parametrize("pcfg, world, match", [
    (ParallelConfig(tensor_parallel=2, pipeline_parallel=2), 6, "world size 6 is not divisible by TP x PP x CP"),
    (ParallelConfig(tensor_parallel=3), 3, "num_heads 4 is not divisible by tensor_parallel 3"),
    (ParallelConfig(tensor_parallel=2, context_parallel=4), 8, "Ulysses context parallel"),
    (ParallelConfig(pipeline_parallel=4, virtual_pipeline_parallel=2), 4, "exceed the 4 transformer blocks"),
    (ParallelConfig(sequence_parallel=True), 1, "sequence_parallel needs tensor_parallel > 1"),
])
def test_bad_parallel_configs(pcfg, world, match):
    with pytest.raises(ConfigError, match=match):
        pcfg.validate(world, get_model_config("tiny"))


def test_hidden_and_mlp_divisibility():
    cfg = get_model_config("tiny", hidden_size=72, num_heads=4, rope_dims=(6, 6, 6), mlp_ratio=4.25)
    with pytest.raises(ConfigError) as err:
        ParallelConfig(tensor_parallel=4).validate(4, cfg)
    assert "MLP width 306 is not divisible by tensor_parallel 4" in str(err.value)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_patch_embed_is_the_release_conv3d_with_finite_bf16_gradients(dtype):
    """PatchEmbed (patchify + matmul on the Conv3d weight) equals nn.Conv3d forward and backward, and its
    bf16 weight gradients are finite on one thread, where torch's CPU Conv3d backward gives NaN."""
    from hcustom_mc.model.layers import PatchEmbed

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        embed = PatchEmbed((1, 2, 2), 16, 512).to(dtype)
        x = torch.randn(1, 16, 3, 48, 48, dtype=dtype, requires_grad=True)
        out = embed(x)
        grad = torch.randn_like(out)
        out.backward(grad)
        ref_w = embed.proj.weight.detach().float().requires_grad_()
        ref_b = embed.proj.bias.detach().float().requires_grad_()
        ref_x = x.detach().float().requires_grad_()
        ref = F.conv3d(ref_x, ref_w, ref_b, stride=(1, 2, 2)).flatten(2).transpose(1, 2)
        ref.backward(grad.float())
        tol = dict(rtol=0, atol=1e-4) if dtype == torch.float32 else dict(rtol=2e-2, atol=0.5)
        assert embed.proj.weight.grad.isfinite().all() and embed.proj.bias.grad.isfinite().all()
        torch.testing.assert_close(out.float(), ref, **tol)
        torch.testing.assert_close(embed.proj.weight.grad.float(), ref_w.grad, **tol)
        torch.testing.assert_close(x.grad.float(), ref_x.grad, **tol)
    finally:
        torch.set_num_threads(threads)


def test_patch_embed_refuses_partial_patches():
    from hcustom_mc.model.layers import PatchEmbed

    with pytest.raises(ValueError, match=r"not a whole number of \(1, 2, 2\) patches"):
        PatchEmbed((1, 2, 2), 4, 8)(torch.zeros(1, 4, 2, 5, 6))
