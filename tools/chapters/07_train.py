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
# # 7. Train your own tiny Stable Diffusion
#
# Stable Diffusion 1.5 was trained on billions of captioned images on a cluster of GPUs. The
# *same* code can be trained on a laptop CPU if the world is made small: 64×64 pictures of
# coloured shapes whose captions describe them completely. This chapter shows the data, runs a
# short training live, and then uses the weights that ship with `sdlab`, trained the same way for
# longer (`python -m sdlab train`).
#
# :::{admonition} This chapter
# **You will learn** how a captioned data set and two training stages (the VAE, then the text
# encoder and U-Net) make a text-to-image model, what the training loss is — the DDPM noise loss,
# how it follows from the ELBO, weighted by Min-SNR, with an average of the weights (EMA) kept —
# and how to measure prompt following.
#
# **You need** chapters 2–6.
#
# {chapter-time}
# :::

# %% tags=["hide-input"]
# book-setup: tools/setup_cell.py goes here when the notebook is built

# %% [markdown]
# ## The data: Shapes
#
# ```{listing} sdlab.tiny.data.caption
# ```
#
# Each image holds one or two objects; each object has a shape (circle, square, triangle), a
# colour (one of {glue:text}`n_colours`), a size (one of {glue:text}`n_sizes`) and a position on a
# 3×3 grid, and two objects are related by
# *left of / right of / above / below*. A few *combinations* never appear in training (the
# held-out split), although each attribute does: generating them tests whether the model
# composes what it learned.

# %%
import textwrap

from sdlab.tiny import data as shapes

dataset = shapes.ShapesDataset(12, seed=0, split="train")
fig, axes = plt.subplots(2, 6, figsize=(12, 4.6))
for ax, i in zip(axes.flat, range(len(dataset))):
    ax.imshow(dataset.image(i))
    ax.set_title("\n".join(textwrap.wrap(dataset.captions[i], 24)), fontsize=9)
    ax.axis("off")
plt.tight_layout()
plt.show()

# %% tags=["nbval-check-output"]
print(len(shapes.sample_scenes(2000, seed=0, split="train")), "training scenes drawn, for example:")
glue("n_colours", len(shapes.COLOURS))
glue("n_sizes", len(shapes.SIZES))
for scene in shapes.sample_scenes(3, seed=1, split="train"):
    print("  ", shapes.caption(scene))
print("held-out prompts, for example:")
for prompt in shapes.heldout_prompts(3, seed=0):
    print("  ", prompt)

# %% [markdown]
# A reader's first prompt is rarely a full caption: "a red circle", "two big squares". So each
# training picture also gets paraphrases (`shapes.paraphrase`): synonyms ("big", "in the middle",
# "under"), with or without an article, some attributes left out, and "two … circles" for two objects
# of one shape. A paraphrase never says anything false, so a word left out comes to mean "any",
# and a singular noun one object. Training draws one of each picture's
# {glue:text}`caption_variants` captions at random, the full one among them.
#
# ```{listing} sdlab.tiny.data.paraphrase
# ```

# %% tags=["nbval-check-output"]
from sdlab.tiny.train import TrainSettings

for texts in shapes.caption_variants(shapes.sample_scenes(3, seed=1, split="train"), TrainSettings().caption_variants):
    print(" | ".join(texts))

# %% [markdown]
# ## The tiny model
#
# The same classes as SD1.5, with small sizes: a CLIP of {glue:text}`tiny_clip_layers` layers
# and width {glue:text}`tiny_clip_width` (with the real tokenizer and vocabulary), a VAE that
# still down-samples {glue:text}`tiny_downscale`× into {glue:text}`tiny_latent_channels` latent
# channels (64×64 images → 8×8×4 latents), and a U-Net of {glue:text}`tiny_unet_levels` levels with
# attention at every level: {glue:text}`tiny_fraction` of SD1.5's parameters.
#
# ```{listing} sdlab.config.TINY
# ```

# %% tags=["nbval-check-output"]
from sdlab import model_loader
from sdlab.config import TINY

print(model_loader.describe(model_loader.build_models(TINY)))

# %%
from sdlab.config import SD15

with torch.device("meta"):  # shapes only
    sizes = {name: sum(p.numel() for m in model_loader.build_models(config).values() for p in m.parameters())
             for name, config in (("tiny", TINY), ("SD1.5", SD15))}
print(f"tiny {sizes['tiny']:,} parameters, SD1.5 {sizes['SD1.5']:,}: 1/{sizes['SD1.5'] / sizes['tiny']:.0f}")
glue("tiny_fraction", f"1/{sizes['SD1.5'] / sizes['tiny']:.0f}")
glue("tiny_clip_layers", TINY.clip.n_layer)
glue("tiny_clip_width", TINY.clip.n_embd)
glue("tiny_downscale", 2 ** (len(TINY.vae.channel_mult) - 1))
glue("tiny_latent_channels", TINY.vae.latent_channels)
glue("tiny_unet_levels", len(TINY.unet.channel_mult))
glue("sd15_scale", SD15.vae.scale_factor)

