r"""The VAE decoder: latents (B, 4, H/8, W/8) -> image (B, 3, H, W) in [-1, 1].

Built from two blocks that the encoder shares:

* `VAE_ResidualBlock`: $y = x + \operatorname{Conv}(\operatorname{SiLU}(\operatorname{GN}(
  \operatorname{Conv}(\operatorname{SiLU}(\operatorname{GN}(x))))))$, with a 1x1 convolution on the
  skip path when the width changes.
* `VAE_AttentionBlock`: single-head self-attention over all $h \cdot w$ pixels, so that every
  pixel can look at every other one (used once, at the lowest resolution).

The decoder mirrors the encoder: a middle section at 1/8 resolution, then one stage per
resolution, each doubling the size with nearest-neighbour up-sampling and a 3x3 convolution.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .attention import SelfAttention
from .config import VAEConfig


class VAE_AttentionBlock(nn.Module):
    """Group norm, then single-head self-attention over the pixels, plus the input."""

    def __init__(self, channels: int, n_groups: int = 32, eps: float = 1e-6):
        super().__init__()
        self.groupnorm = nn.GroupNorm(n_groups, channels, eps=eps)
        self.attention = SelfAttention(1, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        y = self.groupnorm(x).view(n, c, h * w).transpose(1, 2)  # (B, C, H, W) -> (B, H*W, C)
        y = self.attention(y)
        y = y.transpose(1, 2).reshape(n, c, h, w)  # (B, H*W, C) -> (B, C, H, W)
        return x + y


class VAE_ResidualBlock(nn.Module):
    """Two (group norm, SiLU, 3x3 conv) steps with a skip connection."""

    def __init__(self, in_channels: int, out_channels: int, n_groups: int = 32, eps: float = 1e-6):
        super().__init__()
        self.groupnorm_1 = nn.GroupNorm(n_groups, in_channels, eps=eps)
        self.conv_1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1)
        self.groupnorm_2 = nn.GroupNorm(n_groups, out_channels, eps=eps)
        self.conv_2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1)
        if in_channels == out_channels:
            self.residual_layer = nn.Identity()
        else:
            self.residual_layer = nn.Conv2d(in_channels, out_channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_1(F.silu(self.groupnorm_1(x)))
        h = self.conv_2(F.silu(self.groupnorm_2(h)))
        return h.add_(self.residual_layer(x))  # in place: one image-sized buffer less at the peak


class Upsample(nn.Module):
    """Nearest-neighbour 2x up-sampling followed by a 3x3 convolution."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class VAEStage(nn.Module):
    """The residual blocks of one resolution, then an optional change of resolution."""

    def __init__(self, blocks: list[nn.Module], resample: nn.Module | None):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.resample = resample if resample is not None else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return self.resample(x)


def vae_middle(channels: int, n_groups: int, eps: float) -> nn.Sequential:
    """Residual block, attention over all pixels, residual block: the VAE's lowest resolution."""
    return nn.Sequential(
        VAE_ResidualBlock(channels, channels, n_groups, eps),
        VAE_AttentionBlock(channels, n_groups, eps),
        VAE_ResidualBlock(channels, channels, n_groups, eps),
    )


