r"""Fine-tune the finished tiny model on a CPU: textual inversion and LoRA.

Both methods teach the model something no training picture showed, from at most 32 rendered
examples, and leave its weights alone:

**Textual inversion** (Gal et al. 2022) learns *one new word*. A token `<diamond>` is added to the
tokenizer and gets one new row $v$ of the text encoder's embedding table; everything else (the
other 49,408 rows, the text encoder, the U-Net, the VAE) is frozen. The row is trained with the
model's own loss on pictures of the concept (`data.NOVEL_SHAPES`: a diamond, a square turned by 45
degrees) captioned with the token, "a large red <diamond> in the center":

$$v^* = \arg\min_v \; \mathbb E_{z_0, \varepsilon, t} \big\lVert \varepsilon - \varepsilon_\theta\big(\sqrt{\bar\alpha_t} z_0
  + \sqrt{1-\bar\alpha_t}\,\varepsilon,\; t,\; c_\theta(y; v)\big) \big\rVert^2 .$$

Only $v$ (64 numbers for the tiny model, 768 for SD1.5) is learned, so it can only find a way of
*asking* the frozen U-Net for the concept. The row starts from an existing word's (`init_word`,
"square"). It is saved as a `.safetensors` file in **diffusers' format**, one tensor named after
the token, shape (1, 64) (`learned_embeds.safetensors`); `load_embedding` reads that and
AUTOMATIC1111's format (one tensor `emb_params`, (n, d), the token named after the file).

**LoRA** (Hu et al. 2021) learns a low-rank change $\Delta W = \tfrac{\alpha}{r} B A$ of the U-Net's
attention projections (`sdlab.lora`), here for the same diamond said with its plain word ("a large
red diamond in the center"), which the text encoder already encodes as some unused direction: the
U-Net itself learns to draw it. `prior_images` pictures of the original training distribution with
their captions join the 32 (DreamBooth's "prior preservation", with rendered pictures instead of the
model's own), so that the other prompts keep their pictures. (A new *colour* cannot be taught: the
frozen VAE decodes every colour as one of its six.) The adapters run beside the frozen weights
as forward hooks during training ($B = 0$ at the start, so training starts from the model itself),
and are saved in the kohya format (`lora_unet_*.lora_down.weight`, `.lora_up.weight`, `.alpha`)
that `sdlab.lora.load_lora` (and AUTOMATIC1111) read.

The analyzer (`sdlab.tiny.analyzer`, with `novel=True`) measures both on generation seeds the
training never used. `python -m sdlab finetune --out-dir DIR --report finetune.json` runs both
and writes the figures.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.func import functional_call

from .. import lora
from ..clip import add_token_embeddings
from ..ddpm import DDPMSampler
from ..errors import ArgumentError, CheckpointError
from .data import (
    NOVEL_SHAPES,
    SHAPES,
    Scene,
    caption,
    caption_variants,
    concept_scenes,
    parse_caption,
    render,
    sample_scenes,
    to_tensor,
)
from .train import diffusion_loss, encode_latents, optimizer_step, step_generator

EMBEDDING_KEY = "embedding.token_embedding.weight"  # the text encoder's table, (n_vocab, n_embd)


@dataclass(frozen=True)
class InversionSettings:
    """Textual inversion of `shape` as the new token `token`, from `n_images` rendered pictures."""

    token: str = "<diamond>"
    shape: str = "diamond"
    init_word: str = "square"  # the new row starts as this word's
    size: str = "large"  # the tiny VAE cannot hold a small diamond (it decodes a drop)
    n_images: int = 32
    caption_variants: int = 2  # captions per picture: the full one and a paraphrase ("a red <diamond>")
    steps: int = 600
    batch: int = 16
    lr: float = 0.03
    seed: int = 0


@dataclass(frozen=True)
class LoraSettings:
    """A LoRA of rank `rank` on the U-Net's attention projections that teaches the U-Net to draw
    `shape` for its plain word ("a large red diamond in the center"), the text encoder untouched."""

    shape: str = "diamond"
    size: str = "large"
    n_images: int = 32
    prior_images: int = 32  # pictures of the training distribution mixed in, so the rest stays (0: none)
    caption_variants: int = 2  # captions per picture: the full one and a paraphrase
    rank: int = 4
    alpha: float = 4.0
    steps: int = 400
    batch: int = 16
    lr: float = 0.005
    seed: int = 0


def _check_settings(settings, kind) -> None:
    """`ArgumentError` naming the field, for counts and rates out of range."""
    if not isinstance(settings, kind):
        raise ArgumentError(f"settings must be a {kind.__name__}, not {type(settings).__name__}")
    for name in ("n_images", "caption_variants", "steps", "batch") + (("rank",) if kind is LoraSettings else ()):
        value = getattr(settings, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ArgumentError(f"{kind.__name__}.{name} must be a positive int; got {value!r}")
    if not (isinstance(settings.lr, (int, float)) and math.isfinite(settings.lr) and settings.lr > 0):
        raise ArgumentError(f"{kind.__name__}.lr must be a finite positive number; got {settings.lr!r}")


# --------------------------------------------------------------------------------------------------
# Data: rendered pictures of the concept, their latents and captions
# --------------------------------------------------------------------------------------------------


def say(text: str | Scene, words: dict[str, str]) -> str:
    """A caption (or a scene's `caption`) with some words replaced: `{"diamond": "<diamond>"}` gives
    "a large red <diamond> in the center", a caption with textual inversion's new token."""
    text = caption(text) if isinstance(text, Scene) else text
    return " ".join(words.get(word, word) for word in text.split())


def concept_data(models: dict, tokenizer, scenes: list[Scene], words: dict[str, str], seed: int,
                 variants: int = 1) -> dict:
    """Latents (n * variants, 4, 8, 8), scaled as the U-Net sees them (one posterior sample, seeded),
    and token ids (n * variants, 77): each picture with its `variants` captions (`data.caption_variants`:
    the full caption, then paraphrases such as "a red diamond"), the concept said with `words`."""
    images = to_tensor(np.stack([render(scene) for scene in scenes]))  # (n, 64, 64, 3) -> (n, 3, 64, 64)
    mean, logvar = encode_latents(models["encoder"], images)
    noise = torch.randn(mean.shape, generator=step_generator(seed, 9, -1))
    latents = (mean + torch.exp(0.5 * logvar) * noise) * models["decoder"].config.scale_factor
    captions = [say(text, words) for texts in caption_variants(scenes, variants, seed) for text in texts]
    tokens = torch.tensor(tokenizer(captions, padding="max_length", max_length=77, truncation=True).input_ids)
    return {"latents": latents.repeat_interleave(variants, dim=0), "tokens": tokens, "captions": captions}


@torch.no_grad()
def fixed_loss(encode, diffusion, data: dict, seed: int = 12345, repeats: int = 4) -> float:
    """The diffusion loss on every training latent, with `repeats` fixed draws of (t, noise) each:
    the same numbers before and after training, so the two losses compare."""
    alphas_cumprod = DDPMSampler().alphas_cumprod
    generator = torch.Generator().manual_seed(seed)
    losses = [diffusion_loss(encode, diffusion, data["latents"], data["tokens"], alphas_cumprod, generator)
              for _ in range(repeats)]
    return float(torch.stack(losses).mean())


def _batch(data: dict, generator: torch.Generator, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    index = torch.randint(0, len(data["latents"]), (size,), generator=generator)
    return data["latents"][index], data["tokens"][index]


def loss_curve(losses: list[float], points: int = 10) -> list[float]:
    """Mean loss over `points` equal windows of a run (a compact curve for the report)."""
    chunks = np.array_split(np.array(losses), min(points, len(losses)))
    return [round(float(c.mean()), 5) for c in chunks]


# --------------------------------------------------------------------------------------------------
# Textual inversion
# --------------------------------------------------------------------------------------------------


def _with_row(clip, vector: torch.Tensor):
    """The text encoder as a function of the tokens, with `vector` (n_embd,) as one extra row of its
    embedding table (the id `n_vocab`), without touching the module's own parameters.

    Only the rows the batch uses are gathered, into a small table the tokens are renumbered into
    (a lookup is exact: the same numbers as the whole table plus the row, without copying 49,409 rows
    and back-propagating into all of them at every step)."""
    rows = clip.embedding.token_embedding.weight.detach()
    new_id = len(rows)

    def encode(tokens):
        ids, renumbered = torch.unique(tokens, return_inverse=True)  # (k,), tokens' shape with values < k
        known = rows[ids.clamp(max=new_id - 1)]  # (k, n_embd)
        table = torch.where((ids == new_id)[:, None], vector[None], known)  # (k, n_embd)
        return functional_call(clip, {EMBEDDING_KEY: table}, (renumbered,))

    return encode


def train_inversion(models: dict, settings: InversionSettings | None = None, log=print) -> dict:
    """Learn the embedding row of `settings.token` for `settings.shape`; the models are not changed.

    Returns `token`, `vector` (1, n_embd), the loss per step, the fixed-draw loss (`fixed_loss`)
    before and after, the seconds spent and the training captions. Install the row with
    `add_embedding`, or save it with `save_embedding`.
    """
    from ..tokenizer import load_tokenizer

    settings = settings or InversionSettings()
    _check_settings(settings, InversionSettings)
    if settings.shape not in NOVEL_SHAPES + SHAPES:
        raise ArgumentError(f"InversionSettings.shape must be one of {NOVEL_SHAPES + SHAPES}; got {settings.shape!r}")
    start = time.perf_counter()
    tokenizer = load_tokenizer()
    init_ids = tokenizer.encode(settings.init_word)
    if len(init_ids) != 1:
        raise ArgumentError(f"InversionSettings.init_word must be one token; {settings.init_word!r} is {len(init_ids)}")
    token_id = tokenizer.add_tokens([settings.token])[0]
    clip, diffusion = models["clip"], models["diffusion"]
    if token_id != clip.embedding.token_embedding.num_embeddings:
        raise ArgumentError(f"the text encoder has {clip.embedding.token_embedding.num_embeddings} rows, the "
                            f"tokenizer {token_id}: train on models without added tokens")
    scenes = concept_scenes(settings.n_images, settings.seed, shape=settings.shape, size=settings.size)
    data = concept_data(models, tokenizer, scenes, {settings.shape: settings.token}, settings.seed,
                        settings.caption_variants)
    vector = nn.Parameter(clip.embedding.token_embedding.weight[init_ids[0]].detach().clone())
    encode = _with_row(clip, vector)
    before = fixed_loss(encode, diffusion, data)
    optimizer = torch.optim.Adam([vector], lr=settings.lr)
    alphas_cumprod, losses = DDPMSampler().alphas_cumprod, []
    for step in range(settings.steps):
        generator = step_generator(settings.seed, 10, step)
        latents, tokens = _batch(data, generator, settings.batch)
        loss = diffusion_loss(encode, diffusion, latents, tokens, alphas_cumprod, generator)
        optimizer_step(optimizer, [vector], loss, settings.lr)
        losses.append(loss.item())
    after = fixed_loss(encode, diffusion, data)
    seconds = time.perf_counter() - start
    log(f"textual inversion of {settings.token}: {settings.steps} steps in {seconds:.1f}s, "
        f"fixed-draw loss {before:.4f} -> {after:.4f}")
    return {"token": settings.token, "vector": vector.detach().clone()[None], "losses": losses,
            "loss_before": before, "loss_after": after, "seconds": seconds, "captions": data["captions"]}


def add_embedding(models: dict, tokenizer, token: str, vector: torch.Tensor) -> int:
    """Give `tokenizer` the new `token` and the text encoder its row `vector` ((1, n_embd) or
    (n_embd,)); returns the token's id. Prompts without the token encode exactly as before."""
    vector = vector[None] if isinstance(vector, torch.Tensor) and vector.ndim == 1 else vector
    width = models["clip"].embedding.token_embedding.embedding_dim
    if not isinstance(vector, torch.Tensor) or vector.shape != (1, width):
        shape = tuple(vector.shape) if isinstance(vector, torch.Tensor) else type(vector).__name__
        raise ArgumentError(f"vector must be one embedding row of {width} numbers for {token!r}; got {shape}")
    if len(tokenizer) != models["clip"].embedding.token_embedding.num_embeddings:
        raise ArgumentError(f"tokenizer has {len(tokenizer)} tokens but the text encoder "
                            f"{models['clip'].embedding.token_embedding.num_embeddings} rows: pass the tokenizer "
                            "that goes with these models")
    (token_id,) = tokenizer.add_tokens([token])
    add_token_embeddings(models["clip"], vector.float())
    return token_id


def save_embedding(path, token: str, vector: torch.Tensor) -> None:
    """Write a learned embedding in diffusers' format: `{token: (1, n_embd) float32}` in `.safetensors`."""
    from safetensors.torch import save_file

    vector = vector[None] if vector.ndim == 1 else vector
    save_file({token: vector.detach().float().contiguous()}, str(path), metadata={"format": "textual_inversion"})


def read_embedding(path, token: str | None = None) -> tuple[str, torch.Tensor]:
    """`(token, vectors (n, d))` from a `.safetensors` embedding: diffusers' `{token: (n, d) or (d,)}`,
    or AUTOMATIC1111's `{"emb_params": (n, d)}`, whose token is `token` or else the file's name
    (`diamond.safetensors` -> `diamond`, as A1111 does). `token=` also renames a diffusers file's."""
    from safetensors.torch import load_file

    state = load_file(str(path))
    if len(state) != 1:
        raise CheckpointError(f"embedding file {str(path)!r} holds {len(state)} tensors ({', '.join(list(state)[:5])}); "
                              "a textual-inversion file holds one (diffusers: named after the token; A1111: emb_params)")
    (key, vectors), = state.items()
    if key == "emb_params":
        key = Path(path).stem
    vectors = vectors[None] if vectors.ndim == 1 else vectors
    if vectors.ndim != 2 or not vectors.is_floating_point():
        raise CheckpointError(f"embedding file {str(path)!r}: {key} must be float (n, d), not {vectors.dtype} "
                              f"{tuple(vectors.shape)}")
    return token or key, vectors.float()


def load_embedding(models: dict, tokenizer, path, token: str | None = None) -> int:
    """Read an embedding file (`read_embedding`) and add its token to `tokenizer` and `models`; the id."""
    token, vectors = read_embedding(path, token)
    if len(vectors) != 1:
        raise CheckpointError(f"embedding file {str(path)!r} has {len(vectors)} vectors; sdlab adds one-vector tokens")
    return add_embedding(models, tokenizer, token, vectors)


# --------------------------------------------------------------------------------------------------
# LoRA
# --------------------------------------------------------------------------------------------------


def attention_adapters(models: dict, rank: int, alpha: float, seed: int = 0) -> list[lora.Adapter]:
    r"""Trainable adapters on every attention projection of the U-Net (self-attention q, k, v (thirds of
    the fused `in_proj`) and output; cross-attention q, k, v and output). As in the LoRA paper and
    PEFT: $A$ Kaiming-uniform, $B = 0$, so $\Delta W = 0$ until trained."""
    generator = torch.Generator().manual_seed(seed)
    adapters = []
    for target, _ in lora.layer_aliases({"diffusion": models["diffusion"]}):
        if ".attention_1." not in target.module and ".attention_2." not in target.module:
            continue
        weight = models["diffusion"].get_submodule(target.module).weight
        out_features, in_features = (weight.shape[0] // 3 if target.chunk is not None else weight.shape[0]), weight.shape[1]
        bound = 1 / math.sqrt(in_features)  # kaiming_uniform_(a=sqrt(5)) on an (r, in) matrix
        down = nn.Parameter(torch.empty(rank, in_features).uniform_(-bound, bound, generator=generator))
        up = nn.Parameter(torch.zeros(out_features, rank))
        adapters.append(lora.Adapter(target, down, up, float(alpha)))
    return adapters


def train_lora(models: dict, settings: LoraSettings | None = None, log=print) -> dict:
    """Train adapters for the shape `settings.shape`; the models' weights are not changed (the
    adapters run as hooks, removed at the end). Returns the `adapters`, the loss per step, the fixed-draw
    loss before and after, the seconds and the captions; save with `sdlab.lora.save_lora`."""
    from ..tokenizer import load_tokenizer

    settings = settings or LoraSettings()
    _check_settings(settings, LoraSettings)
    if settings.shape not in NOVEL_SHAPES + SHAPES:
        raise ArgumentError(f"LoraSettings.shape must be one of {NOVEL_SHAPES + SHAPES}; got {settings.shape!r}")
    start = time.perf_counter()
    if isinstance(settings.prior_images, bool) or not isinstance(settings.prior_images, int) or settings.prior_images < 0:
        raise ArgumentError(f"LoraSettings.prior_images must be an int >= 0; got {settings.prior_images!r}")
    scenes = concept_scenes(settings.n_images, settings.seed, shape=settings.shape, size=settings.size)
    scenes += sample_scenes(settings.prior_images, settings.seed, "train")  # prior preservation
    data = concept_data(models, load_tokenizer(), scenes, {}, settings.seed, settings.caption_variants)
    adapters = attention_adapters(models, settings.rank, settings.alpha, settings.seed)
    params = [p for a in adapters for p in (a.down, a.up)]
    clip, diffusion = models["clip"], models["diffusion"]
    handle = lora.apply_adapters({"diffusion": diffusion}, adapters, fuse=False)
    try:
        before = fixed_loss(clip, diffusion, data)
        optimizer = torch.optim.Adam(params, lr=settings.lr)
        alphas_cumprod, losses = DDPMSampler().alphas_cumprod, []
        for step in range(settings.steps):
            generator = step_generator(settings.seed, 11, step)
            latents, tokens = _batch(data, generator, settings.batch)
            with torch.no_grad():
                context = clip(tokens)  # the text encoder is frozen: no graph through it
            loss = diffusion_loss(lambda _tokens, c=context: c, diffusion, latents, tokens, alphas_cumprod, generator)
            optimizer_step(optimizer, params, loss, settings.lr)
            losses.append(loss.item())
        after = fixed_loss(clip, diffusion, data)
    finally:
        handle.remove()
    seconds = time.perf_counter() - start
    log(f"LoRA for {settings.shape}: {len(adapters)} adapters of rank {settings.rank}, {settings.steps} steps in "
        f"{seconds:.1f}s, fixed-draw loss {before:.4f} -> {after:.4f}")
    frozen = [lora.Adapter(a.target, a.down.detach().clone(), a.up.detach().clone(), a.alpha) for a in adapters]
    return {"adapters": frozen, "losses": losses, "loss_before": before, "loss_after": after, "seconds": seconds,
            "captions": data["captions"]}


# --------------------------------------------------------------------------------------------------
# Measuring the outcome with the analyzer
# --------------------------------------------------------------------------------------------------


#: The guidance the fine-tuned concepts are generated with: a concept learned from 32 pictures is a
#: weak pull that guidance amplifies. At the tiny model's default (2.5) the shipped `<diamond>` reads as a
#: diamond in 5% of template prompts, at 5 in 40%.
EVAL_CFG_SCALE = 5.0


def generate(models: dict, tokenizer, prompts: list[str], seeds: list[int], steps: int = 20,
             cfg_scale: float = EVAL_CFG_SCALE, batch: int = 64) -> np.ndarray:
    """Images (n, 64, 64, 3) uint8 of `prompts` with `seeds`, DPM++ 2M (`evaluate.generate_batch`)."""
    from .evaluate import generate_batch

    return np.concatenate([generate_batch(models, prompts[i : i + batch], seeds[i : i + batch], "dpmpp_2m", steps,
                                          cfg_scale, tokenizer) for i in range(0, len(prompts), batch)])


def plain_scenes(scenes: list[Scene]) -> list[Scene]:
    """The scenes as a reader says them first, colour and shape only: "a red diamond"."""
    return [parse_caption(f"a {scene.objects[0].colour} {scene.objects[0].shape}") for scene in scenes]


def template_rates(models, tokenizer, scenes: list[Scene], words: dict[str, str], seeds: list[int]) -> dict:
    """`analyzer.evaluate` of the scenes' captions (said with `words`) on images from `seeds`."""
    from .analyzer import evaluate

    images = generate(models, tokenizer, [say(scene, words) for scene in scenes], seeds)
    return {key: round(value, 4) for key, value in evaluate(scenes, images).items()}


# --------------------------------------------------------------------------------------------------
# The full runs and their report (`python -m sdlab finetune`)
# --------------------------------------------------------------------------------------------------

EVAL_SCENE_SEED = 101  # scenes of the evaluation prompts (the training's are drawn with its own seed)
EVAL_SEEDS = range(5000, 5060)  # generation seeds: no training step uses an image generated from a seed
OUTPUT_FILES = ("diamond-embedding.safetensors", "diamond-lora.safetensors")  # what `run_finetune` writes


def _summary(result: dict) -> dict:
    return {"seconds": round(result["seconds"], 1), "loss_fixed_draws_before": round(result["loss_before"], 5),
            "loss_fixed_draws_after": round(result["loss_after"], 5),
            "loss_factor": round(result["loss_before"] / result["loss_after"], 2), "loss_curve": loss_curve(result["losses"])}


def inversion_report(models: dict, settings: InversionSettings, out_dir: Path, n_eval: int, log=print) -> dict:
    """Train the embedding, save it, load it back from the file into a fresh tokenizer and the models,
    and read the prompts with the analyzer: the template ("a large red <diamond> in the center") on
    `n_eval` held-out scenes and seeds, the bare "a red <diamond>", and the plain word "diamond"
    without the token, for comparison."""
    from ..tokenizer import load_tokenizer

    result = train_inversion(models, settings, log)
    path = out_dir / OUTPUT_FILES[0]
    save_embedding(path, result["token"], result["vector"])
    tokenizer = load_tokenizer()
    token_id = load_embedding(models, tokenizer, path)
    scenes = concept_scenes(n_eval, EVAL_SCENE_SEED, shape=settings.shape, size=settings.size)
    seeds = list(EVAL_SEEDS)[:n_eval]
    template = template_rates(models, tokenizer, scenes, {settings.shape: settings.token}, seeds)
    plain_word = template_rates(models, tokenizer, scenes, {}, seeds)
    bare = template_rates(models, tokenizer, plain_scenes(scenes), {settings.shape: settings.token}, seeds)
    log(f"{settings.token}: template prompts shape {template['shape']:.2f}, all {template['all']:.2f}; "
        f"plain word 'diamond' shape {plain_word['shape']:.2f}; 'a red {settings.token}' prompts shape "
        f"{bare['shape']:.2f}, all {bare['all']:.2f}")
    return {"settings": dataclasses.asdict(settings), **_summary(result), "file": path.name, "token_id": token_id,
            "file_bytes": path.stat().st_size, "template": template, "plain_word_without_token": plain_word,
            "bare_prompt": bare, "eval_scene_seed": EVAL_SCENE_SEED, "eval_seeds": [seeds[0], seeds[-1]]}


def lora_report(models: dict, settings: LoraSettings, out_dir: Path, n_eval: int, log=print) -> dict:
    """Train the LoRA, save it in the kohya format, load the file with `sdlab.lora.load_lora` and read
    the template prompts of the shape, and of circles (what it does to the rest), with and without it."""
    result = train_lora(models, settings, log)
    path = out_dir / OUTPUT_FILES[1]
    lora.save_lora(models, result["adapters"], path)
    scenes = concept_scenes(n_eval, EVAL_SCENE_SEED, shape=settings.shape, size=settings.size)
    circles = concept_scenes(n_eval, EVAL_SCENE_SEED + 1, shape="circle", size=settings.size)
    seeds = list(EVAL_SEEDS)[:n_eval]
    tokenizer = None
    rates = {"without": {}, "with": {}}
    for state in ("without", "with"):
        handle = lora.load_lora(models, path) if state == "with" else None
        rates[state] = {"shape_prompts": template_rates(models, tokenizer, scenes, {}, seeds),
                        "plain_shape_prompts": template_rates(models, tokenizer, plain_scenes(scenes), {}, seeds),
                        "circle_prompts": template_rates(models, tokenizer, circles, {}, seeds)}
        if handle is not None:
            handle.remove()
    log(f"LoRA: '{settings.shape}' prompts shape {rates['without']['shape_prompts']['shape']:.2f} -> "
        f"{rates['with']['shape_prompts']['shape']:.2f}; circle prompts all "
        f"{rates['without']['circle_prompts']['all']:.2f} -> {rates['with']['circle_prompts']['all']:.2f}")
    return {"settings": dataclasses.asdict(settings), **_summary(result), "file": path.name,
            "file_bytes": path.stat().st_size, "adapters": len(result["adapters"]),
            "parameters": sum(a.down.numel() + a.up.numel() for a in result["adapters"]), **rates,
            "eval_scene_seed": EVAL_SCENE_SEED, "eval_seeds": [seeds[0], seeds[-1]]}


def run_finetune(out_dir, report=None, inversion: InversionSettings | None = None, lora_settings: LoraSettings | None = None,
                 n_eval: int = 60, overwrite: bool = False, log=print) -> dict:
    """Both runs on the bundled tiny model (loaded afresh for each), their files (`OUTPUT_FILES`)
    written into `out_dir`, their figures returned and, with `report`, written as JSON. Existing
    files are refused unless `overwrite=True`."""
    import json

    from ..model_loader import preload_models_from_standard_weights

    if isinstance(n_eval, bool) or not isinstance(n_eval, int) or not 1 <= n_eval <= len(EVAL_SEEDS):
        raise ArgumentError(f"n_eval must be an int in [1, {len(EVAL_SEEDS)}]; got {n_eval!r}")
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        raise ArgumentError(f"out_dir {str(out_dir)!r} is not an existing folder; create it first")
    existing = [str(path) for path in [*(out_dir / name for name in OUTPUT_FILES), *([Path(report)] if report else [])]
                if path.exists()]
    if existing and not overwrite:
        raise ArgumentError(f"{', '.join(existing)} exist already; pass another folder or --overwrite to replace them")
    figures = {"threads": torch.get_num_threads(), "n_eval": n_eval,
               "textual_inversion": inversion_report(preload_models_from_standard_weights(),
                                                     inversion or InversionSettings(), out_dir, n_eval, log),
               "lora": lora_report(preload_models_from_standard_weights(), lora_settings or LoraSettings(), out_dir,
                                   n_eval, log)}
    if report:
        Path(report).write_text(json.dumps(figures, indent=1) + "\n")
        log(f"wrote {report}")
    return figures
