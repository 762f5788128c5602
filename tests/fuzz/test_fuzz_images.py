"""Seeded fuzz cases over input images and masks: every picture is refused with sdlab's own error naming
the parameter (`input_image`, `mask_image`), or read into a sane tensor (judged by `outcomes.judge`);
every 8th case also runs a whole 2-step image-to-image or inpainting call on the bundled tiny model.

Sources: PIL images in every common mode (16-bit, palette with transparency, CMYK, LA, RGBA, 1-bit,
float, YCbCr, HSV, LAB), odd sizes, files in PNG/JPEG/GIF/WebP/BMP/TIFF with EXIF orientations,
animated files, truncated and garbage files, empty files, directories, numpy arrays and torch tensors of
every dtype, shape and range.
"""

from __future__ import annotations

import io
import random
import warnings

import numpy as np
import pytest
import torch
from outcomes import judge
from PIL import Image

from sdlab import pipeline
from sdlab.images import check_mask_size, read_picture, to_image_tensor, to_mask_tensor

N_IMAGES, N_MASKS = 60, 45
MODES = ["RGB", "RGBA", "LA", "L", "P", "P+t", "CMYK", "1", "I;16", "I", "F", "YCbCr", "HSV", "LAB"]
FORMATS = {"PNG": ".png", "JPEG": ".jpg", "GIF": ".gif", "WEBP": ".webp", "BMP": ".bmp", "TIFF": ".tiff"}
SAVES = {"PNG": {"RGB", "RGBA", "LA", "L", "P", "P+t", "1", "I;16", "I"}, "JPEG": {"RGB", "L", "CMYK"},
         "GIF": {"P", "P+t", "L"}, "WEBP": {"RGB", "RGBA"}, "BMP": {"RGB", "L", "P", "1"},
         "TIFF": {"RGB", "RGBA", "L", "CMYK", "I;16", "F", "1", "LAB"}}


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def tiny_call(tiny, tokenizer):
    """The bundled tiny model and tokenizer (tests/conftest.py), as `generate`'s keyword arguments."""
    return {"models": tiny, "tokenizer": tokenizer}


def pil_image(rng: random.Random, mode: str, size) -> Image.Image:
    w, h = size
    gen = np.random.default_rng(rng.randrange(2**32))
    rgb = Image.fromarray(gen.integers(0, 256, (h, w, 3), dtype=np.uint8))
    if mode == "P+t":
        image = rgb.quantize(16)
        image.info["transparency"] = 0
        return image
    if mode == "P":
        return rgb.quantize(16)
    if mode == "I;16":
        return Image.fromarray(gen.integers(0, 65536, (h, w), dtype=np.uint16))
    if mode == "I":
        return Image.fromarray(gen.integers(0, 65536, (h, w)).astype(np.int32))
    if mode == "F":
        return Image.fromarray(gen.random((h, w), dtype=np.float32))
    if mode in ("RGBA", "LA"):
        alpha = Image.fromarray(gen.integers(0, 256, (h, w), dtype=np.uint8))
        image = rgb.convert(mode[:-1])
        image.putalpha(alpha)
        return image
    return rgb.convert(mode)


def array_source(rng: random.Random, size):
    """(source, readable): an array or tensor that is a picture, or one that is not."""
    w, h = size
    gen = np.random.default_rng(rng.randrange(2**32))
    kind = rng.choice(["uint8", "uint16", "bool", "unit", "signed", "int64", "float16", "tensor", "tensor-bchw",
                       "nan", "big-float", "bad-shape", "complex", "int-over", "empty", "object"])
    channels = rng.choice([None, 1, 3, 4])
    shape = (h, w) if channels is None else (h, w, channels)
    base = gen.random(shape)
    sources = {
        "uint8": (np.round(base * 255).astype(np.uint8), True), "uint16": (np.round(base * 65535).astype(np.uint16), True),
        "bool": (base > 0.5, True), "unit": (base, True), "signed": (base * 2 - 1, True),
        "int64": (np.round(base * 255).astype(np.int64), True), "float16": (base.astype(np.float16), True),
        "tensor": (torch.from_numpy(base).float(), True),
        "tensor-bchw": (torch.from_numpy(gen.random((1, 3, h, w))).float() * 2 - 1, True),
        "nan": (np.where(base > 0.9, np.nan, base), False), "big-float": (base * 255, False),
        "bad-shape": (gen.random((h, w, 5, 2)), False), "complex": (base.astype(np.complex64), False),
        "int-over": (np.round(base * 1000).astype(np.int32), False), "empty": (np.zeros((0, w, 3), np.uint8), False),
        "object": (np.array([["a"]], dtype=object), False),
    }
    source, readable = sources[kind]
    if kind == "nan" and not np.isnan(source).any():
        readable = True
    if kind in ("big-float", "int-over") and base.max() * (255 if kind == "big-float" else 1000) <= (1 if kind == "big-float" else 255):
        readable = True
    return source, readable


