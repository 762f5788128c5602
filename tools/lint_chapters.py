"""Lint the chapters' code as the reader gets it: `python tools/lint_chapters.py [chapter ...]`.

Each chapter is built into a notebook (setup cell filled in, nothing executed) in a
temporary folder and checked there by ruff, which reads notebooks cell by cell (a `;` that hides
a cell's last value is fine there). Rules: pyflakes (undefined and unused names, redefinitions,
f-strings without fields ...) and pycodestyle's E4/E7/E9 (imports, statements, syntax errors) but E402, since a notebook
imports where it first needs a module.

The prose is checked too: a number typed into a sentence goes stale the day the cell beside it
prints another, so every digit in the Markdown must be computed — a glue role
({glue:text}`name:.3f`, filled in from a value the cell glued) — or sit where a number is not a
claim: code, math, headings, listings, link targets, or one of `ALLOWED` below.

Exits non-zero with ruff's report and the typed numbers, naming the chapter source, when anything
is found.
"""

from __future__ import annotations

import re
import subprocess
import sys
import tempfile
from pathlib import Path

import nbformat

sys.path.insert(0, str(Path(__file__).parent))

from nbtools import chapter_names, notebook  # noqa: E402

RULES = ["--select", "F,E4,E7,E9", "--ignore", "E402", "--line-length", "120"]  # E402: a notebook imports as it goes


# Where a digit in the prose is not a measured claim. Keep this list short: anything else is glued.
ALLOWED = {
    "a chapter": r"\b[Cc]hapters? \d+(?:(?:, | and | or |–)\d+)*",
    "a citation's year": r"et al\. \d{4}",
    "the model's name": r"\bSD ?1\.[5x]\b|\bv1\.x\b|\bv1-5\b|Stable Diffusion 1\.5|ViT-L/14|DPM\+\+ 2M",
    "an image or kernel size": r"\b\d+×\d+(?:×\d+)*",
    "a numbered list": r"^\s*(?:\*\*)?\d+\. ",
    "a directive's label": r"^:label: [\w-]+$|^:::\{solution-(?:start|end)\}.*$",
    "2-D/3-D": r"\b[23]-D\b",
}
NOT_PROSE = [
    r"(?ms)^(`{3,}).*?^\1",  # fenced code and listings
    r"(?s)\$\$.*?\$\$", r"\$[^$]+\$",  # display and inline math
    r"\{glue(?::\w+)?\}`[^`]*`",  # computed numbers
    r"(`+)[^`]*?\1",  # inline code
    r"\]\([^)]*\)",  # link targets
    r"(?m)^#+ .*$",  # headings
    r"<!--.*?-->",
]
NUMBER = re.compile(r"(?<![\w.])\d+(?:[.,]\d+)*")


def prose_numbers(markdown: str) -> list[tuple[str, str]]:
    """(number, the line it is on) for each number typed into the prose of `markdown`."""
    for pattern in [*NOT_PROSE, *ALLOWED.values()]:
        markdown = re.sub(pattern, " ", markdown, flags=re.M)
    return [(number[0], line.strip()) for line in markdown.split("\n") for number in NUMBER.finditer(line)]


def typed_numbers(name: str) -> list[str]:
    """Each number in the chapter's Markdown prose that is neither computed nor in an allowed
    place, as 'name cell N: typed number ... in: the line'."""
    return [f"{name} cell {i}: typed number {number!r} in: {line[:100]}"
            for i, cell in enumerate(notebook(name, listings=False).cells) if cell.cell_type == "markdown"
            for number, line in prose_numbers(cell.source)]


def lint(names: list[str]) -> subprocess.CompletedProcess:
    with tempfile.TemporaryDirectory() as folder:
        paths = []
        for name in names:
            path = Path(folder) / f"{name}.ipynb"
            nbformat.write(notebook(name, listings=False), path)
            paths.append(str(path))
        done = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", "--isolated",
                               "--output-format", "concise", *RULES, *paths],
                              capture_output=True, text=True, cwd=folder)
        done.stdout = done.stdout.replace(folder + "/", "tools/chapters/ (as notebook) ")
    typed = [line for name in names for line in typed_numbers(name)]
    if typed:
        done.stdout += "\n".join(typed) + f"\n{len(typed)} numbers typed into the prose: glue them " \
            "(glue(name, value) in the cell, {glue:text}`name` in the text) or write them as math\n"
        done.returncode = done.returncode or 1
    return done


if __name__ == "__main__":
    result = lint(sys.argv[1:] or chapter_names())
    print(result.stdout + result.stderr, end="")
    sys.exit(result.returncode)
