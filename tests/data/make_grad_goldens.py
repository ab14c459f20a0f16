"""Writes grad.safetensors into golden cases: the gradients of transformers' DeepseekV3Attention in float64
(eager attention, causal by index, rope_interleave=True, autograd) for the case's weights, hidden states and
positions, under a fixed output gradient. tests/test_train.cpp checks mla's training reference against them.

    python3 tests/data/make_grad_goldens.py tests/data/golden/v3-tiny [more case folders]

Needs torch, transformers (5.x) and safetensors (scripts/bench-venv.sh makes such a venv). The cases with BF16 or
F32 weights in model.safetensors are supported (not the FP8 one: its weights go through block dequantisation).

grad.safetensors holds, all F32 (float64 results rounded once):
  d_output [B, T, D]         the output gradient used (values exactly representable in bf16)
  grad.hidden_states [B, T, D]
  grad.<parameter>           for every parameter of the layer, named as in the checkpoint without the
                             "model.layers.0.self_attn." prefix (q_a_proj.weight, q_a_layernorm.weight, ...)
"""
import json
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers import DeepseekV3Config
from transformers.models.deepseek_v3 import modeling_deepseek_v3 as hf

PREFIX = "model.layers.0.self_attn."


def make_case(folder: Path) -> None:
    raw = json.loads((folder / "config.json").read_text())
    config = DeepseekV3Config(**{k: v for k, v in raw.items() if k not in ("architectures", "torch_dtype")},
                              rope_interleave=True)
    config._attn_implementation = "eager"
    attn = hf.DeepseekV3Attention(config, layer_idx=0).double()
    weights = load_file(str(folder / "model.safetensors"))
    state = {k[len(PREFIX):]: v.double() for k, v in weights.items() if k.startswith(PREFIX)}
    attn.load_state_dict(state, strict=True)
    io = load_file(str(folder / "io.safetensors"))
    hidden = io["hidden_states"].double().requires_grad_(True)
    positions = io["position_ids"]
    B, T, D = hidden.shape
    rotary = hf.DeepseekV3RotaryEmbedding(config)
    cos, sin = rotary(hidden.detach().float(), positions)
    mask = torch.full((T, T), float("-inf"), dtype=torch.float64).triu(1)[None, None]
    out = attn(hidden, (cos.double(), sin.double()), mask)[0]
    err = ((out.detach().float() - io["output"]).norm() / io["output"].norm()).item()
    assert err < 1e-6, f"{folder.name}: forward differs from the golden output ({err:.3g})"
    g = torch.Generator().manual_seed(12345)
    d_out = (torch.rand(B, T, D, generator=g) * 2 - 1).bfloat16().float()
    out.backward(d_out.double())
    tensors = {"d_output": d_out.contiguous(), "grad.hidden_states": hidden.grad.float().contiguous()}
    for name, p in attn.named_parameters():
        tensors[f"grad.{name}"] = p.grad.float().contiguous()
    save_file(tensors, str(folder / "grad.safetensors"))
    print(f"{folder.name}: forward error {err:.2g}, wrote {len(tensors)} tensors")


if __name__ == "__main__":
    for arg in sys.argv[1:]:
        make_case(Path(arg))
