"""The stored notebooks are what the chapter sources build, and what they show is current.

The chapters are jupytext percent scripts in `tools/chapters/`; `tools/build_notebooks.py` fills in
the setup cell and the listings of the package's code and executes them into `book/*.ipynb`.
These tests need no kernel: they compare the stored notebooks with a fresh, unexecuted build.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import nbformat
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))

import build_notebooks  # noqa: E402
import lint_chapters  # noqa: E402
import nbtools  # noqa: E402

CHAPTERS = nbtools.chapter_names()
REBUILD = "rebuild it: python tools/build_notebooks.py {name} (or --sources-only {name} for Markdown alone)"


def stored(name: str) -> nbformat.NotebookNode:
    return nbformat.read(ROOT / "book" / f"{name}.ipynb", as_version=4)


def test_every_chapter_has_a_source_and_a_notebook():
    assert CHAPTERS, "no chapter sources in tools/chapters"
    assert sorted(p.stem for p in (ROOT / "book").glob("*.ipynb")) == CHAPTERS


def test_repository_is_set_once():
    """pyproject's [project.urls] Repository is where the launch buttons and the setup cell point."""
    url = nbtools.repository_url()
    config = yaml.safe_load((ROOT / "_config.yml").read_text())
    assert config["repository"]["url"].rstrip("/") == url.rstrip("/"), \
        "_config.yml repository.url and pyproject.toml [project.urls] Repository differ"
    for name in CHAPTERS:
        setup = stored(name).cells[1]
        assert "hide-input" in setup.metadata.get("tags", []), f"{name}: the setup cell is not the second cell"
        assert f'SDLAB_SOURCE = "git+{url}"' in setup.source, f"{name}: the setup cell installs from elsewhere; " + REBUILD.format(name=name)


@pytest.mark.parametrize("name", CHAPTERS)
def test_notebook_is_built_from_its_source(name):
    """Same cells, in the same order, with the same sources and tags as a build of the chapter now."""
    fresh, old = build_notebooks.chapter(name), stored(name)
    assert [c.cell_type for c in old.cells] == [c.cell_type for c in fresh.cells], REBUILD.format(name=name)
    for i, (new, kept) in enumerate(zip(fresh.cells, old.cells)):
        where = f"{name} cell {i} ({new.cell_type})"
        assert kept.source == new.source, f"{where} differs from tools/chapters/{name}.py: " + REBUILD.format(name=name)
        assert kept.metadata.get("tags", []) == new.metadata.get("tags", []), f"{where}: tags differ"


@pytest.mark.parametrize("name", CHAPTERS)
def test_listings_are_the_package_code(name):
    """Every embedded listing is the package's current source, and no Sphinx-only include is left."""
    listed = 0
    for i, cell in enumerate(stored(name).cells):
        assert "{literalinclude}" not in cell.source, f"{name} cell {i}: a Sphinx-only include (invisible in Jupyter)"
        assert "{listing}" not in cell.source, f"{name} cell {i}: a listing placeholder was not filled in"
        for listing in cell.metadata.get("sdlab", {}).get("listings", []):
            listed += 1
            assert nbtools.render_listing(listing) in cell.source, \
                f"{name} cell {i}: the listing of {listing} differs from the package's code; " + REBUILD.format(name=name)
    source = (ROOT / "tools" / "chapters" / f"{name}.py").read_text()
    assert listed == len(nbtools.LISTING.findall(re.sub(r"^# ?", "", source, flags=re.M)))


def test_listing_renders_methods_decorated_functions_and_constants():
    method = nbtools.render_listing("sdlab.tokenizer.CLIPTokenizer.bpe_steps")
    assert method.split("\n")[1] == "# sdlab/tokenizer.py: CLIPTokenizer.bpe_steps"
    assert method.split("\n")[2].startswith("def bpe_steps(self")  # dedented out of its class
    fence = method.split("\n")[0][:-len("python")]
    assert set(fence) == {"`"} and method.endswith("\n" + fence)
    assert fence not in method[len(fence):-len(fence)], "the fence must be longer than any run of backticks inside"
    function = nbtools.render_listing("sdlab.attention.scaled_dot_product")
    assert function.split("\n")[:2] == ["```python", "# sdlab/attention.py"]
    constant = nbtools.render_listing("sdlab.__version__")  # a module-level assignment, found with ast
    assert constant.split("\n")[1] == "# sdlab/__init__.py" and constant.split("\n")[2].startswith("__version__ = ")


