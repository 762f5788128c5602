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
# # Solutions to the exercises
#
# The reference solution of every exercise of the chapters, in their order, each hidden until you
# open it. Every code cell ends with the exercise's check from `sdlab.exercises`: it recomputes the
# answer with sdlab itself and prints a line starting with ✓, or raises an `AssertionError` that
# says what is wrong. CI runs this page, so a solution that fails its own check is a bug.
#
# Exercises without a code answer (the ones that ask *why*) have their answer in words.

# %% tags=["hide-input"]
# book-setup: tools/setup_cell.py goes here when the notebook is built

# %%
import math

import torch
from sdlab import exercises
from sdlab.exercises import tiny_models

torch.set_num_threads(1)  # small tensors: one thread is faster than two
models = tiny_models()  # the bundled tiny model, as the checks use it
tokenizer = exercises._tokenizer()

# %% [markdown]
# ## 0. The map
#
# :::{solution-start} ex-0-1
# :class: dropdown
# :::
#
# Build the U-Net on the meta device (no memory) and count. Convolutions and linear layers hold
# $c_\text{in} \cdot c_\text{out}$ weights, so halving every width divides the count by about four
# (the biases and normalisations, linear in the width, make it a little more than a quarter).

# %%
from sdlab.config import UNetConfig
from sdlab.diffusion import Diffusion
from sdlab.exercises import check_unet_parameters

with torch.device("meta"):
    narrow = Diffusion(UNetConfig(base_channels=160))
count = sum(p.numel() for p in narrow.parameters())
check_unet_parameters(count, base_channels=160)

# %% [markdown]
# :::{solution-end}
# :::
#
# :::{solution-start} ex-0-2
# :class: dropdown
# :::
#
# Text-to-image starts from noise, so it never encodes a picture: no VAE encoder. Image-to-image
# (and inpainting) encode the input picture first, so they need all four.

# %%
from sdlab.exercises import check_models_needed

check_models_needed(text_to_image={"clip", "diffusion", "decoder"},
                    image_to_image={"clip", "encoder", "diffusion", "decoder"})

# %% [markdown]
# :::{solution-end}
# :::
#
# :::{solution-start} ex-0-3
# :class: dropdown
# :::

# %%
from sdlab.exercises import check_compression_factor

check_compression_factor(512 * 512 * 3 / (64 * 64 * 4))

# %% [markdown]
# :::{solution-end}
# :::
#
# ## 1. Attention
#
# :::{solution-start} ex-1-1
# :class: dropdown
# :::
#
# Without the factor the scores of random vectors have a standard deviation of $\sqrt{d_k}$: the
# softmax of ever larger scores picks one key (entropy towards $0$). A saturated softmax has
# gradients near zero for every other key, so training stalls; dividing by $\sqrt{d_k}$ keeps the
# scores at unit variance for every width.

# %%
from sdlab.exercises import check_unscaled_entropy


def entropy(q, k):
    p = torch.softmax(q @ k.transpose(-1, -2), dim=-1)  # (B, H, Lq, Lk), no 1/sqrt(d_k)
    return -(p * p.clamp_min(1e-30).log()).sum(-1).mean()


check_unscaled_entropy(entropy)

# %% [markdown]
# :::{solution-end}
# :::
#
# :::{solution-start} ex-1-2
# :class: dropdown
# :::
#
# Every output is a weighted average over *all* positions with weights computed from the
# contents alone, so reordering the inputs reorders the outputs and changes nothing else. CLIP
# learns its sense of order from the position embedding it adds to the token embeddings
# (`CLIPEmbedding.position_embedding`), and its causal mask; the U-Net's pixels get theirs from
# the convolutions around the attention.

# %%
from sdlab.exercises import check_equivariance_error


def equivariance_error(attend, x, perm):
    with torch.no_grad():
        return (attend(x[:, perm]) - attend(x)[:, perm]).abs().max()


check_equivariance_error(equivariance_error)

