"""Key-renaming rules between the original Stable Diffusion checkpoint and sdlab's modules.

The official `v1-5-pruned-emaonly` file stores one flat dictionary of 1,143 tensors named after the
original CompVis code (`model.diffusion_model.input_blocks.1.0.in_layers.0.weight`, ...). sdlab
names its modules after what they do (`unet.encoders.1.0.groupnorm_feature.weight`). Rather than a
thousand literal lines, the mapping is a short list of rules per model, each a pair of patterns
(`{}` stands for a number) that translate in both directions. Two more things differ:

* **fused projections**: a rule that ends in `in_proj[i].` sends the original separate query, key
  and value weights to chunk `i` of sdlab's single `in_proj` weight (concatenated on dim 0);
* **1x1 convolutions stored for linear layers**: the VAE's attention weights are `[C, C, 1, 1]` in
  the file and `[C, C]` in sdlab; shapes that differ only by trailing 1s are reshaped.

Which models a file holds is data too: `FAMILIES` lists the checkpoint families sdlab recognises
(its own files with their sizes in the metadata, SD 1.x and the SD 1.x inpainting U-Net) and those it
refuses with a clear message (SD 2.x, SDXL), each by a key prefix or one tensor's size.

`load_from_standard_weights(path, device)` keeps the seed's API: it returns one state dict per model.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass

import torch

from .checkpoint_io import quoted, read_checkpoint
from .config import SD15, SD15_INPAINTING, SDConfig
from .errors import CheckpointError

# Which model a key of the original file belongs to: original prefix -> (model, sdlab prefix).
PREFIXES = {
    "cond_stage_model.transformer.text_model.": ("clip", ""),
    "first_stage_model.encoder.": ("encoder", ""),
    "first_stage_model.quant_conv.": ("encoder", "quant_conv."),
    "first_stage_model.decoder.": ("decoder", ""),
    "first_stage_model.post_quant_conv.": ("decoder", "post_quant_conv."),
    "model.diffusion_model.": ("diffusion", ""),
}

# Keys of the original file that no model reads: the DDPM schedule (sdlab recomputes it),
# CLIP's constant position ids and the EMA bookkeeping scalars.
IGNORED = re.compile(
    r"^(betas|alphas_cumprod|alphas_cumprod_prev|sqrt_alphas_cumprod|sqrt_one_minus_alphas_cumprod"
    r"|log_one_minus_alphas_cumprod|sqrt_recip_alphas_cumprod|sqrt_recipm1_alphas_cumprod"
    r"|posterior_variance|posterior_log_variance_clipped|posterior_mean_coef1|posterior_mean_coef2"
    r"|logvar|model_ema\.decay|model_ema\.num_updates"
    r"|cond_stage_model\.transformer\.text_model\.embeddings\.position_ids)$"
)

# Rules: (original pattern, sdlab pattern), applied in order original -> sdlab and in reverse
# order sdlab -> original. A leading "^" anchors a pattern at the start of the key.
CLIP_RULES = [
    ("^embeddings.token_embedding.", "embedding.token_embedding."),
    ("^embeddings.position_embedding.weight", "embedding.position_embedding"),
    ("^encoder.layers.", "layers."),
    (".layer_norm1.", ".layernorm_1."),
    (".layer_norm2.", ".layernorm_2."),
    (".self_attn.q_proj.", ".attention.in_proj[0]."),
    (".self_attn.k_proj.", ".attention.in_proj[1]."),
    (".self_attn.v_proj.", ".attention.in_proj[2]."),
    (".self_attn.out_proj.", ".attention.out_proj."),
    (".mlp.fc1.", ".linear_1."),
    (".mlp.fc2.", ".linear_2."),
    ("^final_layer_norm.", "layernorm."),
]

VAE_RULES = [  # shared by the encoder and the decoder
    ("^mid.block_1.", "mid.0."),
    ("^mid.attn_1.", "mid.1."),
    ("^mid.block_2.", "mid.2."),
    ("^mid.1.norm.", "mid.1.groupnorm."),
    ("^mid.1.q.", "mid.1.attention.in_proj[0]."),
    ("^mid.1.k.", "mid.1.attention.in_proj[1]."),
    ("^mid.1.v.", "mid.1.attention.in_proj[2]."),
    ("^mid.1.proj_out.", "mid.1.attention.out_proj."),
    (".block.", ".blocks."),
    (".norm1.", ".groupnorm_1."),
    (".conv1.", ".conv_1."),
    (".norm2.", ".groupnorm_2."),
    (".conv2.", ".conv_2."),
    (".nin_shortcut.", ".residual_layer."),
]
ENCODER_RULES = VAE_RULES + [(".downsample.", ".resample.")]
DECODER_RULES = VAE_RULES + [(".upsample.", ".resample.")]

DIFFUSION_RULES = [
    ("^time_embed.0.", "time_embedding.linear_1."),
    ("^time_embed.2.", "time_embedding.linear_2."),
    (".0.op.", ".0.conv."),  # the stride-2 convolutions (first layer of their block)
    ("^input_blocks.", "unet.encoders."),
    ("^middle_block.", "unet.bottleneck."),
    ("^output_blocks.", "unet.decoders."),
    # residual blocks
    (".in_layers.0.", ".groupnorm_feature."),
    (".in_layers.2.", ".conv_feature."),
    (".emb_layers.1.", ".linear_time."),
    (".out_layers.0.", ".groupnorm_merged."),
    (".out_layers.3.", ".conv_merged."),
    (".skip_connection.", ".residual_layer."),
    # transformer blocks
    (".norm.", ".groupnorm."),
    (".proj_in.", ".conv_input."),
    (".proj_out.", ".conv_output."),
    (".transformer_blocks.0.norm1.", ".layernorm_1."),
    (".transformer_blocks.0.norm2.", ".layernorm_2."),
    (".transformer_blocks.0.norm3.", ".layernorm_3."),
    (".transformer_blocks.0.attn1.to_q.", ".attention_1.in_proj[0]."),
    (".transformer_blocks.0.attn1.to_k.", ".attention_1.in_proj[1]."),
    (".transformer_blocks.0.attn1.to_v.", ".attention_1.in_proj[2]."),
    (".transformer_blocks.0.attn1.to_out.0.", ".attention_1.out_proj."),
    (".transformer_blocks.0.attn2.to_q.", ".attention_2.q_proj."),
    (".transformer_blocks.0.attn2.to_k.", ".attention_2.k_proj."),
    (".transformer_blocks.0.attn2.to_v.", ".attention_2.v_proj."),
    (".transformer_blocks.0.attn2.to_out.0.", ".attention_2.out_proj."),
    (".transformer_blocks.0.ff.net.0.proj.", ".linear_geglu_1."),
    (".transformer_blocks.0.ff.net.2.", ".linear_geglu_2."),
    ("^out.0.", "final.groupnorm."),
    ("^out.2.", "final.conv."),
]

RULES = {"clip": CLIP_RULES, "encoder": ENCODER_RULES, "decoder": DECODER_RULES, "diffusion": DIFFUSION_RULES}
MODELS = tuple(RULES)
_CHUNK = re.compile(r"\[(\d)\]\.")


@functools.cache
def _compile(pattern: str) -> tuple[re.Pattern, str]:
    """A rule pattern as a regex (`{}` captures a number) and as a replacement template."""
    anchored = pattern.startswith("^")
    body = pattern.lstrip("^")
    parts = body.split("{}")
    regex = ("^" if anchored else "") + r"(\d+)".join(re.escape(p) for p in parts)
    replacement = "".join(p + (rf"\g<{i + 1}>" if i < len(parts) - 1 else "") for i, p in enumerate(parts))
    return re.compile(regex), replacement


def rename(key: str, rules, to_sdlab: bool = True) -> str:
    """Apply `rules` to one key, original -> sdlab (or back with `to_sdlab=False`)."""
    for source, target in rules if to_sdlab else reversed(rules):
        if not to_sdlab:
            source, target = target, source
        regex, _ = _compile(source)
        _, replacement = _compile(target)
        key = regex.sub(replacement, key)
    return key


@functools.lru_cache(maxsize=8192)
def split_model(key: str) -> tuple[str, str] | None:
    """An original key -> (model name, key inside that model after renaming), or None if foreign."""
    for prefix, (model, local_prefix) in PREFIXES.items():
        if key.startswith(prefix):
            return model, rename(local_prefix + key[len(prefix):], RULES[model])
    return None


def convert(state_dict: dict) -> tuple[dict, list[str], list[str]]:
    """Rename an original checkpoint's tensors to sdlab's, per model.

    Returns `(models, ignored, unknown)`: `models[name][key]` is a tensor, `ignored` the known keys
    that no model reads, `unknown` keys that belong to no model. The VAE's attention weights, 1x1
    convolutions `[C, C, 1, 1]` in the file, become sdlab's linear `[C, C]` (`to_standard` undoes it).
    Tensors are popped from `state_dict` as they are converted, so memory is not held twice.
    """
    models: dict[str, dict] = {name: {} for name in MODELS}
    chunks: dict[tuple[str, str], dict[int, torch.Tensor]] = {}
    ignored, unknown = [], []
    for key in list(state_dict):
        if IGNORED.match(key):
            ignored.append(key)
            state_dict.pop(key)
            continue
        found = split_model(key)
        if found is None:
            unknown.append(key)
            continue
        model, local = found
        tensor = state_dict.pop(key)
        if _is_vae_attention(model, local) and tensor.ndim == 4 and tensor.shape[2:] == (1, 1):
            tensor = tensor[:, :, 0, 0]  # (C, C, 1, 1) -> (C, C)
        match = _CHUNK.search(local)
        if match:  # one of q, k, v: gathered, then concatenated into in_proj
            chunks.setdefault((model, _CHUNK.sub(".", local)), {})[int(match.group(1))] = tensor
        else:
            models[model][local] = tensor
    while chunks:
        (model, local), parts = chunks.popitem()
        pieces = [parts[i] for i in sorted(parts)]
        if len({tuple(p.shape[1:]) for p in pieces}) > 1:
            shapes = ", ".join(f"{original_key(model, _fused_chunk(local, i))} {tuple(p.shape)}"
                               for i, p in sorted(parts.items()))
            raise CheckpointError(f"the q, k and v weights that sdlab fuses into {model}.{local} do not fit together: {shapes}")
        models[model][local] = torch.cat(pieces, dim=0)
    return models, ignored, unknown


def _is_vae_attention(model: str, local: str) -> bool:
    """The VAE's mid-block attention: stored as 1x1 convolutions, held by sdlab as linear layers."""
    return model in ("encoder", "decoder") and local.startswith("mid.1.attention.") and local.endswith(".weight")


