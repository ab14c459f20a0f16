"""Tensor parallelism over heads from Python, NumPy only: LayerWeights.load / Attention.from_pretrained with
tp_rank and tp_world read only that rank's heads (docs/parallel.md)."""
import numpy as np
import pytest

import mla
import mla.train as train
from conftest import GOLDEN_DIR, Golden, rel_error


@pytest.mark.parametrize("name", ["v3-tiny", "fp8-sharded", "v2lite-tiny"])
def test_slices_are_the_heads_of_the_whole_layer(name):
    whole = mla.LayerWeights.load(GOLDEN_DIR / name)
    assert (whole.tp_rank, whole.tp_world) == (0, 1)
    t = train.weights_to_tensors(whole)
    c = whole.config
    H, dqk, dkv, dv = c.num_heads, c.qk_head_dim, c.qk_nope_head_dim + c.v_head_dim, c.v_head_dim
    q = "q_b_proj.weight" if c.q_lora_rank else "q_proj.weight"
    for world in (1, 2, 4):
        if H % world:
            continue
        n = H // world
        for rank in range(world):
            w = mla.LayerWeights.load(GOLDEN_DIR / name, 0, tp_rank=rank, tp_world=world)
            assert (w.tp_rank, w.tp_world, w.config.num_heads) == (rank, world, n)
            s = train.weights_to_tensors(w)
            h0 = rank * n
            np.testing.assert_array_equal(s[q], t[q][h0 * dqk : (h0 + n) * dqk])
            np.testing.assert_array_equal(s["kv_b_proj.weight"], t["kv_b_proj.weight"][h0 * dkv : (h0 + n) * dkv])
            np.testing.assert_array_equal(s["o_proj.weight"], t["o_proj.weight"][:, h0 * dv : (h0 + n) * dv])
            np.testing.assert_array_equal(s["kv_a_proj_with_mqa.weight"], t["kv_a_proj_with_mqa.weight"])


def test_rank_outputs_sum_to_the_layer():
    g = Golden("v3-tiny")  # 4 heads
    B, T, _ = g.hidden.shape

    def run(layer):
        cache = layer.make_cache(num_pages=B * (T // 16 + 2), page_size=16)
        seqs = [cache.add_sequence() for _ in range(B)]
        return layer(g.hidden, cache, g.positions, sequences=seqs), np.stack([cache.read(s) for s in seqs])

    want, want_rows = run(mla.Attention.from_pretrained(g.dir, dtype="f32"))
    for world in (2, 4):
        total = np.zeros_like(want)
        for rank in range(world):
            out, rows = run(mla.Attention.from_pretrained(g.dir, dtype="f32", tp_rank=rank, tp_world=world))
            total += out
            np.testing.assert_array_equal(rows, want_rows)  # every rank stores the layer's cache rows
        assert rel_error(total, want) < 1e-5, world


def test_bad_rank_or_world_is_named():
    d = GOLDEN_DIR / "v3-tiny"
    with pytest.raises(ValueError, match=r"rank 2 is outside \[0, 2\)"):
        mla.LayerWeights.load(d, tp_rank=2, tp_world=2)
    with pytest.raises(ValueError, match="num_heads 4 does not divide over 3 ranks"):
        mla.Attention.from_pretrained(d, tp_world=3)
    with pytest.raises(ValueError, match="world size must be at least 1"):
        mla.LayerWeights.load(d, tp_world=0)