# %% [markdown]
# :::{solution-end}
# :::
#
# :::{solution-start} ex-1-3
# :class: dropdown
# :::
#
# The four projections cost $4 L d^2$ multiply-adds; $QK^\top$ and $AV$ cost $L^2 d$ each,
# whatever the number of heads. With $L = 4096 > d = 320$ the $L^2$ terms dominate. The fused
# kernel does the same arithmetic; what it saves is memory and memory traffic: it never writes
# the $L \times L$ matrix of each head.

# %%
from sdlab.exercises import check_attention_macs

L, d = 4096, 320
check_attention_macs(projections=4 * L * d * d, scores_and_values=2 * L * L * d)

# %% [markdown]
# :::{solution-end}
# :::
#
# :::{solution-start} ex-1-4
# :class: dropdown
# :::

# %%
from sdlab.exercises import check_padding_mask


def masked_attention(q, k, v, padding):
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])  # (B, H, Lq, Lk)
    scores = scores.masked_fill(padding[:, None, None, :], float("-inf"))  # no query sees a padded key
    return scores.softmax(dim=-1) @ v


check_padding_mask(masked_attention)

# %% [markdown]
# :::{solution-end}
# :::
#
# ## 2. The CLIP text encoder
#
# :::{solution-start} ex-2-1
# :class: dropdown
# :::
#
# Rare and long words are cut into pieces that occur often in the training text. A name or an
# emoji takes as many tokens as `tokenizer.tokenize` shows (an emoji is several bytes, often
# more than one token).

# %%
from sdlab.exercises import check_long_word

print(tokenizer.tokenize("🦫"))
check_long_word("antidisestablishmentarianism")

# %% [markdown]
# :::{solution-end}
# :::
#
# :::{solution-start} ex-2-2
# :class: dropdown
# :::
#
# The text encoder reads `tokenizer.model_max_length` tokens, the start and end tokens included,
# so two fewer of the prompt's. The tokenizer warns how many were dropped; every word after them is
# never seen. Here every word is one token, so the unseen ones are the words after the first
# `kept`.

# %%
import warnings

from sdlab.exercises import check_truncation

prompt = " ".join(f"{colour} circle" for colour in ["red", "green", "blue", "yellow"] * 12)  # 96 words
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    tokenizer([prompt], padding="max_length", max_length=77, truncation=True)
print(caught[0].message)
kept = tokenizer.model_max_length - 2
check_truncation(prompt, prompt.split()[kept:])

# %% [markdown]
# :::{solution-end}
# :::
#
# :::{solution-start} ex-2-3
# :class: dropdown
# :::
#
# Under the causal mask query $i$ sees keys $0 \dots i$; without it, all of them. Only the last
# query saw every key already, so after one layer only the last position agrees (after two
# layers not even that one: its keys have changed). The parity test compares every position, so
# it fails.

# %%
from sdlab.exercises import check_unmasked_agreement

check_unmasked_agreement([76])

# %% [markdown]
# :::{solution-end}
# :::
#
# :::{solution-start} ex-2-4
# :class: dropdown
# :::

# %%
from sdlab.exercises import check_causal_prefix

a = "a large red circle to the left of a small blue square"
b = "a large red circle to the left of a small green square"
ids = tokenizer([a, b], padding="max_length", max_length=77, truncation=True).input_ids
first = next(i for i, (x, y) in enumerate(zip(*ids)) if x != y)
with torch.no_grad():
    out = models["clip"](torch.tensor(ids))  # (2, 77, d)
print(f"first different token at {first}; largest change before it: {(out[0, :first] - out[1, :first]).abs().max():.1e}")
check_causal_prefix(a, b, first)

# %% [markdown]
# :::{solution-end}
# :::
#
# ## 3. The VAE
#
# :::{solution-start} ex-3-1
# :class: dropdown
# :::
#
# The posterior's standard deviation $\sqrt v$ is tiny against the spread of the means, so the
# two decodes are indistinguishable: the encoder is nearly deterministic, and $v$ matters only
# for the KL term of training.

# %%
from sdlab.exercises import check_posterior_std
from sdlab.tiny import data as shapes

