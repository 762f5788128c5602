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
# # 3. The VAE
#
# Diffusion on 512×512×3 pixels is expensive. Stable Diffusion first compresses each image
# with a variational autoencoder (VAE) into **latents** of 64×64×4, $512^2 \cdot 3 / (64^2 \cdot 4)
# = 48$ times fewer numbers, and runs the whole diffusion process there. The encoder is only needed for image-to-image and for
# training; text-to-image only decodes. This chapter builds both halves, runs a real photo through
# the encoder and checks the code against `diffusers`.
#
# :::{admonition} This chapter
# **You will learn** the VAE's residual and attention blocks, the encoder's Gaussian and the
# reparameterization trick, the latent scale factor, and parity with `diffusers`' `AutoencoderKL`.
#
# **You need** convolutions and group norm, chapter 1 (attention), a Gaussian's mean and variance.
#
# {chapter-time}
# :::

# %% tags=["hide-input"]
# book-setup: tools/setup_cell.py goes here when the notebook is built

# %% [markdown]
# ## The building blocks
#
# Both halves are made of the same two blocks. A **residual block** normalises (group norm),
# applies SiLU and a 3×3 convolution, twice, and adds its input back:
#
# ```{listing} sdlab.blocks.VAE_ResidualBlock
# ```
#
# An **attention block** lets every pixel look at every other pixel: single-head self-attention
# (chapter 1) over the $h \cdot w$ positions, used once, at the lowest resolution where there are
# only 64×64 of them:
#
# ```{listing} sdlab.blocks.VAE_AttentionBlock
# ```
#
# ## The encoder and the reparameterization trick
#
# The encoder halves the resolution three times with stride-two convolutions and ends in twice
# as many channels as the latents have: the mean $\mu$ and the log-variance $\log v$ of a Gaussian
# over the latent channels. A latent is *sampled* from it with the **reparameterization trick**,
# $z = \mu + \sqrt{v} \odot \epsilon$ with $\epsilon \sim \mathcal{N}(0, I)$: the randomness is
# an input, so gradients flow through $\mu$ and $v$ during training, and the same $\epsilon$ gives
# the same latents. Finally the latents are multiplied by the **scale factor**, SD1.5's
# {glue:text}`sd15_scale`.
#
# ```{listing} sdlab.encoder.VAE_Encoder
# ```
#
# Why a scale factor? The KL term of the VAE's training was weak, so its latents are far from unit
# variance on real images. The diffusion model wants data of unit variance (its noise is
# $\mathcal{N}(0, I)$), so SD's authors measured the standard deviation of the latents on a batch of
# images and divided by it: the factor is $1 / \text{std}$, which for SD1.5's VAE means a standard
# deviation of {glue:text}`sd15_latent_std:.2f`. The tiny model's factor was measured the same way
# (chapter 7). The decoder divides it back out.
#
# ```{listing} sdlab.decoder.VAE_Decoder
# ```
#
# The shapes through SD1.5's encoder and decoder for one 512×512 image, traced on the meta device:

# %% tags=["nbval-check-output"]
from sdlab import SD15
from sdlab.decoder import VAE_Decoder
from sdlab.encoder import VAE_Encoder

with torch.device("meta"):
    encoder, decoder = VAE_Encoder(SD15.vae), VAE_Decoder(SD15.vae)
    image = torch.zeros(1, 3, 512, 512)
    h = encoder.conv_in(image)
    print(f"{'image':14s} {tuple(image.shape)}")
    for i, stage in enumerate(encoder.down):
        h = stage(h)
        print(f"{f'down[{i}]':14s} {tuple(h.shape)}")
    mean, log_variance = encoder.moments(image)
    latents = encoder(image, torch.zeros_like(mean))
    print(f"{'mean, logvar':14s} {tuple(mean.shape)} each")
    print(f"{'latents':14s} {tuple(latents.shape)}")
    print(f"{'decoded':14s} {tuple(decoder(latents).shape)}")
print(f"parameters: encoder {sum(p.numel() for p in encoder.parameters()):,}, decoder {sum(p.numel() for p in decoder.parameters()):,}")
glue("sd15_scale", SD15.vae.scale_factor)
glue("sd15_latent_std", 1 / SD15.vae.scale_factor)

# %% [markdown]
# ## A real photo through the encoder
#
# Which weights we use depends on what is available: the real SD1.5 checkpoint when the
# environment variable `SDLAB_CKPT` names it, otherwise the tiny model trained in chapter 7 (its
# VAE was trained on the synthetic shapes only, so a photo is far outside what it knows).

# %%
import os
from sdlab import model_loader

ckpt = os.environ.get("SDLAB_CKPT")
if ckpt and os.path.exists(ckpt):
    models, model_name = model_loader.preload_models_from_standard_weights(ckpt, "cpu"), "Stable Diffusion 1.5"
elif model_loader.DEFAULT_CHECKPOINT.exists():
    models, model_name = model_loader.preload_models_from_standard_weights(None, "cpu"), "the tiny sdlab model"
