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
# # 8. Fast and lean
#
# The chapters so far wrote every formula out, because that is how one learns it. This chapter
# asks what it costs. A 512×512 image is one U-Net evaluation per sampler step on a batch of two
# (classifier-free guidance), plus one VAE decode; each choice below changes that cost, and none of them may change
# the picture by more than the precision it trades. We measure each choice on **SD1.5-size layers**
# (random weights: the speed of a layer does not depend on its values), then on the **tiny model**,
# and end with whole 512×512 images against `diffusers` and OpenVINO from `python -m sdlab bench`.
#
# Timings are the best of a few runs on the machine that executed this notebook
# ({glue:text}`threads` threads for the rendered book); rerun the cells on yours.
#
# :::{admonition} This chapter
# **You will learn** where a U-Net step's arithmetic goes, what fused attention, bf16 autocast,
# memory layout and packed weights each save on a CPU, how few sampler steps are enough, and how
# sdlab compares with diffusers and OpenVINO on whole images.
#
# **You need** chapters 1, 4 and 5 (chapter 7's tiny model for the sampler sweep).
#
# {chapter-time}
# :::

# %% tags=["hide-input"]
# book-setup: tools/setup_cell.py goes here when the notebook is built

# %%
import os
import time

torch.set_num_threads(os.cpu_count())  # SD1.5-size layers: every core the machine has
print("threads:", torch.get_num_threads())
glue("threads", torch.get_num_threads())

def best_time(fn, repeat=3):
    fn()  # warm-up (first calls allocate and pick kernels)
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)

def max_diff(a, b):
    return (a.double() - b.double()).abs().max().item()


# %% [markdown]
# ## Where the time goes
#
# PyTorch can count the floating-point operations of a forward pass without running it: build
# the SD1.5 U-Net on the `meta` device (shapes only, no memory) and run it under a
# `FlopCounterMode`.

# %% tags=["nbval-check-output"]
from torch.utils.flop_counter import FlopCounterMode

from sdlab.config import SD15
from sdlab.diffusion import Diffusion

with torch.device("meta"):
    unet = Diffusion(SD15.unet)
    latents, context, t = torch.randn(2, 4, 64, 64), torch.randn(2, 77, 768), torch.randn(2, 320)
    with FlopCounterMode(display=False) as counter:
        unet(latents, context, t)
by_op = {str(op).split(".")[1]: flops for op, flops in counter.get_flop_counts()["Global"].items()}
kinds = {"convolutions": by_op.get("convolution", 0), "linear layers": by_op.get("addmm", 0) + by_op.get("mm", 0),
         "attention (QKᵀ and AV)": by_op.get("bmm", 0) + by_op.get("_scaled_dot_product_flash_attention", 0)}
total = counter.get_total_flops()
print(f"one U-Net step at 512x512 with CFG (batch 2): {total / 1e12:.2f} TFLOP")
for name, flops in kinds.items():
    print(f"  {name:24s} {flops / 1e12:.3f} TFLOP ({flops / total:.0%})")
    glue(f"flop_share_{name.split()[0]}", flops / total)
glue("unet_tflop", total / 1e12)
conv_weights = sum(m.weight.numel() * 4 for m in unet.modules() if isinstance(m, torch.nn.Conv2d))  # fp32 bytes
print(f"the U-Net's convolution weights: {conv_weights / 1e9:.2f} GB in float32")
glue("conv_weight_gb", conv_weights / 1e9)

# %% [markdown]
# Convolutions dominate, then the linear layers of the transformer blocks (projections and the
# GEGLU feed-forward); attention's own products are {glue:text}`flop_share_attention:.0%`. The
# benchmark at the end of this chapter measured a float32 step in {glue:text}`bench_unet_fp32:.2f` s
# on {glue:text}`bench_threads` CPU cores, sdlab's ({glue:text}`bench_unet_fp32_diffusers:.2f` s for
# diffusers): {glue:text}`bench_tflops:.2f` TFLOP/s. Whoever wrote the U-Net, the arithmetic is
# the same; the gains come from doing it with fewer memory round-trips, in a cheaper number format,
# or fewer times (fewer sampler steps).
#
# ## Attention: the explicit formula against the fused kernel
#
# ```{listing} sdlab.attention.scaled_dot_product
# ```
#
# At the U-Net's first level a latent image of 64×64 is a sequence of $64^2 = 4096$ pixels. The
# explicit formula materialises the scores $QK^\top$: $2 \times 8 \times 4096 \times 4096$ floats
# (batch, heads, queries, keys), **{glue:text}`scores_gib_math:.2f` GiB** per self-attention layer. The fused kernel (`scaled_dot_product_attention`) computes the same
# softmax in tiles that stay in cache (the online softmax of FlashAttention) and never stores the
# matrix. The sliced backend is the explicit formula over `slice_size=1024` queries at a time:
# {glue:text}`scores_gib_sliced:.2f` GiB, the same arithmetic.

