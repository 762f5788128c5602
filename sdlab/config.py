"""Sizes of the three Stable Diffusion models, one dataclass per model.

Every class in sdlab takes its sizes from these dataclasses, so the very same code builds the
859-million-parameter SD1.5 U-Net and the tiny models trained in the last chapter. The `SD15`
preset holds the sizes of the official `v1-5-pruned-emaonly` checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field

from .errors import CheckpointError


@dataclass(frozen=True)
class CLIPConfig:
    """The CLIP ViT-L/14 text encoder (a causal transformer over 77 BPE tokens)."""

    n_vocab: int = 49408
    n_embd: int = 768
    n_token: int = 77
    n_head: int = 12
    n_layer: int = 12
    layer_norm_eps: float = 1e-5


@dataclass(frozen=True)
class VAEConfig:
    """The KL autoencoder: 8x down-sampling (3 stride-2 stages) into 4 latent channels."""

    in_channels: int = 3
    base_channels: int = 128
    channel_mult: tuple[int, ...] = (1, 2, 4, 4)
    n_res_blocks: int = 2
    latent_channels: int = 4
    n_groups: int = 32
    eps: float = 1e-6
    scale_factor: float = 0.18215  # from the model config; not stored in the checkpoint

    @property
    def channels(self) -> list[int]:
        return [self.base_channels * m for m in self.channel_mult]

    @property
    def downscale(self) -> int:
        return 2 ** (len(self.channel_mult) - 1)


@dataclass(frozen=True)
class TAESDConfig:
    """The tiny autoencoder's decoder (TAESD, `sdlab.taesd`): the VAE's latent space, 1/18 of its work.

    `blocks[i]` residual blocks of `width` channels at each resolution, deepest first, with a 2x
    nearest-neighbour up-sampling between two resolutions: 8x in all for four of them.
    """

    latent_channels: int = 4
    in_channels: int = 3  # the image's channels, named as in VAEConfig
    width: int = 64
    blocks: tuple[int, ...] = (3, 3, 3, 1)
    latent_magnitude: float = 3.0  # the soft clamp: z -> 3 tanh(z / 3)

    @property
    def downscale(self) -> int:
        return 2 ** (len(self.blocks) - 1)


@dataclass(frozen=True)
class UNetConfig:
    """The noise-prediction U-Net with cross-attention to the text encoder's output."""

    in_channels: int = 4  # 9 for the inpainting U-Net (latents + mask + masked-image latents)
    out_channels: int = 4
    base_channels: int = 320
    channel_mult: tuple[int, ...] = (1, 2, 4, 4)
    attention_levels: tuple[bool, ...] = (True, True, True, False)
    n_res_blocks: int = 2
    n_head: int = 8
    d_context: int = 768
    n_groups: int = 32
    time_dim: int = 320  # width of the sinusoidal time embedding; the MLP maps it to 4x

    @property
    def channels(self) -> list[int]:
        return [self.base_channels * m for m in self.channel_mult]


@dataclass(frozen=True)
class SamplingDefaults:
    """What `generate` uses for an argument that is not given: the settings this model was made for.

    SD1.5's are the seed's defaults (512x512, DDPM, 50 steps, guidance 7.5); for a faster image pass
    `sampler_name="dpmpp_2m", n_inference_steps=20` (`--sampler dpmpp_2m --steps 20`).
    """

    height: int = 512
    width: int = 512
    sampler: str = "ddpm"
    steps: int = 50
    cfg_scale: float = 7.5