def join_model(model: str, key: str) -> str:
    """(model name, original key inside it) -> the full original key, e.g. with `first_stage_model.`."""
    candidates = [(p, local) for p, (m, local) in PREFIXES.items() if m == model and key.startswith(local)]
    prefix, local = max(candidates, key=lambda c: len(c[1]))  # `quant_conv.` beats the empty prefix
    return prefix + key[len(local):]


def original_key(model: str, local: str) -> str:
    """sdlab's key `local` inside `model` -> the original file's key: the inverse of `split_model`.

    One chunk of a fused projection is named `...in_proj[i].weight` (`i` = 0, 1, 2 for q, k, v).
    """
    return join_model(model, rename(local, RULES[model], to_sdlab=False))


def original_keys(model: str, local: str) -> list[str]:
    """Like `original_key`, but a fused `in_proj` key gives the three original keys it is made of."""
    if ".in_proj." not in local:
        return [original_key(model, local)]
    return [original_key(model, _fused_chunk(local, i)) for i in range(3)]


def _fused_chunk(local: str, i: int) -> str:
    """`...in_proj.weight` -> the name of its chunk `i` (0, 1, 2 = q, k, v), `...in_proj[i].weight`."""
    return local.replace(".in_proj.", f".in_proj[{i}].")


def to_standard(models: dict) -> dict:
    """The inverse of `convert`: `{model name: nn.Module or state dict}` -> one dict with the original keys.

    Fused `in_proj` weights are split back into q, k, v, and the VAE's attention weights are
    written as 1x1 convolutions `[C, C, 1, 1]`, as in the original file.
    """
    out = {}
    for model, module in models.items():
        state = module.state_dict() if hasattr(module, "state_dict") else module
        for local, tensor in state.items():
            fused = ".in_proj." in local
            for key, piece in zip(original_keys(model, local), tensor.chunk(3, dim=0) if fused else [tensor]):
                if _is_vae_attention(model, local) and piece.ndim == 2:
                    piece = piece[:, :, None, None]  # (C, C) -> (C, C, 1, 1)
                out[key] = piece.contiguous()
    return out


