# ---
# jupyter:
#   jupytext:
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
# ---

# %% [markdown]
# # 5. DDPM and samplers
#
# The U-Net of chapter 4 predicts noise. This chapter is about what that is for: the *forward
# process* that turns images into noise during training, the noise *schedule*, and the
# *samplers* that run the process backwards, from noise to image, in anything from a few steps to
# one per training step.
#
# :::{admonition} This chapter
# **You will learn** the forward process and the noise schedule, DDPM's reverse step, why DDIM,
# Euler and DPM++ 2M take bigger steps, that DDPM on a reduced schedule *is* DDIM with $\eta = 1$,
# how classifier-free guidance interacts with a solver's order, the VP and VE forms of the same
# noise (why Euler starts at $\sigma_\text{max}$) and where the steps fall (timestep spacing).
#
# **You need** chapter 4 (the time embedding) and the notation of chapter 0.
#
# {chapter-time}
# :::

# %% tags=["hide-input"]
# book-setup: tools/setup_cell.py goes here when the notebook is built

# %% [markdown]
# ## The forward process
#
# Training corrupts a clean latent $x_0$ in $T = 1000$ small Gaussian steps of variances
# $\beta_t$, $t = 0 \dots T - 1$ (counted from $0$ as in the code; the papers and the docstrings
# below count $1 \dots T$). With $\alpha_t = 1 - \beta_t$ and
# $\bar\alpha_t = \prod_{\tau \le t} \alpha_\tau$ any step can be reached in one jump:
#
# $$x_t = \sqrt{\bar\alpha_t}\, x_0 + \sqrt{1 - \bar\alpha_t}\, \epsilon, \qquad \epsilon \sim \mathcal{N}(0, I).$$
#
# ```{listing} sdlab.schedule.Sampler.add_noise
# ```
#
# Stable Diffusion applies it to latents, but it is easier to see on pixels. Here is the
# astronaut photo of `scikit-image`, in $[-1, 1]$, noised to a few timesteps with SD's schedule:

# %%
from PIL import Image
from skimage import data
from sdlab.ddpm import DDPMSampler
from sdlab.schedule import make_betas

photo = np.array(Image.fromarray(data.astronaut()).resize((96, 96), Image.Resampling.LANCZOS))
x0 = torch.from_numpy(photo).permute(2, 0, 1)[None].float() / 127.5 - 1  # (1, 3, 96, 96) in [-1, 1]
sampler = DDPMSampler(torch.Generator().manual_seed(0))
noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(1))

def show(x):
    return ((x[0].permute(1, 2, 0) + 1) / 2).clamp(0, 1).numpy()

def show_jpeg(fig, quality=85):
    import io
    from IPython.display import Image as Picture, display
    buffer = io.BytesIO()
    fig.savefig(buffer, format="jpeg", pil_kwargs={"quality": quality})
    plt.close(fig)
    display(Picture(buffer.getvalue(), format="jpeg", width=round(fig.get_figwidth() * fig.dpi)))  # 2x pixels

steps = [0, 100, 250, 500, 750, 999]
fig, axes = plt.subplots(1, len(steps), figsize=(11, 2.2))
for ax, t in zip(axes, steps):
    ax.imshow(show(sampler.add_noise(x0, t, noise)))
    ax.set_title(f"t = {t}, ᾱ = {sampler.alphas_cumprod[t]:.3f}", fontsize=9)
    ax.axis("off")
show_jpeg(fig)

# %% [markdown]
# ## Beta schedules, $\bar\alpha_t$ and the signal-to-noise ratio
#
# DDPM used a *linear* schedule, $\beta_t$ from $10^{-4}$ to $0.02$. Stable Diffusion uses a
# *scaled linear* one: $\sqrt{\beta_t}$ linear from $\sqrt{0.00085}$ to $\sqrt{0.012}$. What matters
# is $\bar\alpha_t$, the fraction of the signal's variance left, or the signal-to-noise ratio
# $\operatorname{SNR}(t) = \bar\alpha_t / (1 - \bar\alpha_t)$.
#
# ```{listing} sdlab.schedule.make_betas
# ```

