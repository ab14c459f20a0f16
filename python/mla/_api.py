"""The Python face of the mla C++ core: the layer, its cache and the kernel functions.

Nothing here computes. Arrays go to the C++ library through DLPack without copies when they are already
contiguous and of a supported dtype; outputs are allocated in the caller's framework (NumPy in -> NumPy out,
PyTorch in -> PyTorch out, on the input's device).
"""
from __future__ import annotations

import os
import threading
from typing import Any, Optional, Sequence, Tuple, Union

import numpy as np

from . import _mla
from ._mla import Config, LayerWeights

ArrayLike = Any  # numpy.ndarray or torch.Tensor

_torch = None  # the torch module once something imported it (never imported here)


def _torch_module():
    global _torch
    if _torch is None:
        import sys

        _torch = sys.modules.get("torch")
    return _torch


def _is_torch(x: Any) -> bool:
    torch = _torch_module()
    return torch is not None and isinstance(x, torch.Tensor)


def _as_numpy(x: Any, name: str, op: str) -> np.ndarray:
    """A C-contiguous NumPy view of x (a copy only when x is not contiguous or not an array yet)."""
    if _is_torch(x):
        raise TypeError(f"{op}: {name} is a torch.Tensor but the other arrays are NumPy arrays; pass one framework")
    return np.ascontiguousarray(x)


def _check_torch(op: str, **arrays: Any) -> None:
    for name, x in arrays.items():
        if not _is_torch(x):
            raise TypeError(f"{op}: {name} is a {type(x).__name__} but q is a torch.Tensor; pass one framework")


def _default_scale(op: str, head_dim: int, softmax_scale: Optional[float]) -> float:
    if softmax_scale is not None:
        return float(softmax_scale)
    if head_dim < 1:  # 0 ** -0.5 raised ZeroDivisionError
        raise ValueError(f"{op}: q's head_dim (its last dim) must be at least 1 (the default softmax_scale is "
                         f"head_dim ** -0.5), got {head_dim}")
    return float(head_dim) ** -0.5


_MAX_DIM = 2**31 - 1  # the library's bound on every dimension (src/core/ops.cpp)


def _check_head_dim_v(op: str, head_dim_v: int, head_dim: int) -> int:
    """head_dim_v checked before it sizes the output (a huge one asked NumPy for terabytes)."""
    v = int(head_dim_v)
    if v < 1 or v > _MAX_DIM:
        raise ValueError(f"{op}: head_dim_v must be in [1, {_MAX_DIM}], got {v}")
    if v > head_dim:
        raise ValueError(f"{op}: head_dim_v must be <= head_dim = {head_dim} (the value is the first head_dim_v "
                         f"columns of each key row), got {v}")
    return v


# ---------------------------------------------------------------------------------------------------------
# Kernel functions


class DecodeSchedule:
    """The split-KV work list of one decode batch, kept between calls: FlashMLA's ``get_mla_metadata``.

    Pass one to :func:`decode_with_kvcache` as ``schedule=``. The first call that uses it computes the work list (from
    the batch's shapes and ``cache_seqlens``) into a workspace it keeps; later calls with the same shapes reuse it and
    launch only the attention and combine kernels. An engine makes one per decode step and passes it to every layer.
    Reuse it only while ``cache_seqlens`` holds the same values (a new step needs a new schedule, or :meth:`reset`);
    a call with different shapes recomputes the work list by itself. Calls that use one schedule must be ordered
    (one stream). A CUDA graph that captured such a call reads the schedule's workspace at every replay: keep the
    schedule alive (referenced) as long as the graph. On the CPU it has no effect.
    """

    def __init__(self) -> None:
        self._workspace = None
        self._key: Optional[tuple] = None

    def reset(self) -> None:
        """Forget the work list: the next call computes it again (for a step with new cache_seqlens)."""
        self._key = None

    def __repr__(self) -> str:
        return f"DecodeSchedule({'ready' if self._key is not None else 'empty'})"


