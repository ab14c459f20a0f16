"""The FP8 latent cache from Python (CPU): quantize_fp8_kvcache / dequantize_fp8_kvcache against the documented
fp8_ds_mla layout (decoded here independently with NumPy), LatentCache(dtype="fp8"), a layer with cache_dtype="fp8"
on cpu-reference against the goldens and against a bf16 cache, and decode_with_kvcache(..., is_fp8_kvcache=True)
(torch) against a bf16 decode over the dequantised rows, with every bad-argument error."""
import numpy as np
import pytest

import mla
from conftest import GOLDEN_DIR, Golden, rel_error

FP8_TOLERANCE = 5e-2  # relative error of an fp8-cache layer against the float64 goldens (tests/testing.hpp)


def bf16_round(x):
    """float32 -> nearest bf16 (ties to even), as float32. Finite inputs."""
    b = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32).astype(np.uint64)
    b = (b + 0x7FFF + ((b >> 16) & 1)) >> 16 << 16
    return b.astype(np.uint32).view(np.float32)


def e4m3_to_float(v):
    """OCP float8 e4m3fn bytes -> float32: bias 7, 3 mantissa bits, subnormals below exponent 1, 0x7f/0xff NaN."""
    v = np.asarray(v, dtype=np.uint8).astype(np.int32)
    sign = np.where(v & 0x80, -1.0, 1.0)
    e, m = (v >> 3) & 0xF, v & 7
    mag = np.where(e == 0, m / 8.0 * 2.0**-6, (1 + m / 8.0) * 2.0 ** (e - 7))
    mag = np.where((v & 0x7F) == 0x7F, np.nan, mag)
    return (sign * mag).astype(np.float32)


def decode_row_bytes(row, latent, rope):
    """One fp8_ds_mla row decoded from the layout table of docs/mla.md: [latent e4m3, padded to 16 B]
    [ceil(latent/128) fp32 scales] [rope bf16] [zero padding to 16 B] -> (values, scales, padding)."""
    scale_off = (latent + 15) // 16 * 16
    groups = (latent + 127) // 128
    rope_off = scale_off + 4 * groups
    scales = row[scale_off:rope_off].view(np.float32)
    lat = bf16_round(e4m3_to_float(row[:latent]) * np.repeat(scales, 128)[:latent])
    rope_vals = (row[rope_off : rope_off + 2 * rope].view(np.uint16).astype(np.uint32) << 16).view(np.float32)
    padding = np.concatenate([row[latent:scale_off], row[rope_off + 2 * rope :]])
    return np.concatenate([lat, rope_vals]), scales, padding


def group_scaled_rows(rng, n, latent, rope):
    """Rows whose 128-groups have very different magnitudes, one all-zero group and exact e4m3 maxima."""
    rows = rng.standard_normal((n, latent + rope)).astype(np.float32)
    for g in range(0, latent, 128):
        rows[:, g : g + 128] *= np.float32(10.0 ** rng.integers(-6, 4))
    rows[0, :128] = 0
    rows[1, 5] = 1e4  # one outlier: the rest of its group loses precision, not the other groups
    return rows


@pytest.mark.parametrize("latent, rope", [(512, 64), (64, 32), (80, 64), (200, 0)])
def test_quantize_round_trip_and_layout(latent, rope):
    rng = np.random.default_rng(latent + rope)
    rows = group_scaled_rows(rng, 12, latent, rope)
    q = mla.quantize_fp8_kvcache(rows.reshape(3, 4, 1, -1), head_dim_v=latent)
    nbytes = mla._mla.fp8_row_bytes(latent + rope, latent)
    assert q.dtype == np.uint8 and q.shape == (3, 4, 1, nbytes) and nbytes % 16 == 0
    if (latent, rope) == (512, 64):
        assert nbytes == 656
    back = mla.dequantize_fp8_kvcache(q, head_dim=latent + rope, head_dim_v=latent)
    assert back.dtype == np.float32 and back.shape == (3, 4, 1, latent + rope)
    back, q = back.reshape(12, -1), q.reshape(12, -1)
    for r in range(12):
        values, scales, padding = decode_row_bytes(q[r], latent, rope)
        np.testing.assert_array_equal(values, back[r])  # the library's bytes mean what docs/mla.md says
        assert not padding.any()
        for g in range(len(scales)):
            group = rows[r, 128 * g : min(latent, 128 * g + 128)]
            amax = np.float32(np.abs(group).max())
            assert scales[g] == amax / np.float32(448)  # scale = amax / 448 in fp32
            err = np.abs(back[r, 128 * g : 128 * g + len(group)] - group)
            # e4m3 keeps 3 mantissa bits: within 1/16 of a value relative (and 2^-10 scale for subnormals), plus bf16.
            assert np.all(err <= np.abs(group) * (2.0**-4 + 2.0**-8) + scales[g] * 2.0**-9), (r, g)
    np.testing.assert_array_equal(back[:, latent:], bf16_round(rows[:, latent:]))  # rope: bf16, never quantised
    assert not back[0, :128].any()
    assert rel_error(back, rows) < 5e-2


