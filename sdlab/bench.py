"""`python -m sdlab bench`: sdlab against diffusers, component by component, on the same weights.

    python -m sdlab bench --ckpt random-v1-5.safetensors [--quick] [--repeat 3] [--no-image] [--peers]

The checkpoint is any SD1.5-layout file (the real one, or a random one in the same layout such
as the test suite's `random-v1-5.safetensors`); both libraries load the *same* file, sdlab with its
own loader, the reference (transformers' CLIP, diffusers' U-Net and VAE: `sdlab.reference`, the
same models the tests compare against) through diffusers' single-file converters. diffusers is
needed only here: it is imported lazily.

Components are timed in one process with both libraries loaded, alternating sdlab and diffusers
runs (`--repeat` times each, best kept) so that a busy machine affects both alike:

* CLIP: 2 prompts (a CFG batch) of 77 tokens.
* U-Net step: batch 2 (CFG), 4x64x64 latents (a 512x512 image); ratios always against diffusers
  *fp32* timed in the same round, `max_diff` against diffusers fp32, `spread_pct` how much slower
  the slowest repeat was than the best. Three rounds: packed fp32 ("sdlab", as `generate` runs on
  the CPU; "sdlab recording attention": the same step inside `sdlab.inspect.record_attention`),
  packed bf16 ("sdlab bf16": as `generate(..., dtype=torch.bfloat16)` runs, weights cast once;
  "sdlab bf16 fused attention": the same on PyTorch's fused attention kernel instead of the blocked
  one that `attention`'s "auto" picks in bf16) against diffusers under bf16 autocast, and the plain
  eager model ("sdlab unpacked", "sdlab bf16 autocast": every weight recast at every call). bf16
  rows only where the CPU has bf16.
  `--peers`: OpenVINO (optional: `pip install openvino`) runs diffusers' U-Net converted from
  PyTorch, in f32 and bf16, alternating with the others in the same rounds.
* VAE decode: 1x4x64x64 -> 512x512 (packed, as in `generate`), and where the CPU has bf16 packed
  in bf16 (as `generate(..., dtype=torch.bfloat16)` runs it) against diffusers under bf16 autocast.

Whole images (DPM++ 2M, 20 steps, CFG 7.5, 512x512; `--quick`: 4 steps, 256x256) run in a fresh
subprocess each, so that each peak RSS (loading, then generating) is its own: diffusers, sdlab
fp32, and where the CPU has bf16 sdlab bf16, lean (`VARIANTS`), 4-step LCM at `--batches`
images per call (images per minute), and 4-step LCM decoded by TAESD; elsewhere (or with
`--no-bf16`) the two 4-step runs in float32.
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

import numpy as np
import torch

from .attention import attention_backend
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
    """Every time of each function (seconds), run in turn (a, b, a, b, ...) after `warmup` untimed rounds."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times = {name: [] for name in fns}
    for _ in range(repeat):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return times


def spread(times: list[float]) -> float:
    """How far the slowest of repeated runs is above the fastest, in % of the fastest: a busy or
    throttled machine shows here, and a ratio is only as good as both rows' spreads."""
    return round(100 * (max(times) - min(times)) / min(times), 1)


def unet_inputs(seed: int = 0, batch: int = 2, size: int = 64):
    generator = torch.Generator().manual_seed(seed)
    latents = torch.randn(batch, 4, size, size, generator=generator)
    context = torch.randn(batch, 77, 768, generator=generator)
    return latents, context, torch.tensor([500.0] * batch)


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max())


def timed_rows(name: str, fns: dict, repeat: int, check=None, packed=(), packed_dtype=None, only=None) -> list[dict]:
    """Time `fns` in turn (`interleaved`) and report one row each: the best time, its `spread` over
    the repeats, its ratio to "diffusers" (fp32, timed in the same round) and `check()`'s max difference
    where it gives one. `packed`: sdlab models whose layers are packed meanwhile (in `packed_dtype`),
    as `generate` runs them on the CPU; `only`: keep just these rows."""
    with torch.inference_mode(), packed_weights(*packed, dtype=packed_dtype):
        times = interleaved(fns, repeat)
        diff = check() if check else None
    best = {who: min(t) for who, t in times.items()}
    print(f"  {name}: " + ", ".join(f"{k} {v:.3f} s" for k, v in best.items()), flush=True)
    rows = []
    for who, seconds in best.items():
        if only and who not in only:
            continue
        rows.append({"component": name, "impl": who, "seconds": round(seconds, 3), "spread_pct": spread(times[who]),
                     "ratio": round(seconds / best["diffusers"], 3),
                     **({"max_diff": float(f"{diff[who]:.3g}")} if diff and who in diff else {})})
    return rows


