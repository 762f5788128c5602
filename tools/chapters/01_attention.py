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
# # 1. Attention
#
# All three networks of Stable Diffusion use the same mechanism to let positions exchange
# information: CLIP's tokens attend to earlier tokens, the VAE's pixels attend to each other at
# its lowest resolution, and the U-Net's latent pixels attend to each other *and* to the prompt.
# This chapter builds attention from its formula, checks it against PyTorch, and looks at it.
#
# :::{admonition} This chapter
# **You will learn** scaled dot-product attention, the causal mask, multi-head attention and
# cross-attention, each checked against PyTorch's own.
#
# **You need** matrix products, softmax, and the notation of chapter 0.
#
# {chapter-time}
# :::
#
# $$\operatorname{Attention}(Q, K, V) = \operatorname{softmax}\!\left(\frac{Q K^\top}{\sqrt{d_k}}\right) V$$
#
# Each of the $L_q$ queries (rows of $Q$) is compared with each of the $L_k$ keys by a dot
# product; the softmax of each row turns the scores into weights that sum to one; the output is
# the weighted average of the values.

# %% tags=["hide-input"]
# book-setup: tools/setup_cell.py goes here when the notebook is built

# %% [markdown]
# ## Scaled dot-product attention from scratch
#
# Four lines of tensor code. The division by $\sqrt{d_k}$ keeps the scores of random vectors at a
# standard deviation of about $1$ whatever the width, so the softmax does not saturate.

# %% tags=["nbval-check-output"]
import math
import torch.nn.functional as F

def attention(q, k, v, causal=False):
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])  # (..., Lq, Lk)
    if causal:  # token i may only look at tokens j <= i
        scores = scores.masked_fill(torch.ones_like(scores, dtype=torch.bool).triu(1), float("-inf"))
    weights = scores.softmax(dim=-1)
    return weights @ v, weights

q, k, v = torch.randn(3, 1, 6, 16).unbind(0)  # batch 1, 6 positions, d_k = 16
out, weights = attention(q, k, v)
print("output", tuple(out.shape), " weights", tuple(weights.shape))
print("rows of the weights sum to 1:", torch.allclose(weights.sum(-1), torch.ones(1, 6)))

# %% [markdown]
# **Check against PyTorch.** `torch.nn.functional.scaled_dot_product_attention` computes the same
# thing with a fused kernel, without ever storing the $L_q \times L_k$ matrix. Both must agree to
# float32 round-off, with and without the causal mask:

# %% tags=["nbval-check-output"]
for causal in (False, True):
    mine, _ = attention(q, k, v, causal=causal)
    torch_out = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    print(f"causal={causal!s:5}  max |difference| < 1e-6: {(mine - torch_out).abs().max().item() < 1e-6}")

# %% [markdown]
# ## What the weights look like
#
# To see attention do something, give it a job: six tokens whose keys are one-hot "names", and
# queries that each look for one of them. Each row of the heatmap is one query's distribution
# over the keys. Scaling the scores up (a *temperature* below $1$) sharpens it; with the causal mask
# the upper triangle is forbidden and every row re-normalises over what is left.

# %%
keys = torch.eye(6, 16)[None]               # token j's key: the j-th unit vector
wanted = torch.tensor([2, 0, 4, 1, 5, 3])   # query i looks for token wanted[i]
queries = 3.0 * torch.eye(6, 16)[wanted][None]
values = torch.randn(1, 6, 16)

panels = [("sharp queries", attention(4 * queries, keys, values)[1]),
          ("softer queries (×1)", attention(queries, keys, values)[1]),
          ("with the causal mask", attention(4 * queries, keys, values, causal=True)[1])]
fig, axes = plt.subplots(1, 3, figsize=(10, 3.4))
for ax, (title, w) in zip(axes, panels):
    im = ax.imshow(w[0], cmap="viridis", vmin=0, vmax=1)
    ax.set(title=title, xlabel="key position j", ylabel="query position i", xticks=range(6), yticks=range(6))
fig.colorbar(im, ax=axes, shrink=0.8, label="weight")
plt.show()

# %% [markdown]
# The first panel finds exactly the wanted token in each row. In the third, the first query can
# only see the first token, so it puts all its weight there even though it wanted another: the
# causal mask is what lets CLIP read a prompt left to right.
#
# ## sdlab's version
#
# `sdlab.attention.scaled_dot_product` is the function above, with two additions: it uses
# PyTorch's fused kernel unless the attention weights are wanted (for the pictures in this book;
# in bf16 on the CPU it uses a blocked form of the formula instead, chapter 8), and its softmax
# computes in float32 even when the model runs in float16 or bf16.
#
# ```{listing} sdlab.attention.scaled_dot_product
# ```

# %% tags=["nbval-check-output"]
from sdlab.attention import CrossAttention, SelfAttention, attention_backend, scaled_dot_product

qh, kh, vh = torch.randn(3, 2, 4, 10, 8).unbind(0)  # (B, H, L, d_k)
ref, _ = attention(qh, kh, vh, causal=True)
fused, _ = scaled_dot_product(qh, kh, vh, causal=True)
with attention_backend("math"):
    explicit, w = scaled_dot_product(qh, kh, vh, causal=True, return_weights=True)
