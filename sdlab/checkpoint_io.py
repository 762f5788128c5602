"""Reading checkpoint files safely: everything a file declares is checked before anything is allocated,
and nothing in a file ever runs.

`open_checkpoint(path)` returns a `CheckpointFile` that knows every tensor's name, shape and dtype
(`.tensors`) and the file's string metadata (`.metadata`) while no tensor data has been read yet;
`.read(key)` then reads one tensor. Two formats:

* **`.safetensors`**: an 8-byte little-endian header length $N$, $N$ bytes of JSON, then the raw
  tensor bytes. The whole header is validated first, exactly as strictly as the `safetensors`
  library does (and a little more: duplicate keys are refused): each tensor's byte range
  $[b_i, e_i)$ must satisfy $e_i - b_i = \\text{numel}_i \\cdot \\text{bits}_i / 8$, the ranges sorted by
  offset must tile the data exactly ($b_0 = 0$, $b_{i+1} = e_i$, $e_\\text{last} = \\text{size} - 8 - N$):
  no gap, no overlap, no trailing bytes, nothing in the header.
* **`.ckpt`**: a PyTorch zip archive whose `data.pkl` is a pickle. The pickle is first disassembled
  (only the opcodes PyTorch's `weights_only` unpickler knows; every global named) and then dry-run
  with inert stand-ins for every global, which checks that each tensor lies inside its storage
  record and that each record has exactly the bytes it claims. Only then is the file opened with
  `torch.load(weights_only=True, mmap=True)`. Besides what `weights_only` allows, the official
  PyTorch Lightning 1.4 files (every SD 1.x release `.ckpt`) need three data-only globals, and
  get inert stand-ins for them (`STAND_INS`); anything else is refused, naming the global.
"""

from __future__ import annotations

import _compat_pickle
import codecs
import collections
import json
import os
import pickle
import pickletools
import re
import stat
import struct
import threading
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .errors import CheckpointError, CheckpointNotFoundError

MAX_HEADER_BYTES = 100_000_000  # the safetensors library's limit
MAX_PICKLE_BYTES = 256 << 20  # an SD checkpoint's data.pkl is ~100 kB; its tensors live in other records
U64_MAX = 2**64 - 1

#: safetensors dtype -> (bits per element, torch dtype or None where torch has no such dtype)
SAFETENSORS_DTYPES = {
    "BOOL": (8, torch.bool), "U8": (8, torch.uint8), "I8": (8, torch.int8), "I16": (16, torch.int16),
    "U16": (16, torch.uint16), "I32": (32, torch.int32), "U32": (32, torch.uint32), "I64": (64, torch.int64),
    "U64": (64, torch.uint64), "F16": (16, torch.float16), "BF16": (16, torch.bfloat16),
    "F32": (32, torch.float32), "F64": (64, torch.float64), "C64": (64, torch.complex64),
    "F8_E5M2": (8, torch.float8_e5m2), "F8_E4M3": (8, torch.float8_e4m3fn), "F8_E8M0": (8, None),
    "F8_E4M3FNUZ": (8, None), "F8_E5M2FNUZ": (8, None), "F6_E2M3": (6, None), "F6_E3M2": (6, None), "F4": (4, None),
}


@dataclass(frozen=True)
class TensorInfo:
    """What a file declares about one tensor, before any of its data is read."""

    shape: tuple[int, ...]
    dtype: str  # torch's name ("float32") where torch has the dtype, else the file's ("F6_E2M3")

    @property
    def numel(self) -> int:
        n = 1
        for size in self.shape:
            n *= size
        return n


def quoted(path) -> str:
    return repr(str(path))


class CheckpointFile:
    """An opened checkpoint: `.tensors` (name -> TensorInfo), `.metadata` (str -> str), `.read(key)`."""

    format = "?"

    def __init__(self, path: Path):
        self.path = path
        self.tensors: dict[str, TensorInfo] = {}
        self.metadata: dict[str, str] = {}
        self.globals: dict[str, str] = {}  # .ckpt only: global -> "weights_only" or "stand-in"
        self.extras: dict[str, str] = {}  # .ckpt only: top-level entries besides the tensors, summarised

    def read(self, key: str, as_dtype: torch.dtype | None = None) -> torch.Tensor:
        """The tensor `key`, in `as_dtype` if given (floating tensors)."""
        raise NotImplementedError

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def open_checkpoint(path) -> CheckpointFile:
    """Check that `path` is a regular file, recognise its format and validate its whole structure."""
    try:
        path = Path(os.fspath(path)).expanduser()
    except TypeError:
        raise CheckpointError(f"the checkpoint path must be a str or os.PathLike, not {type(path).__name__} "
                              f"({path!r:.80}); pass the path of a .safetensors or .ckpt file") from None
    info = _stat_regular_file(path)
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))  # never blocks, even if swapped for a FIFO
    handle = os.fdopen(fd, "rb")
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise CheckpointError(f"{quoted(path)} is not a regular file any more; pass a checkpoint file")
        magic = handle.read(8)
        if magic.startswith((b"PK\x03\x04", b"PK\x05\x06")):
            handle.close()
            return TorchZipFile(path, info.st_size)
        if magic.startswith(b"\x80\x02\x8a\x0a"):
            raise CheckpointError(f"{quoted(path)} is a PyTorch file in the legacy (pre-1.6, non-zip) format, which "
                                  f"cannot be opened without running its pickle; re-save it with a current torch.save")
        return SafetensorsFile(path, handle, info.st_size)
    except BaseException:
        handle.close()
        raise


