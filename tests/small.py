"""A small random model in the original file's layout, for fast tests of loading and the pipeline."""

from __future__ import annotations

import torch

from sdlab import model_loader
from sdlab.config import CLIPConfig, SDConfig, UNetConfig, VAEConfig

SMALL = SDConfig(
    clip=CLIPConfig(n_embd=32, n_head=2, n_layer=2),
    vae=VAEConfig(base_channels=16, channel_mult=(1, 2, 2, 2), n_res_blocks=1, n_groups=8),
    unet=UNetConfig(base_channels=32, channel_mult=(1, 2), attention_levels=(True, False), n_res_blocks=1,
                    n_head=2, d_context=32, n_groups=8, time_dim=32),
)


def small_models(seed: int = 0) -> dict:
    torch.manual_seed(seed)
    return model_loader.build_models(SMALL)


def write_small_checkpoint(path, seed: int = 0) -> dict:
    models = small_models(seed)
    model_loader.save_checkpoint(models, path, SMALL)
    return models
