r"""Train the tiny Stable Diffusion on the Shapes dataset, on a CPU.

The tiny model uses **the same classes** as SD1.5 (`CLIP`, `VAE_Encoder`/`VAE_Decoder`, `Diffusion`),
only smaller (`config.TINY`), with the real CLIP BPE tokenizer (49,408 tokens, 77 positions) and the
VAE's 8x down-sampling into 4 latent channels. Training runs in two stages, as for the real model:

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

`train` is a short composition of named stages: `prepare` (render the data, build the models, resume a
saved `TrainState`), `train_vae`, `train_unet`, `finish` (the EMA weights, the checkpoint, a summary).
Everything is seeded; each step draws its batch from a generator seeded by `(seed, stage, step)`, so a
run resumed from the training-state file (`--state`) continues exactly where it stopped.

Checkpoints are written with `model_loader.save_checkpoint`, i.e. in the original SD key layout with the
tiny config in the metadata, so `preload_models_from_standard_weights` loads them like the real file.

Command line: `python -m sdlab train --out sdlab/data/tiny.safetensors --state /tmp/tiny-state.pt`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..config import TINY, SDConfig
from ..ddpm import DDPMSampler
from ..diffusion import get_time_embedding
from ..errors import ArgumentError
from ..model_loader import DEFAULT_CHECKPOINT, build_models, save_checkpoint
from .data import IMAGE_SIZE, ShapesDataset, caption_variants, to_tensor
from .evaluate import count_parameters, vae_psnr


def seed_everything(seed: int) -> None:
    import random

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def step_generator(seed: int, stage: int, step: int) -> torch.Generator:
    """The random numbers of one training step depend only on (seed, stage, step): resumable runs."""
    return torch.Generator().manual_seed(seed * 1_000_003 + stage * 100_003 + step)


def lr_at(step: int, total: int, lr: float, warmup: int = 100) -> float:
    r"""Linear warm-up, then cosine decay to 10%: after the warm-up,
    $\eta_t = \eta\,(0.1 + 0.9 \cdot \tfrac12 (1 + \cos \pi p))$ with $p$ the fraction of the remaining steps done."""
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


# --------------------------------------------------------------------------------------------------
# Settings, and the state a run can be resumed from
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TrainSettings:
    """The hyper-parameters of a run; each is also an option of `python -m sdlab train` (`--vae-steps` ...).

    The defaults made the shipped `sdlab/data/tiny.safetensors` (25 min on 2 CPU cores).
    """

    seed: int = 0
    n_images: int = 10000  # training images rendered once
    vae_steps: int = 2000
    vae_batch: int = 16
    vae_lr: float = 2e-3
    kl_weight: float = 1e-5
    unet_steps: int = 6000
    unet_batch: int = 32
    unet_lr: float = 1.5e-3
    caption_dropout: float = 0.1  # fraction of captions replaced by the empty prompt
    caption_variants: int = 4  # captions per image: the full caption and 3 paraphrases (data.paraphrase)
    ema_decay: float = 0.999
    min_snr: float = 5.0  # Min-SNR-gamma loss weighting (0: none)


STAGE_NAMES = {1: "VAE", 2: "U-Net"}
STAGE_TIMING = {1: "vae_s", 2: "unet_s"}


@dataclass
class TrainState:
    """Where a run stands: what `--state` saves, so that a run resumed from it continues exactly.

    `stage` 1 is the VAE, 2 the text encoder + U-Net, 3 a finished run; `step` counts the optimizer
    steps done in that stage. `models`, `optimizer` (the current stage's; None right after the VAE
    stage) and `ema` (of the text encoder and U-Net) are state dicts. `timing` holds the seconds
    spent per stage and on setup (rendering the data, encoding the latents) over all invocations.
    """

    seed: int
    config: str  # SDConfig.to_json() of the run: a state only resumes the run it belongs to
    stage: int = 1
    step: int = 0
    scale_factor: float = 1.0  # the VAE's latent scale, measured at the end of stage 1
    history: dict = field(default_factory=lambda: {"vae": [], "unet": []})  # [step, losses...] rows
    timing: dict = field(default_factory=lambda: {"vae_s": 0.0, "unet_s": 0.0, "setup_s": 0.0})
    models: dict = field(default_factory=dict)
    optimizer: dict | None = None
    ema: dict | None = None

    def save(self, path) -> None:
        """Write to `path` through a `.part` file renamed over it: a killed run never leaves half a state."""
        tmp = f"{path}.part"
        torch.save({f.name: getattr(self, f.name) for f in dataclasses.fields(self)}, tmp)
        os.replace(tmp, path)

    @classmethod
    def load(cls, path, config: SDConfig, seed: int) -> TrainState:
        saved = torch.load(path, map_location="cpu", weights_only=True)
        if saved.get("config") != config.to_json() or saved.get("seed") != seed:
            raise ArgumentError(f"the training state {path} belongs to another run (another config, or a seed other "
                                f"than {seed}); delete it or pass another --state")
        return cls(**saved)


@dataclass
class Run:
    """One invocation of `train`: what its stages share.

    `data` holds the training `images` (N, 3, 64, 64) in [-1, 1], their `tokens` (N, 77) and the
    empty prompt's tokens `empty` (1, 77). `steps_left` is the optimizer-step budget of this
    invocation (`stop_after`; None: no limit).
    """

    settings: TrainSettings
    models: dict
    data: dict
    state: TrainState
    state_path: str | os.PathLike | None = None
    save_every: int = 250
    steps_left: int | None = None
    progress: bool = True
    log: Callable = print
    render_s: float = 0.0  # seconds this invocation spent rendering the data

    def save(self, stage: int, step: int, optimizer=None, ema: EMA | None = None) -> None:
        """Record where the run stands in `state` and write it to `state_path` (if one is given)."""
        state = self.state
        state.stage, state.step = stage, step
        state.scale_factor = self.models["decoder"].config.scale_factor
        state.optimizer = optimizer.state_dict() if optimizer is not None else None
        state.ema = ema.shadow if ema is not None else None
        state.models = {name: m.state_dict() for name, m in self.models.items()}
        if self.state_path:
            state.save(self.state_path)

    @property
    def budget_spent(self) -> bool:
        return self.steps_left is not None and self.steps_left <= 0

    def spend_step(self) -> bool:
        """Count one optimizer step against the budget; True once it is used up."""
        if self.steps_left is not None:
            self.steps_left -= 1
        return self.budget_spent

    def end_of_step(self, stage: int, step: int, total: int, start: float, optimizer, ema=None) -> bool:
        """After step `step` of `total`: save the state every `save_every` steps and when the budget
        stops the run before the stage's end. True: stop now."""
        stop = self.spend_step() and step + 1 < total
        if self.state_path and ((step + 1) % self.save_every == 0 or stop) and step + 1 < total:
            self.state.timing[STAGE_TIMING[stage]] = time.time() - start
            self.save(stage, step + 1, optimizer, ema)
        if stop:
            self.log(f"stopped at {STAGE_NAMES[stage]} step {step + 1}; run again with the same --state to resume")
        return stop


