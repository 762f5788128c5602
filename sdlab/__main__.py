"""sdlab's command line.

    python -m sdlab generate "a red circle" [--ckpt v1-5-pruned-emaonly.safetensors] [options]
    python -m sdlab inspect FILE     (what a checkpoint file holds, without building any model)
    python -m sdlab train ...        (the tiny model; see `python -m sdlab train --help`)
    python -m sdlab evaluate ...     (prompt following of the tiny model)
    python -m sdlab finetune ...     (textual inversion and LoRA training on the tiny model)
    python -m sdlab bench --ckpt FILE [--quick]   (sdlab against diffusers, same weights)

Options left out take the model's own settings (`--steps`, `--cfg`, `--sampler`, `--height`,
`--width`: those of `models["diffusion"].sampling`); a value given, `0` included, is used as given
(`--cfg 0` is a legitimate guidance scale, `--steps 0` an error). Everything is checked before any
model is loaded: the output path (a new `.png` in an existing folder: sdlab never overwrites a
file; with `--n N`, each of OUTPUT-1.png ... OUTPUT-N.png and OUTPUT-grid.png), the device, the input image and mask, the numbers. Any sdlab error ends in one line on
stderr and exit status 2, as argparse's own errors do.
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
    gen.add_argument("--steps", type=int, default=None, help="sampling steps (default: the model's, SD1.5 50, tiny 20)")
    gen.add_argument("--sampler", default=None, choices=sampler_names(), help="default: the model's (SD1.5 ddpm, tiny dpmpp_2m)")
    gen.add_argument("--cfg", type=float, default=None, help="classifier-free guidance scale (default: the model's, SD1.5 7.5, tiny 5)")
    gen.add_argument("--seed", type=int, default=42, help="any integer (reduced modulo 2**64, as torch does)")
    gen.add_argument("--height", type=int, default=None, help="multiple of 8 (default: the model's, SD1.5 512, tiny 64)")
    gen.add_argument("--width", type=int, default=None, help="multiple of 8 (default: the model's, SD1.5 512, tiny 64)")
    gen.add_argument("--init-image", default=None, help="image-to-image: the starting picture")
    gen.add_argument("--mask", default=None, help="inpainting: white = repaint (needs --init-image)")
    gen.add_argument("--strength", type=float, default=0.8, help="img2img: how much to change, in (0, 1]")
    gen.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, mps")
    gen.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"])
    gen.add_argument("--lora", action="append", default=[], metavar="FILE[:SCALE]",
                     help="a LoRA file (kohya or diffusers format) merged in with SCALE (default 1); repeatable")
    gen.add_argument("--taesd", default=None, metavar="FILE",
                     help="decode with TAESD (taesd_decoder.safetensors/.pth or diffusers' AutoencoderTiny file): "
                          "1/18 of the VAE's work, a little softer; needs --ckpt")
    gen.add_argument("--n", type=int, default=1, metavar="N",
                     help="generate N images in one batch (seeds SEED, SEED+1, ...): OUTPUT-1.png ... OUTPUT-N.png "
                          "and OUTPUT-grid.png instead of OUTPUT")
    gen.add_argument("--output", "-o", default="sdlab.png", help="where to write the PNG (a new file)")
    inspect = commands.add_parser("inspect", help="describe a checkpoint file without building any model")
    inspect.add_argument("file")
    for name in ("train", "evaluate", "finetune"):
        sub = commands.add_parser(name, help=f"{name} the tiny model", add_help=False)
        sub.add_argument("args", nargs=argparse.REMAINDER)
    sub = commands.add_parser("bench", help="time sdlab against diffusers on the same weights", add_help=False)
    sub.add_argument("args", nargs=argparse.REMAINDER)
    return parser


def check_command_line(args) -> dict:
    """Everything `generate` is given, checked under the command line's own names before any work."""
    from . import arguments
    from .errors import ArgumentError
    from .images import check_mask_size, read_picture

    arguments.check_text(args.prompt, "prompt")
    arguments.check_text(args.negative, "--negative")
    arguments.check_int(args.n, "--n", 1, arguments.MAX_IMAGES, fix="1 for a single image")
    outputs = [arguments.check_output_path(path, "--output") for path in output_paths(args.output, args.n)]
    device = arguments.check_device(args.device, "--device")
    if args.steps is not None:
        arguments.check_int(args.steps, "--steps", 1, 1000, fix="20-50 is typical")
    if args.cfg is not None:
        arguments.check_real(args.cfg, "--cfg", fix="7.5 is typical, 0 ignores the prompt")
    for name in ("height", "width"):
        if getattr(args, name) is not None:
            arguments.check_size(getattr(args, name), f"--{name}", 8)
    arguments.check_real(args.strength, "--strength", 0, 1, open_low=True, fix="1 ignores the input image entirely")
    if args.taesd is not None and args.ckpt is None:
        raise ArgumentError("--taesd decodes SD1.x latents; the bundled tiny model has its own small VAE: "
                            "pass --ckpt with an SD1.x checkpoint, or leave --taesd out")
    if args.mask is not None and args.init_image is None:
        raise ArgumentError("--mask needs --init-image (the picture to repaint)")
    image = read_picture(args.init_image, "--init-image") if args.init_image is not None else None
    mask = read_picture(args.mask, "--mask", "L", "black") if args.mask is not None else None
    if mask is not None:
        check_mask_size(mask.size, image.size, "--mask")
    return {"outputs": outputs, "device": device, "image": image, "mask": mask, "loras": [lora_option(o) for o in args.lora]}


