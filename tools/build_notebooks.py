"""Write and execute the book's notebooks from the chapter sources (jupytext percent scripts).

    python tools/build_notebooks.py [chapter ...]            # execute into book/<chapter>.ipynb
    python tools/build_notebooks.py --sources-only [chapter ...]

With no chapter every one in `tools/chapters/` is rebuilt. Each notebook is executed with `book/` as
its working directory (as nbval runs it) by the `python3` kernel, and its wall time is printed.
The result is refused when an output holds a path of this machine or a cell raised.

Each chapter's header says how long it takes: the line `{chapter-time}` in its Markdown becomes
a reading estimate (its prose words at `WORDS_PER_MINUTE`) and the wall time of its last execution
here, kept in `tools/chapter_times.json` with the machine's CPU count (`chapter`, below).

`--sources-only` executes nothing: it rewrites the Markdown of the stored notebooks (the embedded
listings of the package's code, the prose) and keeps their outputs; it refuses a chapter whose
code cells changed, since those need executing.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from pathlib import Path

import nbformat

ROOT = Path(__file__).resolve().parents[1]
BOOK = ROOT / "book"
sys.path.insert(0, str(Path(__file__).parent))

from nbrun import SlicedClient  # noqa: E402
from nbtools import chapter_names, notebook  # noqa: E402

FORBIDDEN = [str(ROOT), "/root/", "/tmp/"]
TIMES = ROOT / "tools" / "chapter_times.json"
TIME_MARKER = "{chapter-time}"
WORDS_PER_MINUTE = 200  # a careful technical read (prose only: code and listings are not counted)
PAGES = {"instructors": "course/instructors", "solutions": "course/solutions"}  # pages that are not chapters: written there, not timed


def reading_words(nb: nbformat.NotebookNode) -> int:
    """The words of the notebook's Markdown prose, without code blocks, listings and math."""
    text = " ".join(c.source for c in nb.cells if c.cell_type == "markdown")
    text = re.sub(r"(?ms)^(`{3,}).*?^\1|\$\$.*?\$\$|\$[^$]*\$", " ", text)
    return len(re.findall(r"[A-Za-z]+(?:['’-][A-Za-z]+)*", text))


def chapter(name: str, seconds: float | None = None) -> nbformat.NotebookNode:
    """The chapter as the book has it (`nbtools.notebook`) with its time line filled in; `seconds`,
    when given, is the execution just measured and replaces the stored one."""
    nb, times = notebook(name), json.loads(TIMES.read_text()) if TIMES.exists() else {}
    if seconds is not None:
        times[name] = {"seconds": round(seconds), "cpus": os.cpu_count()}
        TIMES.write_text(json.dumps(dict(sorted(times.items())), indent=1) + "\n")
    run = times.get(name)
    words = reading_words(nb)
    line = (f"**Time:** about {max(1, round(words / WORDS_PER_MINUTE))} min to read ({words:,} words of prose at "
            f"{WORDS_PER_MINUTE} a minute, code not counted)")
    line += f"; {run['seconds']} s to run on {run['cpus']} CPU cores." if run else "; not run yet."
    for cell in nb.cells:
        if cell.cell_type == "markdown" and TIME_MARKER in cell.source:
            cell.source = cell.source.replace(TIME_MARKER, line)
    return nb


def checked_text(nb: nbformat.NotebookNode, name: str) -> str:
    """The notebook as JSON, after refusing machine paths in it and cells that raised."""
    text = nbformat.writes(nb)
    leaks = [p for p in FORBIDDEN if p in text]
    if leaks:
        where = [text[max(0, text.find(p) - 200): text.find(p) + 100] for p in leaks]
        raise SystemExit(f"{name}: outputs contain machine paths {leaks}: {where}")
    errors = re.findall(r'"output_type": "error"', text)
    if errors:
        raise SystemExit(f"{name}: {len(errors)} cells raised")
    return text


def coalesce_streams(nb: nbformat.NotebookNode) -> None:
    """One output per run of prints to the same stream, however the kernel happened to split them."""
    for cell in nb.cells:
        merged = []
        for output in cell.get("outputs", []):
            if merged and output.output_type == "stream" and merged[-1].output_type == "stream" \
                    and merged[-1].name == output.name:
                merged[-1].text += output.text
            else:
                merged.append(output)
        if cell.cell_type == "code":
            cell.outputs = merged


def build(name: str) -> float:
    nb, path = notebook(name), BOOK / f"{PAGES.get(name, name)}.ipynb"
    start = time.perf_counter()
    SlicedClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}},
                 store_widget_state=False, record_timing=False).execute()
    elapsed = time.perf_counter() - start
    timed = chapter(name, None if name in PAGES else elapsed)
    for cell, fresh in zip(nb.cells, timed.cells):  # the header's time line, now measured
        if cell.cell_type == "markdown":
            cell.source = fresh.source
    coalesce_streams(nb)
    path.write_text(checked_text(nb, name))
    return elapsed


def refresh_sources(name: str) -> None:
    """Put the chapter's current Markdown into the stored notebook, keeping its outputs."""
    fresh, path = chapter(name), BOOK / f"{PAGES.get(name, name)}.ipynb"
    stored = nbformat.read(path, as_version=4)
    shape = [(c.cell_type, c.source if c.cell_type == "code" else None) for c in fresh.cells]
    if shape != [(c.cell_type, c.source if c.cell_type == "code" else None) for c in stored.cells]:
        raise SystemExit(f"{name}: its code cells changed, so it must be executed: python tools/build_notebooks.py {name}")
    for new, old in zip(fresh.cells, stored.cells):
        if new.cell_type == "markdown":
            old.source, old.metadata = new.source, new.metadata
    path.write_text(checked_text(stored, name))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("chapters", nargs="*", help="e.g. 01_attention (default: every chapter)")
    parser.add_argument("--sources-only", action="store_true", help="update the Markdown, execute nothing")
    args = parser.parse_args()
    for name in args.chapters or chapter_names():
        name = Path(name).stem  # tools/chapters/01_attention.py and book/01_attention.ipynb work too
        if args.sources_only:
            refresh_sources(name)
            print(f"{name}: Markdown updated", flush=True)
        else:
            print(f"{name}: {build(name):.1f} s", flush=True)
