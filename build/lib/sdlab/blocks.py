r"""Layers that more than one model is built from: the VAE's blocks and the resampling layers.

The VAE's encoder and decoder share two blocks:

* `VAE_ResidualBlock`: $y = x + \operatorname{Conv}(\operatorname{SiLU}(\operatorname{GN}(
  \operatorname{Conv}(\operatorname{SiLU}(\operatorname{GN}(x))))))$, with a 1x1 convolution on the
  skip path when the width changes.
* `VAE_AttentionBlock`: single-head self-attention over all $h \cdot w$ pixels, so that every
  pixel can look at every other one (used once, at the lowest resolution, in `vae_middle`).

The VAE and the U-Net share the two changes of resolution:

* `Downsample`: a stride-2 3x3 convolution. The U-Net pads one pixel on every side,
  $H \to \lceil H/2 \rceil$; the VAE encoder pads right and bottom only, as the original model
  does, $H \to \lfloor H/2 \rfloor$ (the same for the even sizes it sees);
* `Upsample`: nearest-neighbour up-sampling, then a 3x3 convolution. It doubles the size, or takes
  the `size` it is given: the U-Net passes the size of the skip connection it is joined to, so
  that latents whose side is not a multiple of 8 (an image that is a multiple of 8 but not of 64)
  come back to the size they went down from (9 -> 17, not 18), as in diffusers.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .attention import SelfAttention


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


class Upsample(nn.Module):
    """Nearest-neighbour up-sampling (2x, or to `size`) followed by a 3x3 convolution."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, padding=1)

    def forward(self, x: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
        """(B, C, H, W) -> (B, C, 2H, 2W), or (B, C, *size) when `size` is given."""
        if size is None:
            x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        else:  # output pixel i copies input pixel floor(i * H / size): the same as 2x where size = 2H
            x = F.interpolate(x, size=tuple(size), mode="nearest")
        return self.conv(x)


class Downsample(nn.Module):
    """A stride-2 3x3 convolution that halves the resolution.

    `pad="same"` (the U-Net's): one pixel of zeros on every side, (B, C, H, W) -> (B, C, ceil(H/2),
    ceil(W/2)). `pad="right_bottom"` (the VAE encoder's, as the original model does): one pixel on
    the right and the bottom only, (B, C, H, W) -> (B, C, floor(H/2), floor(W/2)).
    """

    PADS = ("same", "right_bottom")

    def __init__(self, channels: int, pad: str = "same"):
        super().__init__()
        if pad not in self.PADS:
            raise ValueError(f"unknown pad {pad!r}; choose one of {self.PADS}")
        self.pad = pad
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, stride=2, padding=1 if pad == "same" else 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pad == "right_bottom":
            x = F.pad(x, (0, 1, 0, 1))
        return self.conv(x)
