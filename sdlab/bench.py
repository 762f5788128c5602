"""`python -m sdlab bench`: sdlab against diffusers, component by component, on the same weights.

    python -m sdlab bench --ckpt random-v1-5.safetensors [--quick] [--repeat 3] [--no-image]

The checkpoint is any SD1.5-layout file (the real one, or a random one in the same layout such
as the test suite's `random-v1-5.safetensors`); both libraries load the *same* file, sdlab with its
own loader, the reference (transformers' CLIP, diffusers' U-Net and VAE) through diffusers'
single-file converters. diffusers is needed only here: it is imported lazily.

Components are timed in one process with both libraries loaded, alternating sdlab and diffusers
runs (`--repeat` times each, best kept) so that a busy machine affects both alike:

* CLIP: 2 prompts (a CFG batch) of 77 tokens.
* U-Net step: batch 2 (CFG), 4x64x64 latents (a 512x512 image), fp32, and bf16 (autocast) where
  the CPU supports it; ratios always against diffusers *fp32*, `max_diff` against diffusers fp32.
  "sdlab" runs as `generate` runs fp32 on the CPU, with packed convolution weights
  (`sdlab.packing`), in a round of its own against diffusers; then "sdlab unpacked" (the plain
  eager model) and the bf16 rows (autocast, unpacked, as `generate` runs bf16) in a second round.
* VAE decode: 1x4x64x64 -> 512x512 (packed, as in `generate`).

A whole image (DPM++ 2M, 20 steps, CFG 7.5, 512x512; `--quick`: 4 steps, 256x256) runs in a fresh
subprocess per library, so that each peak RSS (loading, then generating) is its own.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

from .packing import packed_weights

PROMPT = "a watercolor painting of a lighthouse at dusk"
SCHEDULER_CONFIG = {
    "beta_end": 0.012, "beta_schedule": "scaled_linear", "beta_start": 0.00085, "clip_sample": False,
    "num_train_timesteps": 1000, "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1,
    "trained_betas": None,
}


def bf16_supported() -> bool:
    """True on CPUs with native bf16 arithmetic (AVX512-BF16 or AMX), where bf16 pays off."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def peak_rss_gb() -> float:
    """This process's peak resident set size so far, in GB (10^9 bytes).

    Read from /proc (VmHWM) where it exists: `ru_maxrss` of a child process can start from the RSS
    its parent had when it forked.
    """
    try:
        with open("/proc/self/status") as status:
            return int(status.read().split("VmHWM:")[1].split()[0]) * 1024 / 1e9
    except (OSError, IndexError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9


def rss_gb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 1e9


# --- the reference models, built here so that the bench never imports the tests -----------------


def reference_configs():
    """SD1.5's text encoder config (transformers) and U-Net and VAE arguments (diffusers)."""
    from transformers import CLIPTextConfig

    clip = CLIPTextConfig(
        vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
        num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu",
        layer_norm_eps=1e-5, projection_dim=768, bos_token_id=49406, eos_token_id=49407, pad_token_id=1,
    )
    unet = dict(
        sample_size=64, in_channels=4, out_channels=4, cross_attention_dim=768, attention_head_dim=8,
        block_out_channels=(320, 640, 1280, 1280), layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    )
    vae = dict(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512),
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=2, sample_size=512, scaling_factor=0.18215,
    )
    return clip, unet, vae


