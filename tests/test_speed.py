"""The fast and low-memory paths compute what the plain ones do (equality only; no timings here)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from sdlab import pipeline
from sdlab.attention import (CrossAttention, SelfAttention, attention_backend, blocked_dot_product, blocked_is_faster,
                             scaled_dot_product, sliced_dot_product)
from sdlab.diffusion import get_time_embedding
from small import SMALL, small_models


def max_diff(a, b) -> float:
    return (a.double() - b.double()).abs().max().item()


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("slice_size", [1, 7, 16, 100])
def test_three_backends_agree(causal, slice_size):
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 37, 16) for _ in range(3))
    if not causal:
        k, v = k[:, :, :21], v[:, :, :21]  # cross-attention: fewer keys than queries
    with attention_backend("math"):
        expected, _ = scaled_dot_product(q, k, v, causal)
    with attention_backend("sdpa"):
        fused, _ = scaled_dot_product(q, k, v, causal)
    with attention_backend("sliced", slice_size):
        sliced, _ = scaled_dot_product(q, k, v, causal)
    with attention_backend("blocked"):
        blocked, _ = scaled_dot_product(q, k, v, causal)
    assert max_diff(fused, expected) <= 1e-6
    assert max_diff(sliced, expected) <= 1e-6
    assert max_diff(blocked, expected) <= 1e-6
    assert max_diff(sliced_dot_product(q, k, v, causal, slice_size), expected) <= 1e-6
    # blocks of slice_size queries (block_scores / Lk of them), the last one shorter
    assert max_diff(blocked_dot_product(q, k, v, causal, block_scores=slice_size * k.shape[-2]), expected) <= 1e-6


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("causal", [False, True])
def test_blocked_attention_subtracts_the_row_maximum_where_exp_could_overflow(dtype, causal):
    """Scales 1 and 2: every score is bounded below EXP_BOUND, so float32 skips the maximum's pass
    (float16 never does: its exp overflows above 11, and scale 2 reaches 17.5); scale 12: scores up to
    630, whose exp overflows float32 too. Blocked is as close to the float64 formula as the explicit
    formula in the same dtype."""
    from sdlab.attention import EXP_BOUND

    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 40, 16) for _ in range(3))
    mask = torch.ones(40, 40, dtype=torch.bool).triu(1) if causal else torch.zeros(40, 40, dtype=torch.bool)
    for scale in (1.0, 2.0, 12.0):
        qs, ks = q * scale, k * scale
        bound = float(qs.norm(dim=-1).amax() * (ks - ks.mean(dim=-2, keepdim=True)).norm(dim=-1).amax()) / 4
        assert (bound < EXP_BOUND) == (scale < 12)
        scores = (qs.double() @ ks.double().transpose(-1, -2) / 4).masked_fill(mask, float("-inf"))
        exact = torch.softmax(scores, dim=-1) @ v.double()
        ours = blocked_dot_product(qs.to(dtype), ks.to(dtype), v.to(dtype), causal, block_scores=16 * 40)
        with attention_backend("math"):
            formula, _ = scaled_dot_product(qs.to(dtype), ks.to(dtype), v.to(dtype), causal)
        assert torch.isfinite(ours).all()
        assert max_diff(ours, exact) <= 1.5 * max_diff(formula, exact) + (1e-6 if dtype == torch.float32 else 2e-3)


def test_auto_runs_blocked_attention_in_bf16_on_the_cpu_over_many_keys():
    """"auto" (the default) is the fused kernel, except bf16 CPU attention over >= 256 keys where oneDNN
    has native bf16: blocked there."""
    from sdlab import attention
    from sdlab.packing import available

    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 300, 40) for _ in range(3))
    assert attention.current_backend()[0] == "auto"
    native = available(torch.bfloat16)  # AVX512-BF16 or AMX
    assert blocked_is_faster(q.bfloat16(), k.bfloat16()) == native
    assert not blocked_is_faster(q, k)  # float32: the fused kernel
    assert not blocked_is_faster(q.bfloat16(), k[:, :, :77].bfloat16())  # 77 context tokens: the fused kernel
    qb, kb, vb = q.bfloat16(), k.bfloat16(), v.bfloat16()
    auto, _ = scaled_dot_product(qb, kb, vb)
    with attention_backend("sdpa"):
        fused, _ = scaled_dot_product(qb, kb, vb)
    assert torch.equal(auto, blocked_dot_product(qb, kb, vb) if native else fused)
    exact, _ = scaled_dot_product(q, k, v)
    # bf16 rounding only: the scores are rounded to bf16 before the softmax (the fused kernel keeps them in float32)
    assert max_diff(auto, exact) <= 1e-2 and max_diff(fused, exact) <= 1e-2
    assert auto.dtype == torch.bfloat16 and auto.stride() == qb.stride()


def test_modules_agree_on_every_backend():
    torch.manual_seed(0)
    self_attention, cross_attention = SelfAttention(4, 64).eval(), CrossAttention(4, 64, 24).eval()
    x, y = torch.randn(2, 50, 64), torch.randn(2, 9, 24)
    outputs = {}
    for backend in ("math", "sdpa", "sliced", "blocked", "auto"):
        with torch.no_grad(), attention_backend(backend, 8):
            outputs[backend] = (self_attention(x, causal_mask=True), self_attention(x), cross_attention(x, y))
    for backend in ("sdpa", "sliced", "blocked", "auto"):
        for ours, expected in zip(outputs[backend], outputs["math"]):
            assert max_diff(ours, expected) <= 1e-6


def test_backend_arguments_are_checked_and_restored():
    from sdlab import attention

    with pytest.raises(ValueError, match="unknown attention backend"):
        with attention_backend("flash"):
            pass
    with pytest.raises(ValueError, match="slice_size"):
        with attention_backend("sliced", 0):
            pass
    with attention_backend("sliced", 3):
        assert attention.current_backend() == ("sliced", 3)
    assert attention.current_backend() == ("auto", attention.DEFAULT_SLICE_SIZE)


def test_backend_is_per_thread():
    """Two threads generating at once with different attention settings do not see each other's."""
    import threading

    from sdlab import attention

    inside, release, seen = threading.Event(), threading.Event(), []

    def sliced():
        with attention_backend("sliced", 7):
            inside.set()
            release.wait(10)

    worker = threading.Thread(target=sliced)
    worker.start()
    inside.wait(10)
    seen.append(attention.current_backend())
    release.set()
    worker.join()
    assert seen == [("auto", attention.DEFAULT_SLICE_SIZE)]


