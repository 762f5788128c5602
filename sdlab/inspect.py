r"""Looking inside: record the attention of CLIP and the U-Net while generating, and per-word heat maps.

```python
from sdlab import inspect, pipeline
with inspect.record_attention(models) as recording:
    image = pipeline.generate("a large red circle in the center", models=models, seed=1)
maps = inspect.word_heatmaps(recording, tokenizer, "a large red circle in the center", image.shape[:2])
```

`record_attention` watches the attention modules of the given models (through
`sdlab.attention.observe_attention`): each call also hands its queries and keys to the recorder,
which computes the weights $A = \operatorname{softmax}(QK^\top/\sqrt{d_k})$ again, in float32, on
the side, and keeps only an aggregate. The attention *output* is computed exactly as without it
(fused or not): images are bit for bit the same (tests/test_inspect.py). Off by default and
free when off (one context-variable read per attention call).

What is kept, per U-Net transformer block (`recording.blocks`, in U-Net order) and per step (one
step = one call of `models["diffusion"]`):

* **cross-attention**, averaged over heads, $\bar A_{p,j} = \frac1H\sum_h A^h_{p,j}$, as a map per
  token at the block's resolution: `recording.cross[block][step]` is (batch, tokens, h, w). For
  SD1.5 at 512x512 (16 blocks, 26,944 latent pixels over all blocks) that is
  $77 \times 26{,}944 \times 4$ B = 8.3 MB per step, 166 MB for 20 steps (`tokens=10`: 1.1 MB per step;
  `per_head=True`: 8 times that, 66 MB per step);
* **self-attention** only at the resolutions asked for (`self_resolutions=(16,)`: the sides of the
  maps), averaged over heads and summed over the steps, (batch, hw, hw): 256 KB per 16x16 block,
  64 MB per 64x64 block (computed in slices of 1024 queries, so never $(hw)^2$ per head at once);
* **CLIP's self-attention**, per layer and head: `recording.text[call][layer]` (batch, heads, 77, 77).

Attention calls outside a call of `models["diffusion"]` (its inner `unet` called directly) are not
recorded. Only the first `batch` items of each call are kept: with classifier-free guidance `generate` runs
the U-Net on [prompt, negative prompt], so the default `batch=1` keeps the conditional half.
`recording.timesteps[step]` is the timestep of each U-Net call, read from its time embedding.

**Heat maps** (DAAM, Tang et al. 2022): for one token $j$, upsample each block's map to the image
size (bicubic), clamp at 0 and sum over the chosen blocks and steps,
$D_j = \sum_{\ell, t} \max(0, \operatorname{up}(\bar A^{\ell,t}_{\cdot, j}))$. The start-of-text
token draws most of the attention of every pixel (an attention sink); `start_token="renormalize"`
drops it and renormalizes every pixel's distribution over the other tokens first; `cutoff=0.4`
zeroes what is below 0.4 of the map's maximum (DAAM's $\tau$).

**What localizes** (`localization_report`, the tiny model, 40 held-out single-object prompts): the
plain DAAM sum (mean over heads, every block and step) puts 28% of the shape word's mass and 19% of
the colour word's inside the object's box grown by one latent pixel, hardly more than a flat map
(22%). The tiny model's cross-attention localizes in a few heads only, which the mean over heads
washes out: the shape word in head 3 of block `up.3` (and head 2 of `down.1`), the colour word in
head 2 of `down.1` over the late steps. Those heads with `cutoff=0.4` (`TINY_LOCALIZING`) put 87%
of both words' mass inside the box, and at least half of it in 97% (shape) and 90% (colour) of the
prompts. Recording `per_head=True` keeps the heads.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from .attention import attention_probabilities, observe_attention
from .errors import ArgumentError

SELF_SLICE = 1024  # queries per slice when computing self-attention weights for the recording


@dataclass
class AttentionRecording:
    """What `record_attention` kept (see the module docstring for shapes and memory)."""

    blocks: list[str] = field(default_factory=list)  # U-Net transformer blocks, in U-Net order
    cross: dict[str, list[torch.Tensor]] = field(default_factory=dict)  # block -> per step (batch, T, h, w)
    self_attention: dict[str, torch.Tensor] = field(default_factory=dict)  # block -> (batch, hw, hw) or (steps, ...)
    text: list[list[torch.Tensor]] = field(default_factory=list)  # per CLIP call, per layer (batch, heads, L, L)
    timesteps: list[float] = field(default_factory=list)  # per U-Net call
    sides: dict[str, tuple[int, int]] = field(default_factory=dict)  # block -> (h, w) of its maps
    per_head: bool = False  # cross maps kept per head: (batch, heads, T, h, w) per step

    @property
    def n_steps(self) -> int:
        return len(self.timesteps)

    def nbytes(self) -> int:
        """Bytes held by the recorded tensors."""
        tensors = [t for maps in self.cross.values() for t in maps] + list(self.self_attention.values())
        tensors += [t for call in self.text for t in call]
        return sum(t.numel() * t.element_size() for t in tensors)


def _timestep_of(time: torch.Tensor) -> float:
    r"""The timestep of a U-Net call: as given, or read back from its sinusoidal embedding (B, d).

    The slowest frequency $\omega = 10000^{-(d/2-1)/(d/2)}$ turns at most ~0.13 rad over 1000 steps,
    so $t = \operatorname{atan2}(\sin t\omega, \cos t\omega) / \omega$ is unambiguous.
    """
    time = torch.as_tensor(time).detach().double().cpu()
    if time.ndim <= 1:
        return float(time.reshape(-1)[0])
    half = time.shape[-1] // 2
    omega = math.exp(-math.log(10000) * (half - 1) / half)
    return round(float(torch.atan2(time[0, 2 * half - 1], time[0, half - 1]) / omega), 2)  # float32: ~1e-3 off


class _Recorder:
    """The observer handed to `observe_attention`: attention calls -> an `AttentionRecording`."""

    def __init__(self, models: dict, batch: int, tokens: int | None, self_resolutions, self_per_step: bool,
                 per_head: bool):
        from .diffusion import UNET_AttentionBlock

        self.recording = AttentionRecording(per_head=per_head)
        self.batch, self.tokens, self.self_per_step, self.per_head = batch, tokens, self_per_step, per_head
        self.self_resolutions = set(self_resolutions)
        self.watched: dict[int, tuple[str, str]] = {}  # id(module) -> (kind, block or layer)
        self.latent_size = None
        diffusion, clip = models.get("diffusion"), models.get("clip")
        if diffusion is not None:
            for name, module in diffusion.named_modules():
                if isinstance(module, UNET_AttentionBlock):
                    block = _block_name(name)
                    self.recording.blocks.append(block)
                    self.recording.cross[block] = []
                    self.watched[id(module.attention_1)] = ("self", block)
                    self.watched[id(module.attention_2)] = ("cross", block)
        if clip is not None:
            for index, layer in enumerate(getattr(clip, "layers", [])):
                self.watched[id(layer.attention)] = ("text", str(index))

    def unet_called(self, module, args, kwargs):
        """Forward pre-hook of the Diffusion model: a new step, its latent size and timestep."""
        latent = args[0] if args else kwargs["latent"]
        time = args[2] if len(args) > 2 else kwargs["time"]
        self.latent_size = tuple(latent.shape[-2:])
        self.recording.timesteps.append(_timestep_of(time))

    def __call__(self, module, q: torch.Tensor, k: torch.Tensor, causal: bool) -> None:
        where = self.watched.get(id(module))
        if where is None:
            return
        kind, name = where
        with torch.no_grad():
            q, k = q[: self.batch].float(), k[: self.batch].float()  # (n, H, L, d_k)
            if kind == "text":
                self._text(int(name), q, k)
            elif self.latent_size is not None:
                side = _side(self.latent_size, q.shape[-2])
                self.recording.sides[name] = side
                if kind == "cross":
                    self._cross(name, q, k, side)
                elif side[0] in self.self_resolutions or side[1] in self.self_resolutions:
                    self._self(name, q, k)

    def _text(self, layer: int, q, k) -> None:
        if layer == 0:
            self.recording.text.append([])
        self.recording.text[-1].append(attention_probabilities(q, k, causal=True).cpu())  # (n, H, L, L)

    def _cross(self, block: str, q, k, side) -> None:
        weights = attention_probabilities(q, k)[..., : self.tokens]  # (n, H, hw, T)
        if not self.per_head:
            weights = weights.mean(1, keepdim=True)  # (n, 1, hw, T), mean over heads
        # (n, H, hw, T) -> (n, H, T, hw) -> (n, H, T, h, w); without per_head (n, T, h, w)
        maps = weights.transpose(2, 3).reshape(*weights.shape[:2], -1, *side)
        self.recording.cross[block].append((maps if self.per_head else maps[:, 0]).cpu().clone())  # kept on the CPU

    def _self(self, block: str, q, k) -> None:
        n, _, length, _ = q.shape
        total = torch.empty(n, length, k.shape[-2])  # (n, hw, hw)
        for start in range(0, length, SELF_SLICE):
            total[:, start : start + SELF_SLICE] = attention_probabilities(q[:, :, start : start + SELF_SLICE], k).mean(1).cpu()
        kept = self.recording.self_attention
        if self.self_per_step:
            kept[block] = torch.cat([kept[block], total[None]]) if block in kept else total[None]
        else:
            kept[block] = kept[block] + total if block in kept else total


def _block_name(module_name: str) -> str:
    """`unet.encoders.1.1` -> `down.1`; `unet.bottleneck.1` -> `mid`; `unet.decoders.3.1` -> `up.3`."""
    parts = module_name.split(".")
    if "bottleneck" in parts:
        return "mid"
    kind = "down" if "encoders" in parts else "up"
    return f"{kind}.{parts[parts.index('encoders' if kind == 'down' else 'decoders') + 1]}"


def _side(latent_size: tuple[int, int], length: int) -> tuple[int, int]:
    """The (h, w) of a block with `length` pixels: the latent size halved (rounding up) until it fits."""
    h, w = latent_size
    while h * w > length:
        h, w = -(-h // 2), -(-w // 2)
    if h * w != length:
        raise ArgumentError(f"an attention call of {length} pixels fits no level of a {latent_size} latent")
    return h, w


@contextlib.contextmanager
def record_attention(models: dict, *, batch: int = 1, tokens: int | None = None, self_resolutions=(),
                     self_per_step: bool = False, per_head: bool = False):
    """Record the attention of `models["clip"]` and `models["diffusion"]` inside the block; yields an
    `AttentionRecording`, filled while the block runs (this thread only).

    - `batch`: keep the first `batch` items of each call (1: the conditional half of `generate`).
    - `tokens`: keep the cross-attention of the first `tokens` tokens only (None: all 77).
    - `self_resolutions`: map sides (e.g. `(16,)`) whose U-Net self-attention is kept, summed
      over steps (or per step with `self_per_step=True`); empty (the default): none.
    - `per_head`: keep the cross-attention maps of every head, (batch, heads, T, h, w) per step
      (heads times the memory), for `token_heatmaps(..., heads=...)`.
    """
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise ArgumentError(f"batch must be a positive integer (items kept per call); got {batch!r}")
    if tokens is not None and (isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 1):
        raise ArgumentError(f"tokens must be None or a positive integer; got {tokens!r}")
    recorder = _Recorder(models, batch, tokens, self_resolutions, self_per_step, per_head)
    diffusion = models.get("diffusion")
    hook = diffusion.register_forward_pre_hook(_only_for(recorder), with_kwargs=True) if diffusion is not None else None
    try:
        with observe_attention(recorder):
            yield recorder.recording
    finally:
        if hook is not None:
            hook.remove()


def _only_for(recorder: _Recorder):
    """The U-Net pre-hook, acting only in the thread (context) where `recorder` observes."""
    from .attention import _observer

    def hook(module, args, kwargs):
        if _observer.get() is recorder:
            recorder.unet_called(module, args, kwargs)

    return hook


# --------------------------------------------------------------------------------------------------
# Heat maps
# --------------------------------------------------------------------------------------------------


def _chosen_steps(n_steps: int, steps) -> list[int]:
    """`steps`: None (all), a slice, or step indices (negative count from the end)."""
    if steps is None:
        return list(range(n_steps))
    if isinstance(steps, slice):
        return list(range(n_steps))[steps]
    return [s % n_steps for s in steps]


def token_heatmaps(recording: AttentionRecording, size: tuple[int, int], *, resolutions=None, steps=None,
                   start_token: str = "renormalize", item: int = 0, blocks=None, heads=None,
                   cutoff: float | None = None) -> torch.Tensor:
    r"""DAAM heat maps, one per recorded token: (T, H, W) for an image of `size` (H, W).

    $D_j = \sum_{\ell, t} \max(0, \operatorname{up}(\bar A^{\ell,t}_{\cdot,j}))$ over the blocks $\ell$
    whose map side is in `resolutions` (None: all; e.g. `(16,)`) and named in `blocks` (None: all),
    and over the steps in `steps` (None: all; a slice or indices). `heads`: None averages the heads;
    `{block: [head, ...]}` (a `per_head` recording) sums the maps of those heads of those blocks only.
    `start_token`: `"keep"` the raw weights, or `"renormalize"`: every pixel's weights without the
    start-of-text token, divided by their sum $\bar A_{p,j} / \sum_{k \ge 1} \bar A_{p,k}$ (token 0's
    map is then zero). `item`: which of the recorded batch items. `cutoff` (DAAM's $\tau$, 0.4 in the
    paper): zero every map where it is below `cutoff` times its maximum.
    """
    if start_token not in ("keep", "renormalize"):
        raise ArgumentError(f"start_token must be 'keep' or 'renormalize'; got {start_token!r}")
    if heads is not None and not recording.per_head:
        raise ArgumentError("heads= needs the maps of every head: record with record_attention(..., per_head=True)")
    chosen = [b for b in recording.blocks if recording.cross.get(b) and (blocks is None or b in blocks)
              and (heads is None or b in heads)
              and (resolutions is None or recording.sides[b][0] in resolutions or recording.sides[b][1] in resolutions)]
    if not chosen:
        raise ArgumentError(f"no recorded block matches resolutions={resolutions!r}, blocks={blocks!r}, heads={heads!r};"
                            f" recorded: { {b: recording.sides.get(b) for b in recording.blocks} }")
    total = torch.zeros(recording.cross[chosen[0]][0].shape[-3], *size)
    for block in chosen:
        maps = torch.stack([recording.cross[block][s][item] for s in _chosen_steps(len(recording.cross[block]), steps)])
        if recording.per_head:  # (S, H, T, h, w) -> (S, T, h, w): the mean, or the sum of the heads chosen
            maps = maps.mean(1) if heads is None else maps[:, list(heads[block])].sum(1)
        if start_token == "renormalize":  # (S, T, h, w): drop token 0, renormalize over the others
            maps = torch.cat([torch.zeros_like(maps[:, :1]), maps[:, 1:] / maps[:, 1:].sum(1, keepdim=True)], dim=1)
        total += F.interpolate(maps.sum(0)[None], size=tuple(size), mode="bicubic", align_corners=False)[0].clamp_min(0)
    if cutoff is not None:  # (T, H, W): keep what reaches cutoff x each token's maximum
        total = total * (total >= cutoff * total.flatten(1).max(1).values[:, None, None])
    return total


def word_tokens(tokenizer, prompt: str) -> list[tuple[str, list[int]]]:
    """The prompt's words and their token positions (start-of-text is position 0): a word that BPE
    splits into pieces owns all of them, e.g. `[("a", [1]), ("purple", [2]), ...]`."""
    bpe = tokenizer.tokenize(prompt)
    words, pieces = [], []
    for position, piece in enumerate(bpe, start=1):
        pieces.append(position)
        if piece.endswith("</w>") or position == len(bpe):
            words.append(("".join(bpe[p - 1] for p in pieces).removesuffix("</w>"), pieces))
            pieces = []
    return words


def word_heatmaps(recording: AttentionRecording, tokenizer, prompt: str, size, **options) -> dict[str, np.ndarray]:
    """One heat map per word of `prompt` (H, W), summed over its tokens, scaled to [0, 1] for display;
    `options` go to `token_heatmaps`. Repeated words get `word (2)`."""
    maps = token_heatmaps(recording, size, **options)
    result = {}
    for word, positions in word_tokens(tokenizer, prompt):
        heat = maps[positions].sum(0).numpy()
        key, n = word, 2
        while key in result:
            key, n = f"{word} ({n})", n + 1
        result[key] = heat / heat.max() if heat.max() > 0 else heat
    return result


# --------------------------------------------------------------------------------------------------
# Does a word's map land on its object? (the tiny model, single-object Shapes prompts)
# --------------------------------------------------------------------------------------------------

#: Aggregations compared by `localization_report`: token_heatmaps options, the same for both words or
#: per word ({"shape": ..., "colour": ...}); None is the flat map (the box's share of the image).
#: The heads of "tiny localizing heads" were picked on 24 calibration prompts (held-out split, seed 5,
#: image seeds 5000-5023): the tiny model's cross-attention localizes in a few heads only, and the
#: mean over heads washes them out.
TINY_CHOICES = {
    "flat map": None,
    "all blocks, all steps, SOT kept": {"start_token": "keep"},
    "all blocks, all steps, SOT renormalized": {"start_token": "renormalize"},
    "8x8 only, SOT kept": {"resolutions": (8,), "start_token": "keep"},
    "4x4 only, SOT kept": {"resolutions": (4,), "start_token": "keep"},
    "all blocks, late steps, SOT kept": {"start_token": "keep", "steps": slice(10, None)},
    "all blocks, early steps, SOT kept": {"start_token": "keep", "steps": slice(0, 10)},
    "block up.3 only, SOT kept": {"blocks": ("up.3",), "start_token": "keep"},
    "all blocks, all steps, SOT kept, cutoff 0.4": {"start_token": "keep", "cutoff": 0.4},
    "tiny localizing heads": {"shape": {"heads": {"up.3": [3], "down.1": [2]}, "start_token": "keep"},
                              "colour": {"heads": {"down.1": [2]}, "start_token": "keep", "steps": slice(10, None)}},
    "tiny localizing heads, cutoff 0.4": {
        "shape": {"heads": {"up.3": [3], "down.1": [2]}, "start_token": "keep", "cutoff": 0.4},
        "colour": {"heads": {"down.1": [2]}, "start_token": "keep", "steps": slice(10, None), "cutoff": 0.4}},
}
#: The aggregation that localizes on the tiny model (tests/test_inspect.py), per word kind.
TINY_LOCALIZING = TINY_CHOICES["tiny localizing heads, cutoff 0.4"]


def box_mask(centre: tuple[float, float], extent: float, size: int, margin: float) -> np.ndarray:
    """(size, size) bool: the square box of side `extent` (a fraction of the side) around `centre`
    (fractions), grown by `margin` pixels on every side."""
    ys, xs = np.mgrid[0:size, 0:size] + 0.5  # pixel centres
    half = extent * size / 2 + margin
    return (np.abs(xs - centre[0] * size) <= half) & (np.abs(ys - centre[1] * size) <= half)


def mass_inside(heat: np.ndarray, mask: np.ndarray) -> float:
    r"""The share of a non-negative map's mass inside `mask`: $\sum_{p \in M} D_p / \sum_p D_p$."""
    heat = np.clip(np.asarray(heat, dtype=np.float64), 0, None)
    return float(heat[mask].sum() / heat.sum()) if heat.sum() > 0 else 0.0


