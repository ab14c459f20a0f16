"""The kernel functions as PyTorch custom operators (torch.ops.mla.decode_with_kvcache, torch.ops.mla.prefill,
torch.ops.mla.prefill_backward),
with fake (meta) implementations so that torch.compile can trace through them without running them.

Imported by ``mla`` when torch is importable. The operators allocate their outputs with torch on the inputs'
device and call the same C++ functions as the NumPy path.
"""
from typing import Tuple

import torch

from . import _mla

Tensor = torch.Tensor


def _decode_impl(q: Tensor, kv_cache: Tensor, block_table: Tensor, cache_seqlens: Tensor, head_dim_v: int,
                 softmax_scale: float, causal: bool, is_fp8_kvcache: bool = False) -> Tuple[Tensor, Tensor]:
    if q.dim() != 4:
        raise ValueError(f"decode_with_kvcache: q must be 4-D [batch, s_q, h_q, head_dim], got shape {list(q.shape)}")
    b, s_q, h_q, _ = q.shape
    out = torch.empty((b, s_q, h_q, max(head_dim_v, 0)), dtype=q.dtype, device=q.device)
    lse = torch.empty((b, h_q, s_q), dtype=torch.float32, device=q.device)
    args = [t.detach().contiguous() for t in (q, kv_cache, block_table, cache_seqlens)]
    if not q.is_cuda:
        _mla.decode(*args, out, lse, head_dim_v, softmax_scale, causal, is_fp8_kvcache=is_fp8_kvcache)
        return out, lse
    # CUDA: the planned run on torch's current stream with a workspace from torch's allocator: nothing is
    # allocated or synchronised inside, so the call can be captured in a torch.cuda.CUDAGraph.
    with torch.cuda.device(q.device):
        nbytes = _mla.decode_workspace_bytes(b, s_q, h_q, q.shape[3], head_dim_v, kv_cache.shape[1],
                                             str(q.dtype).replace("torch.", ""), "cuda", is_fp8_kvcache)
        workspace = torch.empty(max(nbytes, 1), dtype=torch.uint8, device=q.device)
        _mla.decode(*args, out, lse, head_dim_v, softmax_scale, causal, workspace=workspace,
                    stream=torch.cuda.current_stream().cuda_stream, is_fp8_kvcache=is_fp8_kvcache)
    return out, lse


def _decode_scheduled_impl(q: Tensor, kv_cache: Tensor, block_table: Tensor, cache_seqlens: Tensor, workspace: Tensor,
                           head_dim_v: int, softmax_scale: float, causal: bool, splits_ready: bool,
                           is_fp8_kvcache: bool = False) -> Tuple[Tensor, Tensor]:
    b, s_q, h_q, _ = q.shape
    out = torch.empty((b, s_q, h_q, max(head_dim_v, 0)), dtype=q.dtype, device=q.device)
    lse = torch.empty((b, h_q, s_q), dtype=torch.float32, device=q.device)
    args = [t.detach().contiguous() for t in (q, kv_cache, block_table, cache_seqlens)]
    with torch.cuda.device(q.device):
        _mla.decode(*args, out, lse, head_dim_v, softmax_scale, causal, workspace=workspace,
                    stream=torch.cuda.current_stream().cuda_stream, splits_ready=splits_ready,
                    is_fp8_kvcache=is_fp8_kvcache)
    return out, lse


def scheduled_decode(q: Tensor, kv_cache: Tensor, block_table: Tensor, cache_seqlens: Tensor, head_dim_v: int,
                     softmax_scale: float, causal: bool, schedule, is_fp8_kvcache: bool = False
                     ) -> Tuple[Tensor, Tensor]:
    """decode_with_kvcache with a DecodeSchedule: the first call for a shape writes the work list into the
    schedule's workspace, later ones reuse it (splits_ready)."""
    if q.dim() != 4:
        raise ValueError(f"decode_with_kvcache: q must be 4-D [batch, s_q, h_q, head_dim], got shape {list(q.shape)}")
    b, s_q, h_q, d = q.shape
    key = (b, s_q, h_q, d, head_dim_v, kv_cache.shape[1], block_table.shape[1], q.dtype, q.device, bool(causal),
           bool(is_fp8_kvcache))
    ready = schedule._key == key
    if not ready:
        with torch.cuda.device(q.device):
            nbytes = _mla.decode_workspace_bytes(b, s_q, h_q, d, head_dim_v, kv_cache.shape[1],
                                                 str(q.dtype).replace("torch.", ""), "cuda", is_fp8_kvcache)
        ws = schedule._workspace
        if ws is None or ws.device != q.device or ws.numel() < nbytes:
            schedule._workspace = torch.empty(max(nbytes, 1), dtype=torch.uint8, device=q.device)
        schedule._key = None  # set again only once the work list is written
    out = decode_with_kvcache_scheduled(q, kv_cache, block_table, cache_seqlens, schedule._workspace, head_dim_v,
                                        softmax_scale, causal, ready, is_fp8_kvcache)
    schedule._key = key
    return out