def _stat_regular_file(path: Path) -> os.stat_result:
    """`os.stat` only (the file is not opened): refuse what is missing, a directory, a FIFO or a device."""
    try:
        info = os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        raise CheckpointNotFoundError(
            f"checkpoint {quoted(path)} does not exist; pass the path of v1-5-pruned-emaonly.safetensors "
            f"(or .ckpt), or no path to use sdlab's bundled tiny model") from None
    except (OSError, ValueError) as error:  # permission, name too long, NUL byte in the name
        raise CheckpointError(f"cannot look at checkpoint {quoted(path)}: {error}") from None
    if stat.S_ISDIR(info.st_mode):
        raise CheckpointError(f"{quoted(path)} is a directory; pass the checkpoint file inside it")
    if not stat.S_ISREG(info.st_mode):
        kinds = {stat.S_ISFIFO: "a FIFO (named pipe)", stat.S_ISCHR: "a character device", stat.S_ISBLK: "a block device",
                 stat.S_ISSOCK: "a socket"}
        kind = next((name for test, name in kinds.items() if test(info.st_mode)), "not a regular file")
        raise CheckpointError(f"{quoted(path)} is {kind}, not a checkpoint file; pass a .safetensors or .ckpt file")
    if info.st_size == 0:
        raise CheckpointError(f"{quoted(path)} is empty (0 bytes); the download failed, download it again")
    return info


# --- safetensors --------------------------------------------------------------------------------


READ_SLICE = 1 << 20  # values converted at a time when a tensor is read in another dtype


class SafetensorsFile(CheckpointFile):
    """A `.safetensors` file whose header has been validated; each tensor is read into its own buffer."""

    format = "safetensors"

    def __init__(self, path: Path, handle, size: int):
        super().__init__(path)
        self._handle = handle
        self._buffers: dict[torch.dtype, torch.Tensor] = {}  # read()'s conversion buffers, one per stored dtype
        handle.seek(0)
        self.tensors, self.metadata, self._ranges = parse_safetensors_header(handle, size, path)

    def read(self, key: str, as_dtype: torch.dtype | None = None) -> torch.Tensor:
        """The tensor `key`, read straight into its own buffer. With another floating `as_dtype`
        (a float16 file loaded as float32) it is converted `READ_SLICE` values at a time through one
        reused buffer, so the file's copy of a tensor never exists beside the converted one (and
        the allocator is left no holes between them)."""
        info, begin = self.tensors[key], self._ranges[key][0]
        dtype = SAFETENSORS_DTYPES[_SAFETENSORS_NAME[info.dtype]][1] if info.dtype in _SAFETENSORS_NAME else None
        if dtype is None:
            raise CheckpointError(f"tensor {key!r} in {quoted(self.path)} has dtype {info.dtype}, which torch cannot hold")
        self._handle.seek(begin)
        if as_dtype is None or as_dtype == dtype or not dtype.is_floating_point:
            tensor = torch.empty(info.shape, dtype=dtype)
            self._read_into(tensor, key)
            return tensor
        out = torch.empty(info.shape, dtype=as_dtype)
        flat = out.view(-1)  # (numel,)
        if dtype not in self._buffers:
            self._buffers[dtype] = torch.empty(READ_SLICE, dtype=dtype)
        for start in range(0, flat.numel(), READ_SLICE):
            piece = self._buffers[dtype][: min(READ_SLICE, flat.numel() - start)]
            self._read_into(piece, key)
            flat[start:start + piece.numel()].copy_(piece)
        return out

    def _read_into(self, tensor: torch.Tensor, key: str) -> None:
        """Fill a contiguous tensor with the next bytes of the file."""
        if self._handle.readinto(memoryview(tensor.view(-1).view(torch.uint8).numpy())) != tensor.nbytes:
            raise CheckpointError(f"{quoted(self.path)} became shorter while it was read (tensor {key!r}); "
                                  f"is it still being written or downloaded?")

    def close(self) -> None:
        self._handle.close()


