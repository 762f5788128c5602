"""Sizes of the three Stable Diffusion models, one dataclass per model.

Every class in sdlab takes its sizes from these dataclasses, so the very same code builds the
859-million-parameter SD1.5 U-Net and the tiny models trained in the last chapter. The `SD15`
preset holds the sizes of the official `v1-5-pruned-emaonly` checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field


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
class SDConfig:
    """The three models of one Stable Diffusion checkpoint."""

    clip: CLIPConfig = field(default_factory=CLIPConfig)
    vae: VAEConfig = field(default_factory=VAEConfig)
    unet: UNetConfig = field(default_factory=UNetConfig)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "SDConfig":
        raw = json.loads(text)

        def build(kind, values):
            names = {f.name for f in dataclasses.fields(kind)}
            unknown = set(values) - names
            if unknown:
                raise ValueError(f"unknown {kind.__name__} fields {sorted(unknown)}")
            return kind(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})

        return cls(
            clip=build(CLIPConfig, raw.get("clip", {})),
            vae=build(VAEConfig, raw.get("vae", {})),
            unet=build(UNetConfig, raw.get("unet", {})),
        )


SD15 = SDConfig()
SD15_INPAINTING = SDConfig(unet=UNetConfig(in_channels=9))