def test_quantize_rounds_to_nearest_even():
    # A group with amax 448 has scale 1: values go to e4m3 as they are. Between 0.5 and 1 e4m3 steps by 1/16:
    # 0.53125 lies halfway between 0.5 (mantissa 0) and 0.5625 (mantissa 1) and goes to the even 0.5; 0.59375,
    # halfway between 0.5625 and 0.625 (mantissa 2), goes to 0.625.
    row = np.zeros(576, np.float32)
    row[0], row[1], row[2], row[3] = 448, 0.53125, 0.59375, -448
    back = mla.dequantize_fp8_kvcache(mla.quantize_fp8_kvcache(row))
    assert list(back[:4]) == [448, 0.5, 0.625, -448]
    q = mla.quantize_fp8_kvcache(row)
    assert q[0] == 0x7E and q[3] == 0xFE  # +-448, the largest finite e4m3fn (0x7f is NaN)


def test_quantize_torch_in_torch_out():
    torch = pytest.importorskip("torch")
    rows = torch.randn(2, 8, 1, 576, generator=torch.Generator().manual_seed(1))
    q = mla.quantize_fp8_kvcache(rows)
    assert isinstance(q, torch.Tensor) and q.dtype == torch.uint8 and q.shape == (2, 8, 1, 656)
    np.testing.assert_array_equal(q.numpy(), mla.quantize_fp8_kvcache(rows.numpy()))
    np.testing.assert_array_equal(mla.quantize_fp8_kvcache(rows.bfloat16()).numpy(),
                                  mla.quantize_fp8_kvcache(rows.bfloat16().float().numpy()))
    back = mla.dequantize_fp8_kvcache(q)
    assert isinstance(back, torch.Tensor) and back.dtype == torch.float32 and back.shape == (2, 8, 1, 576)
    assert torch.equal(back.bfloat16().float(), back)  # every dequantised value is a bf16
    if hasattr(torch, "float8_e4m3fn"):  # FlashMLA's quantiser hands the rows over in this dtype
        assert torch.equal(mla.dequantize_fp8_kvcache(q.view(torch.float8_e4m3fn)), back)


@pytest.mark.parametrize("call, error, message", [
    (lambda: mla.quantize_fp8_kvcache(np.zeros((2, 576), np.int32)), TypeError, "rows must hold floats, got int32"),
    (lambda: mla.quantize_fp8_kvcache(np.zeros((2, 576), np.float32), head_dim_v=0), ValueError,
     "head_dim_v must be in [1, head_dim = 576]"),
    (lambda: mla.quantize_fp8_kvcache(np.zeros((2, 576), np.float32), head_dim_v=577), ValueError,
     "head_dim_v must be in [1, head_dim = 576]"),
    (lambda: mla.quantize_fp8_kvcache(np.float32(1)), ValueError, "at least one dim"),
    (lambda: mla.dequantize_fp8_kvcache(np.zeros((2, 656), np.float32)), TypeError,
     "kv_cache must be uint8 (fp8_ds_mla rows), got float32"),
    (lambda: mla.dequantize_fp8_kvcache(np.zeros((2, 1152), np.uint8)), ValueError,
     "kv_cache's last dim must be 656, the bytes of one fp8_ds_mla row of head_dim 576 with head_dim_v 512, got shape "
     "[2, 1152]"),
    (lambda: mla.dequantize_fp8_kvcache(np.zeros((2, 656), np.uint8), head_dim=576, head_dim_v=600), ValueError,
     "head_dim_v must be in [1, head_dim = 576]"),
])
def test_quantize_errors(call, error, message):
    with pytest.raises(error) as e:
        call()
    assert message in str(e.value)