def localization_report(models: dict, prompts: list[str], seeds: list[int], choices: dict | None = None, *,
                        margin: float | None = None, tokenizer=None, threshold: float = 0.5) -> dict:
    """For single-object Shapes prompts: how much of the shape word's and the colour word's heat map
    lies inside the object's box, as the analyzer finds the object in the generated image, grown
    by `margin` pixels (default one latent pixel, the VAE's downscale) on every side.

    Generates the images with `sdlab.tiny.evaluate.generate_batch` (DPM++ 2M, 20 steps, the model's guidance)
    while recording (per head, the prompt tokens only). Returns
    `{choice: {"shape": {"mean": m, "at_least": f}, "colour": {...}}}`, `at_least` the fraction of
    prompts with at least `threshold` of the mass inside; a prompt whose object is not found counts 0.
    """
    from .tiny import analyzer
    from .tiny.data import parse_caption
    from .tiny.evaluate import generate_batch
    from .tokenizer import load_tokenizer

    tokenizer = tokenizer or load_tokenizer()
    choices = TINY_CHOICES if choices is None else choices
    scenes = [parse_caption(prompt) for prompt in prompts]
    if any(len(scene.objects) != 1 for scene in scenes):
        raise ArgumentError("localization_report takes single-object prompts, e.g. 'a small red circle on the left'")
    n_tokens = max(len(tokenizer.tokenize(prompt)) for prompt in prompts) + 2  # start, words, end
    with record_attention(models, batch=len(prompts), tokens=n_tokens, per_head=True) as recording:
        images = generate_batch(models, prompts, seeds, tokenizer=tokenizer)
    margin = models["decoder"].config.downscale if margin is None else margin
    size = images.shape[1]
    boxes = []
    for scene, image in zip(scenes, images):
        found = analyzer.match(scene.objects, analyzer.detect(image))[0]
        boxes.append(None if found is None else box_mask(found.centre, found.extent, size, margin))
    report = {}
    for name, choice in choices.items():
        report[name] = {}
        for kind in ("shape", "colour"):
            options = choice[kind] if choice is not None and kind in choice else choice
            shares = np.array([0.0 if box is None else mass_inside(
                np.ones((size, size)) if options is None else _word_map(
                    recording, tokenizer, prompt, getattr(scene.objects[0], kind), (size, size), item, options), box)
                for item, (prompt, scene, box) in enumerate(zip(prompts, scenes, boxes))])
            report[name][kind] = {"mean": float(shares.mean()), "at_least": float((shares >= threshold).mean())}
    return report


def _word_map(recording, tokenizer, prompt: str, word: str, size, item: int, options: dict) -> np.ndarray:
    """The heat map of one word of `prompt` (its tokens summed), (H, W)."""
    positions = [p for text, pieces in word_tokens(tokenizer, prompt) if text == word for p in pieces]
    return token_heatmaps(recording, size, item=item, **options)[positions].sum(0).numpy()