def test_store_attention_still_returns_the_weights_when_sliced():
    torch.manual_seed(0)
    attention = SelfAttention(2, 16).eval()
    attention.store_attention = True
    with torch.no_grad(), attention_backend("sliced", 4):
        attention(torch.randn(1, 10, 16))
    assert attention.attention_weights.shape == (1, 2, 10, 10)


@pytest.fixture(scope="module")
def models():
    return {name: model.eval() for name, model in small_models(seed=0).items()}


@pytest.fixture(scope="module")
def unet_inputs():
    """Latents (2, 4, 8, 8), a context (2, 77, 32) and the embeddings of t = 10 and 900."""
    torch.manual_seed(1)
    time = get_time_embedding(torch.tensor([10.0, 900.0]), SMALL.unet.time_dim)
    return torch.randn(2, 4, 8, 8), torch.randn(2, 77, 32), time


def test_unet_sliced_equals_fused(models, unet_inputs):
    latents, context, time = unet_inputs
    with torch.no_grad():
        fused = models["diffusion"](latents, context, time)
        with attention_backend("sliced", 13):
            sliced = models["diffusion"](latents, context, time)
        with attention_backend("math"):
            explicit = models["diffusion"](latents, context, time)
    assert max_diff(sliced, explicit) <= 1e-6
    assert max_diff(fused, explicit) <= 1e-5


def test_unet_bf16_autocast_is_close_to_fp32(models, unet_inputs):
    latents, context, time = unet_inputs
    with torch.no_grad():
        full = models["diffusion"](latents, context, time)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            half = models["diffusion"](latents, context, time).float()
    assert max_diff(half, full) <= 5e-2 * full.abs().max().item()


def test_tiled_decode_is_close_to_untiled(models):
    # The tiles' group norms and attention see only their own tile, so tiled decoding is close to,
    # not equal to, the whole decode. Bound (random weights): mean |diff| <= 0.15 x the image's std.
    decoder = models["decoder"]
    torch.manual_seed(2)
    latents = torch.randn(1, 4, 16, 28) * 0.18215 * 5
    with torch.no_grad():
        whole = decoder(latents)
        tiled = decoder.tiled_forward(latents, tile_size=12, overlap=4)
        same = decoder.tiled_forward(latents[..., :12, :12], tile_size=12, overlap=4)
    assert tiled.shape == whole.shape
    diff = (tiled - whole).abs()
    print(f"tiled decode: max |diff| {diff.max():.3g}, mean {diff.mean():.3g}, image std {whole.std():.3g}")
    assert diff.mean() <= 0.15 * whole.std()
    assert torch.equal(same, decoder(latents[..., :12, :12]))  # one tile: exactly the plain decode
    with pytest.raises(ValueError, match="overlap"):
        decoder.tiled_forward(latents, tile_size=8, overlap=8)


