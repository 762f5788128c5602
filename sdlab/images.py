r"""Input pictures read as a person means them: the image for image-to-image and the inpainting mask.

Everything a user may pass ends as an 8-bit picture, then as a tensor:

- **Files** (a path): opened with Pillow and decoded at once, so a truncated (half-downloaded)
  file or a decompression bomb (more than `PIL.Image.MAX_IMAGE_PIXELS` pixels) is refused here,
  naming the parameter (`input_image`, `mask_image`, or the command line's `--init-image`/`--mask`).
- **EXIF orientation** is applied: a phone photo goes in the way it is shown, not sideways.
- **Animated images** (GIF, APNG, WebP) use their first frame, with a warning.
- **Modes**: 16-bit grayscale (`I;16`, and `I`, as 16-bit PNG and TIFF files open) is scaled from
  0-65535, float (`F`) by the array rules below, CMYK/YCbCr/LAB/HSV/1-bit/palette converted to
  RGB. Transparency (RGBA, LA, PA, a palette with a transparent colour) is **composited on white**
  for the image (what an image viewer on a white page shows; the hidden colour of transparent
  pixels is often black, which the VAE would otherwise reproduce) and **on black** for a mask
  (a transparent pixel is unpainted: keep).
- **Arrays** (numpy, or a torch tensor, channels last or first; a leading batch of 1 is dropped):
  `uint8` as is; `uint16` scaled from 0-65535; other integer types must hold 0-255; `bool` is
  black/white; floats must be finite and in $[0, 1]$, or in $[-1, 1]$ (read so whenever a value
  is negative): $v_8 = \operatorname{round}(255\,x)$ or $\operatorname{round}(127.5\,(x + 1))$.
  A 4th channel is alpha.
- **Masks** (white = repaint) are read the same way, converted to grayscale (with a warning for a
  colour mask) and binarized at 1/2: `bool` and float masks work. A mask whose size differs from the image's is resized with it when
  its aspect ratio is the image's (e.g. drawn on a smaller preview; a warning says so); another is refused
  (it cannot mark the same regions).
"""

from __future__ import annotations

import os
import warnings

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import InputImageError

#: modes holding 16-bit (or wider integer) samples that Pillow's `convert` would clip at 255
WIDE_MODES = ("I", "I;16", "I;16L", "I;16B", "I;16N")
#: how far the aspect ratios of a mask and its image may differ and still be resized together
ASPECT_TOLERANCE = 0.01


def rescale(x, old_range, new_range, clamp: bool = False):
    """Map `x` linearly from `old_range` to `new_range` (the seed's helper)."""
    old_min, old_max = old_range
    new_min, new_max = new_range
    x = (x - old_min) * (new_max - new_min) / (old_max - old_min) + new_min
    return x.clamp(new_min, new_max) if clamp else x


def open_image(source, name: str = "input_image") -> Image.Image:
    """A path or a PIL image -> a fully decoded PIL image (first frame, EXIF orientation applied)."""
    if isinstance(source, (str, bytes)) or hasattr(source, "__fspath__"):
        path = os.fsdecode(source)
        if not os.path.isfile(path):
            what = "is a directory" if os.path.isdir(path) else "does not exist" if not os.path.exists(path) else "is not a regular file"
            raise InputImageError(f"{name}: {path!r} {what}; pass the path of a PNG, JPEG or WebP picture")
        try:
            image = Image.open(path)
        except Image.DecompressionBombError as error:
            raise InputImageError(f"{name}: {path!r} is refused as a decompression bomb ({error})") from None
        except (UnidentifiedImageError, OSError, ValueError) as error:
            raise InputImageError(f"{name}: {path!r} is not a picture Pillow can read ({error})") from None
    elif isinstance(source, Image.Image):
        image, path = source, getattr(source, "filename", "") or "the image"
    else:
        raise InputImageError(
            f"{name} must be a PIL image, a numpy array, a torch tensor or a file path; got {type(source).__name__}"
        )
    width, height = image.size
    if width * height > Image.MAX_IMAGE_PIXELS or 0 in (width, height):
        raise InputImageError(
            f"{name}: {path!r} is {width}x{height} pixels, refused (over PIL.Image.MAX_IMAGE_PIXELS = "
            f"{Image.MAX_IMAGE_PIXELS:,}, or empty): a decompression bomb or a mistake; resize it first"
        )
    if getattr(image, "n_frames", 1) > 1:
        warnings.warn(f"{name} is animated ({image.n_frames} frames); using the first frame", stacklevel=3)
        image.seek(0)
    try:
        image.load()
    except (OSError, ValueError, SyntaxError) as error:  # "image file is truncated", broken chunks
        raise InputImageError(f"{name}: {path!r} cannot be decoded, it may be truncated or damaged ({error})") from None
    try:
        return ImageOps.exif_transpose(image)
    except Exception as error:  # noqa: BLE001 - a broken EXIF block must not lose the picture
        warnings.warn(f"{name}: its EXIF orientation cannot be read ({error}); using the image as stored", stacklevel=3)
        return image


