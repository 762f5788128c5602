"""`python -m sdlab bench`: sdlab against diffusers, component by component, on the same weights.

    python -m sdlab bench --ckpt random-v1-5.safetensors [--quick] [--repeat 3] [--no-image]

The checkpoint is any SD1.5-layout file (the real one, or a random one in the same layout such
as the test suite's `random-v1-5.safetensors`); both libraries load the *same* file, sdlab with its
own loader, the reference (transformers' CLIP, diffusers' U-Net and VAE: `sdlab.reference`, the
same models the tests compare against) through diffusers' single-file converters. diffusers is
needed only here: it is imported lazily.

Components are timed in one process with both libraries loaded, alternating sdlab and diffusers
runs (`--repeat` times each, best kept) so that a busy machine affects both alike:

* CLIP: 2 prompts (a CFG batch) of 77 tokens.
* U-Net step: batch 2 (CFG), 4x64x64 latents (a 512x512 image), fp32, and bf16 (autocast) where
  the CPU supports it; ratios always against diffusers *fp32*, `max_diff` against diffusers fp32.
  "sdlab" runs as `generate` runs fp32 on the CPU, with packed convolution weights
  (`sdlab.packing`), in a round of its own against diffusers with "sdlab recording attention" (the
  same step inside `sdlab.inspect.record_attention`: what recording costs); then "sdlab unpacked" (the plain
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

from .errors import CheckpointNotFoundError
from .packing import packed_weights
from .reference import diffusers_scheduler, reference_models, reference_pipeline

PROMPT = "a watercolor painting of a lighthouse at dusk"


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


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max())


def timed_rows(name: str, fns: dict, repeat: int, check=None, packed=(), only=None) -> list[dict]:
    """Time `fns` in turn (`interleaved`) and report one row each, with its ratio to "diffusers" and
    `check()`'s max difference where it gives one. `packed`: sdlab models whose convolutions are
    packed meanwhile, as `generate` runs them on the CPU; `only`: keep just these rows."""
    with torch.inference_mode(), packed_weights(*packed):
        times = interleaved(fns, repeat)
        diff = check() if check else None
    print(f"  {name}: " + ", ".join(f"{k} {v:.3f} s" for k, v in times.items()), flush=True)
    rows = []
    for who, seconds in times.items():
        if only and who not in only:
            continue
        rows.append({"component": name, "impl": who, "seconds": round(seconds, 3),
                     "ratio": round(seconds / times["diffusers"], 3),
                     **({"max_diff": float(f"{diff[who]:.3g}")} if diff and who in diff else {})})
    return rows


def unet_functions(ours: dict, theirs: dict, size: int) -> dict:
    """One U-Net step of each library on the same inputs (batch 2, 4 x size x size latents), in
    float32 and under bf16 autocast."""
    from .diffusion import get_time_embedding

    latents, context, t = unet_inputs(size=size)
    time_emb = get_time_embedding(t, 320)

    def bf16(fn):
        def autocast():
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return fn()

        return autocast

    def sdlab_unet():
        return ours["diffusion"](latents, context, time_emb)

    def diffusers_unet():
        return theirs["unet"](latents, t, encoder_hidden_states=context).sample

    return {"sdlab": sdlab_unet, "diffusers": diffusers_unet,
            "sdlab bf16": bf16(sdlab_unet), "diffusers bf16": bf16(diffusers_unet)}


def component_rows(ours: dict, theirs: dict, repeat: int, quick: bool, bf16: bool) -> list[dict]:
    """CLIP, one U-Net step (packed, also while recording attention; then unpacked and bf16) and a VAE
    decode, sdlab against diffusers."""
    from .inspect import record_attention
    from .tokenizer import load_tokenizer

    tokens = torch.tensor(load_tokenizer()([PROMPT, ""], padding="max_length", max_length=77, truncation=True).input_ids)
    size = 32 if quick else 64
    vae_latents = torch.randn(1, 4, size, size, generator=torch.Generator().manual_seed(1))

    rows = timed_rows("CLIP (2x77 tokens)", {
        "sdlab": lambda: ours["clip"](tokens),
        "diffusers": lambda: theirs["clip"](tokens).last_hidden_state,
    }, repeat, lambda: {"sdlab": max_diff(ours["clip"](tokens), theirs["clip"](tokens).last_hidden_state)})

    unet = unet_functions(ours, theirs, size)

    def unet_check():
        reference = unet["diffusers"]()
        diffs = {"sdlab unpacked": max_diff(unet["sdlab"](), reference)}
        if bf16:
            diffs["sdlab bf16"] = max_diff(unet["sdlab bf16"](), reference)
            diffs["diffusers bf16"] = max_diff(unet["diffusers bf16"](), reference)
        return diffs

    def recording_unet():  # the same step while `inspect.record_attention` keeps every cross-attention map
        with record_attention(ours):
            return unet["sdlab"]()

    unet_row = f"U-Net step (2x4x{size}x{size})"
    rows += timed_rows(unet_row, {"sdlab": unet["sdlab"], "sdlab recording attention": recording_unet,
                                  "diffusers": unet["diffusers"]}, repeat,
                       lambda: {"sdlab": max_diff(unet["sdlab"](), unet["diffusers"]()),
                                "sdlab recording attention": max_diff(recording_unet(), unet["diffusers"]())},
                       packed=[ours["diffusion"]])
    fns = {"sdlab unpacked": unet["sdlab"], "diffusers": unet["diffusers"]}
    if bf16:  # as `generate` runs bf16: autocast, weights not packed
        fns.update({"sdlab bf16": unet["sdlab bf16"], "diffusers bf16": unet["diffusers bf16"]})
    rows += timed_rows(unet_row, fns, repeat, unet_check, only=[name for name in fns if name != "diffusers"])

    rows += timed_rows(f"VAE decode ({8 * size}x{8 * size})", {
        "sdlab": lambda: ours["decoder"](vae_latents),
        "diffusers": lambda: theirs["vae"].decode(vae_latents / 0.18215).sample,
    }, repeat, lambda: {"sdlab": max_diff(ours["decoder"](vae_latents), theirs["vae"].decode(vae_latents / 0.18215).sample)},
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
        pipe = reference_pipeline(models, diffusers_scheduler("dpmpp_2m"))
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
        raise CheckpointNotFoundError(f"--ckpt: no checkpoint at {args.ckpt}; pass an SD1.5-layout .safetensors file")
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