print("fused == from scratch:", torch.allclose(fused, ref, atol=1e-6))
print("math  == from scratch:", torch.allclose(explicit, ref, atol=1e-6), " weights", tuple(w.shape))

# %% [markdown]
# ## Multiple heads
#
# One attention computes one weighted average per query: one "question" per position. *Multi-head*
# attention projects the width $d$ into $h$ heads of $d_k = d/h$ channels, attends in each
# independently, concatenates the results and mixes them with an output projection $W^O$:
#
# $$\operatorname{MultiHead}(X) = \operatorname{Concat}(\text{head}_1, \dots, \text{head}_h)\, W^O,
# \qquad \text{head}_i = \operatorname{Attention}(X W_i^Q, X W_i^K, X W_i^V).$$
#
# The cost is the same as one head of width $d$: the split is only a reshape,
# (B, L, d) → (B, h, L, d/h). `sdlab` keeps the three projections $W^Q, W^K, W^V$ as one linear
# layer `in_proj` of width $3d$ and computes them in one matrix product. The checkpoints store them
# separately (CLIP's `q_proj`, `k_proj`, `v_proj`; the VAE's `q`, `k`, `v`), and
# `sdlab/model_converter.py` concatenates the three when it loads a file. The bundled tiny
# checkpoint, in the original file's layout, shows it:

# %%
from safetensors import safe_open
from sdlab import model_loader

with safe_open(model_loader.DEFAULT_CHECKPOINT, "pt") as checkpoint:
    layer = "cond_stage_model.transformer.text_model.encoder.layers.0.self_attn."
    stored = sorted(key.removeprefix(layer) for key in checkpoint.keys() if key.startswith(layer) and key.endswith("weight"))
print("the file's first CLIP attention layer:", stored)
print("sdlab's, after loading: in_proj.weight", tuple(model_loader.preload_models_from_standard_weights()["clip"]
                                                     .layers[0].attention.in_proj.weight.shape))

# %% [markdown]
#
# ```{listing} sdlab.attention._MultiHead
# ```
#
# ```{listing} sdlab.attention.SelfAttention
# ```
#
# **Check against PyTorch.** `torch.nn.MultiheadAttention` uses the very same fused layout
# (`in_proj_weight` of shape $(3d, d)$), so we can copy the weights across and compare:

# %% tags=["nbval-check-output"]
d, heads, L = 64, 8, 12
mine = SelfAttention(heads, d).eval()
reference = torch.nn.MultiheadAttention(d, heads, batch_first=True).eval()
with torch.no_grad():
    reference.in_proj_weight.copy_(mine.in_proj.weight)
    reference.in_proj_bias.copy_(mine.in_proj.bias)
    reference.out_proj.weight.copy_(mine.out_proj.weight)
    reference.out_proj.bias.copy_(mine.out_proj.bias)

x = torch.randn(2, L, d)
causal = torch.ones(L, L, dtype=torch.bool).triu(1)  # True = not allowed
with torch.no_grad():
    for name, ours, theirs in [
        ("no mask", mine(x), reference(x, x, x, need_weights=False)[0]),
        ("causal", mine(x, causal_mask=True), reference(x, x, x, attn_mask=causal, need_weights=False)[0]),
    ]:
        print(f"{name:8s} output {tuple(ours.shape)}  max |difference| < 1e-5: {(ours - theirs).abs().max().item() < 1e-5}")
print(f"parameters: {sum(p.numel() for p in mine.parameters()):,} (= 4 d² + 4 d = {4 * d * d + 4 * d:,})")

# %% [markdown]
# With `store_attention = True` a module keeps the weights of its last call (this switches it to
# the explicit formula). Here are the {glue:text}`heads` heads of a random causal self-attention
# layer. With PyTorch's initialisation the scores are small, so every head is close to a uniform
# average over the tokens it may see: two heads' weights differ by {glue:text}`head_spread:.3f` on
# average, a weight differs from the uniform one by {glue:text}`head_from_uniform:.3f`, next to an
# average weight of {glue:text}`head_mean_weight:.3f`. The heads look alike; it is training that
# gives each head its own pattern (chapter 6 looks at trained ones). All of them respect the mask.

# %%
mine.store_attention = True
with torch.no_grad():
    mine(x[:1], causal_mask=True)
maps = mine.attention_weights[0]  # (heads, L, L)
mine.store_attention = False
fig, axes = plt.subplots(1, heads, figsize=(12, 1.9))
for h, ax in enumerate(axes):
    ax.imshow(maps[h], cmap="viridis", vmin=0, vmax=1)
    ax.set_title(f"head {h}", fontsize=9)
    ax.axis("off")