def array_to_uint8(array, name: str = "input_image") -> np.ndarray:
    """A numpy array or torch tensor of pixels -> uint8 (H, W) or (H, W, C), by the rules above."""
    if isinstance(array, torch.Tensor):
        if array.device.type == "meta":
            raise InputImageError(f"{name} is a meta tensor (it has no data); pass a tensor with pixels")
        array = array.detach().to("cpu", torch.float32 if array.dtype == torch.bfloat16 else array.dtype).numpy()
        array = array[0] if array.ndim == 4 and array.shape[0] == 1 else array  # (1, C, H, W) -> (C, H, W)
        if array.ndim == 3 and array.shape[0] in (1, 3, 4):
            array = array.transpose(1, 2, 0)  # (C, H, W) -> (H, W, C)
    array = np.asarray(array)
    array = array[0] if array.ndim == 4 and array.shape[0] == 1 else array  # (1, H, W, C) -> (H, W, C)
    if array.ndim == 3 and array.shape[-1] not in (1, 3, 4) and array.shape[0] in (1, 3, 4):
        array = array.transpose(1, 2, 0)  # channels first -> last
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] not in (1, 3, 4)) or 0 in array.shape:
        raise InputImageError(f"{name} must be an HxW, HxWx3 or HxWx4 array; got shape {array.shape}")
    kind = array.dtype.kind
    if kind == "b":
        return array.astype(np.uint8) * np.uint8(255)
    if array.dtype == np.uint8:
        return array
    if array.dtype == np.uint16:
        return np.round(array / 257.0).astype(np.uint8)  # 65535 -> 255
    if kind in "iu":
        low, high = int(array.min()), int(array.max())
        if low < 0 or high > 255:
            raise InputImageError(
                f"{name} is a {array.dtype} array with values {low}..{high}; pass uint8 (0-255), uint16 (0-65535) "
                f"or floats in [0, 1]"
            )
        return array.astype(np.uint8)
    if kind == "f":
        return _float_to_uint8(array.astype(np.float64), name)
    raise InputImageError(f"{name} has dtype {array.dtype}; pass uint8, uint16, bool or float pixels")


def _float_to_uint8(array: np.ndarray, name: str) -> np.ndarray:
    if not np.isfinite(array).all():
        raise InputImageError(f"{name} contains NaN or infinity; pass finite pixel values in [0, 1] or [-1, 1]")
    low, high = float(array.min()), float(array.max())
    if low >= 0 and high <= 1:
        return np.round(array * 255).astype(np.uint8)
    if low >= -1 and high <= 1:
        return np.round((array + 1) * 127.5).astype(np.uint8)
    raise InputImageError(
        f"{name} is a float array with values in [{low:g}, {high:g}]; floats must be in [0, 1] or [-1, 1] "
        f"(for 0-255 values pass array.astype(np.uint8))"
    )


def _flatten_alpha(image: Image.Image, background: str) -> Image.Image:
    """Composite transparency onto `background`; keep anything else as it is."""
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, background), rgba).convert("RGB")
    return image


