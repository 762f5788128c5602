"""Seeded fuzz cases over what `generate` and the command line are given: every case is refused with
sdlab's own error naming the argument, or gives a sane image (judged by `outcomes.judge`). The bundled
tiny model at 64x64 with 1-2 steps keeps it fast.

Families: "generate arguments" (one argument of a valid call replaced by a hostile or edge value),
"devices" (`device` / `idle_device`), "cli" (`python -m sdlab generate` argument lists), "output paths".
"""

from __future__ import annotations

import math
import os
import random

import numpy as np
import pytest
import torch
from outcomes import judge
from PIL import Image

from sdlab import arguments, pipeline
from sdlab.__main__ import build_parser, generate_command

BASE = {"height": 64, "width": 64, "sampler_name": "dpmpp_2m", "n_inference_steps": 1, "cfg_scale": 5.0, "seed": 0,
        "progress": False}
PROMPT = "a large red circle in the center"


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def tiny_call(tiny, tokenizer):
    """The bundled tiny model and tokenizer (tests/conftest.py), as `generate`'s keyword arguments."""
    return {"models": tiny, "tokenizer": tokenizer}


def sane_image(height=64, width=64):
    def sane(image):
        return (isinstance(image, np.ndarray) and image.shape == (height, width, 3) and image.dtype == np.uint8
                and image.max() > 0)

    return sane


