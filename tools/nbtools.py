"""Build the book's chapters as executed notebooks from plain Python cell lists.

Each chapter lives in `tools/chapters/<name>.py` as a list `CELLS` of `md(...)` and `code(...)`
cells. `python tools/build_notebooks.py [name ...]` writes `book/<name>.ipynb` and executes it in
`book/` (as nbval and Colab will), storing the outputs and the widget state. The committed artefact
is the executed notebook; this script only makes it reproducible.
"""

from __future__ import annotations

import textwrap

import nbformat

COLAB_REPO = "sdlab/sdlab"

SETUP = '''\
# Setup: in Colab, install sdlab; in a clone of the repository, import it from the parent folder.
import sys

if "google.colab" in sys.modules:
    import subprocess

    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "git+https://github.com/sdlab/sdlab"], check=True)
try:
    import sdlab
except ImportError:
    import os

    sys.path.insert(0, os.path.abspath(".."))  # the notebooks live in book/, the package next to it
    import sdlab

import matplotlib
import matplotlib.pyplot as plt
import numpy as np
import torch

torch.manual_seed(0)
torch.set_num_threads(1)  # the book's models are small: one thread is faster and steadier than two
plt.rcParams.update({"figure.dpi": 80, "savefig.dpi": 80, "figure.figsize": (8, 3.2), "image.interpolation": "nearest"})
print(f"sdlab {sdlab.__version__}, torch {torch.__version__.split('+')[0]}")'''


def md(text: str) -> nbformat.NotebookNode:
    return nbformat.v4.new_markdown_cell(textwrap.dedent(text).strip("\n"))


def code(text: str, check: bool = False, hide: bool = False, tags: list[str] | None = None) -> nbformat.NotebookNode:
    """A code cell; `check=True` adds nbval's `# NBVAL_CHECK_OUTPUT` marker (output compared in CI)."""
    source = textwrap.dedent(text).strip("\n")
    if check:
        source = "# NBVAL_CHECK_OUTPUT\n" + source
    cell = nbformat.v4.new_code_cell(source)
    tags = list(tags or [])
    if hide:
        tags.append("hide-input")
    if tags:
        cell.metadata["tags"] = tags
    return cell


def setup() -> nbformat.NotebookNode:
    return code(SETUP, tags=["hide-input"])


def notebook(cells, name: str) -> nbformat.NotebookNode:
    nb = nbformat.v4.new_notebook()
    nb.cells = list(cells)
    nb.metadata.update(
        {
            "kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
            "language_info": {"name": "python"},
            "colab": {"provenance": [], "name": f"{name}.ipynb"},
        }
    )
    return nb
