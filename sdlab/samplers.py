r"""DDIM, Euler, Euler ancestral, DPM-Solver++(2M) and LCM: faster samplers for the same U-Net.

All of them are `Sampler`s (see `sdlab.schedule`) and reproduce the diffusers scheduler of the same
name, configured from SD1.5's `scheduler_config.json`, to float32 round-off.

**Noise levels.** The Euler and DPM-Solver samplers think in noise levels rather than timesteps.
Divide the forward process $x_t = \sqrt{\bar\alpha_t}\, x_0 + \sqrt{1 - \bar\alpha_t}\, \epsilon$ by
$\sqrt{\bar\alpha_t}$ and it becomes "add noise of standard deviation $\sigma_t$" (Karras et al. 2022,
[arXiv:2206.00364](https://arxiv.org/abs/2206.00364)):

$$\tilde x = x_0 + \sigma_t\, \epsilon, \qquad \sigma_t = \sqrt{\frac{1 - \bar\alpha_t}{\bar\alpha_t}},
\qquad x_t = \frac{\tilde x}{\sqrt{\sigma_t^2 + 1}}.$$

SD1.5's $\sigma$ runs from 0.029 ($t = 0$) to 14.6 ($t = 999$). Euler samplers keep $\tilde x$ as
their latents: they start from `noise * init_noise_sigma` ($\approx \sigma_\text{max}$) and
`scale_model_input` divides by $\sqrt{\sigma^2 + 1}$ before the U-Net sees them.
The Karras schedule (`karras_sigmas=True`, the `*_karras` names) spaces the $\sigma$'s evenly in
$\sigma^{1/7}$, spending more steps at low noise; their timesteps are read back off the $\sigma_t$ table.

**Consistency sampling.** `lcm` (`LCMSampler`) is for Latent Consistency Models and LCM-LoRA: each step
jumps to a clean estimate and noises it afresh to the next timestep, usable in 4 steps without guidance.

`make_sampler("euler_a_karras", generator)` builds a sampler by name; `sampler_names()` lists them.
"""

from __future__ import annotations

import numpy as np
import torch

from .ddpm import DDPMSampler
from .errors import ArgumentError
from .schedule import Sampler, ancestral_sigmas, per_sample, predict_x0, spaced_timesteps, to_eps


def karras_sigmas(sigma_max: float, sigma_min: float, n: int, rho: float = 7.0) -> np.ndarray:
    r"""$n$ noise levels from $\sigma_\text{max}$ down to $\sigma_\text{min}$ (Karras et al. 2022, eq. 5):

    $$\sigma_i = \left(\sigma_\text{max}^{1/\rho} + \tfrac{i}{n-1}
    \left(\sigma_\text{min}^{1/\rho} - \sigma_\text{max}^{1/\rho}\right)\right)^\rho, \qquad \rho = 7.$$
    """
    ramp = np.linspace(0, 1, n)
    min_inv_rho, max_inv_rho = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho


def sigma_to_timestep(sigmas: np.ndarray, train_sigmas: np.ndarray) -> np.ndarray:
    r"""The (fractional) timestep of each noise level: interpolate linearly in $\log\sigma$ between
    the two training timesteps whose $\sigma_t$ bracket it."""
    return np.interp(np.log(sigmas), np.log(train_sigmas), np.arange(len(train_sigmas), dtype=np.float64))


