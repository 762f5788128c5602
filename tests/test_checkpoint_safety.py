"""Safe reading: the official Lightning .ckpt structure loads, code in a file never runs, and every
file is validated (header, zip, pickle, family, config, values) before anything is allocated."""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
import resource
import subprocess
import sys
import time
import zipfile

import pytest
import torch
from checkpoint_files import (
    ModelCheckpoint,
    Reduce,
    entry,
    payloads,
    pickle_member,
    raw_safetensors,
    rewrite_zip,
    save_lightning,
    save_with_payload,
)
from reference import read_manifest
from safetensors import safe_open
from safetensors.torch import save_file
from small import SMALL, small_models

from sdlab import checkpoint_io, model_converter, model_loader
from sdlab.config import SD15, SD15_INPAINTING, SamplingDefaults, SDConfig
from sdlab.errors import (
    ArgumentError,
    CheckpointError,
    CheckpointNotFoundError,
    DeviceError,
    NumericalError,
)

SMALL_INPAINTING = dataclasses.replace(SMALL, unet=dataclasses.replace(SMALL.unet, in_channels=9))
LIGHTNING_GLOBALS = {
    "pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint": "stand-in",
    "numpy.core.multiarray.scalar": "stand-in",
    "numpy.dtype": "stand-in",
    "_codecs.encode": "weights_only",
    "collections.OrderedDict": "weights_only",
    "torch._utils._rebuild_tensor_v2": "weights_only",
}


def load(path, **kwargs):
    return model_loader.preload_models_from_standard_weights(path, "cpu", **kwargs)


def assert_same_weights(loaded: dict, models: dict, transform=lambda t: t):
    for name, model in models.items():
        theirs = loaded[name].state_dict()
        for key, value in model.state_dict().items():
            assert theirs[key].dtype == torch.float32 and torch.equal(transform(value), theirs[key]), (name, key)


@pytest.fixture(scope="module")
def small():
    return small_models(seed=3)


@pytest.fixture(scope="module")
def lightning_file(tmp_path_factory, small):
    path = tmp_path_factory.mktemp("lightning") / "small-lightning.ckpt"
    save_lightning(model_converter.to_standard(small), path, sdlab_config=SMALL.to_json())
    return path


# --- the Lightning structure -----------------------------------------------------------------


def test_torch_alone_refuses_the_lightning_file_with_colour_codes(lightning_file):
    """The file really has the official structure: plain weights_only refuses it."""
    with pytest.raises(pickle.UnpicklingError) as error:
        torch.load(lightning_file, weights_only=True)
    assert "ModelCheckpoint" in str(error.value) or "numpy" in str(error.value)
    assert "\x1b[" in str(error.value)


def test_lightning_fp32_loads_exactly(lightning_file, small):
    loaded = load(lightning_file)
    assert_same_weights(loaded, small)
    assert loaded["diffusion"].config == SMALL.unet


def test_numpy2_spelling_of_the_scalar_global_loads(tmp_path, lightning_file, small):
    """A Lightning file re-saved under numpy 2 names the scalar constructor `numpy._core.multiarray`."""
    pkl = pickle_member(lightning_file)
    assert b"numpy.core.multiarray" in pkl
    path = tmp_path / "numpy2.ckpt"
    rewrite_zip(lightning_file, path, {"data.pkl": pkl.replace(b"numpy.core.multiarray", b"numpy._core.multiarray")})
    assert_same_weights(load(path), small)


def test_lightning_fp16_loads_as_float32(tmp_path, small):
    path = tmp_path / "half.ckpt"
    state = {k: v.half() for k, v in model_converter.to_standard(small).items()}
    save_lightning(state, path, sdlab_config=SMALL.to_json())
    assert_same_weights(load(path), small, lambda t: t.half().float())
    assert load(path, dtype=torch.float16)["clip"].layernorm.weight.dtype == torch.float16