def reference_models(ckpt, state_dict=None) -> dict:
    """transformers' CLIPTextModel and diffusers' U-Net and VAE, SD1.5 sizes, loaded from `ckpt`."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders import single_file_utils as sfu
    from transformers import CLIPTextModel

    if state_dict is None:
        from safetensors.torch import load_file

        state_dict = load_file(str(ckpt))
    clip_config, unet_config, vae_config = reference_configs()
    clip = CLIPTextModel(clip_config)  # not on "meta": it has non-persistent buffers
    with torch.device("meta"):
        unet = UNet2DConditionModel(**unet_config)
        vae = AutoencoderKL(**vae_config)
    converted = {
        "clip": {k.removeprefix("text_model."): v for k, v in sfu.convert_ldm_clip_checkpoint(state_dict).items()},
        "unet": sfu.convert_ldm_unet_checkpoint(state_dict, unet.config),
        "vae": sfu.convert_ldm_vae_checkpoint(state_dict, vae.config),
    }
    del state_dict
    models = {}
    for name, model in (("clip", clip), ("unet", unet), ("vae", vae)):
        weights = {k: v.float() if v.is_floating_point() else v for k, v in converted.pop(name).items()}
        weights.pop("embeddings.position_ids", None)  # a constant buffer, not a weight
        missing, unexpected = model.load_state_dict(weights, strict=False, assign=True)
        if unexpected or [k for k in missing if "position_ids" not in k]:
            raise RuntimeError(f"reference {name}: missing {missing[:5]}, unexpected {unexpected[:5]}")
        if any(t.is_meta for t in (*model.parameters(), *model.buffers())):
            raise RuntimeError(f"reference {name} kept tensors on the meta device")
        models[name] = model.eval()
    gc.collect()
    return models


def reference_pipeline(models: dict):
    """diffusers' StableDiffusionPipeline with DPM++ 2M around the reference models."""
    import tempfile

    from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline
    from transformers import CLIPTokenizer

    from .tokenizer import vocab_files

    with tempfile.TemporaryDirectory() as directory:
        vocab_files(directory)
        tokenizer = CLIPTokenizer.from_pretrained(directory)
    pipe = StableDiffusionPipeline(
        vae=models["vae"], text_encoder=models["clip"], tokenizer=tokenizer, unet=models["unet"],
        scheduler=DPMSolverMultistepScheduler.from_config(SCHEDULER_CONFIG), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


# --- timing --------------------------------------------------------------------------------------


def interleaved(fns: dict, repeat: int, warmup: int = 1) -> dict:
    """Best time of each function, run in turn (a, b, a, b, ...) after `warmup` untimed rounds."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times = {name: [] for name in fns}
    for _ in range(repeat):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: min(t) for name, t in times.items()}


def unet_inputs(seed: int = 0, batch: int = 2, size: int = 64):
    generator = torch.Generator().manual_seed(seed)
    latents = torch.randn(batch, 4, size, size, generator=generator)
    context = torch.randn(batch, 77, 768, generator=generator)
    return latents, context, torch.tensor([500.0] * batch)


def component_rows(ours: dict, theirs: dict, repeat: int, quick: bool, bf16: bool) -> list[dict]:
    from .diffusion import get_time_embedding
    from .tokenizer import load_tokenizer

    rows = []
    tokens = torch.tensor(load_tokenizer()([PROMPT, ""], padding="max_length", max_length=77, truncation=True).input_ids)
    size = 32 if quick else 64
    latents, context, t = unet_inputs(size=size)
    time_emb = get_time_embedding(t, 320)
    vae_latents = torch.randn(1, 4, size, size, generator=torch.Generator().manual_seed(1))

    def row(name, fns, check=None, packed=(), only=None):
        """Time `fns` in turn; `packed`: sdlab models whose convolutions are packed meanwhile, as
        `generate` runs them on the CPU; `only`: keep just these rows (ratios stay against diffusers)."""
        with torch.inference_mode(), packed_weights(*packed):
            times = interleaved(fns, repeat)
            diff = check() if check else None
        base = times["diffusers"]
        for who, seconds in times.items():
            if only and who not in only:
                continue
            rows.append({"component": name, "impl": who, "seconds": round(seconds, 3),
                         "ratio": round(seconds / base, 3), **({"max_diff": float(f"{diff[who]:.3g}")} if diff and who in diff else {})})
        print(f"  {name}: " + ", ".join(f"{k} {v:.3f} s" for k, v in times.items()), flush=True)

    def maxdiff(a, b):
        return float((a.double() - b.double()).abs().max())

    row("CLIP (2x77 tokens)", {
        "sdlab": lambda: ours["clip"](tokens),
        "diffusers": lambda: theirs["clip"](tokens).last_hidden_state,
    }, lambda: {"sdlab": maxdiff(ours["clip"](tokens), theirs["clip"](tokens).last_hidden_state)})

    def sdlab_unet():
        return ours["diffusion"](latents, context, time_emb)

    def sdlab_unet_bf16():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return ours["diffusion"](latents, context, time_emb)

    def diffusers_unet():
        return theirs["unet"](latents, t, encoder_hidden_states=context).sample

    def diffusers_unet_bf16():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return theirs["unet"](latents, t, encoder_hidden_states=context).sample

    def unet_check():
        reference = diffusers_unet()
        diffs = {"sdlab unpacked": maxdiff(sdlab_unet(), reference)}
        if bf16:
            diffs["sdlab bf16"] = maxdiff(sdlab_unet_bf16(), reference)
            diffs["diffusers bf16"] = maxdiff(diffusers_unet_bf16(), reference)
        return diffs

    unet_row = f"U-Net step (2x4x{size}x{size})"
    row(unet_row, {"sdlab": sdlab_unet, "diffusers": diffusers_unet},
        lambda: {"sdlab": maxdiff(sdlab_unet(), diffusers_unet())}, packed=[ours["diffusion"]])
    fns = {"sdlab unpacked": sdlab_unet, "diffusers": diffusers_unet}
    if bf16:  # as `generate` runs bf16: autocast, weights not packed
        fns.update({"sdlab bf16": sdlab_unet_bf16, "diffusers bf16": diffusers_unet_bf16})
    row(unet_row, fns, unet_check, only=[name for name in fns if name != "diffusers"])

    row(f"VAE decode ({8 * size}x{8 * size})", {
        "sdlab": lambda: ours["decoder"](vae_latents),
        "diffusers": lambda: theirs["vae"].decode(vae_latents / 0.18215).sample,
    }, lambda: {"sdlab": maxdiff(ours["decoder"](vae_latents), theirs["vae"].decode(vae_latents / 0.18215).sample)},
        packed=[ours["decoder"]])
    return rows


# --- a whole image, one library per subprocess ---------------------------------------------------


def image_child(impl: str, ckpt: str, steps: int, size: int, bf16: bool) -> dict:
    """Load and generate in this (fresh) process; report seconds and peak RSS."""
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    start = time.perf_counter()
    if impl == "sdlab":
        from . import model_loader, pipeline

        models = model_loader.preload_models_from_standard_weights(ckpt, "cpu")
    else:
        models = reference_models(ckpt)
        pipe = reference_pipeline(models)
    gc.collect()
    load_s, load_rss = time.perf_counter() - start, peak_rss_gb()
    latents = torch.randn(1, 4, size // 8, size // 8, generator=torch.Generator().manual_seed(0))
    start = time.perf_counter()
    if impl == "sdlab":
        image = pipeline.generate(PROMPT, sampler_name="dpmpp_2m", n_inference_steps=steps, models=models, seed=0,
                                  height=size, width=size, latents=latents, progress=False,
                                  dtype=torch.bfloat16 if bf16 else None)
    else:
        with torch.inference_mode():
            image = pipe(PROMPT, num_inference_steps=steps, guidance_scale=7.5, height=size, width=size,
                         latents=latents, output_type="np").images[0]
        image = (image * 255).round().astype("uint8")
    seconds = time.perf_counter() - start
    return {"impl": impl + (" bf16" if bf16 else ""), "load_s": round(load_s, 2), "load_peak_rss_gb": round(load_rss, 2),
            "seconds": round(seconds, 2), "peak_rss_gb": round(peak_rss_gb(), 2),
            "image_mean": float(image.mean()), "image_std": float(image.std())}


def run_child(impl: str, ckpt: str, steps: int, size: int, bf16: bool) -> dict:
    command = [sys.executable, "-m", "sdlab", "bench", "--ckpt", ckpt, "--_child", impl,
               "--steps", str(steps), "--size", str(size)] + (["--bf16"] if bf16 else [])
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode:
        raise RuntimeError(f"the {impl} image run failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


# --- the command ---------------------------------------------------------------------------------


def format_table(rows: list[dict], columns: list[str]) -> str:
    cells = [[str(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    lines = [" | ".join(c.ljust(w) for c, w in zip(columns, widths)), "-|-".join("-" * w for w in widths)]
    lines += [" | ".join(v.ljust(w) for v, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m sdlab bench", description=__doc__.splitlines()[0])
    parser.add_argument("--ckpt", required=True, help="an SD1.5-layout .safetensors file (real or random weights)")
    parser.add_argument("--quick", action="store_true", help="smaller sizes (32x32 latents, 256x256 image, 4 steps)")
    parser.add_argument("--repeat", type=int, default=3, help="timed runs per implementation (best kept)")
    parser.add_argument("--no-image", action="store_true", help="skip the whole-image runs")
    parser.add_argument("--no-components", action="store_true", help="skip the component timings")
    parser.add_argument("--no-bf16", action="store_true", help="skip bf16 even where the CPU supports it")
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")
    parser.add_argument("--_child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--steps", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--size", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--bf16", action="store_true", help=argparse.SUPPRESS)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    if args._child:
        print(json.dumps(image_child(args._child, args.ckpt, args.steps, args.size, args.bf16)))
        return 0
    if not Path(args.ckpt).exists():
        raise FileNotFoundError(f"no checkpoint at {args.ckpt}")
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    bf16 = bf16_supported() and not args.no_bf16
    results = {"torch": torch.__version__, "threads": torch.get_num_threads(), "bf16": bf16, "components": [], "image": []}
    if not args.no_components:
        from . import model_loader

        print("loading both libraries' models ...", flush=True)
        ours = model_loader.preload_models_from_standard_weights(args.ckpt, "cpu")
        theirs = reference_models(args.ckpt)
        results["components"] = component_rows(ours, theirs, args.repeat, args.quick, bf16)
        del ours, theirs
        gc.collect()
        print(format_table(results["components"], ["component", "impl", "seconds", "ratio", "max_diff"]))
    if not args.no_image:
        steps, size = (4, 256) if args.quick else (20, 512)
        print(f"whole image: DPM++ 2M, {steps} steps, {size}x{size}, one subprocess each ...", flush=True)
        runs = [("diffusers", False), ("sdlab", False)] + ([("sdlab", True)] if bf16 else [])
        for impl, half in runs:
            results["image"].append(run_child(impl, args.ckpt, steps, size, half))
            print(f"  {results['image'][-1]}", flush=True)
        base = results["image"][0]["seconds"]
        for r in results["image"]:
            r["ratio"] = round(r["seconds"] / base, 3)
        print(format_table(results["image"], ["impl", "seconds", "ratio", "load_s", "load_peak_rss_gb", "peak_rss_gb"]))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