# --------------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------------


def make_data(n: int, seed: int, size: int = IMAGE_SIZE, tokenizer=None, variants: int = 1) -> dict:
    """Render `n` training scenes -> images (n, 3, size, size) in [-1, 1], tokens (n, variants, 77) of
    each scene's `data.caption_variants` (the full caption first), and those captions (n lists)."""
    from ..tokenizer import load_tokenizer

    tokenizer = tokenizer or load_tokenizer()
    data = ShapesDataset(n, seed=seed, split="train", size=size)
    images = to_tensor(data.images())  # (n, size, size, 3) uint8 -> (n, 3, size, size)
    captions = caption_variants(data.scenes, variants, seed)
    unique = sorted({text for texts in captions for text in texts} | {""})
    ids = dict(zip(unique, tokenizer(unique, padding="max_length", max_length=77, truncation=True).input_ids))
    tokens = torch.tensor([[ids[text] for text in texts] for texts in captions])  # (n, variants, 77)
    return {"images": images, "tokens": tokens, "empty": torch.tensor([ids[""]]), "captions": captions}


def set_scale_factor(models: dict, scale: float) -> None:
    """Give the VAE (encoder and decoder) the latent scale factor `scale`."""
    for m in (models["encoder"], models["decoder"]):
        m.config = dataclasses.replace(m.config, scale_factor=scale)


def start_from(models: dict, init, state: TrainState, log=print) -> None:
    """Give the training models the weights of the checkpoint `init` and skip the VAE stage: its VAE
    and latent scale are kept, the text encoder and U-Net train on from its weights."""
    from ..model_loader import preload_models_from_standard_weights

    loaded = preload_models_from_standard_weights(init)
    for name, m in models.items():
        try:
            m.load_state_dict(loaded[name].state_dict())
        except RuntimeError as error:
            raise ArgumentError(f"--init {init}: its {name} does not fit the model being trained ({error}); "
                                "pass a checkpoint of the same config") from None
    set_scale_factor(models, loaded["decoder"].config.scale_factor)
    state.stage, state.scale_factor = 2, loaded["decoder"].config.scale_factor
    log(f"starting from {init}: its VAE is kept, the text encoder and U-Net train on")