def test_lightning_inpainting_loads(tmp_path):
    torch.manual_seed(4)
    models = model_loader.build_models(SMALL_INPAINTING)
    path = tmp_path / "inpainting.ckpt"
    state = model_converter.to_standard(models)
    state["model_ema.decay"] = torch.tensor(0.9999)
    save_lightning(state, path, sdlab_config=SMALL_INPAINTING.to_json())
    loaded = load(path)
    assert loaded["diffusion"].unet.encoders[0][0].weight.shape[1] == 9
    assert_same_weights(loaded, models)


def test_inspect_reports_the_globals_and_stand_ins(lightning_file):
    report = model_loader.inspect_checkpoint(lightning_file)
    for name, status in LIGHTNING_GLOBALS.items():
        assert f"global   {name}: " + ("inert stand-in" if status == "stand-in" else "allowed (weights_only)") in report
    assert "family   sdlab" in report and "loads    yes" in report and "global_step = 840000" in report
    assert "PyTorch zip (.ckpt)" in report and "\x1b[" not in report


def test_the_stand_ins_are_the_only_additions_to_weights_only():
    from torch._weights_only_unpickler import _get_allowed_globals

    stand_ins = {name for _, name in checkpoint_io.STAND_INS}
    lightning = set(LIGHTNING_GLOBALS) - {"_codecs.encode", "collections.OrderedDict", "torch._utils._rebuild_tensor_v2"}
    assert stand_ins == lightning | {"numpy._core.multiarray.scalar"}  # numpy 2's name of the same constructor
    assert set(checkpoint_io._allowed_globals()) - stand_ins <= set(_get_allowed_globals())


# --- payloads: refused, and nothing ran --------------------------------------------------------


@pytest.mark.parametrize("where", ["callbacks", "tensor"])
@pytest.mark.parametrize("name", list(payloads("x")))
def test_payloads_are_refused_and_never_run(tmp_path, small, name, where):
    marker = tmp_path / "ran"
    path = tmp_path / "payload.ckpt"
    save_with_payload(model_converter.to_standard(small), path, payloads(marker)[name], where)
    with pytest.raises(CheckpointError) as error:
        load(path)
    message = str(error.value)
    assert str(path) in message and "\x1b[" not in message
    assert "nothing in it was run" in message
    report = model_loader.inspect_checkpoint(path)
    assert "refused" in report
    time.sleep(0.05)  # a Popen would have had time to create it
    assert not marker.exists()


def test_payload_global_is_named(tmp_path, small):
    path = tmp_path / "system.ckpt"
    save_with_payload(model_converter.to_standard(small), path, payloads(tmp_path / "ran")["os.system"])
    with pytest.raises(CheckpointError, match=r"refers to the global posix\.system"):
        load(path)
    assert "global   posix.system: REFUSED" in model_loader.inspect_checkpoint(path)


@pytest.mark.parametrize("protocol", [0, 4])
def test_other_pickle_protocols_with_code_are_refused(tmp_path, protocol):
    path = tmp_path / "proto.ckpt"
    torch.save({"state_dict": {"a": torch.zeros(1)}, "x": Reduce(os.system, f"touch {tmp_path / 'ran'}")}, path,
               pickle_protocol=protocol)
    with pytest.raises(CheckpointError, match=r"the opcode [A-Z_]+, which a checkpoint|refers to the global posix.system"):
        load(path)
    assert not (tmp_path / "ran").exists()


@pytest.mark.parametrize("pkl", [
    # BUILD on an allowed function (would set its attributes), on a stand-in class, on a storage
    b"\x80\x02cnumpy.core.multiarray\nscalar\nq\x00}q\x01X\x03\x00\x00\x00abcq\x02K\x01sb.",
    b"\x80\x02cpytorch_lightning.callbacks.model_checkpoint\nModelCheckpoint\nq\x00}q\x01b.",
    b"\x80\x02ctorch._utils\n_rebuild_tensor_v2\nq\x00N}b.",
    # a bytearray of a terabyte, a persistent id that is not a storage
    b"\x80\x02c__builtin__\nbytearray\nJ\x00\x00\x00\x7f\x85R.",
    b"\x80\x02X\x03\x00\x00\x00abcQ.",
])
def test_tricks_with_allowed_globals_are_refused(tmp_path, lightning_file, pkl):
    path = tmp_path / "trick.ckpt"
    rewrite_zip(lightning_file, path, {"data.pkl": pkl})
    with pytest.raises(CheckpointError) as error:
        load(path)
    assert str(path) in str(error.value)
    assert checkpoint_io.numpy_scalar.function is checkpoint_io._numpy_scalar  # nothing was modified


