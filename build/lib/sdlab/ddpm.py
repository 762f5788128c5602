r"""The DDPM sampler ([Ho et al. 2020](https://arxiv.org/abs/2006.11239)), the first and slowest one.

The noise schedule, the timestep spacings and the `Sampler` base class that every sampler shares
live in `sdlab.schedule` (importable from here too, as in the seed). Driving a sampler, with
sdlab's U-Net `diffusion(latents, context, timestep)`:

```python
sampler = DDPMSampler(torch.Generator().manual_seed(42))
sampler.set_inference_timesteps(50)
latents = noise * sampler.init_noise_sigma
for t in sampler.timesteps:
    eps = diffusion(sampler.scale_model_input(latents, t), context, t)
    latents = sampler.step(t, latents, eps)
```
"""

from __future__ import annotations

import torch

from .errors import ArgumentError

# Sampler and the schedule helpers lived here; seed code and chapter 5 import them from sdlab.ddpm.
from .schedule import Sampler, make_betas, per_sample, predict_x0, spaced_timesteps

__all__ = ["DDPMSampler", "Sampler", "make_betas", "per_sample", "spaced_timesteps"]


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
            raise ArgumentError(f"timestep {t} is not in this sampler's schedule; pass the entries of sampler.timesteps")
        i = steps.index(t)
        return steps[i + 1] if i + 1 < len(steps) else -1

    def step(self, timestep, latents: torch.Tensor, model_output: torch.Tensor) -> torch.Tensor:
        r"""$x_t \to x_{t'}$ given $\epsilon_\theta(x_t, t)$ = `model_output`.

        Estimate the clean latent (eq. 15; `predict_x0`):
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

        x0 = predict_x0(model_output, latents, alpha_bar**0.5, (1 - alpha_bar) ** 0.5, self.prediction_type)
        x0_coeff = (alpha_bar_prev**0.5 * beta) / (1 - alpha_bar)
        xt_coeff = alpha**0.5 * (1 - alpha_bar_prev) / (1 - alpha_bar)
        mean = x0_coeff * x0 + xt_coeff * latents

        self.step_index += 1
        if t == 0:
            return mean
        variance = torch.clamp((1 - alpha_bar_prev) / (1 - alpha_bar) * beta, min=1e-20)
        return mean + variance**0.5 * self._randn(model_output)
