"""Hostile inputs at run time: threads sharing a layer, oversized caches, token counts that overflow or point
past their arrays, empty sequences, hidden states that overflow the layer, degenerate head dims. Every error
case checks the exception type, that the message names the argument, and that the cache is as it was."""
import json
import threading
import time

import numpy as np
import pytest

import mla

SMALL = {
    "hidden_size": 64, "num_attention_heads": 2, "q_lora_rank": 32, "kv_lora_rank": 32, "qk_nope_head_dim": 16,
    "qk_rope_head_dim": 16, "v_head_dim": 16, "rms_norm_eps": 1e-6, "max_position_embeddings": 4096,
    "num_hidden_layers": 1, "attention_bias": False, "rope_theta": 10000.0,
}


def small_layer(dtype="f32", device="cpu", seed=3):
    config = mla.Config.from_json(json.dumps(SMALL))
    return mla.Attention(mla.LayerWeights.random(config, seed), device=device, dtype=dtype)


def snapshot(cache):
    """Everything a caller can see of a cache."""
    seqs = sorted(cache.sequences())
    return (cache.pages_free, seqs, [cache.length(s) for s in seqs], [cache.capacity(s) for s in seqs],
            [cache.block_table(s).tolist() for s in seqs], [cache.read(s).tobytes() for s in seqs])


@pytest.fixture
def filled():
    """A layer and a cache with sequence a holding 5 tokens and an empty sequence b."""
    layer = small_layer()
    cache = layer.make_cache(num_pages=8, page_size=4)
    a, b = cache.add_sequence(), cache.add_sequence()
    layer(np.random.default_rng(1).standard_normal((5, 64)).astype(np.float32), cache, sequences=a)
    return layer, cache, a, b


# ---- threads ----


def thread_calls(layer, who):
    """A thread's work in a cache of its own: a prefill then decode steps, two sequences; outputs, rows, paths."""
    rng = np.random.default_rng(100 + who)
    cache = layer.make_cache(num_pages=16, page_size=4, page_order_seed=1 + who)
    a, b = cache.add_sequence(), cache.add_sequence()
    outs, paths = [], []
    for n in (6, 1, 1, 3, 1):
        x = rng.standard_normal((2, n, 64)).astype(np.float32)
        outs.append(layer(x, cache, sequences=[a, b]))
        paths.append(layer.last_paths)
    return np.concatenate([o.reshape(-1) for o in outs]), np.concatenate([cache.read(a), cache.read(b)]), paths


