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
# # 4. The U-Net
#
# The U-Net is the network that is trained, and {glue:text}`unet_share:.0%` of Stable Diffusion's
# parameters. Given the noisy latents $x_t$ of shape $(B, 4, 64, 64)$, the timestep $t$ and the
# text context $c$ of shape $(B, 77, 768)$ (SD1.5 at 512×512), it predicts the noise
# $\epsilon_\theta(x_t, t, c)$ that was added. This chapter builds it from its parts: the time
# embedding, residual blocks that take the time, transformer blocks that take the text, and the
# skip connections that give the U its shape.
#
# :::{admonition} This chapter
# **You will learn** the sinusoidal time embedding, residual blocks that take the time,
# transformer blocks that take the text by cross-attention, the U of skip connections, and parity
# with `diffusers`' `UNet2DConditionModel`.
#
# **You need** chapters 1–3.
#
# {chapter-time}
# :::

# %% tags=["hide-input"]
# book-setup: tools/setup_cell.py goes here when the notebook is built

# %% [markdown]
# ## The sinusoidal time embedding
#
# The timestep is a single number, $t = 0 \dots 999$. The network sees it as a vector of sines and
# cosines of geometrically spaced frequencies, the positional encoding of the Transformer:
#
# ```{listing} sdlab.diffusion.get_time_embedding
# ```

# %%
from sdlab.diffusion import get_time_embedding

t = torch.arange(1000)
emb = get_time_embedding(t, 320)  # (1000, 320)
print("embedding of 1000 timesteps:", tuple(emb.shape), "| values in [-1, 1]:", bool(emb.abs().max() <= 1))
fig, axes = plt.subplots(1, 2, figsize=(11, 3.2), gridspec_kw={"width_ratios": [1.4, 1]})
axes[0].imshow(emb.T, aspect="auto", cmap="RdBu_r", interpolation="antialiased")
axes[0].set(xlabel="timestep t", ylabel="channel", title="get_time_embedding(t, 320): cosines, then sines")
for i in (0, 20, 60, 120):
    axes[1].plot(t, emb[:, i], label=f"channel {i}")
axes[1].set(xlabel="timestep t", title="a few channels")
axes[1].legend(fontsize=9, loc="lower left")
plt.show()

# %% [markdown]
# Low channels oscillate fast and tell nearby timesteps apart; high channels vary slowly and
# say roughly where in the schedule we are. A small MLP (`TimeEmbedding`) maps the
# {glue:text}`time_dim` numbers to {glue:text}`time_width`, the width every residual block reads:
#
# ```{listing} sdlab.diffusion.TimeEmbedding
# ```
#
# ## Residual blocks that take the time
#
# Each residual block normalises, convolves, **adds a per-channel shift computed from the time
# embedding**, normalises and convolves again, and adds its input back (through a 1×1
# convolution when the width changes):
#
# ```{listing} sdlab.diffusion.UNET_ResidualBlock
# ```
#
# ## Transformer blocks that take the text
#
# At the three highest resolutions, each residual block is followed by a transformer block over
# the pixels: self-attention between the pixels, **cross-attention from the pixels to the text
# vectors** (one per token, chapter 2), and a GEGLU feed-forward layer, each with its layer norm and residual connection.
# This is the only place the prompt enters the U-Net.
#
# ```{listing} sdlab.diffusion.UNET_AttentionBlock
# ```

# %% tags=["nbval-check-output"]
from sdlab.diffusion import UNET_AttentionBlock, UNET_ResidualBlock

res = UNET_ResidualBlock(64, 128, n_time=1280).eval()
attn = UNET_AttentionBlock(n_head=8, n_embd=16, d_context=768).eval()  # 8 heads of 16 = 128 channels
x, time, context = torch.randn(1, 64, 16, 16), torch.randn(1, 1280), torch.randn(1, 77, 768)
with torch.no_grad():
    h = res(x, time)
    y = attn(h, context)
print("residual block: ", tuple(x.shape), "->", tuple(h.shape))
print("attention block:", tuple(h.shape), "+ context", tuple(context.shape), "->", tuple(y.shape))