# %%
schedules = {
    "SD scaled_linear (0.00085, 0.012)": make_betas(1000, 0.00085, 0.012, "scaled_linear"),
    "DDPM linear (1e-4, 0.02)": make_betas(1000, 1e-4, 0.02, "linear"),
    "linear (0.00085, 0.012)": make_betas(1000, 0.00085, 0.012, "linear"),
}
fig, axes = plt.subplots(1, 3, figsize=(12, 3.2))
for name, betas in schedules.items():
    alpha_bar = torch.cumprod(1 - betas, 0)
    axes[0].plot(betas, label=name)
    axes[1].plot(alpha_bar, label=name)
    axes[2].semilogy(alpha_bar / (1 - alpha_bar), label=name)
axes[0].set(title="β_t", xlabel="t")
axes[1].set(title="ᾱ_t (signal variance left)", xlabel="t")
axes[2].set(title="SNR(t) = ᾱ / (1 − ᾱ)", xlabel="t")
axes[0].legend(fontsize=9)
plt.tight_layout()
plt.show()
for name, betas in schedules.items():
    alpha_bar = torch.cumprod(1 - betas, 0)
    print(f"{name:36s} ᾱ_999 = {alpha_bar[-1].item():.4f}   SNR(999) = {(alpha_bar[-1] / (1 - alpha_bar[-1])).item():.4f}")
glue("sd_final_alpha_bar", torch.cumprod(1 - schedules["SD scaled_linear (0.00085, 0.012)"], 0)[-1])

# %% tags=["nbval-check-output"]
for name, betas in schedules.items():
    alpha_bar = torch.cumprod(1 - betas, 0)
    print(f"{name:36s} ᾱ_999 ≈ {alpha_bar[-1].item():.3f}")

# %% [markdown]
# SD's final $\bar\alpha_{999}$ is {glue:text}`sd_final_alpha_bar:.4f`, not $0$: the last training step still holds a little of the
# image (an observation that led [Lin et al. 2023](https://arxiv.org/abs/2305.08891) to propose
# zero-terminal-SNR schedules).
#
# ### Explore: schedule and timestep
#
# Choose a schedule and move $t$ to see the photo at timestep $t$ (`sdlab.explorer`: with a
# running kernel $t$ is a slider over every timestep; in the rendered book the controls move
# through stored pictures). The small-multiples figure below shows more of the same at once.

# %%
import ipywidgets as widgets
from sdlab.explorer import explorer

SCHEDULES = {"SD: scaled_linear 0.00085 → 0.012": ("scaled_linear", 0.00085, 0.012),
             "linear 0.00085 → 0.012": ("linear", 0.00085, 0.012),
             "DDPM: linear 0.0001 → 0.02": ("linear", 1e-4, 0.02)}

def noised(beta_start, beta_end, schedule, t):
    alpha_bar = torch.cumprod(1 - make_betas(1000, beta_start, beta_end, schedule), 0)[t]
    return show(alpha_bar.sqrt() * x0 + (1 - alpha_bar).sqrt() * noise), alpha_bar.item()

def schedule_frame(schedule, t):
    name, start, end = SCHEDULES[schedule]
    image, alpha_bar = noised(start, end, name, t)
    return image, f"t = {t}, ᾱ = {alpha_bar:.3f}"

explorer(schedule_frame, {"schedule": list(SCHEDULES), "t": [50, 250, 500, 750, 999]}, start={"t": 250},
         title="the photo at timestep t", width=288, image_format="jpeg",
         live={"t": widgets.IntSlider(value=250, min=0, max=999, description="t", continuous_update=False)})