@dataclass(frozen=True)
class SDConfig:
    """The three models of one Stable Diffusion checkpoint, and the settings to sample them with."""

    clip: CLIPConfig = field(default_factory=CLIPConfig)
    vae: VAEConfig = field(default_factory=VAEConfig)
    unet: UNetConfig = field(default_factory=UNetConfig)
    sampling: SamplingDefaults = field(default_factory=SamplingDefaults)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str, source: str = "the config") -> SDConfig:
        """The config written by `to_json`, checked field by field (`CheckpointError` naming `source`).

        Unknown or ill-typed fields and out-of-range sizes are refused before any module is built;
        missing fields take their defaults.
        """
        try:
            raw = json.loads(text, parse_constant=_no_constant)
        except (TypeError, ValueError) as error:
            raise CheckpointError(f"the {_METADATA} of {source} is not valid JSON ({str(error)[:120]})") from None
        if not isinstance(raw, dict):
            raise CheckpointError(f"the {_METADATA} of {source} is a JSON {type(raw).__name__}, not an object")
        sections = {f.name: f.default_factory for f in dataclasses.fields(cls)}
        unknown = sorted(set(raw) - set(sections), key=str)
        if unknown:
            raise CheckpointError(f"the {_METADATA} of {source} has unknown sections {unknown}; expected {sorted(sections)}")
        config = cls(**{name: _build(kind, raw.get(name, {}), f"{source}: {name}") for name, kind in sections.items()})
        check_ranges(config, source)
        return config


_METADATA = "sdlab_config metadata"


def _no_constant(name):
    raise ValueError(f"{name} is not allowed")