# %% [markdown]
# ## The U: encoder, bottleneck, decoder, skip connections
#
# ```{listing} sdlab.diffusion.UNET
# ```
#
# The encoder halves the resolution three times ({glue:text}`resolutions`), the decoder doubles it back.
# Every encoder layer's output is kept, and the decoder layer at the mirrored position
# concatenates it to its input on the channel axis. Without these *skip connections* the fine
# detail lost in down-sampling could not be recovered. Here are the outputs of every layer of
# SD1.5's U-Net for a 512×512 image (64×64 latents), traced on the meta device:

# %% tags=["nbval-check-output"]
from sdlab import SD15
from sdlab.diffusion import Diffusion

with torch.device("meta"):
    unet = Diffusion(SD15.unet)
    shapes = {}
    hooks = [layer.register_forward_hook(lambda m, i, o, name=name: shapes.__setitem__(name, tuple(o.shape)))
             for name, layer in [*[(f"encoders.{i}", block) for i, block in enumerate(unet.unet.encoders)],
                                 ("bottleneck", unet.unet.bottleneck),
                                 *[(f"decoders.{i}", block) for i, block in enumerate(unet.unet.decoders)]]]
    out = unet(torch.zeros(1, 4, 64, 64), torch.zeros(1, 77, 768), torch.zeros(1, 320))  # (B, 320): an embedded timestep
for hook in hooks:
    hook.remove()
for name, shape in shapes.items():
    print(f"{name:12s} -> {shape}")
print("output       ->", tuple(out.shape))

# %%
names = list(shapes)
sizes = [shapes[n][2] for n in names]
widths = [shapes[n][1] for n in names]
fig, ax = plt.subplots(figsize=(11, 3.4))
ax.bar(range(len(names)), widths, color=["#6fa8dc" if n.startswith("enc") else "#e06666" if n == "bottleneck"
                                           else "#93c47d" for n in names])
for i, (w, s) in enumerate(zip(widths, sizes)):
    ax.text(i, w + 20, f"{s}²", ha="center", fontsize=9)
n_enc = len(unet.unet.encoders)
for k in range(n_enc):  # skip connection: encoder k feeds decoder (n_enc - 1 - k)
    start, end = k, n_enc + 1 + (n_enc - 1 - k)
    ax.annotate("", xy=(end, -60), xytext=(start, -60),
                arrowprops=dict(arrowstyle="->", color="#999999", lw=0.7, connectionstyle="arc3,rad=0.25"))
ax.set_xticks(range(len(names)), [n.replace("encoders.", "e").replace("decoders.", "d").replace("bottleneck", "mid")
                                  for n in names], fontsize=9)
ax.set(ylabel="channels", ylim=(-450, 1450),
       title="SD1.5 U-Net: width of each layer's output (label: resolution); arcs: skip connections")
plt.show()
from sdlab import model_loader

with torch.device("meta"):
    sd15_total = sum(p.numel() for m in model_loader.build_models(SD15).values() for p in m.parameters())
unet_parameters = sum(p.numel() for p in unet.parameters())
print(f"{len(names)} layers, {unet_parameters:,} parameters ({unet_parameters / sd15_total:.0%} of SD1.5's)")
glue("unet_share", unet_parameters / sd15_total)
glue("unet_parameters", f"{unet_parameters:,}")
glue("n_unet_layers", len(names))
glue("resolutions", " → ".join(str(s) for s in dict.fromkeys(sizes[: n_enc + 1])))
glue("max_width", max(widths))
glue("time_dim", SD15.unet.time_dim)
glue("time_width", unet.time_embedding(torch.zeros(1, SD15.unet.time_dim, device="meta")).shape[-1])


# %% [markdown]
# ## Parameters per block
#
# SD1.5's U-Net has {glue:text}`unet_parameters` parameters. Most sit at the two lowest
# resolutions, where the width is {glue:text}`max_width`: the attention and the convolutions cost width² per pixel, and there are few
# pixels but many channels.

# %% tags=["nbval-check-output"]
def count(module):
    return sum(p.numel() for p in module.parameters())

print(f"{'time_embedding':14s} {count(unet.time_embedding):>12,d}")
for i, layer in enumerate(unet.unet.encoders):
    kinds = "+".join(type(block).__name__.replace("UNET_", "").replace("Block", "") for block in layer)
    print(f"encoders.{i:<5d} {count(layer):>12,d}  {kinds}")
