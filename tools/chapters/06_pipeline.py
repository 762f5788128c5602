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
# # 6. The pipeline
#
# All the parts are built. This chapter assembles them into text-to-image generation:
# **tokenize → encode → denoise with classifier-free guidance → decode**, first by hand and
# then with `sdlab.pipeline.generate`, and then takes the process apart: the guidance scale,
# negative prompts, interpolating between seeds, image-to-image, inpainting, where each word of the
# prompt lands, and what the model believes the final image to be at every step.
#
# :::{admonition} This chapter
# **You will learn** how `generate` composes its four stages, what the guidance scale and a
# negative prompt do, why noise is interpolated on a sphere, image-to-image and inpainting (and
# their limits), inverting a real picture back to noise with DDIM, recording cross-attention and turning it into per-word maps that localize, and the
# clean image $\hat x_0$ every sampler implies at every step.
#
# **You need** chapters 2–5.
#
# {chapter-time}
# :::

# %% tags=["hide-input"]
# book-setup: tools/setup_cell.py goes here when the notebook is built

# %% [markdown]
# ## Which model makes the pictures
#
# One code path serves both models. If the environment variable `SDLAB_CKPT` names the real
# SD1.5 checkpoint (or you set `DOWNLOAD = True` in Colab, which fetches it with
# `huggingface_hub`), the pictures are 512×512 images from Stable Diffusion 1.5. Otherwise they
# come from the **tiny Stable Diffusion** bundled with `sdlab`, trained in chapter 7 on 64×64
# pictures of coloured shapes: the same classes and the same code, with about
# {glue:text}`tiny_fraction` of SD1.5's parameters ({glue:text}`tiny_parameters` million against
# {glue:text}`sd15_parameters` million, counted below).

# %%
import os
from sdlab import config, model_loader, pipeline
from sdlab.tokenizer import load_tokenizer

DOWNLOAD = False  # in Colab: set to True to download the 4 GB SD1.5 checkpoint (needs network)
ckpt = os.environ.get("SDLAB_CKPT")
if DOWNLOAD and not ckpt:
    try:
        from huggingface_hub import hf_hub_download

        ckpt = hf_hub_download("stable-diffusion-v1-5/stable-diffusion-v1-5", "v1-5-pruned-emaonly.safetensors")
    except Exception as error:  # offline, or no huggingface_hub: keep the tiny model
        print(f"could not download the checkpoint ({type(error).__name__}); using the tiny model")
REAL = bool(ckpt) and os.path.exists(ckpt)
if REAL or model_loader.DEFAULT_CHECKPOINT.exists():
    models = model_loader.preload_models_from_standard_weights(ckpt if REAL else None, DEVICE)
    MODEL = "Stable Diffusion 1.5" if REAL else "the tiny sdlab model"
else:  # an installation without the bundled weights: the same code on untrained tiny models
    from sdlab.config import TINY

    models = {name: m.eval().requires_grad_(False).to(DEVICE) for name, m in model_loader.build_models(TINY).items()}
    MODEL = "untrained tiny models (random weights: the bundled tiny model is not installed)"
SIZE = 512 if REAL else 64
STEPS = 25 if REAL else 20
if not REAL:
    torch.set_num_threads(1)  # the tiny model: one thread is faster and steadier than two
tokenizer = load_tokenizer()
PROMPT = "a photograph of an astronaut riding a horse" if REAL else "a large red circle to the left of a small blue square"
print(f"pictures in this chapter: {MODEL}, {SIZE}x{SIZE}, {STEPS} steps")
print(model_loader.describe(models))
with torch.device("meta"):  # shapes only, no memory
    counts = {name: sum(p.numel() for m in model_loader.build_models(config).values() for p in m.parameters())
              for name, config in (("tiny", config.TINY), ("SD1.5", config.SD15))}
print(f"the tiny model has {counts['tiny']:,} parameters, SD1.5 {counts['SD1.5']:,}: 1/{counts['SD1.5'] / counts['tiny']:.0f}")
glue("tiny_parameters", f"{counts['tiny'] / 1e6:.2f}")
glue("sd15_parameters", f"{counts['SD1.5'] / 1e6:,.0f}")
glue("tiny_fraction", f"1/{counts['SD1.5'] / counts['tiny']:.0f}")

# %% [markdown]
# ## The four steps, by hand
#
# `sdlab.pipeline` is written as four named stages, and `generate` is nothing but their
# composition. Here they are one at a time.
#
# **1. Tokenize and encode** the prompt and the empty "negative" prompt (chapter 2):
#
# ```{listing} sdlab.pipeline.encode_prompts
# ```

# %%
clip, diffusion, decoder = models["clip"], models["diffusion"], models["decoder"]
with torch.no_grad():
    context = pipeline.encode_prompts(tokenizer, clip, [PROMPT, ""], DEVICE)
print("context (prompt, empty prompt):", tuple(context.shape))

