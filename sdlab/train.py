r"""Train a tiny Stable Diffusion on the Shapes dataset, on a CPU, and measure how well it follows prompts.

The tiny model uses **the same classes** as SD1.5 (`CLIP`, `VAE_Encoder`/`VAE_Decoder`, `Diffusion`),
only smaller (`TINY`), with the real CLIP BPE tokenizer (49,408 tokens, 77 positions) and the VAE's
8x down-sampling into 4 latent channels. Training runs in two stages, as for the real model:

1. **VAE**: reconstruction (L1 + MSE, up-weighted on the object pixels, which cover only a few percent
   of a Shapes image) plus a KL term towards $\mathcal N(0, I)$ with a tiny weight (1e-5; SD's VAE used
   1e-6), so the latents stay almost deterministic: with a weight of 1e-3 the posterior noise blurred
   small circles into squares (the analyzer read 11% of reconstructed shapes wrong, against 3% now).
   Afterwards the latent scale factor is set to $1/\operatorname{std}$ of the training latents (SD's
   0.18215 was found the same way).
2. **Text encoder + U-Net together**, with the DDPM noise-prediction loss
   $\lVert \varepsilon - \varepsilon_\theta(\sqrt{\bar\alpha_t} z_0 + \sqrt{1-\bar\alpha_t}\varepsilon, t, c)\rVert^2$
   (Min-SNR-5 weighted), on latents of the training images encoded once by the frozen VAE. 10% of the
   captions are replaced by the empty prompt ("caption dropout"), which teaches the same network the
   unconditional prediction that classifier-free guidance needs. An EMA of the weights is shipped.

Everything is seeded; each step draws its batch from a generator seeded by `(seed, stage, step)`, so a
run resumed from the training-state file (`--state`) continues exactly where it stopped.

Checkpoints are written with `model_loader.save_checkpoint`, i.e. in the original SD key layout with the
tiny config in the metadata, so `preload_models_from_standard_weights` loads them like the real file.

Command line (also wired as `python -m sdlab train|evaluate`):

    python -m sdlab.train train --out sdlab/data/tiny.safetensors --state /tmp/tiny-state.pt
    python -m sdlab.train evaluate --report sdlab/data/tiny_report.json
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .config import CLIPConfig, SDConfig, UNetConfig, VAEConfig
from .ddpm import DDPMSampler
from .diffusion import get_time_embedding
from .model_loader import DEFAULT_CHECKPOINT, build_models, preload_models_from_standard_weights, save_checkpoint
from .samplers import make_sampler
from .shapes import ShapesDataset, heldout_prompts, train_prompts

#: The tiny preset: same classes as SD1.5; the VAE keeps 3 down-sampling stages (8x) and 4 latent channels.
TINY = SDConfig(
    clip=CLIPConfig(n_vocab=49408, n_embd=64, n_token=77, n_head=4, n_layer=2),
    vae=VAEConfig(base_channels=16, channel_mult=(1, 1, 2, 4), n_res_blocks=1, latent_channels=4, n_groups=8,
                  scale_factor=1.0),  # the scale factor is measured after VAE training
    unet=UNetConfig(in_channels=4, out_channels=4, base_channels=32, channel_mult=(1, 2, 2),
                    attention_levels=(True, True, True), n_res_blocks=1, n_head=4, d_context=64,
                    n_groups=8, time_dim=64),
)
IMAGE_SIZE = 64  # the Shapes images are 64x64 -> 8x8x4 latents
DEFAULT_REPORT = Path(__file__).parent / "data" / "tiny_report.json"


def seed_everything(seed: int) -> None:
    import random

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def count_parameters(models: dict) -> dict[str, int]:
    return {name: sum(p.numel() for p in m.parameters()) for name, m in models.items()}


def step_generator(seed: int, stage: int, step: int) -> torch.Generator:
    """The random numbers of one training step depend only on (seed, stage, step): resumable runs."""
    return torch.Generator().manual_seed(seed * 1_000_003 + stage * 100_003 + step)


def lr_at(step: int, total: int, lr: float, warmup: int = 100) -> float:
    """Linear warm-up, then cosine decay to 10%."""
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


# --------------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------------


def make_data(n: int, seed: int, size: int = IMAGE_SIZE, tokenizer=None) -> dict:
    """Render `n` training scenes -> images (n, 3, size, size) in [-1, 1], tokens (n, 77), captions."""
    from .tokenizer import load_tokenizer

    tokenizer = tokenizer or load_tokenizer()
    data = ShapesDataset(n, seed=seed, split="train", size=size)
    images = torch.from_numpy(data.images()).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)
    tokens = torch.tensor(tokenizer(data.captions, padding="max_length", max_length=77, truncation=True).input_ids)
    empty = torch.tensor(tokenizer([""], padding="max_length", max_length=77, truncation=True).input_ids)
    return {"images": images, "tokens": tokens, "empty": empty, "captions": data.captions}


def foreground_weight(images: torch.Tensor, boost: float = 9.0) -> torch.Tensor:
    """1 on the background, 1 + boost on pixels that differ from the border colour (the objects)."""
    border = torch.cat([images[..., 0, :], images[..., -1, :]], dim=-1)  # (B, 3, 2W)
    background = border.median(dim=-1).values[..., None, None]
    fg = ((images - background).abs().amax(dim=1, keepdim=True) > 0.1).float()
    fg = F.max_pool2d(fg, 3, stride=1, padding=1)  # include the anti-aliased edges
    return 1.0 + boost * fg


# --------------------------------------------------------------------------------------------------
# Stage 1: the VAE
# --------------------------------------------------------------------------------------------------


def vae_loss(encoder, decoder, images, noise, kl_weight: float):
    mean, logvar = encoder.moments(images)
    z = mean + torch.exp(0.5 * logvar) * noise
    recon = decoder(z * decoder.config.scale_factor)
    w = foreground_weight(images)
    rec = (w * ((recon - images).abs() + (recon - images) ** 2)).mean()
    kl = 0.5 * (mean**2 + logvar.exp() - 1 - logvar).mean()
    return rec + kl_weight * kl, rec.detach(), kl.detach()


def psnr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """PSNR in dB per image, for images in [-1, 1] (peak-to-peak 2)."""
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


# --------------------------------------------------------------------------------------------------
# Stage 2: text encoder + U-Net
# --------------------------------------------------------------------------------------------------


@torch.no_grad()
def encode_latents(encoder, images: torch.Tensor, batch: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    means, logvars = [], []
    for i in range(0, len(images), batch):
        m, lv = encoder.moments(images[i : i + batch])
        means.append(m)
        logvars.append(lv)
    return torch.cat(means), torch.cat(logvars)


def diffusion_loss(clip, diffusion, latents, tokens, alphas_cumprod, generator, min_snr: float = 5.0):
    """DDPM epsilon loss (optionally Min-SNR-gamma weighted) on one batch of scaled latents."""
    b = latents.shape[0]
    t = torch.randint(0, len(alphas_cumprod), (b,), generator=generator)
    noise = torch.randn(latents.shape, generator=generator)
    ab = alphas_cumprod[t].view(-1, 1, 1, 1)
    noisy = ab.sqrt() * latents + (1 - ab).sqrt() * noise
    context = clip(tokens)
    time = get_time_embedding(t, diffusion.config.time_dim)
    pred = diffusion(noisy, context, time)
    per = ((pred - noise) ** 2).flatten(1).mean(1)
    if min_snr:
        snr = ab.flatten() / (1 - ab.flatten())
        per = per * torch.clamp(snr, max=min_snr) / snr
    return per.mean()


class EMA:
    """Exponential moving average of the parameters of some modules (with the usual warm-up)."""

    def __init__(self, modules: dict, decay: float = 0.999):
        self.decay = decay
        self.shadow = {n: {k: v.detach().clone() for k, v in m.state_dict().items()} for n, m in modules.items()}

    @torch.no_grad()
    def update(self, modules: dict, step: int) -> None:
        d = min(self.decay, (1 + step) / (10 + step))
        for n, m in modules.items():
            for k, v in m.state_dict().items():
                if v.dtype.is_floating_point:
                    self.shadow[n][k].mul_(d).add_(v.detach(), alpha=1 - d)
                else:
                    self.shadow[n][k].copy_(v)

    def copy_to(self, modules: dict) -> None:
        for n, m in modules.items():
            m.load_state_dict(self.shadow[n])


# --------------------------------------------------------------------------------------------------
# The whole training run
# --------------------------------------------------------------------------------------------------


def _save_state(path, **state) -> None:
    if path:
        tmp = str(path) + ".part"
        torch.save(state, tmp)
        os.replace(tmp, path)


def train(
    out=DEFAULT_CHECKPOINT,
    state_path=None,
    config: SDConfig = TINY,
    seed: int = 0,
    n_images: int = 10000,
    vae_steps: int = 2000,
    vae_batch: int = 16,
    vae_lr: float = 2e-3,
    kl_weight: float = 1e-5,
    unet_steps: int = 6000,
    unet_batch: int = 32,
    unet_lr: float = 1.5e-3,
    caption_dropout: float = 0.1,
    ema_decay: float = 0.999,
    min_snr: float = 5.0,
    save_every: int = 250,
    stop_after: int | None = None,
    psnr_images: int = 500,
    threads: int | None = None,
    progress: bool = True,
    log=print,
) -> dict:
    """Train the tiny model and write it to `out`; returns a summary (timings, losses, PSNR).

    `state_path` (optional) holds the weights, optimizer, EMA, step and loss history: if it exists
    the run resumes from it (it is not the shipped file). `stop_after=n` stops after n optimizer steps
    in this invocation (saving the state, writing no checkpoint; returns None): run again to resume.
    """
    if threads:
        torch.set_num_threads(threads)
    seed_everything(seed)
    t0 = time.time()
    data = make_data(n_images, seed)
    images, tokens, empty = data["images"], data["tokens"], data["empty"]
    render_s = time.time() - t0
    log(f"rendered {n_images} training images in {render_s:.1f}s")

    models = build_models(config)
    for m in models.values():
        m.train()
    encoder, decoder, clip, diffusion = models["encoder"], models["decoder"], models["clip"], models["diffusion"]
    history = {"vae": [], "unet": []}
    timing = {"vae_s": 0.0, "unet_s": 0.0, "setup_s": 0.0}  # setup: rendering the data, encoding the latents
    stage, step = 1, 0
    resumed = None
    budget = [stop_after if stop_after is not None else -1]

    def out_of_budget() -> bool:  # counts the optimizer steps of this invocation
        if stop_after is None:
            return False
        budget[0] -= 1
        return budget[0] <= 0
    if state_path and Path(state_path).exists():
        resumed = torch.load(state_path, map_location="cpu", weights_only=True)
        if resumed.get("config") != config.to_json() or resumed.get("seed") != seed:
            raise ValueError(f"{state_path} belongs to another config or seed; delete it or pass another --state")
        stage, step, history = resumed["stage"], resumed["step"], resumed["history"]
        timing.update(resumed["timing"])
        scale = resumed["scale_factor"]
        for m in (encoder, decoder):
            m.config = VAEConfig(**{**m.config.__dict__, "scale_factor": scale})
        for name, m in models.items():
            m.load_state_dict(resumed["models"][name])
        log(f"resuming from {state_path}: stage {stage}, step {step}")

    # ---- stage 1: VAE ----
    vae_params = list(encoder.parameters()) + list(decoder.parameters())
    if stage == 1:
        opt = torch.optim.AdamW(vae_params, lr=vae_lr, weight_decay=0.0)
        if resumed is not None and resumed.get("optimizer") is not None:
            opt.load_state_dict(resumed["optimizer"])
        start = time.time() - timing["vae_s"]
        bar = tqdm(range(step, vae_steps), initial=step, total=vae_steps, desc="VAE", disable=not progress)
        for step in bar:
            g = step_generator(seed, 1, step)
            idx = torch.randint(0, len(images), (vae_batch,), generator=g)
            x = images[idx]
            if torch.rand((), generator=g) < 0.5:  # flips: more variety for the VAE (which reads no captions)
                x = x.flip(-1)
            noise = torch.randn((vae_batch, config.vae.latent_channels, x.shape[2] // 8, x.shape[3] // 8), generator=g)
            for group in opt.param_groups:
                group["lr"] = lr_at(step, vae_steps, vae_lr)
            loss, rec, kl = vae_loss(encoder, decoder, x, noise, kl_weight)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(vae_params, 1.0)
            opt.step()
            history["vae"].append([step, rec.item(), kl.item()])
            if step % 10 == 0:
                bar.set_postfix(rec=f"{float(rec):.4f}", kl=f"{float(kl):.2f}")
            stop = out_of_budget() and step + 1 < vae_steps
            if state_path and ((step + 1) % save_every == 0 or stop) and step + 1 < vae_steps:
                timing["vae_s"] = time.time() - start
                _save_state(state_path, stage=1, step=step + 1, history=history, timing=timing, seed=seed,
                            config=config.to_json(), scale_factor=1.0, optimizer=opt.state_dict(),
                            models={n: m.state_dict() for n, m in models.items()})
            if stop:
                log(f"stopped at VAE step {step + 1}; run again with the same --state to resume")
                return None
        timing["vae_s"] = time.time() - start
        # scale factor = 1 / std of the training latents (posterior samples), as SD's 0.18215
        encoder.eval()
        decoder.eval()
        mean, logvar = encode_latents(encoder, images[:4000])
        z = mean + torch.exp(0.5 * logvar) * torch.randn(mean.shape, generator=step_generator(seed, 1, -1))
        scale = float(1.0 / z.std())
        for m in (encoder, decoder):
            m.config = VAEConfig(**{**m.config.__dict__, "scale_factor": scale})
        log(f"VAE: {vae_steps} steps in {timing['vae_s']:.0f}s; latent std {z.std():.3f} -> scale_factor {scale:.5f}")
        stage, step = 2, 0
        _save_state(state_path, stage=2, step=0, history=history, timing=timing, seed=seed, config=config.to_json(),
                    scale_factor=scale, optimizer=None, ema=None,
                    models={n: m.state_dict() for n, m in models.items()})
        if stop_after is not None and budget[0] <= 0:
            log("stopped after the VAE stage; run again with the same --state to resume")
            return None
    encoder.eval().requires_grad_(False)
    decoder.eval().requires_grad_(False)
    scale = decoder.config.scale_factor

    # ---- stage 2: text encoder + U-Net ----
    t1 = time.time()
    mean, logvar = encode_latents(encoder, images)
    std = torch.exp(0.5 * logvar)
    log(f"encoded {len(images)} latents in {time.time() - t1:.1f}s")
    timing["setup_s"] += render_s + time.time() - t1
    trainable = {"clip": clip, "diffusion": diffusion}
    params = [p for m in trainable.values() for p in m.parameters()]
    decay, no_decay = [], []
    for m in trainable.values():
        for name, p in m.named_parameters():
            (no_decay if p.ndim < 2 or "embedding" in name else decay).append(p)
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=unet_lr, betas=(0.9, 0.99))
    ema = EMA(trainable, ema_decay)
    if resumed is not None and resumed.get("stage", 1) >= 2:
        if resumed.get("optimizer") is not None:
            opt.load_state_dict(resumed["optimizer"])
        if resumed.get("ema") is not None:
            ema.shadow = resumed["ema"]
    alphas_cumprod = DDPMSampler().alphas_cumprod
    start = time.time() - timing["unet_s"]
    bar = tqdm(range(step, unet_steps), initial=step, total=unet_steps, desc="U-Net", disable=not progress)
    running = None
    for step in bar:
        g = step_generator(seed, 2, step)
        idx = torch.randint(0, len(images), (unet_batch,), generator=g)
        z = (mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=g)) * scale
        tok = tokens[idx].clone()
        drop = torch.rand(unet_batch, generator=g) < caption_dropout
        tok[drop] = empty
        for group in opt.param_groups:
            group["lr"] = lr_at(step, unet_steps, unet_lr, warmup=200)
        loss = diffusion_loss(clip, diffusion, z, tok, alphas_cumprod, g, min_snr)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        ema.update(trainable, step)
        history["unet"].append([step, loss.item()])
        running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
        if step % 10 == 0:
            bar.set_postfix(loss=f"{running:.4f}")
        stop = out_of_budget() and step + 1 < unet_steps
        if state_path and ((step + 1) % save_every == 0 or stop) and step + 1 < unet_steps:
            timing["unet_s"] = time.time() - start
            _save_state(state_path, stage=2, step=step + 1, history=history, timing=timing, seed=seed,
                        config=config.to_json(), scale_factor=scale, optimizer=opt.state_dict(), ema=ema.shadow,
                        models={n: m.state_dict() for n, m in models.items()})
        if stop:
            log(f"stopped at U-Net step {step + 1}; run again with the same --state to resume")
            return None
    timing["unet_s"] = time.time() - start
    _save_state(state_path, stage=3, step=unet_steps, history=history, timing=timing, seed=seed,
                config=config.to_json(), scale_factor=scale, optimizer=opt.state_dict(), ema=ema.shadow,
                models={n: m.state_dict() for n, m in models.items()})
    ema.copy_to(trainable)
    for m in models.values():
        m.eval().requires_grad_(False)
    final_config = SDConfig(clip=config.clip, vae=decoder.config, unet=config.unet)
    if out:
        save_checkpoint(models, out, final_config, dtype=torch.float16)
        log(f"wrote {out} ({Path(out).stat().st_size / 1e6:.1f} MB)")
    heldout = ShapesDataset(psnr_images, seed=seed + 1, split="heldout", size=IMAGE_SIZE)
    x = torch.from_numpy(heldout.images()).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)
    summary = {
        "config": json.loads(final_config.to_json()),
        "parameters": count_parameters(models),
        "vae_seconds": round(timing["vae_s"], 1),
        "unet_seconds": round(timing["unet_s"], 1),
        "total_seconds": round(timing["vae_s"] + timing["unet_s"] + timing["setup_s"], 1),
        "vae_psnr_heldout_db": round(vae_psnr(encoder, decoder, x), 2),
        "loss_curves": summarize_history(history),
        "settings": dict(seed=seed, n_images=n_images, vae_steps=vae_steps, vae_batch=vae_batch, vae_lr=vae_lr,
                         kl_weight=kl_weight, unet_steps=unet_steps, unet_batch=unet_batch, unet_lr=unet_lr,
                         caption_dropout=caption_dropout, ema_decay=ema_decay, min_snr=min_snr,
                         threads=torch.get_num_threads()),
    }
    log(json.dumps({k: v for k, v in summary.items() if k != "config"}, indent=1))
    return {"models": models, "config": final_config, "summary": summary, "history": history}


def summarize_history(history: dict, points: int = 10) -> dict:
    """Mean loss over `points` equal windows of each stage (a compact loss curve)."""
    out = {}
    for name, column in (("vae_reconstruction", ("vae", 1)), ("vae_kl", ("vae", 2)), ("unet_eps_mse", ("unet", 1))):
        rows = history[column[0]]
        if not rows:
            continue
        values = np.array([r[column[1]] for r in rows])
        chunks = np.array_split(values, min(points, len(values)))
        out[name] = [round(float(c.mean()), 5) for c in chunks]
    return out


# --------------------------------------------------------------------------------------------------
# Batched generation (the same math as `pipeline.generate`, many prompts at once) and evaluation
# --------------------------------------------------------------------------------------------------


@torch.no_grad()
def generate_batch(models: dict, prompts: list[str], seeds: list[int], sampler_name: str = "dpmpp_2m",
                   n_inference_steps: int = 20, cfg_scale: float = 5.0, tokenizer=None, size: int = IMAGE_SIZE,
                   sampler_seed: int = 0) -> np.ndarray:
    """Images (B, size, size, 3) uint8 for many prompts at once.

    Follows `pipeline.generate`: initial noise `torch.randn` from a CPU generator seeded with each
    prompt's seed (so deterministic samplers give the same images as `generate`), CFG with the empty
    prompt, the same sampler classes. Stochastic samplers (ddpm, euler_a) draw their per-step noise
    from one generator for the whole batch instead.
    """
    from .pipeline import encode_prompts, to_uint8
    from .tokenizer import load_tokenizer

    tokenizer = tokenizer or load_tokenizer()
    clip, decoder, diffusion = models["clip"], models["decoder"], models["diffusion"]
    vae = decoder.config
    shape = (1, vae.latent_channels, size // vae.downscale, size // vae.downscale)
    noise = torch.cat([torch.randn(shape, generator=torch.Generator().manual_seed(s)) for s in seeds])
    context = encode_prompts(tokenizer, clip, list(prompts) + [""], "cpu")
    cond, uncond = context[:-1], context[-1:].expand(len(prompts), -1, -1)
    context = torch.cat([cond, uncond])
    sampler = make_sampler(sampler_name, torch.Generator().manual_seed(sampler_seed))
    sampler.set_inference_timesteps(n_inference_steps)
    latents = noise * sampler.init_noise_sigma
    for timestep in sampler.timesteps:
        x = sampler.scale_model_input(latents, timestep).repeat(2, 1, 1, 1)
        time = get_time_embedding(timestep, diffusion.config.time_dim).expand(x.shape[0], -1)
        out_c, out_u = diffusion(x, context, time).chunk(2)
        latents = sampler.step(timestep, latents, out_u + cfg_scale * (out_c - out_u))
    return to_uint8(decoder(latents))


def evaluate_models(models: dict, prompts: list[str], seeds: list[int], runs, cfg_scale: float = 5.0,
                    batch: int = 100, log=print) -> list[dict]:
    """Analyzer accuracy per attribute for each (sampler, steps) in `runs`."""
    from .analyzer import evaluate
    from .tokenizer import load_tokenizer

    tokenizer = load_tokenizer()
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
        log(f"{sampler_name:>16s} {steps:3d} steps: " + ", ".join(
            f"{k} {row[k]:.3f}" for k in ("colour", "shape", "size", "position", "count", "relation", "all") if k in row))
        results.append(row)
    return results


def time_generate(models: dict, prompt: str = "a large red circle in the center", n: int = 5,
                  steps: int = 20, sampler_name: str = "dpmpp_2m") -> float:
    """Median seconds for one 64x64 image through the public `pipeline.generate` (CFG, batch 1)."""
    from .pipeline import generate
    from .tokenizer import load_tokenizer

    tokenizer = load_tokenizer()
    generate(prompt, models=models, seed=0, height=IMAGE_SIZE, width=IMAGE_SIZE, sampler_name=sampler_name,
             n_inference_steps=steps, tokenizer=tokenizer, progress=False)  # warm-up
    times = []
    for i in range(n):
        t = time.perf_counter()
        generate(prompt, models=models, seed=i, height=IMAGE_SIZE, width=IMAGE_SIZE, sampler_name=sampler_name,
                 n_inference_steps=steps, cfg_scale=5.0, tokenizer=tokenizer, progress=False)
        times.append(time.perf_counter() - t)
    return float(np.median(times))


def evaluate_checkpoint(ckpt=None, n_prompts: int = 200, seed: int = 0, cfg_scale: float = 5.0,
                        runs=(("dpmpp_2m", 20), ("dpmpp_2m", 10), ("ddim", 20), ("ddim", 50), ("euler", 20),
                              ("euler_a", 20), ("ddpm", 50)),
                        report=None, training: dict | None = None, log=print) -> dict:
    """Load a checkpoint through the public loader and report prompt-following on held-out prompts,
    train-split prompts (dpmpp_2m, 20 steps), VAE PSNR and the time per 64x64 image."""
    models = preload_models_from_standard_weights(ckpt)
    prompts = heldout_prompts(n_prompts, seed=seed)
    seeds = list(range(1000 + seed, 1000 + seed + n_prompts))
    log(f"held-out prompts ({n_prompts}), CFG {cfg_scale}:")
    heldout = evaluate_models(models, prompts, seeds, runs, cfg_scale, log=log)
    log("train-split prompts:")
    seen = evaluate_models(models, train_prompts(n_prompts, seed=seed + 7), seeds, [("dpmpp_2m", 20)], cfg_scale,
                           log=log)
    images = ShapesDataset(500, seed=seed + 1, split="heldout", size=IMAGE_SIZE).images()
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)
    value_psnr = vae_psnr(models["encoder"], models["decoder"], x)
    seconds = time_generate(models)
    path = Path(ckpt) if ckpt else DEFAULT_CHECKPOINT
    result = {
        "checkpoint": path.name,
        "file_mb": round(path.stat().st_size / 1e6, 2),
        "parameters": count_parameters(models),
        "heldout": heldout,
        "train_split": seen,
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


# --------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------


def train_parser(parser=None) -> argparse.ArgumentParser:
    p = parser or argparse.ArgumentParser(prog="sdlab train", description="Train the tiny Stable Diffusion on Shapes.")
    p.add_argument("--out", default=str(DEFAULT_CHECKPOINT), help="where to write the weights (.safetensors)")
    p.add_argument("--state", default=None, help="training-state file for resuming (optimizer, step, EMA)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n-images", type=int, default=10000)
    p.add_argument("--vae-steps", type=int, default=2000)
    p.add_argument("--vae-batch", type=int, default=16)
    p.add_argument("--vae-lr", type=float, default=2e-3)
    p.add_argument("--kl-weight", type=float, default=1e-5)
    p.add_argument("--unet-steps", type=int, default=6000)
    p.add_argument("--unet-batch", type=int, default=32)
    p.add_argument("--unet-lr", type=float, default=1.5e-3)
    p.add_argument("--caption-dropout", type=float, default=0.1)
    p.add_argument("--stop-after", type=int, default=None, help="stop after N steps (resume later with --state)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: PyTorch's)")
    p.add_argument("--report", default=None, help="also evaluate and write this JSON report")
    p.add_argument("--eval-prompts", type=int, default=200)
    p.add_argument("--no-progress", action="store_true")
    return p


def evaluate_parser(parser=None) -> argparse.ArgumentParser:
    p = parser or argparse.ArgumentParser(prog="sdlab evaluate", description="Prompt-following on held-out prompts.")
    p.add_argument("--ckpt", default=None, help="checkpoint (default: the bundled tiny model)")
    p.add_argument("--n-prompts", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cfg-scale", type=float, default=5.0)
    p.add_argument("--runs", default="dpmpp_2m:20,dpmpp_2m:10,ddim:20,ddim:50,euler:20,euler_a:20,ddpm:50",
                   help="comma-separated sampler:steps pairs")
    p.add_argument("--report", default=None, help="write the figures as JSON here")
    p.add_argument("--threads", type=int, default=None)
    return p


def main_train(argv=None) -> int:
    args = train_parser().parse_args(argv)
    result = train(out=args.out, state_path=args.state, seed=args.seed, n_images=args.n_images,
                   vae_steps=args.vae_steps, vae_batch=args.vae_batch, vae_lr=args.vae_lr,
                   kl_weight=args.kl_weight, unet_steps=args.unet_steps,
                   unet_batch=args.unet_batch, unet_lr=args.unet_lr, caption_dropout=args.caption_dropout,
                   stop_after=args.stop_after, threads=args.threads, progress=not args.no_progress)
    if result is None:
        return 0
    if args.report:
        evaluate_checkpoint(args.out, n_prompts=args.eval_prompts, report=args.report, training=result["summary"])
    return 0


def main_evaluate(argv=None) -> int:
    args = evaluate_parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    runs = [(r.split(":")[0], int(r.split(":")[1])) for r in args.runs.split(",") if r]
    training = None
    if args.report and Path(args.report).exists():  # keep the training figures of an earlier report
        training = json.loads(Path(args.report).read_text()).get("training")
    evaluate_checkpoint(args.ckpt, n_prompts=args.n_prompts, seed=args.seed, cfg_scale=args.cfg_scale,
                        runs=runs, report=args.report, training=training)
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] in ("train", "evaluate"):
        command, rest = sys.argv[1], sys.argv[2:]
    else:
        command, rest = "train", sys.argv[1:]
    sys.exit(main_train(rest) if command == "train" else main_evaluate(rest))
