"""Lint the chapters' code as the reader gets it: `python tools/lint_chapters.py [chapter ...]`.

Each chapter is built into a notebook (setup cell filled in, nothing executed) in a
temporary folder and checked there by ruff, which reads notebooks cell by cell (a `;` that hides
a cell's last value is fine there). Rules: pyflakes (undefined and unused names, redefinitions,
f-strings without fields ...) and pycodestyle's E4/E7/E9 (imports, statements, syntax errors) but E402, since a notebook
imports where it first needs a module.
Exits non-zero with ruff's report, naming the chapter source, when anything is found.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

import nbformat

sys.path.insert(0, str(Path(__file__).parent))

from nbtools import chapter_names, notebook  # noqa: E402

RULES = ["--select", "F,E4,E7,E9", "--ignore", "E402", "--line-length", "120"]  # E402: a notebook imports as it goes


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
    return done


if __name__ == "__main__":
    result = lint(sys.argv[1:] or chapter_names())
    print(result.stdout + result.stderr, end="")
    sys.exit(result.returncode)
