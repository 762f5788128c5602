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
# # 2. The CLIP text encoder
#
# Stable Diffusion never reads your prompt as text. The text encoder of OpenAI's CLIP ViT-L/14
# turns it into **{glue:text}`n_token` vectors of {glue:text}`n_embd` numbers**, one per token
# position, and the U-Net attends to them (chapter 4). This chapter follows a real prompt through
# the two halves of that: the *tokenizer* (text → integers) and the *transformer* (integers →
# vectors).
#
# :::{admonition} This chapter
# **You will learn** what CLIP is and why Stable Diffusion keeps its text encoder frozen,
# byte-level BPE tokenization, and the text transformer, each checked against `transformers`.
#
# **You need** chapter 1 (attention, the causal mask).
#
# {chapter-time}
# :::
#
# **What CLIP is.** CLIP ([Radford et al. 2021](https://arxiv.org/abs/2103.00020)) is a pair of
# encoders, one for images and one for text, trained *contrastively* on image–caption pairs from
# the web: in a batch of pairs, each image's embedding must be most similar (by cosine) to its
# own caption's embedding and less similar to every other caption's, and vice versa. The text
# encoder learns to put into its vectors what is visible in a picture: objects, attributes,
# styles. Stable Diffusion uses only CLIP's text encoder, and keeps it **frozen**: its weights are
# OpenAI's, unchanged, and only the U-Net was trained (the VAE was trained before, separately).
# The frozen encoder brings what it learned from its own, much larger data set, and the U-Net
# learns to read its vectors. (Chapter 7's tiny model has no pretrained CLIP to borrow, so it
# trains its own small text encoder with the U-Net: that is the one place where the recipe differs.)

# %% tags=["hide-input"]
# book-setup: tools/setup_cell.py goes here when the notebook is built

# %% [markdown]
# ## From text to tokens: byte-level BPE
#
# The tokenizer normalises the text (NFC, one space, lower case), cuts it into words with a
# regular expression, writes each word as bytes and then applies **byte-pair encoding**: it glues
# neighbouring pieces together, always the pair that comes first in the list of {glue:text}`n_merges` *merges*
# OpenAI learned, until no known pair is left. Each final piece is one token of the {glue:text}`n_vocab`-entry
# vocabulary. This is the real vocabulary, shipped with `sdlab`:

# %% tags=["nbval-check-output"]
from sdlab.tokenizer import load_tokenizer

tokenizer = load_tokenizer()
prompt = "A watercolour painting of a capybara astronaut, 4k"
print(tokenizer)
print(f"{len(tokenizer.ranks):,} merges, ids {tokenizer.bos_token_id} = {tokenizer.bos_token}, {tokenizer.eos_token_id} = {tokenizer.eos_token}")
glue("n_merges", f"{len(tokenizer.ranks):,}")
glue("n_vocab", f"{len(tokenizer.vocab):,}")
glue("bos_id", tokenizer.bos_token_id)
glue("eos_id", tokenizer.eos_token_id)
glue("n_token", tokenizer.model_max_length)
print(tokenizer.tokenize(prompt))
print(tokenizer.encode(prompt))

# %% [markdown]
# Common words are one token (`painting</w>`; `</w>` marks the end of a word). Rarer ones are
# split into pieces, and every digit is a word of its own. Here is BPE at work on the rarest
# word of the prompt, one merge per line, with the merge's rank in the merges file:

# %% tags=["nbval-check-output"]
for step in tokenizer.bpe_steps("capybara"):
    merged = "start" if step.pair is None else f"{step.pair[0]!r} + {step.pair[1]!r}"
    rank = "" if step.rank is None else f"(rank {step.rank:,})"
    print(f"{merged:22s} {rank:14s} {' | '.join(step.pieces)}")