def decode_with_kvcache(
    q: ArrayLike,
    kv_cache: ArrayLike,
    block_table: ArrayLike,
    cache_seqlens: ArrayLike,
    head_dim_v: int,
    softmax_scale: Optional[float] = None,
    causal: bool = False,
    schedule: Optional[DecodeSchedule] = None,
    is_fp8_kvcache: bool = False,
) -> Tuple[ArrayLike, ArrayLike]:
    """Absorbed-form MLA decode over a paged latent cache: FlashMLA's ``flash_mla_with_kvcache``.

    Args:
        q: ``[batch, s_q, h_q, head_dim]`` float32, float16 or (torch) bfloat16.
        kv_cache: ``[num_pages, page_size, 1, head_dim]``, q's dtype; page_size any power of two. With
            ``is_fp8_kvcache=True``: ``[num_pages, page_size, 1, row_bytes]`` uint8 (or torch.float8_e4m3fn, read
            as its bytes) of fp8_ds_mla rows, 656 bytes for head_dim 576 / head_dim_v 512 (docs/mla.md, "FP8 cache";
            :func:`quantize_fp8_kvcache` writes them).
        block_table: ``[batch, max_pages]`` int32 page indices.
        cache_seqlens: ``[batch]`` int32 tokens per sequence.
        head_dim_v: value width; the value is the first ``head_dim_v`` columns of each cache row (512 for MLA).
        softmax_scale: multiplies the logits; default ``head_dim ** -0.5`` as in FlashMLA. For a DeepSeek layer
            pass ``config.softmax_scale`` (computed from the 192-wide q·k head dim and YaRN's mscale).
        causal: with ``s_q > 1``, query i sees keys ``t < seqlen - (s_q - 1 - i)`` (bottom-right aligned).
        schedule: a :class:`DecodeSchedule` to keep the split-KV work list between calls of one step (CUDA tensors;
            FlashMLA's ``tile_scheduler_metadata``). Without one, every call computes it (one more small kernel).
        is_fp8_kvcache: FlashMLA's argument: ``kv_cache`` holds fp8_ds_mla rows (the first ``head_dim_v`` values as
            float8 e4m3 with one float32 scale per 128, the rest bf16). Needs torch tensors with q in bfloat16
            (NumPy has no bfloat16). The result equals a bf16 decode over :func:`dequantize_fp8_kvcache`'s rows.

    Returns:
        ``(out, lse)``: out ``[batch, s_q, h_q, head_dim_v]`` in q's dtype, lse ``[batch, h_q, s_q]`` float32
        (natural log of the softmax denominator of the scaled logits). A query that sees no key (a sequence of
        length 0) gets out = 0 and lse = +inf. Both in q's framework and on q's device.

    Raises:
        ValueError: wrong shapes, bad block-table entries or lengths (the message names the batch index).
        TypeError: unsupported or mismatched dtypes, mixed frameworks.
    """
    fp8 = bool(is_fp8_kvcache)
    if _is_torch(q):
        from . import _torch_ops

        _check_torch("decode_with_kvcache", kv_cache=kv_cache, block_table=block_table, cache_seqlens=cache_seqlens)
        if fp8 and kv_cache.dtype == getattr(_torch_module(), "float8_e4m3fn", None):
            kv_cache = kv_cache.view(_torch_module().uint8)  # FlashMLA's own quantiser returns the rows in this dtype
        if q.dim() != 4:
            raise ValueError(f"decode_with_kvcache: q must be 4-D [batch, s_q, h_q, head_dim], got shape "
                             f"{list(q.shape)}")
        scale = _default_scale("decode_with_kvcache", q.shape[-1], softmax_scale)
        head_dim_v = _check_head_dim_v("decode_with_kvcache", head_dim_v, q.shape[-1])
        if schedule is not None and q.is_cuda:
            return _torch_ops.scheduled_decode(q, kv_cache, block_table, cache_seqlens, int(head_dim_v), scale,
                                               bool(causal), schedule, fp8)
        return _torch_ops.decode_with_kvcache(q, kv_cache, block_table, cache_seqlens, int(head_dim_v), scale,
                                              bool(causal), fp8)
    op = "decode_with_kvcache"
    if fp8:
        raise TypeError(f"{op}: is_fp8_kvcache=True needs q in bfloat16, which NumPy has no dtype for; pass torch "
                        "tensors (q.bfloat16(), kv_cache as torch.uint8)")
    q = _as_numpy(q, "q", op)
    kv_cache, block_table, cache_seqlens = (_as_numpy(a, n, op) for a, n in (
        (kv_cache, "kv_cache"), (block_table, "block_table"), (cache_seqlens, "cache_seqlens")))
    if q.ndim != 4:
        raise ValueError(f"{op}: q must be 4-D [batch, s_q, h_q, head_dim], got shape {list(q.shape)}")
    b, s_q, h_q, d = q.shape
    scale = _default_scale(op, d, softmax_scale)
    head_dim_v = _check_head_dim_v(op, head_dim_v, d)
    out = np.empty((b, s_q, h_q, head_dim_v), dtype=q.dtype)
    lse = np.empty((b, h_q, s_q), dtype=np.float32)
    _mla.decode(q, kv_cache, block_table, cache_seqlens, out, lse, head_dim_v, scale, bool(causal))
    return out, lse


def prefill(
    q: ArrayLike,
    k: ArrayLike,
    v: ArrayLike,
    cu_seqlens_q: ArrayLike,
    cu_seqlens_k: ArrayLike,
    softmax_scale: Optional[float] = None,
    causal: bool = True,
) -> Tuple[ArrayLike, ArrayLike]:
    """Expanded-form attention over variable-length sequences packed along the token axis.

    Args:
        q: ``[total_q, num_heads, head_dim_qk]``; k: ``[total_k, num_heads, head_dim_qk]``;
            v: ``[total_k, num_heads, head_dim_v]``; one dtype: float32, float16 or (torch) bfloat16.
        cu_seqlens_q, cu_seqlens_k: ``[batch + 1]`` int32 prefix sums (start at 0, end at total_q / total_k).
        softmax_scale: default ``head_dim_qk ** -0.5``.
        causal: query i of a sequence with n_q queries and n_k keys sees keys ``t <= n_k - n_q + i``.

    Returns:
        ``(out, lse)``: out ``[total_q, num_heads, head_dim_v]`` in q's dtype, lse ``[num_heads, total_q]``
        float32. Queries that see no key get out = 0, lse = +inf.
    """
    if _is_torch(q):
        from . import _torch_ops

        _check_torch("prefill", k=k, v=v, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k)
        return _torch_ops.prefill(q, k, v, cu_seqlens_q, cu_seqlens_k,
                                  _default_scale("prefill", q.shape[-1], softmax_scale), bool(causal))
    op = "prefill"
    q, k, v = (_as_numpy(a, n, op) for a, n in ((q, "q"), (k, "k"), (v, "v")))
    cu_q, cu_k = _as_numpy(cu_seqlens_q, "cu_seqlens_q", op), _as_numpy(cu_seqlens_k, "cu_seqlens_k", op)
    if q.ndim != 3 or v.ndim != 3:
        raise ValueError(f"{op}: q and v must be 3-D [tokens, num_heads, head_dim], got shapes {list(q.shape)} "
                         f"and {list(v.shape)}")
    scale = _default_scale(op, q.shape[-1], softmax_scale)
    out = np.empty((q.shape[0], q.shape[1], v.shape[2]), dtype=q.dtype)
    lse = np.empty((q.shape[1], q.shape[0]), dtype=np.float32)
    _mla.prefill(q, k, v, cu_q, cu_k, out, lse, scale, bool(causal))
    return out, lse


