r"""Automatic checks for the book's exercises: `check_<name>(answer, ...)`, one per gradable exercise.

Each check recomputes the right answer **with sdlab itself** (the attention of `sdlab.attention`,
the samplers of `sdlab.samplers`, the models of `sdlab.config`, the bundled tiny model, FLOPs
counted by `torch.utils.flop_counter`), never from a number typed in here, so a check cannot
drift from the package it grades.

How a check answers:

* a right answer prints one line that starts with `✓` and says what was checked (often with a
  figure to think about), and returns `None`;
* a wrong answer raises `AssertionError` whose message says what is wrong: which value, the
  value expected, and a hint. A teacher can grade a notebook by running its check cells
  (pytest or nbval count the `AssertionError` as a failure).

A student's *function* (an attention, a formula) is called on random inputs drawn from a fixed
seed and compared with sdlab's own at a tight tolerance. The exercises are in the chapters
(`:label: ex-N-k`); the reference solutions, each run through its check, are in `book/solutions`.

```python
from sdlab.exercises import check_compression_factor
check_compression_factor(48)   # ✓ 512×512×3 pixels -> 64×64×4 latents: 48× fewer numbers
```
"""

from __future__ import annotations

import functools
import math
import re

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from .attention import (
    SelfAttention,
    attention_backend,
    attention_probabilities,
    scaled_dot_product,
)
from .config import SD15, SMALL, TINY, SDConfig, UNetConfig, VAEConfig
from .diffusion import Diffusion, get_time_embedding

MODEL_NAMES = ("clip", "encoder", "decoder", "diffusion")


def _passed(message: str) -> None:
    print(f"✓ {message}")


def _expect(condition, message: str) -> None:
    """Raise the student's `AssertionError` with `message` unless `condition` holds."""
    if not condition:
        raise AssertionError(message)


def _number(answer, what: str) -> float:
    _expect(isinstance(answer, (int, float)) and not isinstance(answer, bool) or
            (torch.is_tensor(answer) and answer.numel() == 1), f"{what} must be one number; got {answer!r}")
    return float(answer)


def _close(answer: float, expected: float, what: str, rel: float = 1e-3, hint: str = "") -> None:
    _expect(math.isclose(answer, expected, rel_tol=rel, abs_tol=1e-12),
            f"{what}: got {answer:.6g}, expected {expected:.6g}" + (f"; {hint}" if hint else ""))


def _tensor(answer, shape, what: str) -> torch.Tensor:
    _expect(torch.is_tensor(answer), f"{what} must be a torch tensor; got {type(answer).__name__}")
    _expect(tuple(answer.shape) == tuple(shape), f"{what} has shape {tuple(answer.shape)}, expected {tuple(shape)}")
    return answer.detach().float()


def _same_tensor(answer: torch.Tensor, expected: torch.Tensor, what: str, atol: float = 1e-5, hint: str = "") -> None:
    answer = _tensor(answer, expected.shape, what)
    worst = (answer - expected).abs().max().item()
    _expect(worst <= atol, f"{what} differs from the expected values by up to {worst:.3g} (tolerance {atol:g})"
            + (f"; {hint}" if hint else ""))


