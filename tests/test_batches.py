"""`generate(..., num_images=N)` and `python -m sdlab generate --n N` on the bundled tiny model: one batched
U-Net call per step, image k the image a single call with seed + k gives (text-to-image, every kind of
sampler, image-to-image, inpainting), `cfg_scale=1` without the unconditional pass, the argument checked,
and the command line's N PNGs and grid, never overwriting a file."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from sdlab import arguments, pipeline
from sdlab.__main__ import main
from sdlab.errors import ArgumentError
from sdlab.images import image_grid

PROMPT = "a large red circle to the left of a small blue square"
QUICK = {"height": 64, "width": 64, "n_inference_steps": 3, "cfg_scale": 5.0, "progress": False}

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def max_diff(a: np.ndarray, b: np.ndarray) -> int:
    return int(np.abs(a.astype(int) - b.astype(int)).max())


def unet_batches(diffusion):
    """A list that fills with the batch size of every U-Net call (and the hook to remove)."""
    sizes = []
    return sizes, diffusion.register_forward_pre_hook(lambda module, inputs: sizes.append(inputs[0].shape[0]))


@pytest.mark.parametrize("sampler_name", ["dpmpp_2m", "euler_a", "ddpm", "lcm"])
def test_image_k_of_a_batch_is_the_single_image_of_seed_plus_k(tiny, tokenizer, sampler_name):
    """Deterministic and noise-injecting samplers alike: each image has its own generator (seed + k) for
    its initial noise and its step noise, and its own slice of one batched U-Net call per step."""
    call = {**QUICK, "models": tiny, "tokenizer": tokenizer, "sampler_name": sampler_name}
    sizes, hook = unet_batches(tiny["diffusion"])
    try:
        batch = pipeline.generate(PROMPT, seed=2**64 - 2, num_images=3, **call)  # seeds 2**64 - 2, 2**64 - 1, 0
    finally:
        hook.remove()
    assert sizes == [6] * 3  # one call per step, the batch of 3 images twice (prompt, negative prompt)
    singles = [pipeline.generate(PROMPT, seed=seed, **call) for seed in (2**64 - 2, -1, 0)]
    diffs = [max_diff(b, s) for b, s in zip(batch, singles)]
    print(f"{sampler_name}: batch vs single runs, max uint8 diff per image {diffs}")
    assert isinstance(batch, list) and len(batch) == 3 and all(b.shape == (64, 64, 3) for b in batch)
    assert max(diffs) <= 1
    assert max_diff(batch[0], batch[1]) > 10  # different seeds, different pictures


@pytest.mark.parametrize("kind", ["img2img", "inpaint"])
def test_batches_of_image_to_image_and_inpainting_follow_the_seeds(tiny, tokenizer, kind):
    picture = np.zeros((64, 64, 3), np.uint8)
    picture[16:48, 8:40] = (220, 40, 30)
    options = {"input_image": picture, "strength": 0.7}
    if kind == "inpaint":
        mask = np.zeros((64, 64), np.uint8)
        mask[:, 32:] = 255
        options["mask_image"] = mask
    call = {**QUICK, **options, "models": tiny, "tokenizer": tokenizer, "sampler_name": "euler_a"}
    batch = pipeline.generate(PROMPT, seed=40, num_images=2, **call)
    singles = [pipeline.generate(PROMPT, seed=40 + k, **call) for k in range(2)]
    assert max(max_diff(b, s) for b, s in zip(batch, singles)) <= 1


def test_cfg_scale_1_skips_the_unconditional_pass(tiny, tokenizer):
    """s = 1 is the conditional prediction: one U-Net batch of N per step, the same image as do_cfg=False."""
    call = {**QUICK, "models": tiny, "tokenizer": tokenizer, "sampler_name": "lcm", "n_inference_steps": 4, "seed": 9}
    sizes, hook = unet_batches(tiny["diffusion"])
    try:
        at_one = pipeline.generate(PROMPT, **{**call, "cfg_scale": 1})
        steps_at_one = list(sizes)
        unguided = pipeline.generate(PROMPT, do_cfg=False, **call)
        sizes.clear()
        pipeline.generate(PROMPT, num_images=2, **{**call, "cfg_scale": 1.0})
    finally:
        hook.remove()
    assert steps_at_one == [1] * 4 and sizes == [2] * 4
    assert np.array_equal(at_one, unguided) and at_one.std() > 1
    with torch.no_grad():  # the guidance formula at s = 1 (both passes) gives the same picture up to rounding
        generator = pipeline.make_generator(9)
        sampler = pipeline.make_sampler("lcm", generator)
        sampler.set_inference_timesteps(4)
        context = pipeline.encode_prompts(tokenizer, tiny["clip"], [PROMPT, ""], "cpu")
        latents, _ = pipeline.prepare_latents(sampler, (1, 4, 8, 8), generator, "cpu")
        latents = pipeline.denoise(tiny["diffusion"], sampler, latents, context, 1.0)
        formula = pipeline.to_uint8(pipeline.decode(tiny["decoder"], latents))[0]
    assert max_diff(formula, at_one) <= 1


def test_one_image_keeps_the_return_type_and_given_latents_set_each_image(tiny, tokenizer):
    call = {**QUICK, "models": tiny, "tokenizer": tokenizer, "sampler_name": "ddim", "seed": 3}
    one = pipeline.generate(PROMPT, **call)
    assert isinstance(one, np.ndarray) and one.shape == (64, 64, 3)
    assert np.array_equal(pipeline.generate(PROMPT, num_images=1, **call), one)
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    batch = pipeline.generate(PROMPT, latents=noise, num_images=2, **call)
    for k in range(2):
        assert max_diff(batch[k], pipeline.generate(PROMPT, latents=noise[k : k + 1], **call)) <= 1
    fresh = pipeline.generate(PROMPT, num_images=2, **{**call, "seed": None})
    assert len(fresh) == 2 and max_diff(fresh[0], fresh[1]) > 10


@pytest.mark.parametrize("value", [0, -1, 1.5, True, "2", None, arguments.MAX_IMAGES + 1, 2**70])
def test_num_images_is_checked_first(tiny, tokenizer, value):
    with pytest.raises(ArgumentError, match="num_images") as error:
        pipeline.generate(PROMPT, models=tiny, tokenizer=tokenizer, num_images=value, **QUICK)
    assert "\x1b" not in str(error.value)


def test_latents_must_have_one_noise_per_image(tiny, tokenizer):
    with pytest.raises(ArgumentError, match=r"latents must have shape \(3, 4, 8, 8\)"):
        pipeline.generate(PROMPT, models=tiny, tokenizer=tokenizer, num_images=3, latents=torch.zeros(1, 4, 8, 8), **QUICK)


def test_image_grid_rows_of_the_smallest_square():
    images = [np.full((2, 3, 3), 50 * (k + 1), np.uint8) for k in range(3)]
    grid = image_grid(images)
    assert grid.shape == (4, 6, 3)  # 2 x 2 cells, the last one black
    assert (grid[:2, :3] == 50).all() and (grid[:2, 3:] == 100).all() and (grid[2:, :3] == 150).all()
    assert (grid[2:, 3:] == 0).all()
    assert image_grid(images, columns=3).shape == (2, 9, 3)
    with pytest.raises(ValueError, match="same size"):
        image_grid([images[0], np.zeros((4, 4, 3), np.uint8)])


def test_command_line_writes_n_pngs_and_a_grid_and_never_overwrites(tmp_path, capsys):
    quick = ["generate", "a red circle", "--steps", "2", "--sampler", "euler_a", "--seed", "5"]
    assert main([*quick, "--n", "3", "-o", str(tmp_path / "shapes.png")]) == 0
    names = ["shapes-1.png", "shapes-2.png", "shapes-3.png", "shapes-grid.png"]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(names)
    assert capsys.readouterr().out.count("wrote") == 4
    pictures = [np.asarray(Image.open(tmp_path / name)) for name in names]
    assert np.array_equal(pictures[3], image_grid(pictures[:3]))
    recorded = [json.loads(Image.open(tmp_path / name).info["parameters"]) for name in names]
    assert [r["seed"] for r in recorded[:3]] == [5, 6, 7] and recorded[3]["seeds"] == [5, 6, 7]
    assert recorded[3]["grid_of"] == names[:3]
    assert main([*quick[:-1], "6", "-o", str(tmp_path / "alone.png")]) == 0  # seed 6 alone: image 2 of the batch
    assert max_diff(np.asarray(Image.open(tmp_path / "alone.png")), pictures[1]) <= 1

    (tmp_path / "taken-2.png").write_bytes(b"mine")
    code = main([*quick, "--n", "2", "-o", str(tmp_path / "taken.png")])
    err = capsys.readouterr().err
    assert code == 2 and "taken-2.png" in err and "exists" in err
    assert (tmp_path / "taken-2.png").read_bytes() == b"mine" and not (tmp_path / "taken-1.png").exists()
    for bad in ("0", "-2", str(arguments.MAX_IMAGES + 1)):
        assert main([*quick, "--n", bad, "-o", str(tmp_path / "bad.png")]) == 2
        assert "--n" in capsys.readouterr().err