_SAFETENSORS_NAME = {str(dt).removeprefix("torch."): name for name, (_, dt) in SAFETENSORS_DTYPES.items() if dt is not None}


def parse_safetensors_header(handle, size: int, path) -> tuple[dict, dict, dict]:
    """Validate a safetensors header -> (name -> TensorInfo, metadata, name -> absolute byte range)."""
    not_checkpoint = (f"{quoted(path)} is neither a .safetensors file nor a PyTorch .ckpt (zip) file; it may be "
                      f"truncated, a web page saved instead of the download, or another format")
    if size < 8:
        raise CheckpointError(f"{not_checkpoint} (only {size} bytes)")
    n = int.from_bytes(handle.read(8), "little")
    if not 0 < n <= MAX_HEADER_BYTES:
        raise CheckpointError(not_checkpoint)
    if 8 + n > size:
        raise CheckpointError(f"{quoted(path)} is truncated or not a safetensors file: its header length says "
                              f"{n:,} bytes but the file has {size:,}; download it again")
    raw = handle.read(n)
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates, parse_constant=_no_constant)
    except (UnicodeDecodeError, ValueError) as error:
        if raw.lstrip().startswith(b"{"):
            raise CheckpointError(f"the safetensors header of {quoted(path)} is damaged or hostile ({str(error)[:200]}); "
                                  f"download the file again") from None
        raise CheckpointError(not_checkpoint) from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{not_checkpoint} (its header is a JSON {type(header).__name__}, not an object)")
    metadata = _safetensors_metadata(header.pop("__metadata__", None), path)
    entries = {name: _tensor_entry(name, value, path) for name, value in header.items()}
    ranges = _check_tiling(entries, size - 8 - n, path)
    tensors = {name: info for name, (info, _, _) in entries.items()}
    return tensors, metadata, {name: (8 + n + begin, 8 + n + end) for name, (begin, end) in ranges.items()}


def _no_duplicates(pairs):
    seen = {}
    for key, value in pairs:
        if key in seen:
            raise ValueError(f"duplicate key {key!r}")
        seen[key] = value
    return seen


def _no_constant(name):
    raise ValueError(f"{name} is not JSON")


def _utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate, which the safetensors library refuses
        return False
    return True


def _safetensors_metadata(metadata, path) -> dict:
    if metadata is None:
        return {}
    if not isinstance(metadata, dict) or not all(isinstance(k, str) and isinstance(v, str) and _utf8(k) and _utf8(v)
                                                 for k, v in metadata.items()):
        raise CheckpointError(f"the __metadata__ of {quoted(path)} must map strings to strings; the file is damaged")
    return metadata


def _is_u64(value) -> bool:
    return type(value) is int and 0 <= value <= U64_MAX


def _tensor_entry(name: str, value, path) -> tuple[TensorInfo, int, int]:
    """One header entry -> (TensorInfo, begin, end) relative to the data, or an error naming it."""
    where = f"tensor {name!r} in {quoted(path)}"
    if not _utf8(name) or not isinstance(value, dict):
        raise CheckpointError(f"{where} is not described by a JSON object; the header is damaged")
    dtype, shape, offsets = value.get("dtype"), value.get("shape"), value.get("data_offsets")
    if dtype not in SAFETENSORS_DTYPES:
        raise CheckpointError(f"{where} has unknown dtype {dtype!r:.40}; the header is damaged")
    if not isinstance(shape, list) or not all(_is_u64(s) for s in shape):
        raise CheckpointError(f"{where} has shape {shape!r:.80}; expected a list of non-negative integers")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_u64(o) for o in offsets):
        raise CheckpointError(f"{where} has data_offsets {offsets!r:.80}; expected [begin, end]")
    numel = 1
    for s in shape:  # in this order, like the safetensors library: an overflow is refused even if a later size is 0
        numel *= s
        if numel > U64_MAX:
            raise CheckpointError(f"{where} declares shape {shape}, more elements than any file can hold")
    bits = numel * SAFETENSORS_DTYPES[dtype][0]
    if bits > U64_MAX or bits % 8:
        raise CheckpointError(f"{where}: shape {shape} of {dtype} is not a whole number of bytes")
    begin, end = offsets
    if end - begin != bits // 8:
        raise CheckpointError(f"{where} has {end - begin:,} bytes (data_offsets {offsets}) for shape {shape} of "
                              f"{dtype} ({bits // 8:,} bytes); the header is damaged")
    torch_dtype = SAFETENSORS_DTYPES[dtype][1]
    label = str(torch_dtype).removeprefix("torch.") if torch_dtype is not None else dtype
    return TensorInfo(tuple(shape), label), begin, end