def _random(*shape, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@functools.lru_cache(maxsize=1)
def tiny_models() -> dict:
    """The bundled tiny model on the CPU, in eval mode (loaded once; the checks of chapters 2, 3, 6)."""
    from .pipeline import default_models

    models = default_models("cpu")
    for model in models.values():
        model.eval()
    return models


@functools.lru_cache(maxsize=1)
def _tokenizer():
    from .tokenizer import load_tokenizer

    return load_tokenizer()


def _meta_flops(build, *inputs_shapes, depth: int = 2) -> FlopCounterMode:
    """Count the FLOPs of `build()(*inputs)` on the meta device (no memory, no time)."""
    with torch.device("meta"):
        model = build()
        inputs = [torch.empty(shape) for shape in inputs_shapes]
        with FlopCounterMode(display=False, depth=depth) as counter, torch.no_grad():
            model(*inputs)
    return counter


# ----- chapter 0: the map -----------------------------------------------------------------------


def unet_parameters(**changes) -> int:
    """The parameter count of SD1.5's U-Net with `UNetConfig` fields `changes` (built on the meta device)."""
    with torch.device("meta"):
        model = Diffusion(UNetConfig(**changes))
    return sum(p.numel() for p in model.parameters())


def check_unet_parameters(count, **changes) -> None:
    """Exercises 0.1 and 4.2: `count` is the number of parameters of `Diffusion(UNetConfig(**changes))`,
    e.g. `check_unet_parameters(n, base_channels=160)`."""
    expected, full = unet_parameters(**changes), unet_parameters()
    got = _number(count, "count")
    hint = "count every parameter: sum(p.numel() for p in model.parameters())"
    if got == expected / 1e6 or got == round(expected / 1e6, 1):
        hint = "give the count itself, not millions"
    _close(got, expected, f"parameters of UNetConfig({', '.join(f'{k}={v!r}' for k, v in changes.items())})", 1e-9, hint)
    _passed(f"{expected:,} parameters: {expected / full:.3f} of SD1.5's {full:,}")


def check_models_needed(text_to_image, image_to_image) -> None:
    """Exercise 0.2: the sets of model names (of `"clip"`, `"encoder"`, `"decoder"`, `"diffusion"`) that
    text-to-image and image-to-image generation use. Found by running one tiny step without each model."""
    from .pipeline import generate

    models, picture = tiny_models(), torch.zeros(3, 64, 64)
    for given, image, what in ((text_to_image, None, "text_to_image"), (image_to_image, picture, "image_to_image")):
        _expect(isinstance(given, (set, frozenset, list, tuple)) and set(given) <= set(MODEL_NAMES),
                f"{what} must be a set of names from {MODEL_NAMES}; got {given!r}")
        needed = set()
        for name in MODEL_NAMES:
            without = {k: v for k, v in models.items() if k != name}
            try:
                generate("a circle", models=without, input_image=image, n_inference_steps=1, seed=0, progress=False,
                         packed=False)
            except (KeyError, ValueError, TypeError):
                needed.add(name)
        missing, extra = needed - set(given), set(given) - needed
        _expect(not missing and not extra, f"{what}: " + "; ".join(
            [f"also needs {sorted(missing)}"] * bool(missing) + [f"does not use {sorted(extra)}"] * bool(extra)))
    _passed(f"text-to-image uses {sorted(set(text_to_image))}; image-to-image also the encoder")


def check_compression_factor(factor, config: SDConfig = SD15, size: int = 512) -> None:
    """Exercise 0.3: how many times fewer numbers the latents hold than the `size`×`size` RGB image."""
    vae = config.vae
    side = size // vae.downscale
    expected = (vae.in_channels * size * size) / (vae.latent_channels * side * side)
    got = _number(factor, "factor")
    _close(got, expected, "compression factor", hint=f"count numbers: {size}×{size}×{vae.in_channels} pixels "
           f"against the latents' {side}×{side}×{vae.latent_channels}" + (" (not just the side ratio)" if got == vae.downscale else ""))
    _passed(f"{size}×{size}×{vae.in_channels} pixels -> {side}×{side}×{vae.latent_channels} latents: {expected:g}× fewer numbers")


# ----- chapter 1: attention -----------------------------------------------------------------------


def check_unscaled_entropy(entropy) -> None:
    r"""Exercise 1.1: `entropy(q, k)` returns the mean entropy (in nats) of the rows of
    $\operatorname{softmax}(QK^\top)$, **without** the $1/\sqrt{d_k}$ factor; q, k: (B, H, L, d_k)."""
    lines = []
    for d_k in (8, 64, 512):
        q, k = _random(1, 2, 32, d_k, seed=d_k), _random(1, 2, 32, d_k, seed=d_k + 1)
        probabilities = attention_probabilities(q * math.sqrt(d_k), k)  # the scale undone: softmax(QK^T)
        expected = -(probabilities * probabilities.clamp_min(1e-30).log()).sum(-1).mean().item()
        scaled = attention_probabilities(q, k)
        with_scale = -(scaled * scaled.clamp_min(1e-30).log()).sum(-1).mean().item()
        got = _number(entropy(q, k), f"entropy(q, k) at d_k={d_k}")
        hint = ("that is the entropy *with* the 1/sqrt(d_k) factor; leave it out" if math.isclose(got, with_scale, rel_tol=1e-3)
                else "entropy of a row p: -sum(p * log p) over the keys (natural log), then the mean over rows")
        _close(got, expected, f"mean row entropy at d_k={d_k}", 1e-3, hint)
        lines.append(f"d_k={d_k}: {expected:.2f} nats (scaled: {with_scale:.2f})")
    _passed("; ".join(lines) + f"; uniform over 32 keys would be {math.log(32):.2f}")


def check_equivariance_error(error) -> None:
    """Exercise 1.2: `error(attend, x, perm)` returns max |attend(x[:, perm]) - attend(x)[:, perm]| for an
    attention `attend` (B, L, d) -> (B, L, d) and a permutation `perm` of the L positions."""
    torch.manual_seed(0)
    attention = SelfAttention(4, 32).eval()
    x, perm = _random(2, 10, 32, seed=1), torch.randperm(10, generator=torch.Generator().manual_seed(2))
    for name, attend in (("SelfAttention", attention), ("SelfAttention with the causal mask", lambda y: attention(y, causal_mask=True))):
        with torch.no_grad():
            expected = (attend(x[:, perm]) - attend(x)[:, perm]).abs().max().item()
            got = _number(error(attend, x, perm), f"error(...) for {name}")
        _expect(abs(got - expected) <= 1e-5 + 1e-3 * expected,
                f"for {name} your error is {got:.3g}, expected {expected:.3g}: permute the input of one call "
                f"and the output of the other, along the positions (dimension 1)")
    _passed("without a mask, attention commutes with permutations (error ~1e-7); the causal mask breaks it "
            f"({expected:.2f}): order must come from elsewhere")


def check_attention_macs(projections, scores_and_values, pixels: int = 4096, width: int = 320, heads: int = 8) -> None:
    """Exercise 1.3: multiply-adds of `SelfAttention(heads, width)` over `pixels` positions: those of the
    linear projections (q, k, v and the output) and those of $QK^\\top$ and $AV$ together.
    Measured with `FlopCounterMode` (2 FLOPs per multiply-add) on the explicit formula."""
    with attention_backend("math"):
        counts = _meta_flops(lambda: SelfAttention(heads, width), (1, pixels, width)).get_flop_counts()["Global"]
    linear = sum(v for op, v in counts.items() if "mm" in str(op) and "bmm" not in str(op)) // 2
    matrix = sum(v for op, v in counts.items() if "bmm" in str(op)) // 2
    for got, expected, what, hint in (
            (projections, linear, "projections", f"4 matrices of {width}×{width}, each applied at {pixels} positions"),
            (scores_and_values, matrix, "QK^T and AV",
             f"each is {pixels}×{pixels} dot products of length {width} (all heads together)")):
        value = _number(got, what)
        if value == 2 * expected:
            hint = "that counts FLOPs; a multiply-add is 2 FLOPs"
        _close(value, expected, f"multiply-adds of {what}", 1e-9, hint)
    _passed(f"projections {linear / 1e9:.2f} G, QK^T and AV {matrix / 1e9:.2f} G multiply-adds: the L² terms "
            f"dominate ({matrix / linear:.1f}×); the fused kernel saves the {pixels}×{pixels} matrix per head, not the work")


def check_padding_mask(masked_attention) -> None:
    """Exercise 1.4: `masked_attention(q, k, v, padding)` with q: (B, H, Lq, d_k), k, v: (B, H, Lk, d_k) and
    `padding` (B, Lk) bool, True where a key is padding. Compared with `scaled_dot_product_attention`."""
    q, k, v = _random(2, 3, 5, 16, seed=3), _random(2, 3, 7, 16, seed=4), _random(2, 3, 7, 16, seed=5)
    padding = torch.tensor([[False] * 7, [False] * 4 + [True] * 3])
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=~padding[:, None, None, :])  # True = may attend
    got = masked_attention(q, k, v, padding)
    unmasked = scaled_dot_product(q, k, v)[0]
    hint = ("that is attention without the mask" if torch.is_tensor(got) and got.shape == unmasked.shape
            and torch.allclose(got, unmasked, atol=1e-5) else
            "set the scores of padded keys to -inf before the softmax (True in `padding` = padding)")
    _same_tensor(got, expected, "masked_attention(q, k, v, padding)", 1e-5, hint)
    kept = scaled_dot_product(q[1:], k[1:, :, :4], v[1:, :, :4])[0]  # the same as attending to the real keys only
    _passed(f"matches scaled_dot_product_attention(attn_mask=...); with 3 padded keys it is attention over the 4 real "
            f"ones (max difference {(expected[1:] - kept).abs().max().item():.1e})")