def latents(shape=(1, 4, 8, 8), dtype=torch.float32, fill=None):
    tensor = torch.randn(shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    if fill is not None:
        tensor.view(-1)[0] = fill
    return tensor


# (argument, value, outcome): "ok" must give a sane image; anything else is the name the error must carry.
POOL = {
    "prompt": [(None, "prompt"), (3, "prompt"), (b"a cat", "prompt"), ("a \ud800 cat", "prompt"), (["a", "b"], "prompt"),
               ("", "ok"), ("x" * 500, "ok"), ("emoji \U0001f3a8 and \x00 nul", "ok")],
    "uncond_prompt": [(5, "uncond_prompt"), ("\udcff", "uncond_prompt"), (None, "ok"), ("blurry", "ok")],
    "cfg_scale": [(math.nan, "cfg_scale"), (math.inf, "cfg_scale"), (-math.inf, "cfg_scale"), (True, "cfg_scale"),
                  ("7", "cfg_scale"), (1e38, "cfg_scale"), (0, "ok"), (-2.0, "ok"), (np.float32(3.5), "ok"), (None, "ok")],
    "n_inference_steps": [(0, "n_inference_steps"), (-1, "n_inference_steps"), (1.5, "n_inference_steps"),
                          (True, "n_inference_steps"), ("2", "n_inference_steps"), (1001, "n_inference_steps"),
                          (2**70, "n_inference_steps"), (np.int64(2), "ok"), (2, "ok")],
    "strength": [(0, "strength"), (-0.1, "strength"), (1.0001, "strength"), (math.nan, "strength"), (True, "strength"),
                 ("0.5", "strength"), (0.5, "ok")],
    "seed": [(1.5, "seed"), ("1", "seed"), (True, "seed"), (2**200, "ok"), (-(2**200), "ok"), (np.int64(3), "ok"),
             (None, "ok"), (-1, "ok")],
    "height": [(0, "height"), (-64, "height"), (63, "height"), (65, "height"), (64.0, "height"), (True, "height"),
               (2**40, "height"), ("64", "height"), (72, "ok"), (40, "ok")],
    "width": [(0, "width"), (100, "width"), (None, "ok"), (56, "ok")],
    "sampler_name": [("DDIM", "sampler_name"), ("", "sampler_name"), (3, "sampler_name"), ("ddim ", "sampler_name"),
                     ("euler_a", "ok"), ("dpmpp_2m_karras", "ok"), ("ddpm", "ok")],
    "latents": [(latents((1, 4, 8, 9)), "latents"), (latents(dtype=torch.int64), "latents"), (latents(fill=math.nan), "latents"),
                (latents(fill=math.inf), "latents"), ([[0.0]], "latents"), (torch.empty(1, 4, 8, 8, device="meta"), "latents"),
                (latents((4, 8, 8)), "latents"), (latents(dtype=torch.float64), "ok"), (latents(dtype=torch.float16), "ok")],
    "models": [([], "models"), ("tiny", "models"), (42, "models"), ("missing", "models"), ("none-values", "models")],
    "do_cfg": [("yes", "do_cfg"), (None, "do_cfg"), (0, "do_cfg"), (False, "ok")],
    "dtype": [(torch.int32, "dtype"), ("float16", "dtype"), (torch.float64, "dtype"), (torch.bfloat16, "ok")],
    "attention_slice_size": [(0, "attention_slice_size"), (-1, "attention_slice_size"), (2.5, "attention_slice_size"), (4, "ok")],
    "vae_tile_size": [(0, "vae_tile_size"), ("8", "vae_tile_size"), (4, "ok")],
    "callback": [(3, "callback"), (lambda *a: None, "ok")],
    "tokenizer": [(5, "tokenizer")],
    "packed": [("no", "packed"), (False, "ok")],
    "low_memory": [(1, "low_memory"), (True, "ok")],
    "mask_image": [(np.zeros((64, 64), np.uint8), "input_image")],
}
CASES = [(arg, i) for arg, values in POOL.items() for i in range(len(values))]


def models_for(value, models):
    if value == "missing":
        return {"clip": models["clip"], "decoder": models["decoder"]}
    if value == "none-values":
        return {k: None for k in models}
    return value


@pytest.mark.parametrize("argument,index", CASES, ids=[f"{a}-{i}" for a, i in CASES])
def test_generate_arguments(tiny_call, argument, index):
    value, outcome = POOL[argument][index]
    call = {**BASE, "prompt": PROMPT, "models": tiny_call["models"], "tokenizer": tiny_call["tokenizer"], argument: value}
    if argument == "models":
        call["models"] = models_for(value, tiny_call["models"])
    if argument == "strength":
        call["input_image"], call["n_inference_steps"] = np.full((64, 64, 3), 128, np.uint8), 2
    height, width = call.get("height") or 64, call.get("width") or 64
    names = () if outcome == "ok" else (outcome,)
    assert judge("generate arguments", lambda: pipeline.generate(**call), names=names,
                 sane=sane_image(height, width)) == ("accepted" if outcome == "ok" else "refused")


DEVICES = [("cuda", "refused"), ("cuda:0", "refused"), ("cuda:99", "refused"), ("mps", "refused"), ("xpu", "refused"),
           ("meta", "refused"), (torch.device("meta"), "refused"), ("garbage", "refused"), ("", "refused"),
           ("CPU", "refused"), (0, "refused"), (1.5, "refused"), (["cpu"], "refused"), ("hpu", "refused"),
           ("vulkan", "refused"), ("cpu:-1", "refused"), ("cpu", "accepted"), ("cpu:0", "accepted"),
           (torch.device("cpu"), "accepted"), (None, "accepted")]
DEVICE_CASES = [(argument, i) for argument in ("device", "idle_device") for i in range(len(DEVICES))]


@pytest.mark.parametrize("argument,index", DEVICE_CASES, ids=[f"{a}-{i}" for a, i in DEVICE_CASES])
def test_devices(tiny_call, argument, index):
    value, outcome = DEVICES[index]
    if outcome == "accepted" and index % 2:  # half of the accepted ones run a whole call, half just the check
        run = lambda: pipeline.generate(PROMPT, models=tiny_call["models"], tokenizer=tiny_call["tokenizer"], **{argument: value}, **BASE)
        sane = sane_image()
    else:
        run = lambda: arguments.check_device(value, argument)
        sane = lambda device: device is None or device.type == "cpu"
    assert judge("devices", run, names=(f"{argument}=", f"{argument} must"), sane=sane) == outcome


def cli_cases(folder):
    """(argv tail, outcome, names) for `python -m sdlab generate PROMPT ...`."""
    picture = folder / "picture.png"
    Image.fromarray(np.full((64, 64, 3), 90, np.uint8)).save(picture)
    square = folder / "square.png"
    Image.fromarray(np.zeros((30, 30), np.uint8)).save(square)
    truncated = folder / "half.png"
    truncated.write_bytes(picture.read_bytes()[:60])
    (folder / "taken.png").write_bytes(b"mine")
    new = lambda name: ["-o", str(folder / name)]
    quick = ["--height", "64", "--width", "64", "--steps", "1", "--sampler", "euler"]
    return [
        (["--steps", "0", *new("a.png")], "--steps"), (["--steps", "-3", *new("a.png")], "--steps"),
        (["--steps", "abc"], "argparse"), (["--cfg", "nan", *new("a.png")], "--cfg"), (["--cfg", "inf", *new("a.png")], "--cfg"),
        (["--height", "70", *new("a.png")], "--height"), (["--width", "0", *new("a.png")], "--width"),
        (["--height", "-64", *new("a.png")], "--height"), (["--strength", "0", *new("a.png")], "--strength"),
        (["--strength", "nan", *new("a.png")], "--strength"), (["--device", "cuda", *new("a.png")], "--device"),
        (["--device", "meta", *new("a.png")], "--device"), (["--device", "toaster", *new("a.png")], "--device"),
        (["-o", str(folder / "taken.png")], "--output"), (["-o", str(folder)], "--output"), (new("noext"), "--output"),
        (new("a.jpg"), "--output"), (["-o", str(folder / "missing" / "a.png")], "--output"),
        (["--init-image", str(folder / "nope.png"), *new("a.png")], "--init-image"),
        (["--init-image", str(truncated), *new("a.png")], "--init-image"),
        (["--mask", str(picture), *new("a.png")], "--mask"),
        (["--init-image", str(picture), "--mask", str(folder / "taken.png"), *new("a.png")], "--mask"),
        (["--sampler", "best"], "argparse"), (["--seed", "1.5"], "argparse"),
        ([*quick, "--cfg", "0", *new("cfg0.png")], "ok"), ([*quick, "--seed", str(2**80), *new("seed.png")], "ok"),
        ([*quick, "--init-image", str(picture), "--strength", "1", *new("img2img.png")], "ok"),
        ([*quick, "--steps", "2", "--init-image", str(picture), "--mask", str(picture), *new("inpaint.png")], "ok"),
        ([*quick, "--negative", "blurry", "--height", "72", "--width", "40", *new("odd.png")], "ok"),
    ]


@pytest.mark.parametrize("index", range(29))
def test_cli(tmp_path, index):
    argv_tail, outcome = cli_cases(tmp_path)[index]
    prompt = "a red circle" if index % 7 else "a \udcff surrogate-escaped prompt"  # argv bytes that are not UTF-8
    expects_prompt_error = index % 7 == 0

    def run():
        try:
            args = build_parser().parse_args(["generate", prompt, *argv_tail])
        except SystemExit as exit_:
            return ("argparse", exit_.code)
        return ("ok", generate_command(args))

    def sane(result):
        kind, value = result
        if kind == "argparse":
            return outcome == "argparse" and value == 2
        with Image.open(value) as image:
            return image.format == "PNG" and "parameters" in image.info and np.asarray(image).max() > 0

    names = ("prompt",) if expects_prompt_error else (() if outcome in ("ok", "argparse") else (outcome,))
    got = judge("cli", run, names=names, sane=sane)
    if expects_prompt_error:
        assert got == "refused" or outcome == "argparse"
    else:
        assert got == ("accepted" if outcome in ("ok", "argparse") else "refused")


def output_paths(folder, rng):
    (folder / "exists.png").write_bytes(b"x")
    (folder / "file").write_bytes(b"x")
    os.mkfifo(folder / "fifo.png")
    os.symlink(folder / "nowhere.png", folder / "dangling.png")
    refused = ["", None, 3, b"\xff.png", str(folder), str(folder / "exists.png"), str(folder / "noext"),
               str(folder / "a.jpg"), str(folder / "a.png.txt"), str(folder / "missing" / "a.png"),
               str(folder / "file" / "a.png"), str(folder / "fifo.png"), str(folder / "dangling.png"), str(folder / ".png")]
    accepted = [str(folder / "new.png"), folder / "UPPER.PNG", str(folder / "with space.png"), str(folder / "ünï.png"),
                str(folder / "a.b.png")]
    accepted += [str(folder / f"{''.join(rng.choice('abcxyz0189-_') for _ in range(rng.randint(1, 20)))}.png")
                 for _ in range(6)]
    return [(p, "refused") for p in refused] + [(p, "accepted") for p in accepted]


@pytest.mark.parametrize("index", range(25))
def test_output_paths(tmp_path, index):
    path, outcome = output_paths(tmp_path, random.Random(index))[index]
    got = judge("output paths", lambda: arguments.check_output_path(path), names=("--output",),
                sane=lambda p: p.suffix.lower() == ".png" and not p.exists())
    assert got == outcome
