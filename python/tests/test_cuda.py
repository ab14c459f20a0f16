"""The package on a GPU: decode_with_kvcache and prefill on CUDA tensors against the float64 paged reference and
the CPU, and the CUDA layer against transformers' DeepseekV3Attention. Skips without torch, a GPU, or a CUDA build
(scripts/gpu-python.sh runs it on the H200)."""
import pytest

torch = pytest.importorskip("torch")

import mla  # noqa: E402
from conftest import rel_error  # noqa: E402
from test_torch import paged_reference, paged_tensors  # noqa: E402

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() or "cuda" not in mla.available_devices(),
    reason="needs a GPU and mla built with MLA_WITH_CUDA=ON",
)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("h_q, s_q, page_size", [(128, 1, 64), (128, 2, 64), (16, 1, 16), (3, 4, 256), (64, 1, 1)])
def test_decode_cuda_matches_paged_reference(dtype, h_q, s_q, page_size):
    lengths = [0, 100, 1025, 5, 300]
    kv, table, seqlens = paged_tensors(lengths, page_size, 576, dtype, seed=h_q * 7 + s_q)
    q = (torch.rand(len(lengths), s_q, h_q, 576) * 2 - 1).to(dtype)
    out, lse = mla.decode_with_kvcache(q.cuda(), kv.cuda(), table.cuda(), seqlens.cuda(), 512, causal=s_q > 1)
    assert out.is_cuda and lse.is_cuda and out.dtype == dtype and out.shape == (5, s_q, h_q, 512)
    want, want_lse = paged_reference(q, kv, table, seqlens, 512, 576**-0.5, s_q > 1)
    tol = 2e-2 if dtype == torch.bfloat16 else 2e-6
    assert rel_error(out.float().cpu().numpy(), want.numpy()) < tol
    lse = lse.cpu()
    assert torch.equal(torch.isinf(lse), torch.isinf(want_lse))
    finite = ~torch.isinf(want_lse)
    torch.testing.assert_close(lse[finite].double(), want_lse[finite], rtol=1e-4, atol=1e-4)


def test_prefill_cuda_matches_cpu():
    g = torch.Generator().manual_seed(3)
    n_q, n_k = [300, 1, 64], [300, 700, 64]
    cu_q = torch.tensor([0, 300, 301, 365], dtype=torch.int32)
    cu_k = torch.tensor([0, 300, 1000, 1064], dtype=torch.int32)
    H = 16
    q = (torch.rand(sum(n_q), H, 192, generator=g) * 2 - 1).bfloat16()
    k = (torch.rand(sum(n_k), H, 192, generator=g) * 2 - 1).bfloat16()
    v = (torch.rand(sum(n_k), H, 128, generator=g) * 2 - 1).bfloat16()
    want, want_lse = mla.prefill(q, k, v, cu_q, cu_k, causal=True)
    got, got_lse = mla.prefill(q.cuda(), k.cuda(), v.cuda(), cu_q, cu_k, causal=True)
    assert got.is_cuda
    assert rel_error(got.float().cpu().numpy(), want.float().numpy()) < 1e-2
    torch.testing.assert_close(got_lse.cpu(), want_lse, rtol=1e-3, atol=1e-3)


def test_prefill_backward_cuda_matches_cpu():
    # bf16 192/128 on the GPU (workspace from torch's allocator, torch's current stream) against the f32 CPU path
    # on the same bf16 values; errors relative to the largest gradient (P and dS are rounded to bf16 on the GPU).
    g = torch.Generator().manual_seed(5)
    n_q, n_k = [300, 1, 64, 0], [300, 700, 100, 20]
    cu_q = torch.tensor([0, 300, 301, 365, 365], dtype=torch.int32)
    cu_k = torch.tensor([0, 300, 1000, 1100, 1120], dtype=torch.int32)
    H = 4
    q, d_out = ((torch.rand(sum(n_q), H, d, generator=g) * 2 - 1).bfloat16() for d in (192, 128))
    k, v = ((torch.rand(sum(n_k), H, d, generator=g) * 2 - 1).bfloat16() for d in (192, 128))
    out, lse = mla.prefill(q.cuda(), k.cuda(), v.cuda(), cu_q, cu_k, causal=True)
    got = mla.prefill_backward(q.cuda(), k.cuda(), v.cuda(), out, lse, d_out.cuda(), cu_q.cuda(), cu_k.cuda(),
                               causal=True)
    want = mla.prefill_backward(q.float(), k.float(), v.float(), out.float().cpu(), lse.cpu(), d_out.float(), cu_q,
                                cu_k, causal=True)
    for a, b in zip(got, want):
        assert a.is_cuda and a.dtype == torch.bfloat16
        assert (a.float().cpu() - b).abs().max().item() <= 2e-2 * b.abs().max().item()


