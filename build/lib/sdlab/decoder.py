r"""The VAE decoder: latents (B, 4, H/8, W/8) -> image (B, 3, H, W) in [-1, 1].

Built from the blocks that the encoder shares (`sdlab.blocks`: `VAE_ResidualBlock`,
`VAE_AttentionBlock`). The decoder mirrors the encoder: a middle section at 1/8 resolution, then one
stage per resolution, each doubling the size with nearest-neighbour up-sampling and a 3x3 convolution.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# VAE_AttentionBlock and VAE_ResidualBlock are imported from here by the seed's code.
from .blocks import Upsample, VAE_AttentionBlock, VAE_ResidualBlock, VAEStage, vae_middle
from .config import VAEConfig
from .errors import ArgumentError

__all__ = ["VAE_Decoder", "VAE_AttentionBlock", "VAE_ResidualBlock", "Upsample"]


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
            raise ArgumentError(f"overlap must be in [0, tile_size); got overlap={overlap}, tile_size={tile_size}")
        h, w = latents.shape[-2:]
        if h <= tile_size and w <= tile_size:
            return self(latents)
        f = self.config.downscale
        out = weights = None
        rows, cols = _tile_starts(h, tile_size, overlap), _tile_starts(w, tile_size, overlap)
        for r, (top, bottom) in zip(rows, _overlaps(rows, tile_size)):
            for c, (left, right) in zip(cols, _overlaps(cols, tile_size)):
                tile = self(latents[..., r : r + tile_size, c : c + tile_size])  # (B, 3, 8t, 8t)
                th, tw = tile.shape[-2:]
                if out is None:
                    out = torch.zeros(*tile.shape[:2], h * f, w * f, dtype=torch.float32, device=tile.device)
                    weights = torch.zeros(h * f, w * f, dtype=torch.float32, device=tile.device)
                # Ramp only the sides shared with a neighbour, across exactly the shared pixels.
                weight = _ramp(th, top * f, bottom * f)[:, None] * _ramp(tw, left * f, right * f)[None, :]
                weight = weight.to(tile.device)
                out[..., r * f : r * f + th, c * f : c * f + tw] += tile.float() * weight
                weights[r * f : r * f + th, c * f : c * f + tw] += weight
        return (out / weights).to(latents.dtype)


def _tile_starts(n: int, tile_size: int, overlap: int) -> list[int]:
    """Tile origins covering [0, n) every `tile_size - overlap`, the last one flush with the edge."""
    if n <= tile_size:
        return [0]
    origins = list(range(0, n - tile_size, tile_size - overlap)) + [n - tile_size]
    return sorted(set(origins))


def _ramp(n: int, lead: int, trail: int) -> torch.Tensor:
    """1-D blending weights of one tile of `n` image pixels, rising over the first `lead` pixels and
    falling over the last `trail` (the pixels it shares with its neighbours)."""
    weight = torch.ones(n, dtype=torch.float32)
    for i in range(lead):
        weight[i] = (i + 0.5) / lead
    for i in range(trail):
        weight[n - 1 - i] = min(weight[n - 1 - i].item(), (i + 0.5) / trail)
    return weight


def _overlaps(origins: list[int], tile_size: int) -> list[tuple[int, int]]:
    """For each tile along one axis: how many latent pixels it shares with the previous and the next tile."""
    shared = [max(0, a + tile_size - b) for a, b in zip(origins, origins[1:])]
    return list(zip([0] + shared, shared + [0]))
