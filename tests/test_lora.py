"""LoRA files: sdlab's loader against diffusers' `load_lora_weights` on the same random adapters.

The adapters cover every linear and convolution layer of the U-Net and every linear layer of the
text encoder, in the kohya format (both naming styles) and the diffusers/PEFT format. sdlab's
models load the checkpoint with sdlab's rules; diffusers' through its own converters.
"""

from __future__ import annotations

import copy
import gc

import numpy as np
import pytest
import torch
from torch import nn

from sdlab import lora, model_loader
from sdlab.errors import ArgumentError, CheckpointError

RANK = 4


def random_lora(reference_unet, reference_clip, style: str, seed: int = 0, conv: bool = True) -> dict:
    """Random adapters for the reference models' layers, named as `style` ("kohya", "kohya-original"
    is added by renaming in the test, "peft") writes them."""
    generator = torch.Generator().manual_seed(seed)
    state = {}

    def add(prefix: str, name: str, module: nn.Module):
        if isinstance(module, nn.Conv2d):
            if not conv:
                return
            down = torch.randn(RANK, module.in_channels, *module.kernel_size, generator=generator)
            up = torch.randn(module.out_channels, RANK, 1, 1, generator=generator)
        else:
            down = torch.randn(RANK, module.in_features, generator=generator)
            up = torch.randn(module.out_features, RANK, generator=generator)
        down, up = down * 0.05, up * 0.05
        if style == "peft":
            state[f"{prefix}.{name}.lora_A.weight"], state[f"{prefix}.{name}.lora_B.weight"] = down, up
        else:
            key = f"{prefix}_{name.replace('.', '_')}"
            state[f"{key}.lora_down.weight"], state[f"{key}.lora_up.weight"] = down, up
            state[f"{key}.alpha"] = torch.tensor(float(RANK) / 2)

    for name, module in reference_unet.named_modules():
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            add("unet" if style == "peft" else "lora_unet", name, module)
    for name, module in reference_clip.named_modules():
        if isinstance(module, nn.Linear) and ".layers." in f".{name}":
            name = name if name.startswith("text_model.") else "text_model." + name
            add("text_encoder" if style == "peft" else "lora_te", name, module)
    return state


def to_original_style(state: dict, models: dict) -> dict:
    """kohya keys with diffusers' U-Net names (`lora_unet_down_blocks_0_...`) -> the original file's
    names (`lora_unet_input_blocks_1_...`), as older kohya and LyCORIS files write them."""
    names = lora.target_names(models)
    original = {}
    for name, target in names.items():
        is_original = name.startswith("lora_unet_") and not name.startswith(
            ("lora_unet_down_blocks", "lora_unet_mid_block", "lora_unet_up_blocks", "lora_unet_conv_", "lora_unet_time_embedding"))
        if is_original:
            original[id(target)] = name
    renamed = {}
    for key, tensor in state.items():
        layer, suffix = key.split(".", 1)
        renamed[original.get(id(names[layer]), layer) + "." + suffix] = tensor
    return renamed


def sdlab_outputs(models, latents, context, tokens, timestep):
    with torch.no_grad():
        return models["diffusion"](latents, context, timestep), models["clip"](tokens)


def reference_outputs(pipe, latents, context, tokens, timestep):
    with torch.no_grad():
        eps = pipe.unet(latents, timestep, encoder_hidden_states=context).sample
        hidden = pipe.text_encoder(tokens).last_hidden_state
    return eps, hidden


def max_abs(t) -> float:
    return t.double().abs().max().item() if t.numel() else 0.0


def relative(a, b) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


