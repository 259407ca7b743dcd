"""VideoVAE: both checkpoint layouts, latent scaling, shapes, tiling, and strict loading (tiny random VAE)."""

import json

import pytest
import torch

from hcustom_mc.checkpoint.release import CheckpointFormatError
from hcustom_mc.encoders.vae import VideoVAE, save_tiny_vae

SMALL_TILES = dict(height=16, width=16, stride_height=8, stride_width=8, frames=4, stride_frames=4)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("vae")
    return save_tiny_vae(root / "diffusers", fmt="diffusers"), save_tiny_vae(root / "release", fmt="release")


@pytest.fixture(scope="module")
def vae(folders):
    return VideoVAE.from_pretrained(folders[0], tiling=False)


def _video(*shape, seed=0):
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_both_layouts_load_identical_weights_and_outputs(folders, vae):
    release_dir = folders[1]
    assert (release_dir / "pytorch_model.pt").is_file()
    assert all(k.startswith("vae.") for k in torch.load(release_dir / "pytorch_model.pt", weights_only=True))
    from_folder = VideoVAE.from_pretrained(release_dir, tiling=False)
    from_file = VideoVAE.from_pretrained(release_dir / "pytorch_model.pt", tiling=False)
    ref = vae.model.state_dict()
    for other in (from_folder, from_file):
        sd = other.model.state_dict()
        assert sd.keys() == ref.keys()
        assert all(torch.equal(sd[k], ref[k]) for k in ref)
        assert other.model.config.latent_channels == 4 and other.model.config.temporal_compression_ratio == 4
    x = _video(1, 3, 5, 16, 16)
    assert torch.equal(vae.encode(x, sample=False), from_file.encode(x, sample=False))
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    assert torch.equal(vae.encode(x, generator=g1), from_folder.encode(x, generator=g2))


def test_release_checkpoint_wrapped_in_state_dict(folders, tmp_path):
    sd = torch.load(folders[1] / "pytorch_model.pt", weights_only=True)
    (tmp_path / "config.json").write_text((folders[1] / "config.json").read_text())
    torch.save({"state_dict": sd}, tmp_path / "pytorch_model.pt")
    loaded = VideoVAE.from_pretrained(tmp_path)
    assert torch.equal(loaded.model.encoder.conv_in.conv.weight, sd["vae.encoder.conv_in.conv.weight"])


def test_round_trip_shapes_and_range(vae):
    x = _video(1, 3, 9, 32, 32)
    z = vae.encode(x)
    assert z.shape == (1, 4, 3, 4, 4)
    y = vae.decode(z)
    assert y.shape == (1, 3, 9, 32, 32)
    assert y.min() >= -1 and y.max() <= 1
    image = vae.encode_image(x[:, :, 0], sample=False)  # identity image = 1-frame video
    assert image.shape == (1, 4, 1, 4, 4)
    assert torch.allclose(image, vae.encode(x[:, :, :1], sample=False))


def test_scaling_factor_matches_direct_diffusers_calls(vae):
    sf = vae.model.config.scaling_factor
    assert sf == pytest.approx(0.476986)
    x = _video(1, 3, 5, 16, 16, seed=1)
    with torch.no_grad():
        dist = vae.model.encode(x).latent_dist
        assert torch.allclose(vae.encode(x, sample=False), dist.mode() * sf)
        g1, g2 = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
        assert torch.allclose(vae.encode(x, generator=g1), dist.sample(generator=g2) * sf)
        z = vae.encode(x, sample=False)
        direct = vae.model.decode(z / sf).sample.clamp(-1, 1)
    assert torch.allclose(vae.decode(z), direct)


def test_frame_count_must_be_4k_plus_1(vae):
    with pytest.raises(ValueError, match="4k\\+1"):
        vae.encode(_video(1, 3, 8, 16, 16))
    with pytest.raises(ValueError, match="multiples of 8"):
        vae.encode(_video(1, 3, 5, 12, 16))


def _encoder_calls(vae, fn):
    calls = []
    handle = vae.model.encoder.register_forward_hook(lambda *a: calls.append(1))
    try:
        out = fn()
    finally:
        handle.remove()
    return out, len(calls)