# ----- chapter 2: CLIP ----------------------------------------------------------------------------------


def check_long_word(word) -> None:
    """Exercise 2.1: `word`, one English word (letters only), that BPE cuts into 3 or more tokens."""
    _expect(isinstance(word, str) and re.fullmatch(r"[A-Za-z]+", word.strip() or "-"),
            f"give one word of letters only; got {word!r}")
    pieces = _tokenizer().tokenize(word.strip())
    _expect(len(pieces) >= 3, f"{word!r} is {len(pieces)} token{'s' * (len(pieces) != 1)} ({' + '.join(pieces)}); "
            "find a word that takes 3 or more (long or rare words do)")
    _passed(f"{word!r} -> {len(pieces)} tokens: {' + '.join(pieces)}")


def _word_token_spans(prompt: str) -> list[tuple[str, int, int]]:
    """(word, first token index, one past its last) for each word the tokenizer cuts `prompt` into."""
    from .tokenizer import byte_decode, normalize, pre_tokenize

    tokenizer, spans, start = _tokenizer(), [], 0
    for word in pre_tokenize(normalize(prompt)):
        n = len(tokenizer.bpe(word))
        spans.append((byte_decode(word), start, start + n))
        start += n
    return spans


def check_truncation(prompt, unseen) -> None:
    """Exercise 2.2: a `prompt` longer than the text encoder reads, and the list of its words (in order,
    as the tokenizer cuts them: lower case) that Stable Diffusion never sees. Punctuation is ignored."""
    _expect(isinstance(prompt, str), f"prompt must be a string; got {type(prompt).__name__}")
    tokenizer = _tokenizer()
    room = tokenizer.model_max_length - 2  # BOS and EOS take two of the places
    spans = _word_token_spans(prompt)
    n_tokens = spans[-1][2] if spans else 0
    _expect(n_tokens > room, f"the prompt is {n_tokens} tokens; it needs more than {room} "
            f"({tokenizer.model_max_length} with the start and end tokens) to be cut")

    def words(items):
        return [w.lower() for w in items if re.search(r"\w", w)]

    expected = words(w for w, first, _ in spans if first >= room)
    cut = [w for w, first, end in spans if first < room < end]
    got = words(unseen) if isinstance(unseen, (list, tuple)) else None
    _expect(got == expected, f"the words never seen are the {len(expected)} from token {room + 1} on: "
            f"{expected[:3]} ... {expected[-3:]}; you gave {len(got) if got is not None else unseen!r} "
            f"{'words' if got is not None else ''}" + (f" (and {cut[0]!r} is cut in the middle)" if cut else ""))
    _passed(f"{n_tokens} tokens: the text encoder reads {room}; {len(expected)} words are never seen"
            + (f", and {cut[0]!r} only in part" if cut else ""))


