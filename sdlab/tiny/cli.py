"""The tiny model's commands: `python -m sdlab train`, `python -m sdlab evaluate` and `finetune`.

    python -m sdlab train --out sdlab/data/tiny.safetensors --state /tmp/tiny-state.pt
    python -m sdlab evaluate --report sdlab/data/tiny_report.json
    python -m sdlab finetune --out-dir /tmp/ft --report /tmp/ft/finetune.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import torch

from ..model_loader import DEFAULT_CHECKPOINT
from .evaluate import DEFAULT_RUNS, evaluate_checkpoint
from .finetune import InversionSettings, LoraSettings, run_finetune
from .train import TrainSettings, train


def train_parser(parser=None) -> argparse.ArgumentParser:
    p = parser or argparse.ArgumentParser(prog="sdlab train", description="Train the tiny Stable Diffusion on Shapes.")
    p.add_argument("--out", default=str(DEFAULT_CHECKPOINT), help="where to write the weights (.safetensors)")
    p.add_argument("--state", default=None, help="training-state file for resuming (optimizer, step, EMA)")
    p.add_argument("--init", default=None, help="start from this checkpoint: keep its VAE, train its text encoder "
                   "and U-Net on for --unet-steps")
    for setting in dataclasses.fields(TrainSettings):  # --seed, --n-images, --vae-steps, ...
        p.add_argument("--" + setting.name.replace("_", "-"), type=type(setting.default), default=setting.default)
    p.add_argument("--stop-after", type=int, default=None, help="stop after N steps (resume later with --state)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: PyTorch's)")
    p.add_argument("--report", default=None, help="also evaluate and write this JSON report")
    p.add_argument("--eval-prompts", type=int, default=200)
    p.add_argument("--no-progress", action="store_true")
    return p


def evaluate_parser(parser=None) -> argparse.ArgumentParser:
    p = parser or argparse.ArgumentParser(prog="sdlab evaluate", description="Prompt-following on held-out prompts.")
    p.add_argument("--ckpt", default=None, help="checkpoint (default: the bundled tiny model)")
    p.add_argument("--n-prompts", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cfg-scale", type=float, default=None, help="guidance (default: the checkpoint's own; tiny: 2.5)")
    p.add_argument("--runs", default=",".join(f"{name}:{steps}" for name, steps in DEFAULT_RUNS),
                   help="comma-separated sampler:steps pairs")
    p.add_argument("--report", default=None, help="write the figures as JSON here")
    p.add_argument("--threads", type=int, default=None)
    return p


def main_train(argv=None) -> int:
    args = train_parser().parse_args(argv)
    settings = TrainSettings(**{s.name: getattr(args, s.name) for s in dataclasses.fields(TrainSettings)})
    result = train(out=args.out, state_path=args.state, settings=settings, init=args.init, stop_after=args.stop_after,
                   threads=args.threads, progress=not args.no_progress)
    if result is None:
        return 0
    if args.report:
        evaluate_checkpoint(args.out, n_prompts=args.eval_prompts, report=args.report, training=result["summary"])
    return 0


def main_evaluate(argv=None) -> int:
    args = evaluate_parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    runs = [(r.split(":")[0], int(r.split(":")[1])) for r in args.runs.split(",") if r]
    training = None
    if args.report and Path(args.report).exists():  # keep the training figures of an earlier report
        training = json.loads(Path(args.report).read_text()).get("training")
    evaluate_checkpoint(args.ckpt, n_prompts=args.n_prompts, seed=args.seed, cfg_scale=args.cfg_scale,
                        runs=runs, report=args.report, training=training)
    return 0


def finetune_parser(parser=None) -> argparse.ArgumentParser:
    p = parser or argparse.ArgumentParser(prog="sdlab finetune",
                                          description="Textual inversion and a LoRA on the tiny model, measured.")
    p.add_argument("--out-dir", required=True, help="an existing folder for the embedding and the LoRA file")
    p.add_argument("--report", default=None, help="write the figures as JSON here")
    for prefix, settings in (("ti", InversionSettings), ("lora", LoraSettings)):  # --ti-steps, --lora-rank, ...
        for setting in dataclasses.fields(settings):
            p.add_argument(f"--{prefix}-" + setting.name.replace("_", "-"), type=type(setting.default),
                           default=setting.default, dest=f"{prefix}_{setting.name}")
    p.add_argument("--n-eval", type=int, default=60, help="evaluation prompts per figure (at most 60)")
    p.add_argument("--overwrite", action="store_true", help="replace the files an earlier run wrote into --out-dir")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: PyTorch's)")
    return p


def main_finetune(argv=None) -> int:
    args = finetune_parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    inversion = InversionSettings(**{f.name: getattr(args, f"ti_{f.name}") for f in dataclasses.fields(InversionSettings)})
    lora = LoraSettings(**{f.name: getattr(args, f"lora_{f.name}") for f in dataclasses.fields(LoraSettings)})
    run_finetune(args.out_dir, args.report, inversion, lora, n_eval=args.n_eval, overwrite=args.overwrite)
    return 0

