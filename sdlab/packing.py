r"""Weights packed once for oneDNN: an inference-only speed-up on the CPU.

PyTorch's CPU convolutions and many of its matrix products (oneDNN) compute on *blocked* weight
layouts. A plain `nn.Conv2d` copies its weight from (C_out, C_in, k, k) into such a layout at every
call, and converts the activations in and the result back; for the SD1.5 U-Net that is 2.4 GB of
weights reordered per step. Inside `packed_weights(...)` each `nn.Conv2d` and `nn.Linear` weight is
reordered **once**; the convolutions then run oneDNN's inference kernel on channels-last
activations, which needs no conversion at all (and makes the transformer blocks' reshape to a
sequence of pixels a free view), and the linear layers run oneDNN's matrix product on the packed
weight. On 2 cores a U-Net step is 5-9% faster and a VAE decode 10-15%; results differ from the
plain layers by rounding only (a different summation order, ~1e-6 relative).

**bf16.** `packed_weights(..., dtype=torch.bfloat16)` packs those layers in bf16, cast **once** on
entry, and they compute in bf16 whatever their input (it is cast): everything after the first layer
then flows in bf16, while the normalisations keep their float32 weights (PyTorch's CPU group and layer
norms take bf16 inputs with float32 weights). A model's `full_precision_layers()` (the U-Net's first
and last convolutions, as under autocast: `diffusion.full_precision`) keep their own precision. Unlike autocast, which casts every weight again at
every call, nothing is recast inside the block. Models stored in bf16 (`dtype=torch.bfloat16` when
loading) are packed in bf16 without it.

A packed weight of the module's own dtype *replaces* the plain one while the block runs (no second
copy in memory) and is converted back on exit: afterwards the module's weights are bit-identical to
before. A float32 weight packed in bf16 cannot be restored from its bf16 copy, so it stays beside it
(the block then holds both: 1.5x the layers' float32 size). Because that
changes the module in place, `packed_weights` holds the module's lock (`model_lock`) for the whole
block: another thread packing or running the same module (through `pipeline.generate`, which takes
the lock too) waits for its turn instead of finding half-swapped weights.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import threading
import weakref

import torch
import torch.nn.functional as F
from torch import nn

TOKENS_HINT = 4096  # rows per batch item the linear layers are packed for: the pixels of 64x64 latents
TRIM_EVERY = 16  # layers (un)packed between two hand-backs of freed memory to the OS (`_release_free_memory`)


_LOCKS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_LOCKS_GUARD = threading.Lock()


def model_lock(module: nn.Module) -> threading.RLock:
    """The re-entrant lock of `module`: held by whoever moves, packs or runs it in place."""
    with _LOCKS_GUARD:
        lock = _LOCKS.get(module)
        if lock is None:
            lock = _LOCKS[module] = threading.RLock()
        return lock


def current_weights(module: nn.Module):
    """(name, tensor) for every parameter of `module`, a packed weight read back from its packed copy."""
    for name, parameter in module.named_parameters():
        layer_name, _, leaf = name.rpartition(".")
        layer = module.get_submodule(layer_name)
        forward = layer.__dict__.get("forward")
        if leaf == "weight" and isinstance(forward, functools.partial) and not parameter.numel():
            yield name, forward.args[1].to_dense()
        else:  # not packed, or packed in another dtype beside the plain weight
            yield name, parameter


def available(dtype: torch.dtype = torch.float32) -> bool:
    """True where PyTorch has oneDNN's inference kernels (the x86 and ARM CPU builds), and for
    `torch.bfloat16` where oneDNN also computes in bf16 on this CPU (x86: AVX512-BF16 or AMX)."""
    ops = torch.ops.mkldnn
    kernels = torch.backends.mkldnn.is_available() and hasattr(ops, "_convolution_pointwise") and hasattr(ops, "_linear_pointwise")
    return kernels and (dtype == torch.float32 or (dtype == torch.bfloat16 and ops._is_mkldnn_bf16_supported()))


def _unpacked(x: torch.Tensor) -> bool:
    """Inputs the packed kernels do not take: other dtypes, and anything under autocast (e.g. bf16)."""
    return x.dtype not in (torch.float32, torch.bfloat16) or torch.is_autocast_enabled("cpu")


def _plain(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None):
    """The packed layer's weight and bias as plain tensors for `x` (its dtype, unless autocast decides)."""
    weight = weight.to_dense()
    if torch.is_autocast_enabled("cpu"):
        return weight, bias
    return weight.to(x.dtype), None if bias is None else bias.to(x.dtype)


