"""Every golden case (transformers' DeepseekV3Attention in float64) through the Python API, NumPy only:
one shot, packed variable-length chunks, prefill-then-decode, and mla.run_sequences; f32 and bf16 layers."""
import numpy as np
import pytest

import mla
from conftest import TOLERANCE, rel_error


def make_layer(golden, dtype, device="cpu"):
    return mla.Attention.from_pretrained(golden.dir, layer=0, device=device, dtype=dtype)


def check(golden, dtype, out, latent_rows):
    err = rel_error(out, golden.output)
    assert err < TOLERANCE[dtype], f"{golden.name} {dtype}: output error {err:.3g}"
    lat_err = rel_error(latent_rows, golden.latent)
    # bf16 caches hold the rows rounded to bf16 (relative rounding error <= 2^-9).
    assert lat_err < (2e-5 if dtype == "f32" else 5e-3), f"{golden.name} {dtype}: latent error {lat_err:.3g}"


@pytest.mark.parametrize("dtype", ["f32", "bf16"])
def test_one_shot(golden, dtype):
    layer = make_layer(golden, dtype)
    B, T, _ = golden.hidden.shape
    cache = layer.make_cache(num_pages=B * (T // 16 + 2), page_size=16, page_order_seed=3)
    cache.fill_unused(np.nan)  # kernels must never read slots without a token
    seqs = [cache.add_sequence() for _ in range(B)]
    out = layer(golden.hidden, cache, golden.positions, sequences=seqs)
    assert isinstance(out, np.ndarray) and out.dtype == np.float32 and out.shape == golden.hidden.shape
    latent = np.stack([cache.read(s) for s in seqs])
    check(golden, dtype, out, latent)
    assert all(cache.length(s) == T for s in seqs)


@pytest.mark.parametrize("dtype", ["f32", "bf16"])
def test_packed_chunks(golden, dtype):
    """Sequences advance by different chunk sizes in one call ([N, D] packed input with num_tokens)."""
    layer = make_layer(golden, dtype)
    B, T, D = golden.hidden.shape
    cache = layer.make_cache(num_pages=B * (T // 8 + 2), page_size=8, page_order_seed=11)
    seqs = [cache.add_sequence() for _ in range(B)]
    out = np.zeros_like(golden.output)
    sizes = [5, 1, 17, 40, 2]
    done = [0] * B
    step = 0
    while min(done) < T:
        counts = [min(sizes[(step + b) % len(sizes)], T - done[b]) for b in range(B)]
        hidden = np.concatenate([golden.hidden[b, done[b] : done[b] + counts[b]] for b in range(B)])
        pos = np.concatenate([golden.positions[b, done[b] : done[b] + counts[b]] for b in range(B)])
        y = layer(hidden, cache, pos, sequences=seqs, num_tokens=counts)
        row = 0
        for b in range(B):
            out[b, done[b] : done[b] + counts[b]] = y[row : row + counts[b]]
            row += counts[b]
            done[b] += counts[b]
        step += 1
    check(golden, dtype, out, np.stack([cache.read(s) for s in seqs]))


@pytest.mark.parametrize("dtype", ["f32", "bf16"])
def test_prefill_then_decode(golden, dtype):
    layer = make_layer(golden, dtype)
    B, T, _ = golden.hidden.shape
    cache = layer.make_cache(num_pages=B * (T // 64 + 2), page_size=64)
    seqs = [cache.add_sequence() for _ in range(B)]
    t0 = T // 2
    outs = [layer(golden.hidden[:, :t0], cache, golden.positions[:, :t0], sequences=seqs)]
    for t in range(t0, T):
        outs.append(layer(golden.hidden[:, t : t + 1], cache, golden.positions[:, t : t + 1], sequences=seqs))
    assert set(layer.last_paths) == {"absorbed"}  # one new token over a context: the absorbed form
    check(golden, dtype, np.concatenate(outs, axis=1), np.stack([cache.read(s) for s in seqs]))


@pytest.mark.parametrize("dtype", ["f32", "bf16"])
@pytest.mark.parametrize("mode", [{"chunk": 7}, {"decode_after": 3}])
def test_run_sequences(golden, dtype, mode):
    layer = make_layer(golden, dtype)
    out, latent = mla.run_sequences(layer, golden.hidden, golden.positions, page_size=16, page_order_seed=5,
                                    poison_unused=True, **mode)
    check(golden, dtype, out, latent)


def test_reference_backend_f32(golden):
    layer = make_layer(golden, "f32", device="cpu-reference")
    out, latent = mla.run_sequences(layer, golden.hidden, golden.positions)
    check(golden, "f32", out, latent)


@pytest.mark.parametrize("path", ["expanded", "absorbed"])
def test_forced_paths_agree(path):
    from conftest import Golden

    g = Golden("v3-tiny")
    layer = mla.Attention.from_pretrained(g.dir, dtype="f32", path=path)
    out, latent = mla.run_sequences(layer, g.hidden, g.positions)
    check(g, "f32", out, latent)
    assert layer.path == path


def test_config_matches_the_folder(golden):
    config = mla.Config.from_pretrained(golden.dir)
    assert config.hidden_size == golden.hidden.shape[-1]
    assert config.latent_dim == golden.latent.shape[-1]
    assert mla.Config.from_pretrained(golden.dir / "config.json").hidden_size == config.hidden_size