# %%
from sdlab.attention import SelfAttention, attention_backend

attention = SelfAttention(8, 320, in_proj_bias=False).eval()
x = torch.randn(2, 4096, 320)
outputs, seconds = {}, {}
with torch.no_grad():
    for backend in ("math", "sliced", "sdpa"):
        with attention_backend(backend, slice_size=1024):
            outputs[backend] = attention(x)
            seconds[backend] = best_time(lambda: attention(x))
scores_gib = {"math": 2 * 8 * 4096 * 4096 * 4 / 2**30, "sliced": 2 * 8 * 1024 * 4096 * 4 / 2**30, "sdpa": 0.0}
for backend in seconds:
    glue(f"scores_gib_{backend}", scores_gib[backend])
    print(f"{backend:7s} {seconds[backend]:.3f} s   scores alive at once: {scores_gib[backend]:.2f} GiB   "
          f"max |diff| vs math: {max_diff(outputs[backend], outputs['math']):.1e}")

# %% [markdown]
# The fused kernel is what the default backend, `"auto"`, runs in float32
# (`attention_backend("sdpa")` forces it everywhere); the explicit formula stays one `with` away,
# and it is what `store_attention` uses to show the attention maps of chapter 1.
#
# ## bfloat16 autocast
#
# `bfloat16` keeps float32's exponent (eight bits) and drops sixteen bits of mantissa: no overflow,
# about three significant digits. CPUs with AVX512-BF16 or AMX multiply bf16 matrices faster than
# fp32 (the cell measures by how much). Under `torch.autocast("cpu", dtype=torch.bfloat16)` the convolutions and matrix
# products run in bf16 while normalisations and softmax stay in fp32; sdlab also keeps the U-Net's
# first and last convolutions in fp32 (`full_precision`), since the last one sets the precision of
# the noise prediction. One SD1.5 residual block and one transformer block at the 32×32 level (an
# 8×8 corner of it on a CPU without native bf16, where emulated bf16 is slow):

# %%
from sdlab.bench import bf16_supported
from sdlab.diffusion import UNET_AttentionBlock, UNET_ResidualBlock

torch.manual_seed(0)
res_block, attn_block = UNET_ResidualBlock(640, 640).eval(), UNET_AttentionBlock(8, 80).eval()
feature, emb, ctx = torch.randn(2, 640, 32, 32), torch.randn(2, 1280), torch.randn(2, 77, 768)
x = feature if bf16_supported() else feature[..., :8, :8].contiguous()  # (2, 640, 32, 32) or (2, 640, 8, 8)

def blocks():
    return attn_block(res_block(x, emb), ctx)

def blocks_bf16():
    with torch.autocast("cpu", dtype=torch.bfloat16):
        return blocks()

with torch.no_grad():
    fp32, bf16 = blocks(), blocks_bf16()
    t32, t16 = best_time(blocks), best_time(blocks_bf16)
print(f"{tuple(x.shape)}: fp32 {t32:.3f} s, bf16 autocast {t16:.3f} s ({t16 / t32:.2f}x); output std {fp32.std():.2f}, "
      f"max |diff| {max_diff(bf16, fp32):.3f}")
print("this CPU has native bf16 (AVX512-BF16 / AMX):", bf16_supported())

# %% [markdown]
# Autocast decides at every call: each time a convolution runs, its float32 weight is cast to
# bf16 again (and, for oneDNN, reordered again). `generate(..., dtype=torch.bfloat16)` on the CPU
# does not autocast: it casts every convolution and linear weight to bf16 **once** and packs it
# for oneDNN (`packed_weights(..., dtype=torch.bfloat16)`, next sections), and the activations
# then flow in bf16 from layer to layer; normalisations keep float32 weights, and the first and
# last convolutions stay float32. The same two blocks that way (on a CPU without bf16 in oneDNN
# nothing is packed in bf16 and the time is float32's):

# %%
from sdlab.packing import available, packed_weights

with torch.no_grad(), packed_weights(res_block, attn_block, dtype=torch.bfloat16):
    packed_bf16, t_packed = blocks().float(), best_time(blocks)
