r"""Multi-head attention, the one mechanism that all three Stable Diffusion models share.

$$\operatorname{Attention}(Q, K, V) = \operatorname{softmax}\!\left(\frac{Q K^\top}{\sqrt{d_k}}\right) V$$

`SelfAttention` takes queries, keys and values from the same sequence (CLIP's tokens, the VAE's
pixels, the U-Net's latent pixels); `CrossAttention` takes its keys and values from another one
(the U-Net's pixels attend to CLIP's token embeddings). Both split the width $d$ into
$h$ heads of $d_k = d / h$ channels, attend in each head independently and concatenate:

$$\operatorname{MultiHead}(X) = \operatorname{Concat}(\text{head}_1, \dots, \text{head}_h)\, W^O,
\qquad \text{head}_i = \operatorname{Attention}(X W_i^Q, X W_i^K, X W_i^V).$$

The explicit formula is what the book teaches; PyTorch's fused
`scaled_dot_product_attention` computes the same thing without materialising the
$L \times L$ matrix (`attention_backend("sdpa")`). `attention_backend("math")` switches every module to the
explicit formula, which is also what `store_attention` needs to keep the attention maps.
`attention_backend("sliced", slice_size=n)` is the explicit formula over `n` queries at a time: the
scores never take more than $n \times L$ per head, for low-memory runs on devices without a fused
kernel. `attention_backend("blocked")` is the explicit formula one head and one cache-sized block of
queries at a time: in bf16 on the CPU it is about twice as fast as the fused kernel, which computes
in float32 there, so the default, `"auto"`, picks it for bf16 CPU attention over many keys and the
fused kernel everywhere else. All of them compute the same thing (tests/test_speed.py checks them
against each other).
"""

from __future__ import annotations

import contextlib
import contextvars
import itertools
import math

import torch
import torch.nn.functional as F
from torch import nn

from . import packing
from .errors import ArgumentError

BACKENDS = ("auto", "sdpa", "math", "sliced", "blocked")
DEFAULT_SLICE_SIZE = 1024
BLOCK_SCORES = 2**21  # scores per block of "blocked" (4 MB in bf16): they stay in cache between the two products
EXP_BOUND = 40.0  # "blocked" skips the softmax's row maximum where no score can be larger than this
BLOCKED_MIN_KEYS = 256  # "auto" runs bf16 CPU attention over at least this many keys "blocked" (fewer: fused)
# (backend, slice size) of the current thread (a context variable: two threads generating at once
# with different settings do not switch each other's attention)
_setting = contextvars.ContextVar("sdlab_attention_backend", default=("auto", DEFAULT_SLICE_SIZE))


# what sees every attention call's queries and keys in this thread (sdlab.inspect's recorders); None: nothing
_observer = contextvars.ContextVar("sdlab_attention_observer", default=None)
# what may replace the attention probabilities in this thread (sdlab.edit's prompt-to-prompt); None: nothing
_editor = contextvars.ContextVar("sdlab_attention_editor", default=None)


@contextlib.contextmanager
def observe_attention(observer):
    """Inside the block (this thread only), every `SelfAttention` and `CrossAttention` call also runs
    `observer(module, q, k, causal)` with its queries and keys split into heads, (B, H, L, d_k). The
    attention output is computed exactly as without it; `sdlab.inspect.record_attention` uses this."""
    token = _observer.set(observer)
    try:
        yield
    finally:
        _observer.reset(token)


@contextlib.contextmanager
def edit_attention(editor):
    r"""Inside the block (this thread only), every `SelfAttention` and `CrossAttention` call first asks
    `editor(module, q, k, causal)` (queries and keys split into heads, (B, H, L, d_k)) for its
    attention probabilities: None leaves the call as it is (any backend); a tensor $A'$ (B, H, Lq, Lk)
    replaces $\operatorname{softmax}(QK^\top/\sqrt{d_k})$, and the output is $A' V$ (explicitly).
    `attention_probabilities(q, k, causal)` gives the editor the unedited ones; `sdlab.edit` uses this."""
    token = _editor.set(editor)
    try:
        yield
    finally:
        _editor.reset(token)