def _check_tiling(entries: dict, data_size: int, path) -> dict:
    """The byte ranges, sorted, must tile [0, data_size) exactly: no gap, no overlap, no trailing bytes."""
    ranges = sorted((begin, end, name) for name, (_, begin, end) in entries.items())
    position = 0
    for begin, end, name in ranges:
        if begin != position or end < begin:
            problem = "overlaps the tensor before it" if begin < position else "leaves a gap after the tensor before it"
            raise CheckpointError(f"tensor {name!r} in {quoted(path)} {problem} (data_offsets [{begin}, {end}]); "
                                  f"the header is damaged or hostile")
        position = end
    if position > data_size:
        raise CheckpointError(f"{quoted(path)} is truncated: its header describes {position:,} bytes of tensor data "
                              f"but the file has {max(data_size, 0):,} after the header; download it again")
    if position < data_size:
        raise CheckpointError(f"{quoted(path)} has {data_size - position:,} bytes after its last tensor, which a "
                              f"safetensors file never has; the file is damaged or not what it claims")
    return {name: (begin, end) for begin, end, name in ranges}


# --- .ckpt: PyTorch zip + pickle ----------------------------------------------------------------


#: the opcodes of PyTorch's weights_only unpickler (protocol 2): no INST/OBJ/STACK_GLOBAL/EXT*
PICKLE_OPCODES = frozenset(
    ["GLOBAL", "NEWOBJ", "REDUCE", "BUILD", "APPEND", "APPENDS", "SETITEM", "SETITEMS", "MARK", "TUPLE", "TUPLE1", "TUPLE2", "TUPLE3", "NONE", "NEWFALSE", "NEWTRUE", "EMPTY_TUPLE", "EMPTY_LIST", "EMPTY_DICT", "EMPTY_SET", "BININT", "BININT1", "BININT2", "BINFLOAT", "BINUNICODE", "SHORT_BINSTRING", "BINPERSID", "BINGET", "LONG_BINGET", "BINPUT", "LONG_BINPUT", "LONG1", "PROTO", "STOP"]
)

_LOAD_LOCK = threading.Lock()  # torch's safe_globals registry is process-wide


class TorchZipFile(CheckpointFile):
    """A `.ckpt` whose zip and pickle have been validated; `read` serves tensors from one `torch.load(mmap=True)`."""

    format = "ckpt"

    def __init__(self, path: Path, size: int):
        super().__init__(path)
        try:
            with zipfile.ZipFile(path) as archive:
                prefix, records = _check_archive(archive, path, size)
                pkl = archive.read(f"{prefix}/data.pkl")
        except zipfile.BadZipFile as error:
            raise CheckpointError(f"{quoted(path)} starts like a PyTorch .ckpt (zip) file but its table of contents is "
                                  f"missing or damaged ({error}): the file is truncated or corrupt; download it again")
        except OSError as error:
            raise CheckpointError(f"cannot read {quoted(path)}: {error}") from None
        self.globals = scan_pickle(pkl, path)
        root = _dry_run(pkl, records, path)
        self._tensor_dict_of(root, stubs=True)
        self._loaded = None

    def _tensor_dict_of(self, root, stubs: bool) -> dict:
        """The dict of tensors (top level or `state_dict`) and, from the stubs, `.tensors`/`.metadata`/`.extras`."""
        if not isinstance(root, dict):
            raise CheckpointError(f"{quoted(self.path)} holds a {type(root).__name__}, not a dictionary of tensors")
        state = root.get("state_dict") if isinstance(root.get("state_dict"), dict) else root
        if stubs:
            if isinstance(root.get("sdlab_config"), str):
                self.metadata["sdlab_config"] = root["sdlab_config"]
            self.extras = {str(k): _summary(v) for k, v in root.items() if state is not root and k != "state_dict"}
            for key, value in state.items():
                if state is root and key == "sdlab_config":
                    continue
                if not isinstance(key, str) or not isinstance(value, _TensorStub):
                    raise CheckpointError(f"{quoted(self.path)}: entry {key!r:.80} of its state dict holds a "
                                          f"{type(value).__name__}, not a tensor")
                self.tensors[key] = TensorInfo(value.size, str(value.dtype).removeprefix("torch."))
        return state

    def read(self, key: str, as_dtype: torch.dtype | None = None) -> torch.Tensor:
        if self._loaded is None:
            self._loaded = self._load()
        tensor = self._loaded.pop(key)
        info = self.tensors[key]
        if tuple(tensor.shape) != info.shape or str(tensor.dtype).removeprefix("torch.") != info.dtype:
            raise CheckpointError(f"tensor {key!r} in {quoted(self.path)} changed between checking and loading")
        return tensor if as_dtype is None or not tensor.is_floating_point() else tensor.to(as_dtype)

    def close(self) -> None:
        self._loaded = None  # the tensors not read (ignored keys) release the mapping with it

    def _load(self) -> dict:
        try:
            with _LOAD_LOCK, torch.serialization.safe_globals(STAND_INS):
                root = torch.load(self.path, map_location="cpu", weights_only=True, mmap=True)
        except CheckpointError:
            raise
        except Exception as error:  # noqa: BLE001 - torch's message, cleaned, becomes ours
            raise CheckpointError(f"could not read {quoted(self.path)} as a PyTorch checkpoint ({type(error).__name__}: "
                                  f"{clean_message(error)}); it may be damaged") from None
        state = self._tensor_dict_of(root, stubs=False)
        return {key: state[key] for key in self.tensors}


