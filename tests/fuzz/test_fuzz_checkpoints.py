"""Seeded fuzz cases over checkpoint files: every case is refused with sdlab's own error naming the
file, or loads exactly the expected weights (judged by `outcomes.judge`). The small random model of
tests/small.py keeps it fast.

Families: truncations, bit flips in headers and zip structures, hostile safetensors headers, dtype and
shape lies, NaN/inf tensors, pickle payloads, compressed members and zip bombs, huge declared sizes,
special files (FIFO, devices, directories), text and HTML files, other model families, bad configs.
"""

from __future__ import annotations

import copy
import json
import os
import random
import struct
import zipfile
from pathlib import Path

import pytest
import torch
from checkpoint_files import (
    payloads,
    pickle_member,
    raw_safetensors,
    rewrite_zip,
    save_lightning,
    save_with_payload,
)
from outcomes import judge
from safetensors.torch import save_file
from small import SMALL, small_models

from sdlab import model_converter, model_loader

N = {"truncate": 30, "bitflip": 30, "zipflip": 20, "header": 40, "nonfinite": 8, "config": 20}


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """The small model as .safetensors and as a Lightning .ckpt, and the weights a load must give."""
    directory = tmp_path_factory.mktemp("fuzz")
    models = small_models(seed=11)
    state = {k: v.clone() for k, v in model_converter.to_standard(models).items()}
    safetensors_path, ckpt_path = directory / "base.safetensors", directory / "base.ckpt"
    save_file(state, str(safetensors_path), metadata={"sdlab_config": SMALL.to_json()})
    save_lightning(state, ckpt_path, sdlab_config=SMALL.to_json())
    expected = {name: {k: v.clone() for k, v in m.state_dict().items()} for name, m in models.items()}
    return {"dir": directory, "state": state, "safetensors": safetensors_path.read_bytes(), "ckpt": ckpt_path.read_bytes(),
            "ckpt_path": ckpt_path, "expected": expected}


def equal_weights(expected):
    def sane(models):
        return all(torch.equal(models[n].state_dict()[k], v) for n, tensors in expected.items() for k, v in tensors.items())

    return sane


def run(family: str, path, expected):
    path = str(path)
    return judge(family, lambda: model_loader.preload_models_from_standard_weights(path, "cpu"), names=(path,),
                 sane=equal_weights(expected), timeout=30)


def header_length(data: bytes) -> int:
    return 8 + struct.unpack("<Q", data[:8])[0]


# --- truncations and bit flips -------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["safetensors", "ckpt"])
@pytest.mark.parametrize("seed", range(N["truncate"]))
def test_truncated(base, tmp_path, kind, seed):
    data = base[kind]
    edges = [1, 7, 8, 9, header_length(base["safetensors"]) - 1, len(data) - 22, len(data) - 1]
    cut = edges[seed] if seed < len(edges) else random.Random(seed).randrange(1, len(data))
    path = tmp_path / f"cut.{kind}"
    path.write_bytes(data[:cut])
    assert run(f"truncated {kind}", path, base["expected"]) == "refused"


@pytest.mark.parametrize("seed", range(N["bitflip"]))
def test_bit_flip_in_safetensors_header(base, tmp_path, seed):
    rng = random.Random(seed)
    data = bytearray(base["safetensors"])
    position = rng.randrange(header_length(data))
    data[position] ^= 1 << rng.randrange(8)
    path = tmp_path / "flip.safetensors"
    path.write_bytes(bytes(data))
    run("bit flip: safetensors header", path, base["expected"])


def zip_structure_ranges(path) -> list[tuple[int, int]]:
    """The byte ranges of a .ckpt that describe it: data.pkl and the central directory (not tensor data)."""
    data = Path(path).read_bytes()
    with zipfile.ZipFile(path) as archive:
        info = next(i for i in archive.infolist() if i.filename.endswith("/data.pkl"))
        start = info.header_offset
        end = start + 30 + len(info.filename) + len(info.extra) + info.compress_size + 64
    directory = data.rindex(b"PK\x01\x02", 0, data.rindex(b"PK\x05\x06"))
    first_entry = data.index(b"PK\x01\x02", max(0, directory - 200_000))
    return [(start, end), (first_entry, len(data))]


@pytest.mark.parametrize("seed", range(N["zipflip"]))
def test_bit_flip_in_ckpt_structure(base, tmp_path, seed):
    rng = random.Random(1000 + seed)
    begin, end = zip_structure_ranges(base["ckpt_path"])[seed % 2]
    data = bytearray(base["ckpt"])
    position = rng.randrange(begin, min(end, len(data)))
    data[position] ^= 1 << rng.randrange(8)
    path = tmp_path / "flip.ckpt"
    path.write_bytes(bytes(data))
    run("bit flip: ckpt structure", path, base["expected"])


# --- hostile headers, dtype and shape lies ---------------------------------------------------------

