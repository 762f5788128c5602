"""A random checkpoint in the real SD1.5 layout, made from the reference libraries' own models.

The random file is made from the reference models (`sdlab.reference`) with their own
initialisation (which keeps activations O(1)), written under the original keys found through
diffusers' single-file converter. The reference side then loads that file back through the same
converter, while sdlab loads it through its own rules: two independent key mappings that must agree.
The reference models, configs and pipelines themselves live in `sdlab.reference` (shared with
`python -m sdlab bench`); the names the tests import from here are re-exported.
"""

from __future__ import annotations

from pathlib import Path

import torch

from sdlab.reference import (  # noqa: F401  (re-exported for the tests)
    SCHEDULER_CONFIG,
    diffusers_conversions,
    diffusers_scheduler,
    empty_reference_models,
    reference_configs,
    reference_pipeline,
    reference_tokenizer,
)

MANIFEST = Path(__file__).resolve().parents[1].parent / "shared" / "sd15" / "manifest.tsv"
MANIFEST_EXTRA = MANIFEST.with_name("manifest_extra.tsv")
SCHEDULE_KEYS = (
    "betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod",
    "posterior_variance", "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2",
)


def manifest_path() -> Path:
    for candidate in (MANIFEST, Path.cwd().parent / "shared" / "sd15" / "manifest.tsv"):
        if candidate.exists():
            return candidate
    raise FileNotFoundError(f"the SD1.5 manifest is expected at {MANIFEST}")


def read_manifest(path=None) -> dict[str, tuple[tuple[int, ...], str]]:
    """key -> (shape, dtype name), in file order."""
    rows = {}
    for line in Path(path or manifest_path()).read_text().splitlines():
        key, shape, dtype = line.split("\t")
        rows[key] = (tuple(int(s) for s in shape.strip("[]").split(",") if s.strip()), dtype)
    return rows


def schedule_buffers() -> dict[str, torch.Tensor]:
    """The 12 DDPM buffers that the original LatentDiffusion model stores (float32 [1000])."""
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
    alphas_cumprod = torch.cumprod(1 - betas, 0)
    prev = torch.cat([torch.ones(1, dtype=torch.float64), alphas_cumprod[:-1]])
    posterior_variance = betas * (1 - prev) / (1 - alphas_cumprod)
    values = [
        betas, alphas_cumprod, prev, alphas_cumprod.sqrt(), (1 - alphas_cumprod).sqrt(),
        (1 - alphas_cumprod).log(), (1 / alphas_cumprod).sqrt(), (1 / alphas_cumprod - 1).sqrt(),
        posterior_variance, posterior_variance.clamp(min=1e-20).log(),
        betas * prev.sqrt() / (1 - alphas_cumprod), (1 - prev) * (1 - betas).sqrt() / (1 - alphas_cumprod),
    ]
    return {k: v.float() for k, v in zip(SCHEDULE_KEYS, values)}


def random_sd15_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    """A random checkpoint with exactly the real file's keys, shapes and dtypes."""
    manifest = read_manifest()
    torch.manual_seed(seed)
    clip, unet, vae = empty_reference_models()
    # Which original key does each reference parameter come from? Tag every original tensor with
    # its index and see where diffusers' converter puts it.
    model_keys = [k for k in manifest if not k.startswith(SCHEDULE_KEYS) and not k.endswith("position_ids")]
    tags = {k: torch.tensor(float(i)).expand(manifest[k][0]) for i, k in enumerate(model_keys)}
    origin = {}
    for prefix, converted in zip(("clip", "unet", "vae"), diffusers_conversions(tags, unet, vae)):
        for key, tagged in converted.items():
            origin[(prefix, key)] = model_keys[int(tagged.reshape(-1)[0])]
    state = {}
    for prefix, model in (("clip", clip), ("unet", unet), ("vae", vae)):
        for key, tensor in model.state_dict().items():
            if (prefix, key) not in origin:
                continue  # e.g. transformers' position_ids buffer
            original = origin[(prefix, key)]
            state[original] = tensor.detach().reshape(manifest[original][0]).contiguous()
    del clip, unet, vae
    state.update(schedule_buffers())
    state["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.arange(77)[None]
    missing = set(manifest) - set(state)
    if missing:
        raise AssertionError(f"the random checkpoint lacks {sorted(missing)[:5]}")
    return {k: state[k] for k in manifest}  # file order