# %% [markdown]
# ```{listing} sdlab.tokenizer.CLIPTokenizer.bpe_steps
# ```
#
# Merges learned early (low rank) join frequent pairs like `o`+`n`; late merges build whole
# words. Finally the ids are *framed*: `<|startoftext|>` ({glue:text}`bos_id`) in front, `<|endoftext|>` ({glue:text}`eos_id`)
# after, and padding with `<|endoftext|>` up to the {glue:text}`n_token` positions of the encoder.
#
# ### Explore: BPE on a word
#
# Pick a word (with a running kernel, type any word) and watch the merges, one per row:

# %%
import ipywidgets as widgets
from sdlab.explorer import explorer

def bpe_frame(word):
    """The BPE segmentations of `word`, one row per merge, the merged pair on the left."""
    steps = tokenizer.bpe_steps(word.lower().strip() or "?")
    fig, ax = plt.subplots(figsize=(4.8, 0.3 * len(steps) + 0.3))
    fig.subplots_adjust(0, 0, 1, 1)
    for row, step in enumerate(steps):
        pair = "start" if step.pair is None else f"{step.pair[0]}+{step.pair[1]}".replace("</w>", "·")
        pieces = " | ".join(piece.replace("</w>", "·") for piece in step.pieces)
        ax.text(0.01, -row, f"{pair:>9s}  {pieces}", ha="left", va="center", fontsize=10, family="monospace")
    ax.set(xlim=(0, 1), ylim=(-len(steps) + 0.4, 0.6))
    ax.axis("off")
    ids = tokenizer.encode(word)
    return fig, f"{len(steps) - 1} merges → {len(ids)} token{'s' * (len(ids) != 1)}: {ids}"

explorer(bpe_frame, {"word": ["capybara", "tokenizer", "unbelievable", "astronaut", "diffusion", "sdlab"]},
         title="byte-pair encoding, merge by merge", width=480,
         live={"word": widgets.Text(value="capybara", description="word", continuous_update=False)})

# %% [markdown]
# `·` marks the end of the word (`</w>`).
#
# **Check against transformers.** `sdlab` writes the Hugging Face tokenizer files from the same
# merges, so `transformers.CLIPTokenizer` can be built without the Hub and compared:

# %% tags=["nbval-check-output"]
import tempfile
import warnings

from transformers import CLIPTokenizer
from sdlab.tokenizer import vocab_files

with tempfile.TemporaryDirectory() as folder, warnings.catch_warnings():
    warnings.simplefilter("ignore")
    vocab_files(folder, tokenizer)
    reference = CLIPTokenizer.from_pretrained(folder)
prompts = [prompt, "café, 2 cats & a dog!", "an astronaut riding a horse on Mars 🚀", ""]
ours = tokenizer(prompts, padding="max_length", max_length=77, truncation=True).input_ids
theirs = reference(prompts, padding="max_length", max_length=77, truncation=True).input_ids
print("same ids for all prompts:", ours == theirs, "| shape:", (len(ours), len(ours[0])))

# %%
ids = tokenizer([prompt], padding="max_length", max_length=77, return_tensors="pt").input_ids
fig, ax = plt.subplots(figsize=(11, 1.6))
ax.imshow(ids, aspect="auto", cmap="viridis")
n_real = len(tokenizer.encode(prompt)) + 2
for j in range(n_real + 1):
    ax.text(j, 0, tokenizer.id_to_token[ids[0, j]].replace("</w>", "").replace("<|startoftext|>", "SOT")
            .replace("<|endoftext|>", "EOT"), rotation=90, ha="center", va="center", fontsize=9, color="white")
ax.set(yticks=[], xlabel="position (0 … 76)", title="the 77 token ids of the prompt (colour = id)")
plt.show()