GARBAGE = [-1, -2**63, 2**64, 2**70, 1.5, True, None, "7", [], {}, [[1]], 10**12]


def mutate_header(header: dict, rng: random.Random) -> tuple[dict, str]:
    """One hostile change to a valid header -> (header, what changed)."""
    names = [k for k in header if k != "__metadata__"]
    name = rng.choice(names)
    info = header[name]
    kind = rng.choice(["dtype", "shape", "offsets", "overlap", "metadata", "missing", "garbage field", "shape lie"])
    if kind == "dtype":
        info["dtype"] = rng.choice(["F33", "f32", "", "I32", "BOOL", "F8_E5M2", "C64", 7, None])
    elif kind == "shape":
        info["shape"] = rng.choice([[rng.choice(GARBAGE)], "12", None, info["shape"] + [rng.choice(GARBAGE)]])
    elif kind == "offsets":
        info["data_offsets"] = [rng.choice(GARBAGE + [0]), rng.choice(GARBAGE + [info["data_offsets"][1]])]
    elif kind == "overlap":
        begin, end = info["data_offsets"]
        info["data_offsets"] = [max(0, begin - 4), end - 4]
    elif kind == "metadata":
        header["__metadata__"] = rng.choice([{"sdlab_config": 3}, [], "x", {"a": None}, {"sdlab_config": ["a"]}])
    elif kind == "missing":
        info.pop(rng.choice(["dtype", "shape", "data_offsets"]))
    elif kind == "garbage field":
        header[name] = rng.choice(GARBAGE)
    else:  # shape lie with consistent byte count: (a, b) -> (b, a) or a flattened shape
        if len(info["shape"]) >= 2 and info["shape"][0] != info["shape"][1]:
            info["shape"] = [info["shape"][1], info["shape"][0]] + info["shape"][2:]
        else:
            info["shape"] = [int(torch.Size(info["shape"]).numel())]
    return header, kind


@pytest.mark.parametrize("seed", range(N["header"]))
def test_hostile_header(base, tmp_path, seed):
    rng = random.Random(2000 + seed)
    data = base["safetensors"]
    n = header_length(data)
    header, _ = mutate_header(json.loads(data[8:n]), rng)
    path = tmp_path / "hostile.safetensors"
    path.write_bytes(raw_safetensors(header, data[n:]))
    run("hostile safetensors header", path, base["expected"])  # a no-op lie (a 1-D shape flattened) loads


@pytest.mark.parametrize("seed", range(N["nonfinite"]))
def test_nan_or_inf_tensor(base, tmp_path, seed):
    rng = random.Random(3000 + seed)
    state = {k: v.clone() for k, v in base["state"].items()}
    key = rng.choice(sorted(state))
    state[key].view(-1)[rng.randrange(state[key].numel())] = rng.choice([float("nan"), float("inf"), -float("inf")])
    path = tmp_path / ("nan.ckpt" if seed % 2 else "nan.safetensors")
    if seed % 2:
        save_lightning(state, path, sdlab_config=SMALL.to_json())
    else:
        save_file(state, str(path), metadata={"sdlab_config": SMALL.to_json()})
    assert run("NaN/inf tensor", path, base["expected"]) == "refused"


# --- pickles, zips and huge declared sizes -------------------------------------------------------


@pytest.mark.parametrize("where", ["callbacks", "tensor"])
@pytest.mark.parametrize("name", list(payloads("x")))
def test_pickle_payload(base, tmp_path, name, where):
    marker = tmp_path / "ran"
    path = tmp_path / "payload.ckpt"
    save_with_payload(base["state"], path, payloads(marker)[name], where)
    assert run("pickle payload", path, base["expected"]) == "refused"
    assert not marker.exists()


def test_zip_bomb_member(base, tmp_path):
    """An extra deflated member of 200 MB of zeros (~200 kB in the file)."""
    path = tmp_path / "bomb.ckpt"
    rewrite_zip(base["ckpt_path"], path)
    with zipfile.ZipFile(path, "a", zipfile.ZIP_DEFLATED) as archive, archive.open("base/zeros", "w", force_zip64=True) as f:
        for _ in range(200):
            f.write(bytes(1 << 20))
    assert path.stat().st_size < len(base["ckpt"]) + (1 << 20)
    assert run("zip bomb / compressed member", path, base["expected"]) == "refused"


@pytest.mark.parametrize("compression", [zipfile.ZIP_DEFLATED, zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA])
def test_compressed_members(base, tmp_path, compression):
    path = tmp_path / "compressed.ckpt"
    rewrite_zip(base["ckpt_path"], path, compression=compression)
    assert run("zip bomb / compressed member", path, base["expected"]) == "refused"


