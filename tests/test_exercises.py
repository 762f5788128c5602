"""The exercise checks of `sdlab.exercises`: each accepts its reference answer and rejects a typical
wrong one with a message naming what is wrong; every exercise of the chapters has exactly one
solution in `tools/chapters/solutions.py` (and the reverse), and every check an exercise names exists.

The reference solutions themselves run, through their checks, as the notebook `book/course/solutions.ipynb`
(nbval); the answers here are the same ones, written compactly."""

from __future__ import annotations

import math
import re
import sys
from pathlib import Path

import pytest
import torch

from sdlab import exercises as ex

ROOT = Path(__file__).resolve().parents[1]
CHAPTERS = sorted((ROOT / "tools" / "chapters").glob("[0-9]*.py"))
SOLUTIONS = ROOT / "tools" / "chapters" / "solutions.py"


def entropy(q, k, scale=1.0):
    p = torch.softmax(scale * q @ k.transpose(-1, -2), dim=-1)
    return -(p * p.clamp_min(1e-30).log()).sum(-1).mean()


def masked_attention(q, k, v, padding, use_mask=True):
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if use_mask:
        scores = scores.masked_fill(padding[:, None, None, :], float("-inf"))
    return scores.softmax(-1) @ v


def bucket_means(timesteps, losses, n_buckets, mean=True):
    index = timesteps * n_buckets // 1000
    sums = torch.zeros(n_buckets).index_add_(0, index, losses)
    return sums / torch.bincount(index, minlength=n_buckets) if mean else sums


def ddim_sigma(alpha_bar, alpha_bar_prev, eta):
    return eta * ((1 - alpha_bar_prev) / (1 - alpha_bar)) ** 0.5 * (1 - alpha_bar / alpha_bar_prev) ** 0.5


def shapes_images(n: int, seed: int) -> torch.Tensor:
    from sdlab.tiny import data

    return torch.stack([data.to_tensor(data.render(s, 64)) for s in data.sample_scenes(n, seed=seed)])


def tiny_latents(images: torch.Tensor) -> torch.Tensor:
    encoder = ex.tiny_models()["encoder"]
    with torch.no_grad():
        return encoder.moments(images)[0] * encoder.config.scale_factor


def decoded(latents):
    with torch.no_grad():
        return ex.tiny_models()["decoder"](latents)


def posterior_std(images, variance=False):
    with torch.no_grad():
        log_v = ex.tiny_models()["encoder"].moments(images)[1]
    return (log_v.exp() if variance else torch.exp(0.5 * log_v)).mean()


def scale_factor(images):
    with torch.no_grad():
        mu, log_v = ex.tiny_models()["encoder"].moments(images)
    return 1 / (mu + torch.exp(0.5 * log_v) * torch.randn(mu.shape, generator=torch.Generator().manual_seed(1))).std()


def interpolation(n=4, wrong=False):
    z = tiny_latents(shapes_images(2, 3))
    t = torch.linspace(0, 1, n).view(-1, 1, 1, 1)
    path = (1 - t) * z[:1] + t * z[1:] if not wrong else t * z[:1] + (1 - t) * z[1:]
    return decoded(path), z[:1], z[1:]


def ablation(wrong=False):
    z = tiny_latents(shapes_images(1, 4))
    keep = (torch.arange(4) == torch.arange(4)[:, None]) if wrong else (torch.arange(4) != torch.arange(4)[:, None])
    return decoded(z * keep.view(4, 4, 1, 1).float()), z


def vae_flops_ratio(side):
    from sdlab.config import TINY

    unet = TINY.unet
    return ex._meta_flops(lambda: ex.Diffusion(unet), (1, 4, side, side), (1, 77, 64), (1, 64)).get_total_flops() / \
        ex._meta_flops(lambda: ex.Diffusion(unet), (1, 4, 8, 8), (1, 77, 64), (1, 64)).get_total_flops()


def decoder_flops():
    from sdlab.config import SD15
    from sdlab.decoder import VAE_Decoder

    return ex._meta_flops(lambda: VAE_Decoder(SD15.vae), (1, 4, 64, 64)).get_total_flops()


L, D = 4096, 320
PROMPT_A, PROMPT_B = "a large red circle to the left of a small blue square", "a large red circle to the left of a small green square"
LONG = " ".join(f"{c} circle" for c in ["red", "green", "blue", "yellow"] * 12)

