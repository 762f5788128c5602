"""Load a Stable Diffusion v1 checkpoint into sdlab's four models, safely and without copies.

`preload_models_from_standard_weights(path, device)` accepts the official files as they are
distributed: `.safetensors` and `.ckpt` (the PyTorch Lightning files of every SD 1.x release
included), with the tensors at the top level or under `state_dict`, in float32 or float16. Reading
is `sdlab.checkpoint_io`'s: nothing in a file ever runs, and what a file declares is checked before
anything is allocated. The order is:

1. the file's structure (safetensors header, or zip + pickle), then its family and config
   (`model_converter.FAMILIES`; a 6.9 GB SDXL file is refused from its header alone);
2. the models built on PyTorch's *meta* device (shapes, no memory), and every key, shape and dtype
   of the file compared with them;
3. only then each tensor read, cast, checked to be finite, and handed to the models in place, so
   loading the 4.3 GB file needs about 4.3 GB, not twice that.

Known extras (the DDPM schedule buffers, CLIP's `position_ids`, EMA scalars) are ignored and never
read; anything missing or unknown is an error that names the keys.
"""

from __future__ import annotations

import collections
import os
from pathlib import Path

import torch

from . import model_converter
from .checkpoint_io import (
    clean_message,
    open_checkpoint,
    pickle_globals,
    quoted,
    read_checkpoint,
)
from .clip import CLIP
from .config import SD15, SDConfig
from .decoder import VAE_Decoder
from .diffusion import Diffusion
from .encoder import VAE_Encoder
from .errors import (
    ArgumentError,
    CheckpointError,
    CheckpointNotFoundError,
    DeviceError,
    NumericalError,
)
from .model_converter import CONFIG_METADATA_KEY, SUPPORTED
from .samplers import sampler_names

__all__ = [
    "CONFIG_METADATA_KEY",
    "DEFAULT_CHECKPOINT",
    "SUPPORTED",
    "CheckpointError",
    "CheckpointNotFoundError",
    "build_models",
    "describe",
    "detect_config",
    "inspect_checkpoint",
    "load_state_dict",
    "preload_models_from_standard_weights",
    "read_checkpoint",
    "save_checkpoint",
    "target_dtype",
]

DEFAULT_CHECKPOINT = Path(__file__).parent / "data" / "tiny.safetensors"
#: the dtypes a model tensor may have in a file; integer, bool, complex and float8 tensors are refused
WEIGHT_DTYPES = ("float32", "float16", "bfloat16", "float64")
LOAD_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}


def detect_config(tensors: dict, metadata: dict, source: str = "the checkpoint") -> SDConfig:
    """The model sizes (`model_converter.detect_config`), with the sampler of the config checked too."""
    config = model_converter.detect_config(tensors, metadata, source)
    if config.sampling.sampler not in sampler_names():
        raise CheckpointError(f"the sdlab_config metadata of {source} names the sampler {config.sampling.sampler!r:.40}; "
                              f"expected one of {', '.join(sampler_names())}")
    return config


def build_models(config: SDConfig = SD15) -> dict:
    """The four models with PyTorch's default random init (on the meta device inside `torch.device("meta")`)."""
    return {
        "clip": CLIP(config.clip),
        "encoder": VAE_Encoder(config.vae),
        "decoder": VAE_Decoder(config.vae),
        "diffusion": Diffusion(config.unet),
    }


def _meta_models(config: SDConfig, source: str) -> dict:
    try:
        with torch.device("meta"):
            return build_models(config)
    except (ValueError, RuntimeError, TypeError) as error:
        raise CheckpointError(f"the config of {source} describes models sdlab cannot build ({clean_message(error)})") from None


def check_layout(tensors: dict, models: dict, source: str = "the checkpoint") -> list[str]:
    """Compare what a file declares (key -> anything with `.shape` and `.dtype`) with the models'
    tensors, before any data is read -> the keys the models read. Missing, unknown, wrongly shaped
    and non-floating model tensors are named in one error."""
    expected = {name: {k: tuple(v.shape) for k, v in m.state_dict().items()} for name, m in models.items()}
    meta = {key: torch.empty(tuple(value.shape), device="meta") for key, value in tensors.items()}
    try:
        converted, ignored, unknown = model_converter.convert(meta)
    except CheckpointError as error:
        raise CheckpointError(f"{source}: {error}") from None
    problems = [f"{len(unknown)} unexpected keys: {_some(unknown)}"] if unknown else []
    for name, found in converted.items():
        def original(keys, name=name):
            return [k for key in sorted(keys) for k in model_converter.original_keys(name, key)]

        missing = set(expected[name]) - set(found)
        if missing:
            problems.append(f"{name}: {len(missing)} missing keys: {_some(original(missing))}")
        extra = set(found) - set(expected[name])
        if extra:
            problems.append(f"{name}: {len(extra)} unexpected keys: {_some(original(extra))}")
        wrong = [f"{k} {tuple(t.shape)} (expected {expected[name][k]})" for k, t in found.items()
                 if k in expected[name] and tuple(t.shape) != expected[name][k]]
        if wrong:
            problems.append(f"{name}: {len(wrong)} tensors of the wrong shape: {_some(wrong)}")
    model_keys = [key for key in tensors if key not in ignored and key not in unknown]
    not_float = [f"{key} ({_dtype_name(tensors[key].dtype)})" for key in model_keys
                 if _dtype_name(tensors[key].dtype) not in WEIGHT_DTYPES]
    if not_float:
        problems.append(f"{len(not_float)} model tensors are not floating point ({'/'.join(WEIGHT_DTYPES)}): {_some(not_float)}")
    if problems:
        raise CheckpointError(f"{source} does not match {SUPPORTED}:\n  " + "\n  ".join(problems))
    return model_keys