def test_prefill_cuda_seqlens_captured_in_graph():
    # CUDA cu_seqlens: one launch that reads them on the device (Hopper) or a host copy (elsewhere). Same bits as
    # host lengths; on Hopper the call is captured in a CUDA graph and replays with new lengths written in place.
    g = torch.Generator().manual_seed(4)
    H, total = 8, 700
    q = (torch.rand(total, H, 192, generator=g) * 2 - 1).bfloat16().cuda()
    k = (torch.rand(total, H, 192, generator=g) * 2 - 1).bfloat16().cuda()
    v = (torch.rand(total, H, 128, generator=g) * 2 - 1).bfloat16().cuda()
    cu_a = torch.tensor([0, 300, 301, 700], dtype=torch.int32)
    cu_b = torch.tensor([0, 10, 500, 700], dtype=torch.int32)
    want_a, want_b = (mla.prefill(q, k, v, cu, cu, causal=True)[0] for cu in (cu_a, cu_b))
    cu = cu_a.cuda()
    assert torch.equal(mla.prefill(q, k, v, cu, cu, causal=True)[0], want_a)
    if torch.cuda.get_device_capability()[0] != 9:
        return
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.stream(stream), torch.cuda.graph(graph, stream=stream):
        out, _ = mla.prefill(q, k, v, cu, cu, causal=True)
    torch.cuda.current_stream().wait_stream(stream)
    graph.replay()
    assert torch.equal(out, want_a)
    cu.copy_(cu_b)
    graph.replay()
    assert torch.equal(out, want_b)


@pytest.mark.parametrize("dtype", ["f32", "bf16"])
def test_cuda_layer_matches_cpu_layer_on_goldens(dtype):
    from conftest import GOLDEN_CASES, Golden

    for name in GOLDEN_CASES:
        g = Golden(name)
        outs = {}
        for device in ("cpu", "cuda"):
            layer = mla.Attention.from_pretrained(g.dir, device=device, dtype=dtype)
            cache = layer.make_cache(num_pages=64, page_size=16)
            seqs = [cache.add_sequence() for _ in range(g.hidden.shape[0])]
            hidden = torch.from_numpy(g.hidden)
            if device == "cuda":
                hidden = hidden.cuda()
            outs[device] = layer(hidden, cache, torch.from_numpy(g.positions), sequences=seqs).cpu().numpy()
        assert rel_error(outs["cuda"], g.output) < (5e-6 if dtype == "f32" else 2e-2), name
        assert rel_error(outs["cuda"], outs["cpu"]) < (5e-6 if dtype == "f32" else 1e-2), name


def test_decode_is_captured_in_a_cuda_graph():
    """decode_with_kvcache runs on torch's current stream with a torch-allocated workspace, so a decode step can be
    captured once and replayed with new queries and lengths written in place."""
    lengths = [704, 64, 64]  # every slot of every page written, so any shorter length reads finite rows
    kv, table, seqlens = paged_tensors(lengths, 64, 576, torch.bfloat16, seed=11)
    kv, table, seqlens = kv.cuda(), table.cuda(), seqlens.cuda()
    q = ((torch.rand(3, 1, 128, 576) * 2 - 1).bfloat16()).cuda()
    mla.decode_with_kvcache(q, kv, table, seqlens, 512)  # warm-up outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out, lse = mla.decode_with_kvcache(q, kv, table, seqlens, 512)
    for seed, new_lengths in ((1, [3, 64, 50]), (2, [700, 10, 64])):  # within each sequence's pages
        g = torch.Generator().manual_seed(seed)
        q.copy_(((torch.rand(3, 1, 128, 576, generator=g) * 2 - 1).bfloat16()).cuda())
        seqlens.copy_(torch.tensor(new_lengths, dtype=torch.int32))
        graph.replay()
        torch.cuda.synchronize()
        want, want_lse = mla.decode_with_kvcache(q, kv, table, seqlens, 512)
        assert torch.equal(out, want), f"replay {seed} differs from an eager call"
        assert torch.equal(lse, want_lse)


