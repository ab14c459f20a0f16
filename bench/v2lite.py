"""DeepSeek-V2-Lite's attention layer as transformers describes it (mla's `v2-lite` preset, src/core/config.cpp): no
query compression, YaRN. Shared by the CPU benchmarks that time transformers' DeepseekV3Attention beside mla
(bench/transformers_anchor.py, bench/cpu/train_vs_torch.py)."""
import transformers

D, H, DC, DN, DR, DV = 2048, 16, 512, 128, 64, 128  # hidden, heads, latent, q·k nope / rope, value


def config() -> "transformers.DeepseekV3Config":
    """A fresh config (callers set their attention implementation on it)."""
    return transformers.DeepseekV3Config(
        hidden_size=D, num_attention_heads=H, num_key_value_heads=H, q_lora_rank=None, kv_lora_rank=DC,
        qk_nope_head_dim=DN, qk_rope_head_dim=DR, v_head_dim=DV, num_hidden_layers=1, max_position_embeddings=163840,
        rope_interleave=True, attention_bias=False, rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 40.0,
                         "original_max_position_embeddings": 4096, "beta_fast": 32.0, "beta_slow": 1.0,
                         "mscale": 0.707, "mscale_all_dim": 0.707},
    )