# check name: (right answer, wrong answer, a phrase the wrong answer's message must contain), each as
# a function giving the (args, kwargs) to call the check with
CASES = {
    "check_unet_parameters": (lambda: ((ex.unet_parameters(base_channels=160),), {"base_channels": 160}),
                              lambda: ((ex.unet_parameters() / 4,), {"base_channels": 160}), "parameters of UNetConfig(base_channels=160)"),
    "check_models_needed": (lambda: (({"clip", "diffusion", "decoder"}, set(ex.MODEL_NAMES)), {}),
                            lambda: (({"clip", "diffusion"}, set(ex.MODEL_NAMES)), {}), "also needs ['decoder']"),
    "check_compression_factor": (lambda: ((48,), {}), lambda: ((8,), {}), "not just the side ratio"),
    "check_unscaled_entropy": (lambda: ((entropy,), {}),
                               lambda: ((lambda q, k: entropy(q, k, 1 / math.sqrt(q.shape[-1])),), {}), "*with* the 1/sqrt(d_k)"),
    "check_equivariance_error": (lambda: ((lambda a, x, p: (a(x[:, p]) - a(x)[:, p]).abs().max().detach(),), {}),
                                 lambda: ((lambda a, x, p: (a(x[:, p]) - a(x)).abs().max().detach(),), {}), "for SelfAttention"),
    "check_attention_macs": (lambda: ((4 * L * D * D, 2 * L * L * D), {}),
                             lambda: ((8 * L * D * D, 2 * L * L * D), {}), "a multiply-add is 2 FLOPs"),
    "check_padding_mask": (lambda: ((masked_attention,), {}),
                           lambda: ((lambda q, k, v, p: masked_attention(q, k, v, p, use_mask=False),), {}), "without the mask"),
    "check_long_word": (lambda: (("antidisestablishmentarianism",), {}), lambda: (("cat",), {}), "'cat' is 1 token"),
    "check_truncation": (lambda: ((LONG, LONG.split()[75:]), {}), lambda: ((LONG, LONG.split()[77:]), {}),
                         "the words never seen are the 21"),
    "check_unmasked_agreement": (lambda: (([76],), {}), lambda: (([0],), {}), "the positions that agree are [76]"),
    "check_causal_prefix": (lambda: ((PROMPT_A, PROMPT_B, 11), {}), lambda: ((PROMPT_A, PROMPT_B, 10), {}),
                            "the first position whose output differs is 11"),
    "check_posterior_std": (lambda: ((posterior_std(shapes_images(6, 3)), shapes_images(6, 3)), {}),
                            lambda: ((posterior_std(shapes_images(6, 3), variance=True), shapes_images(6, 3)), {}),
                            "that is the variance v"),
    "check_interpolation": (lambda: (interpolation(), {}), lambda: (interpolation(wrong=True), {}), "first picture z_a"),
    "check_channel_ablation": (lambda: (ablation(), {}), lambda: (ablation(wrong=True), {}), "channel c of the latents set to 0"),
    "check_scale_factor": (lambda: ((scale_factor(shapes_images(64, 0)), shapes_images(64, 0)), {}),
                           lambda: ((1 / scale_factor(shapes_images(64, 0)), shapes_images(64, 0)), {}), "the factor is 1 / std"),
    "check_first_differing_layers": (lambda: (("unet.encoders.1.0", "unet.encoders.1.1"), {}),
                                     lambda: (("unet.encoders.0.0", "unet.encoders.1.1"), {}), "'unet.encoders.1.0' (a UNET_ResidualBlock)"),
    "check_time_frequencies": (lambda: ((2 * math.pi, 2 * math.pi * 10000 ** (159 / 160)), {}),
                               lambda: ((1.0, 2 * math.pi * 10000 ** (159 / 160)), {}), "period of the fastest sinusoid"),
    "check_alphas_cumprod": (lambda: ((torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000), 0),), {}),
                             lambda: ((1 - torch.linspace(1e-4, 0.02, 1000),), {}), "that is alpha_t = 1 - beta_t"),
    "check_predict_x0": (lambda: ((lambda x, e, a: (x - (1 - a) ** 0.5 * e) / a**0.5,), {}),
                         lambda: ((lambda x, e, a: (x - a**0.5 * e) / (1 - a) ** 0.5,), {}), "the square roots are swapped"),
    "check_ddim_sigma": (lambda: ((ddim_sigma,), {}), lambda: ((lambda a, ap, eta: ddim_sigma(a, ap, eta) ** 2,), {}),
                         "σ = η sqrt((1 - ᾱ') / (1 - ᾱ))"),
    "check_negative_prompt": (lambda: (("a large circle in the center", "a large white circle in the center", "white"), {}),
                              lambda: (("a large circle in the center", "", "white"), {}), "still give white"),
    "check_enough_steps": (lambda: (("dpmpp_2m", 15), {}), lambda: (("dpmpp_2m", 4), {}), "use more steps"),
    "check_loss_per_bucket": (lambda: ((bucket_means,), {}),
                              lambda: ((lambda t, loss, n: bucket_means(t, loss, n, mean=False),), {}), "divide by the count"),
    "check_vae_downsampling": (lambda: (((4, 16, 16), vae_flops_ratio(16)), {}),
                               lambda: (((4, 8, 8), vae_flops_ratio(16)), {}), "the latents are (4, 16, 16)"),
    "check_score_bytes": (lambda: ((8 * 1024 * 4096 * 4,), {"queries": 1024}),
                          lambda: ((8 * 1024 * 4096,), {"queries": 1024}), "takes 4 bytes a number"),
    "check_decoder_flops": (lambda: ((decoder_flops(),), {}), lambda: ((decoder_flops() / 2,), {}), "FlopCounterMode counts 2 FLOPs"),
    "check_costliest_level": (lambda: ((64,), {}), lambda: ((8,), {}), "the costliest level is the 64×64 one"),
}