print(f"bf16 packed once {t_packed:.3f} s ({t_packed / t32:.2f}x fp32, {t_packed / t16:.2f}x autocast), "
      f"max |diff| {max_diff(packed_bf16, fp32):.3f}; oneDNN computes bf16 here: {available(torch.bfloat16)}")

# %% [markdown]
# On a CPU without native bf16 the products are emulated and autocast is *slower*, and bf16
# changes the picture slightly, so sdlab never switches it on by itself: pass
# `generate(..., dtype=torch.bfloat16)` (command line: `--dtype bfloat16`) where
# `bf16_supported()` is true.
#
# ## Attention in bf16: the blocked formula
#
# PyTorch's fused attention kernel takes bf16 inputs, but on a CPU without AMX it computes in
# float32 inside: in bf16 it is no faster than in float32, and at the 64×64 level attention is then
# the largest part of a bf16 step. `attention_backend("blocked")` is the explicit formula again, one
# head and one block of $n$ = `BLOCK_SCORES` / $L_k$ queries at a time ({glue:text}`block_queries`
# for $L_k = 4096$ keys): a block's scores, {glue:text}`block_mib:.0f` MiB in bf16, stay in the
# core's cache between $QK^\top$ and the product with $V$, and both products run on oneDNN's bf16
# matrix kernels. Scaling $Q$ by $1/\sqrt{d_k}$ instead of the scores is $L_k / d_k$ times less
# arithmetic. Two more steps leave the result as it was and save passes over the scores:
#
# * The softmax's division waits until after the product with $V$, and that product also gives the
#   denominators: with a column of ones beside $V$, $\exp(S)\,[V\;\mathbf 1]$ holds the numerators
#   and the row sums, and each query divides $d_k$ numbers instead of $L_k$. Zeros pad $[V\;\mathbf 1]$
#   to a multiple of $16$ columns ($48$ for $d_k = 40$), a width oneDNN's bf16 kernels handle better
#   (measured below).
# * A softmax subtracts each row's maximum so that $\exp$ cannot overflow. By Cauchy-Schwarz no
#   score $q_i \cdot k_j / \sqrt{d_k}$ exceeds $\max_i |q_i| \max_j |k_j| / \sqrt{d_k}$ in size
#   (with the keys centred); where that bound is below `EXP_BOUND`, the maximum's pass over the
#   scores is skipped.
#
# ```{listing} sdlab.attention.blocked_dot_product
# ```
#
# The default backend, `"auto"`, runs it where `blocked_is_faster`: bf16 on a CPU with native bf16
# products, over at least `BLOCKED_MIN_KEYS` keys (the U-Net's and the VAE's self-attention; the
# cross-attention over the prompt's tokens stays on the fused kernel). The U-Net's 64×64
# self-attention, both ways (a 32×32 one on a CPU without native bf16, where bf16 products are
# emulated):

# %%
from sdlab.attention import BLOCK_SCORES, BLOCKED_MIN_KEYS, blocked_is_faster, scaled_dot_product

pixels = 4096 if bf16_supported() else 1024
q, k, v = (torch.randn(2, 8, pixels, 40) for _ in range(3))  # (B, H, L, d_k): 8 heads of 40 channels
exact = torch.nn.functional.scaled_dot_product_attention(q, k, v)  # float32
q, k, v = q.bfloat16(), k.bfloat16(), v.bfloat16()
attention_seconds, attention_diffs = {}, {}
for backend in ("sdpa", "blocked"):
    with attention_backend(backend):
        out, _ = scaled_dot_product(q, k, v)
        attention_seconds[backend] = best_time(lambda: scaled_dot_product(q, k, v))
    attention_diffs[backend] = max_diff(out.float(), exact)
    print(f"bf16 {backend:8s} {attention_seconds[backend]:.3f} s   max |diff| vs float32 {attention_diffs[backend]:.4f}")
print(f"blocked is {attention_seconds['sdpa'] / attention_seconds['blocked']:.2f}x faster; "
      f"'auto' picks it here: {blocked_is_faster(q, k)} (bf16, CPU, {pixels} >= {BLOCKED_MIN_KEYS} keys)")