def compare(sdlab_models, pipe, state, inputs, scale, fuse, sdlab_state=None, fuse_reference=None):
    """Outputs with the LoRA applied by both libraries (sdlab may read the same adapters under other
    names, `sdlab_state`), then both removed again."""
    handle = lora.load_lora(sdlab_models, dict(sdlab_state or state), scale=scale, fuse=fuse, keep_original=True)
    pipe.load_lora_weights(dict(state), adapter_name="test")
    pipe.set_adapters(["test"], adapter_weights=[scale])
    fuse_reference = fuse if fuse_reference is None else fuse_reference
    if fuse_reference:
        pipe.fuse_lora(lora_scale=1.0, components=["unet", "text_encoder"])
    try:
        ours = sdlab_outputs(sdlab_models, *inputs)
        theirs = reference_outputs(pipe, *inputs)
    finally:
        handle.remove()
        if fuse_reference:
            pipe.unfuse_lora(components=["unet", "text_encoder"])
        pipe.unload_lora_weights()
    return [relative(a, b) for a, b in zip(ours, theirs)], ours


@pytest.fixture(scope="module")
def small_pair(tmp_path_factory):
    """sdlab's small model and diffusers/transformers models with the same weights."""
    from safetensors.torch import load_file
    from small import SMALL, write_small_checkpoint
    from transformers import CLIPTextConfig, CLIPTextModel

    from sdlab.reference import diffusers_conversions, diffusers_scheduler, reference_pipeline, reference_unet, reference_vae

    path = tmp_path_factory.mktemp("lora") / "small.safetensors"
    write_small_checkpoint(path, seed=3)
    models = model_loader.preload_models_from_standard_weights(path)
    c = SMALL.clip
    clip = CLIPTextModel(CLIPTextConfig(
        vocab_size=c.n_vocab, hidden_size=c.n_embd, intermediate_size=4 * c.n_embd, num_hidden_layers=c.n_layer,
        num_attention_heads=c.n_head, max_position_embeddings=c.n_token, hidden_act="quick_gelu",
        layer_norm_eps=c.layer_norm_eps, projection_dim=c.n_embd, bos_token_id=49406, eos_token_id=49407, pad_token_id=1,
    )).eval()  # fmt: skip
    unet, vae = reference_unet(SMALL.unet), reference_vae(SMALL.vae)
    converted = diffusers_conversions(load_file(str(path)), unet, vae)
    for model, weights in zip((clip, unet, vae), converted):
        weights.pop("embeddings.position_ids", None)
        missing, unexpected = model.load_state_dict(weights, strict=False)
        assert not unexpected and all("position_ids" in k for k in missing)
    pipe = reference_pipeline({"clip": clip, "unet": unet, "vae": vae}, diffusers_scheduler("ddim"))
    generator = torch.Generator().manual_seed(1)
    latents = torch.randn(2, 4, 9, 7, generator=generator)  # odd sizes on purpose
    context = torch.randn(2, 77, SMALL.unet.d_context, generator=generator)
    tokens = torch.randint(0, 49406, (2, 77), generator=generator)
    return models, pipe, (latents, context, tokens, torch.tensor(511))


@pytest.mark.parametrize("style", ["kohya", "kohya-original", "peft"])
@pytest.mark.parametrize("fuse", [False, True])
def test_small_lora_matches_diffusers(small_pair, style, fuse):
    models, pipe, inputs = small_pair
    state = random_lora(pipe.unet, pipe.text_encoder, "peft" if style == "peft" else "kohya")
    sdlab_state = None
    if style == "kohya-original":  # the same adapters under the original file's layer names
        sdlab_state = to_original_style(state, models)
        assert sum("lora_unet_input_blocks_" in k for k in sdlab_state) > 10
    before = sdlab_outputs(models, *inputs)
    (unet_diff, clip_diff), ours = compare(models, pipe, state, inputs, scale=0.7, fuse=fuse, sdlab_state=sdlab_state)
    print(f"small LoRA {style} fuse={fuse}: U-Net rel. diff {unet_diff:.2e}, CLIP {clip_diff:.2e}")
    assert unet_diff <= 1e-5 and clip_diff <= 1e-5
    assert relative(before[0], ours[0]) > 1e-2 and relative(before[1], ours[1]) > 1e-2  # the LoRA did something
    after = sdlab_outputs(models, *inputs)
    assert all(torch.equal(a, b) for a, b in zip(before, after))  # removed: the weights are back bit for bit


