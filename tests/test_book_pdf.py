"""The PDF for teachers: one file, chapters numbered once, static figures for widgets and animations.

Reads `book/_build/latex/sdlab.pdf` (made by `bash tools/build_pdf.sh`, XeLaTeX, warnings as
errors; built now when it is missing or older than its sources) with poppler's `pdfinfo`,
`pdftotext` and `pdfimages` (`apt-get install -y poppler-utils`), and its LaTeX source beside it.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# SDLAB_BOOK_LATEX=dir tests a PDF already built there (sdlab.pdf and sdlab.tex), as it is
PREBUILT = os.environ.get("SDLAB_BOOK_LATEX")
LATEX = Path(PREBUILT).resolve() if PREBUILT else ROOT / "book" / "_build" / "latex"
PDF = LATEX / "sdlab.pdf"
# what a widget, an animation or a figure prints as when no picture stands in for it
REPRS = ("interactive(children=", "IPython.core.display", "object at 0x", "<Figure size", "Output()", "<IPython")

sys.path.insert(0, str(ROOT / "book" / "_ext"))
from print_book import STATIC, WIDGET_VIEW, add_static_pictures
from test_book import build_unless_fresh, chapters, stored_notebook  # tests/ is on sys.path (conftest.py)


def _toc_files() -> list[str]:
    return chapters()[1:]  # the root page is the book's preface: LaTeX does not number it


def _title(notebook: dict) -> str:
    for cell in notebook["cells"]:
        if cell["cell_type"] == "markdown":
            for line in "".join(cell["source"]).splitlines():
                if line.startswith("# "):
                    return line[2:].strip()
    raise AssertionError("a chapter without a title")


def _run(*command: str) -> str:
    tool = shutil.which(command[0])
    assert tool, f"{command[0]} not found: apt-get install -y poppler-utils"
    return subprocess.run([tool, *command[1:]], capture_output=True, text=True, check=True, timeout=120).stdout


@pytest.fixture(scope="module")
def pdf() -> Path:
    """The PDF, built now (`tools/build_pdf.sh`) unless it is up to date."""
    if not PREBUILT:
        build_unless_fresh(PDF, "build_pdf.sh", ("book/_ext/latex/*",), timeout=1500)
    assert PDF.exists()
    return PDF


@pytest.fixture(scope="module")
def pages(pdf) -> list[str]:
    """The text of each page."""
    return _run("pdftotext", "-layout", str(pdf), "-").split("\f")[:-1]


def test_pdf_is_the_book(pdf, pages):
    import yaml

    info = dict(line.split(":", 1) for line in _run("pdfinfo", str(pdf)).splitlines() if ":" in line)
    assert info["Title"].strip() == yaml.safe_load((ROOT / "_config.yml").read_text())["title"]
    n_pages = int(info["Pages"])
    assert n_pages == len(pages)
    chapters = len(_toc_files())
    # every chapter takes pages, and none runs away (e.g. an output printed as thousands of lines)
    assert 2 * chapters <= n_pages <= 40 * chapters, f"{n_pages} pages for {chapters} chapters"


def _words(title: str) -> str:
    return r"\s+".join(map(re.escape, title.split()))


def test_chapters_numbered_once(pages):
    """LaTeX numbers the chapters, the notebooks' own "1. " is gone: "1 Attention ... 5" in the
    contents, "CHAPTER / ONE / ATTENTION" opening the chapter on the page the contents give, and
    "Chapter 1. Attention" atop its other pages (the title numbered again matches none of these)."""
    text = "\n".join(pages)
    offset = None
    for number, file in enumerate(_toc_files(), start=1):
        title = re.sub(r"^\d+\.\s+", "", _title(stored_notebook(file)))  # "1. Attention" in the HTML book's sidebar
        entry = re.search(rf"^\s*{number}\s+{_words(title)}\s+(\d+)\s*$", text, re.MULTILINE)
        assert entry, f"contents: no entry '{number} {title}'"
        assert re.search(rf"Chapter {number}\.\s+{_words(title)}\s*$", text, re.MULTILINE), \
            f"no running head 'Chapter {number}. {title}'"
        opening = re.compile(rf"^\s*CHAPTER\s*$[\s\S]*?^\s*{_words(title.upper())}\s*$", re.MULTILINE)
        starts = [i for i, body in enumerate(pages) if opening.search(body)]
        assert len(starts) == 1, f"chapter {number} ({title}) opens on PDF pages {[i + 1 for i in starts]}"
        # the printed page numbers run on from the contents' numbering: one offset for every chapter
        offset = starts[0] - int(entry.group(1)) if offset is None else offset
        assert starts[0] - int(entry.group(1)) == offset, \
            f"chapter {number} opens on PDF page {starts[0] + 1}, the contents say page {entry.group(1)}"


def test_widgets_and_animations_print_as_pictures(pages):
    text = "\n".join(pages)
    for reprs in REPRS:
        assert reprs not in text, f"the PDF prints a Python repr instead of a picture: {reprs!r}"
    widgets = players = 0
    for file in _toc_files():
        for cell in stored_notebook(file)["cells"]:
            for output in cell.get("outputs", []):
                data = output.get("data", {})
                widgets += WIDGET_VIEW in data
                players += 'class="animation"' in "".join(data.get("text/html", ""))
    # a widget whose saved state holds no image would print nothing: its output must then store an image/png
    assert text.count("Interactive in the HTML book") == widgets, f"{widgets} widgets, not all printed as pictures"
    assert text.count("An animation in the HTML book") == players, f"{players} animations, not all printed as pictures"


def test_figures_are_in_place(pdf):
    """Every figure the notebooks print (widgets' and animations' stand-ins included) is in the PDF."""
    figures = 0
    for file in chapters():
        notebook = stored_notebook(file)
        add_static_pictures(notebook)
        figures += sum(any(m in output.get("data", {}) for m in STATIC)
                       for cell in notebook["cells"] for output in cell.get("outputs", []))
    tex = (LATEX / "sdlab.tex").read_text()
    included = re.findall(r"\\sphinxincludegraphics(?:\[[^\]]*\])?\{\{([^}]+)\}(\.\w+)\}", tex)
    assert len(included) >= figures, f"{len(included)} figures in sdlab.tex for {figures} in the notebooks"
    for stem, suffix in included:
        assert (LATEX / f"{stem}{suffix}").is_file(), f"sdlab.tex includes a missing {stem}{suffix}"
    embedded = [row.split()[2] for row in _run("pdfimages", "-list", str(pdf)).splitlines()[2:]]
    assert embedded.count("image") >= figures, f"{embedded.count('image')} images in the PDF for {figures} figures"


def test_static_pictures_for_explorers_and_players():
    """The stand-ins themselves: matplotlib's player's first frame is added; an explorer's own picture
    (stored beside its widget view and HTML) is kept; other outputs untouched."""
    import base64

    import matplotlib

    matplotlib.use("Agg")
    import numpy as np
    from matplotlib import animation
    from matplotlib import pyplot as plt

    from sdlab.explorer import explorer

    fig, ax = plt.subplots(figsize=(1, 1), dpi=40)
    frame = ax.imshow([[0.0, 1.0]])
    player = animation.FuncAnimation(fig, lambda k: frame.set_data([[k, 1.0 - k]]) or [frame], frames=2).to_jshtml()
    plt.close(fig)
    made = explorer(lambda level: np.full((8, 8, 3), level, np.uint8), {"level": [10, 200]})

    def shown(data):
        return {"output_type": "display_data", "data": data, "metadata": {}}

    stored = made._repr_mimebundle_()
    notebook = {"metadata": {}, "cells": [{"cell_type": "code", "outputs": [
        shown({"text/html": player, "text/plain": "<IPython.core.display.HTML object>"}),
        shown(dict(stored)),
        shown({"text/html": "<table></table>", "text/plain": "a table"}),
    ]}]}
    assert add_static_pictures(notebook) == 1
    movie, kept, table = (output["data"] for output in notebook["cells"][0]["outputs"])
    frames = [base64.b64decode(re.sub(r"\\\n", "", re.search(rf'frames\[{k}\] = "data:image/png;base64,([^"]*)"', player).group(1)))
              for k in (0, 1)]
    assert base64.b64decode(movie["image/png"]) == frames[0] != frames[1]
    assert kept == stored and WIDGET_VIEW in kept and "image/png" in kept
    assert set(table) == {"text/html", "text/plain"}