def file_source(rng: random.Random, folder, size, index: int):
    """(path, readable) for a file written in some format, possibly damaged."""
    fmt = rng.choice(list(FORMATS))
    mode = rng.choice(sorted(SAVES[fmt]))
    image = pil_image(rng, mode, size)
    path = folder / f"case{index}{FORMATS[fmt]}"
    options = {}
    if fmt == "PNG" and rng.random() < 0.3:
        exif = Image.Exif()
        exif[0x0112] = rng.randint(1, 8)
        options["exif"] = exif
    if fmt == "PNG" and mode == "P+t":
        options["transparency"] = 0
    if fmt == "GIF" and rng.random() < 0.4:
        options.update(save_all=True, append_images=[image.copy()], duration=50)
    image.save(path, format=fmt, **options)
    damage = rng.choice(["none"] * 5 + ["truncate", "garbage", "empty"])
    if damage == "truncate":
        data = path.read_bytes()
        path.write_bytes(data[: rng.randint(8, max(9, len(data) // 2))])
    elif damage == "garbage":
        path.write_bytes(bytes(rng.randrange(256) for _ in range(rng.randint(1, 400))))
    elif damage == "empty":
        path.write_bytes(b"")
    return path, damage == "none"


def source_for(index: int, folder, for_mask: bool):
    rng = random.Random(index * 2 + for_mask)
    size = (rng.choice([1, 7, 33, 64, 97, 150]), rng.choice([1, 9, 48, 64, 121]))
    kind = rng.choice(["pil", "file", "file", "array", "array", "other"])
    if kind == "pil":
        return pil_image(rng, rng.choice(MODES), size), True
    if kind == "file":
        return file_source(rng, folder, size, index)
    if kind == "array":
        return array_source(rng, size)
    other = rng.choice(["directory", "missing", "list", "number", "bytes-path", "text-file"])
    if other == "text-file":
        (folder / "notes.png").write_text("not a picture")
        return folder / "notes.png", False
    return {"directory": folder, "missing": folder / "missing.png", "list": [[0, 1]], "number": 3,
            "bytes-path": str(folder / "nope.png").encode()}[other], False


def sane_tensor(channels: int, binary: bool):
    def sane(tensor):
        ok = tensor.shape == (1, channels, 64, 64) and tensor.dtype == torch.float32 and bool(torch.isfinite(tensor).all())
        if binary:
            return ok and set(torch.unique(tensor).tolist()) <= {0.0, 1.0}
        return ok and float(tensor.min()) >= -1 and float(tensor.max()) <= 1

    return sane


def quietly(run):
    def wrapped():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # animated-image and EXIF warnings are expected here
            return run()

    return wrapped


@pytest.mark.parametrize("index", range(N_IMAGES))
def test_input_images(tmp_path, tiny_call, index):
    source, readable = source_for(index, tmp_path, for_mask=False)
    if index % 8 == 0 and readable:
        run = lambda: pipeline.generate("a blue square", input_image=source, strength=0.5, n_inference_steps=2,
                                        height=64, width=64, sampler_name="ddim", seed=index, progress=False, **tiny_call)
        sane = lambda image: image.shape == (64, 64, 3) and image.dtype == np.uint8 and image.max() > 0
    else:
        run, sane = (lambda: to_image_tensor(source, 64, 64)), sane_tensor(3, binary=False)
    got = judge("input images", quietly(run), names=("input_image",), sane=sane)
    if readable:
        assert got == "accepted"


@pytest.mark.parametrize("index", range(N_MASKS))
def test_masks(tmp_path, tiny_call, index):
    source, readable = source_for(index, tmp_path, for_mask=True)
    picture = np.full((64, 64, 3), 100, np.uint8)
    if index % 8 == 0 and readable:
        run = lambda: pipeline.generate("a blue square", input_image=picture, mask_image=source, strength=1.0,
                                        n_inference_steps=2, height=64, width=64, sampler_name="euler", seed=index,
                                        progress=False, **tiny_call)
        sane = lambda image: image.shape == (64, 64, 3) and image.dtype == np.uint8 and image.max() > 0
    else:
        def run():
            mask = read_picture(source, "mask_image", "L", "black")
            check_mask_size(mask.size, mask.size)
            return to_mask_tensor(mask, 64, 64)

        sane = sane_tensor(1, binary=True)
    got = judge("masks", quietly(run), names=("mask_image",), sane=sane)
    if readable and index % 8 != 0:
        assert got == "accepted"


def test_a_mask_with_another_aspect_ratio_is_refused_end_to_end(tiny_call):
    picture = np.full((64, 96, 3), 100, np.uint8)
    mask = np.zeros((64, 64), np.uint8)
    got = judge("masks", lambda: pipeline.generate("a blue square", input_image=picture, mask_image=mask, strength=1.0,
                                                  n_inference_steps=2, height=64, width=64, progress=False, **tiny_call),
                names=("mask_image",))
    assert got == "refused"
    buffer = io.BytesIO()
    Image.new("L", (96, 64), 255).save(buffer, format="PNG")
    buffer.seek(0)
    image = pipeline.generate("a blue square", input_image=picture, mask_image=Image.open(buffer), strength=1.0,
                              n_inference_steps=2, height=64, width=64, progress=False, **tiny_call)
    assert image.shape == (64, 64, 3)
