"""The tiny Stable Diffusion shipped in `sdlab/data/tiny.safetensors`, and the code that trains it."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from sdlab.config import TINY
from sdlab.ddpm import DDPMSampler
from sdlab.errors import ArgumentError
from sdlab.model_loader import DEFAULT_CHECKPOINT, build_models, preload_models_from_standard_weights, save_checkpoint
from sdlab.pipeline import generate
from sdlab.tiny import analyzer
from sdlab.tiny.evaluate import generate_batch
from sdlab.tiny.train import TrainSettings, TrainState, diffusion_loss, make_data, train, vae_loss

# (prompt, seed) pairs of held-out combinations (red square, green triangle, blue circle,
# circle top right, square bottom left, triangle center) that the shipped model draws correctly.
FIXED = [
    ("a large red square in the top left", 0),
    ("a large green triangle at the bottom", 0),
    ("a large blue circle on the left", 0),
    ("a large yellow circle in the top right", 0),
    ("a large white square in the bottom left", 1),
    ("a large purple triangle in the center", 2),
    ("a small red square in the top left", 0),
    ("a small blue circle at the bottom", 0),
    ("a small yellow circle in the top right", 0),
    ("a small red triangle in the center", 0),
    ("a large green triangle above a small white circle", 0),
]


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def test_shipped_model_loads_through_the_public_loader(tiny):
    assert DEFAULT_CHECKPOINT.exists()
    assert DEFAULT_CHECKPOINT.stat().st_size <= 25 * 2**20
    assert set(tiny) == {"clip", "encoder", "decoder", "diffusion"}
    assert tiny["clip"].config.n_vocab == 49408 and tiny["clip"].config.n_token == 77
    vae = tiny["decoder"].config
    assert vae.downscale == 8 and vae.latent_channels == 4
    assert vae.scale_factor != 1.0  # measured after VAE training
    assert all(p.dtype == torch.float32 for m in tiny.values() for p in m.parameters())  # fp16 file, fp32 on CPU
    report = json.loads((DEFAULT_CHECKPOINT.parent / "tiny_report.json").read_text())
    assert report["heldout"][0]["sampler"] == "dpmpp_2m"


@pytest.mark.parametrize("prompt,seed", FIXED)
def test_fixed_heldout_prompts_are_followed(tiny, tokenizer, prompt, seed):
    image = generate(prompt, models=tiny, seed=seed, height=64, width=64, sampler_name="dpmpp_2m",
                     n_inference_steps=20, tokenizer=tokenizer, progress=False)  # the model's guidance
    assert image.shape == (64, 64, 3)
    result = analyzer.score(prompt, image)
    assert result["colour"] == result["shape"] == result["position"] == 1.0, (prompt, analyzer.describe(image), result)


def test_generation_is_deterministic(tiny, tokenizer):
    kwargs = dict(models=tiny, seed=3, height=64, width=64, sampler_name="dpmpp_2m", n_inference_steps=8,
                  tokenizer=tokenizer, progress=False)
    a = generate("a small purple square on the right", **kwargs)
    b = generate("a small purple square on the right", **kwargs)
    assert (a == b).all()


def test_checkpoint_round_trips_through_the_loader(tiny, tmp_path):
    path = tmp_path / "copy.safetensors"
    save_checkpoint(tiny, path, type(TINY)(clip=tiny["clip"].config, vae=tiny["decoder"].config,
                                           unet=tiny["diffusion"].config))
    again = preload_models_from_standard_weights(path)
    for name, model in tiny.items():
        other = again[name].state_dict()
        for key, tensor in model.state_dict().items():
            assert torch.equal(tensor, other[key]), (name, key)
    assert again["decoder"].config == tiny["decoder"].config


def test_twenty_training_steps_reduce_the_losses():
    torch.manual_seed(0)
    models = build_models(TINY)
    data = make_data(16, seed=5)
    images, tokens = data["images"][:8], data["tokens"][:8, 0]

    # VAE: reconstruction + KL on a fixed batch.
    encoder, decoder = models["encoder"], models["decoder"]
    params = list(encoder.parameters()) + list(decoder.parameters())
    opt = torch.optim.AdamW(params, lr=2e-3)
    noise = torch.randn(8, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    losses = []
    for _ in range(20):
        loss, _, _ = vae_loss(encoder, decoder, images, noise, 1e-3)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], losses

    # Text encoder + U-Net: the DDPM noise-prediction loss at fixed timesteps and noise.
    clip, diffusion = models["clip"], models["diffusion"]
    params = list(clip.parameters()) + list(diffusion.parameters())
    opt = torch.optim.AdamW(params, lr=1e-3)
    latents = torch.randn(8, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    alphas_cumprod = DDPMSampler().alphas_cumprod
    losses = []
    for _ in range(20):
        loss = diffusion_loss(clip, diffusion, latents, tokens, alphas_cumprod, torch.Generator().manual_seed(3))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0], losses


def test_train_end_to_end_writes_a_loadable_checkpoint_and_resumes(tmp_path):
    kwargs = dict(n_images=48, vae_steps=3, vae_batch=4, unet_steps=4, unet_batch=4, psnr_images=8,
                  progress=False, log=lambda *a: None)
    full = train(out=tmp_path / "a.safetensors", **kwargs)
    assert full["summary"]["config"]["vae"]["scale_factor"] > 0
    models = preload_models_from_standard_weights(tmp_path / "a.safetensors")
    assert models["diffusion"].config == TINY.unet

    state = tmp_path / "state.pt"
    assert train(out=tmp_path / "b.safetensors", state_path=state, stop_after=5, **kwargs) is None  # mid U-Net
    assert not (tmp_path / "b.safetensors").exists()
    resumed = train(out=tmp_path / "b.safetensors", state_path=state, **kwargs)
    for name, model in full["models"].items():
        other = resumed["models"][name].state_dict()
        for key, tensor in model.state_dict().items():
            torch.testing.assert_close(tensor, other[key], rtol=1e-5, atol=1e-6, msg=f"{name}.{key}")


def test_a_state_resumes_only_its_own_run(tmp_path):
    kwargs = dict(n_images=16, vae_steps=3, vae_batch=2, unet_steps=2, unet_batch=2, progress=False,
                  log=lambda *a: None)
    state = tmp_path / "state.pt"
    assert train(out=None, state_path=state, stop_after=2, **kwargs) is None
    saved = TrainState.load(state, TINY, seed=0)
    assert (saved.stage, saved.step, len(saved.history["vae"])) == (1, 2, 2) and saved.optimizer is not None
    with pytest.raises(ArgumentError, match="another run"):
        train(out=None, state_path=state, **{**kwargs, "seed": 1})


def test_training_starts_from_a_checkpoint_keeping_its_vae(tmp_path):
    kwargs = dict(n_images=32, vae_steps=3, vae_batch=4, unet_steps=3, unet_batch=4, psnr_images=8,
                  progress=False, log=lambda *a: None)
    start = tmp_path / "start.safetensors"
    train(out=start, **kwargs)
    first = preload_models_from_standard_weights(start)
    logged = []
    continued = train(out=tmp_path / "more.safetensors", init=start, **{**kwargs, "log": logged.append})
    assert continued["summary"]["vae_seconds"] == 0 and not continued["history"]["vae"]  # no VAE stage
    assert len(continued["history"]["unet"]) == kwargs["unet_steps"] and any("starting from" in m for m in logged)
    for name in ("encoder", "decoder"):  # the VAE and its latent scale are the checkpoint's
        assert all(torch.equal(a, b) for a, b in zip(first[name].state_dict().values(),
                                                     continued["models"][name].state_dict().values()))
    assert continued["models"]["decoder"].config.scale_factor == first["decoder"].config.scale_factor
    moved = [not torch.equal(a, b) for a, b in zip(first["diffusion"].state_dict().values(),
                                                   continued["models"]["diffusion"].state_dict().values())]
    assert any(moved)  # the U-Net trained on from the checkpoint's weights
    smaller = dataclasses.replace(TINY, unet=dataclasses.replace(TINY.unet, base_channels=16))
    with pytest.raises(ArgumentError, match="--init .* does not fit"):
        train(out=None, init=start, config=smaller, **kwargs)


def test_batched_generation_follows_generate(tiny, tokenizer):
    """`generate_batch` runs `generate`'s stages on many prompts: one prompt gives its image (to rounding)."""
    prompt = "a large green triangle above a small white circle"
    for sampler_name in ("dpmpp_2m", "ddim"):
        single = generate(prompt, models=tiny, seed=7, height=64, width=64, sampler_name=sampler_name,
                          n_inference_steps=12, cfg_scale=5.0, tokenizer=tokenizer, progress=False)
        (batched,) = generate_batch(tiny, [prompt], [7], sampler_name, 12, cfg_scale=5.0, tokenizer=tokenizer)
        assert abs(single.astype(int) - batched).max() <= 1, sampler_name