class _ConvWeight:
    """A convolution weight packed at its first call for that call's input shape, and packed again
    when the input shape changes: oneDNN picks its layout for a shape, and a layout picked for another
    one can be many times slower (a 1280-channel 3x3 convolution packed for 16x16 inputs ran 141x
    slower on 2x2 inputs, and 1.9x on 32x32 ones, than packed for the shape it ran on; 14x slower
    than plain on 2x2). Re-packing is lossless."""

    def __init__(self, conv: nn.Conv2d, weight: torch.Tensor):
        # plain (an alias of the weight's storage, or its bf16 copy) until the first call packs it
        self.conv, self.dtype, self.packed, self.shape = conv, weight.dtype, weight.detach(), None

    packs = 0  # convolutions packed so far, in any model: freed memory is handed back every TRIM_EVERY

    def pack_for(self, shape: tuple[int, ...]) -> None:
        conv, dense = self.conv, self.to_dense()
        self.packed = torch._C._nn.mkldnn_reorder_conv2d_weight(
            dense.to_mkldnn(), list(conv.padding), list(conv.stride), list(conv.dilation), conv.groups, list(shape))
        self.shape = tuple(shape)
        del dense  # the plain (or previously packed) copy is freed here, during the model's first call
        _ConvWeight.packs += 1
        if _ConvWeight.packs % TRIM_EVERY == 0:
            _release_free_memory()

    def to_dense(self) -> torch.Tensor:
        return self.packed.to_dense() if self.packed.is_mkldnn else self.packed


