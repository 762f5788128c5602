"""LCM: the `lcm` sampler against diffusers' `LCMScheduler`, LCM-LoRA files (their exact key layout) through
sdlab's LoRA loader against diffusers' `load_lora_weights`, and whole 4-step images without guidance
against diffusers' `StableDiffusionPipeline` + `LCMScheduler`, on the small random model and at SD1.5 size.

Every step of the sampler's trajectories (fresh noise between steps included) is also checked in
tests/test_samplers.py, where `lcm` is one of the cases.

**LCM-LoRA's layout** (latent-consistency/lcm-lora-sdv1-5, `pytorch_lora_weights.safetensors`): the kohya
format with diffusers' U-Net names, as the LCM distillation scripts write it (`get_module_kohya_state_dict`):
`lora_unet_<module, dots as underscores>.lora_down.weight` / `.lora_up.weight` / `.alpha`, float16, rank 64,
on the U-Net only, on every layer PEFT's `target_modules` of that script select (the attention projections,
`proj_in`/`proj_out`, the feed-forward, the resnets' `conv1`/`conv2`/`conv_shortcut`/`time_emb_proj`, the
down- and up-samplers' convolutions): 278 layers, 834 tensors, 67.3 M parameters on SD1.5.
"""

from __future__ import annotations

import gc
import json
import warnings

import numpy as np
import pytest
import torch
from test_lora import compare, relative, sdlab_outputs, small_pair  # noqa: F401 - small_pair: its fixture, shared
from test_samplers import SHAPE, run_both
from torch import nn

from sdlab import lora, pipeline
from sdlab.errors import ArgumentError
from sdlab.reference import diffusers_scheduler, reference_pipeline
from sdlab.samplers import LCMSampler, make_sampler

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:diffusers.*")

#: PEFT's `target_modules` of diffusers' LCM-LoRA distillation scripts (a module matches by name suffix)
LCM_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv1",
                    "conv2", "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv", "time_emb_proj")
LCM_LORA_RANK = 64
PROMPT = "a watercolor painting of a lighthouse at dusk"


def lcm_lora_layers(reference_unet) -> dict[str, nn.Module]:
    """The layers of a diffusers U-Net that LCM-LoRA adapts, by name (PEFT's rule: the name or a `.`-suffix)."""
    return {name: module for name, module in reference_unet.named_modules()
            if any(name == target or name.endswith("." + target) for target in LCM_LORA_TARGETS)}


def lcm_lora_state(reference_unet, seed: int = 0, rank: int = LCM_LORA_RANK, alpha: float = 8.0,
                   std: float = 0.02) -> dict[str, torch.Tensor]:
    """Random float16 adapters in LCM-LoRA's exact key layout for the layers of `reference_unet`."""
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for name, module in lcm_lora_layers(reference_unet).items():
        if isinstance(module, nn.Conv2d):
            down = torch.randn(rank, module.in_channels, *module.kernel_size, generator=generator)
            up = torch.randn(module.out_channels, rank, 1, 1, generator=generator)
        else:
            down = torch.randn(rank, module.in_features, generator=generator)
            up = torch.randn(module.out_features, rank, generator=generator)
        key = "lora_unet_" + name.replace(".", "_")
        state[f"{key}.lora_down.weight"] = (down * std).half()
        state[f"{key}.lora_up.weight"] = (up * std).half()
        state[f"{key}.alpha"] = torch.tensor(alpha, dtype=torch.float16)
    return state


# ----- the sampler -------------------------------------------------------------------------------


def test_lcm_timesteps_are_the_distillation_grid():
    sampler = make_sampler("lcm")
    assert isinstance(sampler, LCMSampler) and sampler.num_inference_steps == 4  # a new LCM sampler: 4 steps
    assert sampler.timesteps.tolist() == [999, 759, 499, 259]
    theirs = diffusers_scheduler("lcm")
    for steps in (1, 2, 3, 4, 8, 13, 50):
        sampler.set_inference_timesteps(steps)
        theirs.set_timesteps(steps)
        assert torch.equal(sampler.timesteps, theirs.timesteps), steps
        assert set(sampler.timesteps.tolist()) <= set(range(19, 1000, 20))  # on the 50-step grid
    with pytest.raises(ArgumentError, match="at most 50 steps"):
        sampler.set_inference_timesteps(51)
    with pytest.raises(ArgumentError, match="original_inference_steps"):
        make_sampler("lcm", None, original_inference_steps=0)