def test_compressed_members_are_refused(tmp_path, lightning_file):
    path = tmp_path / "deflated.ckpt"
    rewrite_zip(lightning_file, path, compression=zipfile.ZIP_DEFLATED)
    with pytest.raises(CheckpointError, match=r"is deflate.*zip -0"):
        load(path)


def test_a_storage_record_shorter_than_its_tensor_is_refused(tmp_path, lightning_file):
    path = tmp_path / "short-record.ckpt"
    with zipfile.ZipFile(lightning_file) as archive:
        record = next(n for n in archive.namelist() if n.endswith("/data/0")).split("/", 1)[1]
    rewrite_zip(lightning_file, path, {record: b"\0" * 4})
    with pytest.raises(CheckpointError, match="storage record data/0 has 4 bytes"):
        load(path)


def test_a_view_outside_its_storage_is_refused(tmp_path, lightning_file):
    pkl = pickle_member(lightning_file)
    path = tmp_path / "view.ckpt"
    # the first tensor's storage offset 0 -> 1000000 (BININT1 0 -> BININT 1000000 after its persistent id)
    index = pkl.index(b"QK\x00")
    rewrite_zip(lightning_file, path, {"data.pkl": pkl[:index] + b"QJ\x40\x42\x0f\x00" + pkl[index + 3:]})
    with pytest.raises(CheckpointError, match="reaches element"):
        load(path)


# --- safetensors: the same verdicts as the safetensors library ----------------------------------