# --- checkpoint families ----------------------------------------------------------------------

CONFIG_METADATA_KEY = "sdlab_config"
SUPPORTED = "Stable Diffusion v1.x (v1-5-pruned-emaonly and its fp16 / inpainting variants) or an sdlab tiny model"
CONV_IN = "model.diffusion_model.input_blocks.0.0.weight"
CROSS_ATTENTION_K = "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"


@dataclass(frozen=True)
class Family:
    """One kind of checkpoint, recognised by a metadata key, a key prefix, or one tensor's size.

    `shape = (key, dim, size)` matches when that tensor's size along `dim` is `size` (`not_size`:
    is anything but it). `config` is what sdlab builds for it; `None` means sdlab refuses the family.
    """

    name: str
    description: str
    config: SDConfig | None = None
    metadata: str | None = None
    prefix: str | None = None
    shape: tuple[str, int, int] | None = None
    not_size: bool = False

    def matches(self, shapes: dict, metadata: dict) -> bool:
        if self.metadata is not None:
            return self.metadata in metadata
        if self.prefix is not None:
            return any(key.startswith(self.prefix) for key in shapes)
        key, dim, size = self.shape
        found = shapes.get(key)
        return found is not None and len(found) > dim and (found[dim] != size if self.not_size else found[dim] == size)


