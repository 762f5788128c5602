"""Up-front checks of what `generate` and the command line are given.

Each check raises one of `sdlab.errors`' exceptions with a message naming the argument, the value
found and a fix, *before* any model runs: a mistake costs milliseconds, not minutes of sampling.

Seeds: `torch.Generator.manual_seed` takes integers in $[-2^{63}, 2^{64})$ and wraps negative ones
modulo $2^{64}$ (`-1` and `2**64 - 1` are the same seed). sdlab reduces *any* Python integer
modulo $2^{64}$, which agrees with torch, and so with diffusers' `torch.Generator().manual_seed(seed)`,
on every seed torch accepts, and extends it to the rest.
"""

from __future__ import annotations

import math
import numbers
import operator
import os
from pathlib import Path

import torch

from .errors import ArgumentError, DeviceError, OutputPathError

SEED_MODULUS = 2**64
#: the largest height or width accepted: beyond it the U-Net's activations alone exceed any machine
MAX_SIZE = 8192
#: the most images one call generates (`num_images`, `--n`): the U-Net's batch is twice that with guidance
MAX_IMAGES = 64
#: the image formats the command line writes (PNG records every setting in a text chunk)
OUTPUT_SUFFIXES = (".png",)


def check_text(value, name: str, optional: bool = False) -> None:
    """A prompt: a `str` that UTF-8 can encode (no lone surrogates)."""
    if optional and value is None:
        return
    if not isinstance(value, str):
        hint = " (decode it first: text.decode('utf-8'))" if isinstance(value, bytes) else ""
        raise ArgumentError(f"{name} must be a string; got {type(value).__name__} {value!r:.60}{hint}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as error:
        raise ArgumentError(
            f"{name} contains a lone surrogate {value[error.start]!r} at position {error.start}, which is not text; "
            f"read the text with errors='replace' or remove it"
        ) from None


def check_real(value, name: str, low: float | None = None, high: float | None = None, *, open_low: bool = False,
               fix: str = "") -> float:
    """A finite real number (not a bool) in [low, high] (or (low, high] with `open_low`)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ArgumentError(f"{name} must be a number; got {type(value).__name__} {value!r:.60}. {fix}".rstrip())
    number = float(value)
    if not math.isfinite(number):
        raise ArgumentError(f"{name} must be finite; got {value!r}. {fix}".rstrip())
    below = low is not None and (number <= low if open_low else number < low)
    if below or (high is not None and number > high):
        bounds = f"{'(' if open_low else '['}{low if low is not None else '-inf'}, {high if high is not None else 'inf'}]"
        raise ArgumentError(f"{name} must be in {bounds}; got {value!r}. {fix}".rstrip())
    return number


def check_int(value, name: str, low: int | None, high: int | None = None, fix: str = "") -> int:
    """An integer (a Python or numpy int; not a bool, not a float) in [low, high] (None: no bound)."""
    try:
        if isinstance(value, bool):
            raise TypeError
        number = operator.index(value)
    except TypeError:
        raise ArgumentError(f"{name} must be an integer; got {type(value).__name__} {value!r:.60}. {fix}".rstrip()) from None
    if (low is not None and number < low) or (high is not None and number > high):
        bounds = f"from {low} to {high}" if high is not None else f">= {low}"
        raise ArgumentError(f"{name} must be an integer {bounds}; got {number}. {fix}".rstrip())
    return number


def check_flag(value, name: str) -> bool:
    if not isinstance(value, bool) and type(value).__name__ != "bool_":
        raise ArgumentError(f"{name} must be True or False; got {type(value).__name__} {value!r:.60}")
    return bool(value)


def check_seed(seed) -> int | None:
    """None (a fresh random seed) or any integer, reduced modulo 2**64 as torch does."""
    if seed is None:
        return None
    return check_int(seed, "seed", None) % SEED_MODULUS


def check_size(value, name: str, multiple: int) -> int:
    size = check_int(value, name, 1, MAX_SIZE, fix=f"Use a multiple of {multiple}, e.g. 512")
    if size % multiple:
        lower = max(multiple, size - size % multiple)
        raise ArgumentError(f"{name} must be a multiple of {multiple}; got {size}. Use {lower} or {lower + multiple}")
    return size


def check_device(device, name: str = "device") -> torch.device | None:
    """A device PyTorch can compute on here: it exists, and this build of torch supports it."""
    if device is None:
        return None
    if not isinstance(device, (str, torch.device)):
        raise DeviceError(f"{name} must be a string such as 'cpu', 'cuda' or 'cuda:0'; got {type(device).__name__} {device!r:.60}")
    try:
        parsed = torch.device(device)
    except (RuntimeError, ValueError) as error:
        raise DeviceError(f"{name}={device!r} is not a device ({str(error).splitlines()[0][:200]}); use 'cpu', 'cuda' or 'mps'") from None
    kind = parsed.type
    cpu = "--device cpu" if name.startswith("--") else f"{name}='cpu'"
    if kind == "meta":
        raise DeviceError(f"{name}='meta' holds no data, so nothing can be generated on it; use {cpu} (or cuda)")
    if kind == "cpu":
        return parsed
    backend = {"cuda": torch.backends.cuda, "mps": torch.backends.mps}.get(kind)
    if backend is not None and hasattr(backend, "is_built") and not backend.is_built():
        raise DeviceError(f"{name}={device!r}: this PyTorch was built without {kind.upper()} support (a CPU-only build); "
                          f"install a build with {kind.upper()}, or use {cpu}")
    module = getattr(torch, kind, None)
    if module is not None and hasattr(module, "is_available") and not module.is_available():
        raise DeviceError(f"{name}={device!r}: PyTorch supports {kind} but finds no such device here (no GPU, no driver, "
                          f"or hidden by *_VISIBLE_DEVICES); use {cpu}")
    if parsed.index is not None and module is not None and hasattr(module, "device_count") and parsed.index >= module.device_count():
        raise DeviceError(f"{name}={device!r} does not exist: this machine has {module.device_count()} {kind} device(s), "
                          f"numbered from 0")
    try:
        torch.empty(1, device=parsed)
    except Exception as error:  # noqa: BLE001 - whatever a missing backend raises
        raise DeviceError(f"{name}={device!r}: PyTorch cannot compute on it here ({str(error).splitlines()[0][:160]}); "
                          f"use {cpu}") from None
    return parsed


def check_models(models, need_encoder: bool) -> None:
    """The dict `preload_models_from_standard_weights` returns, with the models this call needs."""
    if not hasattr(models, "keys") or not hasattr(models, "__getitem__"):
        raise ArgumentError(f"models must be the dict of preload_models_from_standard_weights(path); got {type(models).__name__}")
    needed = {"clip", "decoder", "diffusion"} | ({"encoder"} if need_encoder else set())
    missing = sorted(needed - set(models.keys()))
    if missing:
        raise ArgumentError(f"models is missing {missing}; use preload_models_from_standard_weights(path)")
    for key in sorted(needed):
        model = models[key]
        if not isinstance(model, torch.nn.Module) or not hasattr(model, "config") or next(model.parameters(), None) is None:
            raise ArgumentError(f"models[{key!r}] must be an sdlab model with its weights; got {type(model).__name__}. "
                                f"Use preload_models_from_standard_weights(path)")


def check_latents(latents, shape: tuple[int, ...]) -> None:
    """Initial noise of `shape`, floating point, finite, with data."""
    if latents is None:
        return
    if not isinstance(latents, torch.Tensor):
        raise ArgumentError(f"latents must be a torch.Tensor of shape {shape}; got {type(latents).__name__}")
    if tuple(latents.shape) != shape:
        raise ArgumentError(f"latents must have shape {shape} for this image size; got {tuple(latents.shape)}. "
                            f"Draw them with torch.randn{shape}")
    if not latents.is_floating_point():
        raise ArgumentError(f"latents must be floating point (e.g. torch.float32); got {latents.dtype}")
    if latents.device.type == "meta":
        raise ArgumentError("latents is a meta tensor (it has no data); pass real noise, e.g. torch.randn(...)")
    if not torch.isfinite(latents).all():
        raise ArgumentError("latents contains NaN or infinity; pass finite noise, e.g. torch.randn(...)")


def check_output_path(path, name: str = "--output") -> Path:
    """A new PNG file in an existing, writable folder (sdlab never overwrites a file)."""
    if not isinstance(path, (str, os.PathLike)) or not os.fspath(path):
        raise OutputPathError(f"{name} must be a file name such as 'image.png'; got {path!r}")
    output = Path(path)
    if output.is_dir():
        raise OutputPathError(f"{name} {str(output)!r} is a directory; give a file name inside it, e.g. {str(output / 'image.png')!r}")
    if output.exists() or output.is_symlink():
        raise OutputPathError(f"{name} {str(output)!r} exists; choose another name (sdlab never overwrites your files)")
    suffix = output.suffix.lower()
    if suffix not in OUTPUT_SUFFIXES:
        what = f"has the unknown extension {output.suffix!r}" if suffix else "has no extension"
        raise OutputPathError(f"{name} {str(output)!r} {what}; sdlab writes PNG (it records the settings): use a .png name")
    folder = output.parent
    if not folder.is_dir():
        what = "is not a folder" if folder.exists() else "does not exist"
        raise OutputPathError(f"{name} {str(output)!r}: the folder {str(folder)!r} {what}; create it first")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise OutputPathError(f"{name} {str(output)!r}: the folder {str(folder)!r} is not writable; choose another folder")
    return output