@pytest.mark.parametrize("original,steps", [(30, 6), (100, 8), (1000, 4)])
def test_other_distillation_grids_match_diffusers(original, steps):
    """`original_inference_steps`, and the boundary scalings c_skip / c_out, every step against diffusers."""
    ours = make_sampler("lcm", torch.Generator().manual_seed(3), original_inference_steps=original)
    theirs = diffusers_scheduler("lcm", original_inference_steps=original)
    ours.set_inference_timesteps(steps)
    theirs.set_timesteps(steps)
    assert torch.equal(ours.timesteps, theirs.timesteps)
    for t in (0, 19, 259, 999):
        assert np.allclose(ours.boundary_scalings(t), [float(v) for v in theirs.get_scalings_for_boundary_condition_discrete(t)],
                           rtol=1e-6, atol=1e-12)
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(4))
    run_both(ours, theirs, {"generator": torch.Generator().manual_seed(3)}, noise, noise.clone(), ours.timesteps)


def test_lcm_last_step_returns_the_clean_estimate():
    """No noise after the last step; stepping past the end is an error naming the fix."""
    sampler = make_sampler("lcm", torch.Generator().manual_seed(0))
    sampler.set_inference_timesteps(2)
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1))
    eps = torch.randn(SHAPE, generator=torch.Generator().manual_seed(2))
    sampler.step(sampler.timesteps[0], x, eps)
    state = sampler.generator.get_state()
    t = int(sampler.timesteps[1])
    alpha_bar = sampler.alphas_cumprod[t]
    c_skip, c_out = sampler.boundary_scalings(t)
    expected = c_out * (x - (1 - alpha_bar) ** 0.5 * eps) / alpha_bar**0.5 + c_skip * x
    assert torch.allclose(sampler.step(t, x, eps), expected, atol=1e-6)
    assert torch.equal(sampler.generator.get_state(), state)  # no draw on the last step
    with pytest.raises(RuntimeError, match="set_inference_timesteps"):
        sampler.step(t, x, eps)


# ----- LCM-LoRA through the LoRA loader ----------------------------------------------------------


def check_lcm_lora_parity(models, pipe, inputs, seed: int, rank: int, fuse: bool, label: str) -> None:
    state = lcm_lora_state(pipe.unet, seed=seed, rank=rank)
    before = sdlab_outputs(models, *inputs)[0]
    (unet_diff, clip_diff), ours = compare(models, pipe, state, inputs, scale=1.0, fuse=fuse, fuse_reference=False)
    print(f"{label} LCM-LoRA fuse={fuse}: U-Net rel. diff {unet_diff:.2e} ({len(state)} tensors)")
    assert unet_diff <= 1e-5 and clip_diff <= 1e-5
    assert relative(before, ours[0]) > 1e-2  # and it changes it
    assert torch.equal(sdlab_outputs(models, *inputs)[0], before)  # removed again, bit for bit


@pytest.mark.parametrize("fuse", [False, True])
def test_small_lcm_lora_matches_diffusers(small_pair, fuse):  # noqa: F811 - the fixture
    models, pipe, inputs = small_pair
    check_lcm_lora_parity(models, pipe, inputs, seed=1, rank=8, fuse=fuse, label="small")


def test_sd15_lcm_lora_layout_and_parity(sdlab_models, reference):
    """At SD1.5 size, rank 64 as the real file: the layout's size, and the U-Net's noise prediction with
    the adapters beside the weights (hooks: removed exactly, no 3.4 GB copy of the weights kept) against
    diffusers' `load_lora_weights` (never fused on the session-shared reference models: unfusing is not
    exact). Merging the same adapters is checked on the small model above, and at SD1.5 size on every
    layer by tests/test_lora.py."""
    pipe = reference_pipeline(reference, diffusers_scheduler("lcm"))
    layers = lcm_lora_layers(pipe.unet)
    kinds = {kind: sum(isinstance(m, kind) for m in layers.values()) for kind in (nn.Linear, nn.Conv2d)}
    assert len(layers) == 278 and kinds == {nn.Linear: 182, nn.Conv2d: 96}
    state = lcm_lora_state(pipe.unet, seed=7)
    parameters = sum(v.numel() for k, v in state.items() if not k.endswith(".alpha"))
    assert len(state) == 834 and round(parameters / 1e6, 1) == 67.3
    assert lora.parse_lora(state, sdlab_models) and all(k.startswith("lora_unet_") for k in state)
    generator = torch.Generator().manual_seed(2)
    inputs = (torch.randn(1, 4, 64, 64, generator=generator), torch.randn(1, 77, 768, generator=generator),
              torch.randint(0, 49406, (1, 77), generator=generator), torch.tensor(759))
    check_lcm_lora_parity(sdlab_models, pipe, inputs, seed=7, rank=LCM_LORA_RANK, fuse=False, label="SD1.5")
    del state, pipe
    gc.collect()


