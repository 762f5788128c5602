r"""Steering with attention: prompt-to-prompt word swaps, and DDIM inversion of a real picture.

```python
from sdlab import edit
source, edited = edit.swap_word(models, "a large red circle in the top left",
                                "a large red square in the top left", seed=3, inject_steps=8)
noise = edit.ddim_invert(models, picture, "a large red circle in the top left", 50)   # cfg_scale=1
again = pipeline.generate("a large red circle in the top left", models=models, latents=noise,
                          sampler_name="ddim", n_inference_steps=50, cfg_scale=1)       # ~ picture
```

**Prompt-to-prompt** (Hertz et al. 2022, [arXiv:2208.01626](https://arxiv.org/abs/2208.01626)).
In a cross-attention layer the latent pixels $p$ attend to the prompt's tokens $j$ with
probabilities $M_{p,j} = \operatorname{softmax}_j(q_p \cdot k_j / \sqrt{d_k})$: the maps $M$ hold the
*layout* (where each word goes), the values $V$ the *content* (what the word is). `swap_word`
samples the source prompt $\mathcal P$ and the edited prompt $\mathcal P^*$ (one word swapped,
"circle" -> "square") side by side from the same noise and, in the first $k$ sampling steps
(`inject_steps`), lets the edited image's cross-attention use the source's maps with its own values,

$$\operatorname{Attention}^* = M_t\, V^*, \qquad
\widehat M^*_t = \begin{cases} M_t & \text{the first } k \text{ steps} \\ M^*_t & \text{after,} \end{cases}$$

(the paper's $\operatorname{Edit}(M_t, M^*_t, t)$ for a word swap: the same token positions, the
swapped word takes the old word's map). `self_inject_steps` does the same for the U-Net's
self-attention (the paper's $\tau_s$). With classifier-free guidance only the conditional half is
edited; the unconditional passes of both images run untouched, as in the paper. The replacement
goes through `sdlab.attention.edit_attention`, a per-thread hook that is off (one context-variable
read per attention call) everywhere else.

**DDIM inversion** (Song et al. 2021; the first step of Mokady et al.'s null-text inversion,
[arXiv:2211.09794](https://arxiv.org/abs/2211.09794)). Deterministic DDIM ($\eta = 0$) is an ODE
integrator, so it can be run backwards: from the picture's latents $x_0$ (the VAE's posterior mean),
with the noise predicted at the current latents,

$$\hat x_0 = \frac{x_t - \sqrt{1 - \bar\alpha_t}\,\hat\varepsilon}{\sqrt{\bar\alpha_t}}, \qquad
x_{t+1} = \sqrt{\bar\alpha_{t+1}}\, \hat x_0 + \sqrt{1 - \bar\alpha_{t+1}}\, \hat\varepsilon,
\qquad \hat\varepsilon = \varepsilon_\theta(x_t, t + 1, c),$$

up to the last timestep; sampling forward from that noise (`pipeline.generate(..., latents=noise)`)
gives the picture back. It is exact only in the limit of small steps ($\hat\varepsilon$ at $x_t$
stands for the one at $x_{t+1}$) and **only without guidance** (`cfg_scale=1`): guidance
extrapolates away from the conditional ODE and the errors compound (null-text inversion exists to
fix that). Editing a real picture: invert with its own prompt, sample from the noise with an edited
prompt, plain or with `swap_words(..., latents=noise)` for the maps of the reconstruction
(`edit_picture` does both).

**Measured on the tiny model** (DDIM, 20 steps, guidance 5, passed as `cfg_scale=5`: the model's
default is 2.5; the analyzer reads every image):

* *Word swap*, 48 single-object prompts (24 held-out, 24 train split), the shape word swapped:
  the new shape with the source's colour and position in 100% of pairs for every $k$ from 0
  (plain regeneration from the same seed) to 20: the tiny model's prompts name the colour and the
  position, so plain regeneration already keeps them. The injection shows in the finer layout:
  the object's centre moves 1.26 / 1.25 px (held-out / train) from the source's in plain
  regeneration, 1.12 / 1.21 px with $k = 8$, 0.83 / 0.97 px with $k = 20$ (with the self-attention
  maps too, `self_inject_steps=20`: 0.89 px over both).
* *Inversion*, 12 held-out dataset pictures, no guidance, reconstruction PSNR (mean / worst):
  10 steps 29.4 / 25.9 dB, 20 steps 32.1 / 28.7, 50 steps 35.0 / 31.6, 100 steps 36.5 / 32.7;
  the VAE alone (encode, decode) 37.9 dB is the ceiling. Inverting and sampling with guidance 3
  (50 steps): 32.6 / 28.4 dB.
* *Editing by prompt*, 24 dataset pictures (12 held-out, 12 train) inverted in 20 steps, the colour
  word changed: the new colour with the picture's shape and position in 24/24 at guidance 1
  (the object's centre moves 0.50 px), 23/24 at guidance 3 and 5 (0.78 and 1.1 px), for every
  $k$ in 0, 4, 8, 12: injection changes the pixels a little, the analyzer's verdict not at all.
"""