F = b"\0" * 8
HOSTILE_SAFETENSORS = {
    "ok": (raw_safetensors({"a": entry("F32", [2], 0, 8)}, F), True),
    "space padding": (raw_safetensors(None, F, text=b'{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}   '), True),
    "NUL padding": (raw_safetensors(None, F, text=b'{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}\0\0'), False),
    "trailing bytes": (raw_safetensors({"a": entry("F32", [2], 0, 8)}, F + b"\0"), False),
    "truncated": (raw_safetensors({"a": entry("F32", [2], 0, 8)}, F[:5]), False),
    "gap": (raw_safetensors({"a": entry("F32", [1], 0, 4), "b": entry("F32", [1], 8, 12)}, F + b"\0" * 4), False),
    "overlap": (raw_safetensors({"a": entry("F32", [2], 0, 8), "b": entry("F32", [2], 4, 12)}, F + b"\0" * 4), False),
    "same range twice": (raw_safetensors({"a": entry("F32", [2], 0, 8), "b": entry("F32", [2], 0, 8)}, F), False),
    "duplicate key": (raw_safetensors(None, F * 2, text=b'{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},'
                                                      b'"a":{"dtype":"F32","shape":[2],"data_offsets":[8,16]}}'), False),
    "negative offset (into the header)": (raw_safetensors({"a": entry("F32", [2], -8, 0)}, F), False),
    "float offset": (raw_safetensors({"a": entry("F32", [2], 0.0, 8)}, F), False),
    "bool offset": (raw_safetensors({"a": entry("F32", [1], False, 4)}, F[:4]), False),
    "bool shape": (raw_safetensors({"a": entry("F32", [True], 0, 4)}, F[:4]), False),
    "negative shape": (raw_safetensors({"a": entry("F32", [-1], 0, 4)}, F[:4]), False),
    "end before begin": (raw_safetensors({"a": entry("F32", [0], 8, 0)}, F), False),
    "size lie": (raw_safetensors({"a": entry("F32", [3], 0, 8)}, F), False),
    "unknown dtype": (raw_safetensors({"a": entry("F33", [2], 0, 8)}, F), False),
    "float8 (valid)": (raw_safetensors({"a": entry("F8_E4M3", [2], 0, 2)}, F[:2]), True),
    "extra field (valid)": (raw_safetensors({"a": {**entry("F32", [2], 0, 8), "x": 1}}, F), True),
    "missing field": (raw_safetensors({"a": {"dtype": "F32", "shape": [2]}}, F), False),
    "three offsets": (raw_safetensors({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8, 8]}}, F), False),
    "metadata int": (raw_safetensors({"__metadata__": {"k": 1}, "a": entry("F32", [2], 0, 8)}, F), False),
    "metadata null (valid)": (raw_safetensors({"__metadata__": None, "a": entry("F32", [2], 0, 8)}, F), True),
    "metadata list": (raw_safetensors({"__metadata__": [], "a": entry("F32", [2], 0, 8)}, F), False),
    "empty (valid)": (raw_safetensors({}), True),
    "not an object": (raw_safetensors([1, 2]), False),
    "overflowing shape": (raw_safetensors({"a": entry("F32", [2**62, 2**62], 0, 8)}, F), False),
    "header too large": (raw_safetensors({"a": entry("F32", [2], 0, 8)}, F, length=10**9), False),
    "header past the end": (raw_safetensors({"a": entry("F32", [2], 0, 8)}, F, length=200), False),
    "zero header length": (raw_safetensors(None, b"", text=b""), False),
    "bad UTF-8": (raw_safetensors(None, b"", text=b'{"\xff": 1}'), False),
    "NaN in JSON": (raw_safetensors(None, F, text=b'{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":NaN}'), False),
    "lone surrogate": (raw_safetensors(None, F, text=b'{"a\\ud800":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}'), False),
    "huge integer": (raw_safetensors({"a": entry("F32", [2], 0, 2**70)}, F), False),
    "sub-byte misaligned": (raw_safetensors({"a": entry("F4", [3], 0, 2)}, F[:2]), False),
    "scalar (valid)": (raw_safetensors({"a": entry("F32", [], 0, 4)}, F[:4]), True),
    "5 bytes": (b"\x01\0\0\0\0", False),
}


@pytest.mark.parametrize("name", list(HOSTILE_SAFETENSORS))
def test_safetensors_header_verdicts_match_the_library(tmp_path, name):
    data, valid = HOSTILE_SAFETENSORS[name]
    path = tmp_path / "case.safetensors"
    path.write_bytes(data)
    try:
        with safe_open(str(path), "pt") as f:
            theirs = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118 - not iterable
    except Exception:  # noqa: BLE001 - the library's verdict
        theirs = None
    assert (theirs is not None) == valid, "the test's expectation disagrees with the safetensors library"
    if valid:
        with checkpoint_io.open_checkpoint(path) as file:
            assert {k: info.shape for k, info in file.tensors.items()} == theirs
    else:
        with pytest.raises(CheckpointError) as error:
            checkpoint_io.open_checkpoint(path)
        assert str(path) in str(error.value)


def test_sdlab_is_stricter_only_on_identical_duplicates(tmp_path):
    """The library keeps the last of two identical entries; sdlab refuses any duplicate key."""
    path = tmp_path / "dup.safetensors"
    body = b'{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}'
    path.write_bytes(raw_safetensors(None, F, text=body + b',' + body[1:] + b"}"))
    with safe_open(str(path), "pt") as f:
        assert list(f.keys()) == ["a"]
    with pytest.raises(CheckpointError, match="duplicate key 'a'"):
        checkpoint_io.open_checkpoint(path)