def clean_message(error: BaseException, limit: int = 300) -> str:
    """The first line of an exception's message, without terminal colour codes."""
    text = re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", str(error)).strip()
    return (text.splitlines() or [""])[0][:limit]


def _summary(value) -> str:
    if isinstance(value, (int, float, str, bool)) or value is None:
        return repr(value)[:80]
    if isinstance(value, dict):
        return f"dict of {len(value)}"
    if isinstance(value, (list, tuple)):
        return f"{type(value).__name__} of {len(value)}"
    return type(value).__name__.lstrip("_")


def _check_archive(archive: zipfile.ZipFile, path, size: int) -> tuple[str, dict]:
    """Members stored (not compressed), unique, under one folder, inside the file -> (folder, record sizes)."""
    infos = archive.infolist()
    names = [info.filename for info in infos]
    if len(set(names)) != len(names):
        duplicate = next(name for name in names if names.count(name) > 1)
        raise CheckpointError(f"{quoted(path)} holds the zip member {duplicate!r} twice; the file is damaged or hostile")
    pickles = [name for name in names if re.fullmatch(r"[^/]+/data\.pkl", name)]
    if len(pickles) != 1:
        raise CheckpointError(f"{quoted(path)} is a zip file but not a PyTorch checkpoint (no single <name>/data.pkl)")
    prefix = pickles[0].split("/")[0]
    if any(name.startswith(f"{prefix}/code/") or name == f"{prefix}/constants.pkl" for name in names):
        raise CheckpointError(f"{quoted(path)} is a TorchScript archive (code inside), not a checkpoint of weights")
    records = {}
    for info in infos:
        if not info.filename.startswith(prefix + "/"):
            raise CheckpointError(f"{quoted(path)}: zip member {info.filename!r} lies outside the {prefix}/ folder")
        if info.compress_type != zipfile.ZIP_STORED or info.flag_bits & 0x1:
            method = "encrypted" if info.flag_bits & 0x1 else zipfile.compressor_names.get(info.compress_type, "compressed")
            raise CheckpointError(
                f"{quoted(path)}: zip member {info.filename!r} is {method}; torch.save stores members uncompressed "
                f"and sdlab maps them straight into memory, so a recompressed .ckpt cannot be loaded: unzip and "
                f"re-zip it without compression (zip -0), or re-save it with torch.save")
        if info.compress_size != info.file_size or _data_end(archive, info) > size:
            raise CheckpointError(f"{quoted(path)} is truncated or damaged: zip member {info.filename!r} does not fit "
                                  f"in the file as its sizes say; download it again")
        records[info.filename[len(prefix) + 1:]] = info.file_size
    if records.get("data.pkl", 0) > MAX_PICKLE_BYTES:
        raise CheckpointError(f"{quoted(path)}: its data.pkl is {records['data.pkl']:,} bytes, far more than a "
                              f"checkpoint's; refusing to read it")
    order = archive.read(f"{prefix}/byteorder") if "byteorder" in records and records["byteorder"] <= 16 else b"little"
    if order != b"little":
        raise CheckpointError(f"{quoted(path)} was written on a {order[:16]!r}-endian machine; sdlab reads little-endian only")
    return prefix, records


def _data_end(archive: zipfile.ZipFile, info: zipfile.ZipInfo) -> int:
    """Where a member's data ends in the file (its local header has its own name and extra lengths)."""
    archive.fp.seek(info.header_offset)
    local = archive.fp.read(30)
    if len(local) < 30 or local[:4] != b"PK\x03\x04":
        raise zipfile.BadZipFile(f"bad local header for {info.filename!r}")
    name_length, extra_length = struct.unpack("<HH", local[26:30])
    if archive.fp.read(name_length) != info.orig_filename.encode("utf-8" if info.flag_bits & 0x800 else "cp437"):
        raise zipfile.BadZipFile(f"the local header of {info.filename!r} names another member")
    return info.header_offset + 30 + name_length + extra_length + info.compress_size