scenes = shapes.sample_scenes(6, seed=3, split="train")
images = torch.stack([shapes.to_tensor(shapes.render(s, 64)) for s in scenes])  # (6, 3, 64, 64)
encoder, decoder = models["encoder"], models["decoder"]
with torch.no_grad():
    mean, log_variance = encoder.moments(images)
    noise = torch.randn(mean.shape, generator=torch.Generator().manual_seed(0))
    scale = encoder.config.scale_factor
    plain, noisy = decoder(mean * scale), decoder((mean + torch.exp(0.5 * log_variance) * noise) * scale)
print(f"largest pixel change from the noise: {(plain - noisy).abs().max():.3f} (pixels span 2)")
check_posterior_std(torch.exp(0.5 * log_variance).mean(), images)

# %% [markdown]
# :::{solution-end}
# :::
#
# :::{solution-start} ex-3-2
# :class: dropdown
# :::

# %%
from sdlab.exercises import check_interpolation

with torch.no_grad():
    z = (mean * scale)[:2]  # the latents of two pictures, (2, 4, 8, 8)
    t = torch.linspace(0, 1, 6).view(-1, 1, 1, 1)
    path = decoder((1 - t) * z[:1] + t * z[1:])  # (6, 3, 64, 64)
check_interpolation(path, z[:1], z[1:])

# %% [markdown]
# :::{solution-end}
# :::
#
# :::{solution-start} ex-3-3
# :class: dropdown
# :::

# %%
from sdlab.exercises import check_channel_ablation

latents = z[:1]
with torch.no_grad():
    pictures = torch.cat([decoder(latents * (torch.arange(4) != c).view(1, 4, 1, 1)) for c in range(4)])
check_channel_ablation(pictures, latents)

# %% [markdown]
# :::{solution-end}
# :::
#
# :::{solution-start} ex-3-4
# :class: dropdown
# :::
#
# Choose $1/\mathrm{std}$, so that the scaled latents the U-Net sees have unit variance, as SD's
# `SD15.vae.scale_factor` was chosen.

# %%
from sdlab.exercises import check_scale_factor

many = torch.stack([shapes.to_tensor(shapes.render(s, 64)) for s in shapes.sample_scenes(256, seed=0)])
with torch.no_grad():
    mu, log_v = encoder.moments(many)
samples = mu + torch.exp(0.5 * log_v) * torch.randn(mu.shape, generator=torch.Generator().manual_seed(1))
check_scale_factor(1 / samples.std(), many)

# %% [markdown]
# :::{solution-end}
# :::
#
# ## 4. The U-Net
#
# :::{solution-start} ex-4-1
# :class: dropdown
# :::
#
# The timestep enters every residual block (`linear_time`), so the first residual block is the
# first to change; the context enters only through cross-attention, so the first attention block.

# %%
from sdlab.config import SMALL
from sdlab.diffusion import get_time_embedding
from sdlab.exercises import check_first_differing_layers

torch.manual_seed(0)
small = Diffusion(SMALL.unet).eval()
blocks = [(n, m) for n, m in small.named_modules() if n.count(".") == 3 and n.startswith("unet.encoders")]


def block_outputs(context, t):
    outputs = {}
    hooks = [m.register_forward_hook(lambda m, i, o, n=n: outputs.__setitem__(n, o)) for n, m in blocks]
    with torch.no_grad():
        small(x, context, get_time_embedding(t, SMALL.unet.time_dim))
    for hook in hooks:
        hook.remove()
    return outputs


x, c1, c2 = torch.randn(1, 4, 16, 16), torch.randn(1, 77, 32), torch.randn(1, 77, 32)
base, other_t, other_c = block_outputs(c1, 10), block_outputs(c1, 900), block_outputs(c2, 10)
time_layer = next(n for n in base if not torch.equal(base[n], other_t[n]))
context_layer = next(n for n in base if not torch.equal(base[n], other_c[n]))
print(time_layer, context_layer)
check_first_differing_layers(time_layer, context_layer)

# %% [markdown]
# :::{solution-end}
# :::
#
# :::{solution-start} ex-4-2
# :class: dropdown
# :::
#
# The check prints the share that is left: attention (self- and cross-) holds the rest. Without it
# the network still denoises (its residual blocks know the timestep) but cannot see the prompt: an
# unconditional model of the training images, with no long-range interaction inside the picture
# beyond the convolutions' growing receptive field.

