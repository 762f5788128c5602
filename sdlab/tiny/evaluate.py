r"""How well the tiny model follows prompts: generate many Shapes images at once, read them back.

`evaluate_checkpoint` (`python -m sdlab evaluate`) loads a checkpoint through the public loader,
generates one image per held-out prompt (every one uses an attribute combination never seen in
training) for several samplers and step counts, reads each image back with `sdlab.tiny.analyzer`
and reports the fraction right per attribute; then the same on train-split prompts and on the
`prompt_families` (plain prompts such as "a red circle", two-object prompts with a held-out
pair, held-out scenes said in free words), the VAE's reconstruction PSNR and the time of one
64x64 image through `pipeline.generate`.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch

from ..model_loader import DEFAULT_CHECKPOINT, preload_models_from_standard_weights
from ..samplers import make_sampler
from .data import (
    COLOURS,
    HELDOUT_COLOUR_SHAPE,
    IMAGE_SIZE,
    SHAPES,
    ShapesDataset,
    heldout_prompts,
    paraphrase,
    sample_scenes,
    to_tensor,
    train_prompts,
)

DEFAULT_RUNS = (("dpmpp_2m", 20), ("dpmpp_2m", 10), ("ddim", 20), ("ddim", 50), ("euler", 20), ("euler_a", 20),
                ("ddpm", 50))


def count_parameters(models: dict) -> dict[str, int]:
    return {name: sum(p.numel() for p in m.parameters()) for name, m in models.items()}


def psnr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    r"""PSNR in dB per image, for images in [-1, 1] (peak-to-peak 2): $10 \log_{10}(2^2 / \mathrm{MSE})$."""
    mse = ((a.clamp(-1, 1) - b) ** 2).flatten(1).mean(1)
    return 10 * torch.log10(4.0 / mse.clamp_min(1e-10))


@torch.no_grad()
def vae_psnr(encoder, decoder, images: torch.Tensor, batch: int = 100) -> float:
    """Mean reconstruction PSNR (dB, 8-bit quantised output) using the posterior mean."""
    values = []
    for i in range(0, len(images), batch):
        x = images[i : i + batch]
        mean, _ = encoder.moments(x)
        recon = decoder(mean * decoder.config.scale_factor)
        recon = ((recon.clamp(-1, 1) + 1) * 127.5).round() / 127.5 - 1
        values.append(psnr(recon, x))
    return float(torch.cat(values).mean())


@torch.no_grad()
def generate_batch(models: dict, prompts: list[str], seeds: list[int], sampler_name: str = "dpmpp_2m",
                   n_inference_steps: int = 20, cfg_scale: float | None = None, tokenizer=None, size: int = IMAGE_SIZE,
                   sampler_seed: int = 0) -> np.ndarray:
    """Images (B, size, size, 3) uint8 for many prompts at once, through the stages of `pipeline.generate`
    (`cfg_scale=None`: the model's own, as `generate` picks it: `pipeline.sampling_settings`).

    As `generate`: initial noise `torch.randn` from a CPU generator seeded with each prompt's seed
    (so deterministic samplers give the same images as `generate`), CFG with the empty prompt, the
    same sampler classes and the same loop (`pipeline.denoise`). Stochastic samplers (ddpm, euler_a)
    draw their per-step noise from one generator for the whole batch instead.
    """
    from ..pipeline import decode, denoise, encode_prompts, sampling_settings, to_uint8
    from ..tokenizer import load_tokenizer

    tokenizer = tokenizer or load_tokenizer()
    clip, decoder, diffusion = models["clip"], models["decoder"], models["diffusion"]
    vae = decoder.config
    shape = (1, vae.latent_channels, size // vae.downscale, size // vae.downscale)
    noise = torch.cat([torch.randn(shape, generator=torch.Generator().manual_seed(s)) for s in seeds])
    context = encode_prompts(tokenizer, clip, list(prompts) + [""], "cpu")  # (B + 1, 77, d)
    cond, uncond = context[:-1], context[-1:].expand(len(prompts), -1, -1)
    context = torch.cat([cond, uncond])  # (2B, 77, d): the prompts, then B copies of the empty prompt
    sampler = make_sampler(sampler_name, torch.Generator().manual_seed(sampler_seed))
    sampler.set_inference_timesteps(n_inference_steps)
    cfg_scale = sampling_settings(models, cfg_scale=cfg_scale)["cfg_scale"]
    latents = denoise(diffusion, sampler, noise * sampler.init_noise_sigma, context, cfg_scale)
    return to_uint8(decode(decoder, latents))


def evaluate_models(models: dict, prompts: list[str], seeds: list[int], runs, cfg_scale: float | None = None,
                    batch: int = 100, log=print) -> list[dict]:
    """Analyzer accuracy per attribute for each (sampler, steps) in `runs` (`cfg_scale=None`: the model's)."""
    from ..pipeline import sampling_settings
    from ..tokenizer import load_tokenizer
    from .analyzer import evaluate

    tokenizer = load_tokenizer()
    cfg_scale = sampling_settings(models, cfg_scale=cfg_scale)["cfg_scale"]
    results = []
    for sampler_name, steps in runs:
        t = time.time()
        images = np.concatenate([
            generate_batch(models, prompts[i : i + batch], seeds[i : i + batch], sampler_name, steps, cfg_scale,
                           tokenizer)
            for i in range(0, len(prompts), batch)
        ])
        figures = evaluate(prompts, images)
        row = {"sampler": sampler_name, "steps": steps, "cfg_scale": cfg_scale,
               **{k: round(v, 4) for k, v in figures.items()}, "seconds": round(time.time() - t, 1)}
        names = [k for k in ("colour", "shape", "size", "position", "count", "relation", "all") if k in row]
        log(f"{sampler_name:>16s} {steps:3d} steps: " + ", ".join(f"{k} {row[k]:.3f}" for k in names))
        results.append(row)
    return results


def prompt_families(n: int, seed: int = 0) -> dict[str, list[str]]:
    """`n` prompts of each family the report measures besides the template held-out prompts:

    - `plain`: "a red circle", every colour and shape (the held-out pairs too) in turn, no size, no
      position, as a reader types first;
    - `plain_heldout_pairs`: the same for the held-out colour-shape pairs only ("a red square");
    - `two_object_heldout`: template two-object prompts, each with a held-out pair;
    - `paraphrased_heldout`: held-out scenes said with `data.paraphrase` (synonyms, attributes left
      out, "two circles"), from a stream of its own.
    """
    pairs = [(colour, shape) for colour in COLOURS for shape in SHAPES]
    heldout_pairs = [pair for pair in pairs if pair in HELDOUT_COLOUR_SHAPE]
    rng = np.random.default_rng([seed, 6])
    return {
        "plain": [f"a {colour} {shape}" for colour, shape in (pairs[i % len(pairs)] for i in range(n))],
        "plain_heldout_pairs": [f"a {c} {s}" for c, s in (heldout_pairs[i % len(heldout_pairs)] for i in range(n))],
        "two_object_heldout": heldout_prompts(n, seed=seed + 3, two_object_prob=1.0),
        "paraphrased_heldout": [paraphrase(scene, rng) for scene in sample_scenes(n, seed + 5, "heldout")],
    }


def time_generate(models: dict, prompt: str = "a large red circle in the center", n: int = 5,
                  steps: int = 20, sampler_name: str = "dpmpp_2m") -> float:
    """Median seconds for one 64x64 image through the public `pipeline.generate` (CFG, batch 1)."""
    from ..pipeline import generate
    from ..tokenizer import load_tokenizer

    tokenizer = load_tokenizer()
    generate(prompt, models=models, seed=0, height=IMAGE_SIZE, width=IMAGE_SIZE, sampler_name=sampler_name,
             n_inference_steps=steps, tokenizer=tokenizer, progress=False)  # warm-up
    times = []
    for i in range(n):
        t = time.perf_counter()
        generate(prompt, models=models, seed=i, height=IMAGE_SIZE, width=IMAGE_SIZE, sampler_name=sampler_name,
                 n_inference_steps=steps, tokenizer=tokenizer, progress=False)
        times.append(time.perf_counter() - t)
    return float(np.median(times))


def evaluate_checkpoint(ckpt=None, n_prompts: int = 200, seed: int = 0, cfg_scale: float | None = None, runs=DEFAULT_RUNS,
                        report=None, training: dict | None = None, log=print) -> dict:
    """Load a checkpoint through the public loader and report prompt-following on held-out prompts,
    train-split prompts (dpmpp_2m, 20 steps), VAE PSNR and the time per 64x64 image, at guidance
    `cfg_scale` (None: the checkpoint's own)."""
    from ..pipeline import sampling_settings

    models = preload_models_from_standard_weights(ckpt)
    cfg_scale = sampling_settings(models, cfg_scale=cfg_scale)["cfg_scale"]
    prompts = heldout_prompts(n_prompts, seed=seed)
    seeds = list(range(1000 + seed, 1000 + seed + n_prompts))
    log(f"held-out prompts ({n_prompts}), CFG {cfg_scale}:")
    heldout = evaluate_models(models, prompts, seeds, runs, cfg_scale, log=log)
    log("train-split prompts:")
    seen = evaluate_models(models, train_prompts(n_prompts, seed=seed + 7), seeds, [("dpmpp_2m", 20)], cfg_scale,
                           log=log)
    families = {}
    for name, family in prompt_families(n_prompts, seed).items():
        log(f"{name} prompts, e.g. {family[0]!r}:")
        families[name] = evaluate_models(models, family, seeds, [("dpmpp_2m", 20)], cfg_scale, log=log)[0]
    images = to_tensor(ShapesDataset(500, seed=seed + 1, split="heldout", size=IMAGE_SIZE).images())
    value_psnr = vae_psnr(models["encoder"], models["decoder"], images)
    seconds = time_generate(models)
    path = Path(ckpt) if ckpt else DEFAULT_CHECKPOINT
    result = {
        "checkpoint": path.name,
        "file_mb": round(path.stat().st_size / 1e6, 2),
        "parameters": count_parameters(models),
        "heldout": heldout,
        "train_split": seen,
        "families": families,
        "vae_psnr_db": round(value_psnr, 2),
        "seconds_per_64px_image": round(seconds, 3),
        "timing_note": f"pipeline.generate, dpmpp_2m 20 steps with CFG, {torch.get_num_threads()} CPU threads",
        "n_prompts": n_prompts,
    }
    if training:
        result["training"] = training
    log(f"VAE PSNR {value_psnr:.2f} dB; {seconds:.3f} s per 64x64 image")
    if report:
        Path(report).write_text(json.dumps(result, indent=1) + "\n")
        log(f"wrote {report}")
    return result