def prefill_backward(
    q: ArrayLike,
    k: ArrayLike,
    v: ArrayLike,
    out: ArrayLike,
    lse: ArrayLike,
    d_out: ArrayLike,
    cu_seqlens_q: ArrayLike,
    cu_seqlens_k: ArrayLike,
    softmax_scale: Optional[float] = None,
    causal: bool = True,
) -> Tuple[ArrayLike, ArrayLike, ArrayLike]:
    """The backward of :func:`prefill`: the gradients of q, k and v given its ``(out, lse)`` and ``d_out``, the
    gradient of the loss with respect to out. P is recomputed from lse (FlashAttention-2); see docs/ops.md.

    Args:
        q, k, v, cu_seqlens_q, cu_seqlens_k, softmax_scale, causal: as :func:`prefill`; float32 or (torch)
            bfloat16 (on CUDA the fast kernels for bfloat16 192/128, generic fp32 kernels otherwise).
        out, lse: what :func:`prefill` returned for these inputs; d_out: ``[total_q, num_heads, head_dim_v]``.

    Returns:
        ``(d_q, d_k, d_v)`` shaped and typed as q, k, v.
    """
    if _is_torch(q):
        from . import _torch_ops

        _check_torch("prefill_backward", k=k, v=v, out=out, lse=lse, d_out=d_out, cu_seqlens_q=cu_seqlens_q,
                     cu_seqlens_k=cu_seqlens_k)
        return _torch_ops.prefill_backward(q, k, v, out, lse, d_out, cu_seqlens_q, cu_seqlens_k,
                                           _default_scale("prefill_backward", q.shape[-1], softmax_scale),
                                           bool(causal))
    op = "prefill_backward"
    q, k, v, out, lse, d_out = (_as_numpy(a, n, op) for a, n in (
        (q, "q"), (k, "k"), (v, "v"), (out, "out"), (lse, "lse"), (d_out, "d_out")))
    cu_q, cu_k = _as_numpy(cu_seqlens_q, "cu_seqlens_q", op), _as_numpy(cu_seqlens_k, "cu_seqlens_k", op)
    if q.ndim != 3 or k.ndim != 3 or v.ndim != 3:
        raise ValueError(f"{op}: q, k and v must be 3-D [tokens, num_heads, head_dim], got shapes {list(q.shape)}, "
                         f"{list(k.shape)} and {list(v.shape)}")
    scale = _default_scale(op, q.shape[-1], softmax_scale)
    d_q, d_k, d_v = (np.empty(a.shape, dtype=q.dtype) for a in (q, k, v))
    _mla.prefill_backward(q, k, v, out, lse, d_out, cu_q, cu_k, d_q, d_k, d_v, scale, bool(causal))
    return d_q, d_k, d_v


def _fp8_host_array(x: Any, name: str, op: str, want_uint8: bool):
    """(array, is_torch): x as a C-contiguous CPU array, float32 for rows or uint8 for fp8 rows."""
    if _is_torch(x):
        torch = _torch_module()
        if x.device.type != "cpu":
            raise ValueError(f"{op}: {name} must be a CPU tensor, got one on {x.device} (call .cpu() first)")
        x = x.detach()
        if want_uint8:
            if x.dtype == getattr(torch, "float8_e4m3fn", None):
                x = x.view(torch.uint8)
            if x.dtype != torch.uint8:
                raise TypeError(f"{op}: {name} must be uint8 (fp8_ds_mla rows), got {x.dtype}")
            return x.contiguous(), True
        if not torch.is_floating_point(x):
            raise TypeError(f"{op}: {name} must be a float tensor, got {x.dtype}")
        return x.to(torch.float32).contiguous(), True
    a = np.asarray(x)
    if want_uint8:
        if a.dtype != np.uint8:
            raise TypeError(f"{op}: {name} must be uint8 (fp8_ds_mla rows), got {a.dtype}")
        return np.asarray(a, order="C"), False
    if a.dtype.kind != "f":
        raise TypeError(f"{op}: {name} must hold floats, got {a.dtype}")
    return np.asarray(a, dtype=np.float32, order="C"), False  # (ascontiguousarray would make a scalar 1-D)


