r"""What every sampler shares: the noise schedule, the model's parameterisation and the `Sampler` base class.

**Forward process.** Training corrupts a clean latent $x_0$ in $T = 1000$ small Gaussian steps
with variances $\beta_1, \dots, \beta_T$. With $\alpha_t = 1 - \beta_t$ and
$\bar\alpha_t = \prod_{s \le t} \alpha_s$ any step can be reached in one jump
(DDPM, [Ho et al. 2020](https://arxiv.org/abs/2006.11239), eq. 4):

$$q(x_t \mid x_0) = \mathcal{N}\!\left(\sqrt{\bar\alpha_t}\, x_0,\; (1 - \bar\alpha_t)\, I\right)
\quad\Longleftrightarrow\quad
x_t = \sqrt{\bar\alpha_t}\, x_0 + \sqrt{1 - \bar\alpha_t}\, \epsilon, \qquad \epsilon \sim \mathcal{N}(0, I).$$

Stable Diffusion uses the "scaled linear" schedule: $\sqrt{\beta_t}$ grows linearly from
$\sqrt{0.00085}$ to $\sqrt{0.012}$.

**What the U-Net predicts** (`prediction_type`). SD 1.x learns the noise,
$\epsilon_\theta(x_t, t) \approx \epsilon$ (`"epsilon"`); SD 2.x's 768-pixel models learn the
velocity $v = \sqrt{\bar\alpha_t}\,\epsilon - \sqrt{1 - \bar\alpha_t}\, x_0$ (`"v_prediction"`,
[Salimans & Ho 2022](https://arxiv.org/abs/2202.00512)). Every sampler turns either into the
clean-latent estimate $\hat x_0$ with `predict_x0`, and into the noise with `to_eps`.

**Sampling** walks back from pure noise through a few of the 1000 training timesteps
(`timesteps`, descending). Every sampler in `sdlab` is a `Sampler` and is driven the same way,
here with sdlab's U-Net `diffusion(latents, context, timestep)`:

```python
sampler.set_inference_timesteps(50)
latents = noise * sampler.init_noise_sigma           # 1.0 here, sigma_max for Euler samplers
for t in sampler.timesteps:
    eps = diffusion(sampler.scale_model_input(latents, t), context, t)
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

from .errors import ArgumentError

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
    raise ArgumentError(f"unknown beta_schedule {schedule!r}; choose one of {BETA_SCHEDULES}")


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
    raise ArgumentError(f"unknown timestep_spacing {spacing!r}; choose one of {SPACINGS}")


def per_sample(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Reshape one value (or one per batch element) to (B, 1, 1, ...) so it broadcasts against `like`."""
    return values.flatten().view(-1, *[1] * (like.ndim - 1))


def randn(shape, generator=None, device=None, dtype=None) -> torch.Tensor:
    r"""$\mathcal{N}(0, I)$ noise of `shape`, as diffusers' `randn_tensor` draws it.

    A CPU generator draws on the CPU and the result moves to `device`, so a seed gives the same
    image on any device. `generator` may be a list, one per batch element: element $k$ of the
    batch is drawn from generator $k$ alone, so it is what a batch-1 draw from that generator gives.
    """
    if isinstance(generator, (list, tuple)):
        if len(generator) != shape[0]:
            raise ArgumentError(f"{len(generator)} generators for a batch of {shape[0]}; pass one per batch element")
        return torch.cat([randn((1, *shape[1:]), g, device, dtype) for g in generator])  # B x (1, ...) -> (B, ...)
    device = torch.device("cpu") if device is None else torch.device(device)
    draw_on = device if generator is None or generator.device.type == device.type else generator.device
    return torch.randn(tuple(shape), generator=generator, device=draw_on, dtype=dtype).to(device)


PREDICTION_TYPES = ("epsilon", "v_prediction")


def _check_prediction_type(prediction_type: str) -> None:
    if prediction_type not in PREDICTION_TYPES:
        raise ArgumentError(f"unknown prediction_type {prediction_type!r}; choose one of {PREDICTION_TYPES}")


def predict_x0(model_output: torch.Tensor, sample: torch.Tensor, alpha, sigma, prediction_type: str = "epsilon"):
    r"""The clean latent $\hat x_0$ that the model's output implies, for a `sample` $= \alpha x_0 + \sigma \epsilon$.

    The samplers' latents come in two scalings: the U-Net's own $x_t$ ($\alpha = \sqrt{\bar\alpha_t}$,
    $\sigma = \sqrt{1 - \bar\alpha_t}$) and the Euler samplers' $\tilde x = x_0 + \sigma_t \epsilon$
    ($\alpha = 1$). With $r = \sqrt{\alpha^2 + \sigma^2}$ (1 for $x_t$), `sample / r` is $x_t$ and

    * `"epsilon"`: $\hat x_0 = \dfrac{\text{sample} - \sigma\, \epsilon_\theta}{\alpha}$;
    * `"v_prediction"`, $v = \frac{\alpha}{r}\, \epsilon - \frac{\sigma}{r}\, x_0$:
      $\hat x_0 = \dfrac{\alpha}{r^2}\, \text{sample} - \dfrac{\sigma}{r}\, v_\theta$.
    """
    if prediction_type == "epsilon":
        return (sample - sigma * model_output) / alpha
    _check_prediction_type(prediction_type)
    r_squared = alpha**2 + sigma**2
    return (alpha / r_squared) * sample - (sigma / r_squared**0.5) * model_output


