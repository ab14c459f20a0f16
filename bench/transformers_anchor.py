"""CPU anchor for `mla bench`: PyTorch 2.x and transformers on the same V2-Lite layer, same threads, same run.

Run by scripts/bench-cpu.sh with the venv it makes (torch and transformers from PyPI). Prints one JSON object.

Rows (each in bf16 and f32, median of --reps timed calls after warm-up):
- prefill: transformers' `DeepseekV3Attention` over T new tokens (causal, empty DynamicCache);
- decode_hf: its decode step, one new token at context L (DynamicCache holding L-1 latent rows; transformers
  appends to the compressed cache and re-expands all of it through kv_b_proj every step);
- decode_absorbed: the absorbed decode step in eager torch: q·W_UK, MQA over the latent cache [L, 576] (the new
  row written in place), ·W_UV, o_proj;
- gemm: 2048³ matmul, and a 256 MB copy (read + write), through torch.

Before timing it checks that the absorbed step and, given --mla, `mla forward` compute what transformers does on
the same random weights (relative Frobenius error of the outputs), and exits non-zero if they do not.
"""
import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch
import torch.nn.functional as F
import transformers
from transformers.cache_utils import DynamicCache
from transformers.models.deepseek_v3 import modeling_deepseek_v3 as hf

import v2lite  # bench/v2lite.py, beside this script

p = argparse.ArgumentParser()
p.add_argument("--tokens", type=int, default=1024, help="prefill length")
p.add_argument("--context", type=int, default=4096, help="decode context (cached rows + the new token)")
p.add_argument("--reps", type=int, default=7, help="timed repetitions per row (median)")
p.add_argument("--threads", type=int, default=2)
p.add_argument("--attn", default="sdpa", help="transformers attention implementation: sdpa (its default) or eager")
p.add_argument("--mla", help="path of the mla program: also check `mla forward` against transformers")
args = p.parse_args()
torch.set_num_threads(args.threads)
T, L = args.tokens, args.context
DTYPES = {"bf16": torch.bfloat16, "f32": torch.float32}

# DeepSeek-V2-Lite's attention (bench/v2lite.py).
config = v2lite.config()
config._attn_implementation = args.attn
H, DN, DR, DV, DC, D = v2lite.H, v2lite.DN, v2lite.DR, v2lite.DV, v2lite.DC, v2lite.D


def timed(f, reset=None, reps=args.reps, warmup=2):
    """Median seconds of f() over reps calls; reset() (untimed) runs before each call."""
    ts = []
    for i in range(warmup + reps):
        if reset:
            reset()
        t0 = time.perf_counter()
        f()
        if i >= warmup:
            ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def log(*what):
    print("anchor:", *what, file=sys.stderr, flush=True)


def rel_err(a, b):
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm())


torch.manual_seed(0)
base = hf.DeepseekV3Attention(config, layer_idx=0).float().eval()
with torch.no_grad():  # random weights at the scale of a trained layer: unit-variance outputs per projection
    for name, w in base.named_parameters():
        if "layernorm" in name:
            w.copy_(1 + 0.2 * torch.randn_like(w))
        else:
            w.copy_(torch.randn_like(w) * w.shape[-1] ** -0.5)
rotary = hf.DeepseekV3RotaryEmbedding(config)


class AbsorbedDecode:
    """One decode step of the absorbed form in eager torch, on the weights of a DeepseekV3Attention."""

    def __init__(self, attn, cache_rows):
        self.attn = attn
        kvb = attn.kv_b_proj.weight.view(H, DN + DV, DC)
        self.w_uk = kvb[:, :DN].contiguous()  # [H, DN, DC]: q̂_h = qn_h · W_UK^h
        self.w_uv_t = kvb[:, DN:].transpose(1, 2).contiguous()  # [H, DC, DV]: o_h = ô_h · W_UV^hᵀ
        n = cache_rows.shape[0]
        self.cache = torch.empty(n + 1, DC + DR, dtype=cache_rows.dtype)
        self.cache[:n] = cache_rows
        self.n = n

    def __call__(self, x, cos, sin):  # x [1, 1, D]
        a = self.attn
        q = a.q_proj(x).view(1, 1, H, DN + DR).transpose(1, 2)  # [1, H, 1, DN+DR]
        kv = a.kv_a_proj_with_mqa(x)  # [1, 1, DC+DR]
        c = a.kv_a_layernorm(kv[..., :DC])
        q_rot, k_rot = hf.apply_rotary_pos_emb_interleave(q[..., DN:], kv[..., DC:].view(1, 1, 1, DR), cos, sin)
        self.cache[self.n, :DC] = c.view(DC)  # append the new latent row in place
        self.cache[self.n, DC:] = k_rot.view(DR)
        keys = self.cache[: self.n + 1]  # [L, DC+DR]; values are its first DC columns
        q_hat = torch.bmm(q[0, :, :, :DN], self.w_uk)  # [H, 1, DC]
        qa = torch.cat([q_hat.view(H, DC), q_rot.view(H, DR)], -1)  # [H, DC+DR]
        probs = torch.softmax((qa @ keys.T).float() * a.scaling, -1).to(x.dtype)  # [H, L]
        o_hat = probs @ keys[:, :DC]  # [H, DC]
        o = torch.bmm(o_hat.view(H, 1, DC), self.w_uv_t)  # [H, 1, DV]
        return a.o_proj(o.view(1, 1, H * DV))


def causal_mask(n, dtype):
    return None if args.attn == "sdpa" else torch.full((n, n), float("-inf"), dtype=dtype).triu(1)[None, None]