def _fp8_row_bytes(op: str, head_dim: int, head_dim_v: int) -> int:
    if head_dim_v < 1 or head_dim_v > head_dim:
        raise ValueError(f"{op}: head_dim_v must be in [1, head_dim = {head_dim}] (the first head_dim_v values are "
                         f"quantised, the rest kept in bf16), got {head_dim_v}")
    return _mla.fp8_row_bytes(head_dim, head_dim_v)


def quantize_fp8_kvcache(rows: ArrayLike, head_dim_v: int = 512) -> ArrayLike:
    """Cache rows ``[..., head_dim]`` (float; converted to float32 first) as fp8_ds_mla bytes ``[..., row_bytes]``
    uint8: the ``kv_cache`` of ``decode_with_kvcache(..., is_fp8_kvcache=True)`` when given
    ``[num_pages, page_size, 1, 576]`` rows (656 bytes a row).

    The first ``head_dim_v`` values of a row are quantised to float8 e4m3 with one float32 scale per group of 128
    (scale = amax / 448, round to nearest even, saturating); the rest (the rope part) is stored in bf16. The bytes
    are those :class:`LatentCache` and the layers store (``mla::store_row``); the CUDA cache writer produces the
    same bytes from the same floats. CPU arrays only; NumPy in, NumPy out; torch in, torch out.
    """
    op = "quantize_fp8_kvcache"
    x, torch_in = _fp8_host_array(rows, "rows", op, want_uint8=False)
    if x.ndim < 1:
        raise ValueError(f"{op}: rows must have at least one dim [..., head_dim], got a scalar")
    head_dim = int(x.shape[-1])
    nbytes = _fp8_row_bytes(op, head_dim, int(head_dim_v))
    lead = tuple(x.shape[:-1])
    flat = x.reshape(-1, head_dim)
    if torch_in:
        out = _torch_module().empty((flat.shape[0], nbytes), dtype=_torch_module().uint8)
    else:
        out = np.empty((flat.shape[0], nbytes), dtype=np.uint8)
    _mla.quantize_fp8_rows(flat, out, int(head_dim_v))
    return out.reshape(lead + (nbytes,))


def dequantize_fp8_kvcache(kv_cache: ArrayLike, head_dim: int = 576, head_dim_v: int = 512) -> ArrayLike:
    """fp8_ds_mla rows ``[..., row_bytes]`` (uint8, or torch.float8_e4m3fn read as bytes) back to float32
    ``[..., head_dim]``: latent values ``bf16(fp8 * scale)``, rope values as stored (bf16).

    These are exactly the values every decode and layer computes with (all exactly representable in bfloat16), so
    a bf16 decode over them equals ``decode_with_kvcache(..., is_fp8_kvcache=True)`` over the bytes. Built on
    ``mla::load_row``. CPU arrays only; NumPy in, NumPy out; torch in, torch out.
    """
    op = "dequantize_fp8_kvcache"
    x, torch_in = _fp8_host_array(kv_cache, "kv_cache", op, want_uint8=True)
    nbytes = _fp8_row_bytes(op, int(head_dim), int(head_dim_v))
    if x.ndim < 1 or x.shape[-1] != nbytes:
        raise ValueError(f"{op}: kv_cache's last dim must be {nbytes}, the bytes of one fp8_ds_mla row of head_dim "
                         f"{head_dim} with head_dim_v {head_dim_v}, got shape {list(x.shape)}")
    lead = tuple(x.shape[:-1])
    flat = x.reshape(-1, nbytes)
    if torch_in:
        out = _torch_module().empty((flat.shape[0], int(head_dim)), dtype=_torch_module().float32)
    else:
        out = np.empty((flat.shape[0], int(head_dim)), dtype=np.float32)
    _mla.dequantize_fp8_rows(flat, out, int(head_dim_v))
    return out.reshape(lead + (int(head_dim),))


# ---------------------------------------------------------------------------------------------------------
# The cache


