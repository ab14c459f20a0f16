"""The objects of the Python API and their error paths, NumPy only."""
import ast
from pathlib import Path

import numpy as np
import pytest

import mla
from conftest import GOLDEN_DIR


@pytest.fixture(scope="module")
def layer():
    return mla.Attention.random("v2-lite", seed=0, dtype="f32")


def test_presets_and_config():
    assert set(mla.Config.preset_names()) >= {"v2-lite", "v2", "v3"}
    v3 = mla.Config.preset("v3")
    assert (v3.hidden_size, v3.num_heads, v3.q_lora_rank, v3.kv_lora_rank) == (7168, 128, 1536, 512)
    assert v3.latent_dim == 576 and v3.qk_head_dim == 192 and v3.rope_type == "yarn"
    assert abs(v3.softmax_scale - 0.1352337789) < 1e-7
    assert abs(mla.Config.preset("v2-lite").softmax_scale - 0.1147213868) < 1e-7
    assert "hidden_size=7168" in repr(v3)
    assert mla.Config.preset("r1").hidden_size == 7168


def test_config_from_json():
    text = (GOLDEN_DIR / "noyarn" / "config.json").read_text()
    assert mla.Config.from_json(text).rope_type == "default"
    with pytest.raises(RuntimeError, match="missing key .num_attention_heads."):
        mla.Config.from_json('{"hidden_size": 64}')


def test_devices():
    assert "cpu" in mla.available_devices() and "cpu-reference" in mla.available_devices()


def test_layer_properties_and_cache(layer):
    assert (layer.device, layer.dtype, layer.path) == ("cpu", "f32", "auto")
    assert layer.config.hidden_size == 2048
    cache = layer.make_cache(num_pages=8, page_size=16)
    assert (cache.num_pages, cache.page_size, cache.row_width, cache.dtype, cache.device) == (8, 16, 576, "f32", "cpu")
    a, b = cache.add_sequence(), cache.add_sequence()
    x = np.random.default_rng(0).standard_normal((2, 20, 2048)).astype(np.float32)
    y = layer(x, cache, sequences=[a, b])
    assert y.shape == x.shape and y.dtype == np.float32
    assert cache.length(a) == 20 and cache.capacity(a) == 32 and cache.pages_free == 4
    assert cache.read(a).shape == (20, 576) and cache.read(a, 5, 7).shape == (2, 576)
    assert cache.block_table(a).dtype == np.int32 and len(cache.block_table(a)) == 2
    assert cache.block_tables([a, b]).shape == (2, 2)
    assert list(cache.lengths([a, b])) == [20, 20]
    assert a in cache and sorted(cache.sequences()) == [a, b]
    # The same tokens in one sequence give the same rows as in another.
    c = cache.add_sequence()
    layer(x[0], cache, sequences=c)
    np.testing.assert_array_equal(cache.read(c), cache.read(a))
    cache.truncate(a, 10)
    assert cache.length(a) == 10
    cache.free_sequence(a)
    assert a not in cache
    assert "LatentCache" in repr(cache) and "Attention" in repr(layer)


def test_explicit_positions_and_default_positions_agree(layer):
    x = np.random.default_rng(1).standard_normal((6, 2048)).astype(np.float32)
    c1, c2 = layer.make_cache(4, 16), layer.make_cache(4, 16)
    s1, s2 = c1.add_sequence(), c2.add_sequence()
    y1 = layer(x, c1, sequences=s1)
    y2 = layer(x, c2, np.arange(6), sequences=s2)
    np.testing.assert_array_equal(y1, y2)
    # float64 input is converted; the output keeps the input's leading shape
    c3 = layer.make_cache(4, 16)
    y3 = layer(x.astype(np.float64), c3, sequences=c3.add_sequence())
    np.testing.assert_array_equal(y3, y1)


def test_standalone_cache_matches_a_layer():
    layer = mla.Attention.random("v2-lite", seed=0, dtype="bf16")
    cache = mla.LatentCache(num_pages=4, page_size=64, row_width=576, dtype="bf16", device="cpu")
    s = cache.add_sequence()
    layer(np.ones((3, 2048), np.float32), cache, sequences=s)
    assert cache.length(s) == 3
    with pytest.raises(ValueError, match="a bf16 layer with cache_dtype auto needs a BF16 cache, got F32"):
        layer(np.ones((3, 2048), np.float32), mla.LatentCache(4, dtype="f32"), sequences=0)


