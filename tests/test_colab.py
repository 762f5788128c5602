"""The stored notebooks run where readers run them, not only inside a clone.

Each notebook of `book/` is copied alone into an empty folder outside the repository and executed
by a kernel whose Python has no sdlab at all: a fresh virtual environment that sees the
libraries of this one (so that nothing is downloaded) except sdlab itself. A stand-in
`google.colab` module is imported when that kernel starts, so the setup cell takes its Colab
branch and installs `sdlab[book]` from `SDLAB_INSTALL_SOURCE`, a wheel built here from the working
tree: every `import sdlab` the chapter makes then reads the installed copy, never the repository.
"""

from __future__ import annotations

import json
import os
import site
import subprocess
import sys
import venv
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[1]
# Chapter 6 is left out: run alone, its Colab run passes (in 25-55 s), but late in the full suite its
# client stops receiving replies after the first widget cell, with the kernel idle (seen twice in
# .ci/run, cause not found yet). nbval still runs it in CI; the Colab path is the open part of #11.
CHAPTERS = sorted(p.stem for p in (ROOT / "book").glob("*.ipynb") if p.stem != "06_pipeline")
KERNEL = "sdlab-colab-stand-in"


def _site_packages_without_sdlab(folder: Path) -> Path:
    """A folder of links to everything installed here but sdlab (and its editable-install hooks)."""
    folder.mkdir()
    for packages in map(Path, site.getsitepackages()):
        for entry in packages.iterdir():
            name = entry.name.lower()
            if name.startswith(("sdlab", "__editable__", "_sdlab", "__pycache__")) or entry.suffix == ".pth":
                continue
            if not (folder / entry.name).exists():
                (folder / entry.name).symlink_to(entry)
    return folder


@pytest.fixture(scope="module")
def colab_kernel(tmp_path_factory, monkeypatch_module):
    base = tmp_path_factory.mktemp("colab")
    wheels = base / "wheels"
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(wheels), str(ROOT)],
                           capture_output=True, text=True)
    assert built.returncode == 0, f"could not build sdlab's wheel:\n{built.stdout[-2000:]}\n{built.stderr[-2000:]}"
    (wheel,) = wheels.glob("sdlab-*.whl")

    env = base / "env"
    venv.EnvBuilder(with_pip=True).create(env)
    python = env / "bin" / "python"
    child_site = Path(subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                                     check=True, capture_output=True, text=True).stdout.strip())
    (child_site / "parent-libraries.pth").write_text(f"{_site_packages_without_sdlab(base / 'libraries')}\n")
    clean = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    found = subprocess.run([python, "-c", "import sdlab"], capture_output=True, cwd=base, env=clean)
    assert found.returncode != 0, "sdlab leaks into the clean environment"

    stand_in = base / "stand-in" / "google" / "colab"
    stand_in.mkdir(parents=True)
    (stand_in / "__init__.py").write_text('"""Stand-in for Colab\'s google.colab: its presence is all the setup cell looks at."""\n')
    spec = base / "kernels" / KERNEL
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [str(python), "-m", "ipykernel_launcher", "-f", "{connection_file}",
                 "--IPKernelApp.exec_lines=import google.colab"],  # Colab imports it before any cell
        "display_name": "Colab stand-in", "language": "python",
        "env": {"PYTHONPATH": str(base / "stand-in"), "SDLAB_INSTALL_SOURCE": str(wheel), "PIP_NO_INPUT": "1"},
    }))
    monkeypatch_module.setenv("JUPYTER_PATH", str(base))
    return env


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as patch:
        yield patch


# Each notebook is executed by a small client process of its own (a fresh Python, not this pytest
# process with the SD1.5 models in memory), under a hard time limit: a kernel that stops answering
# fails the test instead of stopping the run.
RUNNER = """
import sys, nbformat
from nbclient import NotebookClient
path, kernel = sys.argv[1], sys.argv[2]
nb = nbformat.read(path, as_version=4)
NotebookClient(nb, timeout=600, kernel_name=kernel, resources={"metadata": {"path": str(__import__("pathlib").Path(path).parent)}}).execute()
nbformat.write(nb, path)
"""


@pytest.mark.parametrize("name", CHAPTERS)
def test_notebook_runs_in_a_clean_folder_like_colab(colab_kernel, tmp_path, name):
    nb = nbformat.read(ROOT / "book" / f"{name}.ipynb", as_version=4)
    nb.cells.append(nbformat.v4.new_code_cell(
        "import json, sys, sdlab\nprint(json.dumps([sys.prefix, sdlab.__file__, 'google.colab' in sys.modules]))"))
    path = tmp_path / f"{name}.ipynb"
    nbformat.write(nb, path)
    ran = subprocess.run([sys.executable, "-c", RUNNER, str(path), KERNEL], capture_output=True, text=True,
                         timeout=900, cwd=tmp_path, env={**os.environ, "JUPYTER_PATH": os.environ["JUPYTER_PATH"]})
    assert ran.returncode == 0, f"{name} failed in the Colab stand-in:\n{ran.stderr[-3000:]}"
    nb = nbformat.read(path, as_version=4)
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert not errors, errors
    prefix, where, colab = json.loads(nb.cells[-1].outputs[-1].text.strip().split("\n")[-1])
    assert colab and Path(prefix) == colab_kernel, "the kernel was not the clean Colab stand-in"
    assert Path(where).is_relative_to(colab_kernel), f"sdlab came from {where}, not from the installed wheel"
    assert not Path(where).is_relative_to(ROOT)