def test_command_line_trains_and_evaluates(tmp_path, capsys):
    from sdlab.__main__ import main

    out, report = tmp_path / "t.safetensors", tmp_path / "report.json"
    assert main(["train", "--out", str(out), "--n-images", "48", "--vae-steps", "2", "--vae-batch", "4",
                 "--unet-steps", "2", "--unet-batch", "4", "--no-progress"]) == 0
    assert preload_models_from_standard_weights(out)["diffusion"].config == TINY.unet
    assert main(["evaluate", "--ckpt", str(out), "--n-prompts", "4", "--runs", "ddim:2",
                 "--report", str(report)]) == 0
    figures = json.loads(report.read_text())
    assert [(r["sampler"], r["steps"], r["n"]) for r in figures["heldout"]] == [("ddim", 2, 4.0)]
    assert set(figures["families"]) == {"plain", "plain_heldout_pairs", "two_object_heldout", "paraphrased_heldout"}
    assert set(figures["families"]["plain"]) >= {"count", "colour", "shape", "all"}
    assert "position" not in figures["families"]["plain"]  # "a red circle" says no position
    assert 0.0 <= figures["heldout"][0]["colour"] <= 1.0 and figures["vae_psnr_db"] > 0
    with pytest.raises(SystemExit) as exit_:
        main(["train", "--help"])
    help_text = capsys.readouterr().out
    assert exit_.value.code == 0 and all(
        f"--{setting.name.replace('_', '-')}" in help_text for setting in dataclasses.fields(TrainSettings))


