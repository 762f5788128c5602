r"""The VAE encoder: image (B, 3, H, W) in [-1, 1] -> scaled latents (B, 4, H/8, W/8).

The encoder predicts a diagonal Gaussian over latents, $q(z \mid x) = \mathcal N(\mu, \sigma^2)$, and
samples it with the *reparameterization trick*, $z = \mu + \sigma \odot \varepsilon$ with
$\varepsilon \sim \mathcal N(0, I)$ supplied by the caller, so the same noise gives the same latents.
The latents are multiplied by 0.18215 so that they have roughly unit variance, which is what the
diffusion model was trained on.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .blocks import Downsample, VAE_ResidualBlock, VAEStage, vae_middle
from .config import VAEConfig


class VAE_Encoder(nn.Module):
    """`VAE_Encoder()(image, noise)` returns the scaled latents sampled with `noise`."""

    def __init__(self, config: VAEConfig | None = None):
        super().__init__()
        self.config = config = config or VAEConfig()
        g, eps = config.n_groups, config.eps
        widths = config.channels  # SD1.5: 128, 256, 512, 512
        self.conv_in = nn.Conv2d(config.in_channels, widths[0], kernel_size=3, padding=1)
        stages, width = [], widths[0]
        for i, out in enumerate(widths):
            blocks = [VAE_ResidualBlock(width if j == 0 else out, out, g, eps) for j in range(config.n_res_blocks)]
            resample = Downsample(out, pad="right_bottom") if i < len(widths) - 1 else None
            stages.append(VAEStage(blocks, resample))
            width = out
        self.down = nn.ModuleList(stages)
        self.mid = vae_middle(width, g, eps)
        self.norm_out = nn.GroupNorm(g, width, eps=eps)
        self.conv_out = nn.Conv2d(width, 2 * config.latent_channels, kernel_size=3, padding=1)
        self.quant_conv = nn.Conv2d(2 * config.latent_channels, 2 * config.latent_channels, kernel_size=1)

    def moments(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        r"""The mean $\mu$ and log-variance $\log\sigma^2$ of $q(z \mid x)$, each (B, 4, H/8, W/8)."""
        x = self.conv_in(x)  # (B, 3, H, W) -> (B, 128, H, W)
        for stage in self.down:  # -> (B, 512, H/8, W/8)
            x = stage(x)
        x = self.conv_out(F.silu(self.norm_out(self.mid(x))))  # (B, 8, H/8, W/8)
        mean, log_variance = self.quant_conv(x).chunk(2, dim=1)
        return mean, log_variance.clamp(-30.0, 20.0)

    def forward(self, x: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        mean, log_variance = self.moments(x)
        stdev = torch.exp(0.5 * log_variance)
        return (mean + stdev * noise) * self.config.scale_factor  # z = (mu + sigma * eps) * 0.18215