def _build(kind, values, where: str):
    """One section of the JSON -> the dataclass `kind`, every value of the field's exact type."""
    if not isinstance(values, dict):
        raise CheckpointError(f"{where} must be a JSON object, not {type(values).__name__}")
    fields = {f.name: f for f in dataclasses.fields(kind)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise CheckpointError(f"{where} has unknown fields {unknown}; expected some of {sorted(fields)}")
    return kind(**{name: _typed(value, fields[name].type, f"{where}.{name}") for name, value in values.items()})


def _typed(value, annotation: str, where: str):
    """`value` checked against a field annotation (`int`, `float`, `str`, `tuple[int, ...]`, `tuple[bool, ...]`)."""
    if annotation.startswith("tuple["):
        item = annotation[len("tuple["):].split(",")[0]
        if not isinstance(value, list) or not value:
            raise CheckpointError(f"{where} must be a non-empty list of {item}, not {value!r:.60}")
        return tuple(_typed(v, item, where) for v in value)
    types = {"int": (int,), "float": (int, float), "str": (str,), "bool": (bool,)}[annotation]
    if isinstance(value, bool) != (annotation == "bool") or not isinstance(value, types):
        raise CheckpointError(f"{where} must be {annotation}, not {value!r:.60}")
    return float(value) if annotation == "float" else value


#: (low, high) for every integer field; the limits keep building the models quick (n_layer=100000 is refused)
INT_RANGES = {
    "n_vocab": (1, 1_000_000), "n_embd": (1, 8192), "n_token": (1, 1024), "n_head": (1, 128), "n_layer": (1, 64),
    "in_channels": (1, 64), "out_channels": (1, 64), "base_channels": (1, 4096), "n_res_blocks": (1, 8),
    "latent_channels": (1, 64), "n_groups": (1, 1024), "d_context": (1, 8192), "time_dim": (2, 8192),
    "channel_mult": (1, 64), "height": (8, 8192), "width": (8, 8192), "steps": (1, 1000),
}
FLOAT_RANGES = {"layer_norm_eps": (1e-12, 1.0), "eps": (1e-12, 1.0), "scale_factor": (1e-6, 100.0), "cfg_scale": (0.0, 100.0)}


def check_ranges(config: SDConfig, source: str = "the config") -> None:
    """Every size within `INT_RANGES`/`FLOAT_RANGES`, and the sizes consistent with each other."""
    problems = []
    for section in ("clip", "vae", "unet", "sampling"):
        for f in dataclasses.fields(getattr(config, section)):
            value = getattr(getattr(config, section), f.name)
            for v in value if isinstance(value, tuple) else (value,):
                low, high = INT_RANGES.get(f.name) or FLOAT_RANGES.get(f.name) or (None, None)
                if low is not None and not low <= v <= high:
                    problems.append(f"{section}.{f.name}={value} (expected {low}..{high})")
    problems += _inconsistencies(config)
    if problems:
        raise CheckpointError(f"the {_METADATA} of {source} describes models sdlab cannot build: " + "; ".join(problems[:5]))


def _inconsistencies(config: SDConfig) -> list[str]:
    clip, vae, unet, sampling = config.clip, config.vae, config.unet, config.sampling
    checks = [
        (clip.n_embd % clip.n_head == 0, "clip.n_embd must be a multiple of clip.n_head"),
        (len(vae.channel_mult) <= 8 and len(unet.channel_mult) <= 8, "channel_mult has at most 8 levels"),
        (all(c % vae.n_groups == 0 for c in vae.channels), "vae channels must be multiples of vae.n_groups"),
        (all(c % unet.n_groups == 0 for c in unet.channels), "unet channels must be multiples of unet.n_groups"),
        (all(c % unet.n_head == 0 for c in unet.channels), "unet channels must be multiples of unet.n_head"),
        (len(unet.attention_levels) == len(unet.channel_mult), "unet.attention_levels needs one entry per level"),
        (unet.d_context == clip.n_embd, "unet.d_context must equal clip.n_embd (it reads CLIP's output)"),
        (unet.time_dim % 2 == 0, "unet.time_dim must be even (cosines and sines)"),
        (unet.out_channels == vae.latent_channels, "unet.out_channels must equal vae.latent_channels"),
        (unet.in_channels in (vae.latent_channels, 2 * vae.latent_channels + 1),
         "unet.in_channels must be the latent channels (or 2x + 1 for inpainting)"),
        (sampling.height % 8 == 0 and sampling.width % 8 == 0, "sampling height and width must be multiples of 8"),
        (bool(sampling.sampler), "sampling.sampler must name a sampler"),
    ]
    return [message for ok, message in checks if not ok]


SD15 = SDConfig()
SD15_INPAINTING = SDConfig(unet=UNetConfig(in_channels=9))

#: The tiny model of `sdlab/data/tiny.safetensors` (`sdlab.tiny`, `python -m sdlab train`): the same classes
#: as SD1.5; the VAE keeps 3 down-sampling stages (8x: 64x64 Shapes images -> 8x8x4 latents) and 4 latent
#: channels; the real CLIP tokenizer and vocabulary. Sampled at 64x64 with DPM++ 2M, 20 steps, CFG 2.5: with stronger
#: guidance it gets more colours wrong, most of all in two-object prompts (`python -m sdlab evaluate --cfg-scale S`).
TINY = SDConfig(
    clip=CLIPConfig(n_vocab=49408, n_embd=64, n_token=77, n_head=4, n_layer=2),
    vae=VAEConfig(base_channels=16, channel_mult=(1, 1, 2, 4), n_res_blocks=1, latent_channels=4, n_groups=8,
                  scale_factor=1.0),  # the scale factor is measured after VAE training
    unet=UNetConfig(in_channels=4, out_channels=4, base_channels=32, channel_mult=(1, 2, 2),
                    attention_levels=(True, True, True), n_res_blocks=1, n_head=4, d_context=64,
                    n_groups=8, time_dim=64),
    sampling=SamplingDefaults(height=64, width=64, sampler="dpmpp_2m", steps=20, cfg_scale=2.5),
)

#: A small random model for fast tests of loading and the pipeline (tests/small.py builds and writes it).
SMALL = SDConfig(
    clip=CLIPConfig(n_embd=32, n_head=2, n_layer=2),
    vae=VAEConfig(base_channels=16, channel_mult=(1, 2, 2, 2), n_res_blocks=1, n_groups=8),
    unet=UNetConfig(base_channels=32, channel_mult=(1, 2), attention_levels=(True, False), n_res_blocks=1,
                    n_head=2, d_context=32, n_groups=8, time_dim=32),
)