def current_backend() -> tuple[str, int]:
    """The attention code path in force here: (one of `BACKENDS`, slice size)."""
    return _setting.get()


@contextlib.contextmanager
def attention_backend(name: str, slice_size: int | None = None):
    """Use one of `BACKENDS` inside a `with` block (this thread only): `"sdpa"` (PyTorch's fused kernel),
    `"math"` (the explicit formula), `"sliced"` (the explicit formula over `slice_size` queries at a
    time, default 1024), `"blocked"` (`blocked_dot_product`) or `"auto"` (the default: `"blocked"`
    where `blocked_is_faster`, else `"sdpa"`)."""
    if name not in BACKENDS:
        raise ArgumentError(f"unknown attention backend {name!r}; choose one of {BACKENDS}")
    if slice_size is not None and (isinstance(slice_size, bool) or not isinstance(slice_size, int) or slice_size < 1):
        raise ArgumentError(f"slice_size must be a positive integer; got {slice_size!r}")
    token = _setting.set((name, slice_size or DEFAULT_SLICE_SIZE))
    try:
        yield
    finally:
        _setting.reset(token)


def scaled_dot_product(q, k, v, causal: bool = False, return_weights: bool = False):
    r"""$\operatorname{softmax}(QK^\top/\sqrt{d_k} + M)\,V$ for `q`: (B, H, Lq, d_k), `k`, `v`: (B, H, Lk, d_k).

    $M$ is the causal mask: $-\infty$ above the diagonal, so token $i$ sees tokens $\le i$ only.
    Returns the output (B, H, Lq, d_k) and, with `return_weights`, the weights (B, H, Lq, Lk).
    """
    backend, slice_size = _setting.get()
    if backend == "auto":
        backend = "blocked" if blocked_is_faster(q, k) else "sdpa"
    if backend == "blocked" and not return_weights:
        return blocked_dot_product(q, k, v, causal), None
    if backend == "sdpa" and not return_weights:
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal), None
    if backend == "sliced" and not return_weights and q.shape[-2] > slice_size:
        return sliced_dot_product(q, k, v, causal, slice_size), None
    return _explicit(q, k, v, causal)


def attention_probabilities(q, k, causal: bool = False, first_query: int = 0) -> torch.Tensor:
    r"""$\operatorname{softmax}(QK^\top/\sqrt{d_k} + M)$ (B, H, Lq, Lk), for queries `first_query`,
    `first_query + 1`, ... of the sequence. PyTorch's softmax of bf16 or float16 scores computes in
    float32 inside (the same result, bit for bit, as `scores.float().softmax(-1).to(dtype)`)."""
    scores = (q / math.sqrt(q.shape[-1])) @ k.transpose(-1, -2)  # (B, H, Lq, Lk); scaling q is Lk/d_k times cheaper
    if causal:
        scores = hide_later_keys(scores, first_query)
    return scores.softmax(dim=-1)


def hide_later_keys(scores: torch.Tensor, first_query: int = 0) -> torch.Tensor:
    """The causal mask, in place: query i (at position `first_query` + i) sees keys <= `first_query` + i,
    the later ones' scores (..., Lq, Lk) become -inf."""
    mask = torch.ones(scores.shape[-2:], dtype=torch.bool, device=scores.device).triu(first_query + 1)
    return scores.masked_fill_(mask, float("-inf"))


def _explicit(q, k, v, causal: bool, first_query: int = 0):
    """The formula itself, for queries `first_query`, `first_query + 1`, ... of the sequence."""
    weights = attention_probabilities(q, k, causal, first_query)
    return weights @ v, weights


def sliced_dot_product(q, k, v, causal: bool = False, slice_size: int = DEFAULT_SLICE_SIZE) -> torch.Tensor:
    """The explicit formula, `slice_size` queries at a time: the same result, with scores of at most
    (B, H, slice_size, Lk) alive at once instead of (B, H, Lq, Lk)."""
    out = torch.empty(*q.shape[:-1], v.shape[-1], dtype=q.dtype, device=q.device)
    for start in range(0, q.shape[-2], slice_size):
        out[..., start : start + slice_size, :] = _explicit(q[..., start : start + slice_size, :], k, v, causal, start)[0]
    return out