# %%
settings = [("scaled_linear", 0.00085, 0.012), ("linear", 0.00085, 0.012), ("linear", 1e-4, 0.02), ("scaled_linear", 0.00085, 0.03)]
times = [50, 200, 400, 600, 800, 999]
fig, axes = plt.subplots(len(settings), len(times), figsize=(10, 7))
for row, (schedule, start, end) in enumerate(settings):
    for col, t in enumerate(times):
        image, alpha_bar = noised(start, end, schedule, t)
        axes[row, col].imshow(image)
        axes[row, col].set_xticks([])
        axes[row, col].set_yticks([])
        axes[row, col].set_title(f"t={t}  ᾱ={alpha_bar:.2f}", fontsize=9)
    axes[row, 0].set_ylabel(f"{schedule}\n{start:g} → {end:g}", fontsize=9)
fig.suptitle("rows = schedules, columns = timesteps", fontsize=10)
plt.tight_layout()
show_jpeg(fig)  # noise compresses badly as PNG: a JPEG keeps the notebook small

# %% [markdown]
# ## The reverse step
#
# A network $\epsilon_\theta(x_t, t)$ trained to predict the noise gives an estimate of the clean
# image, $\hat x_0 = (x_t - \sqrt{1 - \bar\alpha_t}\,\epsilon_\theta) / \sqrt{\bar\alpha_t}$. DDPM then
# samples $x_{t-1}$ from the Gaussian posterior $q(x_{t-1} \mid x_t, \hat x_0)$: a weighted mean of
# $\hat x_0$ and $x_t$, plus a little fresh noise.
#
# ```{listing} sdlab.ddpm.DDPMSampler.step
# ```
#
# ## A 2-D toy diffusion, trained in seconds
#
# To see a sampler at work without a U-Net, we diffuse *points in the plane*. The data are 2-D
# points on a spiral; the "U-Net" is a small MLP that takes a point $x_t$ and the sinusoidal
# embedding of $t$ (chapter 4) and predicts the noise. Training is the loss of DDPM,
# $\lVert \epsilon - \epsilon_\theta(\sqrt{\bar\alpha_t} x_0 + \sqrt{1 - \bar\alpha_t}\,\epsilon, t) \rVert^2$
# with random $t$, with `sdlab`'s own `add_noise` and schedule (SD's).

# %% tags=["nbval-check-output"]
import time
from sdlab.diffusion import get_time_embedding

def spiral(n, generator):
    s = torch.rand(n, generator=generator) * 3 * np.pi + 1.0
    points = torch.stack([s * torch.cos(s), s * torch.sin(s)], 1) / 5.0
    return points + 0.03 * torch.randn(n, 2, generator=generator)

class ToyDenoiser(torch.nn.Module):
    def __init__(self, width=128, time_dim=32):
        super().__init__()
        self.time_dim = time_dim
        self.net = torch.nn.Sequential(
            torch.nn.Linear(2 + time_dim, width), torch.nn.SiLU(),
            torch.nn.Linear(width, width), torch.nn.SiLU(),
            torch.nn.Linear(width, width), torch.nn.SiLU(),
            torch.nn.Linear(width, 2))

    def forward(self, x, t):
        t = torch.as_tensor(t, dtype=torch.float32).reshape(-1).expand(x.shape[0])
        return self.net(torch.cat([x, get_time_embedding(t, self.time_dim)], 1))

torch.set_num_threads(1)  # tiny matrices: one thread is faster than two fighting over them
g = torch.Generator().manual_seed(0)
torch.manual_seed(0)
toy = ToyDenoiser()
optimizer = torch.optim.Adam(toy.parameters(), lr=3e-3)
lr_schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=3e-3, total_steps=4000)
schedule = DDPMSampler()
losses, start = [], time.perf_counter()
for step in range(4000):
    x0_batch = spiral(512, g)
    t = torch.randint(0, 1000, (512,), generator=g)
    eps = torch.randn(512, 2, generator=g)
    loss = torch.nn.functional.mse_loss(toy(schedule.add_noise(x0_batch, t, eps), t), eps)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    lr_schedule.step()
    losses.append(loss.item())
toy.eval()
print(f"trained {sum(p.numel() for p in toy.parameters()):,} parameters for 4000 steps")

