"""Turn a chapter source into the book's notebook (without running it).

Each chapter is a jupytext percent script, `tools/chapters/<name>.py`: `# %% [markdown]` cells of
Markdown and `# %%` cells of code, tags in the cell header (`# %% tags=["nbval-check-output"]`:
nbval compares that cell's output; `hide-input`: the book folds its code). Two placeholders are
filled in when the notebook is built:

* a code cell `# book-setup: ...` becomes the setup cell, `tools/setup_cell.py`, with the
  repository of `pyproject.toml`'s `[project.urls]` in it;
* a Markdown fence ```` ```{listing} sdlab.module.name ```` becomes the source of that object as the
  package has it now (`inspect.getsource`), a plain `python` code block that reads the same in
  Jupyter, Colab and the rendered book. The cell's metadata names its listings
  (`{"sdlab": {"listings": [...]}}`) so that a test can check they are current.

`python tools/build_notebooks.py [chapter ...]` executes the result into `book/<name>.ipynb`.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import re
import textwrap
import tomllib
from pathlib import Path

import jupytext
import nbformat

ROOT = Path(__file__).resolve().parents[1]
CHAPTERS = ROOT / "tools" / "chapters"
SETUP_MARKER = "# book-setup:"
LISTING = re.compile(r"^```\{listing\} (?P<name>[\w.]+)\n```$", re.M)


def repository_url() -> str:
    """The published repository, set once in `pyproject.toml` (`[project.urls] Repository`)."""
    urls = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["urls"]
    return urls["Repository"]


def setup_source() -> str:
    """The first code cell of every chapter: `tools/setup_cell.py` pointing at the repository."""
    text = (Path(__file__).parent / "setup_cell.py").read_text().strip("\n")
    line = re.compile(r'^SDLAB_SOURCE = "[^"]*"', re.M)
    assert line.search(text), "tools/setup_cell.py must assign SDLAB_SOURCE"
    return line.sub(f'SDLAB_SOURCE = "git+{repository_url()}"', text)


def _resolve(name: str):
    """`sdlab.tokenizer.CLIPTokenizer.bpe_steps` -> (module, [attribute path])."""
    parts = name.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        try:
            return importlib.import_module(".".join(parts[:cut])), parts[cut:]
        except ModuleNotFoundError:
            continue
    raise ValueError(f"listing {name!r}: no module of sdlab in that name")


def listing_source(name: str) -> tuple[str, str]:
    """(file relative to the package's parent, dedented source) of a function, class, method or
    module-level assignment (`sdlab.config.TINY`), as the installed package has it now."""
    module, attributes = _resolve(name)
    target = module
    for attribute in attributes:
        target = getattr(target, attribute)
    target = inspect.unwrap(target) if callable(target) else target  # a decorated function's own code
    if inspect.isfunction(target) or inspect.isclass(target) or inspect.ismethod(target):
        code, where = inspect.getsource(target), inspect.getsourcefile(target)
    else:  # a constant: its assignment statement in the module that defines it
        where = inspect.getsourcefile(module)
        text = inspect.getsource(module)
        nodes = [n for n in ast.parse(text).body if isinstance(n, (ast.Assign, ast.AnnAssign))
                 and attributes[-1] in {getattr(t, "id", None) for t in getattr(n, "targets", [getattr(n, "target", None)])}]
        if len(attributes) != 1 or not nodes:
            raise ValueError(f"listing {name!r}: not a function, class or module-level assignment")
        code = ast.get_source_segment(text, nodes[0])
    package_root = Path(importlib.import_module(name.split(".")[0]).__file__).resolve().parents[1]
    return Path(where).resolve().relative_to(package_root).as_posix(), textwrap.dedent(code).strip("\n")


def render_listing(name: str) -> str:
    """The Markdown code block that shows `name`'s source, headed by the file it lives in
    (and the class, for a method)."""
    where, code = listing_source(name)
    _, attributes = _resolve(name)
    header = f"# {where}" + (f": {'.'.join(attributes)}" if len(attributes) > 1 else "")
    longest = max((len(run) for run in re.findall(r"`+", code)), default=0)
    fence = "`" * max(3, longest + 1)  # a docstring's own code fence cannot close the block
    return f"{fence}python\n{header}\n{code}\n{fence}"


def _expand(cell: nbformat.NotebookNode, listings: bool) -> nbformat.NotebookNode:
    if cell.cell_type == "code" and cell.source.startswith(SETUP_MARKER):
        cell.source = setup_source()
    elif cell.cell_type == "markdown" and listings:
        names = LISTING.findall(cell.source)
        if names:
            cell.source = LISTING.sub(lambda m: render_listing(m["name"]), cell.source)
            cell.metadata["sdlab"] = {"listings": names}
    return cell


def notebook(name: str, listings: bool = True) -> nbformat.NotebookNode:
    """The chapter `name` (e.g. `01_attention`) as an unexecuted notebook, placeholders filled
    (`listings=False` leaves the listing placeholders, and needs no import of sdlab)."""
    nb = jupytext.read(CHAPTERS / f"{name}.py", fmt="py:percent")
    cells = []
    for i, cell in enumerate(nb.cells):
        cell = _expand(cell, listings)
        cell.id = f"{name.split('_')[0]}-{i:02d}"  # stable ids: rebuilding gives small diffs
        cells.append(cell)
    book = nbformat.v4.new_notebook(cells=cells)
    book.metadata.update({
        "kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
        "language_info": {"name": "python"},
        "colab": {"provenance": [], "name": f"{name}.ipynb"},
    })
    return book


def chapter_names() -> list[str]:
    return sorted(p.stem for p in CHAPTERS.glob("[0-9]*.py"))