def test_tiled_decode_blends_to_a_constant():
    """Blending weights sum to one everywhere: a decoder that outputs a constant stays constant."""
    from sdlab.decoder import VAE_Decoder

    decoder = VAE_Decoder(SMALL.vae).eval()
    with torch.no_grad():
        for p in decoder.parameters():
            p.zero_()
        decoder.conv_out.bias.fill_(0.25)
        image = decoder.tiled_forward(torch.randn(1, 4, 20, 27), tile_size=8, overlap=3)
    assert image.shape == (1, 3, 160, 216)
    assert max_diff(image, torch.full_like(image, 0.25)) <= 1e-6


def _generate(models, final=None, **options):
    from sdlab.tokenizer import load_tokenizer

    def keep(step, timestep, latents, noise_pred):
        if final is not None:
            final[:] = [latents]

    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    return pipeline.generate(
        "a red circle", models=models, sampler_name="dpmpp_2m", n_inference_steps=3, seed=0, height=64, width=64,
        latents=latents, progress=False, tokenizer=load_tokenizer(), callback=keep, **options,
    )


def test_generate_options(models):
    plain = _generate(models)
    assert np.array_equal(_generate(models, dtype=None, low_memory=False), plain)
    assert np.array_equal(_generate(models, dtype=torch.float32), plain)
    sliced = _generate(models, attention_slice_size=5)
    assert np.abs(sliced.astype(int) - plain.astype(int)).max() <= 1
    final = []
    low = _generate(models, final, low_memory=True, vae_tile_size=4, packed=False)  # 8x8 latents: 9 tiles
    with torch.no_grad():
        expected = pipeline.to_uint8(models["decoder"].tiled_forward(final[0], 4, 1))[0]
    assert np.array_equal(low, expected)
    bf16 = _generate(models, dtype=torch.bfloat16)
    assert bf16.shape == plain.shape and np.abs(bf16.astype(int) - plain.astype(int)).mean() < 8


def test_fp16_decoder_is_run_in_fp32(models):
    plain = _generate(models)
    models = {**models, "decoder": copy.deepcopy(models["decoder"]).half()}
    upcast = _generate(models)
    assert next(models["decoder"].parameters()).dtype == torch.float16  # handed back as it came
    assert np.abs(upcast.astype(int) - plain.astype(int)).max() <= 2


