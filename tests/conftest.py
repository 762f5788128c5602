"""Shared fixtures: one random checkpoint in the real SD1.5 layout per test session.

Set `SDLAB_TEST_CACHE=/some/dir` to keep the random files between runs (they are rebuilt when
missing); by default they live in pytest's temporary directory and are rebuilt each session.
"""

from __future__ import annotations

import gc
import os
import shutil
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

from reference import random_sd15_state_dict  # noqa: E402

from sdlab.reference import diffusers_conversions, empty_reference_models  # noqa: E402

torch.set_num_threads(max(1, os.cpu_count() or 1))


SD15_FILES_GB = 11  # float32 .safetensors 4.3 GB, the Lightning .ckpt 4.3 GB, fp16 2.1 GB


@pytest.fixture(scope="session")
def sd15_dir(tmp_path_factory):
    """Where the random SD1.5 files live: `SDLAB_TEST_CACHE`, kept; or a session folder, deleted at the
    end of the session whatever its outcome (pytest would keep it, 11 GB, for three sessions)."""
    cache = os.environ.get("SDLAB_TEST_CACHE")
    directory = Path(cache) if cache else tmp_path_factory.mktemp("sd15")
    directory.mkdir(parents=True, exist_ok=True)
    missing = [name for name in ("random-v1-5.safetensors", "random-v1-5-lightning.ckpt",
                                 "random-v1-5-fp16.safetensors") if not (directory / name).exists()]
    free_gb = shutil.disk_usage(directory).free / 1e9
    if missing and free_gb < SD15_FILES_GB + 2:
        pytest.exit(f"the SD1.5-size tests write {SD15_FILES_GB} GB of random weights to {directory}, which "
                    f"has {free_gb:.1f} GB free: free some space, or point SDLAB_TEST_CACHE (or TMPDIR) at a "
                    "disk with room", returncode=2)
    yield directory
    if not cache:
        shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture(scope="session")
def sd15_file(sd15_dir) -> Path:
    """The random SD1.5-layout checkpoint as float32 `.safetensors` (4.3 GB)."""
    from safetensors.torch import save_file

    path = sd15_dir / "random-v1-5.safetensors"
    if not path.exists():
        state = random_sd15_state_dict(seed=0)
        save_file(state, str(path) + ".part")
        os.replace(str(path) + ".part", path)
        del state
        gc.collect()
    return path


@pytest.fixture(scope="session")
def sd15_variants(sd15_file, sd15_dir) -> dict[str, Path]:
    """The same weights as a `.ckpt` in the PyTorch Lightning 1.4 structure of the official file (under
    `state_dict`, with the EMA scalars, callbacks keyed by ModelCheckpoint, numpy scalars) and as fp16
    `.safetensors`."""
    from safetensors.torch import load_file, save_file

    from checkpoint_files import save_lightning

    paths = {"safetensors": sd15_file, "ckpt": sd15_dir / "random-v1-5-lightning.ckpt",
             "fp16": sd15_dir / "random-v1-5-fp16.safetensors"}
    if not paths["fp16"].exists():
        state = load_file(str(sd15_file))
        save_file({k: v.half() if v.is_floating_point() else v for k, v in state.items()}, str(paths["fp16"]))
        del state
        gc.collect()
    if not paths["ckpt"].exists():
        state = load_file(str(sd15_file))
        state["model_ema.decay"] = torch.tensor(0.9999)
        state["model_ema.num_updates"] = torch.tensor(0, dtype=torch.int32)
        save_lightning(state, str(paths["ckpt"]) + ".part")
        os.replace(str(paths["ckpt"]) + ".part", paths["ckpt"])
        del state
        gc.collect()
    return paths


@pytest.fixture(scope="session")
def sdlab_models(sd15_file):
    """sdlab's four models, loaded from the random file by sdlab's own loader."""
    from sdlab import model_loader

    return model_loader.preload_models_from_standard_weights(sd15_file, "cpu")


@pytest.fixture(scope="session")
def reference(sd15_file):
    """transformers' CLIP and diffusers' U-Net and VAE, loaded through diffusers' single-file converters."""
    from safetensors.torch import load_file

    state = load_file(str(sd15_file))
    clip, unet, vae = empty_reference_models()
    for model, converted in zip((clip, unet, vae), diffusers_conversions(state, unet, vae)):
        converted.pop("embeddings.position_ids", None)  # a constant buffer, not a weight
        missing, unexpected = model.load_state_dict(converted, strict=False)
        assert not unexpected and all("position_ids" in k for k in missing), (missing, unexpected)
    del state
    gc.collect()
    return {"clip": clip, "unet": unet, "vae": vae}


@pytest.fixture(scope="module")
def one_thread():
    """The tiny models: one thread is as fast, and much faster on a busy machine (no oversubscription).
    Use with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny():
    """The bundled tiny model, loaded once per test module."""
    from sdlab.model_loader import preload_models_from_standard_weights

    return preload_models_from_standard_weights()


@pytest.fixture(scope="module")
def tokenizer():
    from sdlab.tokenizer import load_tokenizer

    return load_tokenizer()