from __future__ import annotations

import numpy as np
import torch

from . import arguments
from .attention import CrossAttention, attention_probabilities, edit_attention
from .errors import ArgumentError
from .pipeline import (
    decode,
    denoise,
    encode_prompts,
    guided_noise,
    make_generators,
    prepare_latents,
    prompt_context,
    sampling_settings,
    to_uint8,
)
from .samplers import make_sampler
from .schedule import predict_x0, to_eps
from .tokenizer import load_tokenizer

#: prompt-to-prompt's default: the source's cross-attention maps for the first 8 of 20 steps
DEFAULT_INJECT_STEPS = 8


class AttentionSwap:
    r"""The editor handed to `edit_attention`: a U-Net batch holds `n` source items, then `n` edited
    items (then the same again, unconditional, with guidance); while `step` is below the limit
    (`cross_steps` for cross-attention, `self_steps` for self-attention), edited item $i$'s
    probabilities become source item $i$'s, $\widehat M^*_i = M_i$. `after_step` (the denoising
    loop's callback) counts the steps."""

    def __init__(self, n: int, cross_steps: int, self_steps: int = 0):
        self.n, self.cross_steps, self.self_steps = n, cross_steps, self_steps
        self.step = 0

    def __call__(self, module, q, k, causal):
        limit = self.cross_steps if isinstance(module, CrossAttention) else self.self_steps
        if self.step >= limit or causal:  # causal: CLIP's attention, never edited
            return None
        weights = attention_probabilities(q, k)  # (B, H, Lq, Lk), B = 2n (no guidance) or 4n
        weights[self.n : 2 * self.n] = weights[: self.n]  # the edited conditional items take the sources' maps
        return weights

    def after_step(self, i, timestep, latents, noise_pred) -> None:
        self.step = i + 1


def _check_swap(tokenizer, prompts, new_prompts) -> None:
    """Same number of prompts, and each pair the same number of tokens (the maps map position to position)."""
    if len(prompts) != len(new_prompts) or not prompts:
        raise ArgumentError(f"give one new prompt per prompt; got {len(prompts)} prompts and {len(new_prompts)} new ones")
    for prompt, new_prompt in zip(prompts, new_prompts):
        arguments.check_text(prompt, "prompt")
        arguments.check_text(new_prompt, "new_prompt")
        old, new = tokenizer.tokenize(prompt), tokenizer.tokenize(new_prompt)
        if len(old) != len(new):
            raise ArgumentError(f"prompt-to-prompt swaps words of the same token count: {prompt!r} is {len(old)} tokens, "
                                f"{new_prompt!r} {len(new)}; swap one word for one of as many tokens (e.g. circle -> square)")