def _conv_forward(conv: nn.Conv2d, weight: _ConvWeight, bias: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
    if _unpacked(x):
        return F.conv2d(x, *_plain(x, weight, bias), conv.stride, conv.padding, conv.dilation, conv.groups)
    if tuple(x.shape) != weight.shape:
        weight.pack_for(x.shape)
    return torch.ops.mkldnn._convolution_pointwise(
        x.to(weight.dtype), weight.packed, bias, list(conv.padding), list(conv.stride), list(conv.dilation),
        conv.groups, "none", [], "",
    )


def _linear_forward(linear: nn.Linear, weight: torch.Tensor, bias: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
    if _unpacked(x):
        return F.linear(x, *_plain(x, weight, bias))
    return torch.ops.mkldnn._linear_pointwise(x.to(weight.dtype), weight, bias, "none", [], "")


def _pack(module: nn.Module, batch: int, dtype: torch.dtype | None = None):
    """(packed weight, forward using it) for a float32 or bfloat16 CPU `Conv2d` or `Linear`, packed in
    `dtype` (default: the weight's own); None for anything else."""
    weight = getattr(module, "weight", None)
    if weight is None or weight.device.type != "cpu" or weight.dtype not in (torch.float32, torch.bfloat16):
        return None
    dtype = dtype or weight.dtype
    if not available(dtype):
        return None
    weight = weight.to(dtype)
    bias = None if module.bias is None else module.bias.to(dtype)
    if type(module) is nn.Conv2d and module.padding_mode == "zeros" and isinstance(module.padding, tuple):
        packed = _ConvWeight(module, weight)  # packed at its first call, for that call's input shape
        return packed, functools.partial(_conv_forward, module, packed, bias)
    if type(module) is nn.Linear:
        packed = torch.ops.mkldnn._reorder_linear_weight(weight, batch * TOKENS_HINT)
        return packed, functools.partial(_linear_forward, module, packed, bias)
    return None


@contextlib.contextmanager
def packed_weights(*modules: nn.Module, batch: int = 2, dtype: torch.dtype | None = None):
    """Within the block, the float32 CPU `Conv2d` and `Linear` layers of `modules` run on weights
    packed once for oneDNN.

    For inference only (no gradients reach packed weights); `pipeline.generate` uses it on the CPU.
    `batch` is the batch size the linear layers' layouts are tuned for (2 for classifier-free
    guidance); a convolution is packed at its first call, for that call's input shape (and again
    when the shape changes). Any batch and size runs. `dtype`: `torch.bfloat16` packs (and computes) those layers in bf16; None
    keeps each weight's own dtype (float32 or bfloat16); layers are packed in bf16 only where
    `available(torch.bfloat16)`, and left plain elsewhere. Under autocast, or for inputs that are
    neither float32 nor bfloat16, a packed layer falls back to the plain computation. Does nothing
    where `available()` is False. Holds the modules' locks (`model_lock`) while it runs; layers
    already packed (a nested block) stay as they are.
    """
    if dtype not in (None, torch.float32, torch.bfloat16):
        raise ValueError(f"packed_weights: dtype must be None, torch.float32 or torch.bfloat16, not {dtype!r}")
    layers = [m for module in modules for m in module.modules()] if available() else []
    # the layers a model keeps in its weights' precision (the U-Net's first and last convolutions)
    own = {id(m) for module in modules for kept in getattr(module, "full_precision_layers", list)() for m in kept.modules()}
    with contextlib.ExitStack() as locks:
        for module in sorted(set(modules), key=id):  # one order for every thread: no deadlock
            locks.enter_context(model_lock(module))
        with _packed([m for m in layers if id(m) in own], batch), _packed([m for m in layers if id(m) not in own], batch, dtype):
            yield


@contextlib.contextmanager
def _packed(layers: list[nn.Module], batch: int, dtype: torch.dtype | None = None):
    """Swap in the packed weights of `layers` for the block (the lock is the caller's)."""
    packed = []
    try:
        with torch.no_grad():
            for layer in layers:
                if "forward" in layer.__dict__:  # packed by an enclosing block
                    continue
                result = _pack(layer, batch, dtype)
                if result is None:
                    continue
                weight, forward = result
                replaces = weight.dtype == layer.weight.dtype  # restorable from the packed copy
                if replaces:
                    layer.weight.data = torch.empty(0)  # the plain copy is freed while the packed one is in use
                layer.forward = forward
                packed.append((layer, weight if replaces else None))
                if len(packed) % TRIM_EVERY == 0:
                    _release_free_memory()  # the plain copies just freed: keeps the peak near one copy
        _release_free_memory()
        yield
    finally:
        # restored outside inference mode: a block run under `torch.inference_mode()` must not
        # turn the model's weights into inference tensors (they could no longer be trained or edited)
        with torch.inference_mode(False), torch.no_grad():
            while packed:  # one weight at a time, so that the two copies never all coexist
                layer, weight = packed.pop()
                del layer.forward
                if weight is not None:
                    layer.weight.data = weight.to_dense()
                if len(packed) % TRIM_EVERY == 0:
                    _release_free_memory()
        _release_free_memory()


@functools.cache
def _libc():
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


def _release_free_memory() -> None:
    """Hand the pages freed by packing back to the OS. glibc's malloc keeps freed blocks of up to
    32 MB in its heap, so without this the reordering would leave ~0.3 GB (SD1.5) of resident memory."""
    trim = getattr(_libc(), "malloc_trim", None)  # glibc only (not macOS, Windows or musl)
    if trim is not None:
        trim(0)