# %%
smooth = np.convolve(losses, np.ones(50) / 50, mode="valid")
fig, axes = plt.subplots(1, 2, figsize=(10, 3.2))
axes[0].plot(losses, alpha=0.3, lw=0.6)
axes[0].plot(np.arange(49, len(losses)), smooth)
axes[0].set(title="training loss (noise MSE)", xlabel="step", ylim=(0, 1.1))
data_points = spiral(2000, torch.Generator().manual_seed(5))
axes[1].scatter(*data_points.T, s=2)
axes[1].set(title="the data: 2-D points on a spiral", aspect="equal")
plt.show()

# %% [markdown]
# Every `sdlab` sampler is driven by the same loop, the one the pipeline of chapter 6 runs with
# the U-Net. Here is DDPM with half as many steps as the schedule has (`sample("ddpm", 500)`),
# recording the cloud of points on the way:

# %%
from sdlab.samplers import make_sampler

@torch.no_grad()
def sample(name, n_steps, n_points=2000, seed=0, record=()):
    generator = torch.Generator().manual_seed(seed)
    sampler = make_sampler(name, generator)
    sampler.set_inference_timesteps(n_steps)
    x = torch.randn(n_points, 2, generator=generator) * sampler.init_noise_sigma
    frames = {}
    for i, t in enumerate(sampler.timesteps):
        eps = toy(sampler.scale_model_input(x, t), t)
        x = sampler.step(t, x, eps)
        if i in record:
            frames[int(t)] = x.clone() / (sampler.sigmas[i + 1] ** 2 + 1) ** 0.5 if sampler.sigmas is not None else x.clone()
    return x, frames

final, frames = sample("ddpm", 500, record=(0, 250, 400, 450, 480, 499))
fig, axes = plt.subplots(1, len(frames), figsize=(12, 2.3))
for ax, (t, points) in zip(axes, frames.items()):
    ax.scatter(*points.T, s=1)
    ax.set(title=f"after t = {t}", xlim=(-3, 3), ylim=(-3, 3), xticks=[], yticks=[], aspect="equal")
plt.show()

# %% [markdown]
# ## DDIM, Euler, DPM++ side by side
#
# DDPM was designed to run all $T$ steps, each removing a little noise and adding some back. Run
# on a reduced schedule, it is not a different method any more: its step from $t$ to $t'$ is
# exactly DDIM's step with $\eta = 1$ (checked below). The other samplers see sampling as solving an
# ODE (or SDE) in the noise level and take bigger, smarter steps:
#
# * **DDIM** ([Song et al. 2020](https://arxiv.org/abs/2010.02502)): deterministic; jumps from
#   $t$ to $t'$ along the direction of the predicted noise.
# * **Euler** ([Karras et al. 2022](https://arxiv.org/abs/2206.00364)): Euler's method on the
#   probability-flow ODE in $\sigma = \sqrt{(1 - \bar\alpha)/\bar\alpha}$.
# * **Euler a**: Euler, plus fresh noise at each step (ancestral).
# * **DPM++ 2M** ([Lu et al. 2022](https://arxiv.org/abs/2211.01095)): a second-order multistep
#   solver that reuses the previous step's prediction.
#
# ```{listing} sdlab.samplers.DDIMSampler.step
# ```
#
# Same model, same starting noise, `10` and `25` steps each:

# %%
names = ["ddpm", "ddim", "euler", "euler_a", "dpmpp_2m"]
fig, axes = plt.subplots(2, len(names), figsize=(12, 5))
reference_points = spiral(2000, torch.Generator().manual_seed(5))
for row, n_steps in enumerate((10, 25)):
    for col, name in enumerate(names):
        points, _ = sample(name, n_steps)
        ax = axes[row, col]
        ax.scatter(*reference_points.T, s=1, color="#dddddd")
        ax.scatter(*points.T, s=1)
        ax.set(xlim=(-3, 3), ylim=(-3, 3), xticks=[], yticks=[], aspect="equal")
        ax.set_title(f"{name}, {n_steps} steps", fontsize=9)
plt.tight_layout()
plt.show()