def test_readers_never_see_nbval_markers_and_no_chapter_reads_the_repository():
    for name in CHAPTERS:
        for i, cell in enumerate(stored(name).cells):
            if cell.cell_type != "code":
                continue
            assert "NBVAL_" not in cell.source, f"{name} cell {i}: nbval markers go in the cell's tags"
            assert not re.search(r"""["'](\.\./|book/|data/|tools/|tests/)""", cell.source), \
                f"{name} cell {i}: reads the repository's layout (ship the file as package data)"
    checked = sum("nbval-check-output" in c.metadata.get("tags", []) for n in CHAPTERS for c in stored(n).cells)
    assert checked >= 20, f"only {checked} cells have their outputs compared by nbval"


def test_chapter_code_passes_the_linter():
    done = lint_chapters.lint(CHAPTERS)
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.parametrize("name", CHAPTERS)
def test_source_is_a_canonical_percent_script(name):
    """jupytext writes the chapter back unchanged: opening and saving it in Jupyter (with jupytext)
    or an IDE's notebook view gives no spurious diff."""
    import jupytext

    text = (ROOT / "tools" / "chapters" / f"{name}.py").read_text()
    assert jupytext.writes(jupytext.reads(text, fmt="py:percent"), fmt="py:percent") == text


def test_typed_numbers_are_found_and_computed_ones_are_not():
    """The prose lint (part of `lint_chapters.lint`): a number typed into a sentence is reported;
    glued values, code, math, headings, link targets and the short allow-list are not."""
    found = lint_chapters.prose_numbers(
        "DDPM gets 0.073 at 25 steps, one step takes about 10 s.\n"
        "## Heading 5\n"
        "glued {glue:text}`ddpm_25:.3f`, code `sample('ddpm', 500)`, math $T = 1000$ and\n"
        "$$\\bar\\alpha_{999}$$ [Song et al. 2020](https://arxiv.org/abs/2010.02502), chapter 5,\n"
        "chapters 2–4, SD1.5 at 512×512, 2-D points, float32, DPM++ 2M\n"
        "1. an exercise\n"
        "```python\nx = 3\n```\n")
    assert [number for number, _ in found] == ["0.073", "25", "10"]


def test_glue_in_the_setup_cell_writes_what_myst_nb_glue_writes():
    """The setup cell's `glue` (no myst_nb needed in Colab) writes the output myst_nb.glue(...,
    display=False) writes, which the book's {glue:text} role reads."""
    import ast

    import numpy as np
    from myst_nb.ext import glue as myst_glue

    tree = ast.parse((ROOT / "tools" / "setup_cell.py").read_text())
    function = next(node for node in tree.body if isinstance(node, ast.FunctionDef) and node.name == "glue")
    ours, theirs = [], []
    namespace = {"display": lambda data, raw, metadata: ours.append((data, metadata))}
    exec(compile(ast.Module([function], []), "setup_cell.py", "exec"), namespace)
    original = myst_glue.ipy_display
    myst_glue.ipy_display = lambda data, raw, metadata: theirs.append((data, metadata))
    try:
        for value in (0.0731, 48, "lower", "1/180"):
            namespace["glue"]("key", value)
            myst_glue.glue("key", value, display=False)
    finally:
        myst_glue.ipy_display = original
    assert ours == theirs
    namespace["glue"]("key", np.float64(0.5))  # a numpy scalar is glued as the plain number
    assert ours[-1][0] == {"application/papermill.record/text/plain": "0.5"}


@pytest.mark.parametrize("name", CHAPTERS)
def test_every_glued_number_is_computed_in_its_chapter(name):
    """Every {glue} role in the prose names a value a cell of the same notebook glued (the book
    build fails on a missing one too; this says which, without building)."""
    nb = stored(name)
    glued = {output.metadata["scrapbook"]["name"] for cell in nb.cells if cell.cell_type == "code"
             for output in cell.get("outputs", []) if "scrapbook" in output.get("metadata", {})}
    used = {match for cell in nb.cells if cell.cell_type == "markdown"
            for match in re.findall(r"\{glue(?::\w+)?\}`([^`:]+)", cell.source)}
    assert used <= glued, f"{name}: glued in the text but by no cell: {sorted(used - glued)}; " + REBUILD.format(name=name)


@pytest.mark.parametrize("name", CHAPTERS)
def test_every_chapter_opens_with_objectives_prerequisites_and_its_time(name):
    header = stored(name).cells[0].source
    for part in ("**You will learn**", "**You need**", "**Time:** about"):
        assert part in header, f"{name}: the first cell has no {part!r} (write it in tools/chapters/{name}.py)"
    assert "min to read" in header and ("s to run on" in header), f"{name}: {REBUILD.format(name=name)}"