def check_unmasked_agreement(positions, n_tokens: int = 77) -> None:
    """Exercise 2.3: the positions (0-based) at which one `CLIPLayer` gives the same output with and without
    its causal mask, on a sequence of `n_tokens`."""
    from .clip import CLIPLayer

    with torch.random.fork_rng():
        torch.manual_seed(0)
        layer = CLIPLayer(4, 64).eval()
    x = _random(1, n_tokens, 64, seed=6)
    with torch.no_grad():
        causal = layer(x)
        layer_forward = layer.attention.forward
        layer.attention.forward = lambda h, causal_mask=False: layer_forward(h, causal_mask=False)
        try:
            free = layer(x)
        finally:
            del layer.attention.forward
    same = ((causal - free).abs().amax(-1) <= 1e-5)[0].nonzero().flatten().tolist()
    got = sorted(int(p) for p in positions) if isinstance(positions, (list, tuple, set, range)) else positions
    _expect(got == same, f"the positions that agree are {same}, you gave {got!r}: which query already sees every key "
            "under the causal mask?")
    _passed(f"only position {same} agrees: it attends to all {n_tokens} tokens either way")


def check_causal_prefix(prompt_a, prompt_b, first_changed) -> None:
    """Exercise 2.4: two prompts that differ in a later word, and the first position (0-based, counting the
    start token) at which the tiny model's CLIP output differs between them."""
    tokenizer, clip = _tokenizer(), tiny_models()["clip"]
    ids = torch.tensor(tokenizer([prompt_a, prompt_b], padding="max_length", max_length=clip.config.n_token,
                                 truncation=True).input_ids)
    differ = (ids[0] != ids[1]).nonzero().flatten()
    _expect(len(differ) > 0, "the two prompts give the same tokens; change a later word of one")
    with torch.no_grad():
        out = clip(ids)  # (2, 77, d)
    changed = ((out[0] - out[1]).abs().amax(-1) > 1e-6).nonzero().flatten()
    first = int(changed[0])
    _expect((out[0, :first] == out[1, :first]).all(), "positions before the first different token changed: "
            "is the causal mask in place?")
    _expect(isinstance(first_changed, int) and first_changed == first,
            f"the first position whose output differs is {first} (the first different token, "
            f"{tokenizer.decode([int(ids[0, first])])!r} vs {tokenizer.decode([int(ids[1, first])])!r}); "
            f"you gave {first_changed!r}")
    _passed(f"positions 0..{first - 1} are bit-identical; from {first} on they differ (the causal mask)")


# ----- chapter 3: the VAE ----------------------------------------------------------------------------


def check_posterior_std(value, images) -> None:
    r"""Exercise 3.1: the mean of the posterior standard deviation $\sqrt v = e^{\frac12 \log v}$ of the tiny
    VAE's encoder over `images` (B, 3, H, W) in [-1, 1]."""
    encoder = tiny_models()["encoder"]
    with torch.no_grad():
        mean, log_variance = encoder.moments(images)
    expected = torch.exp(0.5 * log_variance).mean().item()
    got = _number(value, "value")
    hint = ("that is the variance v; take its square root" if math.isclose(got, log_variance.exp().mean().item(), rel_tol=1e-3)
            else "encoder.moments(images) returns the mean and log v")
    _close(got, expected, "mean posterior std", 1e-3, hint)
    _passed(f"mean sqrt(v) = {expected:.3g} against a latent std of {mean.std().item():.3g}: the noise is "
            f"{expected / mean.std().item():.1%} of the signal")


def check_interpolation(decoded, z_a, z_b) -> None:
    """Exercise 3.2: `decoded` (n, 3, H, W), the tiny decoder's pictures of $(1 - t) z_a + t z_b$ for
    `n` values of t evenly from 0 to 1 (`torch.linspace(0, 1, n)`); z_a, z_b: (1, 4, h, w)."""
    _expect(torch.is_tensor(decoded) and decoded.ndim == 4, "decoded must be a (n, 3, H, W) tensor")
    t = torch.linspace(0, 1, decoded.shape[0]).view(-1, 1, 1, 1)  # (n, 1, 1, 1)
    with torch.no_grad():
        expected = tiny_models()["decoder"]((1 - t) * z_a + t * z_b)
    _same_tensor(decoded, expected, "the decoded path", 1e-4,
                 "decode (1 - t) * z_a + t * z_b, t = torch.linspace(0, 1, n), first picture z_a")
    _passed(f"{decoded.shape[0]} pictures along the straight line from z_a to z_b")


def check_channel_ablation(decoded, latents) -> None:
    """Exercise 3.3: `decoded` (C, 3, H, W): picture c is the tiny decoder's output for `latents`
    (1, C, h, w) with channel c set to zero."""
    channels = latents.shape[1]
    ablated = latents.repeat(channels, 1, 1, 1)  # (C, C, h, w): copy c loses channel c
    ablated[torch.arange(channels), torch.arange(channels)] = 0
    with torch.no_grad():
        expected = tiny_models()["decoder"](ablated)
    _same_tensor(decoded, expected, "the pictures", 1e-4, "picture c: channel c of the latents set to 0, the others kept")
    with torch.no_grad():
        full = tiny_models()["decoder"](latents)
    change = (expected - full).abs().mean(dim=(1, 2, 3))
    _passed("mean change per zeroed channel: " + ", ".join(f"{c}: {v:.3f}" for c, v in enumerate(change.tolist())))


