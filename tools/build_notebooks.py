"""Write and execute the book's notebooks: `python tools/build_notebooks.py [chapter ...]`.

With no argument every chapter in `tools/chapters/` is rebuilt. Each notebook is executed with
`book/` as its working directory, and the wall time of each is printed.
"""

from __future__ import annotations

import importlib.util
import re
import sys
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[1]
BOOK = ROOT / "book"
CHAPTERS = Path(__file__).parent / "chapters"
sys.path.insert(0, str(Path(__file__).parent))

from nbtools import notebook  # noqa: E402

FORBIDDEN = [str(ROOT), "/root/", "/tmp/"]


def load(name: str):
    spec = importlib.util.spec_from_file_location(f"chapter_{name}", CHAPTERS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.CELLS


def build(name: str, execute: bool = True) -> float:
    nb = notebook(load(name), name)
    start = time.perf_counter()
    if execute:
        NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(BOOK)}},
                       store_widget_state=True, record_timing=False).execute()
    elapsed = time.perf_counter() - start
    for i, cell in enumerate(nb.cells):
        cell.id = f"{name.split('_')[0]}-{i:02d}"  # stable ids: rebuilding gives small diffs
    text = nbformat.writes(nb)
    leaks = [p for p in FORBIDDEN if p in text]
    if leaks:
        where = [text[max(0, text.find(p) - 200): text.find(p) + 100] for p in leaks]
        raise SystemExit(f"{name}: outputs contain machine paths {leaks}: {where}")
    errors = re.findall(r'"output_type": "error"', text)
    if errors:
        raise SystemExit(f"{name}: {len(errors)} cells raised")
    (BOOK / f"{name}.ipynb").write_text(text)
    return elapsed


if __name__ == "__main__":
    names = sys.argv[1:] or sorted(p.stem for p in CHAPTERS.glob("*.py"))
    for name in names:
        print(f"{name}: {build(name):.1f} s", flush=True)
