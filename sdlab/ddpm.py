r"""The noise schedule every sampler shares, and the DDPM sampler.

**Forward process.** Training corrupts a clean latent $x_0$ in $T = 1000$ small Gaussian steps
with variances $\beta_1, \dots, \beta_T$. With $\alpha_t = 1 - \beta_t$ and
$\bar\alpha_t = \prod_{s \le t} \alpha_s$ any step can be reached in one jump
(DDPM, [Ho et al. 2020](https://arxiv.org/abs/2006.11239), eq. 4):

$$q(x_t \mid x_0) = \mathcal{N}\!\left(\sqrt{\bar\alpha_t}\, x_0,\; (1 - \bar\alpha_t)\, I\right)
\quad\Longleftrightarrow\quad
x_t = \sqrt{\bar\alpha_t}\, x_0 + \sqrt{1 - \bar\alpha_t}\, \epsilon, \qquad \epsilon \sim \mathcal{N}(0, I).$$

Stable Diffusion uses the "scaled linear" schedule: $\sqrt{\beta_t}$ grows linearly from
$\sqrt{0.00085}$ to $\sqrt{0.012}$. The U-Net learns $\epsilon_\theta(x_t, t) \approx \epsilon$.

**Sampling** walks back from pure noise through a few of the 1000 training timesteps
(`timesteps`, descending). Every sampler in `sdlab` is a `Sampler` and is driven the same way:

```python
sampler.set_inference_timesteps(50)
latents = noise * sampler.init_noise_sigma           # 1.0 here, sigma_max for Euler samplers
for t in sampler.timesteps:
    eps = unet(sampler.scale_model_input(latents, t), t, context)
    latents = sampler.step(t, latents, eps)
```

For image-to-image, `set_strength(s)` drops the first, noisiest steps and
`add_noise(latents, sampler.timesteps[0])` noises the input image to the first kept timestep.

**Timestep spacing** (the three rules of [Lin et al. 2023](https://arxiv.org/abs/2305.08891),
table 2, computed exactly as diffusers does), for $n$ steps out of $T$:

* `"leading"`: $t_i = i \lfloor T/n \rfloor + \text{offset}$, i.e. 981, 961, ..., 1 for
  $n = 50$ and SD's `steps_offset=1`;
* `"linspace"`: $n$ evenly spaced points from $0$ to $T - 1$ (999, 978.6, ..., 0; rounded by DDPM and DDIM);
* `"trailing"`: $\operatorname{round}(T - i\,T/n) - 1$ (999, 979, ..., 19).
"""

from __future__ import annotations

import numpy as np
import torch

SPACINGS = ("leading", "linspace", "trailing")
BETA_SCHEDULES = ("scaled_linear", "linear")


def make_betas(num_training_steps: int, beta_start: float, beta_end: float, schedule: str) -> torch.Tensor:
    r"""The variances $\beta_1 \dots \beta_T$ (float32, as SD was trained).

    * `"scaled_linear"`: $\beta_t = \left(\sqrt{\beta_\text{start}} + \frac{t-1}{T-1}
      (\sqrt{\beta_\text{end}} - \sqrt{\beta_\text{start}})\right)^2$ (Stable Diffusion);
    * `"linear"`: $\beta_t$ itself linear from $\beta_\text{start}$ to $\beta_\text{end}$ (DDPM).
    """
    if schedule == "scaled_linear":
        return torch.linspace(beta_start**0.5, beta_end**0.5, num_training_steps, dtype=torch.float32) ** 2
    if schedule == "linear":
        return torch.linspace(beta_start, beta_end, num_training_steps, dtype=torch.float32)
    raise ValueError(f"unknown beta_schedule {schedule!r}; choose one of {BETA_SCHEDULES}")