def check_scale_factor(scale, images) -> None:
    """Exercise 3.4: the scale factor (1 / std of posterior samples $z = \\mu + \\sqrt v\\, \\epsilon$, unscaled)
    that you measured with the tiny VAE on `images` (N ≥ 64 Shapes pictures, (N, 3, 64, 64))."""
    _expect(torch.is_tensor(images) and images.ndim == 4 and images.shape[0] >= 64,
            "pass the images you measured: a (N, 3, 64, 64) tensor, N >= 64")
    with torch.no_grad():
        mean, log_variance = tiny_models()["encoder"].moments(images)
    z = mean + torch.exp(0.5 * log_variance) * _random(*mean.shape, seed=7)
    expected, got = 1 / z.std().item(), _number(scale, "scale")
    hint = "the factor is 1 / std (latents * factor have std 1)" if math.isclose(got, 1 / expected, rel_tol=0.05) else \
        "std of all the unscaled latent values (encoder.moments), then 1 / std"
    _close(got, expected, "scale factor", 0.03, hint)
    _passed(f"1 / std = {expected:.3f} (±3%: the noise draw); the shipped tiny model uses "
            f"{tiny_models()['decoder'].config.scale_factor:.3f}, SD1.5 {SD15.vae.scale_factor}")


# ----- chapter 4: the U-Net ----------------------------------------------------------------------------


def _block_outputs(model: Diffusion, latents, context, time) -> dict:
    """Output of every block of `model.unet` (encoders.i.j, bottleneck.j, decoders.i.j), in running order."""
    outputs, hooks = {}, []
    for name, module in model.named_modules():
        if re.fullmatch(r"unet\.(encoders\.\d+|decoders\.\d+|bottleneck)\.\d+", name):
            hooks.append(module.register_forward_hook(lambda m, i, o, name=name: outputs.__setitem__(name, o)))
    try:
        with torch.no_grad():
            model(latents, context, time)
    finally:
        for hook in hooks:
            hook.remove()
    return outputs