class DDIMSampler(Sampler):
    r"""DDIM ([Song et al. 2020](https://arxiv.org/abs/2010.02502)): deterministic for `eta=0`,
    DDPM-like for `eta=1`. As diffusers' `DDIMScheduler` with `set_alpha_to_one=False`,
    `clip_sample=False`.
    """

    def __init__(self, generator=None, *args, eta: float = 0.0, set_alpha_to_one: bool = False, **kwargs):
        """`eta`: how much fresh noise each step injects (0 = deterministic). Other arguments: `Sampler`."""
        if eta < 0:
            raise ArgumentError(f"eta must be >= 0 (0 = deterministic DDIM, 1 = DDPM-like), got {eta!r}")
        self.eta = eta
        super().__init__(generator, *args, **kwargs)
        # "alpha bar" after the last step: 1 (no noise left) or, as SD1.5 uses it, that of t = 0
        self.final_alpha_cumprod = self.one if set_alpha_to_one else self.alphas_cumprod[0]

    def step(self, timestep, latents: torch.Tensor, model_output: torch.Tensor) -> torch.Tensor:
        r"""$x_t \to x_{t'}$ by the DDIM update (eq. 12), $t' = t - \lfloor T / n \rfloor$
        (as diffusers, also under "linspace" spacing; exact when $n$ divides $T$):

        $$x_{t'} = \sqrt{\bar\alpha_{t'}}\, \hat x_0
        + \sqrt{1 - \bar\alpha_{t'} - \sigma_t^2}\; \epsilon_\theta + \sigma_t z, \qquad
        \hat x_0 = \frac{x_t - \sqrt{1 - \bar\alpha_t}\, \epsilon_\theta}{\sqrt{\bar\alpha_t}},$$

        $$\sigma_t = \eta \sqrt{\frac{1 - \bar\alpha_{t'}}{1 - \bar\alpha_t}}
        \sqrt{1 - \frac{\bar\alpha_t}{\bar\alpha_{t'}}} \quad \text{(eq. 16)}.$$
        """
        t = int(timestep)
        prev_t = t - self.num_training_steps // self.num_inference_steps
        alpha_bar = self.alphas_cumprod[t]
        alpha_bar_prev = self.alphas_cumprod[prev_t] if prev_t >= 0 else self.final_alpha_cumprod

        alpha, sigma = alpha_bar**0.5, (1 - alpha_bar) ** 0.5
        x0 = predict_x0(model_output, latents, alpha, sigma, self.prediction_type)
        eps = to_eps(model_output, latents, alpha, sigma, self.prediction_type)
        variance = ((1 - alpha_bar_prev) / (1 - alpha_bar)) * (1 - alpha_bar / alpha_bar_prev)
        std = self.eta * variance**0.5
        direction = (1 - alpha_bar_prev - std**2) ** 0.5 * eps  # "direction pointing to x_t"
        prev = alpha_bar_prev**0.5 * x0 + direction

        self.step_index += 1
        if self.eta > 0:
            prev = prev + std * self._randn(model_output)
        return prev


class SigmaSampler(Sampler):
    r"""A sampler that steps between noise levels $\sigma_i \to \sigma_{i+1}$ (kept in `sigmas`, one
    per timestep plus a final 0). It counts its steps: `step` (and `scale_model_input`, where it
    scales) use the current step's $\sigma$, whatever `timestep` they are given."""

    default_spacing = "linspace"

    def __init__(self, generator=None, *args, karras_sigmas: bool = False, **kwargs):
        """`karras_sigmas`: use the Karras noise levels. Other arguments: `Sampler`."""
        self.karras_sigmas = karras_sigmas
        super().__init__(generator, *args, **kwargs)

    def train_sigmas(self) -> np.ndarray:
        r"""$\sigma_t = \sqrt{(1 - \bar\alpha_t) / \bar\alpha_t}$ for $t = 0 \dots T-1$ (float32)."""
        return (((1 - self.alphas_cumprod) / self.alphas_cumprod) ** 0.5).numpy()

    def _current_sigmas(self) -> tuple[torch.Tensor, torch.Tensor]:
        r"""$(\sigma_i, \sigma_{i+1})$ of the current step $i$."""
        i = self.step_index
        if i >= len(self.timesteps):
            raise RuntimeError(
                f"all {len(self.timesteps)} steps are done; call set_inference_timesteps() to sample again"
            )
        return self.sigmas[i], self.sigmas[i + 1]

    def _sigmas_at(self, timesteps, like: torch.Tensor) -> torch.Tensor:
        r"""The $\sigma$ of each timestep (one, or one per sample) of the schedule, shaped to broadcast
        against `like` (if a timestep occurs twice: its first position)."""
        positions = []
        for t in torch.as_tensor(timesteps).flatten().tolist():
            hits = (self.timesteps == t).nonzero()
            if len(hits) == 0:
                raise ArgumentError(f"timestep {t} is not in this sampler's schedule; pass one of sampler.timesteps")
            positions.append(int(hits[0]))
        sigmas = self.sigmas.to(device=like.device, dtype=like.dtype)
        return per_sample(sigmas[positions], like)


