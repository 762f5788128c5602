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


# Each notebook is executed by a small client process of its own (a fresh Python, not this pytest
# process with the SD1.5 models in memory), under a hard time limit: a kernel that stops answering
# fails the test instead of stopping the run. The client logs when each cell starts and ends, so a
# slow or stuck cell is named in the report.
RUNNER = """
import json, sys, time, nbformat
from pathlib import Path
sys.path.insert(0, TOOLS)
from nbrun import SlicedClient  # waits for replies in one-second slices (see tools/nbrun.py)
path, kernel, log = sys.argv[1:4]
nb = nbformat.read(path, as_version=4)
start = time.monotonic()
def note(event):
    def hook(cell, cell_index, **_):
        with open(log, "a") as f:
            f.write(json.dumps([event, cell_index, round(time.monotonic() - start, 1), cell.source[:60]]) + "\\n")
    return hook
SlicedClient(nb, timeout=CELL_TIMEOUT, kernel_name=kernel, resources={"metadata": {"path": str(Path(path).parent)}},
             on_cell_execute=note("start"), on_cell_executed=note("end")).execute()
nbformat.write(nb, path)
"""
CELL_TIMEOUT, NOTEBOOK_TIMEOUT = 300, 900


def _cell_times(log: Path) -> str:
    """Each cell's seconds from the client's log, the slowest first; a cell that never ended is first."""
    events = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    started = {cell: (t, source) for event, cell, t, source in events if event == "start"}
    ended = {cell: t for event, cell, t, _ in events if event == "end"}
    rows = [(ended.get(cell, float("inf")) - t, cell, source) for cell, (t, source) in started.items()]
    return "\n".join(f"  cell {cell}: {'never ended' if seconds == float('inf') else f'{seconds:.1f} s'}  {source!r}"
                     for seconds, cell, source in sorted(rows, reverse=True)[:5])


@pytest.mark.parametrize("name", CHAPTERS)
def test_notebook_runs_in_a_clean_folder_like_colab(colab_kernel, tmp_path, name):
    nb = nbformat.read(ROOT / "book" / f"{name}.ipynb", as_version=4)
    nb.cells.append(nbformat.v4.new_code_cell(
        "import json, sys, sdlab\nprint(json.dumps([sys.prefix, sdlab.__file__, 'google.colab' in sys.modules]))"))
    path, log = tmp_path / f"{name}.ipynb", tmp_path / "cells.log"
    nbformat.write(nb, path)
    runner = RUNNER.replace("CELL_TIMEOUT", str(CELL_TIMEOUT)).replace("TOOLS", repr(str(ROOT / "tools")))
    command = [sys.executable, "-c", runner, str(path), KERNEL, str(log)]
    # a session of its own, so that a client that runs out of time is stopped with its kernel
    client = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path,
                              start_new_session=True)
    try:
        _, stderr = client.communicate(timeout=NOTEBOOK_TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(client.pid, signal.SIGKILL)
        client.communicate()
        pytest.fail(f"{name} did not finish in {NOTEBOOK_TIMEOUT} s in the Colab stand-in; slowest cells:\n{_cell_times(log)}")
    assert client.returncode == 0, f"{name} failed in the Colab stand-in:\n{stderr[-3000:]}\nslowest cells:\n{_cell_times(log)}"
    print(f"{name}, slowest cells:\n{_cell_times(log)}")
    nb = nbformat.read(path, as_version=4)
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert not errors, errors
    # the kernel may send the printed line as more than one stream message
    printed = "".join(o.text for o in nb.cells[-1].outputs if o.output_type == "stream" and o.name == "stdout")
    prefix, where, colab = json.loads(printed.strip().splitlines()[-1])
    assert colab and Path(prefix) == colab_kernel, "the kernel was not the clean Colab stand-in"
    assert Path(where).is_relative_to(colab_kernel), f"sdlab came from {where}, not from the installed wheel"
    assert not Path(where).is_relative_to(ROOT)