@torch.no_grad()
def swap_words(models: dict, prompts: list[str], new_prompts: list[str], seeds: list[int], *,
               inject_steps: int = DEFAULT_INJECT_STEPS, self_inject_steps: int = 0, latents: torch.Tensor | None = None,
               sampler_name: str = "ddim", n_inference_steps: int | None = None, cfg_scale: float | None = None,
               uncond_prompt: str = "", tokenizer=None) -> tuple[np.ndarray, np.ndarray]:
    """Prompt-to-prompt for many pairs at once: returns (sources, edited), uint8 (N, H, W, 3) each.

    Pair $i$ starts from the noise of `seeds[i]` (as `generate` draws it; or `latents[i]`,
    (N, 4, h, w)), the source from `prompts[i]`, the edit from `new_prompts[i]` with the source's
    cross-attention maps for the first `inject_steps` steps (0: plain regeneration from the same
    noise) and its self-attention maps for the first `self_inject_steps`. Settings left None are the
    model's own (size, steps, guidance; `cfg_scale=1`: no guidance). One U-Net call per step on 4N.
    """
    arguments.check_models(models, need_encoder=False)
    tokenizer = tokenizer if tokenizer is not None else load_tokenizer()
    prompts, new_prompts = list(prompts), list(new_prompts)
    _check_swap(tokenizer, prompts, new_prompts)
    n = len(prompts)
    call = sampling_settings(models, n_inference_steps=n_inference_steps, cfg_scale=cfg_scale)
    for name, value in (("inject_steps", inject_steps), ("self_inject_steps", self_inject_steps)):
        arguments.check_int(value, name, 0, call["n_inference_steps"], fix="0 (no injection) up to the number of steps")
    clip, diffusion, decoder = models["clip"], models["diffusion"], models["decoder"]
    device = next(diffusion.parameters()).device
    guided = call["cfg_scale"] != 1
    # two generators per pair, seeded alike: the source and the edit draw the same noise, step by step
    generators = [g for seed in list(seeds) * 2 for g in make_generators(arguments.check_seed(seed))]
    if len(generators) != 2 * n:
        raise ArgumentError(f"give one seed per prompt; got {len(seeds)} seeds for {n} prompts")
    sampler = make_sampler(call["sampler_name"] if sampler_name is None else sampler_name, generators)
    sampler.set_inference_timesteps(call["n_inference_steps"])
    shape = (2 * n, decoder.config.latent_channels,
             call["height"] // decoder.config.downscale, call["width"] // decoder.config.downscale)
    arguments.check_latents(latents, (n, *shape[1:]))
    if latents is not None:
        latents = torch.cat([latents, latents])  # (N, 4, h, w) -> (2N, 4, h, w): sources, then edits
    start, _ = prepare_latents(sampler, shape, generators, device, latents=latents)
    texts = prompts + new_prompts + ([uncond_prompt] * 2 * n if guided else [])
    context = encode_prompts(tokenizer, clip, texts, device)  # (4N, 77, d): [sources, edits] x [cond, uncond]
    editor = AttentionSwap(n, inject_steps, self_inject_steps)
    with edit_attention(editor):
        final = denoise(diffusion, sampler, start, context, call["cfg_scale"] if guided else None,
                        callback=editor.after_step)
    images = to_uint8(torch.cat([decode(decoder, final[i : i + 1]) for i in range(2 * n)]))  # (2N, H, W, 3)
    return images[:n], images[n:]


def swap_word(models: dict, prompt: str, new_prompt: str, seed: int, *, inject_steps: int = DEFAULT_INJECT_STEPS,
              **options) -> tuple[np.ndarray, np.ndarray]:
    """Prompt-to-prompt word swap (see the module docstring): the image of `prompt` from `seed` and
    that of `new_prompt` (one word swapped) with the first image's cross-attention maps for the
    first `inject_steps` sampling steps. Returns (source, edited), uint8 (H, W, 3) each. `options`:
    those of `swap_words` (`self_inject_steps`, `latents` (1, 4, h, w), `sampler_name`, ...)."""
    sources, edited = swap_words(models, [prompt], [new_prompt], [seed], inject_steps=inject_steps, **options)
    return sources[0], edited[0]


def swapped_shape(prompt: str) -> str:
    """A single-object Shapes prompt with its shape word replaced by the next of `SHAPES`
    (circle -> square -> triangle -> circle)."""
    from .tiny.data import SHAPES, Scene, ShapeSpec, caption, parse_caption

    obj = parse_caption(prompt).objects[0]
    new_shape = SHAPES[(SHAPES.index(obj.shape) + 1) % len(SHAPES)]
    return caption(Scene((ShapeSpec(new_shape, obj.colour, obj.size, obj.position),)))


def kept_and_changed(source: np.ndarray, edited: np.ndarray, attribute: str, new_value: str,
                     kept=("shape", "colour", "position")) -> tuple[bool, float]:
    """The analyzer's verdict on one edit: whether the edited image's object has `attribute ==
    new_value` and the same `kept` attributes (other than `attribute`) as the source image's object
    (the largest detection of each; False where either image shows none), and how far (pixels) its
    centre moved (NaN where either shows none)."""
    from .tiny import analyzer

    before, after = analyzer.detect(source), analyzer.detect(edited)
    if not before or not after:
        return False, float("nan")
    before, after = max(before, key=lambda o: o.area), max(after, key=lambda o: o.area)
    shift = float(np.hypot(*np.subtract(after.centre, before.centre)) * source.shape[1])
    return getattr(after, attribute) == new_value and all(
        getattr(after, name) == getattr(before, name) for name in kept if name != attribute), shift


def swap_report(models: dict, prompts: list[str], seeds: list[int], inject_steps=(0, 4, 8, 12), **options) -> dict:
    """For single-object Shapes prompts, each shape word swapped (`swapped_shape`), per number of
    injected steps $k$ (0: plain regeneration from the same seed): `success`, the fraction of pairs
    whose edited image shows the new shape with the source image's colour and position
    (`kept_and_changed`), and `shift`, the mean distance (pixels) the object's centre moved.
    `options` go to `swap_words`. Returns `{k: {"success": f, "shift": px}}`."""
    from .tiny.data import parse_caption

    new_prompts = [swapped_shape(prompt) for prompt in prompts]
    report = {}
    for k in inject_steps:
        sources, edited = swap_words(models, prompts, new_prompts, seeds, inject_steps=k, **options)
        verdicts = [kept_and_changed(source, image, "shape", parse_caption(new).objects[0].shape)
                    for source, image, new in zip(sources, edited, new_prompts)]
        hits, shifts = zip(*verdicts)
        report[k] = {"success": float(np.mean(hits)), "shift": float(np.nanmean(shifts))}
    return report


# --------------------------------------------------------------------------------------------------
# DDIM inversion
# --------------------------------------------------------------------------------------------------


@torch.no_grad()
def image_latents(models: dict, image) -> torch.Tensor:
    r"""A picture (any image source `generate` reads: a path, PIL, an array) -> its latents
    $x_0 = \mu_\phi(x)\, s$ (1, 4, h, w): the VAE encoder's posterior mean, scaled; no noise drawn."""
    from .images import read_picture, to_image_tensor

    encoder = models["encoder"]
    picture = read_picture(image, "image")
    pixels = to_image_tensor(picture, *picture.size, "image").to(next(encoder.parameters()).device)  # (1, 3, H, W)
    mean, _ = encoder.moments(pixels)
    return mean.float() * encoder.config.scale_factor


@torch.no_grad()
def ddim_invert(models: dict, image, prompt: str, n_inference_steps: int = 50, *, cfg_scale: float = 1.0,
                uncond_prompt: str = "", tokenizer=None) -> torch.Tensor:
    r"""DDIM inversion: a real picture -> the noise $x_T$ (1, 4, h, w) that deterministic DDIM with
    the same prompt, steps and guidance turns back into it.

    From $x_0$ (`image_latents`) the DDIM update runs backwards through the sampler's timesteps,
    lowest first: at each, $\hat\varepsilon$ is the (guided) prediction at the current latents with
    the label of the timestep being reached, as null-text inversion does, and

    $$x_{t+1} = \sqrt{\bar\alpha_{t+1}}\, \hat x_0 + \sqrt{1 - \bar\alpha_{t+1}}\, \hat\varepsilon.$$

    `cfg_scale=1` (the default) inverts the conditional ODE, the only exact case; reconstruct with
    `pipeline.generate(prompt, latents=noise, sampler_name="ddim", n_inference_steps=n, cfg_scale=1)`.
    """
    arguments.check_models(models, need_encoder=True)
    tokenizer = tokenizer if tokenizer is not None else load_tokenizer()
    arguments.check_text(prompt, "prompt")
    cfg_scale = arguments.check_real(cfg_scale, "cfg_scale", fix="1 inverts exactly; guidance makes it drift")
    clip, diffusion = models["clip"], models["diffusion"]
    device = next(diffusion.parameters()).device
    guided = cfg_scale != 1
    sampler = make_sampler("ddim")
    sampler.set_inference_timesteps(arguments.check_int(n_inference_steps, "n_inference_steps", 1, 1000))
    context = prompt_context(tokenizer, clip, prompt, uncond_prompt, guided, 1, device)
    latents = image_latents(models, image).to(device)  # at the last sampling step's target, alpha bar ~ 1
    stride = sampler.num_training_steps // sampler.num_inference_steps  # DDIMSampler.step's t' = t - T/n
    for timestep in reversed(sampler.timesteps):
        below = int(timestep) - stride  # where the forward step from `timestep` lands: the latents now
        alpha_bar = sampler.alphas_cumprod[below] if below >= 0 else sampler.final_alpha_cumprod
        alpha_bar_next = sampler.alphas_cumprod[int(timestep)]
        output = guided_noise(diffusion, sampler, latents, timestep, context, cfg_scale if guided else None)
        alpha, sigma = alpha_bar**0.5, (1 - alpha_bar) ** 0.5
        x0 = predict_x0(output, latents, alpha, sigma, sampler.prediction_type)
        eps = to_eps(output, latents, alpha, sigma, sampler.prediction_type)
        latents = alpha_bar_next**0.5 * x0 + (1 - alpha_bar_next) ** 0.5 * eps
    return latents


def edit_picture(models: dict, image, prompt: str, new_prompt: str, n_inference_steps: int = 50, *,
                 inject_steps: int = 0, cfg_scale: float = 1.0, tokenizer=None, **options) -> tuple[np.ndarray, np.ndarray]:
    """Edit a real picture by prompt: `ddim_invert` it with its own `prompt` (without guidance), then
    sample from that noise with `prompt` (the reconstruction) and `new_prompt` (one word swapped),
    the latter with the reconstruction's cross-attention maps for the first `inject_steps` steps and
    guidance `cfg_scale`. Returns (reconstruction, edited), uint8 (H, W, 3) each; `options`: `swap_words`'."""
    noise = ddim_invert(models, image, prompt, n_inference_steps, tokenizer=tokenizer)
    sources, edited = swap_words(models, [prompt], [new_prompt], [0], latents=noise, inject_steps=inject_steps,
                                 n_inference_steps=n_inference_steps, cfg_scale=cfg_scale, tokenizer=tokenizer, **options)
    return sources[0], edited[0]
