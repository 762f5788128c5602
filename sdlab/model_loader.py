"""Load a Stable Diffusion v1 checkpoint into sdlab's four models, safely and without copies.

`preload_models_from_standard_weights(path, device)` accepts the official files as they are
distributed: `.safetensors` (read lazily, tensor by tensor) and `.ckpt` (a PyTorch zip file, opened
with `torch.load(weights_only=True, mmap=True)`: no code in the file is ever run), with the
tensors at the top level or under `state_dict`, in float32 or float16. The models are first built
on PyTorch's *meta* device (shapes, no memory) and then take the file's tensors in place, so loading
the 4.3 GB file needs about 4.3 GB, not twice that.

Every model tensor of the file is consumed and shape-checked. Known extras (the DDPM schedule
buffers, CLIP's `position_ids`, EMA scalars) are reported as ignored; anything missing or unknown
is an error that names the keys.
"""

from __future__ import annotations

import json
import os
import zipfile
from pathlib import Path

import torch

from . import model_converter
from .clip import CLIP
from .config import SD15, SDConfig
from .decoder import VAE_Decoder
from .diffusion import Diffusion
from .encoder import VAE_Encoder

CONFIG_METADATA_KEY = "sdlab_config"
SUPPORTED = "Stable Diffusion v1.x (v1-5-pruned-emaonly and its fp16 / inpainting variants) or an sdlab tiny model"
DEFAULT_CHECKPOINT = Path(__file__).parent / "data" / "tiny.safetensors"


class CheckpointError(ValueError):
    """The file is not a checkpoint sdlab can load; the message says what was found."""


def read_checkpoint(path, cast=None) -> tuple[dict, dict]:
    """Read a `.safetensors` or `.ckpt` file -> (flat state dict, metadata). Never unpickles code.

    `cast(tensor) -> tensor` is applied to each tensor as it is read (e.g. float16 -> float32), so
    that a converted copy never sits beside the whole original in memory.
    """
    path = Path(os.fspath(path)).expanduser()
    if not path.exists():
        raise FileNotFoundError(
            f"checkpoint {str(path)!r} does not exist; pass the path of v1-5-pruned-emaonly.safetensors "
            f"(or .ckpt), or no path to use sdlab's bundled tiny model"
        )
    if path.is_dir():
        raise CheckpointError(f"{str(path)!r} is a directory; pass the checkpoint file inside it")
    cast = cast or (lambda tensor: tensor)
    if zipfile.is_zipfile(path):
        return _read_torch(path, cast)
    return _read_safetensors(path, cast)


SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
}


def _read_safetensors(path: Path, cast) -> tuple[dict, dict]:
    """The safetensors format: an 8-byte header length, a JSON header, then the raw tensor bytes.

    Each tensor is read straight into its own buffer (no pickle, no memory map kept alive).
    """
    size = path.stat().st_size
    not_checkpoint = (f"{str(path)!r} is neither a .safetensors file nor a PyTorch .ckpt (zip) file; it may be "
                      f"truncated, a web page saved instead of the download, or another format")
    with open(path, "rb") as f:
        header_size = int.from_bytes(f.read(8), "little")
        if not 2 <= header_size <= min(size - 8, 100 << 20):
            raise CheckpointError(not_checkpoint)
        try:
            header = json.loads(f.read(header_size))
            metadata = header.pop("__metadata__", None) or {}
            entries = sorted(header.items(), key=lambda item: item[1]["data_offsets"][0])
            needed = 8 + header_size + max((info["data_offsets"][1] for _, info in entries), default=0)
        except (UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError):
            raise CheckpointError(not_checkpoint) from None
        if needed > size:
            raise CheckpointError(
                f"{str(path)!r} is truncated: its header describes {needed:,} bytes but the file has {size:,}; "
                f"download it again"
            )
        tensors = {}
        for key, info in entries:
            if info["dtype"] not in SAFETENSORS_DTYPES:
                raise CheckpointError(f"tensor {key!r} in {str(path)!r} has unsupported dtype {info['dtype']}")
            tensor = torch.empty(info["shape"], dtype=SAFETENSORS_DTYPES[info["dtype"]])
            begin, end = info["data_offsets"]
            if end - begin != tensor.numel() * tensor.element_size():
                raise CheckpointError(f"tensor {key!r} in {str(path)!r} has {end - begin} bytes for shape {info['shape']}")
            f.seek(8 + header_size + begin)
            f.readinto(memoryview(tensor.view(-1).view(torch.uint8).numpy()))
            tensors[key] = cast(tensor)
    return tensors, metadata


def _read_torch(path: Path, cast) -> tuple[dict, dict]:
    try:
        data = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as error:  # zip errors, unpickling refused, truncated storages
        raise CheckpointError(
            f"could not read {str(path)!r} as a PyTorch checkpoint ({type(error).__name__}: "
            f"{str(error).splitlines()[0][:300]}); it may be truncated or contain objects other than "
            f"tensors (sdlab only loads with weights_only=True)"
        ) from None
    metadata = {}
    if isinstance(data, dict) and isinstance(data.get(CONFIG_METADATA_KEY), str):
        metadata[CONFIG_METADATA_KEY] = data.pop(CONFIG_METADATA_KEY)
    if isinstance(data, dict) and isinstance(data.get("state_dict"), dict):
        data = data["state_dict"]
    if not isinstance(data, dict) or not all(isinstance(v, torch.Tensor) for v in data.values()):
        raise CheckpointError(f"{str(path)!r} holds a {type(data).__name__}, not a dictionary of tensors")
    return {key: cast(data.pop(key)) for key in list(data)}, metadata


