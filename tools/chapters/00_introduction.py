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
# # Stable Diffusion from scratch
#
# This book builds **Stable Diffusion v1.x** one component at a time, in plain PyTorch, and looks
# inside each one. Every chapter is a notebook: it builds its component from the `sdlab` package,
# checks it, shows what it computes in pictures, and ends with a summary and exercises. The
# architecture chapters, chapters 1–4, check their component against a reference implementation (PyTorch,
# `transformers` or `diffusers`) on the same weights. Chapters 5 and 6 check sdlab against itself
# (DDPM on few steps against DDIM, `generate` against its stages run by hand, $\hat x_0$ against
# each sampler's own), and their parity with `diffusers`' schedulers and pipelines is proven in the
# package's tests (`tests/test_samplers.py`, `tests/test_pipeline_sd15.py`), not in the chapters. The code you see on the
# pages is the package's real source, embedded when the notebook is built (a test fails the
# moment it differs from the package), never a hand-made copy.
#
# ## What Stable Diffusion is
#
# Stable Diffusion ([Rombach et al. 2022](https://arxiv.org/abs/2112.10752)) is a *latent
# diffusion model*: it learns to remove noise, step by step, not from the pixels of an image but
# from a compressed version of it, {glue:text}`vae_downscale` times smaller on each side. Three
# networks work together (the sizes are counted further down, from `sdlab.config.SD15`):
#
# | model | what it does | SD1.5 size |
# | --- | --- | --- |
# | **CLIP text encoder** | reads the prompt as {glue:text}`clip_tokens` tokens and gives one {glue:text}`clip_width`-wide vector per token | {glue:text}`clip_millions:.0f` M parameters |
# | **U-Net** | predicts the noise in a noisy latent, given the timestep and the text | {glue:text}`unet_millions:.0f` M parameters |
# | **VAE** (encoder + decoder) | compresses a 512×512×3 image to 64×64×4 latents and back | {glue:text}`vae_millions:.0f` M parameters |
#
# A *sampler* (DDPM, DDIM, Euler, DPM++ ...) drives the U-Net: starting from pure noise it asks
# the U-Net for the noise at each step and removes a bit of it. *Classifier-free guidance* runs
# the U-Net twice per step, with and without the prompt, and pushes the result away from the
# unconditioned prediction.
#
# :::{admonition} This chapter
# **You will learn** what the parts of Stable Diffusion are, how the book runs, and the notation
# every chapter uses.
#
# **You need** Python, PyTorch tensors and `nn.Module`, and the idea of a neural network trained by
# gradient descent; a little probability (Gaussians) for chapters 3 and 5.
#
# {chapter-time}
# :::

# %% tags=["hide-input"]
# book-setup: tools/setup_cell.py goes here when the notebook is built

# %% [markdown]
# ## From prompt to pixels
#
# The whole path, with the shapes of SD1.5 at 512×512. Chapter numbers say where each box is built.

# %% tags=["hide-input"]
from matplotlib.patches import FancyBboxPatch

boxes = [  # (x, y, text, colour)
    (0.0, 1.0, '"a photograph of\nan astronaut"', "#eeeeee"),
    (2.1, 1.0, "tokenizer (BPE)\n77 ids  [ch. 2]", "#cfe2f3"),
    (4.2, 1.0, "CLIP text encoder\n(1, 77, 768)  [ch. 2]", "#cfe2f3"),
    (0.0, -0.6, "noise  x_T\n(1, 4, 64, 64)", "#eeeeee"),
    (2.1, -0.6, "U-Net  ε(x_t, t, c)\n× n steps  [ch. 4]", "#d9ead3"),
    (4.2, -0.6, "sampler + CFG\nx_t → x_{t-1}  [ch. 5, 6]", "#fff2cc"),
    (6.3, -0.6, "VAE decoder\n(1, 3, 512, 512)  [ch. 3]", "#f4cccc"),
    (6.3, 1.0, "image", "#eeeeee"),
]
fig, ax = plt.subplots(figsize=(10, 3))
for x, y, text, colour in boxes:
    ax.add_patch(FancyBboxPatch((x, y), 1.8, 0.9, boxstyle="round,pad=0.05", fc=colour, ec="#444444"))
    ax.text(x + 0.9, y + 0.45, text, ha="center", va="center", fontsize=9)
arrow = dict(arrowstyle="->", lw=1.5, color="#444444")
for (x0, y0), (x1, y1) in [((1.85, 1.45), (2.05, 1.45)), ((3.95, 1.45), (4.15, 1.45)),
                           ((5.1, 0.95), (3.6, 0.35)), ((1.85, -0.15), (2.05, -0.15)),
                           ((3.95, -0.15), (4.15, -0.15)), ((6.05, -0.15), (6.25, -0.15)),
                           ((7.2, 0.35), (7.2, 0.95))]:
    ax.annotate("", xy=(x1, y1), xytext=(x0, y0), arrowprops=arrow)