@pytest.mark.parametrize("numel", [2**40, 2**62, 0])
def test_huge_declared_storage(base, tmp_path, numel):
    """The first storage's element count in the pickle replaced (BININT/LONG1) by a huge one."""
    pkl = pickle_member(base["ckpt_path"])
    end = pkl.index(b"X\x03\x00\x00\x00cpu") + 8  # 'cpu', its memo entry, then the numel operand
    end += {b"q": 2, b"r": 5}.get(pkl[end:end + 1], 0)
    operand = {b"K": 2, b"M": 3, b"J": 5}[pkl[end:end + 1]]
    replacement = b"\x8a\x08" + numel.to_bytes(8, "little") if numel else b"K\x00"
    path = tmp_path / "huge.ckpt"
    rewrite_zip(base["ckpt_path"], path, {"data.pkl": pkl[:end] + replacement + pkl[end + operand:]})
    assert run("huge declared size", path, base["expected"]) == "refused"


def test_huge_declared_safetensors_size(base, tmp_path):
    data = base["safetensors"]
    n = header_length(data)
    header = json.loads(data[8:n])
    name = max((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][1])
    header[name]["shape"] = [2**20, 2**20, 2**10]
    header[name]["data_offsets"][1] = header[name]["data_offsets"][0] + 4 * 2**50
    path = tmp_path / "huge.safetensors"
    path.write_bytes(raw_safetensors(header, data[n:]))
    assert run("huge declared size", path, base["expected"]) == "refused"


# --- not files, not checkpoints, other models, bad configs ---------------------------------------


@pytest.mark.parametrize("kind", ["fifo", "/dev/zero", "/dev/null", "/dev/urandom", "directory", "symlink to /dev/zero"])
def test_special_files(base, tmp_path, kind):
    if kind == "fifo":
        path = tmp_path / "pipe.ckpt"
        os.mkfifo(path)
    elif kind == "directory":
        path = tmp_path / "folder.safetensors"
        path.mkdir()
    elif kind.startswith("symlink"):
        path = tmp_path / "link.safetensors"
        path.symlink_to("/dev/zero")
    else:
        path = Path(kind)
    assert run("special file", path, base["expected"]) == "refused"


TEXTS = {
    "html": b"<!DOCTYPE html><html><body>404 Not Found</body></html>\n" * 30,
    "json": json.dumps({"model": "v1-5"}).encode(),
    "git-lfs pointer": b"version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 4265146304\n",
    "whitespace": b" \n\t" * 100,
    "PK junk": b"PK\x03\x04" + bytes(range(256)) * 4,
    "legacy torch": b"\x80\x02\x8a\x0al\xfc\x9cF\xf9 j\xa8P\x19." + bytes(100),
    "gzip": b"\x1f\x8b\x08\x00" + bytes(500),
    "random bytes": random.Random(5).randbytes(4096),
}


@pytest.mark.parametrize("name", list(TEXTS))
def test_text_and_other_files(base, tmp_path, name):
    path = tmp_path / f"{name.replace(' ', '-')}.ckpt"
    path.write_bytes(TEXTS[name])
    assert run("text / HTML / other file", path, base["expected"]) == "refused"


FAMILIES = {
    "SDXL": {"conditioner.embedders.0.transformer.text_model.final_layer_norm.weight": (768,),
             "model.diffusion_model.input_blocks.0.0.weight": (320, 4, 3, 3)},
    "SD2": {"cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight": (3072, 1024)},
    "SD2 U-Net": {"model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (320, 1024)},
    "another model": {"encoder.layer.0.weight": (4, 4), "lm_head.weight": (8, 4)},
    "no tensors": {},
}


@pytest.mark.parametrize("name", list(FAMILIES))
def test_wrong_family(base, tmp_path, name):
    path = tmp_path / "family.safetensors"
    save_file({k: torch.zeros(shape) for k, shape in FAMILIES[name].items()}, str(path))
    assert run("wrong family", path, base["expected"]) == "refused"


def test_small_inpainting_shapes_without_metadata(base, tmp_path):
    state = dict(base["state"])
    state["model.diffusion_model.input_blocks.0.0.weight"] = torch.zeros(32, 9, 3, 3)
    path = tmp_path / "inpainting.safetensors"
    save_file(state, str(path))
    assert run("wrong family", path, base["expected"]) == "refused"


CONFIG_VALUES = [-1, 0, 10**9, 100000, 2.5, "3", True, None, [], {}, [1, 2, 3, 4, 5, 6, 7, 8, 9], float("1e308")]


@pytest.mark.parametrize("seed", range(N["config"]))
def test_bad_config(base, tmp_path, seed):
    rng = random.Random(4000 + seed)
    raw = json.loads(SMALL.to_json())
    section = rng.choice(sorted(raw))
    if seed % 5 == 4:
        raw[section]["unknown_field"] = 1
    else:
        raw[section][rng.choice(sorted(raw[section]))] = copy.deepcopy(rng.choice(CONFIG_VALUES))
    text = json.dumps(raw) if seed % 7 != 6 else json.dumps(raw)[:-3]
    path = tmp_path / "config.safetensors"
    save_file(base["state"], str(path), metadata={"sdlab_config": text})
    run("bad metadata config", path, base["expected"])