def autocast(fn):
    """`fn` run under CPU bf16 autocast (every weight recast to bf16 at every call)."""
    def run():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return fn()

    return run


def unet_functions(ours: dict, theirs: dict, size: int) -> dict:
    """One U-Net step of each library on the same inputs (batch 2, 4 x size x size latents), in
    float32 and under bf16 autocast ("sdlab" runs bf16 packed: see `component_rows`)."""
    from .diffusion import get_time_embedding

    latents, context, t = unet_inputs(size=size)
    time_emb = get_time_embedding(t, 320)

    def sdlab_unet():
        return ours["diffusion"](latents, context, time_emb).float()

    def diffusers_unet():
        return theirs["unet"](latents, t, encoder_hidden_states=context).sample

    return {"sdlab": sdlab_unet, "diffusers": diffusers_unet,
            "sdlab bf16 autocast": autocast(sdlab_unet), "diffusers bf16": autocast(diffusers_unet),
            "inputs": (latents, t, context)}


def peer_functions(theirs: dict, inputs: tuple, bf16: bool) -> dict:
    """OpenVINO (an optional dependency) running diffusers' U-Net, the same weights, converted from
    PyTorch: {"openvino": fn, "openvino bf16": fn}; {} with a message where OpenVINO is absent."""
    try:
        import openvino
    except ImportError:
        print("  --peers: OpenVINO is not installed (pip install openvino); its rows are skipped", flush=True)
        return {}

    class UNet(torch.nn.Module):  # positional inputs, one tensor out: what convert_model traces
        def __init__(self, unet):
            super().__init__()
            self.unet = unet

        def forward(self, latents, t, context):
            return self.unet(latents, t, encoder_hidden_states=context).sample

    print(f"  converting diffusers' U-Net to OpenVINO {openvino.__version__} ...", flush=True)
    with torch.no_grad():
        model = openvino.convert_model(UNet(theirs["unet"]), example_input=inputs)
    core, arrays, fns = openvino.Core(), [x.numpy() for x in inputs], {}
    for precision in ("f32", "bf16") if bf16 else ("f32",):
        config = {"INFERENCE_PRECISION_HINT": precision, "INFERENCE_NUM_THREADS": torch.get_num_threads()}
        request = core.compile_model(model, "CPU", config).create_infer_request()
        fns["openvino" + (" bf16" if precision == "bf16" else "")] = (
            lambda request=request: torch.from_numpy(request.infer(arrays)[0].copy()))
    return fns


