"""`python -m sdlab`: options left out take the model's settings, zeros are values, every sdlab error is
one line on stderr with exit status 2 (never a traceback), files are never overwritten, and `inspect`."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from sdlab.__main__ import main

QUICK = ["--steps", "2", "--sampler", "euler"]


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def run_main(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def parameters(path) -> dict:
    with Image.open(path) as image:
        return json.loads(image.info["parameters"])


def test_left_out_options_take_the_models_settings_and_zero_is_a_value(tmp_path, capsys):
    from sdlab.model_loader import preload_models_from_standard_weights

    own = preload_models_from_standard_weights()["diffusion"].sampling
    code, out, _ = run_main(capsys, "generate", "a red circle", "--steps", "2", "-o", str(tmp_path / "a.png"))
    assert code == 0 and "wrote" in out
    settings = parameters(tmp_path / "a.png")
    assert (settings["height"], settings["width"], settings["sampler"], settings["cfg_scale"]) == (
        own.height, own.width, own.sampler, own.cfg_scale)
    assert settings["steps"] == 2
    code, _, _ = run_main(capsys, "generate", "a red circle", *QUICK, "--cfg", "0", "-o", str(tmp_path / "b.png"))
    assert code == 0 and parameters(tmp_path / "b.png")["cfg_scale"] == 0.0
    with Image.open(tmp_path / "b.png") as image:
        assert image.size == (own.width, own.height) and np.asarray(image).max() > 0


@pytest.mark.parametrize("argv,names", [
    (["--steps", "0"], "--steps"),
    (["--cfg", "nan"], "--cfg"),
    (["--device", "cuda"], "--device"),
    (["--device", "meta"], "--device"),
    (["--height", "70"], "--height"),
    (["--init-image", "/no/such/picture.png"], "--init-image"),
    (["--mask", "/no/such/mask.png"], "--mask"),
    (["--ckpt", "/no/such/model.safetensors"], "/no/such/model.safetensors"),
])
def test_errors_are_one_line_on_stderr_with_status_2(tmp_path, capsys, argv, names):
    code, out, err = run_main(capsys, "generate", "a red circle", *argv, "-o", str(tmp_path / "x.png"))
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith("error: ") and names in err and "Traceback" not in err
    assert not (tmp_path / "x.png").exists()


def test_an_existing_file_is_never_overwritten_and_is_refused_before_any_work(tmp_path, capsys):
    taken = tmp_path / "taken.png"
    taken.write_bytes(b"my own file")
    code, _, err = run_main(capsys, "generate", "a red circle", "--ckpt", "/no/such/file.ckpt", "-o", str(taken))
    assert code == 2 and "--output" in err and "exists" in err  # found before the (missing) checkpoint is opened
    assert taken.read_bytes() == b"my own file"


def test_argparse_problems_exit_2_as_argparse_does(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["generate", "a red circle", "--sampler", "best"])
    assert exit_.value.code == 2 and "invalid choice" in capsys.readouterr().err


def test_the_command_line_runs_as_a_module_without_a_traceback(tmp_path):
    result = subprocess.run([sys.executable, "-m", "sdlab", "generate", "a red circle", "--steps", "0", "-o",
                             str(tmp_path / "x.png")], capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 2 and result.stderr.strip().count("\n") == 0 and "--steps" in result.stderr


def test_inspect_describes_a_checkpoint(capsys):
    from sdlab.model_loader import DEFAULT_CHECKPOINT

    code, out, _ = run_main(capsys, "inspect", str(DEFAULT_CHECKPOINT))
    assert code == 0 and "safetensors" in out and "622" in out
    code, out, err = run_main(capsys, "inspect", "/no/such/file.safetensors")
    assert code == 2 and err.startswith("error: ") and "/no/such/file.safetensors" in err