def check_first_differing_layers(time_layer, context_layer, config: UNetConfig = SMALL.unet) -> None:
    """Exercise 4.1: the first block of the U-Net (its name in `diffusion.named_modules()`, e.g.
    `"unet.encoders.1.0"`) whose output changes with the timestep alone, and with the context alone."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = Diffusion(config).eval()
    latents, context = _random(1, config.in_channels, 16, 16, seed=8), _random(1, 77, config.d_context, seed=9)
    t_a, t_b = get_time_embedding(10, config.time_dim), get_time_embedding(900, config.time_dim)
    base = _block_outputs(model, latents, context, t_a)
    for given, other, what in ((time_layer, _block_outputs(model, latents, context, t_b), "timestep"),
                               (context_layer, _block_outputs(model, latents, _random(1, 77, config.d_context, seed=10), t_a), "context")):
        first = next(name for name in base if not torch.equal(base[name], other[name]))
        kind = type(dict(model.named_modules())[first]).__name__
        _expect(given == first, f"with another {what} the first block that changes is {first!r} (a {kind}); you gave {given!r}")
    _passed("the timestep enters at the first residual block, the context at the first attention block")


def check_time_frequencies(fastest_period, slowest_period, dim: int = 320) -> None:
    r"""Exercise 4.4: the periods, in timesteps, of the fastest and the slowest sinusoid of
    `get_time_embedding(t, dim)` (read off the embedding: $\omega_i$ = angle of (cos, sin) at t = 1)."""
    e = get_time_embedding(1, dim)[0]  # (dim,): cos(ω_i), then sin(ω_i)
    omegas = torch.atan2(e[dim // 2:].double(), e[: dim // 2].double())  # every ω_i <= 1 < π: no wrap-around
    fastest, slowest = 2 * math.pi / omegas.max().item(), 2 * math.pi / omegas.min().item()
    for got, expected, what in ((fastest_period, fastest, "fastest"), (slowest_period, slowest, "slowest")):
        value = _number(got, f"{what}_period")
        _close(value, expected, f"period of the {what} sinusoid", 1e-3,
               "a period is 2π / ω (not ω itself)" if math.isclose(value, 2 * math.pi / expected, rel_tol=1e-3) else
               "ω_i = 10000^(-i / (dim/2)), i = 0 .. dim/2 - 1")
    _passed(f"periods from {fastest:.2f} to {slowest:,.0f} timesteps: the slow ones never repeat over 0..999")


# ----- chapter 5: samplers ----------------------------------------------------------------------------


def check_alphas_cumprod(alphas_cumprod, beta_start: float = 1e-4, beta_end: float = 0.02,
                         beta_schedule: str = "linear") -> None:
    r"""Exercise 5.1: your $\bar\alpha_t = \prod_{s \le t} (1 - \beta_s)$, t = 0 .. 999, for the schedule
    (`"linear"`: $\beta$ evenly from `beta_start` to `beta_end`; `"scaled_linear"`: $\sqrt\beta$ evenly)."""
    from .ddpm import DDPMSampler

    sampler = DDPMSampler(beta_start=beta_start, beta_end=beta_end, beta_schedule=beta_schedule)
    expected = sampler.alphas_cumprod
    got = torch.as_tensor(alphas_cumprod).double().flatten() if not torch.is_tensor(alphas_cumprod) else alphas_cumprod
    hint = "the cumulative product of 1 - beta (torch.cumprod), not of beta"
    if torch.is_tensor(got) and got.shape == expected.shape and torch.allclose(got.float(), sampler.alphas, atol=1e-6):
        hint = "that is alpha_t = 1 - beta_t; take the cumulative product"
    _same_tensor(got, expected, f"alphas_cumprod ({beta_schedule}, {beta_start:g} to {beta_end:g})", 1e-5, hint)
    sd = DDPMSampler().alphas_cumprod
    _passed(f"ᾱ_999 = {expected[-1].item():.2e} here, {sd[-1].item():.2e} with SD1.5's scaled_linear "
            f"0.00085..0.012: the linear schedule destroys more signal")


def check_predict_x0(predict) -> None:
    r"""Exercise 5.2: `predict(x_t, eps, alpha_bar)` returns
    $\hat x_0 = (x_t - \sqrt{1 - \bar\alpha_t}\,\epsilon) / \sqrt{\bar\alpha_t}$; compared with `schedule.predict_x0`."""
    from .schedule import predict_x0

    x_t, eps = _random(4, 2, seed=11), _random(4, 2, seed=12)
    for alpha_bar in (0.9991, 0.5, 0.0047):
        a = torch.tensor(alpha_bar)
        expected = predict_x0(eps, x_t, a.sqrt(), (1 - a).sqrt())
        got = predict(x_t, eps, a)
        swapped = torch.is_tensor(got) and got.shape == expected.shape and \
            torch.allclose(got, (x_t - a.sqrt() * eps) / (1 - a).sqrt(), atol=1e-5)
        _same_tensor(got, expected, f"x̂₀ at ᾱ = {alpha_bar}", 1e-4,
                     "the square roots are swapped: x_t = sqrt(ᾱ) x_0 + sqrt(1 - ᾱ) ε" if swapped else
                     "solve x_t = sqrt(ᾱ) x_0 + sqrt(1 - ᾱ) ε for x_0")
    _passed("x̂₀ matches sdlab.schedule.predict_x0 from ᾱ = 0.999 to 0.005")


def _injected_std(make, timestep, x, eps) -> float:
    """The std of the fresh noise one `step` adds: two generators, (out_1 - out_2) / (z_1 - z_2)."""
    from .schedule import randn

    outs, draws = [], []
    for seed in (1, 2):
        sampler = make(torch.Generator().manual_seed(seed))
        outs.append(sampler.step(timestep, x, eps))
        draws.append(randn(x.shape, torch.Generator().manual_seed(seed)))
    return ((outs[0] - outs[1]) / (draws[0] - draws[1])).median().item()


def check_ddim_sigma(sigma) -> None:
    r"""Exercise 5.3: `sigma(alpha_bar, alpha_bar_prev, eta)`, the std $\sigma_t$ of the noise a DDIM step from
    t to t' adds (eq. 16). Compared with the noise sdlab's `DDIMSampler` injects, and at η = 1 with `DDPMSampler`'s."""
    from .samplers import make_sampler

    x, eps = _random(1, 4, 4, 4, seed=13), _random(1, 4, 4, 4, seed=14)
    for eta in (0.5, 1.0):
        def make(g, eta=eta):
            sampler = make_sampler("ddim", g, eta=eta)
            sampler.set_inference_timesteps(10)
            return sampler
        probe = make(None)
        for t in probe.timesteps[:-1].tolist():
            t_prev = t - probe.num_training_steps // probe.num_inference_steps
            expected = _injected_std(make, t, x, eps)
            got = _number(sigma(probe.alphas_cumprod[t], probe.alphas_cumprod[t_prev], eta), "sigma(...)")
            _close(got, expected, f"σ at t={t} -> {t_prev}, η={eta}", 1e-3,
                   "σ = η sqrt((1 - ᾱ') / (1 - ᾱ)) sqrt(1 - ᾱ / ᾱ')")

    def ddpm(g):
        sampler = make_sampler("ddpm", g)
        sampler.set_inference_timesteps(10)
        return sampler
    t, t_prev = probe.timesteps[3].item(), probe.timesteps[4].item()
    ddpm_std = _injected_std(ddpm, t, x, eps)
    _expect(math.isclose(ddpm_std, float(sigma(probe.alphas_cumprod[t], probe.alphas_cumprod[t_prev], 1.0)), rel_tol=1e-3),
            "internal: DDPM's noise differs from DDIM's at η = 1")
    _passed(f"σ matches DDIMSampler; at η = 1 it is DDPM's sqrt(β̃) ({ddpm_std:.4f} at t={t}): DDPM on a reduced "
            "schedule is DDIM with η = 1")


# ----- chapter 6: the pipeline ------------------------------------------------------------------------