def output_paths(output, n: int) -> list:
    """Where `--n N` writes: OUTPUT itself for one image; else OUTPUT-1 ... OUTPUT-N and OUTPUT-grid
    (same folder and suffix; `a.png` -> `a-1.png`, ..., `a-grid.png`), the grid last."""
    output = Path(output) if isinstance(output, str) and output else output
    if n == 1 or not isinstance(output, Path):
        return [output]
    return [output.with_name(f"{output.stem}-{k}{output.suffix}") for k in [*range(1, n + 1), "grid"]]


def write_png(path: Path, image, settings: dict) -> None:
    """`image` as a new PNG at `path` with `settings` in its `parameters` text chunk; never overwrites."""
    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    from .errors import OutputPathError

    info = PngInfo()
    info.add_text("parameters", json.dumps(settings))
    info.add_text("Software", "sdlab")
    try:
        with open(path, "xb") as file:  # exclusive: a file that appeared meanwhile is not overwritten
            Image.fromarray(image).save(file, format="PNG", pnginfo=info)
    except FileExistsError:
        raise OutputPathError(f"--output {str(path)!r} appeared while generating; not overwritten, choose another name") from None


def lora_option(option: str) -> tuple[str, float]:
    """`--lora FILE[:SCALE]` -> (FILE, SCALE); a path that itself contains ':' keeps it unless a number follows."""
    from . import arguments

    path, _, scale = option.rpartition(":")
    try:
        value = float(scale)
    except ValueError:
        return option, 1.0
    arguments.check_real(value, f"--lora {option!r}: the scale", fix="1.0 is as trained, 0.5 half as strong")
    return path, value


def generate_command(args) -> Path:
    import torch

    from . import model_loader, pipeline
    from .images import image_grid

    checked = check_command_line(args)
    dtype = getattr(torch, args.dtype) if args.dtype else None
    taesd = None
    if args.taesd is not None:  # small: read (and checked) before the checkpoint
        from .taesd import load_taesd

        taesd = load_taesd(args.taesd, checked["device"], dtype=dtype)
    models = model_loader.preload_models_from_standard_weights(args.ckpt, checked["device"], dtype=dtype)
    if taesd is not None:
        from .config import SD15
        from .errors import ArgumentError

        if models["decoder"].config != SD15.vae:  # TAESD learned the SD1.x VAE's latent space, no other
            raise ArgumentError(f"--taesd decodes SD1.x latents, but --ckpt {args.ckpt!r} has another VAE "
                                f"({models['decoder'].config.base_channels} base channels); leave --taesd out")
        models["decoder"] = taesd
    if checked["loras"]:
        from .lora import load_lora

        for path, scale in checked["loras"]:
            load_lora(models, path, scale=scale)
    chosen = pipeline.sampling_settings(models, args.height, args.width, args.sampler, args.steps, args.cfg)
    settings = {
        "prompt": args.prompt, "negative_prompt": args.negative, "sampler": chosen["sampler_name"],
        "steps": chosen["n_inference_steps"], "cfg_scale": chosen["cfg_scale"], "seed": args.seed,
        "height": chosen["height"], "width": chosen["width"],
        "checkpoint": Path(args.ckpt).name if args.ckpt else "sdlab tiny (bundled)",
        "init_image": args.init_image, "mask": args.mask, "strength": args.strength if args.init_image else None,
        "loras": [{"file": Path(path).name, "scale": scale} for path, scale in checked["loras"]],
        "taesd": Path(args.taesd).name if args.taesd else None,
    }
    start = time.perf_counter()
    images = pipeline.generate(
        args.prompt, uncond_prompt=args.negative, input_image=checked["image"], mask_image=checked["mask"],
        strength=args.strength, models=models, seed=args.seed, device=checked["device"], num_images=args.n, **chosen,
    )
    settings["seconds"] = round(time.perf_counter() - start, 2)
    outputs = checked["outputs"]
    if args.n == 1:
        pngs = [(outputs[0], images, settings)]
    else:  # image k has seed + k; the grid records them all
        pngs = [(path, image, {**settings, "seed": args.seed + k, "image": f"{k + 1} of {args.n}"})
                for k, (path, image) in enumerate(zip(outputs, images))]
        pngs.append((outputs[-1], image_grid(images), {**settings, "seeds": [args.seed + k for k in range(args.n)],
                                                        "grid_of": [path.name for path in outputs[:-1]]}))
    for path, image, recorded in pngs:
        write_png(path, image, recorded)
        print(f"wrote {path} ({image.shape[1]}x{image.shape[0]}, {settings['seconds']} s)")
    return outputs[0] if args.n == 1 else outputs[-1]


def inspect_command(args) -> None:
    from .model_loader import inspect_checkpoint

    print(inspect_checkpoint(args.file))


def main(argv=None) -> int:
    from .errors import SdlabError

    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["bench"]:  # its own parser sees every option, --help included
        from . import bench

        return bench.main(argv[1:])
    args = build_parser().parse_args(argv[:1] if argv[:1] in (["train"], ["evaluate"], ["finetune"]) else argv)
    try:
        if args.command == "generate":
            generate_command(args)
        elif args.command == "inspect":
            inspect_command(args)
        else:  # train / evaluate / finetune: their own parsers see every option, --help included
            from .tiny import cli as train

            return getattr(train, f"main_{args.command}")(argv[1:])
    except (SdlabError, FileNotFoundError, FileExistsError, ValueError) as error:
        message = " ".join(str(error).split())  # one line, whatever the message holds
        print(f"error: {message}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
