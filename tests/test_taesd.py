"""TAESD (`sdlab.taesd`): the tiny decoder against diffusers' `AutoencoderTiny` at 512x512 in the three file
layouts in use (taesd's own `taesd_decoder.pth`, ComfyUI's whole `taesd.safetensors`, diffusers' file), packed
in bf16, as `generate`'s decoder in a 4-step LCM image against diffusers' pipeline with `vae=AutoencoderTiny`,
its errors, and `--taesd` on the command line.
"""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch
from test_lora import small_pair  # noqa: F401 - its fixture, shared

from sdlab import pipeline
from sdlab.errors import ArgumentError, CheckpointError, NumericalError
from sdlab.packing import available, packed_weights
from sdlab.reference import diffusers_scheduler, reference_pipeline
from sdlab.taesd import TAESD_Decoder, load_taesd

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:diffusers.*")
PROMPT = "a watercolor painting of a lighthouse at dusk"


def autoencoder_tiny(seed: int = 0, **config):
    from diffusers import AutoencoderTiny

    torch.manual_seed(seed)
    return AutoencoderTiny(**config).eval().requires_grad_(False)


def taesd_layout(diffusers_state: dict, prefix: str = "") -> dict:
    """diffusers' `decoder.layers.N.*` -> taesd's own `N+1.*` (its layer 0 is the clamp), under `prefix`."""
    state = {}
    for name, tensor in diffusers_state.items():
        if name.startswith("decoder.layers."):
            index, rest = name.removeprefix("decoder.layers.").split(".", 1)
            state[f"{prefix}{int(index) + 1}.{rest}"] = tensor
    return state


@pytest.fixture(scope="module")
def tiny_ae():
    return autoencoder_tiny()


@pytest.fixture(scope="module")
def taesd_files(tiny_ae, tmp_path_factory):
    """The same weights in the three layouts: {"diffusers", "taesd", "comfyui"} -> path."""
    from safetensors.torch import save_file

    folder = tmp_path_factory.mktemp("taesd")
    state = {k: v.contiguous() for k, v in tiny_ae.state_dict().items()}
    files = {"diffusers": folder / "diffusion_pytorch_model.safetensors", "taesd": folder / "taesd_decoder.pth",
             "comfyui": folder / "taesd.safetensors"}
    save_file(state, files["diffusers"])
    torch.save(taesd_layout(state), files["taesd"])
    encoder = {"taesd_encoder." + k.removeprefix("encoder.layers."): v for k, v in state.items() if k.startswith("encoder.")}
    save_file({**taesd_layout(state, "taesd_decoder."), **encoder}, files["comfyui"])
    return files


def test_decoder_equals_autoencoder_tiny_at_512_in_every_layout(tiny_ae, taesd_files):
    latents = 2.5 * torch.randn(1, 4, 64, 64, generator=torch.Generator().manual_seed(1))  # past the clamp too
    with torch.no_grad():
        theirs = tiny_ae.decode(latents).sample
    assert theirs.shape == (1, 3, 512, 512) and theirs.std() > 1e-2
    for layout, path in taesd_files.items():
        decoder = load_taesd(path)
        assert isinstance(decoder, TAESD_Decoder) and not any(p.requires_grad for p in decoder.parameters())
        with torch.no_grad():
            ours = decoder(latents)
        diff = (ours - theirs).abs().max().item()
        print(f"TAESD {layout} layout: max diff {diff:.1e}")
        assert diff <= 1e-5, layout


def test_float16_file_and_dtype(tiny_ae, tmp_path):
    """A float16 file loads as float32 on the CPU (as the checkpoint loader does), or in the dtype asked for."""
    from safetensors.torch import save_file

    path = tmp_path / "taesd_decoder.safetensors"
    save_file({k: v.half() for k, v in taesd_layout(tiny_ae.state_dict()).items()}, path)
    assert next(load_taesd(path).parameters()).dtype == torch.float32
    assert next(load_taesd(path, dtype=torch.bfloat16).parameters()).dtype == torch.bfloat16


def test_bf16_stays_close_to_float32(taesd_files):
    """Packed once in bf16, as `generate(..., dtype=torch.bfloat16)` runs it where the CPU computes in bf16
    (elsewhere the layers stay float32), and loaded in bf16 (`dtype=torch.bfloat16`), run plain."""
    decoder = load_taesd(taesd_files["taesd"])
    latents = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(2))  # small: plain bf16 is slow without AVX512-BF16
    with torch.no_grad():
        full = decoder(latents)
        with packed_weights(decoder, batch=1, dtype=torch.bfloat16):
            packed = decoder(latents).float()
        stored = load_taesd(taesd_files["taesd"], dtype=torch.bfloat16)(latents.bfloat16()).float()
    runs = {"stored in bf16": stored, **({"packed in bf16": packed} if available(torch.bfloat16) else {})}
    for name, bf16 in runs.items():
        mean, worst = (bf16 - full).abs().mean().item(), (bf16 - full).abs().max().item()
        print(f"TAESD {name} vs float32: mean {mean:.1e}, max {worst:.1e} (pixels in [-1, 1])")
        assert mean < 5e-3 and worst < 5e-2 and not torch.equal(bf16, full), name
    if not available(torch.bfloat16):
        assert torch.equal(packed, full)  # no bf16 kernels on this CPU: packed in float32