def component_rows(ours: dict, theirs: dict, repeat: int, quick: bool, bf16: bool, peers: bool = False,
                   size: int | None = None) -> list[dict]:
    """CLIP, one U-Net step and a VAE decode, sdlab against diffusers (and OpenVINO with `peers`), on
    `size` x `size` latents (default 64, `quick` 32).

    The U-Net runs in three rounds, each with diffusers fp32 for the ratios: packed fp32 (as
    `generate` runs on the CPU; also while recording attention), packed bf16 (as `generate(...,
    dtype=torch.bfloat16)` runs: weights cast once) against diffusers and OpenVINO in bf16, and the
    plain eager model with the old way to bf16 (autocast, every weight recast at every call)."""
    from .inspect import record_attention
    from .tokenizer import load_tokenizer

    tokens = torch.tensor(load_tokenizer()([PROMPT, ""], padding="max_length", max_length=77, truncation=True).input_ids)
    size = size or (32 if quick else 64)
    vae_latents = torch.randn(1, 4, size, size, generator=torch.Generator().manual_seed(1))

    rows = timed_rows("CLIP (2x77 tokens)", {
        "sdlab": lambda: ours["clip"](tokens),
        "diffusers": lambda: theirs["clip"](tokens).last_hidden_state,
    }, repeat, lambda: {"sdlab": max_diff(ours["clip"](tokens), theirs["clip"](tokens).last_hidden_state)})

    unet = unet_functions(ours, theirs, size)
    peer = peer_functions(theirs, unet.pop("inputs"), bf16) if peers else {}

    def recording_unet():  # the same step while `inspect.record_attention` keeps every cross-attention map
        with record_attention(ours):
            return unet["sdlab"]()

    def fused_attention_unet():  # the same step on PyTorch's fused attention kernel (what "auto" replaces in bf16)
        with attention_backend("sdpa"):
            return unet["sdlab"]()

    # "sdlab", "sdlab bf16" and "sdlab unpacked": the same call, inside each round's packing block
    calls = {**unet, **peer, "sdlab recording attention": recording_unet, "sdlab bf16": unet["sdlab"],
             "sdlab unpacked": unet["sdlab"], "sdlab bf16 fused attention": fused_attention_unet}

    def diffs(*names):  # max differences against diffusers fp32
        def check():
            reference = unet["diffusers"]()
            return {name: max_diff(calls[name](), reference) for name in names}

        return check

    unet_row, fp32_peer = f"U-Net step (2x4x{size}x{size})", {k: v for k, v in peer.items() if "bf16" not in k}
    rows += timed_rows(unet_row, {"sdlab": unet["sdlab"], "sdlab recording attention": recording_unet,
                                  "diffusers": unet["diffusers"], **fp32_peer}, repeat,
                       diffs("sdlab", "sdlab recording attention", *fp32_peer), packed=[ours["diffusion"]])
    if bf16:
        bf16_peer = {k: v for k, v in peer.items() if "bf16" in k}
        bf16_rows = ["sdlab bf16", "sdlab bf16 fused attention", "diffusers bf16", *bf16_peer]
        rows += timed_rows(unet_row, {"diffusers": unet["diffusers"], **{name: calls[name] for name in bf16_rows}},
                           repeat, diffs(*bf16_rows), packed=[ours["diffusion"]], packed_dtype=torch.bfloat16,
                           only=bf16_rows)
    fns = {"sdlab unpacked": unet["sdlab"], "diffusers": unet["diffusers"]}
    if bf16:
        fns["sdlab bf16 autocast"] = unet["sdlab bf16 autocast"]
    rows += timed_rows(unet_row, fns, repeat, diffs(*(name for name in fns if name != "diffusers")),
                       only=[name for name in fns if name != "diffusers"])

    vae_row = f"VAE decode ({8 * size}x{8 * size})"

    def sdlab_vae():
        return ours["decoder"](vae_latents).float()

    def diffusers_vae():
        return theirs["vae"].decode(vae_latents / 0.18215).sample.float()

    def vae_diffs(*names):
        return lambda: {name: max_diff(vae[name](), diffusers_vae()) for name in names}

    vae = {"sdlab": sdlab_vae, "diffusers": diffusers_vae, "sdlab bf16": sdlab_vae, "diffusers bf16": autocast(diffusers_vae)}
    rows += timed_rows(vae_row, {k: vae[k] for k in ("sdlab", "diffusers")}, repeat, vae_diffs("sdlab"), packed=[ours["decoder"]])
    if bf16:  # the decoder packed in bf16, as generate(..., dtype=torch.bfloat16) runs it
        rows += timed_rows(vae_row, vae, repeat, vae_diffs("sdlab bf16", "diffusers bf16"), packed=[ours["decoder"]],
                           packed_dtype=torch.bfloat16, only=["sdlab bf16", "diffusers bf16"])
    return rows


# --- a whole image, one library per subprocess ---------------------------------------------------


#: the whole-image variants (DPM++ 2M, CFG 7.5 unless said)
VARIANTS = {
    "fp32": "packed float32 (generate's default on the CPU)",
    "bf16": "generate(dtype=torch.bfloat16): weights cast to bf16 once and packed",
    "lean": "weights stored in bf16 (loaded with dtype=torch.bfloat16), low_memory=True",
    "lcm": "sampler_name='lcm', 4 steps, cfg_scale=1, weights stored in bf16 (a fused LCM-LoRA adds no time)",
    "taesd": "the lcm run decoded by TAESD (sdlab.taesd; random weights seeded 0, bf16)",
    "lcm_fp32": "the lcm run in packed float32, on CPUs without bf16",
    "taesd_fp32": "the taesd run in packed float32, on CPUs without bf16",
}