else:  # neither: random weights, so that the notebook still runs
    from sdlab.config import TINY

    models, model_name = model_loader.build_models(TINY), "random weights"
if model_name != "Stable Diffusion 1.5":
    torch.set_num_threads(1)  # the tiny model: one thread is faster and steadier than two
vae_encoder, vae_decoder = models["encoder"].eval(), models["decoder"].eval()
config = vae_encoder.config
print("weights:", model_name, "| downscale", config.downscale, "| latent channels", config.latent_channels)

# %%
from PIL import Image
from skimage import data

size = 512 if model_name == "Stable Diffusion 1.5" else 128
photo = np.array(Image.fromarray(data.astronaut()).resize((size, size), Image.Resampling.LANCZOS))
x = torch.from_numpy(photo).permute(2, 0, 1)[None].float() / 127.5 - 1  # (1, 3, size, size) in [-1, 1]
with torch.no_grad():
    mean, log_variance = vae_encoder.moments(x)
print("photo", tuple(x.shape), "-> mean and log-variance", tuple(mean.shape))

fig, axes = plt.subplots(1, 5, figsize=(12, 2.6))
axes[0].imshow(photo)
axes[0].set_title("input", fontsize=9)
for c in range(4):
    axes[c + 1].imshow(mean[0, c], cmap="RdBu_r")
    axes[c + 1].set_title(f"latent channel {c} (μ)", fontsize=9)
for ax in axes:
    ax.axis("off")
fig.suptitle(f"the encoder's latent channels ({model_name})", fontsize=10)
plt.show()
# how much each channel looks like the photo: correlation with its brightness at the latents' size
brightness = torch.nn.functional.avg_pool2d(x.mean(1, keepdim=True), config.downscale)[0, 0].flatten()
correlation = [torch.corrcoef(torch.stack([mean[0, c].flatten(), brightness]))[0, 1].item() for c in range(4)]
print("correlation of each channel with the photo's brightness:", " ".join(f"{r:+.2f}" for r in correlation))
glue("latent_model", model_name)
glue("latent_correlation", max(abs(r) for r in correlation))
glue("latent_correlation_weakest", min(abs(r) for r in correlation))
glue("latent_follows", "follows" if max(abs(r) for r in correlation) > 0.5 else "does not follow")
glue("latent_downscale", config.downscale)

# %% [markdown]
# Each latent pixel summarises a patch of {glue:text}`latent_downscale` × {glue:text}`latent_downscale`
# pixels.
#
# :::{admonition} Which model: {glue:text}`latent_model`
# :class: note
# The figure is that model's. Measured against the photo's brightness over each latent pixel's
# patch, the channels' correlations range from {glue:text}`latent_correlation_weakest:.2f` to
# {glue:text}`latent_correlation:.2f` in size (a copy of the image would have $1$): the strongest
# channel {glue:text}`latent_follows` the photo's light and dark regions, even though the tiny
# model's VAE was trained only on the shapes of chapter 7, and the latents are too coarse to show
# more. SD1.5's VAE, at 512×512, gives latents whose channels look like the photo itself: it
# compresses *perceptually*, it does not scramble.
# :::
#
# **The reparameterization trick at work.** The same $\epsilon$ gives the same latents; a
# different one moves them by about $\sqrt{v}$, which the decoder barely notices:

# %%
g = torch.Generator().manual_seed(0)
eps_a, eps_b = torch.randn(mean.shape, generator=g), torch.randn(mean.shape, generator=g)
with torch.no_grad():
    z_a, z_a_again, z_b = vae_encoder(x, eps_a), vae_encoder(x, eps_a), vae_encoder(x, eps_b)
std = (0.5 * log_variance).exp()  # √v
print("same noise, same latents:", torch.equal(z_a, z_a_again))
print(f"typical √v relative to |μ|: {(std.mean() / mean.abs().mean()).item():.2g}")
print(f"latent std after this model's scale factor {config.scale_factor:.3g}: {z_a.std().item():.2f}  "
      f"(before: {(z_a / config.scale_factor).std().item():.2f})")

# %% [markdown]
# ## Reconstructions
#
# Encoding and decoding should give the image back. For the tiny model we use the images it was
# trained on, the synthetic shapes of chapter 7; with the real checkpoint, the photo.

# %%
from sdlab.tiny import data as shapes  # the Shapes dataset of chapter 7

if model_name == "random weights":
    print("no trained VAE available: skipping the reconstructions")