ax.annotate("", xy=(2.9, 0.35), xytext=(4.9, 0.35),
            arrowprops=dict(arrowstyle="->", lw=1.2, color="#888888", connectionstyle="arc3,rad=0.4"))
ax.text(3.9, 0.55, "repeat", fontsize=9, color="#666666", ha="center")
ax.set_xlim(-0.2, 8.3)
ax.set_ylim(-0.8, 2.1)
ax.axis("off")
plt.show()

# %% [markdown]
# The four models of one checkpoint are plain `torch.nn.Module`s configured by dataclasses in
# `sdlab.config`. Building them on PyTorch's *meta* device costs no memory, so we can count the
# parameters of the real SD1.5 architecture right here:

# %% tags=["nbval-check-output"]
from sdlab import SD15, model_loader

with torch.device("meta"):
    models = model_loader.build_models(SD15)
print(model_loader.describe(models))
print(f"total     {sum(p.numel() for m in models.values() for p in m.parameters()):>13,d} parameters")
count = {name: sum(p.numel() for p in m.parameters()) for name, m in models.items()}
total = sum(count.values())
glue("clip_millions", count["clip"] / 1e6)
glue("unet_millions", count["diffusion"] / 1e6)
glue("vae_millions", (count["encoder"] + count["decoder"]) / 1e6)
glue("total_billions", total / 1e9)
glue("unet_share", count["diffusion"] / total)
glue("clip_tokens", SD15.clip.n_token)
glue("clip_width", SD15.clip.n_embd)
glue("vae_downscale", 2 ** (len(SD15.vae.channel_mult) - 1))
glue("vae_scale", SD15.vae.scale_factor)