def mla_forward_check(dtype_name):
    """`mla forward` (prefill 56 tokens, then 8 absorbed decode steps) against transformers on the same weights."""
    from safetensors.torch import load_file, save_file

    n, k = 64, 56
    with tempfile.TemporaryDirectory() as d:
        save_file({f"model.layers.0.self_attn.{key}": v.float().contiguous() for key, v in base.state_dict().items()},
                  os.path.join(d, "model.safetensors"))
        with open(os.path.join(d, "config.json"), "w") as f:
            json.dump(config.to_dict(), f, default=str)
        x = torch.randn(1, n, D)
        save_file({"hidden_states": x}, os.path.join(d, "in.safetensors"))
        run = subprocess.run([args.mla, "forward", "--model", d, "--input", os.path.join(d, "in.safetensors"),
                              "--output", os.path.join(d, "out.safetensors"), "--dtype", dtype_name, "--decode-after",
                              str(k), "--path", "absorbed"], capture_output=True, text=True)
        if run.returncode != 0:
            sys.exit(f"transformers_anchor: mla forward failed:\n{run.stdout}{run.stderr}")
        got = load_file(os.path.join(d, "out.safetensors"))["output"]
    ref = copy.deepcopy(base).double()  # the deep copy has its own config
    ref.config._attn_implementation = "eager"
    cos, sin = rotary(x, torch.arange(n)[None])
    mask = torch.full((n, n), float("-inf"), dtype=torch.float64).triu(1)[None, None]
    want = ref(x.double(), (cos.double(), sin.double()), mask)[0]
    return rel_err(got.view_as(want), want)


res = {"torch": torch.__version__, "transformers": transformers.__version__, "threads": torch.get_num_threads(),
       "cpu_capability": torch.backends.cpu.get_cpu_capability(), "attn_implementation": args.attn,
       "tokens": T, "context": L, "reps": args.reps, "python": sys.version.split()[0], "venv": sys.prefix}
info = os.path.join(sys.prefix, "mla-bench-install.json")
if os.path.exists(info):
    res["install"] = json.load(open(info))
checks, tolerance = {}, {"f32": 1e-4, "bf16": 3e-2}

with torch.inference_mode():
    for dn in ("bf16", "f32"):
        dt = DTYPES[dn]
        a = copy.deepcopy(base).to(dt)
        ga = torch.randn(2048, 2048, dtype=dt)
        gb = torch.randn(2048, 2048, dtype=dt)
        res[f"gemm_{dn}_gflops"] = 2 * 2048 ** 3 / timed(lambda: ga @ gb) / 1e9
        del ga, gb

        x = torch.randn(1, T, D, dtype=dt)
        cos, sin = rotary(x, torch.arange(T)[None])
        mask = causal_mask(T, dt)
        res[f"prefill_{dn}_ms"] = timed(lambda: a(x, (cos, sin), mask, past_key_values=DynamicCache())) * 1e3
        log(f"{dn}: GEMM 2048^3 {res[f'gemm_{dn}_gflops']:.0f} GFLOP/s, transformers prefill {T} tokens "
            f"{res[f'prefill_{dn}_ms']:.1f} ms")

        # Decode at context L: L-1 cached latent rows (normalised latents, rotated rope keys) and one new token.
        ctx_c = torch.randn(1, 1, L - 1, DC, dtype=dt)
        ctx_r = torch.randn(1, 1, L - 1, DR, dtype=dt)
        x1 = torch.randn(1, 1, D, dtype=dt)
        cos1, sin1 = rotary(x1, torch.tensor([[L - 1]]))
        box = {}

        def fresh_cache():
            box["cache"] = DynamicCache()
            box["cache"].update(ctx_c, ctx_r, 0)

        def hf_step():
            return a(x1, (cos1, sin1), None, past_key_values=box["cache"])[0]

        absorbed = AbsorbedDecode(a, torch.cat([ctx_c, ctx_r], -1).view(L - 1, DC + DR))
        fresh_cache()
        checks[f"absorbed_vs_transformers_decode_{dn}"] = rel_err(absorbed(x1, cos1, sin1), hf_step())
        res[f"decode_hf_{dn}_ms"] = timed(hf_step, reset=fresh_cache) * 1e3
        res[f"decode_absorbed_{dn}_ms"] = timed(lambda: absorbed(x1, cos1, sin1), reps=5 * args.reps) * 1e3
        log(f"{dn}: decode step at context {L}: transformers {res[f'decode_hf_{dn}_ms']:.1f} ms, eager absorbed "
            f"{res[f'decode_absorbed_{dn}_ms']:.2f} ms (outputs agree to {checks[f'absorbed_vs_transformers_decode_{dn}']:.1e})")
        del a, absorbed, box

    src = torch.ones(256 << 20, dtype=torch.uint8)
    dst = torch.empty_like(src)
    res["copy_gbps"] = 2 * src.numel() / timed(lambda: dst.copy_(src)) / 1e9
    del src, dst

    if args.mla:
        for dn in ("f32", "bf16"):
            checks[f"mla_forward_vs_transformers_{dn}"] = mla_forward_check(dn)
            log(f"{dn}: mla forward vs transformers: relative error {checks[f'mla_forward_vs_transformers_{dn}']:.1e}")

res["checks"] = checks
res["checks_passed"] = all(v < tolerance[k.rsplit("_", 1)[1]] for k, v in checks.items())
print(json.dumps(res, indent=1))
if not res["checks_passed"]:
    sys.exit(f"transformers_anchor: outputs disagree beyond tolerance {tolerance}: {checks}")