# %% [markdown]
# ## Token and position embeddings
#
# The encoder looks each id up in a table of {glue:text}`n_vocab` learned vectors and adds a learned vector
# for each of the {glue:text}`n_token` *positions* (attention alone does not know the order of its inputs):
#
# ```{listing} sdlab.clip.CLIPEmbedding
# ```
#
# ## The layer stack
#
# {glue:text}`n_layer` identical pre-norm transformer layers follow: causal self-attention (chapter 1), then
# an MLP with the QuickGELU activation $x \cdot \operatorname{sigmoid}(1.702\,x)$, each wrapped in a residual
# connection. A final layer norm gives the {glue:text}`n_token` × {glue:text}`n_embd` output that conditions the U-Net.
#
# ```{listing} sdlab.clip.CLIPLayer
# ```
#
# ```{listing} sdlab.clip.CLIP
# ```
#
# The causal mask means the vector at position $i$ depends on the tokens $0 \dots i$ only: the
# padding positions after the prompt *do* carry information about the whole prompt, which is why
# Stable Diffusion conditions on all {glue:text}`n_token` positions.

# %% tags=["nbval-check-output"]
from sdlab import SD15, CLIPConfig
from sdlab.clip import CLIP

with torch.device("meta"):
    full = CLIP(SD15.clip)
print(f"SD1.5 text encoder: {sum(p.numel() for p in full.parameters()):,} parameters")
glue("n_layer", SD15.clip.n_layer)
glue("n_embd", SD15.clip.n_embd)
glue("clip_millions", sum(p.numel() for p in full.parameters()) / 1e6)
for name, child in full.named_children():
    print(f"  {name:10s} {sum(p.numel() for p in child.parameters()):>12,d}")

# %% [markdown]
# ## Parity with transformers
#
# We build a *small* CLIP (two layers, width $64$, the real vocabulary and positions) in
# `transformers` with random weights, convert its weights with `sdlab.model_converter` (the same
# key-renaming rules that load the real checkpoint, including the fusion of the query, key and
# value projections) and compare the outputs. The full-size comparison is in the test suite.

# %% tags=["nbval-check-output"]
from transformers import CLIPTextConfig, CLIPTextModel
from sdlab import model_converter

config = CLIPTextConfig(vocab_size=49408, hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                        num_attention_heads=4, max_position_embeddings=77, hidden_act="quick_gelu")
torch.manual_seed(0)
reference_clip = CLIPTextModel(config).eval()
# the original checkpoint's key layout, then sdlab's renaming rules
original = {"cond_stage_model.transformer.text_model." + k: v for k, v in reference_clip.state_dict().items()}
converted, ignored, unknown = model_converter.convert(original)

clip = CLIP(CLIPConfig(n_embd=64, n_head=4, n_layer=2)).eval()
print(clip.load_state_dict(converted["clip"], strict=True))
with torch.no_grad():
    ours = clip(ids)
    theirs = reference_clip(input_ids=ids).last_hidden_state
print("output", tuple(ours.shape), "| max |difference| < 1e-5:", (ours - theirs).abs().max().item() < 1e-5)

# %% [markdown]
# ## Looking inside
#
# Left, the causal mask every layer applies; right, what the attention heads of the first layer
# do with it on our prompt (random weights: the structure is the mask's, the details are noise).
# With the trained model, heads specialise: some look at the previous token, many dump their
# attention on `<|startoftext|>`, a well-known "attention sink".

# %%
layer = clip.layers[0].attention
layer.store_attention = True
with torch.no_grad():
    clip(ids)
weights = layer.attention_weights[0, :, :n_real + 3, :n_real + 3]  # (heads, L, L), the first positions
layer.store_attention = False

fig, axes = plt.subplots(1, 5, figsize=(12, 2.8))
mask = torch.ones(n_real + 3, n_real + 3).tril()
axes[0].imshow(mask, cmap="Greys", vmin=0, vmax=1)
axes[0].set_title("causal mask (black = may attend)", fontsize=9)
for h, ax in enumerate(axes[1:]):
    ax.imshow(weights[h], cmap="viridis")
    ax.set_title(f"layer 0, head {h}", fontsize=9)
for ax in axes:
    ax.set(xticks=[], yticks=[], xlabel="key", ylabel="query")
plt.show()

