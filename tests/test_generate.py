"""`pipeline.generate` on the bundled tiny model: the stages compose to `generate`, defaults come from the
model, results are bit-identical across repeats, processes, threads and `idle_device`, and NaN/inf
raises `NumericalError` instead of returning a black image."""

from __future__ import annotations

import subprocess
import sys
import threading

import numpy as np
import pytest
import torch

from sdlab import pipeline
from sdlab.config import SamplingDefaults
from sdlab.errors import ArgumentError, NumericalError
from sdlab.model_loader import preload_models_from_standard_weights
from sdlab.samplers import make_sampler

PROMPT = "a large red circle to the left of a small blue square"
QUICK = {"height": 64, "width": 64, "sampler_name": "dpmpp_2m", "n_inference_steps": 3, "cfg_scale": 5.0, "seed": 7,
         "progress": False}


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def sane(image: np.ndarray, size=(64, 64)) -> bool:
    return image.shape == (*size, 3) and image.dtype == np.uint8 and image.std() > 1


def test_generate_is_its_stages_composed(tiny, tokenizer):
    """encode_prompts -> prepare_latents -> denoise -> decode, called by hand, give generate's pixels."""
    steps = []
    generated = pipeline.generate(PROMPT, models=tiny, tokenizer=tokenizer, packed=False, **QUICK,
                                  callback=lambda i, t, latents, eps: steps.append(latents.clone()))
    generator = pipeline.make_generator(QUICK["seed"])
    sampler = make_sampler("dpmpp_2m", generator)
    sampler.set_inference_timesteps(3)
    with torch.no_grad():
        context = pipeline.encode_prompts(tokenizer, tiny["clip"], [PROMPT, ""], "cpu")
        latents, inpainting = pipeline.prepare_latents(sampler, (1, 4, 8, 8), generator, "cpu")
        assert inpainting is None
        latents = pipeline.denoise(tiny["diffusion"], sampler, latents, context, 5.0)
        by_hand = pipeline.to_uint8(pipeline.decode(tiny["decoder"], latents))[0]
    assert len(steps) == 3 and torch.equal(steps[-1], latents)
    assert np.array_equal(generated, by_hand) and sane(generated)