glue("blocked_speedup", attention_seconds["sdpa"] / attention_seconds["blocked"])
glue("block_queries", BLOCK_SCORES // 4096)
glue("block_mib", BLOCK_SCORES * 2 / 2**20)  # bf16: 2 bytes a score
glue("blocked_diff", attention_diffs["blocked"])
glue("fused_bf16_diff", attention_diffs["sdpa"])

# the product with V on one block of scores: d_k = 40 columns, or padded to 48 (V, ones, zeros)
scores = torch.randn(BLOCK_SCORES // pixels, pixels).bfloat16()  # (n, L_k)
values = {width: torch.randn(pixels, width).bfloat16() for width in (40, 48)}  # (L_k, width)
product_seconds = {width: best_time(lambda w=width: scores @ values[w]) for width in values}
print(f"exp(S) V on one block: 40 columns {1e3 * product_seconds[40]:.2f} ms, 48 columns "
      f"{1e3 * product_seconds[48]:.2f} ms")
glue("pad_speedup", product_seconds[40] / product_seconds[48])

# %% [markdown]
# Here the blocked formula was {glue:text}`blocked_speedup:.1f`× faster. Its result is a little
# further from float32 ({glue:text}`blocked_diff:.4f` against {glue:text}`fused_bf16_diff:.4f`): the
# scores are rounded to bf16 before the softmax, where the fused kernel keeps them in float32. On
# one block, the product with $48$ columns was {glue:text}`pad_speedup:.2f`× as fast as with $40$.
#
# ## Memory layout: channels_last
#
# A convolution kernel reads, for each output pixel, all input channels of a 3×3 window.
# PyTorch stores images as (B, C, H, W) ("contiguous"); oneDNN, the CPU convolution library, works
# internally in a channels-last or blocked layout and converts on the way in and out. Storing
# activations and weights as `channels_last` removes those conversions for the convolutions, but
# group norms and the transformer blocks (which reshape to a sequence of pixels) then pay their
# own conversions:

# %%
res_cl = UNET_ResidualBlock(640, 640).eval()
res_cl.load_state_dict(res_block.state_dict())
res_cl = res_cl.to(memory_format=torch.channels_last)
feature_cl = feature.to(memory_format=torch.channels_last)
with torch.no_grad():
    t_plain = best_time(lambda: res_block(feature, emb))
    t_cl = best_time(lambda: res_cl(feature_cl, emb))
    diff = max_diff(res_cl(feature_cl, emb), res_block(feature, emb))
print(f"residual block: contiguous {t_plain:.3f} s, channels_last {t_cl:.3f} s ({t_cl / t_plain:.2f}x), "
      f"max |diff| {diff:.1e}")

# %% [markdown]
# Layout conversions cost memory traffic, and so does one more thing the plain convolution does
# at every call: oneDNN computes with the *weights* in a blocked layout too, and a plain
# `nn.Conv2d` reorders its weight into it every time: the U-Net's convolution weights, copied at
# every step, are {glue:text}`conv_weight_gb:.2f` GB (counted with the FLOPs above).
#
# ## Packing the weights once
#
# `sdlab.packing.packed_weights` reorders each convolution and linear weight once, for as long as a
# `with` block runs. The convolutions then call oneDNN's inference kernel, which takes channels-last
# activations as they are: no weight reorder, no activation conversion, and the transformer blocks'
# reshape to a sequence of pixels becomes a free view. The linear layers call oneDNN's matrix
# product on their packed weight. The packed weight replaces the plain one (no second copy in
# memory) and is converted back, bit for bit, at the end of the block. `generate` does this on the
# CPU for every float32 model call outside autocast.
#
# ```{listing} sdlab.packing.packed_weights
# ```

# %%
# The U-Net's 16x16 level, where the weights are largest next to the activations. Inside the U-Net a
# packed layer receives channels-last activations from the packed layer before it, so this one does too.
deep_block = UNET_ResidualBlock(1280, 1280).eval()
deep_feature = torch.randn(2, 1280, 16, 16).contiguous(memory_format=torch.channels_last)
weights_before = deep_block.conv_feature.weight.clone()
with torch.no_grad():
    plain_out = deep_block(deep_feature, emb)
    t_plain = best_time(lambda: deep_block(deep_feature, emb), repeat=5)
    with packed_weights(deep_block):
        packed_out = deep_block(deep_feature, emb)
        t_packed = best_time(lambda: deep_block(deep_feature, emb), repeat=5)
print(f"residual block 1280 channels, 16x16: plain {t_plain:.3f} s, packed {t_packed:.3f} s "
      f"({t_packed / t_plain:.2f}x), max |diff| {max_diff(packed_out, plain_out):.1e} (output std {plain_out.std():.2f})")
print("weights given back bit for bit:", torch.equal(deep_block.conv_feature.weight, weights_before))

# %% [markdown]
# On the whole U-Net the gain is smaller than on this block (the 64×64 level's activations are
# large next to its weights, and a fifth of the time goes to the attention products, which have no
# weights to pack): see the benchmark below. Single-block timings on a shared machine vary from
# run to run; the benchmark alternates the two libraries to cancel that out.
#
# ## Fewer steps: samplers on the tiny model
#
# The cheapest U-Net call is the one not made. The tiny model from chapter 7 and its analyzer
# measure prompt following directly: the fraction of held-out prompts whose every attribute is
# right, for three samplers and `5`, `10` and `20` steps.

# %%
from sdlab import model_loader
from sdlab.tiny.analyzer import evaluate
from sdlab.tiny.data import heldout_prompts
from sdlab.tiny.evaluate import generate_batch

torch.set_num_threads(1)  # the tiny model: one thread is as fast
tiny = model_loader.preload_models_from_standard_weights()
prompts = heldout_prompts(32, seed=0)
seeds = list(range(1000, 1032))
sweep = {}
for sampler_name in ("ddim", "euler", "dpmpp_2m"):
    for steps in (5, 10, 20):
        start = time.perf_counter()
        images = generate_batch(tiny, prompts, seeds, sampler_name, steps, cfg_scale=5.0)
        sweep[sampler_name, steps] = (evaluate(prompts, images)["all"], time.perf_counter() - start)
fig, ax = plt.subplots(figsize=(6, 3))
for sampler_name in ("ddim", "euler", "dpmpp_2m"):
    steps = [s for (name, s) in sweep if name == sampler_name]
    ax.plot(steps, [sweep[sampler_name, s][0] for s in steps], "o-", label=sampler_name)
ax.set(xlabel="sampler steps", ylabel="held-out prompts fully right", title="tiny model, 32 held-out prompts, CFG 5")
ax.legend()
plt.show()
for (name, steps), (accuracy, seconds) in sweep.items():
    print(f"{name:9s} {steps:2d} steps: {accuracy:.0%} right, {seconds:.1f} s for 32 images")
    glue(f"sweep_{name}_{steps}", accuracy)
glue("sweep_prompts", len(prompts))

# %% [markdown]
# :::{admonition} The tiny model at guidance scale `5`, not SD1.5
# :class: note
# At `10` steps DDIM gets {glue:text}`sweep_ddim_10:.0%` of the {glue:text}`sweep_prompts` prompts
# fully right and Euler {glue:text}`sweep_euler_10:.0%`, but DPM++ 2M only
# {glue:text}`sweep_dpmpp_2m_10:.0%` ({glue:text}`sweep_dpmpp_2m_20:.0%` at `20`). Chapter 5 shows
# why: at few steps, DPM++ 2M's second-order correction overshoots under strong guidance, and a
# lower guidance scale or a first-order step removes the failure. On SD1.5, DPM++ 2M is the usual
# few-step choice at its usual guidance; measure the number of steps for your model and scale.
# The full evaluation of the tiny model is `sdlab/data/tiny_report.json`.
# :::
#
# ## Whole images against diffusers and OpenVINO
#
# `python -m sdlab bench --ckpt FILE --peers` loads the same SD1.5-layout file into sdlab, into
# transformers/diffusers and (converted from diffusers' U-Net) into OpenVINO, times each component
# alternately (the best of a few runs, with the spread: how much slower the slowest repeat was),
# then generates whole 512×512 images with DPM++ 2M in a fresh process per run so that each peak
# memory is its own. The figures below were recorded by that command on random weights in the real
# file's layout (the speed does not depend on the weights):

# %%
import textwrap

from sdlab.bench import find_row, format_table, stored_run

bench = stored_run()  # sdlab/data/bench_sd15_cpu.json, shipped with sdlab
print(f"torch {bench['torch']}, {bench['threads']} threads, native bf16: {bench['bf16']}")
print(textwrap.fill(bench["note"], 100), "\n")
print(format_table(bench["components"], ["component", "impl", "seconds", "spread_pct", "ratio", "max_diff"]), "\n")
print(format_table(bench["image"], ["impl", "seconds", "ratio", "images_per_min", "load_peak_rss_gb", "peak_rss_gb"]))

image = {row["impl"]: row for row in bench["image"]}
step = {impl: find_row(bench, impl, "U-Net")["seconds"] for impl in (
    "sdlab", "diffusers", "sdlab unpacked", "sdlab bf16", "sdlab bf16 fused attention", "sdlab bf16 autocast",
    "openvino", "openvino bf16")}
vae = {impl: find_row(bench, impl, "VAE")["seconds"] for impl in ("sdlab", "sdlab bf16")}
glue("bench_unet_fp32", step["sdlab"])
glue("bench_unet_fp32_diffusers", step["diffusers"])
glue("bench_unet_unpacked", step["sdlab unpacked"])
glue("bench_unet_ov", step["openvino"])
glue("bench_unet_bf16", step["sdlab bf16"])
glue("bench_unet_bf16_fused", step["sdlab bf16 fused attention"])
glue("bench_unet_autocast", step["sdlab bf16 autocast"])
glue("bench_unet_ov_bf16", step["openvino bf16"])
glue("bench_bf16_vs_ov", step["sdlab bf16"] / step["openvino bf16"])
glue("bench_threads", bench["threads"])
glue("bench_bf16_diff", find_row(bench, "sdlab bf16", "U-Net")["max_diff"])
glue("bench_bf16_fused_diff", find_row(bench, "sdlab bf16 fused attention", "U-Net")["max_diff"])
glue("bench_ov_bf16_diff", find_row(bench, "openvino bf16", "U-Net")["max_diff"])
glue("bench_vae_fp32", vae["sdlab"])
glue("bench_vae_bf16", vae["sdlab bf16"])
glue("bench_max_spread", max(row["spread_pct"] for row in bench["components"] if row["component"].startswith("U-Net")))
glue("bench_tflops", total / step["sdlab"] / 1e12)
glue("bench_image_fp32", image["sdlab"]["seconds"])
glue("bench_image_diffusers", image["diffusers"]["seconds"])
glue("bench_image_bf16", image["sdlab bf16"]["seconds"])
glue("bench_image_lean", image["sdlab lean"]["seconds"])
glue("bench_peak_fp32", image["sdlab"]["peak_rss_gb"])
glue("bench_peak_lean", image["sdlab lean"]["peak_rss_gb"])
glue("bench_image_lcm", image["sdlab lcm"]["seconds"])
glue("bench_lcm_per_min", max(row["images_per_min"] for row in bench["image"] if row["impl"].startswith("sdlab lcm")))
print(f"U-Net step: sdlab {step['sdlab']:.2f} s, diffusers {step['diffusers']:.2f} s: {total / step['sdlab'] / 1e12:.2f} TFLOP/s")

# %% [markdown]
# What makes the differences, in the run above:
#
# * **Weight reorders.** A packed float32 step took {glue:text}`bench_unet_fp32:.2f` s, the
#   same model unpacked {glue:text}`bench_unet_unpacked:.2f` s: oneDNN's blocked weight layout
#   made once, instead of reordering every weight at every call.
# * **bf16 casts.** Autocast recasts every float32 weight to bf16 at every call
#   ({glue:text}`bench_unet_autocast:.2f` s); cast once and packed in bf16, as
#   `generate(..., dtype=torch.bfloat16)` runs, the step took {glue:text}`bench_unet_bf16:.2f` s,
#   within {glue:text}`bench_bf16_diff:.3f` of float32. The VAE decoder packed in bf16 took
#   {glue:text}`bench_vae_bf16:.2f` s against {glue:text}`bench_vae_fp32:.2f` s in float32.
# * **Attention in bf16.** The same packed bf16 step on PyTorch's fused attention kernel took
#   {glue:text}`bench_unet_bf16_fused:.2f` s (within {glue:text}`bench_bf16_fused_diff:.3f` of
#   float32): the blocked formula of the bf16 section above is what brings it to
#   {glue:text}`bench_unet_bf16:.2f` s.
# * **Fusion.** OpenVINO compiles the whole graph (attention as one blocked kernel, normalisations
#   fused with their neighbours): {glue:text}`bench_unet_ov:.2f` s in float32 and
#   {glue:text}`bench_unet_ov_bf16:.2f` s in bf16, where sdlab's bf16 step is
#   {glue:text}`bench_bf16_vs_ov:.2f`× OpenVINO's (its bf16 result differs more from float32:
#   {glue:text}`bench_ov_bf16_diff:.3f`). PyTorch's eager kernels run one operation at a time.
# * The repeats spread by up to {glue:text}`bench_max_spread:.0f`% on this shared machine: a ratio
#   closer to one than that is a tie.
#
# A whole 512×512 image (DPM++ 2M with guidance, as `python -m sdlab bench` runs it) took {glue:text}`bench_image_fp32:.0f` s
# in float32 ({glue:text}`bench_image_diffusers:.0f` s with diffusers) and
# {glue:text}`bench_image_bf16:.0f` s in bf16. The lean mode (weights stored in bf16, one model
# resident at a time) took {glue:text}`bench_image_lean:.0f` s and peaked at
# {glue:text}`bench_peak_lean:.2f` GB against {glue:text}`bench_peak_fp32:.2f` GB. Four LCM steps
# without guidance (`sampler_name="lcm"`, for an LCM model or an LCM-LoRA fused into SD1.5 by
# `sdlab.lora`: no extra time per step), with the weights stored in bf16 (`--dtype bfloat16` on the
# command line), took {glue:text}`bench_image_lcm:.1f` s an image, {glue:text}`bench_lcm_per_min:.1f`
# images a minute at best in batches.

# %% [markdown]
# ## A tiny decoder
#
# With four steps the decode becomes a large share: in the run above the VAE decoder packed in bf16
# took {glue:text}`bench_vae_bf16:.2f` s, {glue:text}`lcm_vae_share:.0%` of the
# {glue:text}`bench_image_lcm:.1f` s of a four-step LCM image. Its arithmetic cannot be done much
# faster; what can change is the decoder. Ollin Boer Bohan's TAESD was trained to map the same
# latents to the same pixels with none of the VAE decoder's group norms or attention: 3×3
# convolutions of $64$ channels, ReLUs, and a soft clamp on the latents. `sdlab.taesd` builds it in
# the layer order of diffusers' `AutoencoderTiny` (equal to it in `tests/test_taesd.py`) and
# `load_taesd` reads the files in use:
#
# ```{listing} sdlab.taesd.TAESD_Decoder
# ```
#
# Counted as the U-Net was, and timed here on a 256×256 decode (random weights, packed):

# %%
from sdlab.decoder import VAE_Decoder
from sdlab.taesd import TAESD_Decoder

def decode_flops(make_decoder, side=64):  # one decode of side x side latents, on the meta device
    with torch.device("meta"):
        decoder = make_decoder()
        with FlopCounterMode(display=False) as counter:
            decoder(torch.randn(1, 4, side, side))
    return counter.get_total_flops()

vae_flops, taesd_flops = decode_flops(VAE_Decoder), decode_flops(TAESD_Decoder)
print(f"512x512 decode: VAE decoder {vae_flops / 2e9:,.0f} GMAC, TAESD {taesd_flops / 2e9:,.0f} GMAC "
      f"({vae_flops / taesd_flops:.1f}x less work)")
glue("taesd_flop_ratio", vae_flops / taesd_flops)
glue("lcm_vae_share", vae["sdlab bf16"] / image["sdlab lcm"]["seconds"])

small_latents = torch.randn(1, 4, 32, 32)
decoders = {"VAE decoder": VAE_Decoder().eval(), "TAESD": TAESD_Decoder().eval()}
decode_s = {}
with torch.no_grad(), packed_weights(*decoders.values(), batch=1):
    for name, decoder in decoders.items():
        decode_s[name] = best_time(lambda: decoder(small_latents), repeat=1)
        print(f"{name:11s} 256x256 decode: {decode_s[name]:.2f} s")
glue("taesd_speedup", decode_s["VAE decoder"] / decode_s["TAESD"])

# %% [markdown]
# TAESD does {glue:text}`taesd_flop_ratio:.1f`× less arithmetic and ran
# {glue:text}`taesd_speedup:.0f`× faster here. The price is detail: its pictures are a little softer
# than the VAE's, which is why it first became the live preview of other tools. For SD1.x take
# `taesd_decoder.safetensors` from the taesd repository (SDXL, SD3 and FLUX have their own; sdlab
# refuses one for $16$ latent channels by name) and pass
# `models={**models, "decoder": load_taesd(path)}` to `generate`, or `--taesd FILE` on the command
# line; `python -m sdlab bench` times the four-step image with it (its `sdlab taesd` row).

# %% [markdown]
# ## Low memory
#
# Three switches of `generate` bound the memory that grows with the image: `attention_slice_size`
# (explicit attention over that many queries at a time, for devices without a fused kernel),
# `vae_tile_size` (decode in overlapping latent tiles, blended linearly), and `idle_device` (keep
# the models that are not running, e.g. CLIP and the VAE during denoising, on the CPU).
# `low_memory=True` turns on what the device needs. On the tiny model sliced attention gives the
# same pixels. Tiled decoding does not: each tile's group norms and attention see only that tile,
# and a 64×64 picture cut into tiles of 4×4 latents is mostly seams. On a 512×512 image with the
# default tiles of 32×32 latents the difference is small (`tests/test_speed.py` bounds it).

# %%
from sdlab import pipeline

kwargs = dict(models=tiny, seed=3, height=64, width=64, sampler_name="dpmpp_2m", n_inference_steps=20,
              cfg_scale=5.0, progress=False)
prompt = "a large yellow triangle to the left of a small blue square"
plain = pipeline.generate(prompt, **kwargs)
sliced = pipeline.generate(prompt, attention_slice_size=16, **kwargs)
tiled = pipeline.generate(prompt, vae_tile_size=4, **kwargs)
fig, axes = plt.subplots(1, 3, figsize=(7, 2.6))
for ax, image, title in zip(axes, (plain, sliced, tiled), ("default", "sliced attention (16)", "tiled VAE (4x4 latents)")):
    ax.imshow(image)
    ax.set_title(title, fontsize=9)
    ax.axis("off")
plt.show()
print("sliced attention: max pixel difference", np.abs(sliced.astype(int) - plain).max())
print("tiled VAE decode: mean pixel difference", round(float(np.abs(tiled.astype(int) - plain).mean()), 2))

# %% [markdown]
# ## Summary
#
# * One SD1.5 U-Net step at 512×512 with CFG is {glue:text}`unet_tflop:.2f` TFLOP:
#   {glue:text}`flop_share_convolutions:.0%` convolutions, {glue:text}`flop_share_linear:.0%` linear
#   layers, {glue:text}`flop_share_attention:.0%` attention products. On a CPU, speed comes from
#   doing that arithmetic with fewer memory round-trips (fused attention), in a cheaper format
#   (bf16 where the CPU has it), or fewer times (as few sampler steps as the model and the
#   guidance scale allow: measure it).
# * Fused attention computes the explicit formula's result without the
#   {glue:text}`scores_gib_math:.2f` GiB score matrix.
# * Packing the weights once for oneDNN removes the copying of {glue:text}`conv_weight_gb:.2f` GB
#   of convolution weights per U-Net step; it is the one CPU choice that makes sdlab's float32
#   step faster than diffusers'.
# * bf16 changes the noise prediction (of unit scale) by up to {glue:text}`bench_bf16_diff:.3f` in
#   the benchmark; cast the weights once rather than autocasting at every call, keep the first and
#   last convolutions in fp32, and use it only on CPUs with native bf16. Stored in bf16
#   (`preload_models_from_standard_weights(..., dtype=torch.bfloat16)`), the weights take half the memory.
# * `python -m sdlab bench --peers` puts every number here next to `diffusers` and OpenVINO on the
#   same weights, each with its spread over the repeats.
#
# ## Exercises
#
# Each exercise with a check names it (`from sdlab.exercises import ...`); the worked solutions
# are on the [solutions](course/solutions.ipynb) page.
#
# :::{exercise}
# :label: ex-8-1
#
# Time `attention_backend("sliced", n)` for $n = 256, 1024, 4096$ on the $4096$-pixel attention.
# Why does the time hardly change while the memory falls with $n$? How many bytes do the scores of
# one slice take ($8$ heads, float32)? Check: `check_score_bytes(n_bytes, queries=n)`.
# :::
#
# :::{exercise}
# :label: ex-8-2
#
# Count the FLOPs of the VAE decoder at 512×512 with `FlopCounterMode`. Why does a single
# decode take longer than a U-Net step although it is called once?
# Check: `check_decoder_flops(flops)`.
# :::
#
# :::{exercise}
# :label: ex-8-3
#
# Run the bf16 cell with `torch.float16` instead. What happens to the time on a CPU, and why?
# (A question to answer in words.)
# :::
#
# :::{exercise}
# :label: ex-8-4
#
# With `FlopCounterMode(depth=3)`, find the U-Net level (the side of its latents) that costs most.
# Would attention at the 64×64 level be affordable without the fused kernel at 1024×1024?
# Check: `check_costliest_level(side)`, and `check_score_bytes(n_bytes, queries=16384, pixels=16384)`.
# :::
#
# Test yourself with {ref}`this chapter's quiz <quiz-speed>`; the slides for teaching it are
# linked from the {doc}`Instructors page <course/instructors>`.
