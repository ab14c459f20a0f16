"""Helpers shared by the Python tests: the golden cases (read with NumPy only) and error measures."""
import json
import struct
from pathlib import Path

import numpy as np
import pytest

GOLDEN_DIR = Path(__file__).resolve().parents[2] / "tests" / "data" / "golden"
GOLDEN_CASES = ["v3-tiny", "v2lite-tiny", "noyarn", "yarn-ramp", "fp8-sharded", "long-positions"]

# Relative Frobenius error allowed against the float64 goldens.
TOLERANCE = {"f32": 2e-5, "bf16": 2e-2}

_NUMPY_DTYPES = {"F32": np.float32, "F64": np.float64, "I64": np.int64, "I32": np.int32, "F16": np.float16}


def read_safetensors(path):
    """{name: array} of a safetensors file with F32/F64/F16/I64/I32 tensors."""
    data = Path(path).read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        begin, end = info["data_offsets"]
        dtype = _NUMPY_DTYPES[info["dtype"]]
        out[name] = np.frombuffer(data[8 + n + begin : 8 + n + end], dtype=dtype).reshape(info["shape"]).copy()
    return out


class Golden:
    def __init__(self, name):
        self.name = name
        self.dir = GOLDEN_DIR / name
        io = read_safetensors(self.dir / "io.safetensors")
        self.hidden = io["hidden_states"]
        self.output = io["output"]
        self.latent = io["latent"]
        self.positions = io["position_ids"]


def hf_config(transformers, hidden_size, heads, q_lora_rank, kv_lora_rank, nope, rope, v):
    """A small transformers DeepseekV3Config (eager attention, interleaved RoPE, YaRN factor 4 over 64 positions,
    mscale 0.707) with the given attention dimensions."""
    config = transformers.DeepseekV3Config(
        hidden_size=hidden_size, num_attention_heads=heads, num_key_value_heads=heads, q_lora_rank=q_lora_rank,
        kv_lora_rank=kv_lora_rank, qk_nope_head_dim=nope, qk_rope_head_dim=rope, v_head_dim=v, num_hidden_layers=1,
        intermediate_size=64, moe_intermediate_size=32, n_routed_experts=4, num_experts_per_tok=2,
        rope_interleave=True, max_position_embeddings=256, attention_bias=False,
        rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                         "original_max_position_embeddings": 64, "beta_fast": 32.0, "beta_slow": 1.0,
                         "mscale": 0.707, "mscale_all_dim": 0.707},
    )
    config._attn_implementation = "eager"
    return config


def rel_error(a, b):
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    assert a.shape == b.shape, (a.shape, b.shape)
    if not np.all(np.isfinite(a)):
        return np.inf
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


@pytest.fixture(params=GOLDEN_CASES)
def golden(request):
    return Golden(request.param)