def test_an_sdxl_file_is_refused_from_its_header_alone(tmp_path):
    """6.9 GB declared (a sparse file): refused in well under a second, with no tensor read."""
    shapes = {"conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight": (3840, 1280),
              "model.diffusion_model.input_blocks.0.0.weight": (320, 4, 3, 3),
              "model.diffusion_model.middle_block.1.proj_in.weight": (1280, 1280)}
    header, offset = {}, 0
    for i in range(1600):
        key, shape = list(shapes.items())[i % 3]
        n = 2 * torch.Size(shape).numel()
        header[f"{key}.{i}" if i >= 3 else key] = entry("F16", shape, offset, offset + n)
        offset += n
    path = tmp_path / "sdxl.safetensors"
    body = raw_safetensors(header)
    with open(path, "wb") as f:
        f.write(body)
        f.truncate(len(body) + offset)
    assert path.stat().st_size > 6e9
    before, start = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, time.perf_counter()
    with pytest.raises(CheckpointError, match="SDXL"):
        load(path)
    assert time.perf_counter() - start < 2 and resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 200_000


# --- files that are no checkpoint at all ---------------------------------------------------------


def test_fifo_device_directory_and_missing_path(tmp_path):
    fifo = tmp_path / "pipe.safetensors"
    os.mkfifo(fifo)
    with pytest.raises(CheckpointError, match="FIFO"):
        load(fifo)  # would block forever if it were opened for reading
    with pytest.raises(CheckpointError, match="character device"):
        load("/dev/zero")
    with pytest.raises(CheckpointError, match="is a directory"):
        load(tmp_path)
    with pytest.raises(CheckpointNotFoundError, match="does not exist"):
        load(tmp_path / "missing.ckpt")
    with pytest.raises(CheckpointError, match="empty"):
        (tmp_path / "empty.ckpt").write_bytes(b"")
        load(tmp_path / "empty.ckpt")


# --- values and arguments ------------------------------------------------------------------------


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_a_non_finite_weight_names_the_tensor(tmp_path, small, value):
    state = {k: v.clone() for k, v in model_converter.to_standard(small).items()}
    state["model.diffusion_model.out.2.bias"][1] = value
    path = tmp_path / "nan.safetensors"
    save_file(state, str(path), metadata={"sdlab_config": SMALL.to_json()})
    with pytest.raises(NumericalError, match=r"'model\.diffusion_model\.out\.2\.bias'.*1 NaN or infinite"):
        load(path)


def test_a_weight_that_overflows_float16_is_named(tmp_path, small):
    state = {k: v.clone() for k, v in model_converter.to_standard(small).items()}
    state["first_stage_model.decoder.conv_out.bias"][0] = 1e6
    path = tmp_path / "big.safetensors"
    save_file(state, str(path), metadata={"sdlab_config": SMALL.to_json()})
    with pytest.raises(NumericalError, match="conv_out.bias.*after casting to float16"):
        load(path, dtype=torch.float16)


@pytest.mark.parametrize("dtype", [torch.int32, torch.bool, torch.complex64, torch.float8_e4m3fn, torch.uint8])
def test_non_floating_model_tensors_are_refused_before_reading(tmp_path, small, dtype):
    state = model_converter.to_standard(small)
    key = "model.diffusion_model.out.2.weight"
    state[key] = state[key].to(dtype)
    path = tmp_path / "int.safetensors"
    save_file(state, str(path), metadata={"sdlab_config": SMALL.to_json()})
    with pytest.raises(CheckpointError, match=rf"not floating point.*{key} \({str(dtype)[6:]}\)"):
        load(path)


@pytest.mark.parametrize("kwargs,error,message", [
    ({"dtype": 16}, ArgumentError, "dtype must be"), ({"dtype": "half-ish"}, ArgumentError, "dtype must be"),
    ({"dtype": torch.int8}, ArgumentError, "dtype must be"), ({"device": 0}, ArgumentError, "device must be"),
    ({"device": "gpu9"}, DeviceError, "not a device name"), ({"device": "meta"}, DeviceError, "meta"),
])
def test_bad_dtype_and_device_arguments(kwargs, error, message):
    with pytest.raises(error, match=message):
        model_loader.preload_models_from_standard_weights(None, **{"device": "cpu", **kwargs})