def prepare(config: SDConfig, settings: TrainSettings, state_path=None, log=print,
            init=None) -> tuple[dict, dict, TrainState, float]:
    """Seed everything, render the training data, build the models in training mode and, if the file
    `state_path` exists, resume its state; else, with a checkpoint `init`, start from its weights
    (`start_from`). Returns (models, data, state, seconds spent rendering)."""
    seed_everything(settings.seed)
    start = time.time()
    data = make_data(settings.n_images, settings.seed, variants=settings.caption_variants)
    render_s = time.time() - start
    log(f"rendered {settings.n_images} training images in {render_s:.1f}s")
    models = build_models(config)
    for m in models.values():
        m.train()
    state = TrainState(seed=settings.seed, config=config.to_json())
    if state_path and Path(state_path).exists():
        state = TrainState.load(state_path, config, settings.seed)
        set_scale_factor(models, state.scale_factor)
        for name, m in models.items():
            m.load_state_dict(state.models[name])
        log(f"resuming from {state_path}: stage {state.stage}, step {state.step}")
    elif init:
        start_from(models, init, state, log)
    return models, data, state, render_s


def optimizer_step(optimizer, params: list, loss: torch.Tensor, lr: float) -> None:
    """One optimizer step on `loss` at learning rate `lr`, with the gradient norm clipped to 1."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    optimizer.step()


# --------------------------------------------------------------------------------------------------
# Stage 1: the VAE
# --------------------------------------------------------------------------------------------------


def foreground_weight(images: torch.Tensor, boost: float = 9.0) -> torch.Tensor:
    """1 on the background, 1 + boost on pixels that differ from the border colour (the objects)."""
    border = torch.cat([images[..., 0, :], images[..., -1, :]], dim=-1)  # (B, 3, 2W)
    background = border.median(dim=-1).values[..., None, None]
    fg = ((images - background).abs().amax(dim=1, keepdim=True) > 0.1).float()
    fg = F.max_pool2d(fg, 3, stride=1, padding=1)  # include the anti-aliased edges
    return 1.0 + boost * fg


def vae_loss(encoder, decoder, images, noise, kl_weight: float):
    r"""Weighted reconstruction plus KL: $w \cdot (|\hat x - x| + (\hat x - x)^2)$ averaged, plus
    `kl_weight` times $\tfrac12(\mu^2 + \sigma^2 - 1 - \log\sigma^2)$ averaged, with
    $\hat x = D(s\,(\mu + \sigma\,\epsilon))$. Returns (loss, reconstruction term, KL term)."""
    mean, logvar = encoder.moments(images)
    z = mean + torch.exp(0.5 * logvar) * noise
    recon = decoder(z * decoder.config.scale_factor)
    w = foreground_weight(images)
    rec = (w * ((recon - images).abs() + (recon - images) ** 2)).mean()
    kl = 0.5 * (mean**2 + logvar.exp() - 1 - logvar).mean()
    return rec + kl_weight * kl, rec.detach(), kl.detach()


def vae_step(run: Run, optimizer, params: list, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One VAE step on a random batch (flipped left-right half the time); returns (reconstruction, KL)."""
    s, images = run.settings, run.data["images"]
    g = step_generator(s.seed, 1, step)
    idx = torch.randint(0, len(images), (s.vae_batch,), generator=g)
    x = images[idx]
    if torch.rand((), generator=g) < 0.5:  # flips: more variety for the VAE (which reads no captions)
        x = x.flip(-1)
    latent_channels = run.models["encoder"].config.latent_channels
    noise = torch.randn((s.vae_batch, latent_channels, x.shape[2] // 8, x.shape[3] // 8), generator=g)
    lr = lr_at(step, s.vae_steps, s.vae_lr)
    loss, rec, kl = vae_loss(run.models["encoder"], run.models["decoder"], x, noise, s.kl_weight)
    optimizer_step(optimizer, params, loss, lr)
    return rec, kl


@torch.no_grad()
def encode_latents(encoder, images: torch.Tensor, batch: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """The posterior (mean, log-variance) of every image, `batch` images at a time."""
    means, logvars = [], []
    for i in range(0, len(images), batch):
        m, lv = encoder.moments(images[i : i + batch])
        means.append(m)
        logvars.append(lv)
    return torch.cat(means), torch.cat(logvars)


def measure_scale_factor(run: Run) -> float:
    """Set the VAE's scale factor to 1 / std of posterior samples of (up to 4,000) training latents,
    as SD's 0.18215 was found, so that the U-Net sees latents of unit variance."""
    encoder, decoder = run.models["encoder"], run.models["decoder"]
    encoder.eval()
    decoder.eval()
    mean, logvar = encode_latents(encoder, run.data["images"][:4000])
    z = mean + torch.exp(0.5 * logvar) * torch.randn(mean.shape, generator=step_generator(run.settings.seed, 1, -1))
    scale = float(1.0 / z.std())
    set_scale_factor(run.models, scale)
    run.log(f"VAE: {run.settings.vae_steps} steps in {run.state.timing['vae_s']:.0f}s; "
            f"latent std {z.std():.3f} -> scale_factor {scale:.5f}")
    return scale


def train_vae(run: Run) -> bool:
    """Stage 1, from `run.state.step` on: the VAE, then its scale factor. False: stopped early (budget)."""
    s, state = run.settings, run.state
    params = list(run.models["encoder"].parameters()) + list(run.models["decoder"].parameters())
    opt = torch.optim.AdamW(params, lr=s.vae_lr, weight_decay=0.0)
    if state.optimizer is not None:
        opt.load_state_dict(state.optimizer)
    start = time.time() - state.timing["vae_s"]
    bar = tqdm(range(state.step, s.vae_steps), initial=state.step, total=s.vae_steps, desc="VAE",
               disable=not run.progress)
    for step in bar:
        rec, kl = vae_step(run, opt, params, step)
        state.history["vae"].append([step, rec.item(), kl.item()])
        if step % 10 == 0:
            bar.set_postfix(rec=f"{float(rec):.4f}", kl=f"{float(kl):.2f}")
        if run.end_of_step(1, step, s.vae_steps, start, opt):
            return False
    state.timing["vae_s"] = time.time() - start
    measure_scale_factor(run)
    run.save(stage=2, step=0)  # the VAE's optimizer is not needed again
    if run.budget_spent:
        run.log("stopped after the VAE stage; run again with the same --state to resume")
        return False
    return True


# --------------------------------------------------------------------------------------------------
# Stage 2: text encoder + U-Net
# --------------------------------------------------------------------------------------------------


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
    r"""Exponential moving average of the parameters of some modules (with the usual warm-up):
    $\bar\theta \leftarrow d\,\bar\theta + (1 - d)\,\theta$, $d = \min(\text{decay}, \frac{1 + t}{10 + t})$."""

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


def encode_training_latents(run: Run) -> tuple[torch.Tensor, torch.Tensor]:
    """The frozen VAE's posterior (mean, std) of every training image, encoded once; counted as setup time."""
    start = time.time()
    mean, logvar = encode_latents(run.models["encoder"], run.data["images"])
    run.log(f"encoded {len(mean)} latents in {time.time() - start:.1f}s")
    run.state.timing["setup_s"] += run.render_s + time.time() - start
    return mean, torch.exp(0.5 * logvar)


def unet_optimizer(trainable: dict, lr: float) -> torch.optim.AdamW:
    """AdamW with weight decay 0.01 on the matrices, none on biases, norms and embeddings."""
    decay, no_decay = [], []
    for m in trainable.values():
        for name, p in m.named_parameters():
            (no_decay if p.ndim < 2 or "embedding" in name else decay).append(p)
    return torch.optim.AdamW([{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}],
                             lr=lr, betas=(0.9, 0.99))


def unet_step(run: Run, optimizer, params: list, latents: tuple, alphas_cumprod, step: int) -> torch.Tensor:
    """One step of the text encoder and U-Net on a random batch of posterior samples, each with one of its
    caption variants at random, with caption dropout."""
    s, tokens = run.settings, run.data["tokens"]
    mean, std = latents
    g = step_generator(s.seed, 2, step)
    idx = torch.randint(0, len(mean), (s.unet_batch,), generator=g)
    z = (mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=g)) * run.models["decoder"].config.scale_factor
    variant = torch.randint(0, tokens.shape[1], (s.unet_batch,), generator=g)
    tok = tokens[idx, variant]  # (B, 77)
    drop = torch.rand(s.unet_batch, generator=g) < s.caption_dropout
    tok[drop] = run.data["empty"]
    lr = lr_at(step, s.unet_steps, s.unet_lr, warmup=200)
    loss = diffusion_loss(run.models["clip"], run.models["diffusion"], z, tok, alphas_cumprod, g, s.min_snr)
    optimizer_step(optimizer, params, loss, lr)
    return loss


def train_unet(run: Run) -> bool:
    """Stage 2, from `run.state.step` on: text encoder + U-Net on the frozen VAE's latents, then the
    EMA weights copied in. False: stopped early (budget)."""
    s, state = run.settings, run.state
    latents = encode_training_latents(run)
    trainable = {"clip": run.models["clip"], "diffusion": run.models["diffusion"]}
    params = [p for m in trainable.values() for p in m.parameters()]
    opt, ema = unet_optimizer(trainable, s.unet_lr), EMA(trainable, s.ema_decay)
    if state.optimizer is not None:
        opt.load_state_dict(state.optimizer)
    if state.ema is not None:
        ema.shadow = state.ema
    alphas_cumprod = DDPMSampler().alphas_cumprod
    start = time.time() - state.timing["unet_s"]
    bar = tqdm(range(state.step, s.unet_steps), initial=state.step, total=s.unet_steps, desc="U-Net",
               disable=not run.progress)
    running = None
    for step in bar:
        loss = unet_step(run, opt, params, latents, alphas_cumprod, step)
        ema.update(trainable, step)
        state.history["unet"].append([step, loss.item()])
        running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
        if step % 10 == 0:
            bar.set_postfix(loss=f"{running:.4f}")
        if run.end_of_step(2, step, s.unet_steps, start, opt, ema):
            return False
    state.timing["unet_s"] = time.time() - start
    run.save(stage=3, step=s.unet_steps, optimizer=opt, ema=ema)
    ema.copy_to(trainable)
    return True


# --------------------------------------------------------------------------------------------------
# The whole training run
# --------------------------------------------------------------------------------------------------


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


def finish(run: Run, config: SDConfig, out=None, psnr_images: int = 500) -> dict:
    """Freeze the models, write the checkpoint to `out` (fp16) and summarize the run: timings, loss
    curves, the VAE's PSNR on `psnr_images` held-out images."""
    models, s, timing = run.models, run.settings, run.state.timing
    for m in models.values():
        m.eval().requires_grad_(False)
    final_config = dataclasses.replace(config, vae=models["decoder"].config)
    if out:
        save_checkpoint(models, out, final_config, dtype=torch.float16)
        run.log(f"wrote {out} ({Path(out).stat().st_size / 1e6:.1f} MB)")
    heldout = to_tensor(ShapesDataset(psnr_images, seed=s.seed + 1, split="heldout", size=IMAGE_SIZE).images())
    summary = {
        "config": json.loads(final_config.to_json()),
        "parameters": count_parameters(models),
        "vae_seconds": round(timing["vae_s"], 1),
        "unet_seconds": round(timing["unet_s"], 1),
        "total_seconds": round(timing["vae_s"] + timing["unet_s"] + timing["setup_s"], 1),
        "vae_psnr_heldout_db": round(vae_psnr(models["encoder"], models["decoder"], heldout), 2),
        "loss_curves": summarize_history(run.state.history),
        "settings": {**dataclasses.asdict(s), "threads": torch.get_num_threads()},
    }
    run.log(json.dumps({k: v for k, v in summary.items() if k != "config"}, indent=1))
    return {"models": models, "config": final_config, "summary": summary, "history": run.state.history}


def train(out=DEFAULT_CHECKPOINT, state_path=None, config: SDConfig = TINY, settings: TrainSettings | None = None, *,
          init=None, save_every: int = 250, stop_after: int | None = None, psnr_images: int = 500,
          threads: int | None = None, progress: bool = True, log=print, **overrides) -> dict | None:
    """Train the tiny model and write it to `out`; returns the models, their config, a summary
    (timings, losses, PSNR) and the loss history.

    The hyper-parameters are `settings` (a `TrainSettings`), with any of its fields overridden by
    keyword (`train(vae_steps=40, unet_steps=60)`). `state_path` (optional) holds the `TrainState`
    (weights, optimizer, EMA, step, loss history), saved every `save_every` steps: if it exists the
    run resumes from it (it is not the shipped file). `stop_after=n` stops after n optimizer steps in
    this invocation (saving the state, writing no checkpoint; returns None): run again to resume.
    `init` (a checkpoint) starts the text encoder and U-Net from its weights and keeps its VAE
    (`start_from`): how the shipped model learned the paraphrased captions on top of an earlier run.
    """
    settings = dataclasses.replace(settings or TrainSettings(), **overrides)
    if threads:
        torch.set_num_threads(threads)
    models, data, state, render_s = prepare(config, settings, state_path, log, init)
    run = Run(settings, models, data, state, state_path=state_path, save_every=save_every, steps_left=stop_after,
              progress=progress, log=log, render_s=render_s)
    if state.stage == 1 and not train_vae(run):
        return None
    models["encoder"].eval().requires_grad_(False)
    models["decoder"].eval().requires_grad_(False)
    if not train_unet(run):
        return None
    return finish(run, config, out, psnr_images)
