"""`python -m sdlab bench` runs and compares the right things (its timings are not asserted here)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from sdlab import bench


def test_component_rows_compare_equal_outputs(sdlab_models, reference):
    theirs = {"clip": reference["clip"], "unet": reference["unet"], "vae": reference["vae"]}
    bf16 = bench.bf16_supported()
    rows = bench.component_rows(sdlab_models, theirs, repeat=1, quick=True, bf16=bf16, size=16)  # 16x16: CI time
    by_key = {(r["component"].split(" (")[0], r["impl"]): r for r in rows}
    impls = {"sdlab", "diffusers"} | ({"sdlab bf16", "diffusers bf16", "sdlab bf16 autocast"} if bf16 else set())
    unet_impls = impls | {"sdlab unpacked", "sdlab recording attention"} | ({"sdlab bf16 fused attention"} if bf16 else set())
    vae_impls = {"sdlab", "diffusers"} | ({"sdlab bf16", "diffusers bf16"} if bf16 else set())
    assert {k for k in by_key if k[0] == "U-Net step"} == {("U-Net step", i) for i in unet_impls}
    assert {k for k in by_key if k[0] == "VAE decode"} == {("VAE decode", i) for i in vae_impls}
    assert all(r["spread_pct"] == 0.0 for r in rows)  # one repeat: no spread
    # recording changes nothing: the same output as without it (bit for bit: tests/test_inspect.py)
    assert by_key[("U-Net step", "sdlab recording attention")]["max_diff"] == by_key[("U-Net step", "sdlab")]["max_diff"]
    assert by_key[("U-Net step", "sdlab unpacked")]["max_diff"] <= 1e-4
    for component in ("CLIP", "U-Net step", "VAE decode"):
        assert by_key[(component, "diffusers")]["ratio"] == 1.0
        assert by_key[(component, "sdlab")]["seconds"] > 0
        assert by_key[(component, "sdlab")]["max_diff"] <= 1e-4, component  # same weights, same function
    if bf16:  # bf16 (packed once, and autocast) against fp32: the goal is within 2e-2 of the fp32 prediction
        assert by_key[("U-Net step", "sdlab bf16")]["max_diff"] <= 2e-2
        assert by_key[("U-Net step", "sdlab bf16 autocast")]["max_diff"] <= 2e-2
        assert by_key[("U-Net step", "sdlab bf16 fused attention")]["max_diff"] <= 2e-2
        assert by_key[("VAE decode", "sdlab bf16")]["max_diff"] <= 0.1  # pixels in [-1, 1]: bf16 rounding


def test_spread_is_the_slowest_repeat_above_the_fastest():
    assert bench.spread([2.0, 2.5, 2.1]) == 25.0
    times = bench.interleaved({"a": lambda: None, "b": lambda: None}, repeat=3, warmup=0)
    assert set(times) == {"a", "b"} and all(len(t) == 3 for t in times.values())


def test_peers_without_openvino_give_a_message_and_no_rows(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "openvino", None)  # as where it is not installed
    assert bench.peer_functions({}, (), bf16=True) == {}
    assert "OpenVINO is not installed (pip install openvino)" in capsys.readouterr().out


def test_image_runs_add_bf16_lean_lcm_batches_and_taesd_with_bf16_else_lcm_in_fp32():
    assert bench.image_runs(False, [1, 2]) == [("diffusers", "fp32", 1), ("sdlab", "fp32", 1), ("sdlab", "lcm_fp32", 1),
                                               ("sdlab", "taesd_fp32", 1)]
    assert bench.image_runs(True, [1, 4])[2:] == [("sdlab", "bf16", 1), ("sdlab", "lean", 1), ("sdlab", "lcm", 1),
                                                  ("sdlab", "lcm", 4), ("sdlab", "taesd", 1)]


def test_gpu_check_names_the_missing_device(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # as on a machine without a GPU
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "tools"))
    import gpu_check

    assert gpu_check.main(["--ckpt", "unused.safetensors"]) == 2
    assert "no CUDA device here" in capsys.readouterr().err


def test_whole_image_runs_one_subprocess_per_library(sd15_file, tmp_path):
    out = tmp_path / "bench.json"
    assert bench.main(["--ckpt", str(sd15_file), "--quick", "--no-components", "--no-bf16", "--json", str(out)]) == 0
    results = json.loads(out.read_text())
    ours, theirs = (next(r for r in results["image"] if r["impl"] == name) for name in ("sdlab", "diffusers"))
    file_gb = sd15_file.stat().st_size / 1e9
    for run in (ours, theirs):  # diffusers maps the file and reads the weights at first use only
        assert run["seconds"] > 0 and 0 < run["load_peak_rss_gb"] <= run["peak_rss_gb"]
    assert file_gb * 0.9 < ours["load_peak_rss_gb"]  # sdlab reads every weight while loading
    # The same latents, prompt and sampler: the same picture, to a fraction of a grey level on average.
    assert ours["image_mean"] == pytest.approx(theirs["image_mean"], abs=0.05)
    assert ours["image_std"] == pytest.approx(theirs["image_std"], abs=0.05)
    # without bf16 the 4-step LCM runs are timed in float32, with the VAE and with TAESD (another picture)
    assert [r["impl"] for r in results["image"]] == ["diffusers", "sdlab", "sdlab lcm_fp32", "sdlab taesd_fp32"]
    lcm, taesd = results["image"][2:]
    assert lcm["seconds"] > 0 and taesd["seconds"] > 0 and lcm["image_mean"] != taesd["image_mean"]


def test_bench_refuses_a_missing_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        bench.main(["--ckpt", str(tmp_path / "missing.safetensors")])