def test_dtype_by_name_and_cuda_on_a_cpu_torch():
    assert model_loader.check_dtype("bfloat16") is torch.bfloat16
    if not torch.cuda.is_available():
        with pytest.raises(DeviceError, match="cannot be used with this PyTorch"):
            model_loader.check_device("cuda")


# --- the config metadata -------------------------------------------------------------------------


def config_with(section: str, **changes) -> str:
    raw = json.loads(SMALL.to_json())
    raw[section].update(changes)
    return json.dumps(raw)


@pytest.mark.parametrize("text,message", [
    (config_with("clip", n_layer=100000), r"clip\.n_layer=100000 \(expected 1\.\.64\)"),
    (config_with("clip", n_layer="2"), r"clip\.n_layer must be int, not '2'"),
    (config_with("clip", n_layer=2.0), r"clip\.n_layer must be int, not 2\.0"),
    (config_with("unet", attention_levels=[1, 0]), r"attention_levels must be bool"),
    (config_with("unet", channel_mult=[]), r"channel_mult must be a non-empty list"),
    (config_with("unet", n_groups=7), "multiples of unet.n_groups"),
    (config_with("vae", wings=2), r"unknown fields \['wings'\]"),
    (config_with("sampling", sampler="plms"), "names the sampler 'plms'"),
    (config_with("sampling", height=100), "multiples of 8"),
    (json.dumps({**json.loads(SMALL.to_json()), "extra": {}}), r"unknown sections \['extra'\]"),
    ('{"clip": {"layer_norm_eps": NaN}}', "not valid JSON"),
    ("[1]", "not an object"),
])
def test_bad_config_metadata_is_refused_before_building(tmp_path, small, text, message):
    path = tmp_path / "config.safetensors"
    save_file(model_converter.to_standard(small), str(path), metadata={"sdlab_config": text})
    start = time.perf_counter()
    with pytest.raises(CheckpointError, match=message) as error:
        load(path)
    assert str(path) in str(error.value) and time.perf_counter() - start < 5


def test_from_json_names_the_file():
    with pytest.raises(CheckpointError, match="my.safetensors: clip has unknown fields"):
        SDConfig.from_json('{"clip": {"n_wings": 2}}', source="my.safetensors")


# --- families, keys, sampling ------------------------------------------------------------------


def test_original_key_inverts_split_model_on_the_manifest():
    for key in read_manifest():
        if not model_converter.IGNORED.match(key):
            model, local = model_converter.split_model(key)
            assert model_converter.original_key(model, local) == key


def test_detect_config_returns_the_presets():
    with torch.device("meta"):
        for preset in (SD15, SD15_INPAINTING):
            shapes = model_converter.to_standard(model_loader.build_models(preset))
            assert model_converter.detect_config(shapes, {}) is preset
    assert model_converter.detect_family(shapes, {})[0].name == "SD1.x inpainting"


def test_no_import_cycle_between_converter_and_loader():
    code = "import sys, sdlab.model_converter; print('sdlab.model_loader' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0 and done.stdout.strip() == "False", done.stderr


def test_the_tiny_model_carries_its_sampling_defaults():
    models = model_loader.preload_models_from_standard_weights()
    assert models["diffusion"].sampling == SamplingDefaults(64, 64, "dpmpp_2m", 20, 2.5)
    with safe_open(str(model_loader.DEFAULT_CHECKPOINT), "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F16"}  # noqa: SIM118 - not iterable


def test_sd15_files_get_the_sd15_sampling_defaults(tmp_path, small):
    path = tmp_path / "small.safetensors"
    save_file(model_converter.to_standard(small), str(path), metadata={"sdlab_config": SMALL.to_json()})
    assert load(path)["diffusion"].sampling == SD15.sampling


def test_stand_in_classes_are_inert():
    with pytest.raises(CheckpointError):
        checkpoint_io.LightningModelCheckpoint()
    assert ModelCheckpoint is not checkpoint_io.LightningModelCheckpoint