def detect_config(state_dict: dict, metadata: dict) -> SDConfig:
    """The model sizes: from sdlab's own metadata, else SD1.x's, after ruling out other families."""
    if CONFIG_METADATA_KEY in metadata:
        return SDConfig.from_json(metadata[CONFIG_METADATA_KEY])
    keys = list(state_dict)
    found = None
    if any(k.startswith("conditioner.embedders.") for k in keys):
        found = "an SDXL checkpoint (conditioner.embedders.* keys)"
    elif any(k.startswith("cond_stage_model.model.") for k in keys):
        found = "a Stable Diffusion 2.x checkpoint (OpenCLIP text encoder, cond_stage_model.model.* keys)"
    else:
        to_k = state_dict.get("model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight")
        if to_k is not None and to_k.shape[1] != 768:
            found = f"a checkpoint whose cross-attention reads {to_k.shape[1]}-wide text embeddings (SD 2.x uses 1024)"
        elif not any(k.startswith("model.diffusion_model.") for k in keys):
            sample = ", ".join(keys[:5]) or "no tensors at all"
            found = f"no Stable Diffusion U-Net (keys such as {sample})"
    if found:
        raise CheckpointError(f"this file is {found}; sdlab supports {SUPPORTED}")
    conv_in = state_dict.get("model.diffusion_model.input_blocks.0.0.weight")
    if conv_in is not None and conv_in.shape[1] != SD15.unet.in_channels:
        return SDConfig(clip=SD15.clip, vae=SD15.vae, unet=type(SD15.unet)(in_channels=conv_in.shape[1]))
    return SD15


def build_models(config: SDConfig = SD15) -> dict:
    """The four models with PyTorch's default random init (on the meta device inside `torch.device("meta")`)."""
    return {
        "clip": CLIP(config.clip),
        "encoder": VAE_Encoder(config.vae),
        "decoder": VAE_Decoder(config.vae),
        "diffusion": Diffusion(config.unet),
    }


def load_state_dict(state_dict: dict, config: SDConfig, device="cpu", dtype=None, verbose: bool = False) -> dict:
    """Convert an original-layout state dict and load it into new models, without copying tensors."""
    with torch.device("meta"):
        models = build_models(config)
    expected = {name: {k: tuple(v.shape) for k, v in m.state_dict().items()} for name, m in models.items()}
    converted, ignored, unknown = model_converter.convert(state_dict, expected)
    problems = []
    if unknown:
        problems.append(f"{len(unknown)} unexpected keys: {_some(unknown)}")
    for name, tensors in converted.items():
        def original(keys):
            return [model_converter.join_model(name, model_converter.rename(k, model_converter.RULES[name], False)) for k in sorted(keys)]

        missing = set(expected[name]) - set(tensors)
        if missing:
            problems.append(f"{name}: {len(missing)} missing keys: {_some(original(missing))}")
        extra = set(tensors) - set(expected[name])
        if extra:
            problems.append(f"{name}: {len(extra)} unexpected keys: {_some(original(extra))}")
        wrong = [f"{k} {tuple(t.shape)} (expected {expected[name][k]})" for k, t in tensors.items()
                 if k in expected[name] and tuple(t.shape) != expected[name][k]]
        if wrong:
            problems.append(f"{name}: {len(wrong)} tensors of the wrong shape: {_some(wrong)}")
    if problems:
        raise CheckpointError("the checkpoint does not match " + SUPPORTED + ":\n  " + "\n  ".join(problems))
    if verbose and ignored:
        print(f"ignored {len(ignored)} tensors that no model reads: {_some(ignored)}")
    for name, model in models.items():
        tensors = converted[name]
        for key, tensor in tensors.items():
            tensors[key] = tensor.to(device=device, dtype=target_dtype(tensor.dtype, device, dtype))
        model.load_state_dict(tensors, strict=True, assign=True)
        model.eval().requires_grad_(False)
    return models


def target_dtype(stored: torch.dtype, device, dtype=None) -> torch.dtype:
    """The dtype a stored tensor is loaded as: `dtype` if given (floating tensors only), else the
    stored one, except float16 on the CPU, which becomes float32 (half precision is slow there)."""
    if not stored.is_floating_point:
        return stored
    if dtype is not None:
        return dtype
    return torch.float32 if stored == torch.float16 and torch.device(device).type == "cpu" else stored


def _some(items, n: int = 5) -> str:
    items = list(items)
    return ", ".join(items[:n]) + (f", ... ({len(items) - n} more)" if len(items) > n else "")


def preload_models_from_standard_weights(ckpt_path=None, device="cpu", dtype=None, verbose: bool = False) -> dict:
    """Load a checkpoint -> `{"clip", "encoder", "decoder", "diffusion"}`, ready for inference.

    `ckpt_path` is the original `.safetensors` or `.ckpt` file; with no path, sdlab's bundled tiny
    model. `dtype=None` keeps the file's precision, except that float16 becomes float32 on the CPU,
    where half precision is slow; pass `torch.float16`/`torch.bfloat16`/`torch.float32` to choose.
    """
    if ckpt_path is None:
        if not DEFAULT_CHECKPOINT.exists():
            raise FileNotFoundError("sdlab's bundled tiny model is not installed; pass a checkpoint path")
        ckpt_path = DEFAULT_CHECKPOINT
    state_dict, metadata = read_checkpoint(ckpt_path, cast=lambda t: t.to(target_dtype(t.dtype, device, dtype)))
    config = detect_config(state_dict, metadata)
    return load_state_dict(state_dict, config, device=device, dtype=dtype, verbose=verbose)


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