print(f"{'bottleneck':14s} {count(unet.unet.bottleneck):>12,d}")
for i, layer in enumerate(unet.unet.decoders):
    kinds = "+".join(type(block).__name__.replace("UNET_", "").replace("Block", "") for block in layer)
    print(f"decoders.{i:<5d} {count(layer):>12,d}  {kinds}")
print(f"{'final':14s} {count(unet.final):>12,d}")
print(f"{'total':14s} {count(unet):>12,d}")

# %% [markdown]
# ## Parity with diffusers
#
# A small U-Net (two levels, of $32$ and $64$ channels, one attention level, two heads) with random
# weights: `sdlab` writes its weights in the original checkpoint's key layout
# (`model_converter.to_standard`), `diffusers`' own single-file converter reads them into a
# `UNet2DConditionModel`, and both predict the noise for the same input. Two independent key
# mappings and two implementations must agree.

# %% tags=["nbval-check-output"]
import warnings

from diffusers import UNet2DConditionModel
from diffusers.loaders import single_file_utils
from sdlab import UNetConfig, model_converter

small = UNetConfig(base_channels=32, channel_mult=(1, 2), attention_levels=(True, False), n_res_blocks=1,
                   n_head=2, d_context=48, n_groups=8, time_dim=32)
reference_config = dict(sample_size=16, in_channels=4, out_channels=4, cross_attention_dim=48, attention_head_dim=2,
                        block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8,
                        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
torch.manual_seed(0)
ours = Diffusion(small).eval()
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    reference = UNet2DConditionModel(**reference_config).eval()
    original = model_converter.to_standard({"diffusion": ours})
    print(reference.load_state_dict(single_file_utils.convert_ldm_unet_checkpoint(original, reference_config)))

latents, context, timesteps = torch.randn(2, 4, 16, 16), torch.randn(2, 7, 48), torch.tensor([10, 700])
with torch.no_grad():
    a = ours(latents, context, timesteps)
    b = reference(latents, timesteps, context).sample
print(f"parameters: {count(ours):,} | output {tuple(a.shape)} | max |difference| < 1e-5: {(a - b).abs().max().item() < 1e-5}")

# %% [markdown]
# ## Summary
#
# * $\epsilon_\theta(x_t, t, c)$: latents $(B, 4, h, w)$ + timestep + text $(B, 77, 768)$ → noise $(B, 4, h, w)$.
# * The timestep enters as a sinusoidal embedding + MLP, added as a per-channel shift in every
#   residual block; the text enters only through cross-attention in the transformer blocks.
# * Encoder ({glue:text}`resolutions`), bottleneck, decoder back up, with a skip connection from
#   every encoder layer to its mirror: {glue:text}`n_unet_layers` layers,
#   {glue:text}`unet_parameters` parameters for SD1.5.
# * `sdlab`'s U-Net matches `diffusers`' `UNet2DConditionModel` with the same weights.
#
# ## Exercises
#
# Each exercise with a check names it (`from sdlab.exercises import ...`); the worked solutions
# are on the [solutions](course/solutions.ipynb) page.
#
# :::{exercise}
# :label: ex-4-1
#
# Feed the same latents with two different timesteps to the small U-Net (`Diffusion(SMALL.unet)`).
# Which block (its name in `named_modules()`, e.g. `"unet.encoders.1.0"`) is the first whose output
# differs? And with two different contexts?
# Check: `check_first_differing_layers(time_layer, context_layer)`.
# :::
#
# :::{exercise}
# :label: ex-4-2
#
# Set `attention_levels=(False, False, False, False)` for SD1.5's sizes. How many parameters
# are left, and what could such a model still learn?
# Check: `check_unet_parameters(count, attention_levels=(False, False, False, False))`.
# :::
#
# :::{exercise}
# :label: ex-4-3
#
# Remove one skip connection (replace it with zeros of the same shape) and explain why the
# U-Net cannot be trained to reproduce fine detail without it. (A question to answer in words.)
# :::
#
# :::{exercise}
# :label: ex-4-4
#
# What are the periods, in timesteps, of the fastest and the slowest sinusoid of the time
# embedding (`get_time_embedding`, width $320$)? Why does it use frequencies down to $10000^{-1}$
# when $t$ only goes to $999$? Check: `check_time_frequencies(fastest_period, slowest_period)`.
# :::
#
# Test yourself with {ref}`this chapter's quiz <quiz-unet>`; the slides for teaching it are
# linked from the {doc}`Instructors page <course/instructors>`.