# ---- LatentCache and the layer ----


def test_latent_cache_fp8_bytes():
    c = mla.LatentCache(num_pages=4, page_size=16, dtype="fp8")
    assert (c.dtype, c.row_width, c.rope_width, c.row_bytes, c.page_bytes, c.nbytes) == (
        "fp8", 576, 64, 656, 16 * 656, 4 * 16 * 656)
    kv = c.kv_cache()
    assert kv.dtype == np.uint8 and kv.shape == (4, 16, 1, 656)
    assert "dtype='fp8'" in repr(c)
    b = mla.LatentCache(num_pages=4, page_size=16, dtype="bf16")
    f = mla.LatentCache(num_pages=4, page_size=16, dtype="f32")
    assert (b.row_bytes, f.row_bytes, b.rope_width, b.nbytes) == (1152, 2304, 0, 4 * 16 * 1152)
    small = mla.LatentCache(num_pages=1, page_size=1, row_width=96, rope_width=32, dtype="fp8")
    assert small.row_bytes == 144 == mla._mla.fp8_row_bytes(96, 64)
    with pytest.raises(ValueError, match="dtype must be 'bf16', 'f32' or 'fp8', got 'fp16'"):
        mla.LatentCache(num_pages=1, dtype="fp16")
    with pytest.raises(ValueError, match="rope_width"):
        mla.LatentCache(num_pages=1, row_width=64, rope_width=64, dtype="fp8")


def test_latent_cache_fp8_torch_view():
    torch = pytest.importorskip("torch")
    c = mla.LatentCache(num_pages=2, page_size=4, dtype="fp8")
    kv = c.kv_cache("torch")
    assert kv.dtype == torch.uint8 and kv.shape == (2, 4, 1, 656)


def golden_layer(name, cache_dtype, device="cpu-reference"):
    return mla.Attention.from_pretrained(GOLDEN_DIR / name, device=device, dtype="bf16", cache_dtype=cache_dtype)


@pytest.mark.parametrize("name", ["v3-tiny", "v2lite-tiny"])
def test_layer_with_fp8_cache_on_goldens(name):
    g = Golden(name)
    fp8 = golden_layer(name, "fp8")
    bf16 = golden_layer(name, "auto")
    assert (fp8.cache_dtype, bf16.cache_dtype) == ("fp8", "auto") and "cache_dtype='fp8'" in repr(fp8)
    for kw in [{}, {"chunk": 5}, {"decode_after": 3, "page_size": 1}]:
        out, latent = mla.run_sequences(fp8, g.hidden, g.positions, **kw)
        out16, latent16 = mla.run_sequences(bf16, g.hidden, g.positions, **kw)
        assert rel_error(out, g.output) < FP8_TOLERANCE, kw
        assert rel_error(latent, g.latent) < FP8_TOLERANCE, kw
        # Quantising moves the rows by about 2% and the outputs by about 3%; the bf16 cache stays within bf16.
        assert rel_error(latent, latent16) > 1e-3
        assert rel_error(out, out16) < FP8_TOLERANCE