def test_decode_schedule_is_reused_across_calls_and_graph_replays():
    """A DecodeSchedule keeps the split-KV work list: calls after the first give the same bits as plain calls,
    inside a CUDA graph too; a call with another shape recomputes it, and reset() forgets it."""
    lengths = [4096, 17, 1000, 64]  # long and short: several splits for the first sequence
    kv, table, seqlens = paged_tensors(lengths, 64, 576, torch.bfloat16, seed=5)
    kv, table, seqlens = kv.cuda(), table.cuda(), seqlens.cuda()
    g = torch.Generator().manual_seed(9)
    q = ((torch.rand(4, 1, 128, 576, generator=g) * 2 - 1).bfloat16()).cuda()
    want, want_lse = mla.decode_with_kvcache(q, kv, table, seqlens, 512)
    sched = mla.DecodeSchedule()
    assert "empty" in repr(sched)
    for _ in range(3):  # the first call writes the work list, the next two reuse it
        out, lse = mla.decode_with_kvcache(q, kv, table, seqlens, 512, schedule=sched)
        assert torch.equal(out, want) and torch.equal(lse, want_lse)
    assert "ready" in repr(sched)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        gout, glse = mla.decode_with_kvcache(q, kv, table, seqlens, 512, schedule=sched)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(gout, want) and torch.equal(glse, want_lse)
    # another shape (h_q 16) through the same schedule: recomputed, still exact
    q16 = q[:, :, :16].contiguous()
    out16, _ = mla.decode_with_kvcache(q16, kv, table, seqlens, 512, schedule=sched)
    assert torch.equal(out16, mla.decode_with_kvcache(q16, kv, table, seqlens, 512)[0])
    # new lengths for a new step: reset() makes the next call plan them
    seqlens2 = torch.tensor([100, 17, 900, 1], dtype=torch.int32, device="cuda")
    sched.reset()
    out2, _ = mla.decode_with_kvcache(q, kv, table, seqlens2, 512, schedule=sched)
    assert torch.equal(out2, mla.decode_with_kvcache(q, kv, table, seqlens2, 512)[0])


# ---- the FP8 cache (is_fp8_kvcache): the same fp8_ds_mla bytes decoded on the GPU and on the CPU ----


def fp8_paged(lengths, page_size, h_q, s_q, seed):
    """fp8 rows (quantised on the CPU; NaN rows in unused slots), their block table and lengths, bf16 queries."""
    rows, table, seqlens = paged_tensors(lengths, page_size, 576, torch.float32, seed=seed)
    kv8 = mla.quantize_fp8_kvcache(rows)
    g = torch.Generator().manual_seed(seed + 1)
    q = (torch.rand(len(lengths), s_q, h_q, 576, generator=g) * 2 - 1).bfloat16()
    return q, kv8, table, seqlens