def check_negative_prompt(prompt, uncond_prompt, colour, seeds=range(4)) -> None:
    """Exercise 6.1: a `prompt` that names no colour and a negative prompt `uncond_prompt` that keeps
    `colour` out of the tiny model's pictures for every seed of `seeds`, where the empty negative lets it in."""
    from .tiny.data import PALETTE

    _expect(colour in PALETTE, f"colour must be one of the Shapes colours {sorted(PALETTE)}; got {colour!r}")
    _expect(colour not in prompt.lower(), f"the prompt names {colour!r} itself; name no colour in it")
    with_negative, without = _colours(prompt, uncond_prompt, seeds), _colours(prompt, "", seeds)
    _expect(any(colour in c for c in without), f"without a negative prompt no picture of {prompt!r} is {colour} "
            f"for seeds {list(seeds)} ({[sorted(c) for c in without]}): pick a colour that shows up")
    bad = [s for s, c in zip(seeds, with_negative) if colour in c]
    _expect(not bad, f"with the negative prompt {uncond_prompt!r}, seeds {bad} still give {colour} "
            f"({[sorted(c) for c in with_negative]}); name the colour in a caption-like negative")
    _passed(f"{colour} in {sum(colour in c for c in without)}/{len(without)} pictures without the negative prompt, "
            f"in none with it: {[sorted(c) for c in with_negative]}")


def _batch_images(prompts: list[str], sampler_name: str, steps: int, negative: str = "", seeds=None) -> list:
    """The tiny model's pictures of `prompts` with the negative prompt `negative`, in one batch (image i from
    `seeds[i]`, default i), at the model's default size and guidance, on one CPU thread (faster for it)."""
    from .pipeline import decode, denoise, encode_prompts, to_uint8
    from .samplers import make_sampler
    from .schedule import randn

    models, n = tiny_models(), len(prompts)
    defaults = models["diffusion"].sampling
    generators = [torch.Generator().manual_seed(seed) for seed in (seeds if seeds is not None else range(n))]
    sampler = make_sampler(sampler_name, generators)
    sampler.set_inference_timesteps(steps)
    side = defaults.height // models["decoder"].config.downscale
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.no_grad():
            context = encode_prompts(_tokenizer(), models["clip"], [*prompts, *[negative] * n], "cpu")  # (2n, 77, d)
            latents = randn((n, 4, side, side), generators) * sampler.init_noise_sigma  # (n, 4, h, w)
            latents = denoise(models["diffusion"], sampler, latents, context, defaults.cfg_scale)
            return list(to_uint8(decode(models["decoder"], latents)))
    finally:
        torch.set_num_threads(threads)


def _colours(prompt: str, negative: str, seeds) -> list[set]:
    """The colours the analyzer sees in the tiny model's picture of `prompt` (negative prompt `negative`) per seed."""
    from .tiny import analyzer

    defaults = tiny_models()["diffusion"].sampling
    images = _batch_images([prompt] * len(seeds), defaults.sampler, defaults.steps, negative, list(seeds))
    return [{obj.colour for obj in analyzer.detect(image)} for image in images]


@functools.lru_cache(maxsize=32)
def _prompts_right(sampler_name: str, steps: int, n_prompts: int) -> int:
    """How many of `n_prompts` held-out prompts the tiny model gets entirely right (the analyzer's `all`)."""
    from .tiny import analyzer, data

    prompts = data.heldout_prompts(n_prompts, seed=1)
    images = _batch_images(prompts, sampler_name, steps)
    return int(sum(analyzer.score(p, image)["all"] for p, image in zip(prompts, images)))


def check_enough_steps(sampler_name, steps, n_prompts: int = 8) -> None:
    """Exercise 6.2: `steps` of `sampler_name` are enough when the tiny model (at its default guidance) gets
    as many of `n_prompts` held-out prompts entirely right (the analyzer's `all`) as at its default number
    of steps (20), less one."""
    full = tiny_models()["diffusion"].sampling.steps
    _expect(isinstance(steps, int) and 1 <= steps <= full, f"steps must be an integer from 1 to {full}; got {steps!r}")
    reference, got = _prompts_right(sampler_name, full, n_prompts), _prompts_right(sampler_name, steps, n_prompts)
    _expect(got >= reference - 1, f"{sampler_name} at {steps} steps gets {got}/{n_prompts} prompts right, against "
            f"{reference}/{n_prompts} at {full}: use more steps")
    _passed(f"{sampler_name}: {got}/{n_prompts} right at {steps} steps, {reference}/{n_prompts} at {full}")


# ----- chapter 7: training ------------------------------------------------------------------------------


def check_loss_per_bucket(bucket_means, num_training_steps: int = 1000) -> None:
    """Exercise 7.2: `bucket_means(timesteps, losses, n_buckets)` returns the mean loss in each of
    `n_buckets` equal ranges of the timesteps 0 .. 999 (bucket i: i * 1000 / n_buckets <= t < (i + 1) * ...)."""
    g = torch.Generator().manual_seed(15)
    timesteps = torch.randint(0, num_training_steps, (500,), generator=g)
    losses = torch.rand(500, generator=g) + timesteps / num_training_steps
    for n_buckets in (10, 4):
        index = timesteps * n_buckets // num_training_steps  # (500,) bucket of each sample
        expected = torch.zeros(n_buckets).index_add_(0, index, losses) / torch.bincount(index, minlength=n_buckets)
        got = bucket_means(timesteps, losses, n_buckets)
        sums = torch.zeros(n_buckets).index_add_(0, index, losses)
        hint = "that is the sum per bucket; divide by the count" if torch.is_tensor(got) and got.shape == sums.shape \
            and torch.allclose(got.float(), sums, atol=1e-4) else "bucket of t: t * n_buckets // 1000"
        _same_tensor(torch.as_tensor(got), expected, f"bucket means ({n_buckets} buckets)", 1e-5, hint)
    _passed("the bucket means are right")