else:
    if model_name == "Stable Diffusion 1.5":
        originals = x
    else:
        scenes = shapes.sample_scenes(6, seed=3, split="train")
        originals = torch.stack([shapes.to_tensor(shapes.render(s, 64)) for s in scenes])
    with torch.no_grad():
        latents = vae_encoder(originals, torch.zeros(originals.shape[0], config.latent_channels,
                                                     originals.shape[2] // config.downscale, originals.shape[3] // config.downscale))
        rebuilt = vae_decoder(latents).clamp(-1, 1)
    n = originals.shape[0]
    fig, axes = plt.subplots(2, n, figsize=(2 * n, 4.2), squeeze=False)
    for i in range(n):
        axes[0, i].imshow(shapes.to_image(originals[i]))
        axes[1, i].imshow(shapes.to_image(rebuilt[i]))
        axes[0, i].axis("off")
        axes[1, i].axis("off")
    axes[0, 0].set_title("original", fontsize=9, loc="left")
    axes[1, 0].set_title("encode → decode", fontsize=9, loc="left")
    fig.suptitle(f"reconstructions by {model_name}", fontsize=10)
    plt.show()
    psnr = 10 * torch.log10(4 / ((originals - rebuilt) ** 2).mean())
    print(f"PSNR of the reconstructions: {psnr.item():.1f} dB")

# %% [markdown]
# ## Parity with diffusers
#
# A small VAE (two levels, of $32$ and $64$ channels) with random weights: `sdlab` writes its weights
# in the original checkpoint's layout, `diffusers`' single-file converter loads them into an
# `AutoencoderKL`, and we compare the encoder's Gaussian and the decoder's image.

# %% tags=["nbval-check-output"]
import warnings

from diffusers import AutoencoderKL
from diffusers.loaders import single_file_utils
from sdlab import VAEConfig, model_converter

small = VAEConfig(base_channels=32, channel_mult=(1, 2), n_res_blocks=1, n_groups=8)
reference_config = dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32, 64),
                        layers_per_block=1, norm_num_groups=8, scaling_factor=0.18215,
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2)
torch.manual_seed(0)
small_encoder, small_decoder = VAE_Encoder(small).eval(), VAE_Decoder(small).eval()
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    reference = AutoencoderKL(**reference_config).eval()
    original = model_converter.to_standard({"encoder": small_encoder, "decoder": small_decoder})
    print(reference.load_state_dict(single_file_utils.convert_ldm_vae_checkpoint(original, reference_config)))

image = torch.randn(1, 3, 32, 32)
z = torch.randn(1, 4, 16, 16)
with torch.no_grad():
    mean, log_variance = small_encoder.moments(image)
    dist = reference.encode(image).latent_dist
    decoded, reference_decoded = small_decoder(z * 0.18215), reference.decode(z).sample
print("encoder mean    max |difference| < 1e-5:", (mean - dist.mean).abs().max().item() < 1e-5)
print("encoder log σ²  max |difference| < 1e-5:", (log_variance - dist.logvar).abs().max().item() < 1e-5)
print("decoder", tuple(decoded.shape), "max |difference| < 1e-4:", (decoded - reference_decoded).abs().max().item() < 1e-4)

# %% [markdown]
# ## Summary
#
# * The VAE maps 512×512×3 images to 64×64×4 latents and back; diffusion runs on the latents.
# * Encoder: convolutions, residual blocks, three stride-two down-samplings, one attention block,
#   → the mean and log-variance of a Gaussian; $z = (\mu + \sqrt{v}\,\epsilon) \times$ the scale
#   factor ({glue:text}`sd15_scale` for SD1.5).
# * Decoder: the mirror image, with nearest-neighbour up-sampling; it divides by the scale factor
#   first.
# * The scale factor makes the latents of real images unit-variance, as the diffusion model expects.
# * `sdlab`'s VAE matches `diffusers`' `AutoencoderKL` with the same weights.
#
# ## Exercises
#
# Each exercise names the check that grades it (`from sdlab.exercises import ...`; the checks use
# the tiny model); the worked solutions are on the [solutions](course/solutions.ipynb) page.
#
# :::{exercise}
# :label: ex-3-1
#
# Decode the latents with and without the noise $\sqrt{v}\,\epsilon$. Can you see a difference?
# What does that say about $v$? Measure the mean $\sqrt v$ over your images
# (`vae_encoder.moments`). Check: `check_posterior_std(value, images)`.
# :::
#
# :::{exercise}
# :label: ex-3-2
#
# Interpolate linearly between the latents $z_a$, $z_b$ of two images and decode the path
# ($t$ = `torch.linspace(0, 1, n)`). Check: `check_interpolation(decoded, z_a, z_b)`.
# :::
#
# :::{exercise}
# :label: ex-3-3
#
# Set one latent channel to zero before decoding, for each channel in turn. What does each channel
# seem to encode? Check: `check_channel_ablation(decoded, latents)`.
# :::
#
# :::{exercise}
# :label: ex-3-4
#
# Measure the standard deviation of unscaled latents over many ($\ge 64$) images of the Shapes
# data set with the tiny VAE. Which scale factor would you choose for it?
# Check: `check_scale_factor(scale, images)`.
# :::
#
# Test yourself with {ref}`this chapter's quiz <quiz-vae>`; the slides for teaching it are
# linked from the {doc}`Instructors page <course/instructors>`.
