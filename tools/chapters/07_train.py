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
# Stable Diffusion 1.5 was trained on billions of captioned images for 150,000 GPU-hours. The
# *same* code can be trained on a laptop CPU if the world is made small: 64×64 pictures of
# coloured shapes whose captions describe them completely. This chapter shows the data, runs a
# short training live, and then uses the weights that ship with `sdlab`, trained the same way for
# longer (`python -m sdlab train`).

# %% tags=["hide-input"]
# book-setup: tools/setup_cell.py goes here when the notebook is built

# %% [markdown]
# ## The data: Shapes
#
# ```{listing} sdlab.tiny.data.caption
# ```
#
# Each image holds one or two objects; each object has a shape (circle, square, triangle), a
# colour (6), a size (2) and a position on a 3×3 grid, and two objects are related by
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
for scene in shapes.sample_scenes(3, seed=1, split="train"):
    print("  ", shapes.caption(scene))
print("held-out prompts, for example:")
for prompt in shapes.heldout_prompts(3, seed=0):
    print("  ", prompt)

# %% [markdown]
# ## The tiny model
#
# The same classes as SD1.5, with small sizes: a 2-layer CLIP of width 64 (with the real
# tokenizer and vocabulary), a VAE that still down-samples 8× into 4 latent channels (64×64
# images → 8×8×4 latents), and a 3-level U-Net with attention at every level.
#
# ```{listing} sdlab.config.TINY
# ```

# %% tags=["nbval-check-output"]
from sdlab import model_loader
from sdlab.config import TINY

print(model_loader.describe(model_loader.build_models(TINY)))

# %% [markdown]
# ## A short training run, live
#
# Training has two stages, as for the real model. First the **VAE** learns to reconstruct the
# images (with a KL term so light that the latents stay nearly deterministic: a heavier one let
# the posterior noise blur small circles into squares); its latent scale factor is then measured, as 0.18215 was for
# SD. Then the **text encoder and the U-Net** learn together to predict the noise added to the
# latents, with 10 % of the captions dropped to the empty prompt so that the same network also
# learns the unconditional prediction that classifier-free guidance needs:
#
# ```{listing} sdlab.tiny.train.diffusion_loss
# ```
#
# A few dozen steps of each stage run in seconds here: enough to see the losses fall, far from
# enough to draw shapes (the shipped model trained for thousands of steps).

# %%
import time
import warnings
from sdlab.tiny.train import train

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
# layout with its config in the metadata, so it loads exactly like the real checkpoint. Here it
# generates from prompts it has seen kinds of, and from held-out combinations; the analyzer of
# `sdlab.tiny.analyzer` reads each picture back and checks it against its prompt.

# %%
from sdlab.tiny import analyzer
from sdlab.tiny.evaluate import generate_batch

if model_loader.DEFAULT_CHECKPOINT.exists():
    tiny = model_loader.preload_models_from_standard_weights()
    prompts = ["a large red circle in the center", "a small blue triangle in the top left",
               "a large yellow square in the bottom right", "a large green circle to the left of a small white square",
               *shapes.heldout_prompts(4, seed=0)]
    with torch.no_grad():
        images = generate_batch(tiny, prompts, seeds=list(range(len(prompts))), sampler_name="dpmpp_2m",
                                n_inference_steps=20, cfg_scale=5.0)
    fig, axes = plt.subplots(2, 4, figsize=(11, 7.0))
    for ax, prompt, image in zip(axes.flat, prompts, images):
        ok = analyzer.score(prompt, image)["all"] == 1.0
        ax.imshow(image)
        ax.set_title("\n".join(textwrap.wrap(prompt, 26)) + ("\n✓ analyzer agrees" if ok else "\n✗ analyzer disagrees"),
                     fontsize=9, color="black" if ok else "firebrick")
        ax.axis("off")
    fig.suptitle("the tiny sdlab model: training-like prompts (top), held-out combinations (bottom)", fontsize=9)
    plt.tight_layout()
    plt.show()
else:
    print("the bundled tiny model is not installed: train it with `python -m sdlab train`")

# %% [markdown]
# ## How well it follows prompts
#
# `python -m sdlab evaluate` generates one image for each of 200 held-out prompts (every one uses
# a combination never seen in training), reads each back with the analyzer and reports the
# fraction right per attribute, for several samplers and step counts, plus the same on prompts
# like the training ones. The figures of the shipped model, from `sdlab/data/tiny_report.json`:

# %% tags=["nbval-check-output"]
import json

report = json.loads((model_loader.DEFAULT_CHECKPOINT.parent / "tiny_report.json").read_text())
print(f"{'prompts':10s} {'sampler':16s} {'steps':>5s}" + "".join(f"{k:>9s}" for k in ("colour", "shape", "size", "position", "relation", "all")))
for split in ("heldout", "train_split"):
    for row in report[split]:
        print(f"{split.replace('_split', ''):10s} {row['sampler']:16s} {row['steps']:5d}"
              + "".join(f"{row[k]:9.1%}" for k in ("colour", "shape", "size", "position", "relation", "all")))
training = report["training"]
print(f"\nVAE reconstruction PSNR {report['vae_psnr_db']} dB; one 64x64 image in {report['seconds_per_64px_image']} s;"
      f" trained in {training['total_seconds'] / 60:.0f} min on {training['settings']['threads']} CPU threads")

# %% [markdown]
# ## Summary
#
# * A captioned synthetic data set small enough for a CPU, whose captions can be checked by
#   reading the pictures back.
# * The same classes as SD1.5, 1/1000 of the size; two training stages: the VAE, then CLIP and
#   the U-Net together on the DDPM loss, with caption dropout for classifier-free guidance.
# * The trained weights load through the same loader as the real checkpoint and run through the
#   same pipeline as in chapter 6.
#
# ## Exercises
#
# 1. Train without caption dropout (`caption_dropout=0`). What happens to the pictures at CFG
#    scale 5, and why?
# 2. Plot the U-Net loss per timestep bucket. Which timesteps are hardest to predict?
# 3. Use the analyzer to measure accuracy per attribute on 50 held-out prompts. Which attribute
#    generalises worst?
# 4. Make the VAE down-sample 4× instead of 8× (`channel_mult=(1, 2, 4)`). What does it cost
#    in U-Net time, and what does it buy in reconstruction quality?
