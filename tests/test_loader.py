"""Loading checkpoints: the key rules, file formats, precision, memory, and every kind of bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from checkpoint_files import Reduce
from reference import read_manifest
from sdlab import model_converter, model_loader, pipeline
from sdlab.model_loader import CheckpointError
from small import SMALL, small_models, write_small_checkpoint


@pytest.fixture(scope="module")
def small_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("small") / "small.safetensors"
    models = write_small_checkpoint(path)
    return path, models


def test_rules_map_the_manifest_both_ways():
    manifest = read_manifest()
    with torch.device("meta"):
        models = model_loader.build_models()
    expected = {n: {k: tuple(v.shape) for k, v in m.state_dict().items()} for n, m in models.items()}
    state = {k: torch.empty(shape, device="meta") for k, (shape, _) in manifest.items()}
    converted, ignored, unknown = model_converter.convert(state)
    assert unknown == [] and len(ignored) == 13
    for name in expected:
        assert {k: tuple(v.shape) for k, v in converted[name].items()} == expected[name]
    back = model_converter.to_standard(models)
    assert {k: tuple(v.shape) for k, v in back.items()} == {
        k: shape for k, (shape, _) in manifest.items() if not model_converter.IGNORED.match(k)
    }


def test_small_checkpoint_round_trips(small_file):
    path, models = small_file
    loaded = model_loader.preload_models_from_standard_weights(path, "cpu")
    assert loaded["diffusion"].config == SMALL.unet and loaded["clip"].config == SMALL.clip
    seed_style = model_converter.load_from_standard_weights(path, "cpu")  # the seed's API: state dicts
    for name, model in models.items():
        theirs = loaded[name].state_dict()
        assert all(torch.equal(v, theirs[k]) and torch.equal(v, seed_style[name][k]) for k, v in model.state_dict().items())


def test_fp16_file_loads_as_float32_on_cpu_or_as_asked(tmp_path):
    path = tmp_path / "half.safetensors"
    models = small_models()
    model_loader.save_checkpoint(models, path, SMALL, dtype=torch.float16)
    loaded = model_loader.preload_models_from_standard_weights(path, "cpu")
    weight = loaded["diffusion"].final.conv.weight
    assert weight.dtype == torch.float32
    assert torch.equal(weight, models["diffusion"].final.conv.weight.half().float())
    kept = model_loader.preload_models_from_standard_weights(path, "cpu", dtype=torch.bfloat16)
    assert kept["clip"].layernorm.weight.dtype == torch.bfloat16


def test_missing_path():
    with pytest.raises(FileNotFoundError, match="does not exist"):
        model_loader.preload_models_from_standard_weights("/nonexistent/v1-5-pruned-emaonly.ckpt")


@pytest.mark.parametrize("name", ["notes.ckpt", "notes.safetensors", "notes.bin"])
def test_a_file_that_is_no_checkpoint(tmp_path, name):
    path = tmp_path / name
    path.write_text("<html>404 Not Found</html>\n" * 20)
    with pytest.raises(CheckpointError, match="not"):
        model_loader.preload_models_from_standard_weights(path)


@pytest.mark.parametrize("suffix", [".safetensors", ".ckpt"])
def test_a_truncated_file(tmp_path, small_file, suffix):
    path, models = small_file
    if suffix == ".ckpt":
        source = tmp_path / "full.ckpt"
        torch.save({"state_dict": model_converter.to_standard(models)}, source)
    else:
        source = path
    data = source.read_bytes()
    truncated = tmp_path / f"truncated{suffix}"
    truncated.write_bytes(data[: len(data) * 2 // 3])
    with pytest.raises(CheckpointError, match="truncated"):
        model_loader.preload_models_from_standard_weights(truncated)


def test_a_pickle_with_code_is_refused(tmp_path):
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"x": torch.zeros(1)}, "payload": Reduce(os.system, f"touch {tmp_path / 'ran'}")}, path)
    with pytest.raises(CheckpointError, match=r"refers to the global posix\.system.*nothing in it was run"):
        model_loader.preload_models_from_standard_weights(path)
    assert not (tmp_path / "ran").exists()


@pytest.mark.parametrize("family,keys,message", [
    ("sd2", {"cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight": (3072, 1024),
             "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (320, 1024)}, "2.x"),
    ("sd2-unet", {"model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (320, 1024)}, "1024"),
    ("sdxl", {"conditioner.embedders.0.transformer.text_model.final_layer_norm.weight": (768,),
              "model.diffusion_model.input_blocks.0.0.weight": (320, 4, 3, 3)}, "SDXL"),
    ("other", {"encoder.layer.0.weight": (4, 4)}, "no Stable Diffusion U-Net"),
])
def test_a_checkpoint_of_another_model(tmp_path, family, keys, message):
    path = tmp_path / f"{family}.safetensors"
    save_file({k: torch.zeros(shape) for k, shape in keys.items()}, str(path))
    with pytest.raises(CheckpointError, match=message) as error:
        model_loader.preload_models_from_standard_weights(path)
    assert "supports Stable Diffusion v1" in str(error.value)


def test_missing_and_unexpected_keys_are_named(tmp_path, small_file):
    path, models = small_file
    state = model_converter.to_standard(models)
    state.pop("model.diffusion_model.out.2.weight")
    state["model.diffusion_model.extra_head.weight"] = torch.zeros(3)
    broken = tmp_path / "broken.safetensors"
    save_file(state, str(broken), metadata={"sdlab_config": SMALL.to_json()})
    with pytest.raises(CheckpointError) as error:
        model_loader.preload_models_from_standard_weights(broken)
    assert "model.diffusion_model.out.2.weight" in str(error.value)
    assert "model.diffusion_model.extra_head.weight" in str(error.value)


def test_a_wrong_shape_is_named(tmp_path, small_file):
    path, models = small_file
    state = model_converter.to_standard(models)
    state["model.diffusion_model.out.2.weight"] = torch.zeros(4, 32, 5, 5)
    broken = tmp_path / "shape.safetensors"
    save_file(state, str(broken), metadata={"sdlab_config": SMALL.to_json()})
    with pytest.raises(CheckpointError, match=r"final\.conv\.weight \(4, 32, 5, 5\) \(expected \(4, 32, 3, 3\)\)"):
        model_loader.preload_models_from_standard_weights(broken)


@pytest.fixture(scope="module")
def small_loaded(small_file):
    return model_loader.preload_models_from_standard_weights(small_file[0])


@pytest.mark.parametrize("strength", [0, -0.5, 1.5])
def test_strength_outside_0_1(small_loaded, strength):
    image = np.zeros((64, 64, 3), np.uint8)
    with pytest.raises(ValueError, match=r"strength must be in \(0, 1\]"):
        pipeline.generate("x", input_image=image, strength=strength, models=small_loaded, height=64, width=64)


@pytest.mark.parametrize("height,width", [(60, 64), (64, 100), (0, 64)])
def test_size_not_a_multiple_of_8(small_loaded, height, width):
    with pytest.raises(ValueError, match="multiple of 8"):
        pipeline.generate("x", models=small_loaded, height=height, width=width)


def test_unknown_sampler_lists_valid_names(small_loaded):
    with pytest.raises(ValueError, match="'plms'") as error:
        pipeline.generate("x", sampler_name="plms", models=small_loaded, height=64, width=64)
    for name in ("ddpm", "ddim", "euler", "euler_a", "dpmpp_2m", "dpmpp_2m_karras"):
        assert name in str(error.value)


def test_long_prompt_warns_then_truncates(small_loaded):
    long_prompt = "a red circle " * 40
    with pytest.warns(UserWarning, match="tokens were dropped"):
        image = pipeline.generate(long_prompt, models=small_loaded, height=64, width=64, n_inference_steps=2,
                                  seed=1, progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        truncated = pipeline.generate(" ".join(long_prompt.split()[:75]), models=small_loaded, height=64, width=64,
                                      n_inference_steps=2, seed=1, progress=False)
    assert image.shape == (64, 64, 3) and np.array_equal(image, truncated)


def test_mask_problems_are_fixed_and_reported(small_loaded):
    from PIL import Image

    image = Image.new("RGB", (64, 64), (200, 30, 30))
    rgb_mask = Image.new("RGB", (32, 32), (255, 255, 255))
    with pytest.warns(UserWarning) as record:
        out = pipeline.generate("x", input_image=image, mask_image=rgb_mask, strength=1.0, models=small_loaded,
                                height=64, width=64, n_inference_steps=2, seed=0, progress=False)
    messages = " ".join(str(w.message) for w in record)
    assert "grayscale" in messages and "resizing the mask" in messages
    assert out.shape == (64, 64, 3)
    with pytest.raises(ValueError, match="needs input_image"):
        pipeline.generate("x", mask_image=rgb_mask, models=small_loaded, height=64, width=64)


def test_same_seed_same_image_and_latents_reproduce(small_loaded):
    kwargs = dict(models=small_loaded, height=64, width=64, n_inference_steps=3, progress=False, sampler_name="euler_a")
    a = pipeline.generate("a blue square", seed=7, **kwargs)
    b = pipeline.generate("a blue square", seed=7, **kwargs)
    c = pipeline.generate("a blue square", seed=8, **kwargs)
    assert np.array_equal(a, b) and not np.array_equal(a, c)


def test_cli_writes_png_with_settings_and_never_overwrites(tmp_path, small_file):
    from PIL import Image

    output = tmp_path / "out.png"
    command = [sys.executable, "-m", "sdlab", "generate", "a green triangle", "--ckpt", str(small_file[0]),
               "--steps", "2", "--height", "64", "--width", "48", "--seed", "3", "--sampler", "ddim", "-o", str(output)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    with Image.open(output) as image:
        assert image.size == (48, 64)
        settings = json.loads(image.text["parameters"])
    assert settings["prompt"] == "a green triangle" and settings["steps"] == 2 and settings["sampler"] == "ddim"
    before = output.read_bytes()
    again = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert again.returncode == 2 and "exists" in again.stderr and output.read_bytes() == before
    bad = subprocess.run(command[:-1] + [str(tmp_path / "x.png"), "--strength", "2", "--init-image", str(output)],
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "strength must be in" in bad.stderr


SEED_EXAMPLE = '''
import model_loader
import pipeline
from PIL import Image
from transformers import CLIPTokenizer
import torch

DEVICE = "cpu"

ALLOW_CUDA = False
ALLOW_MPS = False

if torch.cuda.is_available() and ALLOW_CUDA:
    DEVICE = "cuda"
elif (torch.has_mps or torch.backends.mps.is_available()) and ALLOW_MPS:
    DEVICE = "mps"
print(f"Using device: {DEVICE}")

tokenizer = CLIPTokenizer("../data/vocab.json", merges_file="../data/merges.txt")
model_file = "../data/v1-5-pruned-emaonly.ckpt"
models = model_loader.preload_models_from_standard_weights(model_file, DEVICE)

## TEXT TO IMAGE

# prompt = "A dog with sunglasses, wearing comfy hat, looking at camera, highly detailed, ultra sharp, cinematic, 100mm lens, 8k resolution."
prompt = "A cat stretching on the floor, highly detailed, ultra sharp, cinematic, 100mm lens, 8k resolution."
uncond_prompt = ""  # Also known as negative prompt
do_cfg = True
cfg_scale = 8  # min: 1, max: 14

## IMAGE TO IMAGE

input_image = None
# Comment to disable image to image
image_path = "../images/dog.jpg"
input_image = Image.open(image_path)
# Higher values means more noise will be added to the input image, so the result will further from the input image.
# Lower values means less noise is added to the input image, so output will be closer to the input image.
strength = 0.9

## SAMPLER

sampler = "ddpm"
num_inference_steps = 50
seed = 42

output_image = pipeline.generate(
    prompt=prompt,
    uncond_prompt=uncond_prompt,
    input_image=input_image,
    strength=strength,
    do_cfg=do_cfg,
    cfg_scale=cfg_scale,
    sampler_name=sampler,
    n_inference_steps=num_inference_steps,
    seed=seed,
    models=models,
    device=DEVICE,
    idle_device="cpu",
    tokenizer=tokenizer,
)

# Combine the input image and the output image into a single image.
Image.fromarray(output_image)
'''


def test_the_seed_example_runs_with_only_its_imports_changed(tmp_path, small_file):
    """The seed's demo, verbatim but for its imports, on a small checkpoint in the seed's data folder."""
    from PIL import Image

    from sdlab.tokenizer import vocab_files

    (tmp_path / "data").mkdir()
    (tmp_path / "images").mkdir()
    (tmp_path / "sd").mkdir()
    vocab_files(tmp_path / "data")
    torch.save({"state_dict": model_converter.to_standard(small_file[1]), "sdlab_config": SMALL.to_json()},
               tmp_path / "data" / "v1-5-pruned-emaonly.ckpt")
    Image.new("RGB", (300, 200), (120, 80, 40)).save(tmp_path / "images" / "dog.jpg")
    script = SEED_EXAMPLE.replace("import model_loader\nimport pipeline\n", "from sdlab import model_loader, pipeline\n")
    # transformers 5 cannot build a tokenizer from these two file paths any more; sdlab's can
    script = script.replace("from transformers import CLIPTokenizer", "from sdlab.tokenizer import CLIPTokenizer")
    script += "\nassert output_image.shape == (512, 512, 3) and output_image.dtype.name == 'uint8'\nprint('seed example ok')\n"
    (tmp_path / "sd" / "demo.py").write_text(script)
    done = subprocess.run([sys.executable, "demo.py"], cwd=tmp_path / "sd", capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "seed example ok" in done.stdout


# --- the full-size file in its three forms -------------------------------------------------------


def test_ckpt_and_fp16_files_load_the_same_weights(sd15_variants, sdlab_models):
    from_ckpt = model_loader.preload_models_from_standard_weights(sd15_variants["ckpt"], "cpu")
    for name, model in sdlab_models.items():
        theirs = from_ckpt[name].state_dict()
        assert all(torch.equal(v, theirs[k]) for k, v in model.state_dict().items()), name
    del from_ckpt
    from_fp16 = model_loader.preload_models_from_standard_weights(sd15_variants["fp16"], "cpu")
    for name, model in sdlab_models.items():
        theirs = from_fp16[name].state_dict()
        assert all(theirs[k].dtype == torch.float32 and torch.equal(v.half().float(), theirs[k])
                   for k, v in model.state_dict().items()), name


LOAD_AND_REPORT = """
import sys
from sdlab.model_loader import preload_models_from_standard_weights
models = preload_models_from_standard_weights(sys.argv[1], "cpu")
assert sum(p.numel() for m in models.values() for p in m.parameters()) == 1_066_235_307
checksum = sum(float(p.sum()) for m in models.values() for p in m.parameters())  # touch every weight
# VmHWM: this process's own peak (ru_maxrss would include the parent's RSS inherited at fork)
print(int(open("/proc/self/status").read().split("VmHWM:")[1].split()[0]) * 1024)
"""


@pytest.mark.parametrize("form", ["safetensors", "ckpt", "fp16"])
def test_peak_memory_while_loading(sd15_variants, form):
    """Peak RSS of a process that loads the file and reads every weight: at most 1.2x the file's size.

    A float16 file is loaded as float32 on the CPU, so its budget is 1.2x the float32 weights (2x the file).
    """
    path = sd15_variants[form]
    done = subprocess.run([sys.executable, "-c", LOAD_AND_REPORT, str(path)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    peak = int(done.stdout.split()[-1])
    budget = path.stat().st_size * (2 if form == "fp16" else 1)
    print(f"{form}: peak RSS {peak / 2**30:.2f} GiB for a {path.stat().st_size / 2**30:.2f} GiB file")
    assert peak <= 1.2 * budget



def test_reading_in_another_dtype_converts_slice_by_slice_exactly(tmp_path, monkeypatch):
    """A float16 file read as float32 (and float32 as bfloat16) gives exactly `.to(dtype)` of the stored
    tensor, through one small reused buffer; a file cut short mid-conversion is named."""
    from sdlab import checkpoint_io

    monkeypatch.setattr(checkpoint_io, "READ_SLICE", 1000)  # many slices, and a partial last one
    generator = torch.Generator().manual_seed(0)
    stored = {"half": torch.randn(37, 101, generator=generator).half(), "full": torch.randn(2500, generator=generator),
              "ids": torch.arange(7)}
    path = tmp_path / "mixed.safetensors"
    save_file(stored, str(path))
    with checkpoint_io.open_checkpoint(path) as file:
        assert torch.equal(file.read("half", torch.float32), stored["half"].float())
        assert torch.equal(file.read("full", torch.bfloat16), stored["full"].bfloat16())
        assert torch.equal(file.read("ids", torch.float32), stored["ids"])  # integers keep their dtype
        assert file.read("half").dtype == torch.float16
    with checkpoint_io.open_checkpoint(path) as file:
        inside_full = file._ranges["full"][0] + 6000  # past the first slice, before the tensor's end
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(path.read_bytes()[:inside_full])
    with checkpoint_io.open_checkpoint(path) as file:
        file._handle = open(cut, "rb")  # the file shrinks after its header was checked
        with pytest.raises(CheckpointError, match="became shorter while it was read"):
            file.read("full", torch.bfloat16)
        file._handle.close()