# %%
with torch.device("meta"):
    blind = Diffusion(UNetConfig(attention_levels=(False, False, False, False)))
check_unet_parameters(sum(p.numel() for p in blind.parameters()), attention_levels=(False, False, False, False))

# %% [markdown]
# :::{solution-end}
# :::
#
# :::{solution-start} ex-4-3
# :class: dropdown
# :::
#
# The decoder's input at the lowest level is $8\times$ smaller than the picture: whatever detail the
# down-sampling threw away can only come back through a skip connection, which carries the
# encoder's full-resolution features across. With zeros there, the layers above must invent the
# detail from the coarse features, and a denoiser must predict the noise *exactly*, pixel by
# pixel, so the loss at low noise levels (where only detail is left to predict) stays high.
#
# :::{solution-end}
# :::
#
# :::{solution-start} ex-4-4
# :class: dropdown
# :::
#
# The fastest sinusoid repeats every $2\pi$ steps, the slowest only after far more steps than there
# are (the check prints both): over $t = 0 \dots 999$ the slow ones rise monotonically, so no two
# timesteps get the same code and nearby timesteps get nearby codes. It is the transformer's
# position encoding, whose range was chosen for sequences of up to about $10^4$ positions.

# %%
from sdlab.exercises import check_time_frequencies

half = 320 // 2
omegas = 10000 ** (-torch.arange(half, dtype=torch.float64) / half)
check_time_frequencies(2 * math.pi / omegas.max(), 2 * math.pi / omegas.min())

# %% [markdown]
# :::{solution-end}
# :::
#
# ## 5. Samplers
#
# :::{solution-start} ex-5-1
# :class: dropdown
# :::
#
# The linear schedule ends at a much smaller $\bar\alpha_{999}$: its last timesteps are pure noise
# for the spiral's scale, so a few-step sampler spends its first steps where the model learned
# little. Retrain the toy model with `schedule = DDPMSampler(beta_schedule="linear",
# beta_start=1e-4, beta_end=0.02)` and compare the samples at $25$ steps.

# %%
from sdlab.exercises import check_alphas_cumprod

alphas_cumprod = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64), dim=0)
check_alphas_cumprod(alphas_cumprod)

# %% [markdown]
# :::{solution-end}
# :::
#
# :::{solution-start} ex-5-2
# :class: dropdown
# :::
#
# Inside the sampling loop, `x0_hat(x, eps, sampler.alphas_cumprod[t])` after each model call
# gives the prediction to plot: it looks like the spiral long before $x_t$ does.

# %%
from sdlab.exercises import check_predict_x0


def x0_hat(x_t, eps, alpha_bar):
    return (x_t - (1 - alpha_bar) ** 0.5 * eps) / alpha_bar**0.5


check_predict_x0(x0_hat)

# %% [markdown]
# :::{solution-end}
# :::
#
# :::{solution-start} ex-5-3
# :class: dropdown
# :::

# %%
from sdlab.exercises import check_ddim_sigma


def ddim_sigma(alpha_bar, alpha_bar_prev, eta):
    return eta * ((1 - alpha_bar_prev) / (1 - alpha_bar)) ** 0.5 * (1 - alpha_bar / alpha_bar_prev) ** 0.5


check_ddim_sigma(ddim_sigma)

# %% [markdown]
# :::{solution-end}
# :::
#
# ## 6. The pipeline
#
# :::{solution-start} ex-6-1
# :class: dropdown
# :::
#
# Without a colour the model draws this circle white for most seeds, so the negative prompt is a
# caption naming white: guidance pushes each step away from it.

# %%
from sdlab.exercises import check_negative_prompt

check_negative_prompt("a large circle in the center", "a large white circle in the center", "white")

# %% [markdown]
# :::{solution-end}
# :::
#
# :::{solution-start} ex-6-2
# :class: dropdown
# :::
#
# The check generates held-out prompts with the tiny model and reads them back with the analyzer:
# it accepts the steps below for both samplers. Try fewer, and it says how many prompts fall short.

# %%
from sdlab.exercises import check_enough_steps