class EulerSampler(SigmaSampler):
    r"""Euler's method on the probability-flow ODE (Karras et al. 2022, algorithm 1 without churn),
    on the latents $\tilde x = x_0 + \sigma\epsilon$. As diffusers' `EulerDiscreteScheduler`."""

    def _schedule(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        train = self.train_sigmas()
        t = spaced_timesteps(n, self.timestep_spacing, self.num_training_steps, self.steps_offset)
        t = t.astype(np.float32)  # fractional under "linspace"; the U-Net takes float timesteps
        sigmas = np.interp(t, np.arange(len(train)), train)  # sigma at fractional t: linear interpolation
        if self.karras_sigmas:  # same end points, Karras spacing in between
            sigmas = karras_sigmas(sigmas[0].item(), sigmas[-1].item(), n)
            t = sigma_to_timestep(sigmas, train)
        sigmas = np.append(sigmas, 0.0)  # the last step lands on clean latents
        return torch.from_numpy(t.astype(np.float32)), torch.from_numpy(sigmas.astype(np.float32))

    @property
    def init_noise_sigma(self) -> float:
        r"""$\sigma_\text{max}$, or $\sqrt{\sigma_\text{max}^2 + 1}$ under "leading" spacing (as diffusers)."""
        sigma_max = self.all_sigmas.max()
        return float(sigma_max if self.timestep_spacing in ("linspace", "trailing") else (sigma_max**2 + 1) ** 0.5)

    def scale_model_input(self, latents: torch.Tensor, timestep=None) -> torch.Tensor:
        r"""$x_t = \tilde x / \sqrt{\sigma^2 + 1}$: what the U-Net was trained on. Call it once per
        step, before `step`."""
        sigma, _ = self._current_sigmas()
        return latents / ((sigma**2 + 1) ** 0.5)

    def add_noise(self, original_samples, timesteps, noise=None) -> torch.Tensor:
        r"""$\tilde x = x_0 + \sigma\, \epsilon$."""
        if noise is None:
            noise = self._randn(original_samples)
        return original_samples + noise * self._sigmas_at(timesteps, original_samples)

    def step(self, timestep, latents: torch.Tensor, model_output: torch.Tensor) -> torch.Tensor:
        r"""One Euler step from $\sigma_i$ to $\sigma_{i+1}$ along the ODE
        $\dfrac{d\tilde x}{d\sigma} = \dfrac{\tilde x - \hat x_0}{\sigma}$,
        where $\hat x_0 = \tilde x - \sigma\, \epsilon_\theta$:

        $$\tilde x_{i+1} = \tilde x_i + (\sigma_{i+1} - \sigma_i)\, \frac{\tilde x_i - \hat x_0}{\sigma_i}.$$
        """
        sigma, sigma_next = self._current_sigmas()
        x = latents.to(torch.float32)  # upcast: fp16 round-off would pile up over the steps
        x0 = predict_x0(model_output, x, 1.0, sigma, self.prediction_type)  # x~ = x0 + sigma eps
        derivative = (x - x0) / sigma
        x = x + derivative * (sigma_next - sigma)
        self.step_index += 1
        return x.to(model_output.dtype)


class EulerAncestralSampler(EulerSampler):
    r"""Euler ancestral ("Euler a"): an Euler step to below $\sigma_{i+1}$, then fresh noise back up to it.
    As diffusers' `EulerAncestralDiscreteScheduler` (that one has no Karras option; ours uses the
    Karras $\sigma$'s of `EulerSampler`)."""

    def step(self, timestep, latents: torch.Tensor, model_output: torch.Tensor) -> torch.Tensor:
        r"""Split the target noise level, $\sigma_{i+1}^2 = \sigma_\downarrow^2 + \sigma_\uparrow^2$
        (`ancestral_sigmas`), take the Euler step to $\sigma_\downarrow$ and add $\sigma_\uparrow z$,
        $z \sim \mathcal{N}(0, I)$.
        """
        sigma, sigma_next = self._current_sigmas()
        x = latents.to(torch.float32)
        x0 = predict_x0(model_output, x, 1.0, sigma, self.prediction_type)
        sigma_down, sigma_up = ancestral_sigmas(sigma, sigma_next)
        derivative = (x - x0) / sigma
        x = x + derivative * (sigma_down - sigma)
        x = x + self._randn(model_output) * sigma_up
        self.step_index += 1
        return x.to(model_output.dtype)


class DPMPP2MSampler(SigmaSampler):
    r"""DPM-Solver++(2M) ([Lu et al. 2022](https://arxiv.org/abs/2211.01095), algorithm 2): a second-order
    multistep solver that reuses the previous step's $\hat x_0$. As diffusers'
    `DPMSolverMultistepScheduler` defaults (`solver_order=2`, midpoint, `lower_order_final`,
    final $\sigma = 0$): first order on the first and the last step.

    It steps the U-Net's own $x_t$ (no input scaling, `init_noise_sigma = 1`); $\sigma$ only sets
    $\alpha_t = 1/\sqrt{\sigma^2 + 1}$, $\sigma_t = \sigma\,\alpha_t$ and the log-SNR
    $\lambda = \log(\alpha_t / \sigma_t)$. Its "linspace"/"leading" timesteps split the range into
    $n + 1$ parts and drop $t \approx 0$; they are integers (also with Karras $\sigma$'s, rounded).
    """

    def _schedule(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        train = self.train_sigmas()
        T, spacing = self.num_training_steps, self.timestep_spacing
        if spacing == "trailing":
            t = spaced_timesteps(n, spacing, T, self.steps_offset)
        else:
            t = spaced_timesteps(n + 1, spacing, T, self.steps_offset)[:-1]
        t = t.round()
        if self.karras_sigmas:  # the whole training range of sigma, whatever the spacing
            sigmas = karras_sigmas(train[-1].item(), train[0].item(), n)
            t = sigma_to_timestep(sigmas, train).round()
        else:
            sigmas = np.interp(t, np.arange(len(train)), train)
        sigmas = np.append(sigmas, 0.0)
        return torch.from_numpy(t.astype(np.int64)), torch.from_numpy(sigmas.astype(np.float32))

    def _reset(self) -> None:
        self.previous_x0 = None  # \hat x_0 of the previous step, for the second-order correction

    @staticmethod
    def _alpha_sigma(sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        r"""$(\alpha_t, \sigma_t) = \left(1/\sqrt{\sigma^2 + 1},\; \sigma/\sqrt{\sigma^2 + 1}\right)$."""
        alpha_t = 1 / ((sigma**2 + 1) ** 0.5)
        return alpha_t, sigma * alpha_t

    def add_noise(self, original_samples, timesteps, noise=None) -> torch.Tensor:
        r"""$x_t = \alpha_t x_0 + \sigma_t \epsilon$ with the $\sigma$ of each timestep of the schedule."""
        if noise is None:
            noise = self._randn(original_samples)
        alpha_t, sigma_t = self._alpha_sigma(self._sigmas_at(timesteps, original_samples))
        return alpha_t * original_samples + sigma_t * noise

    def step(self, timestep, latents: torch.Tensor, model_output: torch.Tensor) -> torch.Tensor:
        r"""From $s$ = this step to $t$ = the next, with $h = \lambda_t - \lambda_s$ and
        $\hat x_0 = (x_s - \sigma_s \epsilon_\theta) / \alpha_s$:

        first order (= DDIM): $x_t = \dfrac{\sigma_t}{\sigma_s} x_s - \alpha_t (e^{-h} - 1)\, D_0$;

        second order: the same with $-\tfrac12 \alpha_t (e^{-h} - 1)\, D_1$ added, where
        $D_0 = \hat x_0$, $D_1 = \dfrac{1}{r} (\hat x_0 - \hat x_0^\text{prev})$,
        $r = h_\text{prev} / h$ and $h_\text{prev} = \lambda_s - \lambda_\text{prev}$.
        """
        i = self.step_index
        noise_level_s, noise_level_t = self._current_sigmas()
        alpha_s, sigma_s = self._alpha_sigma(noise_level_s)
        alpha_t, sigma_t = self._alpha_sigma(noise_level_t)
        x0 = predict_x0(model_output, latents, alpha_s, sigma_s, self.prediction_type)
        x = latents.to(torch.float32)

        lambda_s = torch.log(alpha_s) - torch.log(sigma_s)
        lambda_t = torch.log(alpha_t) - torch.log(sigma_t)  # +inf at sigma = 0: then x_t = x0
        h = lambda_t - lambda_s
        x = (sigma_t / sigma_s) * x - (alpha_t * (torch.exp(-h) - 1.0)) * x0
        last_step = i == len(self.timesteps) - 1
        if self.previous_x0 is not None and not last_step:
            alpha_p, sigma_p = self._alpha_sigma(self.sigmas[i - 1])
            h_prev = lambda_s - (torch.log(alpha_p) - torch.log(sigma_p))
            r = h_prev / h
            D1 = (1.0 / r) * (x0 - self.previous_x0)
            x = x - 0.5 * (alpha_t * (torch.exp(-h) - 1.0)) * D1

        self.previous_x0 = x0
        self.step_index += 1
        return x.to(model_output.dtype)


class LCMSampler(Sampler):
    r"""Multistep consistency sampling for Latent Consistency Models ([Luo et al. 2023](https://arxiv.org/abs/2310.04378))
    and LCM-LoRA: usable images in 2-8 steps, without classifier-free guidance (`cfg_scale=1`). As diffusers'
    `LCMScheduler` configured from SD1.5's config.

    A consistency model maps any point of a trajectory straight to its clean end, through the
    *consistency function* with its boundary condition $f_\theta(x, 0) = x$ built in
    (Song et al. 2023, [arXiv:2303.01469](https://arxiv.org/abs/2303.01469), eq. 3):

    $$f_\theta(x_t, t) = c_\text{skip}(t)\, x_t + c_\text{out}(t)\, \hat x_0(x_t, t), \qquad
    c_\text{skip}(t) = \frac{\sigma_\text{data}^2}{(s t)^2 + \sigma_\text{data}^2}, \quad
    c_\text{out}(t) = \frac{s t}{\sqrt{(s t)^2 + \sigma_\text{data}^2}},$$

    with $\hat x_0$ the clean latent that the U-Net's output implies (`predict_x0`), $\sigma_\text{data} = 0.5$
    and the timestep scaling $s = 10$ (`timestep_scaling`): $c_\text{skip} \approx 0$, $c_\text{out} \approx 1$
    except near $t = 0$.

    **Timesteps.** LCM was distilled on the grid of a 50-step DDIM solver (`original_inference_steps`),
    $t = k i - 1$ for $i = 1 \dots 50$, $k = \lfloor T / 50 \rfloor$ (19, 39, ..., 999); $n$ steps take
    entries of it evenly spaced in index from the top, $\lfloor j \cdot 50 / n \rfloor$ for $j < n$
    (4 steps: 999, 759, 499, 259). `timestep_spacing` plays no part (as in diffusers), and $n$ is at most 50.
    """

    def __init__(self, generator=None, *args, original_inference_steps: int = 50, timestep_scaling: float = 10.0,
                 **kwargs):
        """`original_inference_steps`: the distillation grid's size; `timestep_scaling`: $s$. Other arguments: `Sampler`."""
        if isinstance(original_inference_steps, bool) or int(original_inference_steps) != original_inference_steps \
                or original_inference_steps < 1:
            raise ArgumentError(f"original_inference_steps must be a positive integer (50 for LCM-LoRA); got {original_inference_steps!r}")
        self.original_inference_steps = int(original_inference_steps)
        self.timestep_scaling = float(timestep_scaling)
        self.default_inference_steps = min(4, self.original_inference_steps)
        super().__init__(generator, *args, **kwargs)

    def _schedule(self, n: int) -> tuple[torch.Tensor, None]:
        original, T = self.original_inference_steps, self.num_training_steps
        if original > T:
            raise ArgumentError(f"original_inference_steps={original} is more than the {T} training steps")
        if n > original:
            raise ArgumentError(
                f"num_inference_steps={n} is more than the LCM sampler's {original} original_inference_steps "
                f"(its timesteps are a subset of them); use at most {original} steps, 4-8 is typical"
            )
        k = T // original
        grid = (np.arange(1, original + 1) * k - 1)[::-1]  # 999, 979, ..., 19 for 50 of 1000 steps
        chosen = np.floor(np.linspace(0, original, num=n, endpoint=False)).astype(np.int64)
        return torch.from_numpy(grid[chosen].astype(np.int64)), None

    def boundary_scalings(self, timestep: int) -> tuple[float, float]:
        r"""$(c_\text{skip}(t), c_\text{out}(t))$ with $\sigma_\text{data} = 0.5$ and $s$ = `timestep_scaling`."""
        sigma_data, scaled = 0.5, timestep * self.timestep_scaling
        return sigma_data**2 / (scaled**2 + sigma_data**2), scaled / (scaled**2 + sigma_data**2) ** 0.5

    def step(self, timestep, latents: torch.Tensor, model_output: torch.Tensor) -> torch.Tensor:
        r"""Jump to the clean estimate $\hat z_0 = f_\theta(x_t, t)$, then (all but the last step) noise it
        afresh to the next timestep $t'$, $z \sim \mathcal{N}(0, I)$ (Luo et al. 2023, algorithm 1):

        $$x_{t'} = \sqrt{\bar\alpha_{t'}}\, \hat z_0 + \sqrt{1 - \bar\alpha_{t'}}\; z;
        \qquad \text{the last step returns } \hat z_0.$$
        """
        i = self.step_index
        if i >= len(self.timesteps):
            raise RuntimeError(f"all {len(self.timesteps)} steps are done; call set_inference_timesteps() to sample again")
        t = int(timestep)
        alpha_bar = self.alphas_cumprod[t]
        x0 = predict_x0(model_output, latents, alpha_bar**0.5, (1 - alpha_bar) ** 0.5, self.prediction_type)
        c_skip, c_out = self.boundary_scalings(t)
        denoised = c_out * x0 + c_skip * latents
        self.step_index += 1
        if i == len(self.timesteps) - 1:
            return denoised
        alpha_bar_next = self.alphas_cumprod[int(self.timesteps[i + 1])]
        return alpha_bar_next**0.5 * denoised + (1 - alpha_bar_next) ** 0.5 * self._randn(model_output)


SAMPLERS: dict[str, type[Sampler]] = {
    "ddpm": DDPMSampler,
    "ddim": DDIMSampler,
    "euler": EulerSampler,
    "euler_a": EulerAncestralSampler,
    "dpmpp_2m": DPMPP2MSampler,
    "lcm": LCMSampler,
}
#: samplers that also come as `<name>_karras`, with Karras noise levels
KARRAS_SAMPLERS = ("euler", "euler_a", "dpmpp_2m")


def sampler_names() -> list[str]:
    """Every name `make_sampler` accepts."""
    return list(SAMPLERS) + [f"{name}_karras" for name in KARRAS_SAMPLERS]


def make_sampler(name: str, generator: torch.Generator | None = None, **options) -> Sampler:
    """The sampler called `name` (see `sampler_names()`); `options` go to its constructor,
    e.g. `make_sampler("ddim", g, eta=0.5)` or `make_sampler("euler", g, timestep_spacing="trailing")`."""
    if name not in sampler_names():
        raise ArgumentError(f"unknown sampler {name!r}; choose one of: {', '.join(sampler_names())}")
    if name.endswith("_karras"):
        name, options = name.removesuffix("_karras"), {**options, "karras_sigmas": True}
    return SAMPLERS[name](generator, **options)