def test_scale_zero_and_hooks_follow_the_scale(small_pair):
    models, pipe, inputs = small_pair
    state = random_lora(pipe.unet, pipe.text_encoder, "kohya", seed=5)
    before = sdlab_outputs(models, *inputs)
    handle = lora.load_lora(models, state, scale=0.0, fuse=False)
    try:
        zero = sdlab_outputs(models, *inputs)
    finally:
        handle.remove()
    assert all(torch.equal(a, b) for a, b in zip(before, zero))


def test_bad_lora_files_are_named(small_pair, tmp_path):
    models, pipe, _ = small_pair
    state = random_lora(pipe.unet, pipe.text_encoder, "kohya", conv=False)
    bad = dict(state)
    bad["lora_unet_no_such_layer.lora_down.weight"] = torch.zeros(RANK, 8)
    with pytest.raises(CheckpointError, match="lora_unet_no_such_layer"):
        lora.load_lora(models, bad)
    key = next(k for k in state if k.endswith("attn2_to_k.lora_down.weight"))
    wrong = dict(state)
    wrong[key] = torch.zeros(RANK, 999)
    before = {k: v.clone() for k, v in models["diffusion"].state_dict().items()}
    with pytest.raises(CheckpointError, match="do not fit"):
        lora.load_lora(models, wrong)
    assert all(torch.equal(v, models["diffusion"].state_dict()[k]) for k, v in before.items())  # nothing changed
    twice = {**state, **{k.replace("lora_unet_down_blocks_0_attentions_0", "lora_unet_input_blocks_1_1"): v
                         for k, v in state.items() if "lora_unet_down_blocks_0_attentions_0_" in k}}
    with pytest.raises(CheckpointError, match="two adapters for the same layer"):
        lora.load_lora(models, twice)
    with pytest.raises(ArgumentError, match="scale"):
        lora.load_lora(models, state, scale=float("nan"))
    from safetensors.torch import save_file

    path = tmp_path / "style.safetensors"
    save_file(state, str(path))
    handle = lora.load_lora(models, path, scale=0.5)
    handle.remove()


def test_lora_fuses_into_models_loaded_under_inference_mode(small_pair):
    """Models built inside `torch.inference_mode()` hold inference tensors: fusing still works
    (the edit is made in that mode) and removing gives the weights back bit for bit."""
    models, pipe, inputs = small_pair
    state = random_lora(pipe.unet, pipe.text_encoder, "kohya", seed=11)
    with torch.inference_mode():
        frozen = {name: copy.deepcopy(model) for name, model in models.items()}
    assert all(p.is_inference() for p in frozen["diffusion"].parameters())
    expected = _with_lora(models, state, inputs)
    before = sdlab_outputs(frozen, *inputs)
    assert all(torch.equal(a, b) for a, b in zip(_with_lora(frozen, state, inputs), expected))
    assert all(torch.equal(a, b) for a, b in zip(sdlab_outputs(frozen, *inputs), before))


def _with_lora(models, state, inputs):
    handle = lora.load_lora(models, dict(state), scale=0.7, keep_original=True)
    try:
        return sdlab_outputs(models, *inputs)
    finally:
        handle.remove()


@pytest.mark.parametrize("keep_original", [True, False])
def test_a_lora_that_fails_midway_changes_nothing(small_pair, monkeypatch, keep_original):
    """Whatever stops a fuse half way (here the 5th layer's edit raises), the layers already changed
    are put back before the error reaches the caller: bit for bit with `keep_original`, else by
    subtracting the same delta (to the float's last bit)."""
    models, pipe, _ = small_pair
    state = random_lora(pipe.unet, pipe.text_encoder, "kohya", seed=12)
    before = {f"{name}.{k}": v.clone() for name in ("diffusion", "clip") for k, v in models[name].state_dict().items()}
    calls = {"n": 0}
    delta = lora.Adapter.delta

    def failing(self, shape):
        calls["n"] += 1
        if calls["n"] == 5:
            raise RuntimeError("stopped half way")
        return delta(self, shape)

    monkeypatch.setattr(lora.Adapter, "delta", failing)
    with pytest.raises(RuntimeError, match="half way"):
        lora.load_lora(models, dict(state), keep_original=keep_original)
    after = {f"{name}.{k}": v for name in ("diffusion", "clip") for k, v in models[name].state_dict().items()}
    assert calls["n"] == 5
    for key, value in before.items():
        if keep_original:
            assert torch.equal(after[key], value), key
        else:
            assert max_abs(after[key] - value) <= 1e-6 * max(1.0, max_abs(value)), key
    if not keep_original:  # put the small pair back exactly for the tests that follow
        with torch.no_grad():
            for name in ("diffusion", "clip"):
                models[name].load_state_dict({k[len(name) + 1 :]: v for k, v in before.items() if k.startswith(name + ".")})