check_enough_steps("euler_a", 15)
check_enough_steps("dpmpp_2m", 15)

# %% [markdown]
# :::{solution-end}
# :::
#
# :::{solution-start} ex-6-3
# :class: dropdown
# :::
#
# At step $i$ the rest of the latents are at noise level $t_i$; the clean latents of the known
# region are at level $0$. The U-Net sees a picture whose two parts have different noise and
# denoises both as if they were at $t_i$: it removes "noise" from the clean part (blurring it)
# and fits the repainted part to a neighbourhood that does not look like the one it will end up
# with. Noising the known region to the same level, as `keep_known_region` does, keeps the two
# statistically alike, so the boundary is denoised consistently.
#
# :::{solution-end}
# :::
#
# ## 7. Training
#
# :::{solution-start} ex-7-1
# :class: dropdown
# :::
#
# Classifier-free guidance needs the unconditional prediction $\epsilon(x_t, \varnothing)$. Without
# caption dropout the model never saw the empty prompt, so that prediction is an untrained
# extrapolation; guidance $\epsilon_\varnothing + s(\epsilon_c - \epsilon_\varnothing)$ then amplifies
# the difference between a meaningful and a meaningless prediction, and at scale $5$ the pictures
# lose their shapes and colours (over-saturated, noisy).
#
# :::{solution-end}
# :::
#
# :::{solution-start} ex-7-2
# :class: dropdown
# :::
#
# The loss of the ε-prediction is largest at the *small* timesteps: with little noise, the noise
# is hard to tell from the picture's own detail; at large $t$ the input is nearly all noise and
# predicting it is easy. Below, the tiny model's per-sample loss on the latents of the
# scale-factor exercise of chapter 3, printed: see whether it agrees.

# %%
from sdlab.exercises import check_loss_per_bucket


def bucket_means(timesteps, losses, n_buckets):
    index = timesteps * n_buckets // 1000  # bucket of each sample
    sums = torch.zeros(n_buckets).index_add_(0, index, losses)
    return sums / torch.bincount(index, minlength=n_buckets)


check_loss_per_bucket(bucket_means)

g = torch.Generator().manual_seed(0)
with torch.no_grad():
    from sdlab.samplers import make_sampler

    alphas_cumprod = make_sampler("ddpm").alphas_cumprod
    z0 = mu * encoder.config.scale_factor  # (256, 4, 8, 8)
    t = torch.randint(0, 1000, (256,), generator=g)
    eps = torch.randn(z0.shape, generator=g)
    ab = alphas_cumprod[t].view(-1, 1, 1, 1)
    context = models["clip"](torch.tensor(tokenizer([""] * 256, padding="max_length", max_length=77).input_ids))
    pred = models["diffusion"](ab.sqrt() * z0 + (1 - ab).sqrt() * eps, context, get_time_embedding(t, 64))
    per_sample = ((pred - eps) ** 2).flatten(1).mean(1)
print("mean loss per tenth of the timesteps:", [round(v, 3) for v in bucket_means(t, per_sample, 10).tolist()])

# %% [markdown]
# :::{solution-end}
# :::
#
# :::{solution-start} ex-7-3
# :class: dropdown
# :::
#
# Down-sampling $4\times$ instead of $8\times$ keeps $4\times$ as many latent pixels, so every
# convolution of the U-Net costs $4\times$ as much and its self-attention up to $16\times$ (the check
# prints the measured ratio): training and sampling get several times slower. In return the VAE
# compresses less, so it can keep finer edges: retrain it with the changed config and compare the
# reconstructions' PSNR.

# %%
from sdlab.config import TINY
from sdlab.encoder import VAE_Encoder
from sdlab.exercises import check_vae_downsampling
from torch.utils.flop_counter import FlopCounterMode

with torch.device("meta"):
    vae4 = VAE_Encoder(TINY.vae.__class__(**{**TINY.vae.__dict__, "channel_mult": (1, 2, 4)}))
    shape = tuple(vae4.moments(torch.empty(1, 3, 64, 64))[0].shape[1:])
    unet = Diffusion(TINY.unet)
    flops = {}
    for side in (8, shape[-1]):
        with FlopCounterMode(display=False) as counter:
            unet(torch.empty(1, 4, side, side), torch.empty(1, 77, 64), torch.empty(1, 64))
        flops[side] = counter.get_total_flops()