# %% [markdown]
# **2. Start from noise** in latent space, an eighth of the image's height and width, drawn from a seeded CPU
# generator (so the same seed gives the same noise on every device). The same stage starts
# image-to-image and inpainting, further down:
#
# ```{listing} sdlab.pipeline.prepare_latents
# ```
#
# **3. Denoise** with the U-Net (chapter 4) and a sampler (chapter 5). With *classifier-free
# guidance* the U-Net runs on a batch of two, with and without the prompt, and the guided noise
# prediction extrapolates from the unconditioned one towards the conditioned one:
#
# $$\hat\epsilon = \epsilon_\theta(x_t, t, \varnothing) + s\,\bigl(\epsilon_\theta(x_t, t, c) - \epsilon_\theta(x_t, t, \varnothing)\bigr)$$
#
# ```{listing} sdlab.pipeline.classifier_free_guidance
# ```
#
# One guided prediction is one call of the U-Net on that batch of two, then the formula:
#
# ```{listing} sdlab.pipeline.guided_noise
# ```
#
# and the denoising loop is a guided prediction and a sampler step for each timestep, with a
# `callback` that sees every step (we use it at the end of the chapter):
#
# ```{listing} sdlab.pipeline.denoise
# ```
#
# **4. Decode** the final latents with the VAE decoder (chapter 3), and map $[-1, 1]$ to `uint8`
# pixels with `pipeline.to_uint8`:
#
# ```{listing} sdlab.pipeline.decode
# ```

# %%
from sdlab.samplers import make_sampler

