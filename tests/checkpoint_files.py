"""Checkpoint files written for the tests: the PyTorch Lightning 1.4 structure of every SD 1.x release
`.ckpt`, the same with code payloads, and raw safetensors files with any header.

The Lightning pickles really reference the globals of the official files
(`pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint`, `numpy.core.multiarray.scalar`,
`numpy.dtype`, `_codecs.encode`) without importing Lightning: a pure-Python pickler writes a GLOBAL
opcode with the original module path for the local stand-in classes below.
"""

from __future__ import annotations

import builtins
import collections
import json
import os
import pathlib
import pickle
import struct
import subprocess
import types
import zipfile

import numpy as np
import torch


class ModelCheckpoint:
    """Stands for pytorch_lightning's class; only its name is written."""


class NumpyDtypeWriter:
    """Stands for numpy.dtype; written as numpy 1.x writes `dtype('f8')`."""


def numpy_scalar_writer(*args):
    """Stands for numpy.core.multiarray.scalar."""


NAMED = {
    ModelCheckpoint: ("pytorch_lightning.callbacks.model_checkpoint", "ModelCheckpoint"),
    NumpyDtypeWriter: ("numpy", "dtype"),
    numpy_scalar_writer: ("numpy.core.multiarray", "scalar"),
}


class NumpyValue:
    """A numpy scalar pickled as numpy 1.x does: scalar(dtype('f8', False, True) + state, raw bytes)."""

    def __init__(self, value, code="f8"):
        self.value, self.code = value, code

    def __reduce__(self):
        return numpy_scalar_writer, (NumpyDtypeCode(self.code), np.array(self.value, dtype=self.code).tobytes())


class NumpyDtypeCode:
    def __init__(self, code):
        self.code = code

    def __reduce__(self):
        return NumpyDtypeWriter, (self.code, False, True), (3, "<", None, None, None, -1, -1, 0)


class NamedGlobalPickler(pickle._Pickler):
    """The pure-Python pickler, writing the objects of `NAMED` as GLOBAL opcodes of their original names."""

    dispatch = pickle._Pickler.dispatch.copy()

    def _save_named(self, obj, name=None):
        module, qualname = NAMED[obj]
        self.write(pickle.GLOBAL + f"{module}\n{qualname}\n".encode())
        self.memoize(obj)

    def _save_function(self, obj, name=None):
        if obj in NAMED:
            return self._save_named(obj)
        return pickle._Pickler.save_global(self, obj, name)

    def _save_type(self, obj):
        if obj in NAMED:
            return self._save_named(obj)
        return pickle._Pickler.save_type(self, obj)

    dispatch[types.FunctionType] = _save_function
    dispatch[type] = _save_type


PICKLE_MODULE = types.ModuleType("named_global_pickle")
PICKLE_MODULE.Pickler = NamedGlobalPickler
PICKLE_MODULE.Unpickler = pickle.Unpickler


def lightning_structure(state_dict: dict, **extra) -> dict:
    """What PyTorch Lightning 1.4's `dump_checkpoint` writes for SD 1.x (optimizer states pruned)."""
    return {
        "epoch": 6,
        "global_step": 840000,
        "pytorch-lightning_version": "1.4.2",
        "state_dict": collections.OrderedDict(state_dict),
        "callbacks": {ModelCheckpoint: {
            "monitor": None, "best_model_score": None, "best_model_path": "", "current_score": None,
            "dirpath": "/fsx/stable-diffusion/logs/checkpoints", "last_model_path": b"last.ckpt".decode(),
        }},
        "lr_schedulers": [{
            "base_lrs": [0.0001], "last_epoch": 839999, "_step_count": 840000, "verbose": False,
            "_get_lr_called_within_step": False, "_last_lr": [NumpyValue(0.0001)],
            "lr_lambdas": [{"warm_up_steps": [10000], "f_start": [1e-06], "f_max": [1.0], "f_min": [1.0],
                            "last_f": NumpyValue(1.0), "verbosity_interval": 0, "step_bytes": b"\x00\xff"}],
        }],
        **extra,
    }


def save_lightning(state_dict: dict, path, **extra) -> None:
    torch.save(lightning_structure(state_dict, **extra), path, pickle_module=PICKLE_MODULE)


# --- payloads: each would create `marker` if anything in the file ever ran ------------------------


class Reduce:
    """An object that pickles as `function(*args)`."""

    def __init__(self, function, *args):
        self.function, self.args = function, args

    def __reduce__(self):
        return self.function, self.args

    def __call__(self, *args):  # pickle insists that what it reduces with be callable
        raise AssertionError("never called")


def payloads(marker) -> dict:
    """Name -> an object whose unpickling would create `marker`."""
    marker = str(marker)
    touch = f"open({marker!r}, 'w').close()"
    bound_touch = Reduce(getattr, pathlib.Path(marker), "touch")
    return {
        "os.system": Reduce(os.system, f"touch {marker}"),
        "eval": Reduce(builtins.eval, touch),
        "exec": Reduce(builtins.exec, touch),
        "subprocess.Popen": Reduce(subprocess.Popen, ["touch", marker]),
        "getattr": Reduce(bound_touch),
        "builtins.open": Reduce(builtins.open, marker, "w"),
        "torch.load": Reduce(torch.load, marker),
        "stand-in called": Reduce(ModelCheckpoint, touch),
        "numpy._reconstruct": np.zeros(3),
    }


def save_with_payload(state_dict: dict, path, payload, where: str = "callbacks") -> None:
    """The Lightning structure with `payload` hidden in it (in the callbacks, or as a tensor)."""
    if where == "tensor":
        state_dict = {**state_dict, "model.diffusion_model.out.2.bias": payload}
        save_lightning(state_dict, path)
    else:
        save_lightning(state_dict, path, **{where: {ModelCheckpoint: {"hook": payload}}})


def rewrite_zip(source, target, replace: dict | None = None, compression=zipfile.ZIP_STORED) -> None:
    """Copy a .ckpt's members into a new zip, replacing some (`{"data.pkl": bytes}`), optionally compressed."""
    replace = replace or {}
    with zipfile.ZipFile(source) as src, zipfile.ZipFile(target, "w", compression) as dst:
        for info in src.infolist():
            name = info.filename.split("/", 1)[1]
            dst.writestr(info.filename, replace.get(name, src.read(info.filename)))


def pickle_member(path) -> bytes:
    with zipfile.ZipFile(path) as archive:
        return archive.read(next(n for n in archive.namelist() if n.endswith("/data.pkl")))


# --- raw safetensors -------------------------------------------------------------------------


def raw_safetensors(header, data: bytes = b"", length: int | None = None, text: bytes | None = None) -> bytes:
    """A safetensors file from a header (a dict, or exact JSON bytes) and data, with no checks at all."""
    body = text if text is not None else json.dumps(header).encode()
    return struct.pack("<Q", len(body) if length is None else length) + body + data


def entry(dtype: str, shape, begin: int, end: int) -> dict:
    return {"dtype": dtype, "shape": list(shape), "data_offsets": [begin, end]}
