#!/usr/bin/env python3
"""Writes the seed corpora under fuzz/corpus/ from the golden cases in tests/data/golden (standard library only).

Each seed is a small valid or near-valid input (a few KB): libFuzzer mutates from these, so they decide which
parts of the parsers it reaches in a minute. Run again after the golden cases change; the output is deterministic.

  python3 fuzz/make_corpus.py
"""
import json
import pathlib
import shutil
import struct

ROOT = pathlib.Path(__file__).resolve().parent.parent
GOLDEN = ROOT / "tests" / "data" / "golden"
OUT = ROOT / "fuzz" / "corpus"
ATTN = "model.layers.0.self_attn."


def read_safetensors(path):
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    data = raw[8 + n :]
    meta = header.pop("__metadata__", None)
    tensors = {k: (v["dtype"], v["shape"], data[v["data_offsets"][0] : v["data_offsets"][1]]) for k, v in header.items()}
    return meta, tensors


def safetensors_bytes(tensors, meta=None, pad=" "):
    """tensors: list of (name, dtype, shape, bytes) in file order."""
    header, offset = {}, 0
    if meta is not None:
        header["__metadata__"] = meta
    for name, dtype, shape, blob in tensors:
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + len(blob)]}
        offset += len(blob)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += pad.encode() * ((8 - len(text) % 8) % 8)
    return struct.pack("<Q", len(text)) + text + b"".join(t[3] for t in tensors)


def write(target, name, blob):
    d = OUT / target
    d.mkdir(parents=True, exist_ok=True)
    assert len(blob) < 100_000, name
    (d / name).write_bytes(blob)


def safetensors_seeds():
    meta, shard1 = read_safetensors(GOLDEN / "fp8-sharded" / "model-00001-of-00002.safetensors")
    scales = [(k, *v) for k, v in shard1.items() if k.endswith("weight_scale_inv")]
    norm = (ATTN + "kv_a_layernorm.weight", *shard1[ATTN + "kv_a_layernorm.weight"])
    fp8_dtype, _, fp8_blob = shard1[ATTN + "q_a_proj.weight"]
    fp8 = (ATTN + "q_a_proj.weight", fp8_dtype, [8, 16], fp8_blob[:128])   # the first 128 values, reshaped
    write("safetensors", "fp8_shard", safetensors_bytes(scales + [norm, fp8], meta))

    _, v3 = read_safetensors(GOLDEN / "v3-tiny" / "model.safetensors")
    bf16 = [(k, *v3[k]) for k in (ATTN + "kv_a_layernorm.weight", ATTN + "q_a_layernorm.weight")]
    write("safetensors", "bf16_norms", safetensors_bytes(bf16, {"format": "pt"}))

    _, io = read_safetensors(GOLDEN / "long-positions" / "io.safetensors")
    dtype, _, hidden = io["hidden_states"]
    write("safetensors", "io_i64_f32",
          safetensors_bytes([("position_ids", *io["position_ids"]), ("hidden_states", dtype, [1, 2, 8], hidden[:64])]))

    # The dtypes no golden case has, an empty tensor, and one this library lists but cannot convert.
    write("safetensors", "other_dtypes", safetensors_bytes([
        ("f64", "F64", [2], struct.pack("<2d", 1.5, -2.0)),
        ("f16", "F16", [2], struct.pack("<2H", 0x3C00, 0xFC00)),
        ("i32", "I32", [3], struct.pack("<3i", 1, -1, 2**31 - 1)),
        ("empty", "F32", [0, 4], b""),
        ("u8", "U8", [4], b"\x00\x01\x02\xff"),
    ], {"format": "pt"}))
    write("safetensors", "empty_header", safetensors_bytes([], None, pad=" "))
    # Near-valid: the header length counts the whole file, more than follows it.
    good = safetensors_bytes(bf16[:1])
    write("safetensors", "header_len_too_long", struct.pack("<Q", len(good)) + good[8:])


def index_seeds():
    shutil.copy(GOLDEN / "fp8-sharded" / "model.safetensors.index.json", OUT / "index" / "golden_fp8_sharded.json")
    # fuzz_index.cpp's folder: these names exist in its two shards; truncated.safetensors is corrupt.
    write("index", "own_shards.json", json.dumps({
        "metadata": {"total_size": 56},
        "weight_map": {
            ATTN + "q_a_proj.weight": "model-00001-of-00002.safetensors",
            ATTN + "kv_b_proj.weight": "model-00002-of-00002.safetensors",
            ATTN + "o_proj.weight_scale_inv": "model-00002-of-00002.safetensors",
            ATTN + "q_b_proj.weight": "truncated.safetensors",
            ATTN + "o_proj.weight": "missing.safetensors",
        }}, indent=1).encode())
    write("index", "no_weight_map.json", b'{"metadata": {}, "weights": {}}')


def config_seeds():
    for case in sorted(p.name for p in GOLDEN.iterdir() if (p / "config.json").exists()):
        write("config", case + ".json", (GOLDEN / case / "config.json").read_bytes())
    # The transformers v5 form (rope_parameters) that no golden case uses.
    v5 = json.loads((GOLDEN / "v3-tiny" / "config.json").read_bytes())
    scaling = v5.pop("rope_scaling")
    v5["rope_parameters"] = {"rope_type": scaling.pop("type"), "rope_theta": v5.pop("rope_theta"), **scaling}
    v5["q_lora_rank"] = None
    v5["attention_bias"] = True
    write("config", "v5_rope_parameters.json", json.dumps(v5, indent=1).encode())
    # Integers written as JSON floats (384.0), which from_json accepts when integral.
    floats = json.loads((GOLDEN / "noyarn" / "config.json").read_bytes())
    for key in ("hidden_size", "num_attention_heads", "kv_lora_rank", "qk_rope_head_dim"):
        floats[key] = float(floats[key])
    write("config", "integral_floats.json", json.dumps(floats, indent=1).encode())


def main():
    if OUT.exists():
        shutil.rmtree(OUT)
    (OUT / "index").mkdir(parents=True)
    safetensors_seeds()
    index_seeds()
    config_seeds()
    for p in sorted(OUT.rglob("*")):
        if p.is_file():
            print(f"{p.relative_to(ROOT)}  {p.stat().st_size} bytes")


if __name__ == "__main__":
    main()