down = decoder.config.downscale
LATENT_SHAPE = (1, decoder.config.latent_channels, SIZE // down, SIZE // down)  # (1, 4, SIZE/8, SIZE/8)

generator = torch.Generator().manual_seed(1)  # every random number of the picture comes from here
sampler = make_sampler("ddim", generator)
sampler.set_inference_timesteps(STEPS)
latents, _ = pipeline.prepare_latents(sampler, LATENT_SHAPE, generator, DEVICE)  # 2. pure noise
latents = pipeline.denoise(diffusion, sampler, latents, context, cfg_scale=7.5)  # 3. STEPS guided steps
by_hand = pipeline.to_uint8(pipeline.decode(decoder, latents))[0]  # 4. (SIZE, SIZE, 3) uint8

plt.figure(figsize=(3, 3))
plt.imshow(by_hand)
plt.title(f"“{PROMPT}”\n{MODEL}", fontsize=9)
plt.axis("off")
plt.show()

# %% [markdown]
# **Check:** `pipeline.generate` is these four stages (plus the checks of its arguments and the
# speed options of chapter 8), so it must give the very same pixels. On the CPU it normally packs
# the weights for oneDNN first (chapter 8), which reorders the sums inside the convolutions and
# matrix products and can move a few pixels by one level; `packed=False` turns that off for this
# comparison:
#
# ```{listing} sdlab.pipeline.generate
# ```

# %% tags=["nbval-check-output"]
generated = pipeline.generate(PROMPT, models=models, tokenizer=tokenizer, seed=1, sampler_name="ddim", cfg_scale=7.5,
                              n_inference_steps=STEPS, height=SIZE, width=SIZE, progress=False, packed=False)
print("image", generated.shape, generated.dtype, "| identical to the stages by hand:", np.array_equal(generated, by_hand))

# %% [markdown]
# ## Classifier-free guidance
#
# Every picture from here on is the same four stages with other settings; `start` is stage
# two # with a fresh seeded sampler, and `make_image` runs the rest:

# %%
def start(seed, sampler_name="ddim", image=None, strength=1.0, pixel_mask=None):
    """Stage 2: a sampler drawing from `seed`, and the latents it starts from (and inpainting's data)."""
    generator = torch.Generator().manual_seed(seed)
    sampler = make_sampler(sampler_name, generator)
    sampler.set_inference_timesteps(STEPS)
    if image is not None:
        sampler.set_strength(strength)  # image-to-image: skip the first (1 - strength) of the steps
    latents, inpainting = pipeline.prepare_latents(sampler, LATENT_SHAPE, generator, DEVICE, encoder=models["encoder"],
                                                   image=image, strength=strength, pixel_mask=pixel_mask)
    return sampler, latents, inpainting

def decode(latents):
    return pipeline.to_uint8(pipeline.decode(decoder, latents))[0]

def make_image(context, seed, cfg_scale=7.5, callback=None, **starting_point):
    sampler, latents, inpainting = start(seed, **starting_point)
    latents = pipeline.denoise(diffusion, sampler, latents, context, cfg_scale, callback=callback, inpainting=inpainting)
    return decode(latents)

print("the same picture again:", np.array_equal(make_image(context, seed=1), by_hand))

# %% [markdown]
# The guidance scale $s$ trades diversity for fidelity to the prompt: $s = 1$ is the plain
# conditional model, $s = 0$ ignores the prompt, large $s$ exaggerates it until colours saturate.
# Same seed, increasing scale:

# %%
scales = [0.0, 1.0, 3.0, 7.5, 12.0]
cfg_images = {s: make_image(context, seed=2, cfg_scale=s) for s in scales}
fig, axes = plt.subplots(1, len(scales), figsize=(11, 2.6))
for ax, s in zip(axes, scales):
    ax.imshow(cfg_images[s])
    ax.set_title(f"CFG scale {s:g}", fontsize=9)
    ax.axis("off")
fig.suptitle(f"“{PROMPT}” ({MODEL})", fontsize=9)
plt.show()

# %% [markdown]
# ### Explore: prompt, guidance, seed
#
# An explorer (`sdlab.explorer`) draws a picture for every combination of its controls. With a
# running kernel the prompt is a text box (for the tiny model: any caption of chapter 7's
# grammar), and the guidance scale and the seed are sliders; the rendered book keeps the pictures
# of a few prompts and scales, and its controls move through them. Under each picture, for the
# tiny model, the analyzer of chapter 7 reads what was drawn: ✓ when every attribute matches the
# prompt.

# %%
import ipywidgets as widgets
from sdlab.explorer import explorer
from sdlab.tiny import analyzer
from sdlab.tiny.analyzer import describe, score

def encode(prompt, negative=""):
    with torch.no_grad():
        return pipeline.encode_prompts(tokenizer, clip, [prompt, negative], DEVICE)

def verdict(prompt, picture):
    """For the tiny model, what the analyzer reads in `picture` (✓/✗ against `prompt`); SD1.5: nothing."""
    return "" if REAL else analyzer.verdict(prompt, picture)

def prompt_frame(prompt, cfg_scale, seed=2):
    picture = make_image(encode(prompt), seed=seed, cfg_scale=cfg_scale)
    return picture, verdict(prompt, picture)

EXPLORE_PROMPTS = [PROMPT] if REAL else [
    "a large red circle in the center", "a small blue square on the left", "a large green triangle at the bottom",
    "a small yellow circle above a large purple square"]
EXPLORE_SCALES = [7.5] if REAL else [1.0, 3.0, 7.5]  # SD1.5 on a CPU: one stored picture, the rest live
explorer(prompt_frame, {"prompt": EXPLORE_PROMPTS, "cfg_scale": EXPLORE_SCALES}, start={"cfg_scale": 7.5},
         title=f"prompt and guidance scale ({MODEL})",
         live={"prompt": widgets.Text(value=EXPLORE_PROMPTS[0], description="prompt", continuous_update=False),
               "cfg_scale": widgets.FloatSlider(value=7.5, min=0, max=15, step=0.5, description="cfg_scale",
                                                continuous_update=False),
               "seed": widgets.IntSlider(value=2, min=0, max=20, description="seed", continuous_update=False)})

# %% [markdown]
# ### Negative prompts
#
# The unconditioned half of the batch need not be empty. Guidance moves the prediction *away*
# from whatever text stands there, $\hat\epsilon = \epsilon(x_t, c_-) + s\,(\epsilon(x_t, c) -
# \epsilon(x_t, c_-))$, so a *negative prompt* $c_-$ (`generate(..., uncond_prompt=...)`) names
# what the picture should not be. The tiny model learned from captions, so its negative prompts
# are captions too: the prompt below names no colour, and each negative caption pushes the circle
# away from the colour it names.

# %%
NEGATIVE_PROMPT = PROMPT if REAL else "a large circle in the center"
NEGATIVES = ["", "ugly, blurry"] if REAL else [
    "", "a large purple circle in the center", "a large blue circle in the center", "a large red circle in the center"]

def negative_frame(negative, cfg_scale):
    picture = make_image(encode(NEGATIVE_PROMPT, negative), seed=1, cfg_scale=cfg_scale)
    return picture, verdict(NEGATIVE_PROMPT, picture)

explorer(negative_frame, {"negative": NEGATIVES, "cfg_scale": EXPLORE_SCALES[1:] or EXPLORE_SCALES},
         title=f"“{NEGATIVE_PROMPT}” with a negative prompt",
         live={"negative": widgets.Text(value="", description="negative", continuous_update=False)})

# %% [markdown]
# ### Between two seeds: latent interpolation
#
# Two seeds give two starting noises $z_a, z_b$, each of $d$ independent standard normal numbers.
# Their straight-line mixture $(1-t)\,z_a + t\,z_b$ is too short halfway, a norm of about
# $\sqrt{d/2}$ instead of $\sqrt d$, and no sampler expects noise like that. Spherical
# interpolation keeps the norm: with $\cos\Omega = z_a\cdot z_b / (\lVert z_a\rVert\lVert z_b\rVert)$,
# $\operatorname{slerp}(t) = \frac{\sin((1-t)\Omega)}{\sin\Omega} z_a + \frac{\sin(t\Omega)}{\sin\Omega} z_b$.

# %%
def slerp(a, b, t):
    """Spherical interpolation between two noise tensors (t = 0: a, t = 1: b)."""
    omega = torch.arccos((a * b).sum() / (a.norm() * b.norm()))
    return (torch.sin((1 - t) * omega) * a + torch.sin(t * omega) * b) / torch.sin(omega)

_, noise_a, _ = start(1)
_, noise_b, _ = start(2)
d = noise_a.numel()
print(f"d = {d:,}: |z_a| / √d = {noise_a.norm() / d ** 0.5:.3f}, halfway |lerp| / √d = "
      f"{(0.5 * noise_a + 0.5 * noise_b).norm() / d ** 0.5:.3f}, |slerp| / √d = {slerp(noise_a, noise_b, 0.5).norm() / d ** 0.5:.3f}")

def interpolation_frame(t):
    sampler, _, _ = start(1)  # DDIM draws no noise while sampling: the start is all that differs
    picture = decode(pipeline.denoise(diffusion, sampler, slerp(noise_a, noise_b, t), context, 7.5))
    return picture, verdict(PROMPT, picture)

explorer(interpolation_frame, {"t": [0.5] if REAL else [0.0, 0.125, 0.25, 0.375, 0.5, 0.625, 0.75, 0.875, 1.0]},
         title="from seed 1 (t = 0) to seed 2 (t = 1)",
         live={"t": widgets.FloatSlider(value=0.5, min=0, max=1, step=0.05, description="t", continuous_update=False)})

# %% [markdown]
# ## Image-to-image
#
# Instead of pure noise, start from an existing image: encode it (chapter 3), noise it to the
# timestep a fraction `strength` of the way up the schedule, and denoise from there with a new
# prompt (`prepare_latents` with an `image`). The lower the strength, the fewer steps are left
# to change the picture. Below each picture the analyzer of chapter 7 says what the tiny model drew.

# %%
from sdlab.tiny import data as shapes  # the Shapes dataset of chapter 7

if REAL:
    from PIL import Image
    from skimage import data

    start_image = np.array(Image.fromarray(data.astronaut()).resize((SIZE, SIZE), Image.Resampling.LANCZOS))
    NEW_PROMPT = "an oil painting of an astronaut, van gogh style"
else:
    start_image = shapes.render(shapes.parse_caption("a large green triangle in the center"), SIZE)
    NEW_PROMPT = "a large purple square in the center"
image = (torch.from_numpy(start_image).permute(2, 0, 1)[None].float() / 127.5 - 1).to(DEVICE)  # (1, 3, H, W) in [-1, 1]
with torch.no_grad():
    new_context = pipeline.encode_prompts(tokenizer, clip, [NEW_PROMPT, ""], DEVICE)
strengths = [0.2, 0.4, 0.6, 0.8, 1.0]
img2img = {s: make_image(new_context, seed=3, image=image, strength=s) for s in strengths}
fig, axes = plt.subplots(1, len(strengths) + 1, figsize=(12, 2.5))
axes[0].imshow(start_image)
axes[0].set_title("input", fontsize=9)
for ax, s in zip(axes[1:], strengths):
    ax.imshow(img2img[s])
    ax.set_title(f"strength {s:g}", fontsize=9)
for ax in axes:
    ax.axis("off")
fig.suptitle(f"“{NEW_PROMPT}” ({MODEL})", fontsize=9)
plt.show()
if not REAL:  # the tiny model's pictures can be read back (chapter 7's analyzer)
    read_back = {s: describe(img2img[s]) or "nothing recognisable" for s in strengths}
    for s, text in read_back.items():
        print(f"strength {s:g}: {text}")
    glue("img2img_lowest", f"{strengths[0]:g}")
    glue("img2img_lowest_reads", read_back[strengths[0]])
    glue("img2img_input", describe(start_image))

# %% [markdown]
# :::{admonition} The tiny model, at guidance scale `7.5`
# :class: note
# The analyzer reads the input as "{glue:text}`img2img_input`" and the picture at the lowest
# strength shown, {glue:text}`img2img_lowest`, as "{glue:text}`img2img_lowest_reads`". The tiny
# model was trained on nothing but whole scenes drawn from captions, and strong guidance pulls
# every step towards the new prompt, so even a few steps can replace the shape and colour; SD1.5,
# run on photographs, is where low strength is used to keep a composition.
# :::

# %%
def strength_frame(strength):
    picture = img2img[strength] if strength in img2img else make_image(new_context, seed=3, image=image, strength=strength)
    return picture, verdict(NEW_PROMPT, picture)

explorer(strength_frame, {"strength": strengths}, start={"strength": 0.6}, title=f"image-to-image: “{NEW_PROMPT}”",
         live={"strength": widgets.FloatSlider(value=0.6, min=0.05, max=1.0, step=0.05, description="strength",
                                               continuous_update=False)})

# %% [markdown]
# ## Inpainting
#
# To repaint only part of an image with a model that was not trained for it, run the usual loop
# and, after every step, put back the *known* region: the original latents, noised to the next
# timestep. Only the masked region is generated. The model never sees the mask, only latents
# whose known half is re-imposed, so nothing makes it continue what the mask cut: the analyzer
# says below how many pictures follow the prompt.
# `denoise` does this when `prepare_latents` is given a mask (SD1.5 also has a dedicated inpainting
# U-Net with extra input channels for the mask and the masked image, `sdlab.config.SD15_INPAINTING`,
# which sees the mask instead):
#
# ```{listing} sdlab.pipeline.keep_known_region
# ```

# %%
pixel_mask = torch.zeros(1, 1, SIZE, SIZE, device=DEVICE)  # (1, 1, H, W): 1 = repaint, 0 = keep
pixel_mask[..., :, SIZE // 2:] = 1.0  # repaint the right half
INPAINT_PROMPT = "a horse in a field" if REAL else "a small yellow circle to the right of a large green triangle"
with torch.no_grad():
    inpaint_context = pipeline.encode_prompts(tokenizer, clip, [INPAINT_PROMPT, ""], DEVICE)
inpainted = [make_image(inpaint_context, seed=s, image=image, pixel_mask=pixel_mask) for s in (4, 5, 6)]
shade = pixel_mask[0, 0].cpu().numpy()[..., None]  # (H, W, 1)
fig, axes = plt.subplots(1, 5, figsize=(11, 2.5))
axes[0].imshow(start_image)
axes[0].set_title("input", fontsize=9)
axes[1].imshow((start_image * (1 - 0.6 * shade)).astype(np.uint8))
axes[1].set_title("mask (dark = repaint)", fontsize=9)
for ax, inpainted_image in zip(axes[2:], inpainted):
    ax.imshow(inpainted_image)
    ax.set_title("inpainted", fontsize=9)
for ax in axes:
    ax.axis("off")
fig.suptitle(f"“{INPAINT_PROMPT}” ({MODEL})", fontsize=9)
plt.show()
if not REAL:
    followed = sum(score(INPAINT_PROMPT, picture)["all"] == 1 for picture in inpainted)
    print(f"pictures whose every attribute matches the prompt: {followed} of {len(inpainted)}")
    for picture in inpainted:
        print("  read back:", describe(picture) or "nothing recognisable")
    glue("inpaint_followed", followed)
    glue("inpaint_pictures", len(inpainted))

# %% [markdown]
# :::{admonition} The tiny model
# :class: note
# The analyzer finds the whole prompt in {glue:text}`inpaint_followed` of the
# {glue:text}`inpaint_pictures` inpainted pictures. The kept half is exactly the input's, but
# nothing makes the new half continue the triangle the mask cut: a model that sees the mask (the
# inpainting checkpoint) is what fits the edit to its surroundings.
# :::

# %% [markdown]
# ### Back to noise: DDIM inversion
#
# DDIM without fresh noise ($\eta = 0$) is a deterministic map from noise to picture, and it can be
# run backwards: from the latents of a real picture, each step predicts the noise and moves *up*
# the schedule, $x_{t'} = \sqrt{\bar\alpha_{t'}}\,\hat x_0 + \sqrt{1 - \bar\alpha_{t'}}\,\hat\epsilon$ with
# $t' > t$. Sampling forward from the noise it finds gives the picture back, without guidance
# (`sdlab.edit.ddim_invert`); sampling from it with another prompt edits the picture
# (`sdlab.edit.edit_picture`). The first picture below is not generated: it is drawn by the
# Shapes data set of chapter 7.

# %%
if not REAL:
    from sdlab import edit, viz

    from sdlab.tiny.evaluate import psnr as psnr_of_tensors

    def psnr(a, b):  # dB, for two uint8 pictures (chapter 7's measure)
        return float(psnr_of_tensors(shapes.to_tensor(a)[None], shapes.to_tensor(b)[None]))

    INVERT_PROMPT, EDIT_PROMPT = "a large blue circle in the center", "a large yellow circle in the center"
    drawn = shapes.render(shapes.parse_caption(INVERT_PROMPT), SIZE)
    with torch.no_grad():
        vae_only = pipeline.to_uint8(pipeline.decode(decoder, edit.image_latents(models, drawn)))[0]
    rebuilt, edited = edit.edit_picture(models, drawn, INVERT_PROMPT, EDIT_PROMPT, n_inference_steps=STEPS,
                                        tokenizer=tokenizer)
    viz.image_grid([drawn, vae_only, rebuilt, edited], ["drawn (Shapes)", "VAE only", "inverted, then sampled",
                                                        "sampled with “yellow”"])
    plt.show()
    print(f"PSNR against the drawn picture: VAE encode-decode {psnr(vae_only, drawn):.1f} dB, "
          f"DDIM inversion and back ({STEPS} steps) {psnr(rebuilt, drawn):.1f} dB")
    print("the edit reads:", describe(edited) or "nothing recognisable", "| the reconstruction:", describe(rebuilt))
    glue("inversion_psnr", f"{psnr(rebuilt, drawn):.1f}")
    glue("vae_psnr", f"{psnr(vae_only, drawn):.1f}")

# %% [markdown]
# :::{admonition} The tiny model
# :class: note
# Inverted and sampled back, the drawn picture returns at {glue:text}`inversion_psnr` dB, close to
# the {glue:text}`vae_psnr` dB the VAE alone allows. The inversion is exact only without guidance:
# with it, each step would have to be corrected, as null-text inversion does.
# :::

# %% [markdown]
# ## Where each word lands: cross-attention maps
#
# Every cross-attention layer of the U-Net gives, for every latent pixel $p$, a distribution over
# the $77$ tokens (chapter 1). `sdlab.inspect.record_attention` keeps those weights while a
# picture is made, without changing a single pixel of it: each attention call hands its queries
# and keys to a recorder, which computes the weights again on the side and keeps, per transformer
# block and step, the map of every token at the block's resolution.
#
# ```{listing} sdlab.inspect.record_attention
# ```
#
# A word's *heat map* (DAAM, [Tang et al. 2022](https://arxiv.org/abs/2210.04885)) upsamples
# each block's map of the word's tokens to the image, and sums over blocks $\ell$ and steps $t$:
# $D_j = \sum_{\ell, t} \max(0, \operatorname{up}(\bar A^{\ell,t}_{\cdot, j}))$, with $\bar A$ the
# mean over the heads:
#
# ```{listing} sdlab.inspect.token_heatmaps
# ```

# %%
from sdlab import inspect, viz

with inspect.record_attention(models, per_head=True) as recording:
    attention_image = make_image(context, seed=1)
print(f"recorded: {len(recording.blocks)} transformer blocks ({', '.join(recording.blocks)}) over "
      f"{recording.n_steps} steps, {recording.nbytes() / 2**20:.1f} MiB")
print("the same picture as without recording:", np.array_equal(attention_image, make_image(context, seed=1)))
plain_maps = inspect.word_heatmaps(recording, tokenizer, PROMPT, (SIZE, SIZE), start_token="keep")
viz.heatmap_overlay(attention_image, plain_maps, suptitle=f"“{PROMPT}”: every word's map, summed over heads, blocks and steps")
plt.show()

# %% [markdown]
# Do the maps land on the objects? For the tiny model this can be measured: on single-object
# prompts the analyzer finds the object, and `inspect.localization_report` computes how much of
# the shape word's and of the colour word's heat lies inside the object's box (grown by one latent
# pixel), for several ways of aggregating. The prompts below are held out from training and from
# the choice of heads; the pictures are made with chapter 7's evaluation settings
# (`sdlab.tiny.evaluate.generate_batch`: {glue:text}`loc_settings`).

# %%
if not REAL:
    from sdlab.tiny.data import heldout_prompts
    from sdlab.tiny.evaluate import generate_batch

    LOCALIZATION_CHOICES = ["flat map", "all blocks, all steps, SOT kept", "all blocks, all steps, SOT renormalized",
                            "block up.3 only, SOT kept", "tiny localizing heads, cutoff 0.4"]
    probe_prompts = heldout_prompts(16, seed=12, two_object_prob=0.0)
    report = inspect.localization_report(models, probe_prompts, list(range(8000, 8016)),
                                         {name: inspect.TINY_CHOICES[name] for name in LOCALIZATION_CHOICES},
                                         tokenizer=tokenizer)
    print(f"{len(probe_prompts)} held-out prompts, e.g. “{probe_prompts[0]}”; share of each word's heat inside the object's box")
    print(f"{'aggregation':42s} {'shape word: mean, ≥ 50%':>26s} {'colour word: mean, ≥ 50%':>27s}")
    for name, row in report.items():
        print(f"{name:42s} {row['shape']['mean']:13.2f} {row['shape']['at_least']:11.0%} "
              f"{row['colour']['mean']:14.2f} {row['colour']['at_least']:11.0%}")
    best, plain, flat = (report[name] for name in ("tiny localizing heads, cutoff 0.4",
                                                   "all blocks, all steps, SOT kept", "flat map"))
    glue("loc_flat", f"{flat['shape']['mean']:.2f}")
    glue("loc_plain_shape", f"{plain['shape']['mean']:.2f}")
    glue("loc_best_shape", f"{best['shape']['mean']:.2f}")
    glue("loc_best_colour", f"{best['colour']['mean']:.2f}")
    glue("loc_best_shape_share", f"{best['shape']['at_least']:.0%}")
    glue("loc_best_colour_share", f"{best['colour']['at_least']:.0%}")
    glue("loc_cutoff", f"{inspect.TINY_LOCALIZING['shape']['cutoff']:g}")
    for kind in ("shape", "colour"):
        heads = inspect.TINY_LOCALIZING[kind]["heads"]
        glue(f"loc_{kind}_heads", ", ".join(f"{block} head {h}" for block, hs in heads.items() for h in hs))
    import inspect as python_inspect  # the defaults of the evaluation settings, read from the code

    defaults = {name: value.default for name, value in python_inspect.signature(generate_batch).parameters.items()
                if value.default is not python_inspect.Parameter.empty}
    glue("loc_settings", ", ".join(f"{name}={value}" for name, value in defaults.items()
                                   if name in ("sampler_name", "n_inference_steps", "cfg_scale")))

# %% [markdown]
# :::{admonition} The tiny model
# :class: note
# The plain sum puts {glue:text}`loc_plain_shape` of the shape word's heat inside the box, hardly
# more than a flat map ({glue:text}`loc_flat`, the box's share of the picture). The tiny model's
# cross-attention localizes in a few heads only, which the mean over heads washes out: the shape
# word in the heads {glue:text}`loc_shape_heads`, the colour word in {glue:text}`loc_colour_heads`
# over the late steps (`inspect.TINY_LOCALIZING`, chosen on other prompts). Those heads, with
# DAAM's cutoff at {glue:text}`loc_cutoff` of the maximum, put {glue:text}`loc_best_shape` of the shape word's heat
# and {glue:text}`loc_best_colour` of the colour word's inside the box, and at least half of it in
# {glue:text}`loc_best_shape_share` and {glue:text}`loc_best_colour_share` of the prompts.
# SD1.5's maps localize with the plain sum; the choice of heads is a finding about this small model.
# :::
#
# ### Explore: word, blocks, steps
#
# The same recording, cut three ways: the word, the blocks summed (all, the way down or the way
# up), and the steps summed (all, the first half, where the layout is decided, or the second).

# %%
import functools

STOP_WORDS = {"a", "an", "the", "of", "to", "in", "on", "at"}
attention_words = [word for word, _ in inspect.word_tokens(tokenizer, PROMPT) if word not in STOP_WORDS]
half = recording.n_steps // 2
block_groups = {"all blocks": None, **{f"{part} blocks": tuple(b for b in recording.blocks if b.startswith(part))
                                       for part in ("down", "up")}}
step_spans = {"all steps": None, f"steps 1–{half}": slice(0, half), f"steps {half + 1}–{recording.n_steps}": slice(half, None)}

@functools.cache
def maps_of(blocks, steps):
    return inspect.word_heatmaps(recording, tokenizer, PROMPT, (SIZE, SIZE), start_token="keep",
                                 blocks=block_groups[blocks], steps=step_spans[steps])

def attention_frame(word, blocks, steps):
    return viz.heat_blend(attention_image, maps_of(blocks, steps)[word]), f"“{word}”: {blocks}, {steps}"

explorer(attention_frame, {"word": attention_words, "blocks": list(block_groups), "steps": list(step_spans)},
         title="cross-attention heat map", width=256)

# %% [markdown]
# ## What the model believes at each step
#
# At every step the noise prediction gives an estimate of the clean latents. For a sampler whose
# latents are $x_t = \sqrt{\bar\alpha_t}\,x_0 + \sqrt{1 - \bar\alpha_t}\,\epsilon$ (DDPM, DDIM,
# DPM++ with $\bar\alpha = 1/(\sigma^2 + 1)$) it is
# $\hat x_0 = (x_t - \sqrt{1 - \bar\alpha_t}\,\hat\epsilon) / \sqrt{\bar\alpha_t}$; the Euler samplers
# keep $\tilde x = x_0 + \sigma\epsilon$ instead, so for them $\hat x_0 = \tilde x - \sigma\hat\epsilon$.
# Every sampler's `step` computes it with the same function, from the two factors of its own
# latents, `sample` $= a\,x_0 + b\,\epsilon$:
#
# ```{listing} sdlab.schedule.predict_x0
# ```
#
# Each sampler's `add_noise` *is* its convention: `add_noise(1, t, 0)` is $a$ and
# `add_noise(0, t, 1)` is $b$ at timestep $t$. So `estimate_x0` below asks the sampler for its two
# factors instead of guessing them from its class, and is right for every sampler, including one
# written later. `denoise` calls its `callback` after every step with the new latents and the
# guided noise prediction of the step; keeping the latents each step started from gives $\hat x_0$. Decoding it
# shows what the model currently "sees": the layout is decided in the first few steps, the details
# last. The animation is plain JavaScript and plays in the rendered book.

# %%
import re

from IPython.display import HTML
from matplotlib import animation
from sdlab.schedule import predict_x0

def estimate_x0(sampler, t, latents, eps):
    """The sampler's own x̂₀ at timestep `t` from the latents that step started from: its
    `add_noise` gives the factors a, b of its latents a·x0 + b·ε."""
    one, zero = torch.ones(1), torch.zeros(1)
    a, b = sampler.add_noise(one, t, zero), sampler.add_noise(zero, t, one)
    return predict_x0(eps, latents, a.to(latents.device), b.to(latents.device), sampler.prediction_type)

def believed_images(context, seed, sampler_name="ddim"):
    """The final picture and (timestep, decoded x̂₀) after every step."""
    sampler, latents, _ = start(seed, sampler_name)
    stepped_from, predictions = [latents], []

    def record_x0(i, t, latents, eps):  # called by denoise after step i
        predictions.append((float(t), decode(estimate_x0(sampler, t, stepped_from[-1], eps))))
        stepped_from.append(latents)

    final = decode(pipeline.denoise(diffusion, sampler, latents, context, 7.5, callback=record_x0))
    return final, predictions

final, predictions = believed_images(context, seed=1)
fig, ax = plt.subplots(figsize=(3, 3))
frame = ax.imshow(predictions[0][1])
title = ax.set_title("", fontsize=9)
ax.axis("off")

def show_step(k):
    frame.set_data(predictions[k][1])
    title.set_text(f"step {k + 1}/{len(predictions)}: x̂₀ at t = {predictions[k][0]:.0f}")
    return frame, title

movie = animation.FuncAnimation(fig, show_step, frames=len(predictions), interval=300)
plt.close(fig)
player = movie.to_jshtml(default_mode="once")  # frames drawn at savefig.dpi, twice the figure's
width = round(fig.get_figwidth() * fig.dpi)  # shown at the figure's size: 2 image pixels per screen pixel
player = player.replace('<img id="_anim_img', f'<img width="{width}" id="_anim_img', 1)
# matplotlib links its button icons from a CDN; the book ships Font Awesome itself (offline)
HTML(re.sub(r'<link rel="stylesheet"\s+href="https://maxcdn[^"]*">', "", player))

# %%
picks = np.linspace(0, len(predictions) - 1, 6).round().astype(int)
fig, axes = plt.subplots(1, 6, figsize=(11, 2.2))
for ax, k in zip(axes, picks):
    ax.imshow(predictions[k][1])
    ax.set_title(f"x̂₀ at t = {predictions[k][0]:.0f}", fontsize=9)
    ax.axis("off")
plt.show()

# %% [markdown]
# **Check:** `estimate_x0` is each sampler's own $\hat x_0$. While a step runs, every sampler calls
# `predict_x0`; listening to those calls (`unittest.mock`, for this check only) gives the
# $\hat x_0$ the step itself used, to compare with what the callback computed:

# %% tags=["nbval-check-output"]
from unittest import mock

import sdlab.ddpm
import sdlab.samplers

def x0_gap(sampler_name, steps=8):
    """The largest difference between the step's own x̂₀ and `estimate_x0`, over a whole trajectory."""
    sampler, latents, _ = start(1, sampler_name)
    sampler.set_inference_timesteps(steps)
    stepped_from, ours, own = [latents], [], []

    def listen(*args, **kwargs):
        own.append(predict_x0(*args, **kwargs))
        return own[-1]

    def record(i, t, new_latents, eps):
        ours.append(estimate_x0(sampler, t, stepped_from[-1], eps))
        stepped_from.append(new_latents)

    with mock.patch.object(sdlab.samplers, "predict_x0", listen), mock.patch.object(sdlab.ddpm, "predict_x0", listen):
        pipeline.denoise(diffusion, sampler, latents, context, 7.5, callback=record)
    return max((a - b).abs().max().item() for a, b in zip(ours, own)), len(ours) == len(own) == steps

for name in sdlab.samplers.sampler_names():
    gap, every_step = x0_gap(name)
    print(f"{name:16s} x̂₀ as the sampler's own step computes it: {gap < 1e-4} (on every step: {every_step})")

# %% [markdown]
# ## Summary
#
# * Text-to-image = tokenize → CLIP → a sampler loop over the U-Net with classifier-free guidance
#   → VAE decoder; `pipeline.generate` is exactly these stages, and gives the same pixels.
# * The guidance scale trades diversity for prompt fidelity; image-to-image starts the loop
#   part-way from a noised encoding; inpainting re-imposes the known region after every step.
# * A negative prompt replaces the empty text that guidance moves away from; noise is
#   interpolated spherically, so that every mixture keeps the norm a sampler expects.
# * `inspect.record_attention` records cross-attention without changing a pixel; summed into
#   per-word maps (DAAM) they show where each word acts, and on the tiny model they localize
#   only in a few heads. $\hat x_0$ shows the image forming, coarse to fine.
#
# ## Exercises
#
# Each exercise with a check names it (`from sdlab.exercises import ...`; the checks generate
# with the tiny model); the worked solutions are on the [solutions](course/solutions.ipynb) page.
#
# :::{exercise}
# :label: ex-6-1
#
# Use a negative prompt (`uncond_prompt=`) to remove a colour from the tiny model's pictures of a
# prompt that names no colour. Check: `check_negative_prompt(prompt, uncond_prompt, colour)`.
# :::
#
# :::{exercise}
# :label: ex-6-2
#
# Pass `sampler_name="euler_a"` and `"dpmpp_2m"` to `make_image` (and to `believed_images`):
# how few steps are enough? Check: `check_enough_steps(sampler_name, steps)`.
# :::
#
# :::{exercise}
# :label: ex-6-3
#
# Inpainting without re-noising the known region (put back `inpainting.image_latents` itself,
# in a `denoise` callback of your own) gives visible seams. Try it and explain why. (A question
# to answer in words.)
# :::
#
# Test yourself with {ref}`this chapter's quiz <quiz-pipeline>`; the slides for teaching it are
# linked from the {doc}`Instructors page <course/instructors>`.