# %%
with torch.no_grad():
    embedded = clip.embedding(ids)[0]
fig, axes = plt.subplots(1, 2, figsize=(11, 2.8))
axes[0].imshow(embedded.T, aspect="auto", cmap="RdBu_r")
axes[0].set(title="token + position embeddings (64 × 77)", xlabel="position", ylabel="channel")
axes[1].imshow(ours[0].T, aspect="auto", cmap="RdBu_r")
axes[1].set(title="encoder output (64 × 77)", xlabel="position", ylabel="channel")
plt.show()

def mean_cosine(vectors):  # (n, d): the mean cosine similarity of all distinct pairs
    unit = torch.nn.functional.normalize(vectors, dim=1)
    similarity = unit @ unit.T
    n = len(vectors)
    return ((similarity.sum() - n) / (n * (n - 1))).item()

padding = slice(n_real, None)  # the positions after the first <|endoftext|>
before, after = mean_cosine(embedded[padding]), mean_cosine(ours[0, padding])
print(f"padding positions, mean pairwise cosine: {before:.2f} before the layers, {after:.2f} after")
glue("pad_cosine_before", before)
glue("pad_cosine_after", after)
glue("pad_trend", "more alike" if after > before else "less alike")

# %% [markdown]
# The padding positions (after the first `<|endoftext|>`) all start from the *same* token embedding
# (only the position embedding differs): their mean pairwise cosine similarity is
# {glue:text}`pad_cosine_before:.2f` before the layers and {glue:text}`pad_cosine_after:.2f` after
# them: after the layers they are {glue:text}`pad_trend` than before. Each of them attends to the
# same prompt before it, so what they carry is mostly that shared summary of the prompt. (This is the small random CLIP of this chapter; the output is what conditions the U-Net.)
#
# ## Summary
#
# * The tokenizer: normalise → split into words → byte-level BPE with {glue:text}`n_merges` ranked merges →
#   `<|startoftext|>` … `<|endoftext|>`, padded to {glue:text}`n_token` ids.
# * The encoder: token + position embeddings, {glue:text}`n_layer` pre-norm layers of causal
#   self-attention and a QuickGELU MLP, a final layer norm: ids → vectors of width
#   {glue:text}`n_embd`, {glue:text}`clip_millions:.0f` M parameters; contrastively trained by
#   OpenAI and frozen in Stable Diffusion.
# * `sdlab`'s tokenizer gives the ids of `transformers.CLIPTokenizer`, and its encoder the outputs
#   of `transformers.CLIPTextModel` with the same weights.
#
# ## Exercises
#
# Each exercise names the check that grades it (`from sdlab.exercises import ...`); the worked
# solutions are on the [solutions](course/solutions.ipynb) page.
#
# :::{exercise}
# :label: ex-2-1
#
# Find a common English word that BPE splits into three or more tokens. How many tokens does
# your name take? An emoji? Check: `check_long_word(word)`.
# :::
#
# :::{exercise}
# :label: ex-2-2
#
# Write a prompt longer than {glue:text}`n_token` tokens. What does the tokenizer warn, and which words does
# Stable Diffusion never see? Check: `check_truncation(prompt, unseen_words)`.
# :::
#
# :::{exercise}
# :label: ex-2-3
#
# Replace the causal mask with no mask in `CLIPLayer` and check that the parity test fails.
# Which positions of one layer's output ($77$ tokens) still agree, and why?
# Check: `check_unmasked_agreement(positions)`.
# :::
#
# :::{exercise}
# :label: ex-2-4
#
# Show that the output at an early position does not change when you change a later word: encode
# two prompts that differ in one later word with the tiny model's CLIP and find the first position
# whose output differs. Check: `check_causal_prefix(prompt_a, prompt_b, first_changed)`.
# :::
#
# Test yourself with {ref}`this chapter's quiz <quiz-clip>`; the slides for teaching it are
# linked from the {doc}`Instructors page <course/instructors>`.