@pytest.mark.parametrize("fuse", [False, True])
def test_sd15_lora_matches_diffusers(sdlab_models, reference, fuse):
    """At full SD1.5 size: U-Net noise prediction and CLIP hidden states with a LoRA on every layer."""
    from sdlab.reference import diffusers_scheduler, reference_pipeline

    pipe = reference_pipeline(reference, diffusers_scheduler("ddim"))
    state = random_lora(pipe.unet, pipe.text_encoder, "kohya", seed=7)
    generator = torch.Generator().manual_seed(2)
    inputs = (torch.randn(1, 4, 64, 64, generator=generator), torch.randn(1, 77, 768, generator=generator),
              torch.randint(0, 49406, (1, 77), generator=generator), torch.tensor(500))
    # the session's shared reference models are never fused (unfusing is not exact): diffusers keeps
    # the adapters beside the weights and unloads them exactly; sdlab is compared fused and unfused
    (unet_diff, clip_diff), _ = compare(sdlab_models, pipe, state, inputs, scale=0.8, fuse=fuse, fuse_reference=False)
    print(f"SD1.5 LoRA fuse={fuse}: U-Net rel. diff {unet_diff:.2e}, CLIP {clip_diff:.2e}")
    assert unet_diff <= 1e-5 and clip_diff <= 1e-5
    del state, pipe
    gc.collect()


def test_command_line_applies_loras_with_their_scales(tmp_path, capsys):
    """`--lora FILE[:SCALE]`, repeatable: the image changes, the PNG records the files and scales."""
    import json

    from PIL import Image
    from safetensors.torch import save_file

    from sdlab.__main__ import main

    models = model_loader.preload_models_from_standard_weights()
    generator = torch.Generator().manual_seed(0)
    state = {}
    for name, target in lora.target_names(models).items():
        module = models[target.model].get_submodule(target.module)
        if name.startswith(("lora_unet_down_blocks", "lora_te_text_model")) and isinstance(module, nn.Linear):
            width = module.out_features // (3 if target.chunk is not None else 1)
            state[f"{name}.lora_down.weight"] = torch.randn(2, module.in_features, generator=generator) * 0.3
            state[f"{name}.lora_up.weight"] = torch.randn(width, 2, generator=generator) * 0.3
    path = tmp_path / "style.safetensors"
    save_file(state, str(path))
    quick = ["generate", "a red circle", "--steps", "2", "--seed", "1"]
    assert main([*quick, "-o", str(tmp_path / "plain.png")]) == 0
    assert main([*quick, "--lora", f"{path}:0.8", "--lora", str(path), "-o", str(tmp_path / "lora.png")]) == 0
    plain, styled = (np.asarray(Image.open(tmp_path / f"{n}.png")) for n in ("plain", "lora"))
    assert np.abs(plain.astype(int) - styled.astype(int)).mean() > 1
    recorded = json.loads(Image.open(tmp_path / "lora.png").info["parameters"])["loras"]
    assert recorded == [{"file": "style.safetensors", "scale": 0.8}, {"file": "style.safetensors", "scale": 1.0}]
    capsys.readouterr()
    assert main([*quick, "--lora", f"{path}:nan", "-o", str(tmp_path / "x.png")]) == 2
    assert "--lora" in capsys.readouterr().err
    assert main([*quick, "--lora", str(tmp_path / "missing.safetensors"), "-o", str(tmp_path / "y.png")]) == 2
    assert "missing.safetensors" in capsys.readouterr().err