plt.show()
print("weights", tuple(mine.attention_weights.shape), "| above the diagonal:", maps.triu(1).abs().max().item())
allowed = torch.ones(L, L, dtype=torch.bool).tril()  # the weights the mask leaves
uniform = allowed / torch.arange(1, L + 1)[:, None]  # each row: 1 / (tokens it may see)
pairs = [(a, b) for a in range(heads) for b in range(a + 1, heads)]
spread = torch.stack([(maps[a] - maps[b]).abs()[allowed].mean() for a, b in pairs]).mean()
from_uniform, mean_weight = (maps - uniform).abs()[:, allowed].mean(), uniform[allowed].mean()
print(f"mean difference between two heads: {spread:.3f}; from uniform: {from_uniform:.3f}; mean weight {mean_weight:.3f}")
glue("heads", heads)
glue("head_spread", spread)
glue("head_from_uniform", from_uniform)
glue("head_mean_weight", mean_weight)

# %% [markdown]
# ## Cross-attention
#
# In the U-Net the queries come from the image and the keys and values from the text: each latent
# pixel asks "which words are about me?" and receives a mix of their embeddings. The two
# sequences can have different lengths ($64^2 = 4096$ pixels at 64×64, $77$ tokens) and widths
# (from $320$ to $1280$ channels for the pixels, $768$ for CLIP: `sdlab.config.SD15`), so there
# are three separate projections:
#
# ```{listing} sdlab.attention.CrossAttention
# ```

# %% tags=["nbval-check-output"]
cross = CrossAttention(n_heads=4, d_embed=32, d_cross=48).eval()
pixels = torch.randn(1, 8 * 8, 32)   # an 8x8 latent image, 32 channels
tokens = torch.randn(1, 5, 48)       # 5 text tokens, 48 channels
cross.store_attention = True
with torch.no_grad():
    out = cross(pixels, tokens)
print("pixels", tuple(pixels.shape), "+ tokens", tuple(tokens.shape), "->", tuple(out.shape))
print("weights (B, heads, pixels, tokens):", tuple(cross.attention_weights.shape))

# %% [markdown]
# The output has one row per *pixel*, like the input: cross-attention writes text information into
# the image without changing its shape. Averaged over the heads, every pixel's weights over the
# tokens form a map; shown as images, these are the per-token attention maps that chapter 6
# uses to see where each word of a prompt lands in the picture.

# %%
maps = cross.attention_weights[0].mean(0).T.reshape(5, 8, 8)  # (tokens, 8, 8)
fig, axes = plt.subplots(1, 5, figsize=(10, 2.3))
for j, ax in enumerate(axes):
    ax.imshow(maps[j], cmap="magma", vmin=0, vmax=maps.max())
    ax.set_title(f"token {j}", fontsize=9)
    ax.axis("off")
fig.suptitle("cross-attention weight of each pixel, per token (random weights)", fontsize=10)
plt.show()

# %% [markdown]
# ## Summary
#
# * Attention is a soft lookup: $\operatorname{softmax}(QK^\top / \sqrt{d_k})\,V$, a weighted
#   average of values, weights from query-key similarity.
# * The causal mask ($-\infty$ above the diagonal) makes token $i$ see only tokens $\le i$.
# * Multi-head attention splits the width into $h$ independent heads at no extra cost;
#   `SelfAttention` matches `torch.nn.MultiheadAttention` weight for weight.
# * Cross-attention takes queries from one sequence (pixels) and keys/values from another (text).
# * `sdlab` uses PyTorch's fused kernel by default (bf16 on the CPU: the blocked formula) and the
#   explicit formula when the weights are wanted (`store_attention`, `attention_backend("math")`).
#
# ## Exercises
#
# Each exercise names the check that grades it (`from sdlab.exercises import ...`); the worked
# solutions are on the [solutions](course/solutions.ipynb) page.
#
# :::{exercise}
# :label: ex-1-1
#
# Remove the $1/\sqrt{d_k}$ factor: write `entropy(q, k)`, the mean entropy (in nats) of the rows of
# $\operatorname{softmax}(QK^\top)$, and plot it for random inputs as $d_k$ grows from $8$ to $512$.
# What happens, and why does it hurt training? Check: `check_unscaled_entropy(entropy)`.
# :::
#
# :::{exercise}
# :label: ex-1-2
#
# Show that attention without a mask is *permutation-equivariant*: permuting the input
# positions permutes the output the same way. Write `equivariance_error(attend, x, perm)`, the largest
# difference between `attend(x[:, perm])` and `attend(x)[:, perm]`. Where does CLIP get its sense of
# order from? Check: `check_equivariance_error(equivariance_error)`.
# :::
#
# :::{exercise}
# :label: ex-1-3
#
# Count the multiply-adds of self-attention over the $4096$ latent pixels of a 512×512 image at
# width $320$: those of the four projections, and those of $QK^\top$ and $AV$. Which term
# dominates, and what does the fused kernel save?
# Check: `check_attention_macs(projections, scores_and_values)`.
# :::
#
# :::{exercise}
# :label: ex-1-4
#
# Implement a padding mask, `masked_attention(q, k, v, padding)` with `padding` (B, L_k) True for the
# keys that no query may attend to, and compare it with `scaled_dot_product_attention(..., attn_mask=...)`.
# Check: `check_padding_mask(masked_attention)`.
# :::
#
# Test yourself with {ref}`this chapter's quiz <quiz-attention>`; the slides for teaching it are
# linked from the {doc}`Instructors page <course/instructors>`.