@pytest.mark.parametrize("h_q, s_q, page_size", [(128, 1, 64), (128, 2, 64), (16, 1, 16), (3, 4, 256), (64, 1, 1)])
def test_decode_fp8_cuda_matches_cpu(h_q, s_q, page_size):
    q, kv8, table, seqlens = fp8_paged([0, 100, 1025, 5, 300], page_size, h_q, s_q, seed=h_q * 7 + s_q)
    causal = s_q > 1
    want, want_lse = mla.decode_with_kvcache(q, kv8, table, seqlens, 512, causal=causal, is_fp8_kvcache=True)
    out, lse = mla.decode_with_kvcache(q.cuda(), kv8.cuda(), table.cuda(), seqlens.cuda(), 512, causal=causal,
                                       is_fp8_kvcache=True)
    assert out.is_cuda and out.dtype == torch.bfloat16 and out.shape == (5, s_q, h_q, 512)
    assert rel_error(out.float().cpu().numpy(), want.float().numpy()) < 1e-2
    # and against float64 over the dequantised rows (the CPU result equals a bf16 decode over them)
    deq = mla.dequantize_fp8_kvcache(kv8)
    ref, ref_lse = paged_reference(q, deq, table, seqlens, 512, 576**-0.5, causal)
    assert rel_error(out.float().cpu().numpy(), ref.numpy()) < 2e-2
    lse = lse.cpu()
    assert torch.equal(torch.isinf(lse), torch.isinf(want_lse))
    finite = ~torch.isinf(want_lse)
    torch.testing.assert_close(lse[finite], want_lse[finite], rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(lse[finite].double(), ref_lse[finite], rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("h_q, s_q, page_size", [(16, 1, 64), (16, 2, 1), (5, 4, 16)])
def test_decode_fp8_cuda_sixteen_row_kernel_matches_cpu(h_q, s_q, page_size, monkeypatch):
    """The opt-in 16-row fp8 kernel (MLA_CUDA_DECODE_FP8_ROWS16=1, h_q·s_q <= 32) against the CPU decode of the same
    bytes and float64 over the dequantised rows (it multiplies the fp8 values exactly: close, not the same bits)."""
    monkeypatch.setenv("MLA_CUDA_DECODE_FP8_ROWS16", "1")
    q, kv8, table, seqlens = fp8_paged([0, 100, 1025, 5, 300], page_size, h_q, s_q, seed=h_q * 11 + s_q)
    causal = s_q > 1
    want, want_lse = mla.decode_with_kvcache(q, kv8, table, seqlens, 512, causal=causal, is_fp8_kvcache=True)
    out, lse = mla.decode_with_kvcache(q.cuda(), kv8.cuda(), table.cuda(), seqlens.cuda(), 512, causal=causal,
                                       is_fp8_kvcache=True)
    assert rel_error(out.float().cpu().numpy(), want.float().numpy()) < 1e-2
    ref, _ = paged_reference(q, mla.dequantize_fp8_kvcache(kv8), table, seqlens, 512, 576**-0.5, causal)
    assert rel_error(out.float().cpu().numpy(), ref.numpy()) < 2e-2
    lse = lse.cpu()
    assert torch.equal(torch.isinf(lse), torch.isinf(want_lse))
    finite = ~torch.isinf(want_lse)
    torch.testing.assert_close(lse[finite], want_lse[finite], rtol=1e-3, atol=1e-3)


def test_decode_fp8_cuda_schedule_and_graph():
    """The planned fp8 decode (DecodeSchedule, CUDA graph) gives the bits of a plain fp8 call."""
    q, kv8, table, seqlens = fp8_paged([4096, 17, 1000, 64], 64, 128, 1, seed=5)
    q, kv8, table, seqlens = q.cuda(), kv8.cuda(), table.cuda(), seqlens.cuda()
    want, want_lse = mla.decode_with_kvcache(q, kv8, table, seqlens, 512, is_fp8_kvcache=True)
    sched = mla.DecodeSchedule()
    for _ in range(2):
        out, lse = mla.decode_with_kvcache(q, kv8, table, seqlens, 512, schedule=sched, is_fp8_kvcache=True)
        assert torch.equal(out, want) and torch.equal(lse, want_lse)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        gout, glse = mla.decode_with_kvcache(q, kv8, table, seqlens, 512, schedule=sched, is_fp8_kvcache=True)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(gout, want) and torch.equal(glse, want_lse)


def test_fp8_latent_cache_on_cuda_is_a_decode_kv_cache():
    """LatentCache(dtype="fp8", device="cuda") views as uint8 [num_pages, page_size, 1, 656] on the GPU; rows
    written into it decode as the same bytes do on the CPU."""
    q, kv8, table, seqlens = fp8_paged([70, 3], 16, 16, 1, seed=3)
    cache = mla.LatentCache(num_pages=kv8.shape[0], page_size=16, dtype="fp8", device="cuda")
    view = cache.kv_cache("torch")
    assert view.is_cuda and view.dtype == torch.uint8 and view.shape == kv8.shape
    assert (cache.row_bytes, cache.nbytes) == (656, kv8.numel())
    view.copy_(kv8.cuda())
    want, _ = mla.decode_with_kvcache(q, kv8, table, seqlens, 512, is_fp8_kvcache=True)
    out, _ = mla.decode_with_kvcache(q.cuda(), view, table.cuda(), seqlens.cuda(), 512, is_fp8_kvcache=True)
    assert rel_error(out.float().cpu().numpy(), want.float().numpy()) < 1e-2


def test_cuda_layer_with_fp8_cache_matches_cpu_reference():
    """The CUDA layer with cache_dtype="fp8" against the float64 goldens (the fp8-cache bound, 5e-2) and against the
    cpu-reference layer with an fp8 cache."""
    from conftest import GOLDEN_CASES, Golden

    for name in GOLDEN_CASES:
        g = Golden(name)
        outs = {}
        for device in ("cpu-reference", "cuda"):
            layer = mla.Attention.from_pretrained(g.dir, device=device, dtype="bf16", cache_dtype="fp8")
            cache = layer.make_cache(num_pages=64, page_size=16)
            assert cache.dtype == "fp8"
            seqs = [cache.add_sequence() for _ in range(g.hidden.shape[0])]
            hidden = torch.from_numpy(g.hidden)
            if device == "cuda":
                hidden = hidden.cuda()
            outs[device] = layer(hidden, cache, torch.from_numpy(g.positions), sequences=seqs).cpu().numpy()
        assert rel_error(outs["cuda"], g.output) < 5e-2, name
        assert rel_error(outs["cuda"], outs["cpu-reference"]) < 2e-2, name


@pytest.mark.parametrize("dtype, bound", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
@pytest.mark.parametrize("name", ["v3-tiny", "v2lite-tiny", "noyarn", "yarn-ramp", "long-positions"])
def test_module_trains_on_cuda_against_transformers_gradients(name, dtype, bound):
    """mla.nn.MultiheadLatentAttention on the GPU (path 'ops': cuBLAS projections around mla.prefill and
    mla.prefill_backward) against transformers' float64 autograd: output, input and every weight gradient."""
    from test_train import golden_module_errors

    errors = golden_module_errors(name, device="cuda", dtype=dtype)
    assert max(errors.values()) < bound, errors
