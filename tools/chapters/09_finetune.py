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
# # 9. Fine-tuning on your laptop
#
# A finished model draws what its training pictures showed. What people want next is *their*
# thing: a face, a product, a style. This chapter teaches the tiny model of chapter 7 a shape that
# no training picture showed and no caption named, a **diamond** (a square standing on a corner),
# from {glue:text}`n_images` rendered pictures, in the two ways SD1.5 users customise their
# models, both of which leave the model's own weights alone:
#
# * **textual inversion** learns *one new word*, a single row of the text encoder's embedding table;
# * **LoRA** learns a *low-rank change* of the U-Net's attention layers, kept in a small file.
#
# Both run here live on a CPU, for a few steps. The full runs — their losses, their files and what
# the analyzer reads in their pictures — come from `python -m sdlab finetune`, whose files ship with
# sdlab. The chapter ends with what DreamBooth does differently and with loading SD1.5 LoRA files.
#
# :::{admonition} This chapter
# **You will learn** what textual inversion and LoRA train and why so few numbers suffice, how to
# measure that a fine-tuned model learned the concept and kept the rest, how DreamBooth differs,
# and how the LoRA files people share are laid out and loaded.
#
# **You need** chapters 2, 4 and 7.
#
# {chapter-time}
# :::

# %% tags=["hide-input"]
# book-setup: tools/setup_cell.py goes here when the notebook is built

# %%
import dataclasses
import json
import textwrap

from safetensors.torch import load_file

from sdlab import lora, model_loader
from sdlab.diffusion import get_time_embedding
from sdlab.tiny import analyzer, finetune
from sdlab.tiny import data as shapes
from sdlab.tokenizer import load_tokenizer

torch.set_num_threads(1)  # the tiny model: one thread is faster and steadier than two
DATA = model_loader.DEFAULT_CHECKPOINT.parent
report = json.loads((DATA / "finetune_report.json").read_text())
TI, LORA = finetune.InversionSettings(), finetune.LoraSettings()
glue("n_images", TI.n_images)
glue("eval_cfg", finetune.EVAL_CFG_SCALE)


