"""The training reference from Python (mla.train): forward and backward against transformers' float64 goldens
(NumPy only), named-tensor round trips and their errors, and, with torch and transformers, the
MultiheadLatentAttention module training side by side with DeepseekV3Attention."""
import numpy as np
import pytest

import mla
import mla.train as train
from conftest import GOLDEN_DIR, Golden, read_safetensors, rel_error

GRAD_CASES = ["v3-tiny", "v2lite-tiny", "noyarn", "yarn-ramp", "long-positions"]


@pytest.mark.parametrize("name", GRAD_CASES)
def test_reference_matches_transformers_gradients(name):
    g = Golden(name)
    want = read_safetensors(g.dir / "grad.safetensors")
    weights = mla.LayerWeights.load(str(g.dir))
    B, T, D = g.hidden.shape
    cu = np.arange(0, (B + 1) * T, T, dtype=np.int32)
    out, saved = train.forward_reference(weights, g.hidden.reshape(B * T, D), cu, g.positions.reshape(-1))
    assert rel_error(out.reshape(B, T, D), g.output) < 2e-6
    d_hidden, grads = train.backward_reference(weights, saved, want["d_output"].reshape(B * T, D))
    assert rel_error(d_hidden.reshape(B, T, D), want["grad.hidden_states"]) < 1e-5
    assert sorted(grads) == sorted(k[len("grad."):] for k in want if k.startswith("grad.") and k != "grad.hidden_states")
    for key, value in grads.items():
        assert rel_error(value, want["grad." + key]) < 1e-5, key


def test_named_tensors_round_trip_and_errors():
    weights = mla.LayerWeights.load(str(GOLDEN_DIR / "v3-tiny"))
    tensors = train.weights_to_tensors(weights)
    again = train.weights_to_tensors(train.weights_from_tensors(weights.config, tensors))
    assert all(np.array_equal(tensors[k], again[k]) for k in tensors)
    missing = {k: v for k, v in tensors.items() if k != "kv_b_proj.weight"}
    with pytest.raises(ValueError, match="missing 'kv_b_proj.weight'"):
        train.weights_from_tensors(weights.config, missing)
    with pytest.raises(ValueError, match="'o_proj.weight' has shape \\[3, 4\\]"):
        train.weights_from_tensors(weights.config, {**tensors, "o_proj.weight": np.zeros((3, 4), np.float32)})
    with pytest.raises(ValueError, match="'q_proj.weight' is not a tensor"):
        train.weights_from_tensors(weights.config, {**tensors, "q_proj.weight": np.zeros((3, 4), np.float32)})
    x = np.zeros((4, weights.config.hidden_size), np.float32)
    with pytest.raises(ValueError, match="cu_seqlens ends at 3"):
        train.forward_reference(weights, x, [0, 3])


def test_module_trains_like_transformers():
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from transformers.models.deepseek_v3 import modeling_deepseek_v3 as hf

    config = transformers.DeepseekV3Config(
        hidden_size=64, num_attention_heads=4, num_key_value_heads=4, q_lora_rank=32, kv_lora_rank=24,
        qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=12, num_hidden_layers=1, intermediate_size=64,
        moe_intermediate_size=32, n_routed_experts=4, num_experts_per_tok=2, rope_interleave=True,
        max_position_embeddings=256, attention_bias=False,
        rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                         "original_max_position_embeddings": 64, "beta_fast": 32.0, "beta_slow": 1.0,
                         "mscale": 0.707, "mscale_all_dim": 0.707},
    )
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    ref = hf.DeepseekV3Attention(config, layer_idx=0).float()
    with torch.no_grad():
        for name, p in ref.named_parameters():
            p.copy_(1 + 0.2 * torch.randn_like(p) if "layernorm" in name else torch.randn_like(p) * p.shape[-1] ** -0.5)
    import json
    ours = train.MultiheadLatentAttention(mla.Config.from_json(json.dumps(config.to_dict(), default=str)))
    ours.load_state_dict(ref.state_dict())

    B, T = 2, 12
    rotary = hf.DeepseekV3RotaryEmbedding(config)
    positions = torch.arange(T).expand(B, T)
    mask = torch.full((T, T), float("-inf")).triu(1)[None, None]
    opt_ref = torch.optim.Adam(ref.parameters(), lr=1e-3)
    opt_ours = torch.optim.Adam(ours.parameters(), lr=1e-3)
    data = torch.Generator().manual_seed(1)
    for step in range(20):
        x = torch.randn(B, T, 64, generator=data)
        target = torch.randn(B, T, 64, generator=data)
        cos, sin = rotary(x, positions)
        losses = []
        for model, opt, run in ((ref, opt_ref, lambda: ref(x, (cos, sin), mask)[0]), (ours, opt_ours, lambda: ours(x))):
            opt.zero_grad()
            loss = torch.nn.functional.mse_loss(run(), target)
            loss.backward()
            opt.step()
            losses.append(loss.item())
        assert abs(losses[0] - losses[1]) <= 1e-4 * abs(losses[0]), f"step {step}: {losses}"
    for name, p in ref.named_parameters():
        assert torch.allclose(p, ours.get_parameter(name), rtol=1e-3, atol=1e-5), name