def test_packed_weights_compute_the_same_and_give_the_weights_back(models):
    from sdlab.packing import available, packed_weights

    assert available()  # the CPU build of torch has oneDNN: a missing kernel must not go unnoticed
    unet, decoder = models["diffusion"], models["decoder"]
    before = {k: v.clone() for k, v in {**unet.state_dict(), **decoder.state_dict()}.items()}
    latents, context = torch.randn(2, 4, 8, 8), torch.randn(2, 77, SMALL.unet.d_context)
    with torch.no_grad():
        plain = unet(latents, context, 500), decoder(latents[:1])
        with packed_weights(unet, decoder):
            packed = unet(latents, context, 500), decoder(latents[:1])
            with torch.autocast("cpu", dtype=torch.bfloat16):  # falls back to the plain convolution
                half = unet(latents, context, 500)
        again = unet(latents, context, 500), decoder(latents[:1])
    for ours, expected in zip(packed, plain):
        assert max_diff(ours, expected) <= 1e-5 * expected.abs().max().item()
    assert max_diff(half, plain[0]) <= 0.05 * plain[0].abs().max().item()
    assert all(torch.equal(a, b) for a, b in zip(again, plain))  # the plain path is back, bit for bit
    after = {**unet.state_dict(), **decoder.state_dict()}
    assert all(torch.equal(after[k], v) for k, v in before.items())
    assert not any("forward" in vars(m) for m in (*unet.modules(), *decoder.modules()))
    with packed_weights(unet):  # every convolution and linear layer of the U-Net is packed
        layers = [m for m in unet.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
        assert layers and all("forward" in vars(m) and m.weight.numel() == 0 for m in layers)


def test_packing_under_inference_mode_leaves_ordinary_weights(models):
    """A packed block run inside `torch.inference_mode()` (as a benchmark does) hands back weights
    that can still be edited in place and trained, not inference tensors."""
    from sdlab.packing import packed_weights

    unet = models["diffusion"]
    with torch.inference_mode(), packed_weights(unet):
        unet(torch.randn(2, 4, 8, 8), torch.randn(2, 77, SMALL.unet.d_context), 500)
    assert not any(p.is_inference() for p in unet.parameters())
    conv = next(m for m in unet.modules() if isinstance(m, torch.nn.Conv2d))
    with torch.no_grad():
        conv.weight.add_(0.0)  # refused for an inference tensor outside inference mode


def test_generate_packs_by_default_on_the_cpu(models):
    plain = _generate(models, packed=False)
    packed = _generate(models)
    assert np.abs(packed.astype(int) - plain.astype(int)).max() <= 1


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_autocast_stays_finite_on_the_tiny_model(dtype):
    """The bundled tiny model's U-Net and VAE decoder under CPU autocast: finite, and within 5% (rms,
    relative to the output's std) of float32. The SD1.5-size check is in test_parity_sd15.py."""
    from sdlab.model_loader import preload_models_from_standard_weights

    models = preload_models_from_standard_weights()
    generator = torch.Generator().manual_seed(16)
    latents = torch.randn(1, 4, 16, 16, generator=generator)
    context = torch.randn(1, 77, models["diffusion"].config.d_context, generator=generator)
    with torch.no_grad():
        expected = models["diffusion"](latents, context, 999), models["decoder"](latents)
        with torch.autocast("cpu", dtype=dtype):
            half = models["diffusion"](latents, context, 999), models["decoder"](latents)
    for ours, reference in zip(half, expected):
        assert torch.isfinite(ours).all()
        rms = (ours.double() - reference.double()).pow(2).mean().sqrt() / reference.double().std()
        assert rms <= 0.05


def _convolutions_and_linears(module):
    return [m for m in module.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]


def test_bf16_packing_casts_once_and_gives_the_weights_back(models, unet_inputs):
    """`packed_weights(..., dtype=torch.bfloat16)`: every convolution and linear layer but the U-Net's
    `full_precision_layers` packed in bf16 beside its float32 weight, no autocast, close to float32;
    a model stored in bf16 is packed in place; both hand back their weights bit for bit. Where oneDNN
    has no bf16 on this CPU, nothing is packed in bf16 and `generate` autocasts instead."""
    from sdlab.packing import available, packed_weights

    unet = models["diffusion"]
    latents, context, time = unet_inputs
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    kept = {id(m) for layer in unet.full_precision_layers() for m in layer.modules()}
    with torch.no_grad():
        full = unet(latents, context, time)
        with packed_weights(unet, dtype=torch.bfloat16):
            packed = {m: (vars(m).get("forward"), m.weight.dtype, m.weight.numel()) for m in _convolutions_and_linears(unet)}
            half = unet(latents, context, time)
    if not available(torch.bfloat16):
        assert all(forward is None or id(m) in kept for m, (forward, _, _) in packed.items())
        return
    assert half.dtype == torch.float32  # the last convolution keeps float32
    assert max_diff(half, full) <= 3e-2 * full.abs().max().item()
    for layer, (forward, dtype, numel) in packed.items():
        assert forward.args[1].dtype == (torch.float32 if id(layer) in kept else torch.bfloat16)
        assert dtype == torch.float32 and (numel > 0) == (id(layer) not in kept)  # float32 kept beside bf16
    assert all(torch.equal(v, before[k]) for k, v in unet.state_dict().items())
    stored = copy.deepcopy(unet).to(torch.bfloat16)
    weights = {k: v.clone() for k, v in stored.state_dict().items()}
    with torch.no_grad(), packed_weights(stored):
        assert all(m.weight.numel() == 0 for m in _convolutions_and_linears(stored) if id(m) not in kept)
        own = stored(latents.bfloat16(), context.bfloat16(), time.bfloat16())
    assert max_diff(own, full) <= 3e-2 * full.abs().max().item()
    assert all(torch.equal(v, weights[k]) for k, v in stored.state_dict().items())


def test_generate_in_bf16_on_the_cpu_packs_instead_of_autocasting(models, monkeypatch):
    from sdlab.packing import available

    seen, decoded = [], []
    hook = models["diffusion"].register_forward_pre_hook(lambda m, args: seen.append(torch.is_autocast_enabled("cpu")))
    decoder_hook = models["decoder"].register_forward_hook(lambda m, args, out: decoded.append(out.dtype))
    try:
        bf16 = _generate(models, dtype=torch.bfloat16)
        unpacked = _generate(models, dtype=torch.bfloat16, packed=False)
    finally:
        hook.remove()
        decoder_hook.remove()
    steps = len(seen) // 2
    assert seen[:steps] == [not available(torch.bfloat16)] * steps  # packed bf16: no autocast
    assert seen[steps:] == [True] * steps  # not packed: autocast
    # the VAE decoder is packed in bf16 too (where oneDNN has bf16), and not cast when not packed
    assert decoded == [torch.bfloat16 if available(torch.bfloat16) else torch.float32, torch.float32]
    assert all(p.dtype == torch.float32 for p in models["decoder"].parameters())  # handed back in float32
    plain = _generate(models)
    for image in (bf16, unpacked):
        assert np.abs(image.astype(int) - plain.astype(int)).mean() < 8


def test_models_stored_in_bf16_generate_in_bf16(models):
    stored = {name: copy.deepcopy(model).to(torch.bfloat16) for name, model in models.items()}
    plain = _generate(models)
    image = _generate(stored, low_memory=True)
    assert all(p.dtype == torch.bfloat16 for p in stored["diffusion"].parameters())
    assert np.abs(image.astype(int) - plain.astype(int)).mean() < 8