def scan_pickle(pkl: bytes, path, strict: bool = True) -> dict[str, str]:
    """Disassemble the pickle without running it: every opcode must be one of `PICKLE_OPCODES` and every
    global allowed -> {global: "weights_only" | "stand-in"}. With `strict=False` a refused global is
    listed as "refused" instead of raising (for `inspect`)."""
    try:
        operations = [(opcode.name, arg) for opcode, arg, _ in pickletools.genops(pkl)]
    except ValueError as error:  # a truncated or garbled pickle
        raise CheckpointError(f"{quoted(path)}: its pickle (data.pkl) is damaged ({error}); download it again") from None
    found = {}
    for name, arg in operations:
        if name not in PICKLE_OPCODES and not strict:
            found[f"opcode {name}"] = "refused"
        elif name not in PICKLE_OPCODES:
            raise CheckpointError(f"{quoted(path)}: its pickle uses the opcode {name}, which a checkpoint of weights "
                                  f"never needs; sdlab refuses to load it (nothing in it was run)")
        if name == "GLOBAL":
            module, _, attribute = arg.partition(" ")
            module, attribute = _python3_name(module, attribute)
            full = f"{module}.{attribute}"
            if full in _allowed_globals():
                found[full] = "stand-in" if full in _STAND_IN_NAMES else "weights_only"
            elif not strict:
                found[full] = "refused"
            else:
                raise CheckpointError(
                    f"{quoted(path)} refers to the global {full}, which is neither a tensor type nor one of the "
                    f"data-only classes of a Lightning checkpoint; sdlab refuses to load it (nothing in it was run). "
                    f"Only if you trust the file, convert it to .safetensors with other tools")
    return found


def _python3_name(module: str, name: str) -> tuple[str, str]:
    """Protocol-2 pickles may use Python 2 names (`__builtin__`); map them as the unpicklers do."""
    if (module, name) in _compat_pickle.NAME_MAPPING:
        return _compat_pickle.NAME_MAPPING[(module, name)]
    return _compat_pickle.IMPORT_MAPPING.get(module, module), name


def _dry_run(pkl: bytes, records: dict, path):
    """Unpickle with every global replaced by an inert recorder -> the object tree with `_TensorStub`s."""
    unpickler = _DryRunUnpickler(pkl, records, path)
    try:
        return unpickler.load()
    except CheckpointError as error:  # raised by a stand-in, which does not know the file
        if quoted(path) in str(error):
            raise
        raise CheckpointError(f"{quoted(path)}: {error}; sdlab refuses to load it (nothing in it was run)") from None
    except Exception as error:  # noqa: BLE001 - any failure of a hostile or broken pickle
        raise CheckpointError(f"{quoted(path)}: its pickle is not a checkpoint sdlab can read "
                              f"({type(error).__name__}: {clean_message(error, 200)})") from None


class _Inert:
    """Base of every object the dry run hands out: no `__dict__`, and a pickle BUILD on it is refused
    (BUILD would otherwise set attributes on it, e.g. enlarge a checked storage)."""

    __slots__ = ()

    def __setstate__(self, state):
        raise CheckpointError(f"the checkpoint's pickle modifies a {type(self).__name__.lstrip('_')} after building it "
                              f"(BUILD), which a checkpoint of weights never does")


class _Call(_Inert):
    """An allowed callable global, e.g. `torch._utils._rebuild_tensor_v2`, as its inert recorder."""

    __slots__ = ("function",)

    def __init__(self, function):
        object.__setattr__(self, "function", function)

    def __call__(self, *args):
        return self.function(*args)


class _StorageType(_Inert):
    __slots__ = ("dtype",)

    def __init__(self, dtype: torch.dtype):
        self.dtype = dtype


class _Storage(_Inert):
    __slots__ = ("dtype", "key", "numel")

    def __init__(self, key: str, dtype: torch.dtype, numel: int):
        self.key, self.dtype, self.numel = key, dtype, numel


class _TensorStub(_Inert):
    """What `_rebuild_tensor_v2` would build, checked to lie inside its storage record."""

    __slots__ = ("dtype", "size")

    def __init__(self, storage, offset, size, stride):
        if not isinstance(storage, _Storage):
            raise CheckpointError("a tensor of the checkpoint is not backed by a storage record")
        if not (_ints(size) and _ints(stride) and len(size) == len(stride) and type(offset) is int and offset >= 0):
            raise CheckpointError(f"a tensor of the checkpoint has a malformed layout (size {size!r:.60})")
        extent = offset + sum((n - 1) * s for n, s in zip(size, stride)) + 1
        if all(size) and extent > storage.numel:
            raise CheckpointError(f"a tensor of shape {tuple(size)} reaches element {extent:,} of storage record "
                                  f"{storage.key!r}, which holds {storage.numel:,}; the file is damaged or hostile")
        self.dtype, self.size = storage.dtype, tuple(size)