def image_child(impl: str, ckpt: str, steps: int, size: int, variant: str = "fp32", n: int = 1) -> dict:
    """Load and generate `n` images in this (fresh) process; report seconds and peak RSS."""
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    start = time.perf_counter()
    if impl == "sdlab":
        from . import model_loader, pipeline

        stored = torch.bfloat16 if variant in ("lean", "lcm", "taesd") else None  # None: the file's (fp32 on the CPU)
        models = model_loader.preload_models_from_standard_weights(ckpt, "cpu", dtype=stored)
        if variant.startswith("taesd"):
            from .taesd import TAESD_Decoder

            torch.manual_seed(0)
            models["decoder"] = TAESD_Decoder().to(stored or torch.float32).eval().requires_grad_(False)
    else:
        models = reference_models(ckpt)
        pipe = reference_pipeline(models, diffusers_scheduler("dpmpp_2m"))
    gc.collect()
    load_s, load_rss = time.perf_counter() - start, peak_rss_gb()
    latents = torch.randn(n, 4, size // 8, size // 8, generator=torch.Generator().manual_seed(0))
    start = time.perf_counter()
    if impl == "sdlab":
        lcm = variant.startswith(("lcm", "taesd"))
        images = pipeline.generate(PROMPT, sampler_name="lcm" if lcm else "dpmpp_2m", n_inference_steps=4 if lcm else steps,
                                   cfg_scale=1.0 if lcm else 7.5, models=models, seed=0, height=size, width=size,
                                   latents=latents, progress=False, num_images=n, low_memory=variant == "lean",
                                   dtype=torch.bfloat16 if variant == "bf16" else None)
        image = np.stack(images) if n > 1 else images
    else:
        with torch.inference_mode():
            image = pipe(PROMPT, num_inference_steps=steps, guidance_scale=7.5, height=size, width=size,
                         latents=latents, output_type="np").images[0]
        image = (image * 255).round().astype("uint8")
    seconds = time.perf_counter() - start
    name = impl + ("" if variant == "fp32" else f" {variant}") + (f" x{n}" if n > 1 else "")
    return {"impl": name, "images": n, "load_s": round(load_s, 2), "load_peak_rss_gb": round(load_rss, 2),
            "seconds": round(seconds, 2), "images_per_min": round(60 * n / seconds, 2),
            "peak_rss_gb": round(peak_rss_gb(), 2), "image_mean": float(image.mean()), "image_std": float(image.std())}


def run_child(impl: str, ckpt: str, steps: int, size: int, variant: str = "fp32", n: int = 1) -> dict:
    command = [sys.executable, "-m", "sdlab", "bench", "--ckpt", ckpt, "--_child", impl,
               "--steps", str(steps), "--size", str(size), "--variant", variant, "--n", str(n)]
    result = subprocess.run(command, check=False, capture_output=True, text=True)
    if result.returncode:
        raise RuntimeError(f"the {impl} {variant} image run failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def image_runs(bf16: bool, batches: list[int]) -> list[tuple[str, str, int]]:
    """(library, variant, images) of each whole-image run: bf16 variants where the CPU has bf16, else the
    4-step LCM runs in float32."""
    runs = [("diffusers", "fp32", 1), ("sdlab", "fp32", 1)]
    if bf16:
        runs += [("sdlab", "bf16", 1), ("sdlab", "lean", 1)] + [("sdlab", "lcm", n) for n in batches]
        return runs + [("sdlab", "taesd", 1)]
    return runs + [("sdlab", "lcm_fp32", 1), ("sdlab", "taesd_fp32", 1)]


# --- the command ---------------------------------------------------------------------------------


def stored_run() -> dict:
    """The run shipped with sdlab, `sdlab/data/bench_sd15_cpu.json` (what chapter 8 and the README show)."""
    from importlib import resources

    return json.loads((resources.files("sdlab") / "data" / "bench_sd15_cpu.json").read_text())


def find_row(run: dict, impl: str, component: str | None = None) -> dict:
    """The first row of `impl` in `run`: among the components whose name starts with `component`, or
    with None among the whole images (every round times diffusers fp32 again: the first is kept)."""
    rows = run["image"] if component is None else [r for r in run["components"] if r["component"].startswith(component)]
    return next(row for row in rows if row["impl"] == impl)


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
    parser.add_argument("--peers", action="store_true", help="add OpenVINO's U-Net step on the same weights (if installed)")
    parser.add_argument("--batches", default="1,2,4", help="images per call of the 4-step LCM runs (images per minute)")
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")
    parser.add_argument("--_child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--steps", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--size", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--variant", default="fp32", choices=sorted(VARIANTS), help=argparse.SUPPRESS)
    parser.add_argument("--n", type=int, default=1, help=argparse.SUPPRESS)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    if args._child:
        print(json.dumps(image_child(args._child, args.ckpt, args.steps, args.size, args.variant, args.n)))
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
        results["components"] = component_rows(ours, theirs, args.repeat, args.quick, bf16, args.peers)
        del ours, theirs
        gc.collect()
        print(format_table(results["components"], ["component", "impl", "seconds", "spread_pct", "ratio", "max_diff"]))
    if not args.no_image:
        steps, size = (4, 256) if args.quick else (20, 512)
        print(f"whole image: DPM++ 2M, {steps} steps, {size}x{size}, one subprocess each ...", flush=True)
        for variant, what in VARIANTS.items():
            print(f"  {variant}: {what}")
        batches = [int(n) for n in args.batches.split(",") if n.strip()]
        for impl, variant, n in image_runs(bf16, batches):
            results["image"].append(run_child(impl, args.ckpt, steps, size, variant, n))
            print(f"  {results['image'][-1]}", flush=True)
        base = results["image"][0]["seconds"]
        for r in results["image"]:
            r["ratio"] = round(r["seconds"] / base, 3)
        print(format_table(results["image"], ["impl", "seconds", "ratio", "images_per_min", "load_s", "load_peak_rss_gb",
                                              "peak_rss_gb"]))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