FAMILIES = (
    Family("sdlab", "an sdlab model (its sizes in the sdlab_config metadata)", metadata=CONFIG_METADATA_KEY),
    Family("SDXL", "an SDXL checkpoint (conditioner.embedders.* keys)", prefix="conditioner.embedders."),
    Family("SD2.x", "a Stable Diffusion 2.x checkpoint (OpenCLIP text encoder, cond_stage_model.model.* keys)",
           prefix="cond_stage_model.model."),
    Family("SD2.x U-Net", "a checkpoint whose cross-attention reads {size}-wide text embeddings (SD 2.x uses 1024)",
           shape=(CROSS_ATTENTION_K, 1, 768), not_size=True),
    Family("SD1.x inpainting", "the SD 1.x inpainting model (9-channel U-Net input)", SD15_INPAINTING,
           shape=(CONV_IN, 1, 9)),
    Family("SD1.x", "a Stable Diffusion 1.x checkpoint", SD15, prefix="model.diffusion_model."),
)


def detect_family(tensors: dict, metadata: dict, source: str = "the checkpoint") -> tuple[Family, SDConfig]:
    """The first family of `FAMILIES` that matches -> (family, the config to build), else an error.

    `tensors` maps each key to something with a `.shape` (a tensor, a `checkpoint_io.TensorInfo`).
    """
    shapes = {key: tuple(value.shape) for key, value in tensors.items()}
    family = next((f for f in FAMILIES if f.matches(shapes, metadata)), None)
    if family is None:
        sample = ", ".join(list(shapes)[:5]) or "no tensors at all"
        raise CheckpointError(f"{source} has no Stable Diffusion U-Net (keys such as {sample}); sdlab supports {SUPPORTED}")
    if family.metadata is not None:
        return family, SDConfig.from_json(metadata[family.metadata], source=source)
    if family.config is None:
        size = shapes.get(family.shape[0], (0, 0))[family.shape[1]] if family.shape else None
        raise CheckpointError(f"{source} is {family.description.format(size=size)}; sdlab supports {SUPPORTED}")
    return family, family.config


def detect_config(tensors: dict, metadata: dict, source: str = "the checkpoint") -> SDConfig:
    """The model sizes: from sdlab's own metadata, else from the family the keys and shapes show."""
    return detect_family(tensors, metadata, source)[1]


def load_from_standard_weights(input_file, device="cpu") -> dict:
    """The seed's entry point: `{"clip", "encoder", "decoder", "diffusion"}` -> state dicts (no checks
    of missing keys or shapes: `model_loader.preload_models_from_standard_weights` does those)."""
    state_dict, metadata = read_checkpoint(input_file)
    detect_config(state_dict, metadata, source=quoted(input_file))
    converted, _, unknown = convert(state_dict)
    if unknown:
        raise CheckpointError(f"{len(unknown)} keys of {quoted(input_file)} belong to no Stable Diffusion v1 model, "
                              f"e.g. {unknown[:5]}")
    return {name: {k: v.to(device) for k, v in tensors.items()} for name, tensors in converted.items()}