@pytest.mark.parametrize("dtype", ["f32", "bf16"])
@pytest.mark.parametrize("device", ["cpu", "cpu-reference"])
def test_threads_share_a_layer(dtype, device):
    layer = small_layer(dtype, device)
    n = 4
    serial = [thread_calls(layer, t) for t in range(n)]
    assert not np.array_equal(serial[0][0], serial[1][0])  # the threads' work differs
    for _ in range(3):
        got = [None] * n
        errors = []
        start = threading.Barrier(n)

        def work(t):
            try:
                start.wait()
                got[t] = thread_calls(layer, t)
            except BaseException as e:  # noqa: BLE001 (reported below)
                errors.append(e)

        threads = [threading.Thread(target=work, args=(t,)) for t in range(n)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        assert not errors, errors
        for t in range(n):
            # Bit for bit: the same bytes as the serial run.
            assert got[t][0].tobytes() == serial[t][0].tobytes(), f"thread {t} outputs"
            assert got[t][1].tobytes() == serial[t][1].tobytes(), f"thread {t} cache rows"
            assert got[t][2] == serial[t][2], f"thread {t} paths"


def test_last_paths_are_the_calling_threads():
    layer = small_layer()
    seen = {}

    def work(name, tokens):
        # prefill: 60 tokens into an empty sequence (expanded); decode: one token after an 8-token prompt (absorbed)
        cache = layer.make_cache(num_pages=32, page_size=4)
        s = cache.add_sequence()
        if name == "decode":
            layer(np.ones((8, 64), np.float32), cache, sequences=s)
        x = np.ones((tokens, 64), np.float32)
        for _ in range(20):
            if name == "prefill":
                cache.truncate(s, 0)
            layer(x, cache, sequences=s)
            seen.setdefault(name, set()).add(tuple(layer.last_paths))

    threads = [threading.Thread(target=work, args=("prefill", 60)), threading.Thread(target=work, args=("decode", 1))]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert seen == {"prefill": {("expanded",)}, "decode": {("absorbed",)}}


# ---- the cache ----


def test_cache_size_overflow_is_refused():
    with pytest.raises(ValueError) as e:
        mla.LatentCache(2**26, 256, 2**28, "f32")  # wrapped to 0 bytes, then fill_unused wrote past it
    assert "num_pages (67108864)" in str(e.value) and "row_width (268435456)" in str(e.value)
    with pytest.raises(ValueError, match="limit"):
        mla.LatentCache(2**30, 256, 256, "f32")


def test_cache_larger_than_memory_is_memory_error():
    with pytest.raises(MemoryError, match=r"num_pages \(268435456\)"):
        mla.LatentCache(2**28, 256, 256, "f32")  # 64 TiB, below the cap: refused before allocating


# ---- token counts ----


def test_counts_checked_before_positions(filled):
    layer, cache, a, b = filled
    before = snapshot(cache)
    x = np.zeros((2, 64), np.float32)
    with pytest.raises(ValueError) as e:
        layer(x, cache, positions=np.array([1, 2]), sequences=[a, b], num_tokens=[1000000, -999998])
    assert "num_tokens[1]" in str(e.value) and "-999998" in str(e.value) and "negative" in str(e.value)
    assert snapshot(cache) == before


def test_counts_that_overflow(filled):
    layer, cache, a, b = filled
    c = cache.add_sequence()
    before = snapshot(cache)
    x = np.zeros((1, 64), np.float32)
    with pytest.raises(ValueError) as e:
        layer(x, cache, sequences=[a, b, c], num_tokens=[2**63 - 1, 2**63 - 1, 3])
    assert "num_tokens" in str(e.value) and "2^63-1" in str(e.value)
    assert "_M_default_append" not in str(e.value)
    assert snapshot(cache) == before


# ---- run_sequences ----


def test_run_sequences_refuses_empty_sequences():
    layer = small_layer()
    start = time.monotonic()
    with pytest.raises(ValueError, match=r"tokens \(hidden_states.shape\[1\]\) must be at least 1, got 0"):
        mla.run_sequences(layer, np.zeros((150000, 0, 64), np.float32))
    assert time.monotonic() - start < 2.0  # was a 2.4 GB cache and 43 s
    with pytest.raises(ValueError, match=r"batch \(hidden_states.shape\[0\]\) must be at least 1, got 0"):
        mla.run_sequences(layer, np.zeros((0, 3, 64), np.float32))


# ---- hidden states that overflow the layer ----


@pytest.mark.parametrize("dtype", ["f32", "bf16"])
def test_huge_finite_hidden_is_refused(dtype):
    layer = small_layer(dtype)
    cache = layer.make_cache(num_pages=8, page_size=4)
    a, b = cache.add_sequence(), cache.add_sequence()
    rng = np.random.default_rng(2)
    layer(rng.standard_normal((3, 64)).astype(np.float32), cache, sequences=a)
    before = snapshot(cache)
    x = rng.standard_normal((2, 4, 64)).astype(np.float32)
    x[1, 2] = 3e38  # sequence b, token 2: finite, but it overflows the projections
    with pytest.raises(ValueError) as e:
        layer(x, cache, sequences=[a, b])
    assert f"sequence {b}" in str(e.value) and "token 2" in str(e.value) and "not finite" in str(e.value)
    assert snapshot(cache) == before
    for s in (a, b):
        assert np.isfinite(cache.read(s)).all()
    x[1, 2] = 0.5
    y = layer(x, cache, sequences=[a, b])
    assert np.isfinite(y).all() and cache.length(b) == 4


def test_run_sequences_huge_finite_hidden():
    layer = small_layer()
    x = np.random.default_rng(4).standard_normal((2, 3, 64)).astype(np.float32)
    x[0, 1] = 3e38
    with pytest.raises(ValueError, match="sequence 0.*not finite"):
        mla.run_sequences(layer, x)


# ---- kernel functions: degenerate head dims ----


def test_decode_head_dim_zero_is_value_error():
    q = np.zeros((1, 1, 2, 0), np.float32)
    kv = np.zeros((1, 4, 1, 0), np.float32)
    with pytest.raises(ValueError, match="head_dim"):
        mla.decode_with_kvcache(q, kv, np.zeros((1, 1), np.int32), np.array([1], np.int32), head_dim_v=0)


def test_decode_huge_head_dim_v_is_refused_before_allocating():
    q = np.zeros((1, 1, 2, 16), np.float32)
    kv = np.zeros((1, 4, 1, 16), np.float32)
    args = (q, kv, np.zeros((1, 1), np.int32), np.array([1], np.int32))
    with pytest.raises(ValueError, match="head_dim_v must be in"):
        mla.decode_with_kvcache(*args, head_dim_v=2**40)
    with pytest.raises(ValueError, match="head_dim_v must be <= head_dim = 16"):
        mla.decode_with_kvcache(*args, head_dim_v=2**20)


def test_prefill_head_dim_zero_is_value_error():
    q = np.zeros((3, 2, 0), np.float32)
    v = np.zeros((3, 2, 4), np.float32)
    cu = np.array([0, 3], np.int32)
    with pytest.raises(ValueError, match="head_dim"):
        mla.prefill(q, q, v, cu, cu)
    with pytest.raises(ValueError, match="head_dim_qk"):  # with a scale given, the library refuses it by name
        mla.prefill(q, q, v, cu, cu, softmax_scale=0.5)