def spaced_timesteps(n: int, spacing: str, num_training_steps: int = 1000, steps_offset: int = 1) -> np.ndarray:
    """`n` timesteps, descending, as float64 (rounded or not by the caller), by the rule `spacing`."""
    T = num_training_steps
    if spacing == "leading":
        return (np.arange(n) * (T // n))[::-1] + float(steps_offset)
    if spacing == "linspace":
        return np.linspace(0, T - 1, n)[::-1]
    if spacing == "trailing":
        # `[:n]`: for some n (61, 103, ...) float round-off makes `arange` yield one more, bogus, step.
        return np.round(np.arange(T, 0, -T / n))[:n] - 1.0
    raise ValueError(f"unknown timestep_spacing {spacing!r}; choose one of {SPACINGS}")


def per_sample(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Reshape one value (or one per batch element) to (B, 1, 1, ...) so it broadcasts against `like`."""
    return values.flatten().view(-1, *[1] * (like.ndim - 1))


class Sampler:
    r"""What all samplers share: the noise schedule $\bar\alpha_t$, the timestep schedule,
    image-to-image strength, the forward process `add_noise`, and the random generator.

    Subclasses implement `step` and, if they need more than a list of timesteps,
    `_schedule` (e.g. the noise levels $\sigma$ of the Euler and DPM-Solver samplers).
    The defaults are SD1.5's `scheduler_config.json`.
    """

    #: model evaluations per step (all samplers here take one); img2img skips `start_step * order` entries
    order = 1
    #: the spacing diffusers uses for this sampler with SD1.5's config (which names none)
    default_spacing = "leading"
    #: std of the initial noise: latents start as `noise * init_noise_sigma`
    init_noise_sigma = 1.0

    def __init__(
        self,
        generator: torch.Generator | None = None,
        num_training_steps: int = 1000,
        beta_start: float = 0.00085,
        beta_end: float = 0.0120,
        *,
        beta_schedule: str = "scaled_linear",
        timestep_spacing: str | None = None,
        steps_offset: int = 1,
    ):
        self.generator = generator
        self.num_training_steps = num_training_steps
        self.betas = make_betas(num_training_steps, beta_start, beta_end, beta_schedule)
        self.alphas = 1.0 - self.betas
        self.alphas_cumprod = torch.cumprod(self.alphas, dim=0)  # \bar\alpha_t
        self.one = torch.tensor(1.0)
        self.timestep_spacing = timestep_spacing or self.default_spacing
        if self.timestep_spacing not in SPACINGS:
            raise ValueError(f"unknown timestep_spacing {self.timestep_spacing!r}; choose one of {SPACINGS}")
        self.steps_offset = steps_offset
        self.set_inference_timesteps(50)

    # ----- the timestep schedule -------------------------------------------------------------

    def _schedule(self, n: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        r"""The `n` timesteps (descending) and, for samplers that use them, the noise levels
        $\sigma$ at those timesteps with a final $\sigma = 0$ appended (else `None`)."""
        t = spaced_timesteps(n, self.timestep_spacing, self.num_training_steps, self.steps_offset)
        return torch.from_numpy(t.round().astype(np.int64)), None

    def set_inference_timesteps(self, num_inference_steps: int = 50) -> None:
        """Choose `num_inference_steps` of the training timesteps and start a fresh trajectory."""
        T = self.num_training_steps
        if int(num_inference_steps) != num_inference_steps or not 1 <= num_inference_steps <= T:
            raise ValueError(
                f"num_inference_steps must be an integer from 1 to {T} (the training steps), "
                f"got {num_inference_steps!r}; 20-50 is typical"
            )
        self.num_inference_steps = int(num_inference_steps)
        self.all_timesteps, self.all_sigmas = self._schedule(self.num_inference_steps)
        if self.all_timesteps.max() >= T:  # e.g. 1000 "leading" steps shifted by steps_offset=1
            raise ValueError(
                f"{num_inference_steps} steps with {self.timestep_spacing!r} spacing and steps_offset={self.steps_offset} "
                f"would start at t={self.all_timesteps.max().item():g}, past the last training step {T - 1}; "
                f"use fewer steps or timestep_spacing='linspace'"
            )
        self.set_strength(1.0)

    def set_strength(self, strength: float = 1.0) -> None:
        """Image-to-image: keep only the last `int(n * strength)` of the `n` steps.

        `strength=1` starts from pure noise (all steps); `strength=0.3` noises the input image
        to the timestep 30% of the way up and denoises from there. Like diffusers,
        `start_step = n - int(n * strength)`. Also resets the step counter and any multistep state,
        so it can be called again to restart.
        """
        if not 0 < strength <= 1:
            raise ValueError(f"strength must be in (0, 1] (1 = ignore the input image), got {strength!r}")
        n = self.num_inference_steps
        start_step = n - int(n * strength)
        if start_step >= n:
            raise ValueError(
                f"strength={strength} with {n} steps leaves int({n} * {strength}) = 0 steps to denoise; "
                f"use strength >= {1 / n:.3g} or more inference steps"
            )
        self.start_step = start_step
        first = start_step * self.order
        self.timesteps = self.all_timesteps[first:]
        self.sigmas = None if self.all_sigmas is None else self.all_sigmas[first:]
        self.step_index = 0  # how many `step` calls since the start
        self._reset()

    def _reset(self) -> None:
        """Forget the state of a trajectory in progress (multistep samplers keep some)."""

    # ----- what the pipeline calls --------------------------------------------------------

    def _randn(self, like: torch.Tensor) -> torch.Tensor:
        r"""$\mathcal{N}(0, I)$ noise shaped like `like`, from `self.generator`.

        A CPU generator draws on the CPU and the result moves to `like`'s device (as diffusers'
        `randn_tensor` does), so a seed gives the same image on any device.
        """
        g = self.generator
        device = like.device if g is None or g.device.type == like.device.type else g.device
        return torch.randn(like.shape, generator=g, device=device, dtype=like.dtype).to(like.device)

    def add_noise(self, original_samples: torch.Tensor, timesteps, noise: torch.Tensor | None = None) -> torch.Tensor:
        r"""The forward process $x_t = \sqrt{\bar\alpha_t}\, x_0 + \sqrt{1 - \bar\alpha_t}\, \epsilon$ (eq. 4).

        `timesteps`: one timestep or one per batch element. `noise` defaults to a fresh draw
        from the sampler's generator.
        """
        if noise is None:
            noise = self._randn(original_samples)
        alphas_cumprod = self.alphas_cumprod.to(device=original_samples.device, dtype=original_samples.dtype)
        t = torch.as_tensor(timesteps, device=original_samples.device).long()
        alpha_bar = per_sample(alphas_cumprod[t], original_samples)
        return alpha_bar**0.5 * original_samples + (1 - alpha_bar) ** 0.5 * noise

    def scale_model_input(self, latents: torch.Tensor, timestep=None) -> torch.Tensor:
        """What the U-Net is fed at this step: the latents themselves for DDPM-style samplers."""
        return latents

    def step(self, timestep, latents: torch.Tensor, model_output: torch.Tensor) -> torch.Tensor:
        """One denoising step: the latents at `timestep` -> the latents at the next timestep."""
        raise NotImplementedError


class DDPMSampler(Sampler):
    r"""Ancestral sampling from the DDPM posterior ([Ho et al. 2020](https://arxiv.org/abs/2006.11239)).

    Skipping from $t$ to the next scheduled timestep $t'$ (fewer than 1000 steps) is a DDPM step
    with $\alpha_t = \bar\alpha_t / \bar\alpha_{t'}$ and $\beta_t = 1 - \alpha_t$.
    Variance "fixed_small" ($\tilde\beta_t$), no clipping of $\hat x_0$: as diffusers' `DDPMScheduler`
    with SD1.5's config, including the noise draws.
    """

    def _previous_timestep(self, t: int) -> int:
        r"""The timestep after `t` in the schedule; -1 after the last one (where $\bar\alpha = 1$)."""
        steps = self.timesteps.tolist()
        if t not in steps:
            raise ValueError(f"timestep {t} is not in this sampler's schedule; pass the entries of sampler.timesteps")
        i = steps.index(t)
        return steps[i + 1] if i + 1 < len(steps) else -1

    def step(self, timestep, latents: torch.Tensor, model_output: torch.Tensor) -> torch.Tensor:
        r"""$x_t \to x_{t'}$ given $\epsilon_\theta(x_t, t)$ = `model_output`.

        Estimate the clean latent (eq. 15):
        $\hat x_0 = \dfrac{x_t - \sqrt{1 - \bar\alpha_t}\, \epsilon_\theta}{\sqrt{\bar\alpha_t}}$

        Mean of the posterior $q(x_{t'} \mid x_t, \hat x_0)$ (eq. 7):
        $\tilde\mu_t = \dfrac{\sqrt{\bar\alpha_{t'}}\, \beta_t}{1 - \bar\alpha_t}\, \hat x_0
        + \dfrac{\sqrt{\alpha_t}\, (1 - \bar\alpha_{t'})}{1 - \bar\alpha_t}\, x_t$

        and sample it with the variance $\tilde\beta_t = \dfrac{1 - \bar\alpha_{t'}}{1 - \bar\alpha_t}\, \beta_t$:
        $x_{t'} = \tilde\mu_t + \sqrt{\tilde\beta_t}\, z$, $z \sim \mathcal{N}(0, I)$ (no noise at $t = 0$).
        """
        t = int(timestep)
        prev_t = self._previous_timestep(t)
        alpha_bar = self.alphas_cumprod[t]
        alpha_bar_prev = self.alphas_cumprod[prev_t] if prev_t >= 0 else self.one
        alpha = alpha_bar / alpha_bar_prev
        beta = 1 - alpha

        x0 = (latents - (1 - alpha_bar) ** 0.5 * model_output) / alpha_bar**0.5
        x0_coeff = (alpha_bar_prev**0.5 * beta) / (1 - alpha_bar)
        xt_coeff = alpha**0.5 * (1 - alpha_bar_prev) / (1 - alpha_bar)
        mean = x0_coeff * x0 + xt_coeff * latents

        self.step_index += 1
        if t == 0:
            return mean
        variance = torch.clamp((1 - alpha_bar_prev) / (1 - alpha_bar) * beta, min=1e-20)
        return mean + variance**0.5 * self._randn(model_output)
