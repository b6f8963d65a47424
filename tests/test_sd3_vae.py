"""The SD3 autoencoder against diffusers' AutoencoderKL: same parameter names and shapes, the same
encode / decode numbers on tiny random models (within 1e-4 of the reference's scale), the same
posterior sample, the same size at SD3's real config."""

import pytest
import torch

from conftest import assert_close_to_reference, oracle
from tinyteef.sd3.vae import VAE, VAEConfig

SF, SHIFT = 1.5305, 0.0609  # SD3's latent scaling and shift (diffusers' config.json of SD3)

# Tiny configs: 2 levels, and 3 levels so a middle level has both a resampler and no width change.
TINY2 = dict(block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4, latent_channels=4)
TINY3 = dict(block_out_channels=(8, 16, 16), layers_per_block=1, norm_num_groups=4,
             latent_channels=4)


def diffusers_vae(seed=0, **cfg):
    """A diffusers AutoencoderKL with SD3's structure (no quant convs, SD3's scale and shift),
    random init from diffusers, eval mode."""
    diffusers = oracle("diffusers")
    torch.manual_seed(seed)
    n = len(cfg["block_out_channels"])
    ref = diffusers.AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
        use_quant_conv=False, use_post_quant_conv=False, scaling_factor=SF, shift_factor=SHIFT,
        **cfg)
    return ref.eval()


def perturb(model, seed, std=0.1):
    """Add N(0, std^2) to every parameter: diffusers' init leaves GroupNorm affines at (1, 0) and
    biases small, which would hide a swapped norm or bias."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * std)


def pair(cfg, seed=0):
    """(ours, diffusers') with identical weights, loaded into ours with strict=True."""
    ref = diffusers_vae(seed, **cfg)
    perturb(ref, seed + 1)
    ours = VAE(VAEConfig(**cfg, scaling_factor=SF, shift_factor=SHIFT)).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ours, ref


@pytest.mark.parametrize("cfg", [TINY2, TINY3], ids=["2-level", "3-level"])
def test_state_dict_keys_and_shapes_match_diffusers(cfg):
    ref = diffusers_vae(**cfg)
    ours = VAE(VAEConfig(**cfg))
    ours_shapes = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    ref_shapes = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    assert ours_shapes == ref_shapes


@pytest.mark.parametrize("cfg", [TINY2, TINY3], ids=["2-level", "3-level"])
def test_encode_decode_match_diffusers(cfg):
    ours, ref = pair(cfg)
    f = 2 ** (len(cfg["block_out_channels"]) - 1)
    x = torch.rand(2, 3, 24, 40, generator=torch.Generator().manual_seed(2)) * 2 - 1  # non-square
    with torch.no_grad():
        z = ours.encode(x)
        z_ref = (ref.encode(x).latent_dist.mean - SHIFT) * SF  # SD3's model-space latents, by hand
        assert z.shape == (2, cfg["latent_channels"], 24 // f, 40 // f)
        assert_close_to_reference(z, z_ref, what="encoded latents")

        x_hat = ours.decode(z_ref)
        x_ref = ref.decode(z_ref / SF + SHIFT).sample
        assert x_hat.shape == x.shape
        assert_close_to_reference(x_hat, x_ref, what="decoded image")


def test_posterior_sample_matches_mean_plus_std_noise():
    ours, ref = pair(TINY3, seed=3)
    x = torch.rand(2, 3, 16, 24, generator=torch.Generator().manual_seed(4)) * 2 - 1
    with torch.no_grad():
        z = ours.encode(x, sample=True, generator=torch.Generator().manual_seed(5))
        post = ref.encode(x).latent_dist
        noise = torch.randn(post.mean.shape, generator=torch.Generator().manual_seed(5))
        expected = (post.mean + torch.exp(0.5 * post.logvar) * noise - SHIFT) * SF
    assert_close_to_reference(z, expected, what="posterior sample")
    # A draw, not the mean: the posterior std of a random model is far from zero.
    assert not torch.allclose(z, ours.encode(x), atol=1e-3)


def test_sd3_default_config_matches_diffusers_parameter_count():
    ref = diffusers_vae(block_out_channels=(128, 256, 512, 512), layers_per_block=2,
                        norm_num_groups=32, latent_channels=16)
    ours = VAE(VAEConfig())
    n_ours = sum(p.numel() for p in ours.parameters())
    assert n_ours == sum(p.numel() for p in ref.parameters())
    # 83,653,863 is the SD1/SDXL autoencoder (4 latent channels, with quant convs). SD3's differs
    # by encoder conv_out 512->32 instead of ->8 (+24*512*9 + 24), decoder conv_in 16->512 instead
    # of 4->512 (+12*512*9), and no quant_conv (-8*8 - 8) or post_quant_conv (-4*4 - 4).
    assert n_ours == 83_653_863 + 110_616 + 55_296 - 72 - 20 == 83_819_683
    assert {k: v.shape for k, v in ours.state_dict().items()} == \
        {k: v.shape for k, v in ref.state_dict().items()}


def test_groups_must_divide_widths():
    with pytest.raises(ValueError, match="norm_num_groups"):
        VAEConfig(block_out_channels=(8, 12), norm_num_groups=8)