# %% [markdown]
# To compare them with a number, measure how far each generated point lies from the nearest
# point of the data (lower is better; the data's own noise is the `0.03` of `spiral`):

# %%
reference_points = spiral(5000, torch.Generator().manual_seed(5))
table = {}
print("mean distance to the data   " + "".join(f"{name:>10s}" for name in names))
for n_steps in (5, 10, 25, 100):
    table[n_steps] = {name: torch.cdist(sample(name, n_steps)[0], reference_points).min(1).values.mean().item()
                      for name in names}
    print(f"{n_steps:4d} steps                  " + "".join(f"{table[n_steps][name]:10.3f}" for name in names))
for n_steps, row in table.items():
    glue(f"toy_best_{n_steps}", min(row, key=row.get))
    glue(f"toy_spread_{n_steps}", max(row.values()) - min(row.values()))
    for name in ("ddpm", "ddim", "dpmpp_2m"):
        glue(f"toy_{name}_{n_steps}", row[name])
glue("toy_ddpm_vs_ddim_25", "lower" if table[25]["ddpm"] < table[25]["ddim"] else "higher")

# %% [markdown]
# On this toy the best sampler at `5` steps is {glue:text}`toy_best_5`, at `10`
# {glue:text}`toy_best_10` and at `25` {glue:text}`toy_best_25`; the spread between the samplers
# shrinks from {glue:text}`toy_spread_5:.3f` at `5` steps to {glue:text}`toy_spread_100:.3f` at
# `100`, where what is left is the model's error, not the sampler's. DDPM does not need hundreds of
# steps here: at `25` its distance, {glue:text}`toy_ddpm_25:.3f`, is {glue:text}`toy_ddpm_vs_ddim_25`
# than DDIM's {glue:text}`toy_ddim_25:.3f` — it is DDIM with fresh noise, as the next cell checks.
#
# ### DDPM on fewer steps is DDIM with $\eta = 1$
#
# DDIM's fresh noise has variance
# $\eta^2 \frac{1 - \bar\alpha_{t'}}{1 - \bar\alpha_t}\bigl(1 - \bar\alpha_t / \bar\alpha_{t'}\bigr)$,
# and with $\eta = 1$ that is DDPM's posterior variance $\tilde\beta_t$ for the jump $t \to t'$
# (whose $\beta$ is $1 - \bar\alpha_t / \bar\alpha_{t'}$); the means agree too. Given the same
# latents, the same noise prediction and generators in the same state, the two samplers' steps:

# %% tags=["nbval-check-output"]
for n_steps in (10, 25):
    ddpm = make_sampler("ddpm", torch.Generator().manual_seed(3))
    ddim = make_sampler("ddim", torch.Generator().manual_seed(3), eta=1.0)
    ddpm.set_inference_timesteps(n_steps)
    ddim.set_inference_timesteps(n_steps)
    x = torch.randn(2000, 2, generator=torch.Generator().manual_seed(0))
    eps = torch.randn(2000, 2, generator=torch.Generator().manual_seed(1))
    gaps = [(ddpm.step(t, x, eps) - ddim.step(t, x, eps)).abs().max().item() for t in ddpm.timesteps]
    print(f"{n_steps} steps: equal to 1e-5 on every step but the last: {max(gaps[:-1]) < 1e-5}; "
          f"last step (t = {int(ddpm.timesteps[-1])}) differs: {gaps[-1] > 1e-2}")

# %% [markdown]
# Only the very last step differs: DDPM lands on $\bar\alpha = 1$ without noise, while SD's DDIM
# configuration (`set_alpha_to_one=False`) stops at $\bar\alpha_0$ and still adds its $\eta$-scaled
# noise.
#
# ### Guidance and the solver's order at few steps
#
# The second-order DPM++ 2M corrects its step with the previous step's $\hat x_0$. With strong
# classifier-free guidance (chapter 6) the guided $\hat x_0$ changes a lot from step to step, and
# at few steps that correction can overshoot. The tiny model of chapter 7 and its analyzer measure
# it: the fraction of held-out prompts whose every attribute is right, at `10` steps, for the
# second-order DPM++ 2M and the first-order DDIM and Euler, at two guidance scales.