# ----- whole images: 4 LCM steps without guidance ------------------------------------------------


def as_uint8(images) -> np.ndarray:
    return (images[0] * 255).round().astype(np.uint8)


@pytest.mark.parametrize("with_lora", [False, True])
def test_four_step_lcm_image_matches_diffusers(small_pair, with_lora):  # noqa: F811 - the fixture
    """`generate(sampler_name="lcm", n_inference_steps=4, cfg_scale=1)` (one U-Net pass per step) against
    `StableDiffusionPipeline` + `LCMScheduler` with `guidance_scale=1`, the same seed (its step noise
    included), with and without an LCM-LoRA loaded on both sides."""
    models, small_pipe, _ = small_pair
    parts = {"clip": small_pipe.text_encoder, "unet": small_pipe.unet, "vae": small_pipe.vae}
    pipe = reference_pipeline(parts, diffusers_scheduler("lcm"))
    handle = None
    if with_lora:
        state = lcm_lora_state(pipe.unet, seed=5, rank=8, std=0.05)
        handle = lora.load_lora(models, dict(state), keep_original=True)
        pipe.load_lora_weights(dict(state), adapter_name="lcm")
    try:
        ours = pipeline.generate(PROMPT, models=models, sampler_name="lcm", n_inference_steps=4, cfg_scale=1, seed=11,
                                 height=64, width=64, progress=False)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            theirs = pipe(PROMPT, num_inference_steps=4, guidance_scale=1.0, height=64, width=64,
                          generator=torch.Generator().manual_seed(11), output_type="np").images
    finally:
        if handle is not None:
            handle.remove()
            pipe.unload_lora_weights()
    diff = np.abs(ours.astype(int) - as_uint8(theirs).astype(int))
    print(f"4-step LCM image, LoRA {with_lora}: max uint8 diff {diff.max()}")
    assert ours.shape == (64, 64, 3) and ours.std() > 1 and diff.max() <= 1


def test_command_line_runs_lcm_with_an_lcm_lora(tmp_path, capsys):
    """`python -m sdlab generate --sampler lcm --steps 4 --cfg 1 --lora FILE` on the bundled tiny model, with
    a file in LCM-LoRA's layout for that U-Net; the PNG records the settings."""
    from PIL import Image
    from safetensors.torch import save_file

    from sdlab.__main__ import main
    from sdlab.config import TINY
    from sdlab.reference import reference_unet

    path = tmp_path / "lcm-lora.safetensors"
    save_file(lcm_lora_state(reference_unet(TINY.unet), seed=2, rank=4, std=0.1), str(path))
    quick = ["generate", "a red circle", "--sampler", "lcm", "--steps", "4", "--cfg", "1", "--seed", "3"]
    assert main([*quick, "-o", str(tmp_path / "plain.png")]) == 0
    assert main([*quick, "--lora", str(path), "-o", str(tmp_path / "lcm.png")]) == 0
    plain, styled = (np.asarray(Image.open(tmp_path / f"{name}.png")) for name in ("plain", "lcm"))
    assert np.abs(plain.astype(int) - styled.astype(int)).mean() > 1  # the LoRA changed the picture
    settings = json.loads(Image.open(tmp_path / "lcm.png").info["parameters"])
    assert (settings["sampler"], settings["steps"], settings["cfg_scale"]) == ("lcm", 4, 1.0)
    assert settings["loras"] == [{"file": "lcm-lora.safetensors", "scale": 1.0}]
    capsys.readouterr()
    assert main([*quick[:4], "--steps", "51", "-o", str(tmp_path / "x.png")]) == 2
    assert "at most 50 steps" in capsys.readouterr().err