def to_eps(model_output: torch.Tensor, sample: torch.Tensor, alpha, sigma, prediction_type: str = "epsilon"):
    r"""The noise $\hat\epsilon$ that the model's output implies, for a `sample` $= \alpha x_0 + \sigma \epsilon$
    (see `predict_x0`):

    * `"epsilon"`: the output itself;
    * `"v_prediction"`: $\hat\epsilon = \dfrac{\sigma}{r^2}\, \text{sample} + \dfrac{\alpha}{r}\, v_\theta$.
    """
    if prediction_type == "epsilon":
        return model_output
    _check_prediction_type(prediction_type)
    r_squared = alpha**2 + sigma**2
    return (sigma / r_squared) * sample + (alpha / r_squared**0.5) * model_output


def ancestral_sigmas(sigma_from, sigma_to):
    r"""Split an ancestral step $\sigma_\text{from} \to \sigma_\text{to}$ into a deterministic step down to
    $\sigma_\downarrow$ and fresh noise $\sigma_\uparrow$ back up, $\sigma_\text{to}^2 = \sigma_\downarrow^2 + \sigma_\uparrow^2$:

    $$\sigma_\uparrow = \sqrt{\frac{\sigma_\text{to}^2 (\sigma_\text{from}^2 - \sigma_\text{to}^2)}{\sigma_\text{from}^2}},
    \qquad \sigma_\downarrow = \sqrt{\sigma_\text{to}^2 - \sigma_\uparrow^2}.$$

    Returns $(\sigma_\downarrow, \sigma_\uparrow)$.
    """
    sigma_up = (sigma_to**2 * (sigma_from**2 - sigma_to**2) / sigma_from**2) ** 0.5
    sigma_down = (sigma_to**2 - sigma_up**2) ** 0.5
    return sigma_down, sigma_up


class Sampler:
    r"""What all samplers share: the noise schedule $\bar\alpha_t$, the timestep schedule,
    image-to-image strength, the forward process `add_noise`, and the random generator.

    Subclasses implement `step` and, if they need more than a list of timesteps,
    `_schedule` (e.g. the noise levels $\sigma$ of the Euler and DPM-Solver samplers).
    The defaults are SD1.5's `scheduler_config.json`; `prediction_type` says what the model
    predicts (`"epsilon"` for SD 1.x, `"v_prediction"`; see `predict_x0`). `generator`: one
    `torch.Generator`, or a list of one per batch element (each image's noise its own; see `randn`).
    """

    #: model evaluations per step (all samplers here take one); img2img skips `start_step * order` entries
    order = 1
    #: the spacing diffusers uses for this sampler with SD1.5's config (which names none)
    default_spacing = "leading"
    #: std of the initial noise: latents start as `noise * init_noise_sigma`
    init_noise_sigma = 1.0
    #: the number of steps a new sampler is set to (until `set_inference_timesteps`)
    default_inference_steps = 50

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
        prediction_type: str = "epsilon",
    ):
        _check_prediction_type(prediction_type)
        self.prediction_type = prediction_type
        self.generator = generator
        self.num_training_steps = num_training_steps
        self.betas = make_betas(num_training_steps, beta_start, beta_end, beta_schedule)
        self.alphas = 1.0 - self.betas
        self.alphas_cumprod = torch.cumprod(self.alphas, dim=0)  # \bar\alpha_t
        self.one = torch.tensor(1.0)
        self.timestep_spacing = timestep_spacing or self.default_spacing
        if self.timestep_spacing not in SPACINGS:
            raise ArgumentError(f"unknown timestep_spacing {self.timestep_spacing!r}; choose one of {SPACINGS}")
        self.steps_offset = steps_offset
        self.set_inference_timesteps(self.default_inference_steps)

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
            raise ArgumentError(
                f"num_inference_steps must be an integer from 1 to {T} (the training steps), "
                f"got {num_inference_steps!r}; 20-50 is typical"
            )
        self.num_inference_steps = int(num_inference_steps)
        self.all_timesteps, self.all_sigmas = self._schedule(self.num_inference_steps)
        if self.all_timesteps.max() >= T:  # e.g. 1000 "leading" steps shifted by steps_offset=1
            raise ArgumentError(
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
            raise ArgumentError(f"strength must be in (0, 1] (1 = ignore the input image), got {strength!r}")
        n = self.num_inference_steps
        start_step = n - int(n * strength)
        if start_step >= n:
            raise ArgumentError(
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
        r"""$\mathcal{N}(0, I)$ noise shaped like `like`, from `self.generator` (see `randn`)."""
        return randn(like.shape, self.generator, like.device, like.dtype)

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