class VAE_Decoder(nn.Module):
    """`VAE_Decoder()(latents)` undoes the 0.18215 scale and decodes to an image in [-1, 1]."""

    def __init__(self, config: VAEConfig | None = None):
        super().__init__()
        self.config = config = config or VAEConfig()
        g, eps = config.n_groups, config.eps
        widths = config.channels  # SD1.5: 128, 256, 512, 512
        self.post_quant_conv = nn.Conv2d(config.latent_channels, config.latent_channels, kernel_size=1)
        self.conv_in = nn.Conv2d(config.latent_channels, widths[-1], kernel_size=3, padding=1)
        self.mid = vae_middle(widths[-1], g, eps)
        # One stage per resolution, indexed by level like the encoder's (0 = full resolution),
        # built and run deepest first; every stage but the last one run up-samples.
        stages, width = {}, widths[-1]
        for level in reversed(range(len(widths))):
            out = widths[level]
            blocks = [VAE_ResidualBlock(width if j == 0 else out, out, g, eps) for j in range(config.n_res_blocks + 1)]
            stages[level] = VAEStage(blocks, Upsample(out) if level > 0 else None)
            width = out
        self.up = nn.ModuleList(stages[level] for level in range(len(widths)))
        self.norm_out = nn.GroupNorm(g, width, eps=eps)
        self.conv_out = nn.Conv2d(width, config.in_channels, kernel_size=3, padding=1)

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        x = latents / self.config.scale_factor  # undo the scaling the encoder applied
        x = self.conv_in(self.post_quant_conv(x))  # (B, 4, h, w) -> (B, 512, h, w)
        x = self.mid(x)
        for stage in reversed(self.up):  # (B, 512, h, w) -> ... -> (B, 128, 8h, 8w)
            x = stage(x)
        return self.conv_out(F.silu(self.norm_out(x)))  # (B, 3, 8h, 8w)

    def tiled_forward(self, latents: torch.Tensor, tile_size: int = 32, overlap: int = 8) -> torch.Tensor:
        """Decode in overlapping latent tiles of `tile_size` (default 32 latent pixels = 256 image
        pixels), blended linearly across the `overlap`: peak memory is that of one tile, whatever the
        image size. Not identical to `forward` (each tile's group norms and attention see only that
        tile), but close: tests/test_speed.py bounds the difference.
        """
        if not 0 <= overlap < tile_size:
            raise ValueError(f"overlap must be in [0, tile_size); got overlap={overlap}, tile_size={tile_size}")
        h, w = latents.shape[-2:]
        if h <= tile_size and w <= tile_size:
            return self(latents)
        f = self.config.downscale
        stride = tile_size - overlap

        def starts(n):  # tile origins covering [0, n), the last one flush with the edge
            if n <= tile_size:
                return [0]
            origins = list(range(0, n - tile_size, stride)) + [n - tile_size]
            return sorted(set(origins))

        def ramp(n, lead, trail):  # 1-D blending weights of one tile, in image pixels
            weight = torch.ones(n, dtype=torch.float32)
            for i in range(lead):
                weight[i] = (i + 0.5) / lead
            for i in range(trail):
                weight[n - 1 - i] = min(weight[n - 1 - i].item(), (i + 0.5) / trail)
            return weight

        out = weights = None
        rows, cols = starts(h), starts(w)
        for r, (top, bottom) in zip(rows, _overlaps(rows, tile_size)):
            for c, (left, right) in zip(cols, _overlaps(cols, tile_size)):
                tile = self(latents[..., r : r + tile_size, c : c + tile_size])  # (B, 3, 8t, 8t)
                th, tw = tile.shape[-2:]
                if out is None:
                    out = torch.zeros(*tile.shape[:2], h * f, w * f, dtype=torch.float32, device=tile.device)
                    weights = torch.zeros(h * f, w * f, dtype=torch.float32, device=tile.device)
                # Ramp only the sides shared with a neighbour, across exactly the shared pixels.
                weight = ramp(th, top * f, bottom * f)[:, None] * ramp(tw, left * f, right * f)[None, :]
                weight = weight.to(tile.device)
                out[..., r * f : r * f + th, c * f : c * f + tw] += tile.float() * weight
                weights[r * f : r * f + th, c * f : c * f + tw] += weight
        return (out / weights).to(latents.dtype)


def _overlaps(origins: list[int], tile_size: int) -> list[tuple[int, int]]:
    """For each tile along one axis: how many latent pixels it shares with the previous and the next tile."""
    shared = [max(0, a + tile_size - b) for a, b in zip(origins, origins[1:])]
    return list(zip([0] + shared, shared + [0]))
