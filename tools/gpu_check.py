"""The GPU measurements of the speed issue, in one run on a CUDA device (`tools/gpu_check.sh`).

    python tools/gpu_check.py --ckpt random-v1-5.safetensors [--json gpu.json]

On the same SD1.5-layout weights (random ones are fine: the speed does not depend on them):

* fp16 U-Net iterations per second at 512x512 (batch 2, CFG), sdlab (autocast) against diffusers
  fp16 with PyTorch's SDPA, alternating, best of `--repeat`;
* the peak GPU memory of a whole 20-step image with `low_memory=True` (goal: at most 4 GB);
* parity: sdlab's fp16 U-Net output against its fp32 output (max and relative rms difference).

Nothing here runs in CI (there is no GPU there); record the printed JSON in the book.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from sdlab import model_loader, pipeline
from sdlab.bench import PROMPT, max_diff, unet_inputs
from sdlab.diffusion import get_time_embedding
from sdlab.reference import reference_models


def best_rate(fn, repeat: int) -> float:
    """Iterations per second of `fn` (a CUDA call), best of `repeat` after one warm-up."""
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return 1 / min(times)


def diffusers_rate(ckpt, inputs, repeat: int) -> float:
    """diffusers' fp16 U-Net (PyTorch's SDPA attention, its default) on the same weights: it/s."""
    latents, t, context = inputs
    unet = reference_models(ckpt)["unet"].to(inputs[0].device, torch.float16)
    with torch.inference_mode():
        return best_rate(lambda: unet(latents.half(), t, encoder_hidden_states=context.half()).sample, repeat)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ckpt", required=True, help="an SD1.5-layout .safetensors file")
    parser.add_argument("--repeat", type=int, default=10)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_check: no CUDA device here; run it on a GPU machine", file=sys.stderr)
        return 2
    cuda = torch.device("cuda")
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    latents, context, t = (x.to(cuda) for x in unet_inputs())
    time_emb = get_time_embedding(t.cpu(), 320).to(cuda)

    ours = model_loader.preload_models_from_standard_weights(args.ckpt, cuda)
    with torch.inference_mode():
        full = ours["diffusion"](latents, context, time_emb)
        with torch.autocast("cuda", dtype=torch.float16):
            half = ours["diffusion"](latents, context, time_emb).float()
            result["sdlab_fp16_it_s"] = best_rate(lambda: ours["diffusion"](latents, context, time_emb), args.repeat)
    rms = float((half - full).pow(2).mean().sqrt() / full.std())
    result.update(fp16_vs_fp32_max_diff=max_diff(half, full), fp16_vs_fp32_relative_rms=rms)

    result["diffusers_fp16_sdpa_it_s"] = diffusers_rate(args.ckpt, (latents, t, context), args.repeat)
    result["sdlab_vs_diffusers_speed"] = result["sdlab_fp16_it_s"] / result["diffusers_fp16_sdpa_it_s"]

    ours = {name: model.half() for name, model in ours.items()}
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    pipeline.generate(PROMPT, models=ours, seed=0, sampler_name="dpmpp_2m", n_inference_steps=20, device=cuda,
                      low_memory=True, progress=False)
    result["image_20_steps_s"] = time.perf_counter() - start
    result["low_memory_peak_gb"] = torch.cuda.max_memory_allocated() / 1e9
    print(json.dumps(result, indent=2))
    if args.json:
        with open(args.json, "w") as out:
            json.dump(result, out, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
