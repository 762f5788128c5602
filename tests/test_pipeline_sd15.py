"""Whole `generate` loops against diffusers' pipelines at SD1.5 size: every sampler, img2img, inpainting.

128x128 keeps these affordable on a CPU (the 512x512 text-to-image check is in test_parity_sd15.py).
Both sides start from the same latents and seed; ancestral samplers consume the same noise draws.
"""

from __future__ import annotations

import gc

import numpy as np
import pytest
import torch
from PIL import Image

from reference import SCHEDULER_CONFIG, reference_pipeline
from sdlab import model_loader, pipeline

SIZE, STEPS, SEED = 128, 4, 3
PROMPT = "a watercolor painting of a lighthouse at dusk"


def diffusers_scheduler(name: str):
    import diffusers

    karras = name.endswith("_karras")
    kind = {
        "ddpm": diffusers.DDPMScheduler, "ddim": diffusers.DDIMScheduler, "euler": diffusers.EulerDiscreteScheduler,
        "euler_a": diffusers.EulerAncestralDiscreteScheduler, "dpmpp_2m": diffusers.DPMSolverMultistepScheduler,
    }[name.removesuffix("_karras")]
    return kind.from_config(SCHEDULER_CONFIG, **({"use_karras_sigmas": True} if karras else {}))


def as_uint8(images) -> np.ndarray:
    return (images[0] * 255).round().astype(np.uint8)


def assert_same_image(ours, theirs):
    assert ours.shape == theirs.shape and ours.dtype == np.uint8
    assert ours.std() > 1
    diff = np.abs(ours.astype(int) - theirs.astype(int))
    print(f"max uint8 diff {diff.max()}, {np.mean(diff > 0):.2%} of values differ")
    assert diff.max() <= 1


@pytest.fixture(scope="module")
def latents():
    return torch.randn(1, 4, SIZE // 8, SIZE // 8, generator=torch.Generator().manual_seed(99))


@pytest.fixture(scope="module")
def photo():
    from skimage.data import astronaut

    return Image.fromarray(astronaut()).resize((SIZE, SIZE), Image.Resampling.LANCZOS)


@pytest.fixture(scope="module")
def mask():
    array = np.zeros((SIZE, SIZE), np.uint8)
    array[SIZE // 4 : 3 * SIZE // 4, 3 * SIZE // 8 : 7 * SIZE // 8] = 255  # repaint a rectangle
    return Image.fromarray(array, mode="L")


@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "euler", "euler_a", "dpmpp_2m", "euler_karras", "dpmpp_2m_karras"])
def test_generate_matches_diffusers_for_every_sampler(sdlab_models, reference, latents, sampler):
    ours = pipeline.generate(
        PROMPT, uncond_prompt="blurry", sampler_name=sampler, n_inference_steps=STEPS, models=sdlab_models,
        seed=SEED, height=SIZE, width=SIZE, latents=latents, progress=False,
    )
    pipe = reference_pipeline(reference, diffusers_scheduler(sampler))
    theirs = pipe(
        PROMPT, negative_prompt="blurry", num_inference_steps=STEPS, guidance_scale=7.5, height=SIZE, width=SIZE,
        latents=latents.clone(), generator=torch.Generator().manual_seed(SEED), output_type="np",
    ).images
    assert_same_image(ours, as_uint8(theirs))


@pytest.mark.parametrize("sampler", ["ddim", "euler_a"])
def test_img2img_matches_diffusers(sdlab_models, reference, photo, sampler):
    from diffusers import StableDiffusionImg2ImgPipeline

    ours = pipeline.generate(
        PROMPT, input_image=photo, strength=0.6, sampler_name=sampler, n_inference_steps=5, models=sdlab_models,
        seed=SEED, height=SIZE, width=SIZE, progress=False,
    )
    pipe = StableDiffusionImg2ImgPipeline(**reference_pipeline(reference, diffusers_scheduler(sampler)).components)
    pipe.set_progress_bar_config(disable=True)
    theirs = pipe(
        PROMPT, image=photo, strength=0.6, num_inference_steps=5, guidance_scale=7.5,
        generator=torch.Generator().manual_seed(SEED), output_type="np",
    ).images
    assert_same_image(ours, as_uint8(theirs))


def test_inpainting_with_any_checkpoint_matches_diffusers(sdlab_models, reference, latents, photo, mask):
    """A 4-channel U-Net: the kept region is re-imposed after every step (diffusers does the same)."""
    ours = pipeline.generate(
        PROMPT, input_image=photo, mask_image=mask, strength=1.0, sampler_name="ddim", n_inference_steps=STEPS,
        models=sdlab_models, seed=SEED, height=SIZE, width=SIZE, latents=latents, progress=False,
    )
    pipe = reference_pipeline(reference, diffusers_scheduler("ddim"), inpaint=True)
    theirs = pipe(
        PROMPT, image=photo, mask_image=mask, strength=1.0, num_inference_steps=STEPS, guidance_scale=7.5,
        height=SIZE, width=SIZE, latents=latents.clone(), generator=torch.Generator().manual_seed(SEED), output_type="np",
    ).images
    assert_same_image(ours, as_uint8(theirs))
    keep = np.asarray(mask) == 0
    photo_array = np.asarray(photo).astype(int)
    outside = np.abs(ours.astype(int) - photo_array)[keep].mean()
    inside = np.abs(ours.astype(int) - photo_array)[~keep].mean()
    assert outside < inside  # the kept region stays closer to the photo than the repainted one


def test_inpainting_checkpoint_is_detected_and_matches_diffusers(sd15_file, sdlab_models, reference, latents, photo, mask):
    """The sd-v1-5-inpainting layout (U-Net conv_in [320, 9, 3, 3]) needs no flag."""
    from diffusers import UNet2DConditionModel
    from safetensors.torch import load_file

    from reference import diffusers_conversions, reference_configs

    state = load_file(str(sd15_file))
    key = "model.diffusion_model.input_blocks.0.0.weight"
    state[key] = torch.randn(320, 9, 3, 3, generator=torch.Generator().manual_seed(5)) / 9
    config = model_loader.detect_config(state, {})
    assert config.unet.in_channels == 9
    unet9 = UNet2DConditionModel(**{**reference_configs()[1], "in_channels": 9}).eval()
    unet9.load_state_dict(diffusers_conversions(dict(state), unet9, reference["vae"])[1])
    ours9 = model_loader.load_state_dict(state, config)
    del state
    gc.collect()
    models = {**sdlab_models, "diffusion": ours9["diffusion"]}
    del ours9
    ours = pipeline.generate(
        PROMPT, input_image=photo, mask_image=mask, strength=1.0, sampler_name="dpmpp_2m", n_inference_steps=STEPS,
        models=models, seed=SEED, height=SIZE, width=SIZE, latents=latents, progress=False,
    )
    pipe = reference_pipeline(reference, diffusers_scheduler("dpmpp_2m"), unet=unet9, inpaint=True)
    theirs = pipe(
        PROMPT, image=photo, mask_image=mask, strength=1.0, num_inference_steps=STEPS, guidance_scale=7.5,
        height=SIZE, width=SIZE, latents=latents.clone(), generator=torch.Generator().manual_seed(SEED), output_type="np",
    ).images
    assert_same_image(ours, as_uint8(theirs))
    with pytest.raises(ValueError, match="inpainting checkpoint"):
        pipeline.generate(PROMPT, input_image=photo, models=models, height=SIZE, width=SIZE, n_inference_steps=1, progress=False)