def test_four_step_lcm_image_with_taesd_matches_diffusers(small_pair, tiny_ae, taesd_files):  # noqa: F811
    """`generate(models={**models, "decoder": load_taesd(path)}, sampler_name="lcm", ...)` against
    `StableDiffusionPipeline(vae=AutoencoderTiny)` with `LCMScheduler`, the same seed; `low_memory`
    (tiled decode for the VAE) decodes TAESD whole: the same image."""
    models, small_pipe, _ = small_pair
    parts = {"clip": small_pipe.text_encoder, "unet": small_pipe.unet, "vae": tiny_ae}
    pipe = reference_pipeline(parts, diffusers_scheduler("lcm"))
    ours_models = {**models, "decoder": load_taesd(taesd_files["diffusers"])}
    settings = {"sampler_name": "lcm", "n_inference_steps": 4, "cfg_scale": 1, "seed": 11, "height": 96, "width": 64,
                "progress": False}
    ours = pipeline.generate(PROMPT, models=ours_models, **settings)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = pipe(PROMPT, num_inference_steps=4, guidance_scale=1.0, height=96, width=64,
                      generator=torch.Generator().manual_seed(11), output_type="np").images
    theirs = (theirs[0] * 255).round().astype(np.uint8)
    diff = np.abs(ours.astype(int) - theirs.astype(int))
    print(f"4-step LCM image with TAESD: max uint8 diff {diff.max()}")
    assert ours.shape == (96, 64, 3) and ours.std() > 1 and diff.max() <= 1
    assert np.array_equal(pipeline.generate(PROMPT, models=ours_models, low_memory=True, vae_tile_size=4, **settings), ours)
    vae_image = pipeline.generate(PROMPT, models=models, **settings)
    assert not np.array_equal(vae_image, ours)  # the decoder was replaced


def test_wrong_files_are_refused_by_name(tiny_ae, taesd_files, tmp_path):
    from safetensors.torch import save_file

    state = taesd_layout(tiny_ae.state_dict())
    with pytest.raises(CheckpointError, match="missing.safetensors"):
        load_taesd(tmp_path / "missing.safetensors")
    cases = {
        "flux": ({k: v.contiguous() for k, v in autoencoder_tiny(latent_channels=16).state_dict().items()},
                 "decodes 16-channel latents .*SD3/FLUX"),
        "short": ({k: v for k, v in state.items() if k != "19.bias"}, r"is missing: layers\.18\.bias"),
        "extra": ({**state, "20.weight": torch.zeros(3)}, r"unexpected tensors: 20\.weight"),
        "shape": ({**state, "1.bias": torch.zeros(32)}, r"wrong shapes: 1\.bias \(32,\) \(expected \(64,\)\)"),
        "vae": ({"first_stage_model.decoder.conv_in.weight": torch.zeros(512, 4, 3, 3)}, "is not a TAESD decoder's"),
    }
    for name, (tensors, message) in cases.items():
        path = tmp_path / f"{name}.safetensors"
        save_file(tensors, path)
        with pytest.raises(CheckpointError, match=message) as error:
            load_taesd(path)
        assert str(path) in str(error.value), name
    nan = {**state, "3.conv.0.weight": torch.full_like(state["3.conv.0.weight"], float("nan"))}
    save_file({k: v.contiguous() for k, v in nan.items()}, tmp_path / "nan.safetensors")
    with pytest.raises(NumericalError, match="'3.conv.0.weight' .* NaN"):
        load_taesd(tmp_path / "nan.safetensors")


def test_command_line_taesd(sd15_file, taesd_files, tmp_path, capsys):
    """`--taesd FILE` decodes with TAESD and the PNG records it; it needs an SD1.x checkpoint."""
    from PIL import Image

    from sdlab.__main__ import main

    assert main(["generate", "a lighthouse", "--taesd", str(taesd_files["taesd"]), "-o", str(tmp_path / "a.png")]) == 2
    assert "--taesd decodes SD1.x latents" in capsys.readouterr().err
    out = tmp_path / "b.png"
    assert main(["generate", "a lighthouse", "--ckpt", str(sd15_file), "--taesd", str(taesd_files["taesd"]),
                 "--sampler", "lcm", "--steps", "1", "--cfg", "1", "--height", "64", "--width", "64", "-o", str(out)]) == 0
    with Image.open(out) as image:
        settings = json.loads(image.text["parameters"])
        assert image.size == (64, 64)
    assert settings["taesd"] == "taesd_decoder.pth" and settings["sampler"] == "lcm"


def test_command_line_refuses_taesd_for_another_vae(taesd_files, tmp_path, capsys):
    from small import write_small_checkpoint

    from sdlab.__main__ import main

    path = tmp_path / "small.safetensors"
    write_small_checkpoint(path, seed=3)
    out = tmp_path / "c.png"
    assert main(["generate", "x", "--ckpt", str(path), "--taesd", str(taesd_files["taesd"]), "-o", str(out)]) == 2
    assert "has another VAE" in capsys.readouterr().err and not out.exists()
    with pytest.raises(ArgumentError, match="--taesd"):
        from sdlab.__main__ import build_parser, check_command_line

        check_command_line(build_parser().parse_args(["generate", "x", "--taesd", "f.pth", "-o", str(out)]))
