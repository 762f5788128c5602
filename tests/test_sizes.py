"""Every image size that is a multiple of 8 works at every model size, as in diffusers; the shared
blocks (`sdlab.blocks`) and the reference configs (`sdlab.reference`) they are checked with.

The small test model and the bundled tiny model against diffusers' `UNet2DConditionModel` and
`AutoencoderKL` of the same sizes, loaded through diffusers' own converters from the original-layout
weights, at latent sizes that are not multiples of 8 (the SD1.5-size check is in test_parity_sd15.py).
"""

from __future__ import annotations

import pytest
import torch

from sdlab import SD15, model_converter, model_loader
from sdlab.blocks import Downsample, Upsample
from sdlab.reference import diffusers_conversions, reference_configs, reference_unet, reference_vae, unet_kwargs, vae_kwargs
from small import small_models

SIZES = [(8, 8), (9, 5), (7, 13), (1, 1)]  # latent sizes; (8, 8) is a 64x64 image


def max_diff(a, b) -> float:
    return (a.double() - b.double()).abs().max().item()


@pytest.fixture(scope="module", params=["small", "tiny"])
def pair(request):
    """(sdlab's models, diffusers' U-Net and VAE with the same weights) for one model size."""
    models = small_models(seed=0) if request.param == "small" else model_loader.preload_models_from_standard_weights()
    unet, vae = reference_unet(models["diffusion"].config), reference_vae(models["decoder"].config)
    _, unet_weights, vae_weights = diffusers_conversions(model_converter.to_standard(models), unet, vae)
    unet.load_state_dict(unet_weights, strict=True)
    vae.load_state_dict(vae_weights, strict=True)
    return {name: model.eval() for name, model in models.items()}, unet, vae


@pytest.mark.parametrize("size", SIZES)
def test_unet_matches_diffusers_at_any_latent_size(pair, size):
    models, unet, _ = pair
    generator = torch.Generator().manual_seed(size[0] * 100 + size[1])
    latents = torch.randn(2, 4, *size, generator=generator)
    context = torch.randn(2, 77, models["diffusion"].config.d_context, generator=generator)
    timesteps = torch.tensor([500.0, 20.0])
    with torch.no_grad():
        ours = models["diffusion"](latents, context, timesteps)
        theirs = unet(latents, timesteps, encoder_hidden_states=context).sample
    assert ours.shape == theirs.shape == (2, 4, *size)
    assert theirs.std() > 0.05
    assert max_diff(ours, theirs) <= 1e-5


@pytest.mark.parametrize("size", SIZES[:3])
def test_vae_matches_diffusers_at_any_multiple_of_8(pair, size):
    models, _, vae = pair
    generator = torch.Generator().manual_seed(size[0] * 10 + size[1])
    latents = torch.randn(1, 4, *size, generator=generator)
    image = torch.rand(1, 3, 8 * size[0], 8 * size[1], generator=generator) * 2 - 1
    with torch.no_grad():
        decoded = models["decoder"](latents)
        decoded_ref = vae.decode(latents / models["decoder"].config.scale_factor).sample
        mean, log_variance = models["encoder"].moments(image)
        dist = vae.encode(image).latent_dist
    assert decoded.shape == decoded_ref.shape == (1, 3, 8 * size[0], 8 * size[1])
    assert mean.shape == (1, 4, *size)
    assert max_diff(decoded, decoded_ref) <= 1e-4
    assert max_diff(mean, dist.mean) <= 1e-4 and max_diff(log_variance, dist.logvar) <= 1e-4


def test_tiny_model_generates_a_72x40_image():
    """The whole pipeline at latents 9x5 (every U-Net level rounds an odd size)."""
    from sdlab import pipeline

    image = pipeline.generate("a large red square in the top left", height=72, width=40, n_inference_steps=2,
                              sampler_name="dpmpp_2m", seed=0, progress=False)
    assert image.shape == (72, 40, 3) and image.std() > 1


def test_upsample_to_twice_the_size_is_the_2x_upsample():
    """At multiples of 64 nothing changes: up-sampling to the skip's size is bit for bit the 2x one."""
    torch.manual_seed(0)
    upsample = Upsample(6).eval()
    x = torch.randn(2, 6, 5, 7)
    with torch.no_grad():
        assert torch.equal(upsample(x, (10, 14)), upsample(x))
        assert upsample(x, (9, 13)).shape == (2, 6, 9, 13)
        assert torch.equal(upsample(x, (9, 13)), upsample.conv(x.repeat_interleave(2, -2).repeat_interleave(2, -1)[..., :9, :13]))


def test_downsample_family():
    x = torch.randn(1, 3, 9, 8)
    same, right_bottom = Downsample(3), Downsample(3, pad="right_bottom")
    assert same(x).shape == (1, 3, 5, 4) and right_bottom(x).shape == (1, 3, 4, 4)
    right_bottom.conv.load_state_dict(same.conv.state_dict())
    # right/bottom padding is the "same" convolution shifted by one pixel
    shifted = torch.nn.functional.conv2d(torch.nn.functional.pad(x, (0, 1, 0, 1)), same.conv.weight, same.conv.bias, stride=2)
    assert torch.equal(right_bottom(x), shifted)
    with pytest.raises(ValueError, match="right_bottom"):
        Downsample(3, pad="left")


def test_seed_names_and_checkpoint_layout_stay():
    """Names the seed imported stay importable where they were; module attributes (the checkpoint's
    key layout, which model_converter's rules depend on) are unchanged."""
    from sdlab.decoder import VAE_AttentionBlock, VAE_ResidualBlock  # noqa: F401
    from sdlab.diffusion import (  # noqa: F401
        UNET, Diffusion, SwitchSequential, TimeEmbedding, UNET_AttentionBlock, UNET_OutputLayer, UNET_ResidualBlock,
    )
    from sdlab.diffusion import Upsample as UNetUpsample
    from sdlab.encoder import VAE_Encoder  # noqa: F401

    assert UNetUpsample is Upsample
    keys = {name: list(model.state_dict()) for name, model in small_models(seed=0).items()}
    assert "unet.decoders.1.1.conv.weight" in keys["diffusion"]  # the U-Net's Upsample, after a residual block
    assert "unet.encoders.2.0.conv.weight" in keys["diffusion"]  # its Downsample
    assert "down.0.resample.conv.weight" in keys["encoder"] and "up.1.resample.conv.weight" in keys["decoder"]


def test_reference_kwargs_reproduce_the_sd15_reference_configs():
    """`unet_kwargs`/`vae_kwargs` (used for the small and tiny models above) give, for SD1.5, the
    reference configs written out independently of sdlab's."""
    _, unet, vae = reference_configs()
    assert unet_kwargs(SD15.unet) == {**{k: v for k, v in unet.items() if k != "sample_size"}, "norm_num_groups": 32}
    assert vae_kwargs(SD15.vae) == {**{k: v for k, v in vae.items() if k != "sample_size"}, "norm_num_groups": 32}