# %% [markdown]
# ## A short training run, live
#
# Training has two stages, as for the real model. First the **VAE** learns to reconstruct the
# images (with a KL term so light that the latents stay nearly deterministic: a heavier one let
# the posterior noise blur small circles into squares); its latent scale factor is then measured,
# as SD's {glue:text}`sd15_scale` was. Then the **text encoder and the U-Net** learn together to
# predict the noise added to the latents, with {glue:text}`caption_dropout:.0%` of the captions
# dropped to the empty prompt so that the same network also learns the unconditional prediction
# that classifier-free guidance needs. (SD1.5 did not train its text encoder: it kept OpenAI's
# CLIP frozen, chapter 2. The tiny model has no pretrained encoder to borrow, so it learns one.)
#
# The loss is DDPM's "simple" loss, $\lVert \epsilon - \epsilon_\theta(x_t, t, c) \rVert^2$ at a random
# $t$, with two changes from the plain version:
#
# * **Min-SNR weighting** ([Hang et al. 2023](https://arxiv.org/abs/2303.09556)): each sample's loss
#   is multiplied by $\min(\operatorname{SNR}(t), \gamma) / \operatorname{SNR}(t)$ with
#   $\gamma$ = {glue:text}`min_snr:g`, so the low-noise (high-SNR) timesteps, whose gradients
#   pull against the others', weigh less: the paper finds training converges faster;
# * **EMA**: an exponential moving average of the weights (decay {glue:text}`ema_decay:g`) is kept
#   beside the trained ones and is what ships; it smooths out the last steps' noise.
#
# SD1.5's own training used the plain loss; EMA weights are what `v1-5-pruned-emaonly` holds.
#
# ```{listing} sdlab.tiny.train.diffusion_loss
# ```
#
# ```{listing} sdlab.tiny.train.EMA
# ```
#
# A few dozen steps of each stage run in seconds here: enough to see the losses fall, far from
# enough to draw shapes (the shipped model trained for thousands of steps).

# %% [markdown]
# ### Where the simple loss comes from
#
# DDPM is trained by maximising a lower bound on $\log p_\theta(x_0)$, the ELBO. Up to terms that do
# not depend on $\theta$, its negative is a sum over timesteps of KL divergences between the true
# posterior $q(x_{t-1} \mid x_t, x_0)$ and the model's step $p_\theta(x_{t-1} \mid x_t)$, two Gaussians
# with the same variance $\sigma_t^2$, so each is a squared distance between their means:
# $L_{t-1} = \mathbb{E}\,\lVert \tilde\mu_t - \mu_\theta \rVert^2 / (2\sigma_t^2)$. Writing both means
# through the noise, $\mu = \bigl(x_t - \tfrac{\beta_t}{\sqrt{1 - \bar\alpha_t}}\,\epsilon\bigr)/\sqrt{\alpha_t}$,
# turns every term into a weighted noise-prediction error,
#
# $$L_{t-1} = \lambda_t\, \mathbb{E}\,\lVert \epsilon - \epsilon_\theta(x_t, t) \rVert^2, \qquad
# \lambda_t = \frac{\beta_t^2}{2\sigma_t^2\,\alpha_t\,(1 - \bar\alpha_t)}.$$
#
# [Ho et al. 2020](https://arxiv.org/abs/2006.11239) drop the $\lambda_t$: $L_\text{simple}$ weighs
# every timestep alike, which is a *reweighted* ELBO that trains better samplers. Min-SNR-$\gamma$
# changes the weights once more, to $\min(\operatorname{SNR}_t, \gamma)/\operatorname{SNR}_t$ with
# $\operatorname{SNR}_t = \bar\alpha_t / (1 - \bar\alpha_t)$. The three weightings, on SD's schedule
# (with $\sigma_t^2 = \tilde\beta_t$, DDPM's posterior variance), each scaled to a mean of $1$:

# %%
from sdlab.ddpm import DDPMSampler
from sdlab.tiny.train import TrainSettings

