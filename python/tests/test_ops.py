"""mla.decode_with_kvcache and mla.prefill against plain NumPy loops (float64), NumPy only."""
import numpy as np
import pytest

import mla
from conftest import rel_error

RNG = np.random.default_rng(0)


def paged_inputs(rng, lengths, page_size, head_dim, dtype, extra_pages=3):
    """A NaN-poisoned page pool holding each sequence's rows on randomly permuted pages, and its tables."""
    b = len(lengths)
    pages_per = [-(-n // page_size) for n in lengths]
    num_pages = sum(pages_per) + extra_pages
    order = rng.permutation(num_pages).astype(np.int32)
    max_pages = max(pages_per + [1]) + 1
    block_table = np.full((b, max_pages), -1, dtype=np.int32)  # unused entries are invalid on purpose
    kv = np.full((num_pages, page_size, 1, head_dim), np.nan, dtype=dtype)
    rows = []
    nxt = 0
    for i, n in enumerate(lengths):
        block_table[i, : pages_per[i]] = order[nxt : nxt + pages_per[i]]
        nxt += pages_per[i]
        r = rng.uniform(-1, 1, (n, head_dim)).astype(dtype)
        for t in range(n):
            kv[block_table[i, t // page_size], t % page_size, 0] = r[t]
        rows.append(r)
    return kv, block_table, np.array(lengths, dtype=np.int32), rows


def reference_decode(q, rows, dv, scale, causal):
    b, s_q, h_q, _ = q.shape
    out = np.zeros((b, s_q, h_q, dv))
    lse = np.full((b, h_q, s_q), np.inf)
    for i in range(b):
        keys = rows[i].astype(np.float64)
        for j in range(s_q):
            visible = len(keys) - (s_q - 1 - j) if causal else len(keys)
            if visible <= 0:
                continue
            s = scale * q[i, j].astype(np.float64) @ keys[:visible].T  # [h_q, visible]
            m = s.max(axis=-1, keepdims=True)
            p = np.exp(s - m)
            out[i, j] = (p @ keys[:visible, :dv]) / p.sum(-1, keepdims=True)
            lse[i, :, j] = m[:, 0] + np.log(p.sum(-1))
    return out, lse


def check_lse(lse, want):
    assert lse.dtype == np.float32
    inf = np.isinf(want)
    assert np.array_equal(np.isinf(lse), inf) and np.all(lse[inf] > 0)
    np.testing.assert_allclose(lse[~inf], want[~inf], rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("h_q", [1, 3, 16, 128])
@pytest.mark.parametrize("s_q", [1, 2, 4])
@pytest.mark.parametrize("page_size", [1, 16, 64, 256])
def test_decode_matches_numpy(h_q, s_q, page_size):
    rng = np.random.default_rng(h_q * 100 + s_q * 10 + page_size)
    causal = bool((h_q + s_q + page_size) % 2)
    lengths = [0, int(rng.integers(1, 300)), page_size + 1, 3]
    kv, table, seqlens, rows = paged_inputs(rng, lengths, page_size, 576, np.float32)
    q = rng.uniform(-1, 1, (len(lengths), s_q, h_q, 576)).astype(np.float32)
    out, lse = mla.decode_with_kvcache(q, kv, table, seqlens, 512, softmax_scale=0.12, causal=causal)
    assert out.shape == (len(lengths), s_q, h_q, 512) and out.dtype == np.float32
    assert lse.shape == (len(lengths), h_q, s_q)
    want, want_lse = reference_decode(q, rows, 512, 0.12, causal)
    assert rel_error(out, want) < 2e-6
    assert np.all(out[0] == 0)  # the empty sequence
    check_lse(lse, want_lse)


def test_decode_float16_and_default_scale():
    rng = np.random.default_rng(1)
    kv, table, seqlens, rows = paged_inputs(rng, [70, 0, 129], 64, 576, np.float16)
    q = rng.uniform(-1, 1, (3, 2, 16, 576)).astype(np.float16)
    out, lse = mla.decode_with_kvcache(q, kv, table, seqlens, 512, causal=True)
    assert out.dtype == np.float16
    want, want_lse = reference_decode(q, rows, 512, 576**-0.5, True)  # FlashMLA's default scale
    assert rel_error(out, want) < 1e-3
    check_lse(lse, want_lse)


def test_decode_small_head_dims_and_read_only_inputs():
    rng = np.random.default_rng(2)
    kv, table, seqlens, rows = paged_inputs(rng, [5, 17], 4, 72, np.float32)
    q = rng.uniform(-1, 1, (2, 3, 5, 72)).astype(np.float32)
    for a in (q, kv, table, seqlens):
        a.setflags(write=False)
    out, lse = mla.decode_with_kvcache(q, kv, table, seqlens, 40, softmax_scale=0.3, causal=True)
    want, want_lse = reference_decode(q, rows, 40, 0.3, True)
    assert rel_error(out, want) < 2e-6
    check_lse(lse, want_lse)


def test_decode_non_contiguous_inputs_are_accepted():
    rng = np.random.default_rng(3)
    kv, table, seqlens, rows = paged_inputs(rng, [9], 8, 64, np.float32)
    q_big = rng.uniform(-1, 1, (1, 1, 8, 128)).astype(np.float32)
    q = q_big[..., ::2]  # strided view: copied once by the wrapper
    out, _ = mla.decode_with_kvcache(q, kv, table, seqlens, 32, softmax_scale=0.2)
    want, _ = reference_decode(np.ascontiguousarray(q), rows, 32, 0.2, False)
    assert rel_error(out, want) < 2e-6


def reference_prefill(q, k, v, cu_q, cu_k, scale, causal):
    tq, H, _ = q.shape
    out = np.zeros((tq, H, v.shape[2]))
    lse = np.full((H, tq), np.inf)
    for b in range(len(cu_q) - 1):
        nq, nk = cu_q[b + 1] - cu_q[b], cu_k[b + 1] - cu_k[b]
        for i in range(nq):
            visible = min(nk, nk - nq + i + 1) if causal else nk
            if visible <= 0:
                continue
            qi = q[cu_q[b] + i].astype(np.float64)  # [H, d]
            ks = k[cu_k[b] : cu_k[b] + visible].astype(np.float64)  # [visible, H, d]
            vs = v[cu_k[b] : cu_k[b] + visible].astype(np.float64)
            s = scale * np.einsum("hd,thd->ht", qi, ks)
            m = s.max(-1, keepdims=True)
            p = np.exp(s - m)
            out[cu_q[b] + i] = np.einsum("ht,thd->hd", p, vs) / p.sum(-1, keepdims=True)
            lse[:, cu_q[b] + i] = m[:, 0] + np.log(p.sum(-1))
    return out, lse


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
@pytest.mark.parametrize("heads", [1, 3, 16])
def test_prefill_matches_numpy(causal, dtype, heads):
    rng = np.random.default_rng(heads)
    n_k = [130, 7, 0, 64]
    n_q = [130, 3, 2, 1]  # self-attention, a chunk after a prefix, queries with no key, one decode step
    cu_q = np.concatenate([[0], np.cumsum(n_q)]).astype(np.int32)
    cu_k = np.concatenate([[0], np.cumsum(n_k)]).astype(np.int32)
    q = rng.uniform(-1, 1, (cu_q[-1], heads, 192)).astype(dtype)
    k = rng.uniform(-1, 1, (cu_k[-1], heads, 192)).astype(dtype)
    v = rng.uniform(-1, 1, (cu_k[-1], heads, 128)).astype(dtype)
    out, lse = mla.prefill(q, k, v, cu_q, cu_k, softmax_scale=0.1, causal=causal)
    assert out.shape == (cu_q[-1], heads, 128) and out.dtype == dtype and lse.shape == (heads, cu_q[-1])
    want, want_lse = reference_prefill(q, k, v, cu_q, cu_k, 0.1, causal)
    assert rel_error(out, want) < (2e-6 if dtype == np.float32 else 1e-3)
    check_lse(lse, want_lse)


@pytest.mark.parametrize("dtype", ["f32", "bf16"])
def test_decode_over_a_layers_cache(dtype):
    """The layer's cache, viewed without a copy, is a valid FlashMLA-layout kv_cache for decode_with_kvcache."""
    layer = mla.Attention.random(mla.Config.preset("v2-lite"), seed=1, dtype=dtype)
    cache = layer.make_cache(num_pages=16, page_size=16, page_order_seed=9)
    seqs = [cache.add_sequence() for _ in range(3)]
    rng = np.random.default_rng(4)
    for n, s in zip([40, 0, 17], seqs):
        if n:
            layer(rng.standard_normal((n, 2048)).astype(np.float32), cache, sequences=s)
    cache.fill_unused(np.nan)
    kv = cache.kv_cache()
    assert kv.shape == (16, 16, 1, 576)
    rows = [cache.read(s) for s in seqs]
    q = rng.uniform(-1, 1, (3, 1, 16, 576)).astype(np.float32)
    if dtype == "f32":
        out, lse = mla.decode_with_kvcache(q, kv, cache.block_tables(seqs), cache.lengths(seqs), 512)
        want, want_lse = reference_decode(q, rows, 512, 576**-0.5, False)
        assert rel_error(out, want) < 2e-6
        check_lse(lse, want_lse)
    else:
        assert kv.dtype == np.uint16  # bf16 bit patterns: NumPy has no bfloat16
        as_f32 = (kv.astype(np.uint32) << 16).view(np.float32)
        for s, r in zip(seqs, rows):
            t = cache.block_table(s)
            for i in range(len(r)):
                np.testing.assert_array_equal(as_f32[t[i // 16], i % 16, 0], r[i])


# ---- errors ----


def small_decode_args():
    rng = np.random.default_rng(5)
    kv, table, seqlens, _ = paged_inputs(rng, [5, 8], 4, 16, np.float32)
    q = rng.uniform(-1, 1, (2, 1, 3, 16)).astype(np.float32)
    return dict(q=q, kv_cache=kv, block_table=table, cache_seqlens=seqlens, head_dim_v=8)


@pytest.mark.parametrize("change, error, message", [
    (lambda a: a.update(q=a["q"][0]), ValueError, "q must be 4-D"),
    (lambda a: a.update(q=a["q"].astype(np.float64)), TypeError, "q must be float32, float16 or bfloat16, got float64"),
    (lambda a: a.update(kv_cache=a["kv_cache"].astype(np.float16)), TypeError, "kv_cache must have q's dtype"),
    (lambda a: a.update(block_table=a["block_table"].astype(np.int64)), TypeError, "block_table must be int32"),
    (lambda a: a.update(cache_seqlens=a["cache_seqlens"].astype(np.float32)), TypeError, "cache_seqlens must be int32"),
    (lambda a: a.update(kv_cache=a["kv_cache"][:, :, 0]), ValueError, "kv_cache must be 4-D"),
    (lambda a: a.update(kv_cache=np.repeat(a["kv_cache"], 2, axis=2)), ValueError, "KV heads"),
    (lambda a: a.update(kv_cache=a["kv_cache"][..., :8]), ValueError, "head_dim, as q"),
    (lambda a: a.update(kv_cache=np.ascontiguousarray(a["kv_cache"][:, :3])), ValueError, "page_size must be a power of two, got 3"),
    (lambda a: a.update(block_table=a["block_table"][:1]), ValueError, "block_table.shape[0] (batch, as q) must be 2"),
    (lambda a: a.update(head_dim_v=17), ValueError, "head_dim_v must be <= head_dim = 16"),
    (lambda a: a.update(head_dim_v=0), ValueError, "head_dim_v must be in [1, "),
    (lambda a: a["cache_seqlens"].__setitem__(1, 99), ValueError, "cache_seqlens[1] must be in [0, max_pages * page_size"),
    (lambda a: a["block_table"].__setitem__((1, 0), 50), ValueError, "block_table[1, 0] must be a page index"),
    (lambda a: a.update(softmax_scale=float("nan")), ValueError, "softmax_scale"),
    (lambda a: a.update(block_table=__import__("array").array("i", [0])), ValueError, "block_table must be 2-D"),
])
def test_decode_errors(change, error, message):
    args = small_decode_args()
    change(args)
    with pytest.raises(error) as e:
        mla.decode_with_kvcache(**args)
    assert message in str(e.value)


def test_decode_error_names_the_batch_index():
    args = small_decode_args()
    args["block_table"][1, 1] = -3
    with pytest.raises(ValueError, match=r"block_table\[1, 1\].*got -3 \(batch index 1"):
        mla.decode_with_kvcache(**args)


def test_prefill_errors():
    q = np.zeros((5, 2, 8), np.float32)
    k = np.zeros((7, 2, 8), np.float32)
    v = np.zeros((7, 2, 4), np.float32)
    cu_q, cu_k = np.array([0, 2, 5], np.int32), np.array([0, 3, 7], np.int32)
    mla.prefill(q, k, v, cu_q, cu_k)
    with pytest.raises(ValueError, match=r"cu_seqlens_q\[batch\] must equal total_q = 5, got 4"):
        mla.prefill(q, k, v, np.array([0, 2, 4], np.int32), cu_k)
    with pytest.raises(ValueError, match="non-decreasing"):
        mla.prefill(q, k, v, cu_q, np.array([0, 8, 7], np.int32))
    with pytest.raises(TypeError, match="cu_seqlens_q must be int32"):
        mla.prefill(q, k, v, cu_q.astype(np.int64), cu_k)
    with pytest.raises(TypeError, match="share one dtype"):
        mla.prefill(q, k.astype(np.float16), v, cu_q, cu_k)
    with pytest.raises(ValueError, match=r"k.shape\[1\] \(num_heads, as q\) must be 2"):
        mla.prefill(q, np.zeros((7, 3, 8), np.float32), v, cu_q, cu_k)
    with pytest.raises(ValueError, match="must both have batch \\+ 1 >= 2 entries"):
        mla.prefill(q, k, v, np.array([5], np.int32), np.array([7], np.int32))


def reference_prefill_backward(q, k, v, d_out, cu_q, cu_k, scale, causal):
    """The gradients of sum(out * d_out) in float64, one (sequence, query) at a time, over every head at once."""
    d_q, d_k, d_v = (np.zeros(a.shape) for a in (q, k, v))
    for b in range(len(cu_q) - 1):
        nq, nk = cu_q[b + 1] - cu_q[b], cu_k[b + 1] - cu_k[b]
        for i in range(nq):
            visible = min(nk, nk - nq + i + 1) if causal else nk
            if visible <= 0:
                continue
            t0, qi, g = cu_k[b], q[cu_q[b] + i].astype(np.float64), d_out[cu_q[b] + i].astype(np.float64)
            ks = k[t0 : t0 + visible].astype(np.float64)  # [visible, H, d]
            vs = v[t0 : t0 + visible].astype(np.float64)
            s = scale * np.einsum("hd,thd->ht", qi, ks)
            p = np.exp(s - s.max(-1, keepdims=True))
            p /= p.sum(-1, keepdims=True)  # [H, visible]
            o = np.einsum("ht,thd->hd", p, vs)
            dp = np.einsum("hd,thd->ht", g, vs)
            ds = p * (dp - (g * o).sum(-1, keepdims=True))
            d_q[cu_q[b] + i] = scale * np.einsum("ht,thd->hd", ds, ks)
            d_k[t0 : t0 + visible] += scale * np.einsum("ht,hd->thd", ds, qi)
            d_v[t0 : t0 + visible] += np.einsum("ht,hd->thd", p, g)
    return d_q, d_k, d_v


def backward_inputs(rng, heads, dqk, dv, dtype=np.float32):
    n_q, n_k = [40, 3, 2, 0, 5], [40, 9, 0, 4, 3]  # self-attention, n_q < n_k, no keys, no queries, no key seen
    cu_q = np.concatenate([[0], np.cumsum(n_q)]).astype(np.int32)
    cu_k = np.concatenate([[0], np.cumsum(n_k)]).astype(np.int32)
    q = rng.uniform(-1, 1, (cu_q[-1], heads, dqk)).astype(dtype)
    k = rng.uniform(-1, 1, (cu_k[-1], heads, dqk)).astype(dtype)
    v = rng.uniform(-1, 1, (cu_k[-1], heads, dv)).astype(dtype)
    d_out = rng.uniform(-1, 1, (cu_q[-1], heads, dv)).astype(dtype)
    return q, k, v, d_out, cu_q, cu_k


@pytest.mark.parametrize("causal", [True, False])
def test_prefill_backward_matches_numpy(causal):
    q, k, v, d_out, cu_q, cu_k = backward_inputs(np.random.default_rng(5), 3, 24, 16)
    out, lse = mla.prefill(q, k, v, cu_q, cu_k, softmax_scale=0.2, causal=causal)
    grads = mla.prefill_backward(q, k, v, out, lse, d_out, cu_q, cu_k, softmax_scale=0.2, causal=causal)
    want = reference_prefill_backward(q, k, v, d_out, cu_q, cu_k, 0.2, causal)
    for got, w, a in zip(grads, want, (q, k, v)):
        assert got.shape == a.shape and got.dtype == np.float32
        assert rel_error(got, w) < 1e-5


def test_prefill_backward_errors():
    q, k, v, d_out, cu_q, cu_k = backward_inputs(np.random.default_rng(6), 2, 8, 4)
    out, lse = mla.prefill(q, k, v, cu_q, cu_k)
    with pytest.raises(ValueError, match="d_out"):
        mla.prefill_backward(q, k, v, out, lse, d_out[:-1], cu_q, cu_k)
    with pytest.raises(ValueError, match="lse"):
        mla.prefill_backward(q, k, v, out, lse.T.copy(), d_out, cu_q, cu_k)
    with pytest.raises(TypeError, match="d_out"):
        mla.prefill_backward(q, k, v, out, lse, d_out.astype(np.float64), cu_q, cu_k)
    with pytest.raises(ValueError, match="dtype"):
        mla.prefill_backward(*(a.astype(np.float16) for a in (q, k, v, out)), lse, d_out.astype(np.float16), cu_q,
                             cu_k)


@pytest.mark.parametrize("causal", [True, False])
def test_prefill_backward_matches_torch_autograd(causal):
    """Against torch autograd of a float64 eager attention on the CPU (torch tensors in, torch tensors out)."""
    torch = pytest.importorskip("torch")
    q, k, v, d_out, cu_q, cu_k = backward_inputs(np.random.default_rng(7), 2, 24, 16)
    tq, tk, tv, tg = (torch.from_numpy(a) for a in (q, k, v, d_out))
    tcq, tck = torch.from_numpy(cu_q), torch.from_numpy(cu_k)
    out, lse = mla.prefill(tq, tk, tv, tcq, tck, softmax_scale=0.2, causal=causal)
    d_q, d_k, d_v = mla.prefill_backward(tq, tk, tv, out, lse, tg, tcq, tck, softmax_scale=0.2, causal=causal)
    q64, k64, v64 = (t.double().requires_grad_() for t in (tq, tk, tv))
    outs = []
    for b in range(len(cu_q) - 1):
        nq, nk = int(cu_q[b + 1] - cu_q[b]), int(cu_k[b + 1] - cu_k[b])
        qs, ks, vs = q64[cu_q[b] : cu_q[b + 1]], k64[cu_k[b] : cu_k[b + 1]], v64[cu_k[b] : cu_k[b + 1]]
        s = 0.2 * torch.einsum("ihd,thd->hit", qs, ks)
        seen = torch.ones(nq, nk, dtype=torch.bool)
        if causal:
            seen = torch.arange(nk)[None, :] <= (nk - nq + torch.arange(nq))[:, None]
        # Masked logits at -1e30 give exactly 0 after the exp; rows that see no key end up all 0, never NaN.
        p = torch.softmax(s.masked_fill(~seen, -1e30), -1) * seen
        p = p / p.sum(-1, keepdim=True).clamp_min(1e-300)
        outs.append(torch.einsum("hit,thd->ihd", p, vs))
    (torch.cat(outs) * tg.double()).sum().backward()
    for got, want in ((d_q, q64.grad), (d_k, k64.grad), (d_v, v64.grad)):
        assert got.dtype == torch.float32
        assert (got.double() - want).abs().max().item() < 1e-5 * max(1.0, want.abs().max().item())