def test_fp8_layer_cache_holds_the_documented_bytes():
    """The rows a layer stores in an fp8 cache are the bytes quantize_fp8_kvcache describes: read() (the library's
    load_row) and dequantize_fp8_kvcache over the page pool agree, row for row."""
    g = Golden("v3-tiny")
    layer = golden_layer("v3-tiny", "fp8")
    cache = layer.make_cache(num_pages=16, page_size=4, page_order_seed=3)
    assert (cache.dtype, cache.row_bytes) == ("fp8", 224)
    s = cache.add_sequence()
    layer(g.hidden[0], cache, g.positions[0], sequences=s)
    rows = cache.read(s)
    kv = cache.kv_cache()
    assert kv.shape == (16, 4, 1, 224)
    table = cache.block_table(s)
    t = np.arange(cache.length(s))
    stored = kv[table[t // 4], t % 4, 0]
    np.testing.assert_array_equal(mla.dequantize_fp8_kvcache(stored, head_dim=144, head_dim_v=80), rows)
    assert rel_error(rows, g.latent[0]) < FP8_TOLERANCE


def test_layer_cache_dtype_errors():
    with pytest.raises(ValueError, match="cache_dtype fp8 needs precision bf16, got f32"):
        mla.Attention.from_pretrained(GOLDEN_DIR / "v3-tiny", dtype="f32", cache_dtype="fp8")
    with pytest.raises(ValueError, match="cache_dtype must be 'auto' or 'fp8', got 'bf16'"):
        mla.Attention.from_pretrained(GOLDEN_DIR / "v3-tiny", cache_dtype="bf16")
    layer = golden_layer("v3-tiny", "fp8")
    bf16_cache = golden_layer("v3-tiny", "auto").make_cache(num_pages=4, page_size=16)
    s = bf16_cache.add_sequence()
    with pytest.raises(ValueError, match="fp8"):
        layer(np.zeros((1, 256), np.float32), bf16_cache, sequences=s)
    assert bf16_cache.length(s) == 0


# ---- decode_with_kvcache(..., is_fp8_kvcache=True) ----


def fp8_decode_inputs(torch, lengths, page_size, h_q, s_q, seed):
    from test_torch import paged_tensors

    rows, table, seqlens = paged_tensors(lengths, page_size, 576, torch.float32, seed=seed)  # NaN in unused slots
    kv8 = mla.quantize_fp8_kvcache(rows)
    q = (torch.rand(len(lengths), s_q, h_q, 576, generator=torch.Generator().manual_seed(seed)) * 2 - 1).bfloat16()
    return q, rows, kv8, table, seqlens


@pytest.mark.parametrize("h_q, s_q, page_size", [(128, 1, 64), (16, 2, 1), (3, 4, 256), (1, 1, 16)])
def test_decode_fp8_equals_bf16_decode_over_dequantised_rows(h_q, s_q, page_size):
    torch = pytest.importorskip("torch")
    from test_torch import paged_reference

    q, rows, kv8, table, seqlens = fp8_decode_inputs(torch, [0, 100, 257, 5], page_size, h_q, s_q, h_q + s_q)
    assert kv8.shape == (rows.shape[0], page_size, 1, 656) and kv8.dtype == torch.uint8
    causal = s_q > 1
    out8, lse8 = mla.decode_with_kvcache(q, kv8, table, seqlens, 512, causal=causal, is_fp8_kvcache=True)
    assert out8.dtype == torch.bfloat16 and out8.shape == (4, s_q, h_q, 512) and lse8.shape == (4, h_q, s_q)
    deq = mla.dequantize_fp8_kvcache(kv8).bfloat16()  # exact: every dequantised value is a bf16
    out16, lse16 = mla.decode_with_kvcache(q, deq, table, seqlens, 512, causal=causal)
    # The CPU decode dequantises to the same bf16 values and then runs the bf16 kernel: the same bits.
    assert torch.equal(out8, out16)
    assert torch.equal(lse8, lse16)
    want, _ = paged_reference(q, deq.float(), table, seqlens, 512, 576**-0.5, causal)
    assert rel_error(out8.float().numpy(), want.numpy()) < 2e-2
    # Against the unquantised rows: the fp8 rounding itself (a few 1e-2 on uniform random rows).
    exact, _ = paged_reference(q, rows, table, seqlens, 512, 576**-0.5, causal)
    assert rel_error(out8.float().numpy(), exact.numpy()) < 5e-2
    if hasattr(torch, "float8_e4m3fn"):
        out_f8, _ = mla.decode_with_kvcache(q, kv8.view(torch.float8_e4m3fn), table, seqlens, 512, causal=causal,
                                            is_fp8_kvcache=True)
        assert torch.equal(out_f8, out8)


def test_decode_fp8_over_a_layers_cache():
    """A layer's fp8 cache, viewed without a copy, is the kv_cache of an is_fp8_kvcache decode."""
    torch = pytest.importorskip("torch")
    from test_ops import reference_decode

    g = Golden("v3-tiny")
    layer = golden_layer("v3-tiny", "fp8")
    cache = layer.make_cache(num_pages=8, page_size=16, page_order_seed=5)
    seqs = [cache.add_sequence() for _ in range(2)]
    layer(g.hidden, cache, g.positions, sequences=seqs)
    cache.fill_unused(np.nan)
    kv = cache.kv_cache("torch")
    q = (torch.rand(2, 1, 4, 144, generator=torch.Generator().manual_seed(2)) * 2 - 1).bfloat16()
    out, _ = mla.decode_with_kvcache(q, kv, torch.from_numpy(cache.block_tables(seqs)),
                                     torch.from_numpy(cache.lengths(seqs)), 80, is_fp8_kvcache=True)
    want, _ = reference_decode(q.float().numpy(), [cache.read(s) for s in seqs], 80, 144**-0.5, False)
    assert rel_error(out.float().numpy(), want) < 2e-2


def test_decode_fp8_errors():
    torch = pytest.importorskip("torch")
    q, rows, kv8, table, seqlens = fp8_decode_inputs(torch, [5, 8], 4, 3, 1, 7)

    def call(**change):
        args = dict(q=q, kv_cache=kv8, block_table=table, cache_seqlens=seqlens, head_dim_v=512, is_fp8_kvcache=True)
        args.update(change)
        return mla.decode_with_kvcache(**args)

    call()
    cases = [
        (dict(kv_cache=rows.bfloat16()), TypeError,
         "decode_with_kvcache: kv_cache must be uint8 with is_fp8_kvcache=True (fp8_ds_mla rows), got bfloat16"),
        (dict(kv_cache=kv8[..., :576].contiguous()), ValueError,
         "decode_with_kvcache: kv_cache.shape[3] (bytes of one fp8_ds_mla row of head_dim 576, head_dim_v 512) must "
         "be 656, got shape"),
        (dict(kv_cache=kv8[:, :, 0].contiguous()), ValueError, "kv_cache must be 4-D"),
        (dict(kv_cache=kv8.repeat(1, 1, 2, 1)), ValueError, "KV heads"),
        (dict(q=q.float()), TypeError, "is_fp8_kvcache=True needs q in bfloat16 (the fp8 rows are read as bf16 "
                                       "values), got float32"),
        (dict(head_dim_v=576), ValueError, "kv_cache.shape[3] (bytes of one fp8_ds_mla row of head_dim 576, "
                                           "head_dim_v 576) must be 608"),
        (dict(is_fp8_kvcache=False), TypeError, "kv_cache must be float32, float16 or bfloat16, got uint8"),
        (dict(q=q.float().numpy(), kv_cache=kv8.numpy(), block_table=table.numpy(), cache_seqlens=seqlens.numpy()),
         TypeError, "is_fp8_kvcache=True needs q in bfloat16, which NumPy has no dtype for"),
    ]
    for change, error, message in cases:
        with pytest.raises(error) as e:
            call(**change)
        assert message in str(e.value), (change.keys(), str(e.value))


def test_decode_fp8_torch_op_and_compile():
    torch = pytest.importorskip("torch")
    from mla import _torch_ops

    if not _torch_ops.registered:
        pytest.skip("torch < 2.4: no custom ops")
    q, rows, kv8, table, seqlens = fp8_decode_inputs(torch, [3, 40], 16, 4, 1, 11)
    args = (q, kv8, table, seqlens, 512, 576**-0.5, False, True)
    torch.library.opcheck(torch.ops.mla.decode_with_kvcache.default, args)
    eager, _ = torch.ops.mla.decode_with_kvcache(*args)
    # The operator's old seven-argument form still works (is_fp8_kvcache defaults to False).
    bf16, _ = torch.ops.mla.decode_with_kvcache(q, mla.dequantize_fp8_kvcache(kv8).bfloat16(), table, seqlens, 512,
                                                576**-0.5, False)
    assert torch.equal(eager, bf16)

    @torch.compile(fullgraph=True, backend="eager")
    def step(q, kv, table, seqlens):
        return mla.decode_with_kvcache(q, kv, table, seqlens, 512, is_fp8_kvcache=True)[0]

    assert torch.equal(step(q, kv8, table, seqlens), eager)