def test_out_of_pages_changes_nothing(layer):
    cache = layer.make_cache(num_pages=2, page_size=16)
    s = cache.add_sequence()
    layer(np.ones((20, 2048), np.float32), cache, sequences=s)
    before = cache.read(s)
    with pytest.raises(mla.OutOfPages, match="out of pages") as e:
        layer(np.ones((40, 2048), np.float32), cache, sequences=s)
    assert isinstance(e.value, RuntimeError)
    assert cache.length(s) == 20 and cache.pages_free == 0
    np.testing.assert_array_equal(cache.read(s), before)


def test_layer_errors(layer):
    cache = layer.make_cache(num_pages=4, page_size=16)
    s = cache.add_sequence()
    x = np.zeros((3, 2048), np.float32)
    cases = [
        (lambda: layer(x[:, :100], cache, sequences=s), ValueError, "hidden.shape[1] (hidden_size) must be 2048"),
        (lambda: layer(x.astype(np.int32), cache, sequences=s), TypeError, "hidden must hold floats"),
        (lambda: layer(x, cache, sequences=99), ValueError, "no sequence 99 in the cache"),
        (lambda: layer(x, cache, sequences=[s, s], num_tokens=[1, 2]), ValueError, "appears twice"),
        (lambda: layer(x, cache, sequences=[s], num_tokens=[2]), ValueError, "add up to 2 but hidden has 3 rows"),
        (lambda: layer(x, cache, sequences=[s]), ValueError, "needs num_tokens"),
        (lambda: layer(x, cache, sequences=s, num_tokens=[2]), ValueError, "disagrees with 3 rows"),
        (lambda: layer(x[None], cache, sequences=[s, s]), ValueError, "2 ids"),
        (lambda: layer(x, cache, np.arange(4), sequences=s), ValueError, "positions must have shape [3]"),
        (lambda: layer(x, cache, np.zeros(3), sequences=s), TypeError, "positions must be integers"),
        (lambda: layer(x, cache, np.array([0, -1, 2]), sequences=s), ValueError, "negative position -1"),
        (lambda: layer(np.full((3, 2048), np.nan, np.float32), cache, sequences=s), ValueError, "not finite"),
        (lambda: layer(x, "cache", sequences=s), TypeError, "mla.LatentCache"),
        (lambda: layer(x, cache), TypeError, "sequences"),
        (lambda: cache.read(s, 0, 5), ValueError, "not within the sequence's 0 tokens"),
    ]
    for fn, error, message in cases:
        with pytest.raises(error) as e:
            fn()
        assert message in str(e.value), (message, str(e.value))
    assert cache.length(s) == 0  # nothing was stored by any failed call


def test_construction_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        mla.Attention.from_pretrained(tmp_path / "missing")
    with pytest.raises(FileNotFoundError):
        mla.Config.from_pretrained(tmp_path / "missing")
    with pytest.raises(RuntimeError, match="config"):  # a folder without a checkpoint
        mla.Attention.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="out of range"):
        mla.Attention.from_pretrained(GOLDEN_DIR / "v3-tiny", layer=5)
    with pytest.raises(ValueError, match="dtype must be 'bf16' or 'f32', got 'f16'"):
        mla.Attention.random("v2-lite", dtype="f16")
    with pytest.raises(ValueError, match="path must be"):
        mla.Attention.random("v2-lite", path="fast")
    with pytest.raises(ValueError, match="unknown device 'tpu'"):
        mla.Attention.random("v2-lite", device="tpu")
    with pytest.raises(ValueError, match="unknown preset"):
        mla.Config.preset("v9")
    with pytest.raises(ValueError, match="power of two"):
        mla.LatentCache(num_pages=4, page_size=48)
    with pytest.raises(ValueError, match="framework"):
        mla.LatentCache(num_pages=1, dtype="f32").kv_cache("jax")


def test_corrupt_checkpoint_is_a_runtime_error(tmp_path):
    src = GOLDEN_DIR / "v3-tiny"
    (tmp_path / "config.json").write_text((src / "config.json").read_text())
    (tmp_path / "model.safetensors").write_bytes((src / "model.safetensors").read_bytes()[:1000])
    with pytest.raises(RuntimeError, match="model.safetensors"):
        mla.Attention.from_pretrained(tmp_path)


def test_stubs_cover_the_public_api():
    stub = Path(mla.__file__).with_name("__init__.pyi")
    names = {n.name for n in ast.parse(stub.read_text()).body if isinstance(n, (ast.ClassDef, ast.FunctionDef))}
    assert set(mla.__all__) <= names, set(mla.__all__) - names
    for name in mla.__all__:
        assert getattr(mla, name).__doc__, f"{name} has no docstring"