class LatentCache:
    """The paged latent cache: per token one row ``[RMSNorm(c) | RoPE(k_pe)]`` (576 values for DeepSeek models).

    Storage is ``[num_pages, page_size, row_bytes]`` bytes of ``dtype`` rows on ``device``; each sequence owns a
    block table of page indices. ``Attention.make_cache`` builds one that matches a layer.

    Args:
        num_pages: pages in the pool.
        page_size: tokens per page, a power of two from 1 to 256.
        row_width: values per row (kv_lora_rank + qk_rope_head_dim).
        dtype: "bf16", "f32" (an f32 layer needs an f32 cache, a bf16 layer a bf16 one) or "fp8" (the fp8_ds_mla
            rows of a bf16 layer with ``cache_dtype="fp8"``: 656 bytes a row instead of 1152 for 576 values).
        device: "cpu", "cpu-reference" or "cuda".
        page_order_seed: 0 hands pages out in order; otherwise in a random order from this seed.
        rope_width: "fp8" only: the last ``rope_width`` values of a row (qk_rope_head_dim) are kept in bf16.
    """

    def __init__(self, num_pages: int, page_size: int = 64, row_width: int = 576, dtype: str = "bf16",
                 device: str = "cpu", page_order_seed: int = 0, rope_width: int = 64) -> None:
        self._impl = _mla.LatentCache(num_pages, page_size, row_width, dtype, device, page_order_seed, rope_width)

    @classmethod
    def _wrap(cls, impl: "_mla.LatentCache") -> "LatentCache":
        obj = cls.__new__(cls)
        obj._impl = impl
        return obj

    def add_sequence(self) -> int:
        """Starts an empty sequence and returns its id."""
        return self._impl.add_sequence()

    def free_sequence(self, seq: int) -> None:
        """Drops a sequence and returns its pages to the pool."""
        self._impl.free_sequence(seq)

    def __contains__(self, seq: int) -> bool:
        return self._impl.__contains__(seq)

    def sequences(self) -> list:
        """The ids of the live sequences."""
        return list(self._impl.sequences())

    def length(self, seq: int) -> int:
        """Tokens stored for a sequence."""
        return self._impl.length(seq)

    def capacity(self, seq: int) -> int:
        """Tokens the sequence's pages can hold."""
        return self._impl.capacity(seq)

    def truncate(self, seq: int, length: int) -> None:
        """Forgets tokens past ``length`` (the pages stay with the sequence)."""
        self._impl.truncate(seq, length)

    def release_unused(self, seq: int) -> None:
        """Returns the pages past the sequence's stored tokens to the pool."""
        self._impl.release_unused(seq)

    def fill_unused(self, value: float) -> None:
        """Writes ``value`` (e.g. NaN) into every slot that holds no token; kernels never read them."""
        self._impl.fill_unused(value)

    def read(self, seq: int, begin: int = 0, end: Optional[int] = None) -> np.ndarray:
        """Rows ``[begin, end)`` of a sequence as a float32 NumPy array ``[end - begin, row_width]`` (a copy;
        dequantised from an fp8 cache)."""
        return self._impl.read(seq, begin, end)

    def block_table(self, seq: int) -> np.ndarray:
        """The sequence's page indices, int32 (a copy)."""
        return self._impl.block_table(seq)

    def block_tables(self, sequences: Sequence[int], pad: int = 0) -> np.ndarray:
        """Block tables of several sequences as one int32 ``[len(sequences), max_pages]`` array, padded with
        ``pad``: the ``block_table`` argument of :func:`decode_with_kvcache`."""
        tables = [self._impl.block_table(s) for s in sequences]
        width = max([len(t) for t in tables] + [1])
        out = np.full((len(tables), width), pad, dtype=np.int32)
        for i, t in enumerate(tables):
            out[i, : len(t)] = t
        return out

    def lengths(self, sequences: Sequence[int]) -> np.ndarray:
        """Stored tokens of several sequences, int32: the ``cache_seqlens`` argument of
        :func:`decode_with_kvcache`."""
        return np.array([self._impl.length(s) for s in sequences], dtype=np.int32)

    def kv_cache(self, framework: str = "numpy") -> ArrayLike:
        """The page pool ``[num_pages, page_size, 1, row_width]``, sharing the cache's memory (no copy): the
        ``kv_cache`` argument of :func:`decode_with_kvcache`.

        ``framework="numpy"`` gives a NumPy array (host caches only); a bf16 cache comes as uint16 (the bf16
        bit patterns) since NumPy has no bfloat16. ``framework="torch"`` gives a torch tensor (bfloat16 for a
        bf16 cache, on the cache's device). An fp8 cache is uint8 ``[num_pages, page_size, 1, row_bytes]`` in both:
        the ``kv_cache`` of ``decode_with_kvcache(..., is_fp8_kvcache=True)``. The view keeps the cache alive.
        """
        if framework == "numpy":
            if not self.device.startswith("cpu"):
                raise ValueError(f"LatentCache.kv_cache: a '{self.device}' cache cannot be viewed from NumPy; "
                                 "use framework='torch'")
            return self._impl._storage_numpy()
        if framework == "torch":
            return self._impl._storage_torch()
        raise ValueError(f"LatentCache.kv_cache: framework must be 'numpy' or 'torch', got {framework!r}")

    @property
    def num_pages(self) -> int:
        return self._impl.num_pages

    @property
    def pages_free(self) -> int:
        return self._impl.pages_free

    @property
    def page_size(self) -> int:
        return self._impl.page_size

    @property
    def row_width(self) -> int:
        return self._impl.row_width

    @property
    def dtype(self) -> str:
        """"bf16", "f32" or "fp8"."""
        return self._impl.dtype

    @property
    def device(self) -> str:
        return self._impl.device

    @property
    def rope_width(self) -> int:
        """Values at the end of a row kept in bf16 by an fp8 cache (0 for bf16 and f32 caches)."""
        return self._impl.rope_width

    @property
    def row_bytes(self) -> int:
        """Bytes of one token's row: 1152 for 576 bf16 values, 656 for the fp8_ds_mla row of 512 + 64."""
        return self._impl.row_bytes

    @property
    def page_bytes(self) -> int:
        """Bytes of one page: page_size * row_bytes."""
        return self._impl.page_bytes

    @property
    def nbytes(self) -> int:
        """Bytes of the whole page pool: num_pages * page_bytes."""
        return self.num_pages * self.page_bytes

    def __repr__(self) -> str:
        return (f"mla.LatentCache(num_pages={self.num_pages}, page_size={self.page_size}, row_width={self.row_width}, "
                f"dtype='{self.dtype}', device='{self.device}', sequences={len(self.sequences())}, "
                f"pages_free={self.pages_free})")


