"""The stored notebooks run where readers run them, not only inside a clone.

Each notebook of `book/` is copied alone into an empty folder outside the repository and executed
by a kernel whose Python has no sdlab at all: a fresh virtual environment that sees the
libraries of this one (so that nothing is downloaded) except sdlab itself. A stand-in
`google.colab` module is imported when that kernel starts, so the setup cell takes its Colab
branch and installs `sdlab[book]` from `SDLAB_INSTALL_SOURCE`, a wheel built here from the working
tree: every `import sdlab` the chapter makes then reads the installed copy, never the repository.

This is also the chapters' nbval run: nbval executes each copy there and compares the outputs of
the cells tagged `nbval-check-output` with the stored ones (the course notebooks, which have no
Colab setup, run under nbval in the main session: `testpaths` in `pyproject.toml`).
"""

from __future__ import annotations

import json
import os
import signal
import site
import subprocess
import sys
import venv
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[1]
CHAPTERS = sorted(p.stem for p in (ROOT / "book").glob("*.ipynb"))
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
    # the venv's own old setuptools would shadow this environment's (torch asks for a newer one), and
    # the kernel's pip, which may not use an index, could not upgrade it
    subprocess.run([python, "-m", "pip", "uninstall", "-y", "-q", "setuptools"], check=True, capture_output=True)
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
        # offline: pip may use what is installed and the wheel, never an index (nor its version check)
        "env": {"PYTHONPATH": str(base / "stand-in"), "SDLAB_INSTALL_SOURCE": str(wheel), "PIP_NO_INPUT": "1",
                "PIP_NO_INDEX": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1"},
    }))
    monkeypatch_module.setenv("JUPYTER_PATH", str(base))
    return env


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as patch:
        yield patch


# Each notebook runs under nbval (the outputs of cells tagged nbval-check-output compared with the
# stored ones) in a pytest process of its own, in the notebook's clean folder, with the stand-in as
# its kernel: this is the book's nbval run (`pyproject.toml` leaves the chapters out of the main
# session's), so every chapter runs once, as Colab runs it. A last cell checks, inside the kernel, that
# it was the stand-in and that sdlab came from the installed wheel. A hard time limit stops a kernel
# that stops answering (nbval names the cell that ran out of its own limit).
CHECK_CELL = """import sys
from pathlib import Path

import sdlab

assert "google.colab" in sys.modules, "the kernel did not import the Colab stand-in"
assert Path(sys.prefix) == Path({env!r}), f"the kernel runs {{sys.prefix}}, not the clean environment"
where = Path(sdlab.__file__)
assert where.is_relative_to(sys.prefix) and not where.is_relative_to({root!r}), f"sdlab came from {{where}}"
"""
CELL_TIMEOUT, NOTEBOOK_TIMEOUT = 300, 900


@pytest.mark.parametrize("name", CHAPTERS)
def test_notebook_runs_in_a_clean_folder_like_colab(colab_kernel, tmp_path, name):
    nb = nbformat.read(ROOT / "book" / f"{name}.ipynb", as_version=4)
    nb.cells.append(nbformat.v4.new_code_cell(CHECK_CELL.format(env=str(colab_kernel), root=str(ROOT))))
    nbformat.write(nb, tmp_path / f"{name}.ipynb")
    (tmp_path / "pytest.ini").write_text("[pytest]\n")  # the folder's own (empty) settings, not the repository's
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--nbval-lax", "--color=no",
               f"--nbval-kernel-name={KERNEL}", f"--nbval-cell-timeout={CELL_TIMEOUT}",
               "--nbval-kernel-startup-timeout=120", f"{name}.ipynb"]
    # a session of its own, so that a run that runs out of time is stopped with its kernel
    run = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=tmp_path,
                           start_new_session=True)
    try:
        printed, _ = run.communicate(timeout=NOTEBOOK_TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(run.pid, signal.SIGKILL)
        printed, _ = run.communicate()
        pytest.fail(f"{name} did not finish in {NOTEBOOK_TIMEOUT} s in the Colab stand-in:\n{printed[-4000:]}")
    cells = sum(c.cell_type == "code" for c in nb.cells)
    assert run.returncode == 0, f"{name} failed under nbval in the Colab stand-in:\n{printed[-6000:]}"
    assert f"{cells} passed" in printed, f"nbval did not run all {cells} code cells of {name}:\n{printed[-2000:]}"