# %%
from sdlab import model_loader
from sdlab.tiny.analyzer import evaluate
from sdlab.tiny.data import heldout_prompts
from sdlab.tiny.evaluate import generate_batch

tiny = model_loader.preload_models_from_standard_weights()
prompts, seeds = heldout_prompts(32, seed=0), list(range(1000, 1032))  # as chapter 8
right = {}
for cfg in (2.0, 5.0):
    for name in ("dpmpp_2m", "ddim", "euler"):
        right[name, cfg] = evaluate(prompts, generate_batch(tiny, prompts, seeds, name, 10, cfg_scale=cfg))["all"]
right["dpmpp_2m", 5.0, 20] = evaluate(prompts, generate_batch(tiny, prompts, seeds, "dpmpp_2m", 20, cfg_scale=5.0))["all"]
print(f"{len(prompts)} held-out prompts, 10 steps   CFG 2   CFG 5")
for name in ("dpmpp_2m", "ddim", "euler"):
    print(f"{name:28s} {right[name, 2.0]:6.0%} {right[name, 5.0]:7.0%}")
print(f"dpmpp_2m, 20 steps, CFG 5: {right['dpmpp_2m', 5.0, 20]:.0%}")
glue("order_prompts", len(prompts))
for (name, cfg, *steps), value in right.items():
    glue(f"order_{name}_{cfg:g}" + (f"_{steps[0]}" if steps else ""), value)
glue("order_first_beats_second", "better" if min(right["ddim", 5.0], right["euler", 5.0]) > right["dpmpp_2m", 5.0] else "no better")
glue("order_cfg_helps", "rises" if right["dpmpp_2m", 2.0] > right["dpmpp_2m", 5.0] else "does not rise")
glue("tiny_cfg", tiny["diffusion"].sampling.cfg_scale)

# %% [markdown]
# :::{admonition} The tiny model, not SD1.5
# :class: note
# These numbers are the tiny model's. At `10` steps and CFG `5`, DPM++ 2M gets
# {glue:text}`order_dpmpp_2m_5:.0%` of the {glue:text}`order_prompts` prompts fully right, and the
# first-order samplers do {glue:text}`order_first_beats_second` (DDIM {glue:text}`order_ddim_5:.0%`,
# Euler {glue:text}`order_euler_5:.0%`); lowering the guidance to `2`, DPM++ 2M's score
# {glue:text}`order_cfg_helps` to {glue:text}`order_dpmpp_2m_2:.0%`, and with `20` steps at CFG `5`
# it reaches {glue:text}`order_dpmpp_2m_5_20:.0%`. So the few-step failure is the second-order
# correction under strong guidance, not the model: with a small guidance scale, more steps, or a
# first-order step, it goes away. (Strong guidance costs the tiny model colours even at `20` steps,
# so it samples at CFG {glue:text}`tiny_cfg` by default: `python -m sdlab evaluate --cfg-scale` measures
# any scale, and chapter 7 shows the figures at the default.) On SD1.5, DPM++ 2M at about twenty steps and CFG `7.5` is the
# usual choice; at very few steps and high guidance the same overshoot is why first-order or
# "lower order final" variants exist.
# :::

# %% [markdown]
# ### Explore: sampler, steps, guidance
#
# The same comparison on one picture of the tiny model, with the analyzer's reading under it
# (✓ when every attribute matches the prompt):

# %%
from sdlab import pipeline
from sdlab.tiny.analyzer import verdict

EXPLORE_PROMPT = "a small red circle to the left of a large blue square"

def sampler_frame(sampler_name, steps, cfg_scale):
    picture = pipeline.generate(EXPLORE_PROMPT, models=tiny, seed=4, sampler_name=sampler_name, n_inference_steps=steps,
                                cfg_scale=cfg_scale, height=64, width=64, progress=False)
    return picture, verdict(EXPLORE_PROMPT, picture)

