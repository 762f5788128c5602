"""Input images and masks are read as a person means them (`sdlab.images`), checked against Pillow and
numpy arithmetic on pictures written here."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from sdlab.errors import InputImageError
from sdlab.images import check_mask_size, read_picture, to_image_tensor, to_mask_tensor

RNG = np.random.default_rng(0)
RGB = RNG.integers(0, 256, (12, 20, 3), dtype=np.uint8)


def saved(image: Image.Image, tmp_path, name: str, **options):
    path = tmp_path / name
    image.save(path, **options)
    return path


def test_a_plain_rgb_picture_is_unchanged(tmp_path):
    path = saved(Image.fromarray(RGB), tmp_path, "plain.png")
    for source in (path, str(path), Image.open(path), RGB):
        assert np.array_equal(np.asarray(read_picture(source)), RGB)
    tensor = to_image_tensor(path, 20, 12)
    assert tensor.shape == (1, 3, 12, 20) and tensor.dtype == torch.float32
    assert torch.equal(tensor, torch.from_numpy(RGB.astype(np.float32)).permute(2, 0, 1)[None] * 2 / 255 - 1)


def test_exif_orientation_is_applied(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display": a phone held upright
    path = saved(Image.fromarray(RGB), tmp_path, "phone.png", exif=exif)
    shown = np.asarray(read_picture(path))
    assert shown.shape == (20, 12, 3)
    assert np.array_equal(shown, np.rot90(RGB, k=-1))


def test_sixteen_bit_grayscale_is_scaled_not_clipped(tmp_path):
    levels = (np.arange(12 * 20, dtype=np.uint32).reshape(12, 20) * 273).astype(np.uint16)  # 0..65247
    path = saved(Image.fromarray(levels), tmp_path, "deep.png")
    opened = Image.open(path)
    assert opened.mode.startswith("I")
    gray = np.asarray(read_picture(path))
    expected = np.round(levels / 257.0).astype(np.uint8)
    assert np.array_equal(gray[..., 0], expected) and np.array_equal(gray[..., 1], expected)
    assert gray.mean() < 200  # Pillow's own convert("RGB") clips these to white


def test_transparency_is_composited_on_white_for_images_and_black_for_masks():
    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[..., 0] = 200  # red, hidden where alpha is 0
    rgba[:2, :, 3] = 255
    rgba[2:, :, 3] = 0
    image = np.asarray(read_picture(Image.fromarray(rgba, "RGBA")))
    assert (image[:2] == [200, 0, 0]).all() and (image[2:] == 255).all()
    half = rgba.copy()
    half[..., 3] = 128
    blended = np.asarray(read_picture(Image.fromarray(half, "RGBA")))[0, 0]
    alpha = 128 / 255
    assert np.allclose(blended, np.array([200, 0, 0]) * alpha + 255 * (1 - alpha), atol=1)
    la = Image.fromarray(np.stack([np.full((4, 4), 255, np.uint8), rgba[..., 3]], -1), "LA")
    mask = np.asarray(read_picture(la, "mask_image", "L", "black"))
    assert (mask[:2] == 255).all() and (mask[2:] == 0).all()
    assert np.array_equal(np.asarray(read_picture(rgba)), image)  # an RGBA array is read the same way


def test_palette_with_a_transparent_colour_cmyk_and_one_bit(tmp_path):
    palette = Image.fromarray(RGB).quantize(8)
    palette.info["transparency"] = 0
    path = saved(palette, tmp_path, "palette.png", transparency=0)
    image = np.asarray(read_picture(path))
    index = np.asarray(Image.open(path))
    assert (image[index == 0] == 255).all()
    assert np.array_equal(image[index != 0], np.asarray(palette.convert("RGB"))[index != 0])
    cmyk = Image.fromarray(RGB).convert("CMYK")
    assert np.array_equal(np.asarray(read_picture(cmyk)), np.asarray(cmyk.convert("RGB")))
    bits = Image.fromarray(RGB[..., 0] > 127)
    assert bits.mode == "1"
    assert set(np.unique(np.asarray(read_picture(bits)))) <= {0, 255}


def test_float_uint16_and_bool_arrays_are_scaled():
    unit = RGB / 255.0
    assert np.array_equal(np.asarray(read_picture(unit)), RGB)
    assert np.array_equal(np.asarray(read_picture(unit.astype(np.float32))), RGB)
    signed = RGB / 127.5 - 1
    assert np.array_equal(np.asarray(read_picture(signed)), RGB)
    assert np.array_equal(np.asarray(read_picture(RGB.astype(np.uint16) * 257)), RGB)
    chw = torch.from_numpy(signed).permute(2, 0, 1)[None].float()  # (1, 3, H, W) in [-1, 1], diffusers' layout
    assert np.array_equal(np.asarray(read_picture(chw)), RGB)
    flags = RGB[..., 0] > 127
    assert np.array_equal(np.asarray(read_picture(flags, "mask_image", "L")), flags * np.uint8(255))


@pytest.mark.parametrize("bad", [RGB * 1.0, np.full((4, 4), np.nan), np.full((4, 4), 2.0), np.zeros((4, 4), np.complex64),
                                 np.zeros((5, 5, 5), np.uint8), np.zeros((0, 4, 3), np.uint8),
                                 np.full((4, 4), 300, np.int32)])
def test_unreadable_arrays_are_refused_by_name(bad):
    with pytest.raises(InputImageError, match="input_image"):
        read_picture(bad)


def test_bool_and_float_masks_repaint():
    flags = np.zeros((8, 8), bool)
    flags[2:6, 2:6] = True
    expected = torch.from_numpy(flags.astype(np.float32))[None, None]
    for mask in (flags, flags.astype(np.float32), flags.astype(np.float64) * 0.9 + 0.05, flags.astype(np.uint8) * 255,
                 Image.fromarray(flags), torch.from_numpy(flags)):
        assert torch.equal(to_mask_tensor(mask, 8, 8), expected), type(mask)


def test_animated_images_use_the_first_frame_with_a_warning(tmp_path):
    frames = [Image.fromarray(np.full((6, 6, 3), value, np.uint8)) for value in (10, 240)]
    path = tmp_path / "animated.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=100)
    with pytest.warns(UserWarning, match="first frame"):
        image = np.asarray(read_picture(path))
    assert abs(int(image.mean()) - 10) <= 2


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_truncated_and_bomb_files_are_refused_with_the_parameter_name(tmp_path, monkeypatch):
    buffer = io.BytesIO()
    Image.fromarray(RNG.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buffer, format="JPEG")
    half = tmp_path / "half.jpg"
    half.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    with pytest.raises(InputImageError, match="--init-image.*truncated"):
        read_picture(half, "--init-image")
    text = tmp_path / "notes.png"
    text.write_text("not a picture")
    with pytest.raises(InputImageError, match="mask_image"):
        read_picture(text, "mask_image", "L")
    big = saved(Image.new("RGB", (100, 100)), tmp_path, "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 5000)
    for limit_name in ("input_image", "mask_image"):
        with pytest.raises(InputImageError, match=f"{limit_name}.*decompression bomb"):
            read_picture(big, limit_name)
    with pytest.raises(InputImageError, match="input_image.*directory"):
        read_picture(tmp_path)


def test_a_mask_of_another_aspect_ratio_is_refused():
    check_mask_size((256, 128), (512, 256))  # a preview of the same picture: resized with it
    with pytest.raises(InputImageError, match="mask_image is 100x100 but the image is 512x256"):
        check_mask_size((100, 100), (512, 256))
