r"""LoRA: low-rank adapters for the U-Net and the text encoder (Hu et al. 2021).

A LoRA file stores, for some linear or convolution layers $W$ (out × in), two thin matrices: a
*down* projection $A$ (r × in) and an *up* projection $B$ (out × r) with a small rank $r$, and often
an $\alpha$. The adapted layer computes

$$W' x = W x + s \, \frac{\alpha}{r} \, B A x,$$

with the user's scale $s$ (1 = as trained; $\alpha = r$ when the file stores none). For a
convolution, $A$ is itself a convolution (r × in × k × k) and $B$ a 1×1 one, and
$\Delta W = (B \cdot A)$ reshaped to out × in × k × k.

`load_lora(models, path, scale)` reads the formats in use for SD1.x and applies them:

* kohya / AUTOMATIC1111: `lora_unet_<module>.lora_down.weight`, `.lora_up.weight`, `.alpha`,
  `lora_te_<module>...`, the module named after diffusers' U-Net (`down_blocks_0_attentions_0_...`)
  or after the original one (`input_blocks_1_1_...`), dots written as underscores;
* diffusers / PEFT: `unet.<module>.lora_A.weight` / `.lora_B.weight`, `text_encoder.<module>...`.

Names are matched exactly against every name the loaded models can have, so a key that targets
nothing is an error that names it. sdlab fuses the query, key and value projections into one
`in_proj`; an adapter on one of them changes its third of `in_proj`.

`fuse=True` adds $\Delta W$ into the weights (no cost per step); `fuse=False` keeps the adapters
beside them (a forward hook per layer, so the scale can change between calls). Both are undone by
`handle.remove()`: hooks are removed, and fused deltas are subtracted again (or, with
`keep_original=True`, the original weights are put back bit for bit).
"""

from __future__ import annotations

import dataclasses
import math
import re

import torch
import torch.nn.functional as F
from torch import nn

from . import model_converter
from .errors import ArgumentError, CheckpointError

#: Layer names inside the U-Net: original (CompVis) -> diffusers, inside a block.
RESNET_NAMES = {
    "in_layers.0": "norm1", "in_layers.2": "conv1", "emb_layers.1": "time_emb_proj",
    "out_layers.0": "norm2", "out_layers.3": "conv2", "skip_connection": "conv_shortcut",
}  # fmt: skip
TOP_LEVEL_NAMES = {
    "input_blocks.0.0": "conv_in", "time_embed.0": "time_embedding.linear_1",
    "time_embed.2": "time_embedding.linear_2", "out.0": "conv_norm_out", "out.2": "conv_out",
}  # fmt: skip
#: File prefixes of the two adapted models, per format.
KOHYA_PREFIXES = {"lora_unet_": "diffusion", "lora_te_": "clip"}
PEFT_PREFIXES = {"unet.": "diffusion", "text_encoder.": "clip"}
#: What the original file puts before a layer's name inside each adapted model.
ORIGINAL_PREFIXES = {"diffusion": "model.diffusion_model.", "clip": "cond_stage_model.transformer."}


@dataclasses.dataclass
class Target:
    """Where one adapter goes: `models[model]`'s `module`, or its `chunk`-th third if fused (q, k, v)."""

    model: str
    module: str
    chunk: int | None = None


@dataclasses.dataclass
class Adapter:
    """One layer's adapter: `down` (r, in[, k, k]), `up` (out, r[, 1, 1]) and `alpha` (None: = r)."""

    target: Target
    down: torch.Tensor
    up: torch.Tensor
    alpha: float | None = None

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    def delta(self, weight_shape) -> torch.Tensor:
        r""" $\frac{\alpha}{r} B A$, shaped as the (chunk of the) weight it is added to."""
        ratio = (self.alpha if self.alpha is not None else self.rank) / self.rank
        product = self.up.flatten(1).float() @ self.down.flatten(1).float()  # (out, r) @ (r, in*k*k)
        return (ratio * product).reshape(weight_shape)