def _dtype_name(dtype) -> str:
    return str(dtype).removeprefix("torch.")


def load_state_dict(state_dict: dict, config: SDConfig, device="cpu", dtype=None, verbose: bool = False,
                    source: str = "the checkpoint") -> dict:
    """Convert an original-layout state dict and load it into new models, without copying tensors."""
    models = _meta_models(config, source)
    model_keys = check_layout(state_dict, models, source)
    if verbose and len(model_keys) < len(state_dict):
        print(f"ignored {len(state_dict) - len(model_keys)} tensors that no model reads: "
              f"{_some(k for k in state_dict if k not in model_keys)}")
    state = {}
    for key in model_keys:
        state[key] = _checked(state_dict.pop(key), key, device, dtype, source)
    return _assign(models, state, config)


def _checked(tensor: torch.Tensor, key: str, device, dtype, source: str) -> torch.Tensor:
    """One tensor on its device and in its dtype, refused if it holds NaN or infinity."""
    tensor = tensor.to(device=device, dtype=target_dtype(tensor.dtype, device, dtype))
    if not _all_finite(tensor):
        bad = int((~torch.isfinite(tensor)).sum())
        raise NumericalError(f"tensor {key!r} of {source} holds {bad:,} NaN or infinite values"
                             f"{' after casting to ' + _dtype_name(tensor.dtype) if dtype is not None else ''}; "
                             f"the file is damaged (download it again) or was saved from a diverged training run")
    return tensor


def _all_finite(tensor: torch.Tensor, chunk: int = 1 << 22) -> bool:
    """No NaN or infinity, checked 4M values at a time (the check's temporary stays small)."""
    if not tensor.is_contiguous():
        return bool(torch.isfinite(tensor).all())
    flat = tensor.view(-1)
    return all(bool(torch.isfinite(flat[i:i + chunk]).all()) for i in range(0, flat.numel(), chunk))


def _assign(models: dict, state: dict, config: SDConfig) -> dict:
    converted, _, _ = model_converter.convert(state)
    for name, model in models.items():
        model.load_state_dict(converted[name], strict=True, assign=True)
        model.eval().requires_grad_(False)
    models["diffusion"].sampling = config.sampling
    return models


def target_dtype(stored: torch.dtype, device, dtype=None) -> torch.dtype:
    """The dtype a stored tensor is loaded as: `dtype` if given (floating tensors only), else the
    stored one, except float16 on the CPU, which becomes float32 (half precision is slow there)."""
    if not stored.is_floating_point:
        return stored
    if dtype is not None:
        return dtype
    return torch.float32 if stored == torch.float16 and torch.device(device).type == "cpu" else stored


def _read_dtype(stored: str, device, dtype=None) -> torch.dtype | None:
    """What the file reader converts a tensor to (`target_dtype` of its stored dtype), while reading."""
    stored_dtype = getattr(torch, stored, None)
    return target_dtype(stored_dtype, device, dtype) if isinstance(stored_dtype, torch.dtype) else None


def _some(items, n: int = 5) -> str:
    items = list(items)
    return ", ".join(items[:n]) + (f", ... ({len(items) - n} more)" if len(items) > n else "")


def check_device(device) -> torch.device:
    """`device` as a `torch.device` this torch can use; "meta" and devices it lacks are refused."""
    if not isinstance(device, (str, torch.device)):
        raise ArgumentError(f"device must be a string such as 'cpu' or 'cuda', not {type(device).__name__} ({device!r:.40})")
    try:
        device = torch.device(device)
    except RuntimeError:
        raise DeviceError(f"device {device!r:.40} is not a device name; use 'cpu', 'cuda', 'cuda:1' or 'mps'") from None
    if device.type == "meta":
        raise DeviceError("device 'meta' holds no data; load onto 'cpu' or an accelerator")
    if device.type != "cpu":
        try:
            torch.empty(0, device=device)
        except Exception as error:  # noqa: BLE001 - not compiled in, no driver, index out of range
            raise DeviceError(f"device {str(device)!r} cannot be used with this PyTorch ({clean_message(error, 160)}); "
                              f"use 'cpu' or a device it was built for") from None
    return device


def check_dtype(dtype) -> torch.dtype | None:
    """`None`, a floating `torch.dtype` or its name ("float16") -> the dtype; anything else is refused."""
    if dtype is None or dtype in LOAD_DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype.removeprefix("torch.") in LOAD_DTYPES:
        return LOAD_DTYPES[dtype.removeprefix("torch.")]
    raise ArgumentError(f"dtype must be None or one of torch.{', torch.'.join(LOAD_DTYPES)}, not {dtype!r:.40}")