def test_heldout_prompt_following_meets_the_goals(tiny):
    """A fresh sample of the evaluation (50 held-out prompts, DPM++ 2M, 20 steps, the model's CFG), not the report."""
    from sdlab.tiny.data import heldout_prompts
    from sdlab.tiny.evaluate import evaluate_models

    prompts = heldout_prompts(50, seed=123)
    (row,) = evaluate_models(tiny, prompts, list(range(50)), [("dpmpp_2m", 20)], log=lambda *a: None)
    assert row["colour"] >= 0.9 and row["shape"] >= 0.85 and row["position"] >= 0.85, row


def test_plain_prompts_are_followed(tiny):
    """Plain prompts as a reader types them first, on seeds of their own (not the report's): one object of
    the right colour and shape in at least 90% (the report measures 200 such prompts)."""
    from sdlab.tiny.data import COLOURS, SHAPES
    from sdlab.tiny.evaluate import evaluate_models

    prompts = [f"a {colour} {shape}" for colour in COLOURS for shape in SHAPES] * 2
    seeds = list(range(300, 300 + len(prompts)))
    (row,) = evaluate_models(tiny, prompts, seeds, [("dpmpp_2m", 20)], log=lambda *a: None)
    assert row["count"] >= 0.9 and row["all"] >= 0.9, row


def test_two_object_prompts_with_a_heldout_pair_are_followed(tiny):
    """Two objects, one of them a held-out colour-shape pair, on prompts and seeds the report does not
    use (its figure: 85% all correct on 200; measured on other seed sets: 87-87.5%)."""
    from sdlab.tiny.data import heldout_prompts
    from sdlab.tiny.evaluate import evaluate_models

    prompts = heldout_prompts(60, seed=321, two_object_prob=1.0)
    seeds = list(range(9100, 9160))
    (row,) = evaluate_models(tiny, prompts, seeds, [("dpmpp_2m", 20)], log=lambda *a: None)
    assert row["count"] >= 0.9 and row["all"] >= 0.75, row
