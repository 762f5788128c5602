"""A small random model in the original file's layout, for fast tests of loading and the pipeline."""

from __future__ import annotations

import torch

from sdlab import model_loader
from sdlab.config import SMALL


def small_models(seed: int = 0) -> dict:
    torch.manual_seed(seed)
    return model_loader.build_models(SMALL)


def write_small_checkpoint(path, seed: int = 0) -> dict:
    models = small_models(seed)
    model_loader.save_checkpoint(models, path, SMALL)
    return models