explorer(sampler_frame, {"sampler_name": ["ddim", "euler", "euler_a", "dpmpp_2m"], "steps": [4, 10, 25],
                         "cfg_scale": [2.0, 7.5]}, start={"steps": 10, "cfg_scale": 7.5},
         title=f"“{EXPLORE_PROMPT}” (the tiny model)")

# %% [markdown]
# ### One process, two parametrisations: VP and VE
#
# DDPM and DDIM keep their latents *variance preserving* (VP):
# $x_t = \sqrt{\bar\alpha_t}\,x_0 + \sqrt{1 - \bar\alpha_t}\,\epsilon$ has variance close to $1$ at every
# $t$. The Euler samplers use the *variance exploding* (VE) form of the very same process,
# $\tilde x_t = x_t / \sqrt{\bar\alpha_t} = x_0 + \sigma_t\,\epsilon$ with
# $\sigma_t = \sqrt{(1 - \bar\alpha_t)/\bar\alpha_t}$: the signal keeps its size and the noise grows.
# That is why an Euler sampler starts from noise times `init_noise_sigma`, about $\sigma_\text{max}$,
# instead of $1$, and why its `scale_model_input` divides by $\sqrt{\sigma_t^2 + 1}$ before every
# U-Net call: it hands the network the VP latents it was trained on. The check, on the toy's
# points, at the first timestep of a run of $10$ steps:

# %% tags=["nbval-check-output"]
euler, ddim = make_sampler("euler"), make_sampler("ddim")
for s in (euler, ddim):
    s.set_inference_timesteps(10)
a = euler.alphas_cumprod
sigma_max = ((1 - a[-1]) / a[-1]).sqrt().item()
x0_points = spiral(2000, torch.Generator().manual_seed(5))
eps = torch.randn(x0_points.shape, generator=torch.Generator().manual_seed(6))
t_first = int(euler.timesteps[0])
ve = euler.add_noise(x0_points, t_first, eps)  # x0 + σ ε
vp = ddim.add_noise(x0_points, t_first, eps)  # √ᾱ x0 + √(1-ᾱ) ε
print(f"σ at the last training step: {sigma_max:.2f}; Euler's init_noise_sigma: {euler.init_noise_sigma:.2f}")
print(f"t = {t_first}: scale_model_input(VE latents) is the VP latents:",
      (euler.scale_model_input(ve, t_first) - vp).abs().max().item() < 1e-5)
print(f"std of the VE latents {ve.std().item():.1f}, of the VP latents {vp.std().item():.2f}")
glue("sigma_max", f"{sigma_max:.2f}")
glue("euler_init_sigma", f"{euler.init_noise_sigma:.2f}")

# %% [markdown]
# So "Euler starts at $\sigma \approx$ {glue:text}`sigma_max`" is the same statement as "DDIM
# starts at $\bar\alpha_{999}$": one noise level written in the two conventions (Euler's
# `init_noise_sigma` is {glue:text}`euler_init_sigma`).
#
# ### Where the steps fall: timestep spacing
#
# With $n$ steps out of $T$ there are three rules in use (`sdlab.schedule.spaced_timesteps`):
# *leading* (SD1.5's configuration: multiples of $T/n$, shifted by `steps_offset`), *linspace* (both
# ends included) and *trailing* (counted down from the last step). The first step is where they
# differ most:

# %% tags=["nbval-check-output"]
from sdlab.schedule import SPACINGS, spaced_timesteps

for spacing in SPACINGS:
    t = spaced_timesteps(10, spacing).round().astype(int)
    print(f"{spacing:9s} {' '.join(f'{v:3d}' for v in t)}   ᾱ at the first step: {a[t[0]].item():.4f}")
print("DDIM's own 10 steps are the leading ones:", np.array_equal(ddim.timesteps.numpy(), spaced_timesteps(10, "leading")))
first = {spacing: spaced_timesteps(10, spacing).round().astype(int)[0] for spacing in SPACINGS}
glue("leading_first", int(first["leading"]))
glue("leading_first_signal", f"{a[first['leading']].sqrt().item():.3f}")