def check_vae_downsampling(latent_shape, unet_flops_ratio, channel_mult=(1, 2, 4), image_size: int = 64) -> None:
    """Exercise 7.3: the latent shape (C, h, w) of a `image_size`² picture with the tiny VAE's `channel_mult`
    changed, and how many times the FLOPs of one tiny U-Net call grow against the 8× VAE's latents."""
    vae = VAEConfig(**{**TINY.vae.__dict__, "channel_mult": tuple(channel_mult)})
    from .encoder import VAE_Encoder

    with torch.device("meta"):
        shape = tuple(VAE_Encoder(vae).moments(torch.empty(1, 3, image_size, image_size))[0].shape[1:])
    _expect(tuple(latent_shape) == shape, f"the latents are {shape} (a {vae.downscale}× down-sampling: "
            f"{len(vae.channel_mult) - 1} stride-2 stages); you gave {tuple(latent_shape)}")
    unet, d = TINY.unet, TINY.clip.n_embd

    def flops(side):
        return _meta_flops(lambda: Diffusion(unet), (1, unet.in_channels, side, side), (1, 77, d),
                           (1, unet.time_dim)).get_total_flops()
    ratio = flops(shape[-1]) / flops(image_size // TINY.vae.downscale)
    _close(_number(unet_flops_ratio, "unet_flops_ratio"), ratio, "U-Net FLOPs ratio", 0.02,
           "count both with FlopCounterMode; attention grows with the square of the pixels")
    _passed(f"latents {shape}: {ratio:.2f}× the U-Net FLOPs of the 8× VAE's {TINY.vae.latent_channels}×8×8")


# ----- chapter 8: speed -----------------------------------------------------------------------------------


def check_score_bytes(n_bytes, queries: int, pixels: int = 4096, heads: int = 8, dtype=torch.float32) -> None:
    """Exercises 8.1 and 8.4: the bytes of the attention scores of `queries` queries against `pixels` keys in
    `heads` heads (batch 1), as `attention_probabilities` makes them on a slice of that many queries."""
    with torch.device("meta"):
        q, k = torch.empty(1, heads, queries, 40, dtype=dtype), torch.empty(1, heads, pixels, 40, dtype=dtype)
        scores = attention_probabilities(q, k)
    expected = scores.numel() * scores.element_size()
    got = _number(n_bytes, "n_bytes")
    hint = f"{dtype} takes {scores.element_size()} bytes a number" if math.isclose(got, scores.numel(), rel_tol=1e-9) \
        else f"{queries} × {pixels} scores per head, {heads} heads"
    _close(got, expected, f"bytes of the scores ({queries} queries)", 1e-9, hint)
    _passed(f"{expected / 2**20:,.0f} MiB of scores for {queries} queries against {pixels} keys in {heads} heads")


def check_decoder_flops(flops, size: int = 512) -> None:
    """Exercise 8.2: the FLOPs (`FlopCounterMode`) of SD1.5's VAE decoder for one `size`² picture."""
    from .decoder import VAE_Decoder

    side = size // SD15.vae.downscale
    expected = _meta_flops(lambda: VAE_Decoder(SD15.vae), (1, 4, side, side)).get_total_flops()
    unet = _meta_flops(lambda: Diffusion(SD15.unet), (2, 4, side, side), (2, 77, 768), (2, 320)).get_total_flops()
    got = _number(flops, "flops")
    _close(got, expected, f"decoder FLOPs at {size}²", 1e-6,
           "that is multiply-adds; FlopCounterMode counts 2 FLOPs each" if math.isclose(got * 2, expected, rel_tol=1e-6)
           else f"decode latents of (1, 4, {side}, {side})")
    _passed(f"decoder {expected / 1e12:.2f} TFLOPs against {unet / 1e12:.2f} for a guided U-Net step (batch 2): "
            "its convolutions run at full resolution")


def check_costliest_level(side, size: int = 512) -> None:
    """Exercise 8.4: the side of the latents (64, 32, 16 or 8 at 512²) at whose level of SD1.5's U-Net the
    blocks (encoders, bottleneck, decoders) spend the most FLOPs, for one `size`² picture."""
    latent = size // SD15.vae.downscale
    model_sides = {}
    with torch.device("meta"):
        model = Diffusion(SD15.unet)
        hooks = [m.register_forward_pre_hook(lambda m, args, name=name: model_sides.__setitem__(name, args[0].shape[-1]))
                 for name, m in model.named_modules() if re.fullmatch(r"unet\.(encoders|decoders)\.\d+|unet\.bottleneck", name)]
        with FlopCounterMode(display=False, depth=3) as counter, torch.no_grad():
            model(torch.empty(1, 4, latent, latent), torch.empty(1, 77, 768), torch.empty(1, 320))
        for hook in hooks:
            hook.remove()
    per_level: dict[int, float] = {}
    for name, at in model_sides.items():
        per_level[at] = per_level.get(at, 0) + sum(counter.get_flop_counts().get(f"Diffusion.{name}", {}).values())
    costliest = max(per_level, key=per_level.get)
    shares = ", ".join(f"{s}²: {v / sum(per_level.values()):.0%}" for s, v in sorted(per_level.items(), reverse=True))
    _expect(side == costliest, f"the costliest level is the {costliest}×{costliest} one ({shares}); you gave {side!r}")
    _passed(f"the {costliest}×{costliest} level costs most ({shares})")