def _prefill_impl(q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q: Tensor, cu_seqlens_k: Tensor, softmax_scale: float,
                  causal: bool) -> Tuple[Tensor, Tensor]:
    if q.dim() != 3 or v.dim() != 3:
        raise ValueError(f"prefill: q and v must be 3-D [tokens, num_heads, head_dim], got shapes {list(q.shape)} "
                         f"and {list(v.shape)}")
    out = torch.empty((q.shape[0], q.shape[1], v.shape[2]), dtype=q.dtype, device=q.device)
    lse = torch.empty((q.shape[1], q.shape[0]), dtype=torch.float32, device=q.device)
    q, k, v = (t.detach().contiguous() for t in (q, k, v))
    cu_q, cu_k = (t.detach().contiguous() for t in (cu_seqlens_q, cu_seqlens_k))
    if not q.is_cuda:
        _mla.prefill(q, k, v, cu_q.cpu(), cu_k.cpu(), out, lse, softmax_scale, causal)
        return out, lse
    # CUDA: on torch's current stream. cu_seqlens on the host (CPU tensors, with q, k, v on the GPU) are checked
    # there and the kernels launch per sequence from them: nothing is copied or read back, graph-capturable (the
    # lengths are baked into the graph). cu_seqlens on the GPU are read by Hopper's kernel itself (one launch,
    # graph-capturable); the other kernels copy them to the host on that stream and check them there (ops.md).
    with torch.cuda.device(q.device):
        _mla.prefill(q, k, v, cu_q, cu_k, out, lse, softmax_scale, causal,
                     stream=torch.cuda.current_stream().cuda_stream)
    return out, lse


def _prefill_backward_impl(q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, d_out: Tensor,
                           cu_seqlens_q: Tensor, cu_seqlens_k: Tensor, softmax_scale: float,
                           causal: bool) -> Tuple[Tensor, Tensor, Tensor]:
    if q.dim() != 3 or k.dim() != 3 or v.dim() != 3:
        raise ValueError(f"prefill_backward: q, k and v must be 3-D [tokens, num_heads, head_dim], got shapes "
                         f"{list(q.shape)}, {list(k.shape)} and {list(v.shape)}")
    d_q, d_k, d_v = (torch.empty(t.shape, dtype=q.dtype, device=q.device) for t in (q, k, v))
    q, k, v, out, lse, d_out = (t.detach().contiguous() for t in (q, k, v, out, lse, d_out))
    cu_q, cu_k = (t.detach().contiguous() for t in (cu_seqlens_q, cu_seqlens_k))
    if not q.is_cuda:
        _mla.prefill_backward(q, k, v, out, lse, d_out, cu_q.cpu(), cu_k.cpu(), d_q, d_k, d_v, softmax_scale, causal)
        return d_q, d_k, d_v
    # CUDA: on torch's current stream, with the fp32 dQ accumulator from torch's allocator (the op allocates
    # nothing); host cu_seqlens (CPU tensors) are used as they are (per-sequence launches, nothing read back,
    # graph-capturable); cu_seqlens on the GPU are copied to the host on that stream: a sync, not capturable (ops.md).
    with torch.cuda.device(q.device):
        nbytes = _mla.prefill_backward_workspace_bytes(q.shape[0], q.shape[1], q.shape[2], v.shape[2],
                                                       str(q.dtype).replace("torch.", ""), "cuda")
        workspace = torch.empty(max(nbytes, 1), dtype=torch.uint8, device=q.device)
        _mla.prefill_backward(q, k, v, out, lse, d_out, cu_q, cu_k, d_q, d_k, d_v, softmax_scale, causal,
                              workspace=workspace, stream=torch.cuda.current_stream().cuda_stream)
    return d_q, d_k, d_v


registered = hasattr(torch.library, "custom_op") and hasattr(torch.library, "register_fake")