# %% [markdown]
# Under leading spacing a run of $10$ steps starts at $t$ = {glue:text}`leading_first`, where
# $\sqrt{\bar\alpha}$ = {glue:text}`leading_first_signal`: the starting latents are pure noise, but
# the model is told they still hold some signal. [Lin et al. 2023](https://arxiv.org/abs/2305.08891)
# recommend trailing spacing (which starts at the last step) for that reason; every sdlab sampler
# takes `timestep_spacing=`.
#
# The noise levels each sampler visits:

# %%
fig, ax = plt.subplots(figsize=(8, 3))
for name in ("ddpm", "ddim", "euler", "euler_karras", "dpmpp_2m"):
    s = make_sampler(name)
    s.set_inference_timesteps(20)
    t = s.timesteps.float()
    sigma = (((1 - s.alphas_cumprod) / s.alphas_cumprod) ** 0.5)[t.round().long()]
    ax.semilogy(range(len(t)), sigma, "o-", ms=3, label=name)
ax.set(xlabel="step", ylabel="σ_t", title="20 steps: the noise level at each step")
ax.legend(fontsize=9)
plt.show()
print({name: len(make_sampler(name).timesteps) for name in ("ddpm", "ddim", "euler", "dpmpp_2m")})

# %% [markdown]
# ## Summary
#
# * Forward process: $x_t = \sqrt{\bar\alpha_t}\,x_0 + \sqrt{1 - \bar\alpha_t}\,\epsilon$; the
#   schedule $\beta_t$ fixes how fast the signal fades (SD: scaled linear, $\bar\alpha_{999}$ =
#   {glue:text}`sd_final_alpha_bar:.4f`).
# * The network predicts $\epsilon$; from it, $\hat x_0$; a sampler turns $\hat x_0$ and $x_t$ into
#   a less noisy $x_{t'}$.
# * DDPM on a reduced schedule is DDIM with $\eta = 1$; on the toy every sampler is within
#   {glue:text}`toy_spread_25:.3f` of the others by `25` steps.
# * At few steps a second-order solver under strong guidance can overshoot: on the tiny model
#   DPM++ 2M at `10` steps gets {glue:text}`order_dpmpp_2m_5:.0%` right at CFG `5`,
#   {glue:text}`order_dpmpp_2m_2:.0%` at CFG `2`.
# * Every `sdlab` sampler runs the same loop: `scale_model_input`, model, `step`.
#
# ## Exercises
#
# Each exercise names the check that grades it (`from sdlab.exercises import ...`); the worked
# solutions are on the [solutions](course/solutions.ipynb) page.
#
# :::{exercise}
# :label: ex-5-1
#
# Compute $\bar\alpha_t$ of the DDPM linear schedule ($\beta_t$ from $10^{-4}$ to $0.02$) yourself,
# then train the toy model with it (`DDPMSampler(beta_schedule="linear", beta_start=1e-4,
# beta_end=0.02)`). Does sampling get better or worse at `25` steps?
# Check: `check_alphas_cumprod(alphas_cumprod)`.
# :::
#
# :::{exercise}
# :label: ex-5-2
#
# Write `x0_hat(x_t, eps, alpha_bar)` and plot $\hat x_0$ (not $x_t$) at each DDPM step. When
# does the spiral "appear"? Check: `check_predict_x0(x0_hat)`.
# :::
#
# :::{exercise}
# :label: ex-5-3
#
# Write `ddim_sigma(alpha_bar, alpha_bar_prev, eta)`, the standard deviation of the noise a DDIM
# step adds (equation $16$ of the DDIM paper), and show that at $\eta = 1$ it is DDPM's $\sqrt{\tilde\beta_t}$.
# Check: `check_ddim_sigma(ddim_sigma)`.
# :::
#
# Test yourself with {ref}`this chapter's quiz <quiz-samplers>`; the slides for teaching it are
# linked from the {doc}`Instructors page <course/instructors>`.