# %% [markdown]
# ```{listing} sdlab.config.UNetConfig
# ```
#
# ## How to run the book
#
# **Locally.** Clone the repository (the GitHub button at the top of each page links to it),
# install the package with the book's libraries and open the notebooks:
#
# ```bash
# pip install -e ".[book]" jupyterlab
# jupyter lab book/
# ```
#
# The `book` extra brings what the chapters import beyond the package: the reference libraries
# `transformers` and `diffusers` (chapters 2–4 check sdlab against them), matplotlib,
# scikit-image, ipywidgets and the Jupyter kernel.
#
# **In Colab, Binder or a JupyterHub.** The rocket button at the top of each page opens the chapter
# there. In Colab the first cell installs `sdlab` with the book's libraries (`sdlab[book]`);
# Binder builds its environment from the repository's `binder/` folder. The first cell prints the
# device it found: a GPU (CUDA, or MPS on a Mac) when there is one, else the CPU.
#
# **The stored outputs.** Every notebook is saved with its outputs, so it reads completely on
# GitHub, in Colab and in this book before anyone runs it. Continuous integration re-executes all
# of them with `nbval` and compares the outputs that matter (shapes, parameter counts, parity
# checks); each chapter's header says how long it took to run.
#
# ## The checkpoint, and what the book does without it
#
# The real weights are the file `v1-5-pruned-emaonly.safetensors` of
# [stable-diffusion-v1-5](https://huggingface.co/stable-diffusion-v1-5/stable-diffusion-v1-5).
# `sdlab` reads it as it is distributed (`.safetensors` or `.ckpt`):
#
# ```python
# from sdlab import model_loader, pipeline
# models = model_loader.preload_models_from_standard_weights("v1-5-pruned-emaonly.safetensors", "cpu")
# image = pipeline.generate("a photograph of an astronaut riding a horse", models=models, seed=42)
# ```
#
# The chapters that generate images look for the file in the environment variable
# `SDLAB_CKPT`; in Colab a cell downloads it on request with `huggingface_hub`. Without it
# nothing breaks:
#
# * the **architecture** chapters (attention, CLIP, VAE, U-Net) check every module against
#   `transformers` and `diffusers` with *the same random weights*, which tests the code exactly
#   as well as the real weights would;
# * the **generating** chapters use the **tiny Stable Diffusion** that ships with `sdlab`
#   (`sdlab/data/tiny.safetensors`, a few MB), trained in chapter 7 on a synthetic data set
#   of coloured shapes with captions. It runs the very same code path; each figure says which
#   model made it.
#
# ## The chapters
#
# 1. **Attention**: scaled dot-product attention from scratch, heads, the causal mask, cross-attention.
# 2. **The CLIP text encoder**: byte-level BPE on a real prompt, embeddings, the transformer stack.
# 3. **The VAE**: the encoder, the decoder, the reparameterization trick and the latent scale
#    factor ({glue:text}`vae_scale` for SD1.5).
# 4. **The U-Net**: the time embedding, residual and transformer blocks, skip connections.
# 5. **DDPM and samplers**: the forward process, noise schedules, the reverse step, DDIM, Euler, DPM++.
# 6. **The pipeline**: classifier-free guidance, image-to-image, inpainting, attention maps.
# 7. **Train your own tiny Stable Diffusion**: a captioned synthetic data set, two training stages, and
#    a model that follows prompts it has never seen.
# 8. **Fast and lean**: where the FLOPs go, fused attention, bf16, packed convolution weights, fewer
#    steps, and whole images timed against `diffusers`.
# 9. **Fine-tuning on your laptop**: textual inversion and LoRA on the tiny model, live on a CPU,
#    DreamBooth's difference, and loading SD1.5 LoRA files.
#
# ## Notation
#
# Every chapter writes the same thing the same way (the papers differ; the package's docstrings
# follow the papers where they cite an equation):
#
# * $x_0$: a clean sample, the VAE's latents in Stable Diffusion (pixels or 2-D points in the toys).
# * $z$: the VAE encoder's latents of an image; $z$ becomes the $x_0$ of diffusion.
# * $t$, $T$: a training timestep, $t = 0 \dots T - 1$ with $T = 1000$, as in the code (the papers
#   count $1 \dots T$, so their last step is our $t = 999$).
# * $x_t$: $x_0$ noised to timestep $t$,
#   $x_t = \sqrt{\bar\alpha_t}\,x_0 + \sqrt{1 - \bar\alpha_t}\,\epsilon$.
# * $\epsilon$: Gaussian noise, $\epsilon \sim \mathcal{N}(0, I)$; $\epsilon_\theta(x_t, t, c)$ is
#   the U-Net's prediction of it and $\hat\epsilon$ the guided prediction.
# * $\beta_t$, $\alpha_t = 1 - \beta_t$, $\bar\alpha_t = \prod_{\tau \le t} \alpha_\tau$: the noise
#   schedule, and the signal's variance left at $t$.
# * $\sigma_t = \sqrt{(1 - \bar\alpha_t) / \bar\alpha_t}$: the noise level of the Euler and DPM++
#   samplers, whose latents are $\tilde x = x_0 + \sigma\epsilon$ (chapter 5).
# * $\hat x_0$: the clean sample a noise prediction implies.
# * $\mu$, $\log v$: the mean and log-variance the VAE encoder outputs (chapter 3); its standard
#   deviation is $\sqrt{v}$.
# * $\eta$: how much fresh noise DDIM adds (its docstring's $\sigma_t$: the one other use of the
#   letter, only in that listing).
# * $c$, $\varnothing$, $s$: the prompt's text embedding, the empty prompt's, and the guidance scale.
#
# ## Summary
#
# * Stable Diffusion = a text encoder (CLIP) + a noise predictor (U-Net) working on the latents of
#   an autoencoder (VAE), driven by a sampler.
# * SD1.5 has about {glue:text}`total_billions:.2f` billion parameters, {glue:text}`unet_share:.0%`
#   of them in the U-Net.
# * The book runs without the real checkpoint: parity with reference libraries on random weights,
#   and a tiny trained model for the pictures.
#
# ## Exercises
#
# Each exercise names the check that grades it: run it on your answer in a cell below; it prints
# ✓ or says what is wrong. The worked solutions are on the [solutions](course/solutions.ipynb) page.
#
# :::{exercise}
# :label: ex-0-1
#
# Count the parameters of a U-Net with `base_channels=160` (build `Diffusion(UNetConfig(base_channels=160))`
# inside `with torch.device("meta"):`). How does the count scale with the width, and why?
# Check: `from sdlab.exercises import check_unet_parameters; check_unet_parameters(count, base_channels=160)`.
# :::
#
# :::{exercise}
# :label: ex-0-2
#
# Which of the four models does text-to-image generation use? Image-to-image?
# Check: `check_models_needed(text_to_image={...}, image_to_image={...})` with names from
# `"clip"`, `"encoder"`, `"decoder"`, `"diffusion"` (`from sdlab.exercises import check_models_needed`).
# :::
#
# :::{exercise}
# :label: ex-0-3
#
# The latents are 64×64×4 for a 512×512×3 image. What is the compression factor?
# Check: `from sdlab.exercises import check_compression_factor; check_compression_factor(factor)`.
# :::
#
# Test yourself with {ref}`this chapter's quiz <quiz-introduction>`; the slides for teaching it are
# linked from the {doc}`Instructors page <course/instructors>`.