def test_classifier_free_guidance_is_the_formula():
    cond, uncond = torch.randn(2, 1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    assert torch.equal(pipeline.classifier_free_guidance(cond, uncond, 1.0), uncond + 1.0 * (cond - uncond))
    assert torch.equal(pipeline.classifier_free_guidance(cond, uncond, 0.0), uncond)
    assert torch.allclose(pipeline.classifier_free_guidance(cond, uncond, 7.5), uncond + 7.5 * (cond - uncond), atol=1e-6)


def test_settings_left_out_come_from_the_model(tiny, tokenizer):
    models = dict(tiny)
    diffusion = models["diffusion"]
    own = getattr(diffusion, "sampling", None)
    diffusion.sampling = SamplingDefaults(height=48, width=72, sampler="euler", steps=2, cfg_scale=3.0)
    try:
        implicit = pipeline.generate(PROMPT, models=models, tokenizer=tokenizer, seed=1, progress=False)
        explicit = pipeline.generate(PROMPT, models=models, tokenizer=tokenizer, seed=1, progress=False, height=48,
                                     width=72, sampler_name="euler", n_inference_steps=2, cfg_scale=3.0)
        zero_cfg = pipeline.generate(PROMPT, models=models, tokenizer=tokenizer, seed=1, progress=False, cfg_scale=0)
    finally:
        diffusion.sampling = own
    assert implicit.shape == (48, 72, 3) and np.array_equal(implicit, explicit)
    assert not np.array_equal(zero_cfg, implicit)  # 0 is a setting, not "not given"


def test_the_same_seed_gives_bit_identical_images_in_one_process_and_with_idle_device(tiny, tokenizer):
    first = pipeline.generate(PROMPT, models=tiny, tokenizer=tokenizer, **QUICK)
    again = pipeline.generate(PROMPT, models=tiny, tokenizer=tokenizer, **QUICK)
    idle = pipeline.generate(PROMPT, models=tiny, tokenizer=tokenizer, idle_device="cpu", **QUICK)
    huge_seed = pipeline.generate(PROMPT, models=tiny, tokenizer=tokenizer, **{**QUICK, "seed": QUICK["seed"] + 2**64})
    negative_seed = pipeline.generate(PROMPT, models=tiny, tokenizer=tokenizer, **{**QUICK, "seed": -1})
    wrapped = pipeline.generate(PROMPT, models=tiny, tokenizer=tokenizer, **{**QUICK, "seed": 2**64 - 1})
    assert sane(first)
    assert np.array_equal(first, again) and np.array_equal(first, idle) and np.array_equal(first, huge_seed)
    assert np.array_equal(negative_seed, wrapped)  # -1 is 2**64 - 1 to torch.Generator.manual_seed as well


def test_the_same_seed_gives_bit_identical_images_in_two_processes(tiny, tokenizer, tmp_path):
    here = pipeline.generate(PROMPT, models=tiny, tokenizer=tokenizer, **QUICK)
    script = (
        "import sys, numpy, torch; torch.set_num_threads(1)\n"
        "from sdlab import pipeline\n"
        f"image = pipeline.generate({PROMPT!r}, **{QUICK!r})\n"
        "numpy.save(sys.argv[1], image)\n"
    )
    out = tmp_path / "image.npy"
    subprocess.run([sys.executable, "-c", script, str(out)], check=True, timeout=600)
    assert np.array_equal(np.load(out), here)


@pytest.mark.parametrize("packed", [True, False])
def test_two_threads_on_the_same_models_get_correct_identical_results(tiny, tokenizer, packed):
    alone = pipeline.generate(PROMPT, models=tiny, tokenizer=tokenizer, packed=packed, **QUICK)
    other = pipeline.generate("a small green triangle at the bottom", models=tiny, tokenizer=tokenizer, **QUICK)
    results, errors = {}, []

    def run(name, prompt, **options):
        try:
            results[name] = pipeline.generate(prompt, models=tiny, tokenizer=tokenizer, **options, **QUICK)
        except Exception as error:  # noqa: BLE001 - reported below
            errors.append(error)

    threads = [threading.Thread(target=run, args=(f"same{i}", PROMPT), kwargs={"packed": packed}) for i in range(2)]
    threads.append(threading.Thread(target=run, args=("other", "a small green triangle at the bottom")))
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    assert not errors, errors
    assert np.array_equal(results["same0"], alone) and np.array_equal(results["same1"], alone)
    assert np.array_equal(results["other"], other)
    weights = {k: v.clone() for k, v in tiny["diffusion"].state_dict().items()}
    pipeline.generate(PROMPT, models=tiny, tokenizer=tokenizer, **QUICK)
    assert all(torch.equal(v, tiny["diffusion"].state_dict()[k]) for k, v in weights.items())  # handed back intact


def test_non_finite_values_raise_numerical_error_naming_the_step_and_cause(tokenizer):
    models = preload_models_from_standard_weights()
    with pytest.raises(NumericalError, match=r"step \d of 3 .*cfg_scale"):
        pipeline.generate(PROMPT, models=models, tokenizer=tokenizer, **{**QUICK, "cfg_scale": 1e38})
    with pytest.raises(ArgumentError, match="cfg_scale must be finite"):
        pipeline.generate(PROMPT, models=models, tokenizer=tokenizer, **{**QUICK, "cfg_scale": float("nan")})
    with torch.no_grad():
        models["diffusion"].final.conv.weight[0, 0, 0, 0] = float("nan")
    for packed in (True, False):
        with pytest.raises(NumericalError, match=r"step 1 of 3.*final\.conv\.weight"):
            pipeline.generate(PROMPT, models=models, tokenizer=tokenizer, packed=packed, **QUICK)
    assert torch.isnan(models["diffusion"].final.conv.weight[0, 0, 0, 0])  # packing handed it back as it was
    with torch.no_grad():
        models["decoder"].state_dict()[next(iter(models["decoder"].state_dict()))].fill_(float("inf"))
    latents = torch.zeros(1, 4, 8, 8)
    with pytest.raises(NumericalError, match="VAE decoder"):
        pipeline.decode(models["decoder"], latents)


def test_the_float16_path_stays_finite_on_the_tiny_model(tokenizer):
    half = preload_models_from_standard_weights(None, "cpu", dtype=torch.float16)
    image = pipeline.generate(PROMPT, models=half, tokenizer=tokenizer, **QUICK)
    assert sane(image)
    assert all(p.dtype == torch.float16 for p in half["decoder"].parameters())  # the decoder's upcast is undone


def test_denoise_runs_a_batch_with_guidance(tiny, tokenizer):
    """Many prompts at once, context `cat([prompts, negatives])`: each item equals its own batch-1 run up to rounding."""
    prompts = [PROMPT, "a small green triangle at the bottom"]
    with torch.no_grad():
        context = pipeline.encode_prompts(tokenizer, tiny["clip"], prompts + ["", ""], "cpu")
        noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
        sampler = make_sampler("ddim")
        sampler.set_inference_timesteps(3)
        both = pipeline.denoise(tiny["diffusion"], sampler, noise, context, 5.0)
        for i in range(2):
            sampler.set_inference_timesteps(3)
            one = pipeline.denoise(tiny["diffusion"], sampler, noise[i : i + 1], context[i :: 2], 5.0)
            assert torch.allclose(both[i : i + 1], one, atol=1e-5)



@pytest.mark.parametrize("height,width", [(72, 40), (520, 600), (64, 200)])
def test_every_multiple_of_8_works_end_to_end(tiny, tokenizer, height, width):
    """Sizes that are multiples of 8 but not of 64: odd latent sizes (9x5, 65x75) go through the U-Net."""
    settings = {**QUICK, "n_inference_steps": 1, "height": height, "width": width}
    image = pipeline.generate(PROMPT, models=tiny, tokenizer=tokenizer, **settings)
    assert sane(image, (height, width))