def unet_original_to_diffusers(name: str, n_res_blocks: int) -> str:
    """A U-Net module named as in the original checkpoint -> as in diffusers' `UNet2DConditionModel`.

    `input_blocks.4.1.proj_in` -> `down_blocks.1.attentions.0.proj_in` (n_res_blocks = 2).
    """
    for original, diffusers in TOP_LEVEL_NAMES.items():
        if name == original or name.startswith(original + "."):
            return diffusers + name[len(original):]
    per_level = n_res_blocks + 1
    match = re.match(r"(input_blocks|middle_block|output_blocks)\.(\d+)\.(\d+)\.(.*)", name)
    if match is None:
        match = re.match(r"(middle_block)\.()(\d+)\.(.*)", name)
    if match is None:
        raise KeyError(name)
    part, block, layer, rest = match.group(1), match.group(2), int(match.group(3)), match.group(4)
    if part == "middle_block":
        kind, index = ("attentions", 0) if layer == 1 else ("resnets", layer // 2)
        prefix = f"mid_block.{kind}.{index}"
    elif part == "input_blocks":
        level, j = divmod(int(block) - 1, per_level)
        if j == n_res_blocks:  # the stride-2 convolution that ends the level
            return f"down_blocks.{level}.downsamplers.0.conv" + rest.removeprefix("op")
        prefix = f"down_blocks.{level}.{'resnets' if layer == 0 else 'attentions'}.{j}"
    else:
        level, j = divmod(int(block), per_level)
        if layer > 0 and rest.startswith("conv"):  # the up-sampling convolution that ends the level
            return f"up_blocks.{level}.upsamplers.0.conv" + rest.removeprefix("conv")
        prefix = f"up_blocks.{level}.{'resnets' if layer == 0 else 'attentions'}.{j}"
    if prefix.split(".")[-2] == "resnets":
        for original, diffusers in RESNET_NAMES.items():
            if rest == original or rest.startswith(original + "."):
                rest = diffusers + rest[len(original):]
    return f"{prefix}.{rest}"


def layer_aliases(models: dict):
    """For each linear/convolution layer (each third of a fused q/k/v) of the U-Net and the text
    encoder: `(target, aliases)`, the layer's names without file prefix, the original one first
    (`input_blocks.1.1.proj_in`), then diffusers'/transformers' (`down_blocks.0.attentions.0.proj_in`)."""
    for model in ("diffusion", "clip"):
        if model not in models:
            continue
        n_res_blocks = models[model].config.n_res_blocks if model == "diffusion" else None
        for module_name, module in models[model].named_modules():
            if not isinstance(module, (nn.Linear, nn.Conv2d)):
                continue
            fused = module_name.endswith(".in_proj")
            for chunk in (0, 1, 2) if fused else (None,):
                local = module_name + (f"[{chunk}]" if fused else "") + ".weight"
                original = model_converter.original_key(model, local)  # e.g. model.diffusion_model.input_blocks...
                original = original.removeprefix(ORIGINAL_PREFIXES[model]).removesuffix(".weight")
                if model == "diffusion":
                    aliases = [original, unet_original_to_diffusers(original, n_res_blocks)]
                else:  # transformers names CLIP's layers as the original file does (v5: without `text_model.`)
                    aliases = [original, original.removeprefix("text_model.")]
                yield Target(model, module_name, chunk), aliases


def target_names(models: dict) -> dict[str, Target]:
    """Every name a LoRA file may give a layer of these models -> where it goes.

    Each linear/convolution layer of the U-Net and the text encoder is named the original way
    (`input_blocks.1.1.proj_in`), the diffusers/transformers way (`down_blocks.0.attentions.0.proj_in`,
    `text_model.encoder.layers.0.self_attn.q_proj`), each with its file prefixes, kohya's with
    underscores for dots.
    """
    names: dict[str, Target] = {}
    for target, aliases in layer_aliases(models):
        kohya = next(p for p, m in KOHYA_PREFIXES.items() if m == target.model)
        peft = next(p for p, m in PEFT_PREFIXES.items() if m == target.model)
        for alias in aliases:
            names[kohya + alias.replace(".", "_")] = target
            names[peft + alias] = target
    return names


# The suffixes of an adapter's tensors, per format: (down, up, alpha).
SUFFIXES = [
    (".lora_down.weight", ".lora_up.weight", ".alpha"),  # kohya
    (".lora_A.weight", ".lora_B.weight", ".alpha"),  # PEFT
]


def parse_lora(state_dict: dict, models: dict, source: str = "the LoRA") -> list[Adapter]:
    """A LoRA state dict -> its adapters, mapped onto `models`. Unknown keys are an error naming them."""
    names = target_names(models)
    adapters, used, targets = [], set(), {}
    for key in state_dict:
        suffixes = next((s for s in SUFFIXES if key.endswith(s[0])), None)
        if suffixes is None:
            continue
        layer = key[: -len(suffixes[0])]
        up_key, alpha_key = layer + suffixes[1], layer + suffixes[2]
        target = names.get(layer)
        if target is None or up_key not in state_dict:
            continue  # reported below with the other unknown keys
        where = (target.model, target.module, target.chunk)
        if where in targets:
            raise CheckpointError(f"{source} has two adapters for the same layer: {targets[where]} and {layer}")
        targets[where] = layer
        alpha = state_dict.get(alpha_key)
        if alpha is not None and (not isinstance(alpha, torch.Tensor) or alpha.numel() != 1):
            raise CheckpointError(f"{source}: {alpha_key} must be a single number (the adapter's alpha)")
        adapters.append(Adapter(target, state_dict[key], state_dict[up_key], None if alpha is None else float(alpha)))
        used.update((key, up_key, alpha_key))
    unknown = [key for key in state_dict if key not in used]
    if unknown:
        shown = ", ".join(unknown[:5]) + (f", ... ({len(unknown) - 5} more)" if len(unknown) > 5 else "")
        raise CheckpointError(
            f"{source} has {len(unknown)} keys that target no layer of these models: {shown}; sdlab reads "
            f"SD1.x LoRA files in the kohya (lora_unet_*, lora_te_*) and diffusers/PEFT (unet.*, text_encoder.*) formats"
        )
    return adapters


class LoraHandle:
    """What `load_lora` applied; `remove()` undoes it."""

    def __init__(self):
        self._undo: list = []

    def remove(self) -> None:
        while self._undo:
            self._undo.pop()()


def _weight_slice(weight: torch.Tensor, chunk: int | None) -> torch.Tensor:
    """The part of `weight` an adapter changes: all of it, or one third (dim 0) of a fused q/k/v."""
    return weight if chunk is None else weight.chunk(3, dim=0)[chunk]


def _adapter_forward(module: nn.Module, adapter: Adapter, scale: float, x: torch.Tensor) -> torch.Tensor:
    r"""$s \frac{\alpha}{r} B(A x)$ for the layer's input `x`, without forming $\Delta W$."""
    ratio = scale * (adapter.alpha if adapter.alpha is not None else adapter.rank) / adapter.rank
    down, up = adapter.down.to(x), adapter.up.to(x)
    if isinstance(module, nn.Conv2d):
        down = down.reshape(adapter.rank, module.in_channels, *module.kernel_size)
        hidden = F.conv2d(x, down, stride=module.stride, padding=module.padding, dilation=module.dilation)
        return ratio * F.conv2d(hidden, up.reshape(up.shape[0], adapter.rank, 1, 1))
    return ratio * F.linear(F.linear(x, down.flatten(1)), up.flatten(1))


def _hook(adapter: Adapter, scale: float):
    def add_adapter(module, inputs, output):
        delta = _adapter_forward(module, adapter, scale, inputs[0])
        if adapter.target.chunk is None:
            return output + delta
        width = output.shape[-1] // 3  # fused (q | k | v) on the last dim
        start = adapter.target.chunk * width
        return torch.cat([output[..., :start], output[..., start : start + width] + delta, output[..., start + width :]], -1)

    return add_adapter


def _check_fits(adapter: Adapter, weight_shape, source: str) -> None:
    """The adapter's B (out, r) A (r, in*k*k) must multiply to the weight's shape (out, in[, k, k])."""
    down, up = adapter.down, adapter.up
    fits = (down.ndim in (2, 4) and up.ndim in (2, 4) and up.flatten(1).shape == (weight_shape[0], adapter.rank)
            and down.flatten(1).shape[1] == math.prod(weight_shape[1:]))
    if not fits:
        raise CheckpointError(
            f"{source}: the adapter for {adapter.target.module} has down {tuple(down.shape)} and up "
            f"{tuple(up.shape)}, which do not fit its weight {tuple(weight_shape)}"
        )


def apply_adapters(models: dict, adapters: list[Adapter], scale: float = 1.0, fuse: bool = True,
                   keep_original: bool = False, source: str = "the LoRA") -> LoraHandle:
    """Add the adapters to `models` (in place): merged into the weights, or as forward hooks.
    Every adapter is checked first, so a file that does not fit changes nothing; an error part way
    (an interrupt, memory) takes back what was already applied before it is raised."""
    layers = []
    for adapter in adapters:
        module = models[adapter.target.model].get_submodule(adapter.target.module)
        part = _weight_slice(module.weight, adapter.target.chunk)
        _check_fits(adapter, part.shape, source)
        layers.append((adapter, module, part))
    handle = LoraHandle()
    try:
        for adapter, module, part in layers:
            if not fuse:
                handle._undo.append(module.register_forward_hook(_hook(adapter, scale)).remove)
                continue
            with _editing(part):
                original = part.clone() if keep_original else None
                delta = (scale * adapter.delta(part.shape)).to(part.dtype)
                part += delta
            handle._undo.append(_restore(part, delta, original))
    except BaseException:
        handle.remove()  # whatever stopped it (an inference tensor, an interrupt), the models are as before
        raise
    return handle


def _editing(weight: torch.Tensor):
    """The mode in which `weight` may change in place: weights made under `torch.inference_mode()`
    (models loaded inside it) can only be edited inside it."""
    return torch.inference_mode() if weight.is_inference() else torch.no_grad()


def _restore(part: torch.Tensor, delta: torch.Tensor, original: torch.Tensor | None):
    def undo():
        with _editing(part):
            if original is not None:
                part.copy_(original)
            else:
                part.sub_(delta)

    return undo


def load_lora(models: dict, lora, scale: float = 1.0, fuse: bool = True, keep_original: bool = False) -> LoraHandle:
    """Read a LoRA file (or state dict) and apply it to `models` with `scale`; returns the handle.

    `lora` is a `.safetensors` / `.ckpt` path (read by sdlab's safe readers) or a state dict.
    """
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not torch.isfinite(torch.tensor(float(scale))):
        raise ArgumentError(f"the LoRA scale must be a finite number (1.0 = as trained); got {scale!r}")
    source = "the LoRA state dict"
    if not isinstance(lora, dict):
        from .model_loader import read_checkpoint

        source = f"LoRA file {str(lora)!r}"
        lora, _ = read_checkpoint(lora)
    for key, tensor in lora.items():
        if not key.endswith(".alpha") and not (isinstance(tensor, torch.Tensor) and tensor.is_floating_point()):
            raise CheckpointError(f"{source}: {key} is not a floating-point tensor")
    return apply_adapters(models, parse_lora(lora, models, source), scale, fuse, keep_original, source)


def kohya_names(models: dict) -> dict[tuple[str, str, int | None], str]:
    """`(model, module, chunk)` -> the name kohya's trainer gives that layer: `lora_unet_` + diffusers'
    U-Net name (`lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k`), `lora_te_` +
    the text encoder's original name (`lora_te_text_model_encoder_layers_0_self_attn_q_proj`)."""
    names = {}
    for target, aliases in layer_aliases(models):
        alias = aliases[1] if target.model == "diffusion" else aliases[0]
        prefix = next(p for p, m in KOHYA_PREFIXES.items() if m == target.model)
        names[target.model, target.module, target.chunk] = prefix + alias.replace(".", "_")
    return names


def lora_state_dict(models: dict, adapters: list[Adapter]) -> dict[str, torch.Tensor]:
    """Adapters -> a kohya-format state dict (`<name>.lora_down.weight` (r, in[, k, k]),
    `<name>.lora_up.weight` (out, r[, 1, 1]), `<name>.alpha`), which `load_lora` reads back exactly."""
    names, state = kohya_names(models), {}
    for adapter in adapters:
        where = (adapter.target.model, adapter.target.module, adapter.target.chunk)
        if where not in names:
            raise ArgumentError(f"adapters: {adapter.target} is no linear or convolution layer of these models")
        name = names[where]
        state[name + ".lora_down.weight"] = adapter.down.detach().float().contiguous().clone()
        state[name + ".lora_up.weight"] = adapter.up.detach().float().contiguous().clone()
        state[name + ".alpha"] = torch.tensor(float(adapter.alpha if adapter.alpha is not None else adapter.rank))
    return state


def save_lora(models: dict, adapters: list[Adapter], path, metadata: dict[str, str] | None = None) -> None:
    """Write adapters as a kohya-format `.safetensors` LoRA file (see `lora_state_dict`)."""
    from safetensors.torch import save_file

    save_file(lora_state_dict(models, adapters), str(path), metadata=metadata)