def show(images, titles, columns=4, size=2.6, title=None):
    rows = -(-len(images) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(size * columns, (size + 0.9) * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, image, text in zip(axes.flat, images, titles):
        ax.imshow(image)
        ax.set_title("\n".join(textwrap.wrap(text, 24)), fontsize=8)
    if title:
        fig.suptitle(title, fontsize=9)
    plt.tight_layout()
    plt.show()


# %% [markdown]
# ## The concept, and what the model does with its name
#
# The training pictures are drawn by `shapes.render`, as in chapter 7, with the new shape. Each is
# captioned twice: with the full caption and with a paraphrase (`shapes.caption_variants`), so that
# the short prompts a reader types work too. Every picture of this chapter is generated at guidance
# {glue:text}`eval_cfg` (`finetune.EVAL_CFG_SCALE`), above the tiny model's default: a concept learned
# from a few pictures is a weak pull on the U-Net, and guidance is what amplifies it.

# %%
scenes = shapes.concept_scenes(TI.n_images, TI.seed, shape=TI.shape, size=TI.size)
captions = [texts[1] for texts in shapes.caption_variants(scenes[:8], 2, TI.seed)]
show([shapes.render(scene) for scene in scenes[:8]], [finetune.say(text, {TI.shape: TI.token}) for text in captions],
     title=f"{TI.n_images} pictures like these, said with the new word {TI.token}")

# %% [markdown]
# The word "diamond" itself is a token CLIP's vocabulary has, but no training caption used it, so
# the tiny text encoder's row for it is still its random initialisation. Asked for a diamond, the
# model draws whatever that row happens to point at:

# %%
models = model_loader.preload_models_from_standard_weights()
tokenizer = load_tokenizer()
PROMPTS = ["a red diamond", "a large blue diamond in the top left", "a yellow diamond on the right",
           "a big white diamond in the middle"]
SEEDS = [11, 12, 13, 14]
with torch.no_grad():
    before = finetune.generate(models, tokenizer, PROMPTS, SEEDS)
show(before, [f"{p}\n{analyzer.verdict(p, image)}" for p, image in zip(PROMPTS, before)],
     title="before fine-tuning: the plain word")
plain = report["textual_inversion"]["plain_word_without_token"]
glue("plain_shape", f"{plain['shape']:.0%}")
print(f"the full run's evaluation: 'diamond' in template prompts is drawn as a diamond in {plain['shape']:.0%}")

# %% [markdown]
# In the full run's evaluation the plain word gives a diamond in {glue:text}`plain_shape` of the
# pictures: the model has no diamond to give.
#
# ## Textual inversion: one new word
#
# Textual inversion (Gal et al. 2022) adds a token, here `<diamond>`, to the tokenizer and one row
# $v$ to the embedding table, and trains only that row with the model's own loss on the concept's
# pictures, everything else frozen:
#
# $$v^* = \arg\min_v \; \mathbb E_{z_0, \varepsilon, t} \big\lVert \varepsilon - \varepsilon_\theta\big(\sqrt{\bar\alpha_t}\, z_0
#   + \sqrt{1-\bar\alpha_t}\,\varepsilon,\; t,\; c_\theta(y; v)\big) \big\rVert^2 .$$
#
# The row starts from an existing word's ({glue:text}`init_word`). The text encoder sees the row
# through a small trick: only the rows a batch uses are gathered into a table, with $v$ among them,
# and the encoder runs on that table by `torch.func.functional_call`, so the gradient reaches $v$
# alone and the module's own table is never written:
#
# ```{listing} sdlab.tiny.finetune._with_row
# ```
#
# A short run, live ({glue:text}`live_ti_steps` steps; the full run takes {glue:text}`full_ti_steps`):

# %%
LIVE_TI = dataclasses.replace(TI, steps=80, batch=8)
glue("init_word", TI.init_word)
glue("live_ti_steps", LIVE_TI.steps)
glue("full_ti_steps", TI.steps)
live = finetune.train_inversion(models, LIVE_TI, log=print)
full = report["textual_inversion"]
fig, axes = plt.subplots(1, 2, figsize=(10, 3))
axes[0].plot(np.convolve(live["losses"], np.ones(10) / 10, mode="valid"))
axes[0].set(title=f"live: {LIVE_TI.steps} steps (running mean of 10)", xlabel="step", ylabel="loss")
axes[1].plot(np.linspace(0, TI.steps, len(full["loss_curve"])), full["loss_curve"], marker="o")
axes[1].set(title=f"full run: {TI.steps} steps (window means)", xlabel="step")
plt.tight_layout()
plt.show()
print(f"{LIVE_TI.steps} live steps in {live['seconds']:.1f} s; the full run: {full['seconds']:.0f} s on "
      f"{report['threads']} threads, fixed-draw loss {full['loss_fixed_draws_before']:.4f} -> "
      f"{full['loss_fixed_draws_after']:.4f}")
glue("ti_seconds", f"{full['seconds']:.0f}")
glue("ti_numbers", int(live["vector"].numel()))

# %% [markdown]
# The whole result is {glue:text}`ti_numbers` numbers, found in {glue:text}`ti_seconds` s. The
# full run's row ships as `diamond-embedding.safetensors` in diffusers' format (one tensor named
# after the token); `finetune.load_embedding` reads that format and AUTOMATIC1111's. Loaded, here
# is what the new word does in short prompts and in the template:

# %%
tokenizer_ti = load_tokenizer()
finetune.load_embedding(models, tokenizer_ti, DATA / "diamond-embedding.safetensors")
TI_PROMPTS = [p.replace("diamond", TI.token) for p in PROMPTS]
with torch.no_grad():
    after = finetune.generate(models, tokenizer_ti, TI_PROMPTS, SEEDS)
show(after, [f"{p}\n{analyzer.verdict(q, image)}" for p, q, image in zip(TI_PROMPTS, PROMPTS, after)],
     title="after textual inversion: the new word")
bare, template = full["bare_prompt"], full["template"]
glue("ti_bare_shape", f"{bare['shape']:.0%}")
glue("ti_bare_all", f"{bare['all']:.0%}")
glue("ti_template_shape", f"{template['shape']:.0%}")
glue("ti_template_all", f"{template['all']:.0%}")
glue("n_eval", report["n_eval"])
print(f"full run, {report['n_eval']} held-out scenes and seeds: 'a red {TI.token}' -> diamond {bare['shape']:.0%}, "
      f"all right {bare['all']:.0%}; template prompts -> diamond {template['shape']:.0%}, all right {template['all']:.0%}")

# %% [markdown]
# On {glue:text}`n_eval` scenes and seeds the training never used, the analyzer reads a diamond in
# {glue:text}`ti_bare_shape` of the pictures for "a red `<diamond>`"-style prompts (count, colour
# and shape all right: {glue:text}`ti_bare_all`), and in {glue:text}`ti_template_shape` for the
# full template ({glue:text}`ti_template_all` all right), against {glue:text}`plain_shape` for the
# plain word. One row of numbers can only *ask* the frozen U-Net for a picture; it never drew a
# corner-standing square, so the best row asks for the nearest picture the U-Net can draw, and that
# picture is not a diamond. That limit of textual inversion is what LoRA removes.
#
# The rest of the model is untouched: the new row is appended, so every other prompt encodes to the
# same numbers as before, bit for bit.

# %%
fresh = model_loader.preload_models_from_standard_weights()
other = tokenizer(["a large green circle to the left of a small white square"], padding="max_length", max_length=77).input_ids
with torch.no_grad():
    same = torch.equal(fresh["clip"](torch.tensor(other)), models["clip"](torch.tensor(other)))
unet_same = all(torch.equal(a, b) for a, b in zip(fresh["diffusion"].state_dict().values(),
                                                   models["diffusion"].state_dict().values()))
print("other prompts encode exactly as before:", same, "| U-Net unchanged:", unet_same)

# %% [markdown]
# ## LoRA: a low-rank change of the U-Net
#
# Textual inversion can only find a way of *asking* the frozen U-Net; a concept the U-Net cannot
# draw is out of its reach. LoRA (Hu et al. 2021) changes the U-Net itself, cheaply: each
# attention projection $W$ ($d_\text{out} \times d_\text{in}$) gets a trainable
#
# $$\Delta W = \frac{\alpha}{r}\, B A, \qquad A \in \mathbb R^{r \times d_\text{in}},\; B \in \mathbb R^{d_\text{out} \times r},$$
#
# with $B = 0$ at the start, so training starts from the model itself. Here the diamond is said with
# its plain word, which the U-Net learns to draw; {glue:text}`prior_images` pictures of the original
# training distribution with their captions join the concept's ("prior preservation"), so that the
# other prompts keep their pictures.
#
# ```{listing} sdlab.tiny.finetune.attention_adapters
# ```

# %%
LIVE_LORA = dataclasses.replace(LORA, steps=60, batch=8)
glue("prior_images", LORA.prior_images)
glue("live_lora_steps", LIVE_LORA.steps)
glue("full_lora_steps", LORA.steps)
fresh = model_loader.preload_models_from_standard_weights()
live = finetune.train_lora(fresh, LIVE_LORA, log=print)
unet_numbers = sum(p.numel() for p in fresh["diffusion"].parameters())
lora_numbers = sum(a.down.numel() + a.up.numel() for a in live["adapters"])
print(f"{len(live['adapters'])} adapters of rank {LORA.rank}: {lora_numbers:,} numbers, "
      f"{lora_numbers / unet_numbers:.1%} of the U-Net's {unet_numbers:,}")
glue("lora_rank", LORA.rank)
glue("lora_adapters", len(live["adapters"]))
glue("lora_share", f"{lora_numbers / unet_numbers:.1%}")

# %% [markdown]
# {glue:text}`lora_adapters` adapters of rank {glue:text}`lora_rank` hold {glue:text}`lora_share` of
# the U-Net's numbers. The live run above took {glue:text}`live_lora_steps` steps; the full run
# takes {glue:text}`full_lora_steps`. Its file, `diamond-lora.safetensors`, is in the kohya format
# (`lora_unet_*.lora_down.weight`, `.lora_up.weight`, `.alpha`) that `lora.load_lora` reads, with a
# scale: `0` is the model itself, `1` the LoRA as trained.

# %%
full = report["lora"]
fresh = model_loader.preload_models_from_standard_weights()
LORA_PROMPTS = ["a red diamond", "a large blue diamond in the top left", "a large red circle in the center",
                "a small yellow square on the right"]
rows, titles = [], []
for scale in (0.0, 0.5, 1.0):
    handle = lora.load_lora(fresh, DATA / "diamond-lora.safetensors", scale=scale)
    with torch.no_grad():
        images = finetune.generate(fresh, tokenizer, LORA_PROMPTS, SEEDS)
    handle.remove()
    rows.extend(images)
    titles.extend(f"scale {scale:g}: {p}\n{analyzer.verdict(p, image)}" for p, image in zip(LORA_PROMPTS, images))
show(rows, titles, title="the shipped LoRA at three scales: diamonds, and prompts it should leave alone")
without, with_ = full["without"], full["with"]
for name, label in (("shape_prompts", "diamond template prompts, shape"), ("plain_shape_prompts", "'a red diamond', shape"),
                    ("circle_prompts", "circle template prompts, all right")):
    key = "all" if name == "circle_prompts" else "shape"
    print(f"{label:38s} without {without[name][key]:5.0%}  with {with_[name][key]:5.0%}")
glue("lora_shape_without", f"{without['shape_prompts']['shape']:.0%}")
glue("lora_shape_with", f"{with_['shape_prompts']['shape']:.0%}")
glue("lora_plain_with", f"{with_['plain_shape_prompts']['shape']:.0%}")
glue("lora_circles_without", f"{without['circle_prompts']['all']:.0%}")
glue("lora_circles_with", f"{with_['circle_prompts']['all']:.0%}")
glue("lora_seconds", f"{full['seconds']:.0f}")

# %% [markdown]
# The full run ({glue:text}`lora_seconds` s) moves the diamond prompts from
# {glue:text}`lora_shape_without` to {glue:text}`lora_shape_with` diamonds
# ({glue:text}`lora_plain_with` for the short "a red diamond" prompts). The price is on the prompts
# it should leave alone: circle prompts are all right in {glue:text}`lora_circles_without` without it
# and {glue:text}`lora_circles_with` with it. Prior preservation keeps that price down; the second exercise
# measures it without.
#
# A LoRA is applied either **fused** ($W + s\,\Delta W$ written into the weights: no cost per step)
# or **beside** the weights (a forward hook adds $s\,x\,A^\top B^\top$: the scale can change between
# images). Both give the same U-Net output up to rounding, and removing the LoRA gives back the
# original weights: exactly when the fused layers' originals were kept (`keep_original=True`, a copy
# of each changed weight), else up to rounding, by subtracting the change again:

# %%
fresh = model_loader.preload_models_from_standard_weights()
unet = fresh["diffusion"]
original = {k: v.clone() for k, v in unet.state_dict().items()}
x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
context = fresh["clip"](torch.tensor(tokenizer(["a red diamond"], padding="max_length", max_length=77).input_ids))
t = get_time_embedding(torch.tensor([500]), unet.config.time_dim)
outputs = {}
with torch.no_grad():
    for fuse in (True, False):
        handle = lora.load_lora(fresh, DATA / "diamond-lora.safetensors", scale=1.0, fuse=fuse, keep_original=fuse)
        outputs[fuse] = unet(x, context, t)
        handle.remove()
restored = all(torch.equal(original[k], v) for k, v in unet.state_dict().items())
print(f"fused vs beside the weights: max difference {(outputs[True] - outputs[False]).abs().max():.1e}; "
      f"weights restored exactly after remove(): {restored}")

# %% [markdown]
# ## DreamBooth, and full fine-tuning
#
# DreamBooth (Ruiz et al. 2022) fine-tunes **all** of the U-Net's weights (often the text encoder's
# too) on a few photos of one subject captioned with a rare token ("a photo of sks dog"), plus a
# *prior-preservation* loss on pictures the model itself generates for the class word ("a photo of
# a dog"), so that the class keeps its meaning. It captures a subject best and costs most: a full
# copy of the U-Net per subject, and the memory of training every weight. The LoRA above used the
# same idea of prior preservation with rendered pictures. The numbers each method trains, for the
# tiny model and for SD1.5:

# %%
from sdlab.config import SD15, TINY


def trained_numbers(config):
    with torch.device("meta"):
        meta = model_loader.build_models(config)
    adapters = finetune.attention_adapters(meta, LORA.rank, LORA.alpha)  # real (small) tensors, shaped by the meta layers
    return {"textual inversion": config.clip.n_embd,
            f"LoRA, rank {LORA.rank}, attention": sum(a.down.numel() + a.up.numel() for a in adapters),
            "DreamBooth (U-Net)": sum(p.numel() for p in meta["diffusion"].parameters())}


table = {"tiny": trained_numbers(TINY), "SD1.5": trained_numbers(SD15)}
print(f"{'method':30s}{'tiny':>14s}{'SD1.5':>16s}")
for method in table["tiny"]:
    print(f"{method:30s}{table['tiny'][method]:14,d}{table['SD1.5'][method]:16,d}")
sd15_lora = table["SD1.5"][f"LoRA, rank {LORA.rank}, attention"]
glue("sd15_lora_mb", f"{sd15_lora * 2 / 1e6:.1f}")

# %% [markdown]
# At SD1.5 size a rank-{glue:text}`lora_rank` attention LoRA is {glue:text}`sd15_lora_mb` MB in
# float16: this is why LoRA files, not fine-tuned checkpoints, are what people share.
#
# ## Loading SD1.5 LoRA files
#
# The files in use come in two layouts, and `lora.load_lora` reads both, for the U-Net and the
# text encoder:
#
# * **kohya / AUTOMATIC1111**: `lora_unet_<diffusers' module path with _>.lora_down.weight`,
#   `.lora_up.weight` and `.alpha`; `lora_te_<the text encoder's original path>...`;
# * **diffusers / PEFT**: `unet.<module path>.lora_A.weight` and `.lora_B.weight` (with the scale
#   $\alpha/r$ in the adapter's config, or none).
#
# A key that names no layer, or an adapter whose shape does not fit its layer, is refused with an
# error that names it; nothing is applied until every adapter fits. From the command line,
# repeatable and with a scale each:
#
# ```bash
# python -m sdlab generate "a watercolor fox" --ckpt v1-5-pruned-emaonly.safetensors --lora style.safetensors:0.8
# ```
#
# `tests/test_lora.py` builds random LoRA weights in both layouts for SD1.5-size models and checks
# that the U-Net's and the text encoder's outputs equal diffusers' `load_lora_weights`, fused and
# unfused. The layers' names, as kohya writes them:

# %%
with torch.device("meta"):
    sd15 = model_loader.build_models(SD15)
names = lora.kohya_names({"clip": sd15["clip"], "diffusion": sd15["diffusion"]})
unet_names = [n for n in names.values() if n.startswith("lora_unet_")]
text_names = [n for n in names.values() if n.startswith("lora_te_")]
print(f"{len(unet_names)} U-Net layers and {len(text_names)} text-encoder layers can carry a LoRA; attention, e.g.")
for name in [n for n in unet_names if "_attn" in n][:3] + text_names[:2]:
    print("  ", name)
keys = sorted(load_file(str(DATA / "diamond-lora.safetensors")))
print(f"the shipped tiny LoRA holds {len(keys)} tensors; its first keys:", *keys[:3], sep="\n   ")

# %% [markdown]
# ## Summary
#
# * Textual inversion learns one embedding row ({glue:text}`ti_numbers` numbers for the tiny model)
#   and can only ask the frozen model for something it can already draw.
# * LoRA learns a low-rank change $\tfrac{\alpha}{r} BA$ of the attention projections; fused or kept
#   beside the weights, removable, and small enough to share.
# * DreamBooth trains every U-Net weight with prior preservation: most faithful, most costly.
# * The analyzer measures both sides of fine-tuning: the new concept, and what it costs the rest.
#
# ## Exercises
#
# The worked solutions are on the [solutions](course/solutions.ipynb) page.
#
# :::{exercise}
# :label: ex-9-1
#
# Textual inversion could not teach the tiny model a new *colour* (orange, say), and neither could
# the LoRA of this chapter. Which frozen part stands in the way, and what would you have to train
# as well? (A question to answer in words.)
# :::
#
# :::{exercise}
# :label: ex-9-2
#
# Train the LoRA without prior preservation (`dataclasses.replace(LORA, prior_images=0)`) and
# compare the circle prompts with and without it, as above. What changes, and why? (A question to
# answer in words.)
# :::