class LightningModelCheckpoint:
    """Inert stand-in for `pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint`.

    A Lightning 1.4 checkpoint uses the class only as the key of its `callbacks` dict; it is never
    instantiated from the file, so neither is this.
    """

    def __new__(cls, *args, **kwargs):
        raise CheckpointError("the checkpoint tries to create a ModelCheckpoint object; a Lightning checkpoint only "
                              "names the class, so the file is not a plain Lightning checkpoint")

    def __setstate__(self, state):
        raise CheckpointError("the checkpoint's pickle modifies the ModelCheckpoint class (BUILD)")


class NumpyDtype:
    """Inert stand-in for `numpy.dtype` as pickled (`dtype('f8', False, True)` + a state tuple)."""

    __slots__ = ("byteorder", "code")

    def __init__(self, code="f8", align=False, copy=True):
        if not (isinstance(code, str) and re.fullmatch(r"[biufc]\d{1,2}", code)):
            raise CheckpointError(f"the checkpoint pickles a numpy dtype {code!r:.40}, not a plain number type")
        self.code, self.byteorder = code, "<"

    def __setstate__(self, state):
        if isinstance(state, tuple) and len(state) > 1 and state[1] in ("<", ">", "|", "="):
            self.byteorder = state[1]


def _numpy_scalar(dtype, data):
    """Inert stand-in for `numpy.core.multiarray.scalar`: the pickled bytes -> a plain Python number."""
    if not isinstance(dtype, NumpyDtype) or not isinstance(data, bytes):
        raise CheckpointError("the checkpoint pickles a numpy scalar that is not a plain number")
    code = np.dtype(("=" if dtype.byteorder == "|" else dtype.byteorder) + dtype.code)
    if len(data) != code.itemsize:
        raise CheckpointError(f"the checkpoint pickles a numpy {dtype.code} scalar with {len(data)} bytes")
    return np.frombuffer(data, dtype=code)[0].item()


numpy_scalar = _Call(_numpy_scalar)

#: the three data-only globals of a PyTorch Lightning 1.4 checkpoint, as (stand-in, global) pairs;
#: numpy 2 pickles the scalar constructor as `numpy._core.multiarray.scalar` (files re-saved lately)
STAND_INS = [
    (LightningModelCheckpoint, "pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint"),
    (NumpyDtype, "numpy.dtype"),
    (numpy_scalar, "numpy.core.multiarray.scalar"),
    (numpy_scalar, "numpy._core.multiarray.scalar"),
]
_STAND_IN_NAMES = {name: obj for obj, name in STAND_INS}

def _ints(values) -> bool:
    return isinstance(values, (tuple, list)) and all(type(v) is int and v >= 0 for v in values)


def _rebuild_tensor(storage, offset, size, stride, requires_grad=False, hooks=None, metadata=None):
    return _TensorStub(storage, offset, size, stride)


def _rebuild_parameter(data, requires_grad=True, hooks=None, state=None):
    if not isinstance(data, _TensorStub):
        raise CheckpointError("a parameter of the checkpoint does not hold a tensor")
    return data


class _Parameter:  # torch.nn.Parameter, created with NEWOBJ or REDUCE
    def __new__(cls, data=None, requires_grad=True):
        return _rebuild_parameter(data)

    def __setstate__(self, state):
        raise CheckpointError("the checkpoint's pickle modifies the Parameter class (BUILD)")


class _TensorClass(_Inert):  # torch.Tensor, only as the type argument of _rebuild_from_type_v2
    __slots__ = ()


def _rebuild_from_type(func, new_type, args, state):
    dense = isinstance(func, _Call) and func.function is _rebuild_tensor
    if not dense or not (isinstance(new_type, _TensorClass) or new_type is _Parameter) or not isinstance(args, tuple):
        raise CheckpointError("the checkpoint rebuilds a tensor subclass, which sdlab does not load")
    return func(*args)


def _latin1(text, encoding="utf-8"):
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise CheckpointError("the checkpoint encodes bytes in an unusual way (_codecs.encode), which sdlab refuses")
    return codecs.encode(text, encoding)


def _bytearray(data=b""):
    if not isinstance(data, (bytes, bytearray)):  # bytearray(10**12) would allocate a terabyte
        raise CheckpointError("the checkpoint builds a bytearray from something other than bytes")
    return bytearray(data)


def _complex(real=0.0, imag=0.0):
    if not all(isinstance(v, (int, float)) for v in (real, imag)):
        raise CheckpointError("the checkpoint builds a complex number from something other than numbers")
    return complex(real, imag)


def _set(items=()):
    if not isinstance(items, (list, tuple)):
        raise CheckpointError("the checkpoint builds a set from something other than a list")
    return set(items)