def test_every_check_has_cases():
    checks = {name for name in dir(ex) if name.startswith("check_") and callable(getattr(ex, name))}
    assert checks == set(CASES), f"checks without a test: {checks - set(CASES)}; tests of no check: {set(CASES) - checks}"


@pytest.mark.parametrize("name", sorted(CASES))
def test_check_accepts_the_reference_and_names_what_is_wrong(name, capsys):
    right, wrong, phrase = CASES[name]
    check = getattr(ex, name)
    args, kwargs = right()
    assert check(*args, **kwargs) is None
    assert capsys.readouterr().out.startswith("✓ ")
    args, kwargs = wrong()
    with pytest.raises(AssertionError) as error:
        check(*args, **kwargs)
    assert phrase in str(error.value), f"{name}: the message does not say {phrase!r}: {error.value}"


def directives(path: Path, kind: str) -> list[str]:
    """The labels of the `{exercise}` directives (their `:label:`) or the targets of `{solution-start}`."""
    text = "\n".join(line[2:] if line.startswith("# ") else line for line in path.read_text().splitlines())
    if kind == "exercise":
        return re.findall(r"^:::\{exercise\}\n:label: (\S+)$", text, re.M)
    return re.findall(r"^:::\{solution-start\} (\S+)$", text, re.M)


def test_every_exercise_has_exactly_one_solution_and_every_solution_an_exercise():
    labels = [label for chapter in CHAPTERS for label in directives(chapter, "exercise")]
    solved = directives(SOLUTIONS, "solution")
    assert len(labels) == len(set(labels)), f"duplicate exercise labels: {sorted(labels)}"
    assert sorted(solved) == sorted(set(labels)), \
        f"exercises without a solution: {sorted(set(labels) - set(solved))}; solutions of no exercise or twice: " \
        f"{sorted(set(solved) - set(labels)) + sorted({s for s in solved if solved.count(s) > 1})}"
    for chapter in CHAPTERS:  # ex-N-k: N the chapter, k = 1, 2, ... in order
        number = int(chapter.name[:2])
        own = directives(chapter, "exercise")
        assert own == [f"ex-{number}-{k}" for k in range(1, len(own) + 1)], f"{chapter.name}: labels {own}"
        assert own, f"{chapter.name} has no exercise"
    assert solved == labels, "the solutions are not in the exercises' order"


def test_every_check_an_exercise_names_exists_and_every_solution_runs_its_check():
    text = "\n".join(chapter.read_text() for chapter in CHAPTERS)
    blocks = re.findall(r"^# :::\{exercise\}\n(.*?)^# :::$", text, re.M | re.S)
    named = set()
    for block in blocks:
        found = set(re.findall(r"\b(check_\w+)\(", block))
        assert found or "answer in words" in block, f"an exercise names no check and is not a question in words: {block[:200]}"
        named |= found
    missing = {name for name in named if not callable(getattr(ex, name, None))}
    assert not missing, f"exercises name checks that sdlab.exercises lacks: {sorted(missing)}"
    solutions = SOLUTIONS.read_text()
    assert named <= set(re.findall(r"\b(check_\w+)\(", solutions)), "a check the exercises name is never run by a solution"
    assert named == set(CASES), f"checks no exercise names: {sorted(set(CASES) - named)}"


def test_solutions_page_is_built_from_its_source_and_canonical():
    """`book/course/solutions.ipynb` is what `python tools/build_notebooks.py solutions` writes from the source now."""
    import jupytext
    import nbformat

    sys.path.insert(0, str(ROOT / "tools"))
    import build_notebooks

    text = SOLUTIONS.read_text()
    assert jupytext.writes(jupytext.reads(text, fmt="py:percent"), fmt="py:percent") == text
    fresh = build_notebooks.chapter("solutions")
    old = nbformat.read(ROOT / "book" / "course" / "solutions.ipynb", as_version=4)
    rebuild = "rebuild it: python tools/build_notebooks.py solutions"
    assert [c.cell_type for c in old.cells] == [c.cell_type for c in fresh.cells], rebuild
    for i, (new, kept) in enumerate(zip(fresh.cells, old.cells)):
        assert kept.source == new.source, f"solutions cell {i} differs from tools/chapters/solutions.py: {rebuild}"
    assert not [o for c in old.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]


def test_solutions_code_lints_and_prose_types_no_number():
    """ruff on the page's code (as `tools/lint_chapters.py`); the prose rule of `lint_chapters` on its
    Markdown, where a directive's line (`:::{solution-start} ex-N-k`) names a label, not a claim."""
    sys.path.insert(0, str(ROOT / "tools"))
    import lint_chapters
    from nbtools import notebook

    done = lint_chapters.lint(["solutions"])
    assert "All checks passed!" in done.stdout, done.stdout
    typed = [found for cell in notebook("solutions", listings=False).cells if cell.cell_type == "markdown"
             for found in lint_chapters.prose_numbers(re.sub(r"(?m)^:::\{[\w-]+\}.*$", " ", cell.source))]
    assert not typed, typed