def read_picture(source, name: str = "input_image", mode: str = "RGB", background: str = "white") -> Image.Image:
    """Any image source -> an 8-bit PIL image in `mode` ("RGB" for images, "L" for masks)."""
    if isinstance(source, (np.ndarray, torch.Tensor)):
        array = array_to_uint8(source, name)
        if array.ndim == 3 and array.shape[-1] == 1:
            array = array[..., 0]  # (H, W, 1) -> (H, W)
        image = Image.fromarray(np.ascontiguousarray(array))  # L, RGB or RGBA
    else:
        image = open_image(source, name)
        if image.mode in WIDE_MODES:
            wide = np.asarray(image).astype(np.int64)
            if wide.min() < 0 or wide.max() > 65535:
                raise InputImageError(f"{name}: a 32-bit image with values {wide.min()}..{wide.max()}; save it as 8 or 16 bits")
            image = Image.fromarray(np.round(wide / 257.0).astype(np.uint8))  # 16 -> 8 bits
        elif image.mode == "F":
            image = Image.fromarray(_float_to_uint8(np.asarray(image, dtype=np.float64), name))
    if mode == "L" and image.mode not in ("L", "1"):
        warnings.warn(f"{name} has mode {image.mode!r}, not single-channel 'L'; converting it to grayscale", stacklevel=3)
    image = _flatten_alpha(image, background)
    if image.mode == mode:
        return image
    if image.mode == "LAB":  # CIELAB (TIFF): Pillow converts it only through a colour profile
        from PIL import ImageCms

        image = ImageCms.applyTransform(image, ImageCms.buildTransform(
            ImageCms.createProfile("LAB"), ImageCms.createProfile("sRGB"), "LAB", "RGB"))
    try:
        return image.convert(mode)
    except ValueError as error:
        raise InputImageError(f"{name}: pictures in mode {image.mode!r} cannot be read ({error}); save it as RGB") from None


def to_image_tensor(image, width: int, height: int, name: str = "input_image") -> torch.Tensor:
    """Any image source (see the module's docstring) -> (1, 3, height, width) float32 in [-1, 1]."""
    image = read_picture(image, name, "RGB", "white")
    if image.size != (width, height):
        image = image.resize((width, height), Image.Resampling.LANCZOS)
    array = np.asarray(image, dtype=np.float32)  # (H, W, 3) in [0, 255]
    tensor = torch.from_numpy(array).permute(2, 0, 1)[None]  # (1, 3, H, W)
    return rescale(tensor, (0, 255), (-1, 1))


def check_mask_size(mask_size, image_size, name: str = "mask_image") -> None:
    """A mask must have its image's aspect ratio (any size: both are resized to the output's)."""
    (mw, mh), (iw, ih) = mask_size, image_size
    if abs((mw / mh) / (iw / ih) - 1) > ASPECT_TOLERANCE:
        raise InputImageError(
            f"{name} is {mw}x{mh} but the image is {iw}x{ih}: another aspect ratio, so it cannot mark the same "
            f"regions; draw the mask on the image itself (same size, white = repaint)"
        )


def to_mask_tensor(mask, width: int, height: int, name: str = "mask_image") -> torch.Tensor:
    """A mask (white = repaint) -> (1, 1, height, width) float32 of 0s and 1s, binarized at 0.5."""
    mask = read_picture(mask, name, "L", "black")
    if mask.size != (width, height):
        warnings.warn(f"{name} is {mask.size[0]}x{mask.size[1]}, the image {width}x{height}; resizing the mask", stacklevel=2)
        mask = mask.resize((width, height), Image.Resampling.LANCZOS)
    array = np.asarray(mask, dtype=np.float32) / 255.0
    return torch.from_numpy((array >= 0.5).astype(np.float32))[None, None]


def image_grid(images, columns: int | None = None) -> np.ndarray:
    r"""Images of one size ((H, W, 3) uint8 each) in rows of `columns` (default $\lceil\sqrt N\rceil$, a
    square or one row short of it), left to right then top to bottom; empty cells are black.
    Returns (rows * H, columns * W, 3) uint8."""
    images = [np.asarray(image) for image in images]
    if not images or any(image.shape != images[0].shape or image.ndim != 3 for image in images):
        raise ValueError("image_grid needs one or more (H, W, 3) images of the same size")
    n = len(images)
    columns = columns or int(np.ceil(np.sqrt(n)))
    rows = -(-n // columns)
    height, width, channels = images[0].shape
    grid = np.zeros((rows, columns, height, width, channels), np.uint8)
    for k, image in enumerate(images):
        grid[k // columns, k % columns] = image
    return grid.transpose(0, 2, 1, 3, 4).reshape(rows * height, columns * width, channels)  # (r, c, H, W, 3) -> (rH, cW, 3)