def _size(values=()):
    if not _ints(values):
        raise CheckpointError("the checkpoint builds a torch.Size from something other than integers")
    return tuple(values)


def _device(kind="cpu", index=None):
    if not isinstance(kind, str) or not (index is None or type(index) is int):
        raise CheckpointError("the checkpoint names a device with something other than a string")
    return f"{kind}:{index}" if index is not None else kind


_STORAGE_NAMES = {
    "Double": torch.float64, "Float": torch.float32, "Half": torch.float16, "BFloat16": torch.bfloat16,
    "Long": torch.int64, "Int": torch.int32, "Short": torch.int16, "Char": torch.int8, "Byte": torch.uint8,
    "Bool": torch.bool, "ComplexFloat": torch.complex64, "ComplexDouble": torch.complex128,
}


def _allowed_globals() -> dict:
    """Global name -> the inert object the dry run uses: what weights_only allows for dense tensors and
    plain data, plus the Lightning stand-ins."""
    if not _ALLOWED:
        _ALLOWED.update({f"torch.{name}Storage": _StorageType(dtype) for name, dtype in _STORAGE_NAMES.items()})
        dtypes = [getattr(torch, name, None) for name in dir(torch)]
        _ALLOWED.update({str(dtype): dtype for dtype in dtypes if isinstance(dtype, torch.dtype)})
        functions = {
            "torch._utils._rebuild_tensor_v2": _rebuild_tensor, "torch._utils._rebuild_parameter": _rebuild_parameter,
            "torch._utils._rebuild_parameter_with_state": _rebuild_parameter,
            "torch._tensor._rebuild_from_type_v2": _rebuild_from_type, "torch.Size": _size, "torch.device": _device,
            "_codecs.encode": _latin1, "builtins.set": _set, "builtins.bytearray": _bytearray,
            "builtins.complex": _complex, "collections.OrderedDict": collections.OrderedDict,
        }
        _ALLOWED.update({name: _Call(function) for name, function in functions.items()})
        _ALLOWED.update({"torch.Tensor": _TensorClass(), "torch.nn.parameter.Parameter": _Parameter})
        _ALLOWED.update(_STAND_IN_NAMES)
    return _ALLOWED


_ALLOWED: dict = {}


class _DryRunUnpickler(pickle.Unpickler):
    """`find_class` hands out only the inert objects of `_allowed_globals`; `persistent_load` checks
    each storage against its zip record."""

    def __init__(self, pkl: bytes, records: dict, path):
        import io

        super().__init__(io.BytesIO(pkl))
        self.records, self.path = records, path

    def find_class(self, module, name):
        full = f"{module}.{name}"
        allowed = _allowed_globals()
        if full not in allowed:  # scan_pickle has refused it already; never import anything
            raise CheckpointError(f"{quoted(self.path)} refers to the global {full}, which sdlab refuses")
        return allowed[full]

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise CheckpointError(f"{quoted(self.path)}: its pickle asks for a persistent object {pid!r:.60}, not a storage")
        _, kind, key, _location, numel = pid
        dtype = kind.dtype if isinstance(kind, _StorageType) else kind
        if not isinstance(dtype, torch.dtype) or not isinstance(key, str) or type(numel) is not int or numel < 0:
            raise CheckpointError(f"{quoted(self.path)}: its pickle describes a storage as {pid!r:.80}")
        size = self.records.get(f"data/{key}")
        if size is None:
            raise CheckpointError(f"{quoted(self.path)}: storage record data/{key} is missing; the file is damaged")
        if size != numel * dtype.itemsize:
            raise CheckpointError(f"{quoted(self.path)}: storage record data/{key} has {size:,} bytes but its tensor "
                                  f"needs {numel * dtype.itemsize:,}; the file is truncated or damaged")
        return _Storage(key, dtype, numel)


def pickle_globals(path) -> dict[str, str]:
    """The globals a `.ckpt` file's pickle refers to, each "weights_only", "stand-in" or "refused"
    (nothing is unpickled). For reports about files that `open_checkpoint` refuses."""
    with zipfile.ZipFile(path) as archive:
        names = [name for name in archive.namelist() if re.fullmatch(r"[^/]+/data\.pkl", name)]
        if len(names) != 1 or archive.getinfo(names[0]).file_size > MAX_PICKLE_BYTES:
            return {}
        return scan_pickle(archive.read(names[0]), path, strict=False)


def read_checkpoint(path, cast=None) -> tuple[dict, dict]:
    """Every tensor of a file -> (flat state dict, metadata); `cast(tensor)` is applied as each is read."""
    with open_checkpoint(path) as file:
        return {key: (cast or (lambda t: t))(file.read(key)) for key in list(file.tensors)}, dict(file.metadata)