def preload_models_from_standard_weights(ckpt_path=None, device="cpu", dtype=None, verbose: bool = False) -> dict:
    """Load a checkpoint -> `{"clip", "encoder", "decoder", "diffusion"}`, ready for inference.

    `ckpt_path` is the original `.safetensors` or `.ckpt` file; with no path, sdlab's bundled tiny
    model. `dtype=None` keeps the file's precision, except that float16 becomes float32 on the CPU,
    where half precision is slow; pass `torch.float16`/`torch.bfloat16`/`torch.float32` to choose.
    The U-Net's `.sampling` holds the settings the model was made for (`config.SamplingDefaults`).
    """
    device, dtype = check_device(device), check_dtype(dtype)
    if ckpt_path is None:
        if not DEFAULT_CHECKPOINT.exists():
            raise CheckpointNotFoundError("sdlab's bundled tiny model is not installed; pass a checkpoint path")
        ckpt_path = DEFAULT_CHECKPOINT
    with open_checkpoint(ckpt_path) as file:
        source = quoted(file.path)
        config = detect_config(file.tensors, file.metadata, source)
        models = _meta_models(config, source)
        model_keys = check_layout(file.tensors, models, source)
        if verbose and len(model_keys) < len(file.tensors):
            print(f"ignored {len(file.tensors) - len(model_keys)} tensors that no model reads: "
                  f"{_some(k for k in file.tensors if k not in model_keys)}")
        state = {key: _checked(file.read(key, _read_dtype(file.tensors[key].dtype, device, dtype)), key, device, dtype,
                               source) for key in model_keys}
    return _assign(models, state, config)


def save_checkpoint(models: dict, path, config: SDConfig | None = None, dtype=None) -> None:
    """Write models in the original file's key layout (`.safetensors`), with sdlab's config as metadata."""
    from safetensors.torch import save_file

    state = model_converter.to_standard(models)
    if dtype is not None:
        state = {k: v.to(dtype) for k, v in state.items()}
    metadata = {CONFIG_METADATA_KEY: config.to_json()} if config is not None else None
    save_file(state, str(path), metadata=metadata)


def describe(models: dict) -> str:
    """Parameter counts per model, for printing."""
    lines = [f"{name:9s} {sum(p.numel() for p in m.parameters()):>13,d} parameters" for name, m in models.items()]
    return "\n".join(lines)


def inspect_checkpoint(path) -> str:
    """What a checkpoint holds, read without loading it: format, tensors and dtypes, family and config,
    and for a `.ckpt` every global its pickle refers to (allowed by weights_only, an inert stand-in,
    or refused). A file sdlab refuses is described as far as it can be, with the reason."""
    try:
        with open_checkpoint(path) as file:
            return "\n".join(_describe_file(file))
    except CheckpointNotFoundError:
        raise
    except CheckpointError as error:
        if not _is_zip(path):
            raise
        lines = [f"file     {quoted(path)}", "format   PyTorch zip (.ckpt)"]
        lines += _describe_globals(pickle_globals(path))
        return "\n".join(lines + [f"refused  {error}"])


def _is_zip(path) -> bool:
    try:
        with open(os.fspath(path), "rb") as handle:
            return handle.read(4) == b"PK\x03\x04"
    except (OSError, TypeError):
        return False


def _describe_file(file) -> list[str]:
    names = {"safetensors": "safetensors", "ckpt": "PyTorch zip (.ckpt)"}
    dtypes = collections.Counter(info.dtype for info in file.tensors.values())
    n_values = sum(info.numel for info in file.tensors.values())
    lines = [f"file     {quoted(file.path)} ({file.path.stat().st_size:,} bytes)", f"format   {names[file.format]}",
             f"tensors  {len(file.tensors):,} ({n_values:,} values; "
             + ", ".join(f"{n} {dtype}" for dtype, n in dtypes.most_common()) + ")"]
    try:
        family, config = model_converter.detect_family(file.tensors, file.metadata, quoted(file.path))
        check_layout(file.tensors, _meta_models(config, quoted(file.path)), quoted(file.path))
        lines.append(f"family   {family.name}: {family.description}")
        lines.append(f"config   unet in_channels={config.unet.in_channels} base_channels={config.unet.base_channels}, "
                     f"clip n_layer={config.clip.n_layer} n_embd={config.clip.n_embd}, sampling {config.sampling}")
        lines.append("loads    yes")
    except CheckpointError as error:
        lines.append(f"loads    no: {error}")
    if file.format == "ckpt":
        lines += _describe_globals(file.globals)
        lines += [f"extra    {key} = {value}" for key, value in file.extras.items()]
    lines += [f"metadata {key} ({len(value):,} characters)" for key, value in file.metadata.items()]
    return lines


def _describe_globals(found: dict) -> list[str]:
    labels = {"weights_only": "allowed (weights_only)", "stand-in": "inert stand-in", "refused": "REFUSED"}
    return [f"global   {name}: {labels[status]}" for name, status in sorted(found.items())]