check_vae_downsampling(shape, flops[shape[-1]] / flops[8])

# %% [markdown]
# :::{solution-end}
# :::
#
# ## 8. Speed
#
# :::{solution-start} ex-8-1
# :class: dropdown
# :::
#
# Slicing does the same multiply-adds in pieces, so the time hardly changes (a little overhead per
# slice); only the scores of one slice are alive at a time, so the memory falls in proportion to $n$.

# %%
from sdlab.exercises import check_score_bytes

for n in (256, 1024, 4096):
    check_score_bytes(8 * n * 4096 * 4, queries=n)

# %% [markdown]
# :::{solution-end}
# :::
#
# :::{solution-start} ex-8-2
# :class: dropdown
# :::
#
# The decoder's last stages work at the full 512×512 with `SD15.vae.base_channels` or more
# channels, so a single decode costs more than a guided U-Net step, which works on 64×64 latents
# (the check prints both).

# %%
from sdlab.config import SD15
from sdlab.decoder import VAE_Decoder
from sdlab.exercises import check_decoder_flops

with torch.device("meta"):
    vae_decoder = VAE_Decoder(SD15.vae)
    with FlopCounterMode(display=False) as counter:
        vae_decoder(torch.empty(1, 4, 64, 64))
check_decoder_flops(counter.get_total_flops())

# %% [markdown]
# :::{solution-end}
# :::
#
# :::{solution-start} ex-8-3
# :class: dropdown
# :::
#
# Most CPUs have no float16 arithmetic units: PyTorch converts to float32 and back around the
# operations (or runs slow reference kernels), so float16 autocast is *slower* than float32 on a
# CPU, while bfloat16 has fast kernels where the CPU has AVX512-BF16 or AMX. On a GPU float16 is fast.
#
# :::{solution-end}
# :::
#
# :::{solution-start} ex-8-4
# :class: dropdown
# :::
#
# At 1024×1024 the highest level has $128^2 = 16{,}384$ pixels: the explicit formula's scores take
# what the second check prints for the heads of one picture, too much for most machines; the
# fused kernel never stores them.

# %%
from sdlab.exercises import check_costliest_level

with torch.device("meta"):
    sd_unet = Diffusion(SD15.unet)
    with FlopCounterMode(display=False, depth=3) as counter:
        sd_unet(torch.empty(1, 4, 64, 64), torch.empty(1, 77, 768), torch.empty(1, 320))
per_block = {name: sum(v.values()) for name, v in counter.get_flop_counts().items() if name.count(".") == 3}
print(sorted(per_block, key=per_block.get)[-3:])  # the three costliest blocks
check_costliest_level(64)
check_score_bytes(8 * 16384 * 16384 * 4, queries=16384, pixels=16384)

# %% [markdown]
# :::{solution-end}
# :::
#
# ## 9. Fine-tuning on your laptop
#
# :::{solution-start} ex-9-1
# :class: dropdown
# :::
#
# The **VAE decoder**. Every picture the model makes passes through it, and it was trained on six
# colours only: whatever latent the U-Net produces, the decoder maps its colour to the nearest one
# it knows (orange comes out yellow). Textual inversion can only change what the text encoder asks
# for and the LoRA only the U-Net's latents; neither reaches the decoder. Teaching a colour means
# training (or adapting) the decoder too, on pictures with that colour, and then the U-Net to make
# latents that decode to it.
#
# :::{solution-end}
# :::
#
# :::{solution-start} ex-9-2
# :class: dropdown
# :::
#
# Without prior pictures every training example is a diamond, so the low-rank change is free to
# move the U-Net towards diamonds for *every* prompt: the circle prompts lose circles (some come out
# as diamonds or squares) and colours drift. With prior preservation the same loss also asks the
# adapted U-Net to keep denoising the original pictures well, which pins the change to what the
# diamond prompts need. That is why DreamBooth adds its class-prior loss.
#
# :::{solution-end}
# :::