def test_tiling_really_tiles_and_matches_untiled_where_it_must(folders, vae):
    """Tolerance: 1e-4 absolute (float32 reassociation only).

    With *random* weights tiled and untiled outputs are NOT close for generic input: the receptive
    field, the mid-block attention and GroupNorm statistics all span more than a 16-px tile, which
    trained weights tolerate and random ones do not. So closeness is checked on inputs for which
    tiling must be exact for any weights: (a) spatially uniform, time-varying video under spatial tiles
    (every tile sees the same replicate-padded field), (b) a static, spatially varying video under
    temporal tiles (causal replicate padding of a tile's first frame equals the true history). Both
    exercise the tile split, blending and cropping. Generic input checks that tiling ran (encoder call
    count) and gives the same shapes."""
    spatial = VideoVAE.from_pretrained(folders[0], tiling=True, tile_sizes={**SMALL_TILES, "frames": 16, "stride_frames": 12})
    temporal = VideoVAE.from_pretrained(folders[0], tiling=True, tile_sizes={**SMALL_TILES, "height": 32, "width": 32,
                                                                             "stride_height": 32, "stride_width": 32})
    uniform = _video(1, 3, 9, 1, 1, seed=2).expand(1, 3, 9, 32, 32).contiguous()
    static = _video(1, 3, 1, 32, 32, seed=3).expand(1, 3, 9, 32, 32).contiguous()
    for tiled, x in ((spatial, uniform), (temporal, static)):
        z_ref, n_ref = _encoder_calls(vae, lambda: vae.encode(x, sample=False))
        z_tiled, n_tiled = _encoder_calls(tiled, lambda: tiled.encode(x, sample=False))
        assert n_ref == 1 and n_tiled > 1
        assert torch.allclose(z_tiled, z_ref, atol=1e-4, rtol=0)
        assert torch.allclose(tiled.decode(z_ref), vae.decode(z_ref), atol=1e-4, rtol=0)
    # Static latents decode to a static video in time tiles too (decoder-side temporal tiling).
    z_static = vae.encode(static, sample=False)[:, :, :1].expand(-1, -1, 5, -1, -1).contiguous()
    assert torch.allclose(temporal.decode(z_static), vae.decode(z_static), atol=1e-4, rtol=0)
    # Generic input: both tilings at once run and keep shapes.
    both = VideoVAE.from_pretrained(folders[0], tiling=True, tile_sizes=SMALL_TILES)
    x = _video(1, 3, 9, 32, 32, seed=4)
    z, n = _encoder_calls(both, lambda: both.encode(x, sample=False))
    assert n > 4 and z.shape == (1, 4, 3, 4, 4) and both.decode(z).shape == (1, 3, 9, 32, 32)
    with pytest.raises(ValueError, match="multiples of 8"):
        both.set_tiling(True, {"height": 12})


def test_strict_load_names_wrong_key(folders, tmp_path):
    sd = torch.load(folders[1] / "pytorch_model.pt", weights_only=True)
    sd["vae.encoder.conv_in.weight"] = sd.pop("vae.encoder.conv_in.conv.weight")
    torch.save(sd, tmp_path / "pytorch_model.pt")
    (tmp_path / "config.json").write_text((folders[1] / "config.json").read_text())
    with pytest.raises(CheckpointFormatError) as err:
        VideoVAE.from_pretrained(tmp_path / "pytorch_model.pt")
    msg = str(err.value)
    assert "encoder.conv_in.conv.weight" in msg and "missing" in msg
    assert "encoder.conv_in.weight" in msg and "unexpected" in msg and "pytorch_model.pt" in msg


def test_release_config_with_unknown_key_is_rejected(folders, tmp_path):
    cfg = json.loads((folders[1] / "config.json").read_text())
    cfg["mystery_option"] = 1
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    torch.save({}, tmp_path / "pytorch_model.pt")
    with pytest.raises(CheckpointFormatError, match="mystery_option"):
        VideoVAE.from_pretrained(tmp_path)


@pytest.mark.parametrize("nproc", [2, pytest.param(3, marks=pytest.mark.slow)])
def test_decode_split_across_ranks_equals_the_single_rank_decode(tmp_path, nproc):
    from tests.torchrun import REPO, torchrun

    save_tiny_vae(tmp_path / "vae")
    out = torchrun(nproc, REPO / "tests" / "dist_scripts" / "vae_decode_check.py", tmp_path / "vae")
    assert "decode OK (1, 3, 21, 24, 40)" in out


def test_incompatible_diffusers_vae_api_is_refused_by_name(folders, monkeypatch):
    """The tiling switches we set are checked on the built model: a release without them fails with one message."""
    from hcustom_mc.encoders.vae import check_vae_api

    model = VideoVAE.from_pretrained(folders[0], tiling=False).model  # its own copy: this test breaks it
    check_vae_api(model)  # the installed diffusers has them
    monkeypatch.delattr(type(model), "enable_tiling")

    def enable_tiling(self, tile_sample_min_height=None):  # an older signature
        pass

    monkeypatch.setattr(type(model), "enable_tiling", enable_tiling)
    del model.use_framewise_decoding
    with pytest.raises(RuntimeError, match=r"diffusers .*lacks use_framewise_decoding, "
                                           r"enable_tiling\(tile_sample_min_width=\)"):
        VideoVAE(model)