# ---------------------------------------------------------------------------------------------------------
# Tensor parallelism across processes


class Communicator:
    """One rank of an NCCL communicator, for tensor parallelism with one process per GPU (docs/parallel.md).

    The communicator is mla's own (``ncclCommInitRank``), not the one inside a torch.distributed process group:
    rank 0 makes an id with :meth:`unique_id`, every process receives it and calls :meth:`from_unique_id` with its
    rank. :meth:`from_process_group` does both over an existing torch.distributed group. Pass it to
    :class:`Attention` as ``communicator=``: the layer then holds this rank's heads and sums the ranks' o_proj
    partials with an NCCL all-reduce, so every rank's output is the whole layer's. CUDA builds only; a build without
    CUDA raises RuntimeError saying so. Set ``NCCL_NVLS_ENABLE=0`` before the first communicator on machines
    whose NVLink multicast must stay off.
    """

    def __init__(self) -> None:
        raise TypeError("mla.Communicator: use Communicator.from_unique_id or Communicator.from_process_group")

    @classmethod
    def _wrap(cls, impl: "_mla.Communicator") -> "Communicator":
        obj = cls.__new__(cls)
        obj._impl = impl
        return obj

    @staticmethod
    def unique_id() -> bytes:
        """``ncclGetUniqueId``: 128 bytes that rank 0 makes and sends to every rank (one id per communicator)."""
        return _mla.Communicator.unique_id()

    @classmethod
    def from_unique_id(cls, id: bytes, rank: int, world: int, device: int) -> "Communicator":
        """Rank ``rank`` of ``world`` on CUDA device ``device`` (``ncclCommInitRank``); returns once every rank has
        called it. ``id`` is rank 0's :meth:`unique_id`. Raises ValueError naming a bad rank, world, id or device."""
        if not isinstance(id, (bytes, bytearray, memoryview)):
            raise TypeError(f"Communicator.from_unique_id: id must be the bytes of Communicator.unique_id(), got "
                            f"{type(id).__name__}")
        return cls._wrap(_mla.Communicator.from_unique_id(bytes(id), int(rank), int(world), int(device)))

    @classmethod
    def from_process_group(cls, group: Any = None, device: Optional[int] = None) -> "Communicator":
        """A communicator over the ranks of a torch.distributed process group (default: the whole world), each
        process its group rank, on ``device`` (default ``torch.cuda.current_device()``).

        Collective: every rank of the group must call it. Rank 0 of the group makes the id and
        ``torch.distributed.broadcast_object_list`` sends it (any backend: gloo or nccl; with nccl the current CUDA
        device must be this rank's). If rank 0 cannot make one (no CUDA/NCCL in this build), every rank raises
        its error instead of waiting."""
        import torch
        import torch.distributed as dist

        op = "Communicator.from_process_group"
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError(f"{op}: torch.distributed is not initialised; call "
                               "torch.distributed.init_process_group first")
        g = group if group is not None else dist.group.WORLD
        rank, world = dist.get_rank(g), dist.get_world_size(g)
        if rank < 0:
            raise ValueError(f"{op}: this process (global rank {dist.get_rank()}) is not in the group")
        get_global_rank = getattr(dist, "get_global_rank", None) or dist.distributed_c10d._get_global_rank
        src = get_global_rank(g, 0)  # broadcast_object_list's src is a global rank
        message: list = [None]
        if rank == 0:
            try:
                message[0] = ("id", cls.unique_id())
            except Exception as e:  # sent to every rank: none is left waiting in the broadcast
                message[0] = ("error", f"{type(e).__name__}: {e}")
        dist.broadcast_object_list(message, src=src, group=group)
        kind, value = message[0]
        if kind != "id":
            raise RuntimeError(f"{op}: rank 0 of the group could not make an NCCL id: {value}")
        if device is None:
            device = torch.cuda.current_device()
        return cls.from_unique_id(value, rank, world, int(device))

    @property
    def rank(self) -> int:
        return self._impl.rank

    @property
    def world(self) -> int:
        return self._impl.world

    @property
    def device(self) -> int:
        """The CUDA device index this rank runs on."""
        return self._impl.device

    def __repr__(self) -> str:
        return f"mla.Communicator(rank={self.rank}, world={self.world}, device={self.device})"


# ---------------------------------------------------------------------------------------------------------
# The layer