if registered:

    @torch.library.custom_op("mla::decode_with_kvcache", mutates_args=())
    def decode_with_kvcache(q: Tensor, kv_cache: Tensor, block_table: Tensor, cache_seqlens: Tensor,
                            head_dim_v: int, softmax_scale: float, causal: bool,
                            is_fp8_kvcache: bool = False) -> Tuple[Tensor, Tensor]:
        return _decode_impl(q, kv_cache, block_table, cache_seqlens, head_dim_v, softmax_scale, causal, is_fp8_kvcache)

    @decode_with_kvcache.register_fake
    def _decode_fake(q, kv_cache, block_table, cache_seqlens, head_dim_v, softmax_scale, causal, is_fp8_kvcache=False):
        torch._check(q.dim() == 4, lambda: "decode_with_kvcache: q must be 4-D [batch, s_q, h_q, head_dim]")
        b, s_q, h_q, _ = q.shape
        return q.new_empty((b, s_q, h_q, head_dim_v)), q.new_empty((b, h_q, s_q), dtype=torch.float32)

    @torch.library.custom_op("mla::decode_with_kvcache_scheduled", mutates_args=("workspace",))
    def decode_with_kvcache_scheduled(q: Tensor, kv_cache: Tensor, block_table: Tensor, cache_seqlens: Tensor,
                                      workspace: Tensor, head_dim_v: int, softmax_scale: float, causal: bool,
                                      splits_ready: bool, is_fp8_kvcache: bool = False) -> Tuple[Tensor, Tensor]:
        return _decode_scheduled_impl(q, kv_cache, block_table, cache_seqlens, workspace, head_dim_v, softmax_scale,
                                      causal, splits_ready, is_fp8_kvcache)

    @decode_with_kvcache_scheduled.register_fake
    def _decode_scheduled_fake(q, kv_cache, block_table, cache_seqlens, workspace, head_dim_v, softmax_scale, causal,
                               splits_ready, is_fp8_kvcache=False):
        b, s_q, h_q, _ = q.shape
        return q.new_empty((b, s_q, h_q, head_dim_v)), q.new_empty((b, h_q, s_q), dtype=torch.float32)

    @torch.library.custom_op("mla::prefill", mutates_args=())
    def prefill(q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q: Tensor, cu_seqlens_k: Tensor, softmax_scale: float,
                causal: bool) -> Tuple[Tensor, Tensor]:
        return _prefill_impl(q, k, v, cu_seqlens_q, cu_seqlens_k, softmax_scale, causal)

    @prefill.register_fake
    def _prefill_fake(q, k, v, cu_seqlens_q, cu_seqlens_k, softmax_scale, causal):
        torch._check(q.dim() == 3 and v.dim() == 3, lambda: "prefill: q and v must be 3-D")
        return (q.new_empty((q.shape[0], q.shape[1], v.shape[2])),
                q.new_empty((q.shape[1], q.shape[0]), dtype=torch.float32))

    @torch.library.custom_op("mla::prefill_backward", mutates_args=())
    def prefill_backward(q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, d_out: Tensor,
                         cu_seqlens_q: Tensor, cu_seqlens_k: Tensor, softmax_scale: float,
                         causal: bool) -> Tuple[Tensor, Tensor, Tensor]:
        return _prefill_backward_impl(q, k, v, out, lse, d_out, cu_seqlens_q, cu_seqlens_k, softmax_scale, causal)

    @prefill_backward.register_fake
    def _prefill_backward_fake(q, k, v, out, lse, d_out, cu_seqlens_q, cu_seqlens_k, softmax_scale, causal):
        torch._check(q.dim() == 3 and k.dim() == 3 and v.dim() == 3, lambda: "prefill_backward: q, k, v must be 3-D")
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)

    # prefill is differentiable in q, k and v: its backward is prefill_backward, with the forward's out and lse
    # saved (lse is an output but not differentiable: a loss that reads it gets no gradient through it). The
    # forward's cu_seqlens are saved as given, device included: CPU ones (with CUDA q, k, v) reach the backward
    # as CPU tensors, so forward and backward both stay free of host<->device copies and syncs.
    def _prefill_setup_context(ctx, inputs, output):
        q, k, v, cu_seqlens_q, cu_seqlens_k, softmax_scale, causal = inputs
        out, lse = output
        ctx.mark_non_differentiable(lse)
        ctx.save_for_backward(q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k)
        ctx.softmax_scale, ctx.causal = softmax_scale, causal

    def _prefill_backward_formula(ctx, d_out, _d_lse):
        q, k, v, out, lse, cu_q, cu_k = ctx.saved_tensors
        d_q, d_k, d_v = prefill_backward(q, k, v, out, lse, d_out.contiguous(), cu_q, cu_k, ctx.softmax_scale,
                                         ctx.causal)
        return d_q, d_k, d_v, None, None, None, None

    prefill.register_autograd(_prefill_backward_formula, setup_context=_prefill_setup_context)

else:  # torch older than 2.4: plain functions, eager only
    decode_with_kvcache = _decode_impl
    decode_with_kvcache_scheduled = _decode_scheduled_impl
    prefill = _prefill_impl
    prefill_backward = _prefill_backward_impl