schedule = DDPMSampler()
betas, alphas, alpha_bar = schedule.betas.double(), schedule.alphas.double(), schedule.alphas_cumprod.double()
alpha_bar_prev = torch.cat([torch.ones(1, dtype=torch.float64), alpha_bar[:-1]])
posterior_variance = betas * (1 - alpha_bar_prev) / (1 - alpha_bar)  # β̃_t
t_range = torch.arange(1, len(betas))  # t = 0 is the decoder term, not a KL
elbo = betas[t_range] ** 2 / (2 * posterior_variance[t_range] * alphas[t_range] * (1 - alpha_bar[t_range]))
snr = alpha_bar[t_range] / (1 - alpha_bar[t_range])
gamma = TrainSettings().min_snr
weights = {"ELBO, λ_t": elbo, "L_simple": torch.ones_like(elbo), f"Min-SNR, γ = {gamma:g}": snr.clamp(max=gamma) / snr}
fig, ax = plt.subplots(figsize=(6.4, 2.8), layout="constrained")
for name, w in weights.items():
    ax.semilogy(t_range, w / w.mean(), label=name)
ax.set(xlabel="timestep t", ylabel="weight / its mean", title="how much each timestep counts in the loss")
ax.legend(fontsize=9)
plt.show()
ratio = (elbo[0] / elbo[len(elbo) // 2]).item()
print(f"ELBO weight of t = 1 against t = {t_range[len(elbo) // 2].item()}: {ratio:,.0f}×")
glue("elbo_ratio", f"{ratio:,.0f}")
glue("elbo_mid_t", t_range[len(elbo) // 2].item())

# %% [markdown]
# The true ELBO weighs the nearly clean steps most (at $t = 1$, {glue:text}`elbo_ratio` times the
# weight at $t$ = {glue:text}`elbo_mid_t`): details a viewer cannot see. $L_\text{simple}$ moves that weight to the noisy steps, where the layout is decided,
# and Min-SNR lowers the clean end further still.

# %%
import time
import warnings
from sdlab.tiny.train import train

defaults = TrainSettings()
glue("caption_dropout", defaults.caption_dropout)
glue("caption_variants", defaults.caption_variants)
glue("min_snr", defaults.min_snr)
glue("ema_decay", defaults.ema_decay)

torch.set_num_threads(1)  # the tiny model: one thread is faster and steadier than two
start = time.perf_counter()
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    run = train(out=None, n_images=500, vae_steps=40, vae_batch=8, unet_steps=60, unet_batch=16,
                psnr_images=20, progress=False, log=lambda message: None, save_every=10**9)
seconds = time.perf_counter() - start
vae_history, unet_history = np.array(run["history"]["vae"]), np.array(run["history"]["unet"])
fig, axes = plt.subplots(1, 2, figsize=(10, 3))
axes[0].plot(vae_history[:, 0], vae_history[:, 1])
axes[0].set(title="stage 1: VAE reconstruction loss", xlabel="step")
axes[1].plot(unet_history[:, 0], unet_history[:, 1])
axes[1].set(title="stage 2: U-Net noise-prediction loss", xlabel="step")
plt.show()
print(f"{len(vae_history)} VAE steps and {len(unet_history)} U-Net steps in {seconds:.0f} s")

# %% [markdown]
# ## The shipped weights
#
# `sdlab/data/tiny.safetensors` is the result of the full run, saved in the original SD key
# layout with its config in the metadata, so it loads exactly like the real checkpoint. (The full
# run was made before the paraphrases existed; the shipped model is that run trained on for
# {glue:text}`continued_steps` more steps with them, from its weights: `python -m sdlab train --init`.)
# Here it generates from full and plain prompts, and from held-out combinations; the analyzer of
# `sdlab.tiny.analyzer` reads each picture back and checks it against its prompt (a plain prompt
# only on what it says).

# %%
from sdlab.tiny import analyzer
from sdlab.tiny.evaluate import generate_batch

if model_loader.DEFAULT_CHECKPOINT.exists():
    tiny = model_loader.preload_models_from_standard_weights()
    prompts = ["a large red circle in the center", "a large green circle to the left of a small white square",
               "a yellow triangle", "two big purple squares", *shapes.heldout_prompts(4, seed=0)]
    with torch.no_grad():
        images = generate_batch(tiny, prompts, seeds=list(range(len(prompts))), sampler_name="dpmpp_2m",
                                n_inference_steps=20)  # the model's own guidance
    fig, axes = plt.subplots(2, 4, figsize=(11, 7.0))
    for ax, prompt, image in zip(axes.flat, prompts, images):
        ok = analyzer.score(prompt, image)["all"] == 1.0
        ax.imshow(image)
        ax.set_title("\n".join(textwrap.wrap(prompt, 26)) + ("\n✓ analyzer agrees" if ok else "\n✗ analyzer disagrees"),
                     fontsize=9, color="black" if ok else "firebrick")
        ax.axis("off")
    fig.suptitle("the tiny sdlab model: full and plain prompts (top), held-out combinations (bottom)", fontsize=9)
    plt.tight_layout()
    plt.show()
else:
    print("the bundled tiny model is not installed: train it with `python -m sdlab train`")

# %% [markdown]
# ## How well it follows prompts
#
# `python -m sdlab evaluate` generates one image for each of {glue:text}`report_prompts` held-out prompts (every one uses
# a combination never seen in training), reads each back with the analyzer and reports the
# fraction right per attribute, for several samplers and step counts, plus the same on prompts
# like the training ones. The figures of the shipped model, from `sdlab/data/tiny_report.json`:

# %% tags=["nbval-check-output"]
import json

from sdlab.tiny.evaluate import prompt_families

report = json.loads((model_loader.DEFAULT_CHECKPOINT.parent / "tiny_report.json").read_text())
print(f"{report['n_prompts']} prompts per row, guidance (CFG) {report['heldout'][0]['cfg_scale']:g}\n")
print(f"{'prompts':10s} {'sampler':16s} {'steps':>5s}" + "".join(f"{k:>9s}" for k in ("colour", "shape", "size", "position", "relation", "all")))
for split in ("heldout", "train_split"):
    for row in report[split]:
        print(f"{split.replace('_split', ''):10s} {row['sampler']:16s} {row['steps']:5d}"
              + "".join(f"{row[k]:9.1%}" for k in ("colour", "shape", "size", "position", "relation", "all")))
print(f"\n{'family':20s} {'example':54s}" + "".join(f"{k:>9s}" for k in ("count", "colour", "shape", "all")))
for name, row in report["families"].items():
    example = prompt_families(1)[name][0]
    print(f"{name:20s} {example:54s}" + "".join(f"{row[k]:9.1%}" if k in row else f"{'':9s}" for k in ("count", "colour", "shape", "all")))
families = report["families"]
glue("plain_all", f"{families['plain']['all']:.0%}")
glue("plain_heldout_all", f"{families['plain_heldout_pairs']['all']:.0%}")
glue("two_heldout_all", f"{families['two_object_heldout']['all']:.0%}")
glue("paraphrased_all", f"{families['paraphrased_heldout']['all']:.0%}")
training = report["training"]
glue("continued_steps", f"{sum(run['settings']['unet_steps'] for run in training['continued']):,}")
glue("report_prompts", report["n_prompts"])
print(f"\nVAE reconstruction PSNR {report['vae_psnr_db']} dB; one 64x64 image in {report['seconds_per_64px_image']} s;"
      f" trained in {training['total_seconds'] / 60:.0f} min, then continued for"
      f" {sum(run['total_seconds'] for run in training['continued']) / 60:.0f} min, on {training['settings']['threads']} CPU threads")

# %% [markdown]
# Plain prompts such as "a red circle" give exactly one object of the right colour and shape in
# {glue:text}`plain_all` of the pictures ({glue:text}`plain_heldout_all` for the held-out pairs,
# "a red square", which no training picture showed). Two-object prompts with a held-out pair are
# right in every attribute in {glue:text}`two_heldout_all`, and held-out scenes said in free words
# in {glue:text}`paraphrased_all`.

# %% [markdown]
# ## Summary
#
# * A captioned synthetic data set small enough for a CPU, whose captions can be checked by
#   reading the pictures back.
# * The same classes as SD1.5, {glue:text}`tiny_fraction` of the size; two training stages: the
#   VAE, then CLIP and the U-Net together on the Min-SNR-weighted DDPM loss, with caption dropout
#   for classifier-free guidance and an EMA of the weights (SD1.5 kept its CLIP frozen).
# * The trained weights load through the same loader as the real checkpoint and run through the
#   same pipeline as in chapter 6.
#
# ## Exercises
#
# Each exercise with a check names it (`from sdlab.exercises import ...`); the worked solutions
# are on the [solutions](course/solutions.ipynb) page.
#
# :::{exercise}
# :label: ex-7-1
#
# Train without caption dropout (`caption_dropout=0`). What happens to the pictures at CFG
# scale `5`, and why? (A question to answer in words.)
# :::
#
# :::{exercise}
# :label: ex-7-2
#
# Plot the U-Net loss per timestep bucket: write `bucket_means(timesteps, losses, n_buckets)`, the
# mean loss in each of `n_buckets` equal ranges of $t$. Which timesteps are hardest to predict?
# Check: `check_loss_per_bucket(bucket_means)`.
# :::
#
# :::{exercise}
# :label: ex-7-3
#
# Make the VAE down-sample $4\times$ instead of $8\times$ (`channel_mult=(1, 2, 4)`). What
# latent shape does a 64×64 picture get, what does it cost in U-Net FLOPs (`FlopCounterMode`), and
# what does it buy in reconstruction quality?
# Check: `check_vae_downsampling(latent_shape, unet_flops_ratio)`.
# :::
#
# Test yourself with {ref}`this chapter's quiz <quiz-train>`; the slides for teaching it are
# linked from the {doc}`Instructors page <course/instructors>`.