class Attention:
    """One DeepSeek MLA attention layer over a batch of sequences that share a :class:`LatentCache`.

    Args:
        weights: a :class:`LayerWeights` (``LayerWeights.load(dir, layer)`` or ``LayerWeights.random(config)``).
        device: "cpu" (fast), "cpu-reference" (scalar loops) or "cuda" (when built with CUDA).
        dtype: "bf16" (bf16 weights, activations and cache; fp32 accumulation and softmax) or "f32".
        path: "auto" (per sequence, the cheaper of the two forms), "expanded" or "absorbed".
        cache_dtype: "auto" (the cache stores rows in ``dtype``) or "fp8" (bf16 layers only: fp8_ds_mla rows, 656
            bytes a token instead of 1152 for DeepSeek shapes; the layer computes with the dequantised rows exactly
            as over a bf16 cache holding them; docs/mla.md, "FP8 cache").
        communicator: a :class:`Communicator` (device "cuda"): tensor parallelism over heads, this layer being rank
            ``communicator.rank`` of ``communicator.world``. ``weights`` is the whole layer (the layer keeps its
            rank's heads) or the rank's slice (``LayerWeights.load(..., tp_rank, tp_world)`` with the
            communicator's rank and world; :meth:`from_pretrained` with ``communicator=`` reads it). Every rank's
            output and cache rows are the whole layer's. Every rank must make the same calls with the same hidden
            states, with ``torch.cuda.current_device() == communicator.device``. The layer keeps the communicator
            alive.

    Threads: one layer may be called from several threads at once as long as each thread uses its own
    :class:`LatentCache` (a cache is not thread-safe). Calls release the GIL; on the CPU they run in parallel and
    give bit for bit the results of the same calls made one after another; on CUDA the layer serialises them.
    """

    def __init__(self, weights: LayerWeights, device: str = "cpu", dtype: str = "bf16", path: str = "auto",
                 cache_dtype: str = "auto", communicator: Optional[Communicator] = None) -> None:
        if communicator is not None and not isinstance(communicator, Communicator):
            raise TypeError(f"Attention: communicator must be an mla.Communicator, got {type(communicator).__name__}")
        self._communicator = communicator
        self._impl = _mla.Attention(weights, device, dtype, path, cache_dtype,
                                    None if communicator is None else communicator._impl)
        self._local = threading.local()

    @classmethod
    def from_pretrained(cls, pretrained_dir: Union[str, os.PathLike], layer: int = 0, device: str = "cpu",
                        dtype: str = "bf16", path: str = "auto", cache_dtype: str = "auto",
                        tp_rank: Optional[int] = None, tp_world: Optional[int] = None,
                        communicator: Optional[Communicator] = None) -> "Attention":
        """Loads layer ``layer`` of a Hugging Face DeepSeek checkpoint folder (config.json + safetensors, single
        file or sharded; BF16, F16, F32 or FP8 E4M3 with block scales). Only that layer's tensors are read.

        ``tp_rank`` of ``tp_world`` > 1: only that rank's heads [H·r/W, H·(r+1)/W) are read (``LayerWeights.load``
        with the same arguments) and the layer computes their share of the output: o_proj's bias on rank 0 only,
        so the ranks' outputs sum to the layer's (docs/parallel.md). ``tp_world`` must divide the head count.

        ``communicator``: a tensor-parallel layer (see :class:`Attention`) reading only its rank's heads; tp_rank and
        tp_world are the communicator's (giving others is a ValueError) and every rank's output is the layer's."""
        if communicator is not None:
            if not isinstance(communicator, Communicator):
                raise TypeError(f"Attention.from_pretrained: communicator must be an mla.Communicator, got "
                                f"{type(communicator).__name__}")
            for name, given, want in (("tp_rank", tp_rank, communicator.rank),
                                      ("tp_world", tp_world, communicator.world)):
                if given is not None and int(given) != want:
                    raise ValueError(f"Attention.from_pretrained: {name}={given} conflicts with the communicator's "
                                     f"{name[3:]} {want}; leave {name} out (the communicator sets it)")
            tp_rank, tp_world = communicator.rank, communicator.world
        weights = LayerWeights.load(os.fspath(pretrained_dir), layer, 0 if tp_rank is None else tp_rank,
                                    1 if tp_world is None else tp_world)
        return cls(weights, device, dtype, path, cache_dtype, communicator)

    @property
    def communicator(self) -> Optional[Communicator]:
        """The :class:`Communicator` of a tensor-parallel layer, else None."""
        return self._communicator

    @classmethod
    def random(cls, config: Union[Config, str], seed: int = 0, device: str = "cpu", dtype: str = "bf16",
               path: str = "auto", cache_dtype: str = "auto") -> "Attention":
        """A layer with deterministic random weights of checkpoint-like scale; ``config`` may be a preset name."""
        if isinstance(config, str):
            config = Config.preset(config)
        return cls(LayerWeights.random(config, seed), device, dtype, path, cache_dtype)

    @property
    def config(self) -> Config:
        return self._impl.config

    @property
    def device(self) -> str:
        return self._impl.device

    @property
    def dtype(self) -> str:
        return self._impl.dtype

    @property
    def path(self) -> str:
        return self._impl.path

    @property
    def cache_dtype(self) -> str:
        """"auto" or "fp8" (the rows of :meth:`make_cache`'s caches)."""
        return self._impl.cache_dtype

    @property
    def last_paths(self) -> list:
        """The form ("expanded" or "absorbed") the calling thread's last successful call used for each sequence."""
        return list(getattr(self._local, "paths", []))

    def make_cache(self, num_pages: int, page_size: int = 64, page_order_seed: int = 0) -> LatentCache:
        """A cache whose row width, dtype (fp8 with ``cache_dtype="fp8"``) and device match this layer."""
        return LatentCache._wrap(self._impl.make_cache(num_pages, page_size, page_order_seed))

    def __call__(self, hidden: ArrayLike, cache: LatentCache, positions: Optional[ArrayLike] = None, *,
                 sequences: Union[int, Sequence[int]], num_tokens: Optional[Sequence[int]] = None) -> ArrayLike:
        """Appends the new tokens' latent rows to their sequences and returns the attention output.

        Shapes (D = hidden_size):
          * ``hidden [T, D]`` with ``sequences=seq`` (one id): T new tokens of one sequence.
          * ``hidden [B, T, D]`` with ``sequences=[s0, ..., s_{B-1}]``: T new tokens for each.
          * ``hidden [N, D]`` with ``sequences=[...]`` and ``num_tokens=[n0, ...]`` (sum N): packed, varlen.

        ``positions`` (integers, hidden's shape without D) rotate the keys and queries; default
        ``cache.length(seq) + i``. Masking is causal by cache index. The output has hidden's shape, framework,
        device and dtype (computation takes float32 hidden states; other float dtypes are converted).
        Everything is validated before the cache changes: on any error the cache is as it was.
        """
        if not isinstance(cache, LatentCache):
            raise TypeError(f"Attention: cache must be an mla.LatentCache, got {type(cache).__name__}")
        torch_in = _is_torch(hidden)
        if torch_in:
            import torch

            if not torch.is_floating_point(hidden):
                raise TypeError(f"Attention: hidden must be a float tensor, got {hidden.dtype}")
            x = hidden.detach().to(torch.float32).contiguous()
        else:
            x = np.asarray(hidden)
            if x.dtype.kind != "f":
                raise TypeError(f"Attention: hidden must hold floats, got {x.dtype}")
            x = np.ascontiguousarray(x, dtype=np.float32)
        lead = tuple(x.shape[:-1])
        if isinstance(sequences, (int, np.integer)):
            if x.ndim != 2:
                raise ValueError(f"Attention: with one sequence id, hidden must be [tokens, hidden_size], got shape "
                                 f"{list(x.shape)}")
            if num_tokens is not None and [int(n) for n in num_tokens] != [x.shape[0]]:
                raise ValueError(f"Attention: with one sequence id every row of hidden is one of its tokens; "
                                 f"num_tokens={list(num_tokens)} disagrees with {x.shape[0]} rows")
            seqs, counts = [int(sequences)], [x.shape[0]]
        else:
            seqs = [int(s) for s in sequences]
            if x.ndim == 3:
                if len(seqs) != x.shape[0]:
                    raise ValueError(f"Attention: hidden has {x.shape[0]} rows of sequences but {len(seqs)} ids "
                                     "were given")
                if num_tokens is not None:
                    raise ValueError("Attention: num_tokens is for packed [N, hidden_size] input; [B, T, D] input "
                                     "gives every sequence T tokens")
                counts = [x.shape[1]] * len(seqs)
            elif x.ndim == 2:
                if num_tokens is None:
                    raise ValueError("Attention: packed [N, hidden_size] input for a list of sequences needs "
                                     "num_tokens (one count per sequence)")
                counts = [int(n) for n in num_tokens]
            else:
                raise ValueError(f"Attention: hidden must be [T, D], [B, T, D] or packed [N, D], got shape "
                                 f"{list(x.shape)}")
        flat = x.reshape(-1, x.shape[-1]) if x.ndim >= 1 else x
        pos = None
        if positions is not None:
            p = positions.detach().cpu().numpy() if _is_torch(positions) else np.asarray(positions)
            if p.dtype.kind not in "iu":
                raise TypeError(f"Attention: positions must be integers, got {p.dtype}")
            if tuple(p.shape) != lead:
                raise ValueError(f"Attention: positions must have shape {list(lead)} (hidden's without the last "
                                 f"dim), got {list(p.shape)}")
            pos = np.ascontiguousarray(p.reshape(-1), dtype=np.int64)
        if torch_in:
            out = torch.empty_like(flat)
        else:
            out = np.empty_like(flat)
        self._local.paths = self._impl.forward(flat, out, seqs, counts, pos, cache._impl)
        out = out.reshape(x.shape)
        if torch_in and hidden.dtype != out.dtype:
            out = out.to(hidden.dtype)
        return out

    forward = __call__

    def __repr__(self) -> str:
        c = self.config
        return (f"mla.Attention(config='{c.name}', hidden_size={c.hidden_size}, num_heads={c.num_heads}, "
                f"device='{self.device}', dtype='{self.dtype}', path='{self.path}', cache_dtype='{self.cache_dtype}')")


def run_sequences(layer: Attention, hidden: np.ndarray, positions: Optional[np.ndarray] = None, *, chunk: int = 0,
                  decode_after: int = -1, page_size: int = 64, page_order_seed: int = 0,
                  poison_unused: bool = False) -> Tuple[np.ndarray, np.ndarray]:
    """Runs a layer over ``hidden [B, T, D]`` (float32 NumPy) the way a serving engine feeds it, in a fresh cache:
    one shot, in chunks of ``chunk`` tokens, or prefilling ``decode_after`` tokens then decoding one per call.
    Returns ``(output [B, T, D], latent [B, T, row_width])``, the latent being the cache rows as stored."""
    x = np.ascontiguousarray(hidden, dtype=np.float32)
    pos = None if positions is None else np.ascontiguousarray(positions, dtype=np.int64)
    out, latent, _ = _mla.run_sequences(layer._impl, x, pos, chunk, decode_after, page_size, page_order_seed,
                                        poison_unused)
    return out, latent
