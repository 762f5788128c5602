"""sdlab's command line.

    python -m sdlab generate "a red circle" [--ckpt v1-5-pruned-emaonly.safetensors] [options]
    python -m sdlab train ...        (the tiny model; see `python -m sdlab train --help`)
    python -m sdlab evaluate ...     (prompt following of the tiny model)
    python -m sdlab bench --ckpt FILE [--quick]   (sdlab against diffusers, same weights)
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def build_parser() -> argparse.ArgumentParser:
    from .samplers import sampler_names

    parser = argparse.ArgumentParser(prog="python -m sdlab", description="Stable Diffusion v1.x from scratch")
    commands = parser.add_subparsers(dest="command", required=True)
    gen = commands.add_parser("generate", help="generate an image from a prompt and write it as PNG")
    gen.add_argument("prompt")
    gen.add_argument("--ckpt", default=None, help="v1-5-pruned-emaonly .safetensors/.ckpt (default: the bundled tiny model)")
    gen.add_argument("--negative", default="", help="negative prompt")
    gen.add_argument("--steps", type=int, default=None, help="sampling steps (default 50 for ddpm, else 20)")
    gen.add_argument("--sampler", default="dpmpp_2m", choices=sampler_names())
    gen.add_argument("--cfg", type=float, default=None, help="classifier-free guidance scale (default 7.5; tiny model 5)")
    gen.add_argument("--seed", type=int, default=42)
    gen.add_argument("--height", type=int, default=None, help="multiple of 8 (default 512; tiny model 64)")
    gen.add_argument("--width", type=int, default=None, help="multiple of 8 (default 512; tiny model 64)")
    gen.add_argument("--init-image", default=None, help="image-to-image: the starting picture")
    gen.add_argument("--mask", default=None, help="inpainting: white = repaint (needs --init-image)")
    gen.add_argument("--strength", type=float, default=0.8, help="img2img: how much to change, in (0, 1]")
    gen.add_argument("--device", default="cpu", help="cpu, cuda, mps")
    gen.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"])
    gen.add_argument("--output", "-o", default="sdlab.png", help="where to write the PNG")
    for name in ("train", "evaluate"):
        sub = commands.add_parser(name, help=f"{name} the tiny model", add_help=False)
        sub.add_argument("args", nargs=argparse.REMAINDER)
    sub = commands.add_parser("bench", help="time sdlab against diffusers on the same weights", add_help=False)
    sub.add_argument("args", nargs=argparse.REMAINDER)
    return parser


def generate_command(args) -> Path:
    import torch
    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    from . import model_loader, pipeline

    dtype = getattr(torch, args.dtype) if args.dtype else None
    models = model_loader.preload_models_from_standard_weights(args.ckpt, args.device, dtype=dtype)
    tiny = args.ckpt is None
    default_size = 64 if tiny else 512
    settings = {
        "prompt": args.prompt, "negative_prompt": args.negative, "sampler": args.sampler,
        "steps": args.steps or (50 if args.sampler == "ddpm" else 20), "cfg_scale": args.cfg or (5.0 if tiny else 7.5),
        "seed": args.seed, "height": args.height or default_size, "width": args.width or default_size,
        "checkpoint": Path(args.ckpt).name if args.ckpt else "sdlab tiny (bundled)",
        "init_image": args.init_image, "mask": args.mask, "strength": args.strength if args.init_image else None,
    }
    start = time.perf_counter()
    image = pipeline.generate(
        args.prompt, uncond_prompt=args.negative, input_image=Image.open(args.init_image) if args.init_image else None,
        mask_image=Image.open(args.mask) if args.mask else None, strength=args.strength, cfg_scale=settings["cfg_scale"],
        sampler_name=args.sampler, n_inference_steps=settings["steps"], models=models, seed=args.seed,
        device=args.device, height=settings["height"], width=settings["width"],
    )
    settings["seconds"] = round(time.perf_counter() - start, 2)
    info = PngInfo()
    info.add_text("parameters", json.dumps(settings))
    info.add_text("Software", "sdlab")
    output = Path(args.output)
    if output.exists():
        raise FileExistsError(f"{output} exists; choose another --output (sdlab never overwrites your files)")
    Image.fromarray(image).save(output, pnginfo=info)
    print(f"wrote {output} ({settings['width']}x{settings['height']}, {settings['seconds']} s)")
    return output


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["bench"]:  # its own parser sees every option, --help included
        from . import bench

        return bench.main(argv[1:])
    args = build_parser().parse_args(argv[:1] if argv[:1] in (["train"], ["evaluate"]) else argv)
    try:
        if args.command == "generate":
            generate_command(args)
        else:  # train / evaluate: their own parsers see every option, --help included
            from . import train

            return getattr(train, f"main_{args.command}")(argv[1:])
    except (FileNotFoundError, FileExistsError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