def blocked_is_faster(q: torch.Tensor, k: torch.Tensor) -> bool:
    """Where `"auto"` picks `blocked_dot_product`: bf16 on a CPU that multiplies bf16 matrices natively
    (oneDNN: AVX512-BF16 or AMX), over at least `BLOCKED_MIN_KEYS` keys. There PyTorch's fused kernel
    computes in float32 (without AMX); over fewer keys (the U-Net's 77 context tokens) the fused
    kernel is as fast, and where bf16 products are emulated the blocked ones are slow."""
    return (q.dtype == torch.bfloat16 and q.device.type == "cpu" and k.shape[-2] >= BLOCKED_MIN_KEYS
            and packing.available(torch.bfloat16))


def blocked_dot_product(q, k, v, causal: bool = False, block_scores: int = BLOCK_SCORES) -> torch.Tensor:
    r"""The explicit formula one head and one block of $n$ queries at a time, $n$ = `block_scores` / $L_k$
    (512 for 4096 keys): a block's scores $S$ stay in the core's cache between $QK^\top$ and the product
    with $V$, and both products run on the dtype's own matrix kernels (bf16 on AVX512-BF16 and AMX).

    Three steps make it cheaper than the formula as written, with the same result:

    - the keys are centred, $k_j - \bar k$: that shifts row $i$ of the scores by $q_i \cdot \bar k$,
      which the softmax does not see, and smaller scores lose less when rounded to bf16;
    - the softmax's division moves after the product with $V$, and the row sums come out of that
      product too: $\exp(S)\,[V \;\, \mathbf 1] = [\exp(S) V \;\, \exp(S)\mathbf 1]$, then divide
      ($d_k$ divisions per query instead of $L_k$). $[V\;\mathbf 1]$ is zero-padded to a multiple of
      16 columns (`_with_ones`; 48 for $d_k$ = 40), a width oneDNN's bf16 kernels handle better;
    - the row maximum is subtracted only where $\exp$ could overflow: by Cauchy-Schwarz every score
      is at most $\max_i |q_i| \max_j |k_j - \bar k| / \sqrt{d_k}$ in size, and where that bound is
      below `EXP_BOUND` the pass is skipped ($e^{40}$ times any number of keys stays far inside the
      range of float32 and bf16, $e^{88}$; float16's ends at $e^{11}$: it always subtracts it)."""
    n = max(1, block_scores // k.shape[-2])
    d_v = v.shape[-1]
    out = torch.empty_like(q)  # (B, H, Lq, d_k), q's strides
    q = q / math.sqrt(q.shape[-1])
    k = k - k.mean(dim=-2, keepdim=True)  # (B, H, Lk, d_k)
    v1 = _with_ones(v)  # (B, H, Lk, width): V, a column of ones, zeros
    wide = torch.finfo(q.dtype).max > 1e38  # float32 and bf16; not float16
    bounded = wide and float(q.float().norm(dim=-1).amax() * k.float().norm(dim=-1).amax()) <= EXP_BOUND
    for b, h in itertools.product(range(q.shape[0]), range(q.shape[1])):
        k_t = k[b, h].transpose(0, 1)  # (d_k, Lk)
        for start in range(0, q.shape[-2], n):
            scores = q[b, h, start : start + n] @ k_t  # (n, Lk)
            if causal:
                hide_later_keys(scores, start)
            if not bounded:
                scores -= scores.amax(dim=-1, keepdim=True)
            sums = scores.exp_() @ v1[b, h]  # (n, width): exp(S) V, then the row sums exp(S) 1
            torch.div(sums[:, :d_v], sums[:, d_v : d_v + 1], out=out[b, h, start : start + n])
    return out


def _with_ones(v: torch.Tensor) -> torch.Tensor:
    """(..., L, d) -> (..., L, width): `v`, a column of ones, then zeros up to a multiple of 16 columns."""
    width = -(-(v.shape[-1] + 1) // 16) * 16
    v1 = v.new_zeros(*v.shape[:-1], width)
    v1[..., : v.shape[-1]] = v
    v1[..., v.shape[-1]] = 1
    return v1


class _MultiHead(nn.Module):
    """What both attentions share: splitting into heads, attending, merging, projecting out."""

    n_heads: int
    d_head: int
    out_proj: nn.Linear

    def _attend(self, q, k, v, causal: bool = False) -> torch.Tensor:
        batch, length, d_embed = q.shape

        def heads(t):  # (B, L, H*d_head) -> (B, H, L, d_head)
            return t.view(batch, -1, self.n_heads, self.d_head).transpose(1, 2)

        q, k, v = heads(q), heads(k), heads(v)
        editor = _editor.get()  # sdlab.edit's prompt-to-prompt, in this thread; None: the usual path
        weights = None if editor is None else editor(self, q, k, causal)
        if weights is None:
            out, weights = scaled_dot_product(q, k, v, causal, self.store_attention)
        else:  # the editor's probabilities (B, H, Lq, Lk) replace the softmax
            out = weights.to(v.dtype) @ v
        if self.store_attention:
            self.attention_weights = weights.detach()
        if (observer := _observer.get()) is not None:  # a recorder of sdlab.inspect is on in this thread
            observer(self, q, k, causal)
        # (B, H, L, d_head) -> (B, L, H, d_head) -> (B, L, H*d_head)
        out = out.transpose(1, 2).reshape(batch, length, d_embed)
        return self.out_proj(out)


class SelfAttention(_MultiHead):
    """Multi-head self-attention with fused query/key/value projection `in_proj` (d -> 3d).

    Set `store_attention = True` to keep the last attention weights in `attention_weights`.
    """

    def __init__(self, n_heads: int, d_embed: int, in_proj_bias: bool = True, out_proj_bias: bool = True):
        super().__init__()
        if d_embed % n_heads:
            raise ValueError(f"d_embed={d_embed} is not divisible by n_heads={n_heads}")
        self.in_proj = nn.Linear(d_embed, 3 * d_embed, bias=in_proj_bias)
        self.out_proj = nn.Linear(d_embed, d_embed, bias=out_proj_bias)
        self.n_heads = n_heads
        self.d_head = d_embed // n_heads
        self.store_attention = False
        self.attention_weights = None

    def forward(self, x: torch.Tensor, causal_mask: bool = False) -> torch.Tensor:
        # x: (B, L, d) -> q, k, v: (B, L, d) each; contiguous copies, which the fused kernel reads
        # faster than the strided views of chunk() (~7% on the U-Net's 4096-pixel attention)
        q, k, v = (t.contiguous() for t in self.in_proj(x).chunk(3, dim=-1))
        return self._attend(q, k, v, causal=causal_mask)


class CrossAttention(_MultiHead):
    """Multi-head attention whose keys and values come from a context of width `d_cross`."""

    def __init__(self, n_heads: int, d_embed: int, d_cross: int, in_proj_bias: bool = True, out_proj_bias: bool = True):
        super().__init__()
        if d_embed % n_heads:
            raise ValueError(f"d_embed={d_embed} is not divisible by n_heads={n_heads}")
        self.q_proj = nn.Linear(d_embed, d_embed, bias=in_proj_bias)
        self.k_proj = nn.Linear(d_cross, d_embed, bias=in_proj_bias)
        self.v_proj = nn.Linear(d_cross, d_embed, bias=in_proj_bias)
        self.out_proj = nn.Linear(d_embed, d_embed, bias=out_proj_bias)
        self.n_heads = n_heads
        self.d_head = d_embed // n_heads
        self.store_attention = False
        self.attention_weights = None

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        # x (latent pixels): (B, Lq, d_embed); y (context tokens): (B, Lk, d_cross)
        return self._attend(self.q_proj(x), self.k_proj(y), self.v_proj(y))
