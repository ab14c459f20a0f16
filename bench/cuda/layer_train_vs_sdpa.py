"""A DeepSeek-V3 attention layer's training step (forward + backward, no optimizer) on the GPU, same run, same
tensors: mla's torch module (mla.nn.MultiheadLatentAttention, path="ops": torch projections, norms and RoPE around
mla.prefill / mla.prefill_backward) beside transformers' DeepseekV3Attention with attn_implementation="sdpa"
(torch's scaled_dot_product_attention, on whichever backend torch picks by default; the enabled backends and the
one torch chooses for these shapes are printed). The issue's target: b=1 T=4096 at least 1.5x transformers' time.

    PYTHONPATH=<mla package> python3 bench/cuda/layer_train_vs_sdpa.py [--tokens 4096 16384] [--batch 1]
        [--rounds 9] [--json OUT.json]
    PYTHONPATH=<mla package> python3 bench/cuda/layer_train_vs_sdpa.py --smoke   # tiny layer, CPU float32 if no GPU

What is timed, per side: out = layer(x); torch.autograd.grad(out, [x] + every weight, d_out), i.e. the forward and
the gradient of the hidden states and of all seven weights (autograd.grad: nothing accumulates into .grad). Both
sides hold the same bf16 weights (the transformers layer's state_dict loaded into mla's module), the same x, d_out
and positions 0..T-1, causal; DeepSeek-V3's attention config with its YaRN scaling (factor 40 over 4096).
transformers' RoPE tables (DeepseekV3RotaryEmbedding, computed once per model, not per layer) are made outside the
timed step; mla's module makes its own inside. Each side's whole step is captured in one CUDA graph (warm-up on a
side stream) where it can be; where capture fails the side is timed eagerly and its row says "eager" with the
error. Sides that run as graphs are also timed eagerly, so a both-eager ratio is printed too. Replays interleaved
(vs_anchors.time_interleaved), median.

Checks (before timing): out, d_hidden and every weight gradient, mla against transformers (relative L2 difference,
worst printed); past --tol (5e-2 in bf16, 1e-4 in float32) the script still times and prints, then exits non-zero.
In bf16, for T <= --fp32-ref-tokens, both sides are also compared with transformers in float32 on the same (bf16-
rounded) weights and inputs, to show which side is nearer the exact result.

FLOPs (as bench/cpu/train_vs_torch.py): the dense projections, forward 2·tokens·Σ in·out and backward twice that,
plus causal attention over T(T+1)/2 query-key pairs per head and sequence, forward q·k over d_nope + d_rope and P·V
over d_v, backward five such products (3·(d_nope + d_rope) + 2·d_v); what either side does at least.
"""
import argparse
import copy
import json
import math
import os
import platform
import statistics
import sys
import time

import torch
import transformers
from transformers.models.deepseek_v3 import modeling_deepseek_v3 as hf

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from vs_anchors import graph_of, reldiff, time_interleaved  # noqa: E402

import mla  # noqa: E402
import mla.nn  # noqa: E402

# (hidden, heads, q_lora_rank, kv_lora_rank, qk_nope, qk_rope, v_head): DeepSeek-V3's attention, and a tiny one
V3 = dict(hidden=7168, heads=128, q_lora=1536, kv_lora=512, nope=128, rope=64, v=128)
SMOKE = dict(hidden=64, heads=4, q_lora=32, kv_lora=24, nope=16, rope=8, v=12)
YARN = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 40.0, "original_max_position_embeddings": 4096,
        "beta_fast": 32.0, "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0}  # DeepSeek-V3's config.json


def hf_config(d):
    """A transformers DeepseekV3Config with the attention dimensions d (interleaved RoPE, YaRN as V3), SDPA."""
    kwargs = dict(hidden_size=d["hidden"], num_attention_heads=d["heads"], num_key_value_heads=d["heads"],
                  q_lora_rank=d["q_lora"], kv_lora_rank=d["kv_lora"], qk_nope_head_dim=d["nope"],
                  qk_rope_head_dim=d["rope"], v_head_dim=d["v"], num_hidden_layers=1, rope_interleave=True,
                  max_position_embeddings=163840, attention_bias=False, rms_norm_eps=1e-6)
    if int(transformers.__version__.split(".")[0]) >= 5:
        kwargs["rope_parameters"] = dict(YARN)
    else:  # transformers 4: rope_theta beside rope_scaling
        kwargs["rope_theta"] = YARN["rope_theta"]
        kwargs["rope_scaling"] = {"type": "yarn",
                                  **{k: v for k, v in YARN.items() if k not in ("rope_type", "rope_theta")}}
    config = transformers.DeepseekV3Config(**kwargs)
    config._attn_implementation = "sdpa"
    return config


def build_layers(config, dev, dtype):
    """(transformers layer, mla module) with the same random weights at a trained layer's scale (as
    bench/cpu/train_vs_torch.py: norms 1 + 0.2·N(0,1), projections N(0,1)/sqrt(in)), drawn in float32, then cast."""
    torch.manual_seed(0)
    with torch.device(dev):
        ref = hf.DeepseekV3Attention(config, layer_idx=0).float()
    with torch.no_grad():
        for name, w in ref.named_parameters():
            w.copy_(1 + 0.2 * torch.randn_like(w) if "layernorm" in name else torch.randn_like(w) * w.shape[-1] ** -0.5)
    ref = ref.to(dtype)
    mla_config = mla.Config.from_json(json.dumps(config.to_dict(), default=str))
    ours = mla.nn.MultiheadLatentAttention(mla_config, path="ops", device=dev, dtype=dtype)
    ours.load_state_dict(ref.state_dict())
    if abs(mla_config.softmax_scale - ref.scaling) > 1e-6 * ref.scaling:
        sys.exit(f"layer_train_vs_sdpa: softmax scales differ (mla {mla_config.softmax_scale}, transformers "
                 f"{ref.scaling}): the two configs do not describe the same layer")
    return ref, ours


def flop_count(d, b, T):
    """(forward, backward) FLOPs of the layer on b sequences of T tokens (docstring)."""
    D, H, dq, dc, dn, dr, dv = d["hidden"], d["heads"], d["q_lora"], d["kv_lora"], d["nope"], d["rope"], d["v"]
    proj = D * dq + dq * H * (dn + dr) + D * (dc + dr) + dc * H * (dn + dv) + H * dv * D  # multiply-adds per token
    pairs = b * H * T * (T + 1) // 2
    fwd = 2 * b * T * proj + 2 * pairs * (dn + dr + dv)
    bwd = 2 * 2 * b * T * proj + 2 * pairs * (3 * (dn + dr) + 2 * dv)
    return fwd, bwd


def sdpa_environment(d, b, T, dev, dtype, scale):
    """The SDPA backends enabled, and the one torch picks for transformers' q, k, v (v a strided view of kv)."""
    env = {}
    if dev.type == "cuda":
        env["sdpa_enabled"] = {"flash": torch.backends.cuda.flash_sdp_enabled(),
                               "cudnn": torch.backends.cuda.cudnn_sdp_enabled(),
                               "mem_efficient": torch.backends.cuda.mem_efficient_sdp_enabled(),
                               "math": torch.backends.cuda.math_sdp_enabled()}
    try:
        from torch.nn.attention import SDPBackend

        H, dqk = d["heads"], d["nope"] + d["rope"]
        q = torch.empty(b, H, T, dqk, device=dev, dtype=dtype, requires_grad=True)
        k = torch.empty(b, H, T, dqk, device=dev, dtype=dtype, requires_grad=True)
        v = torch.empty(b, T, H, d["nope"] + d["v"], device=dev, dtype=dtype).transpose(1, 2)[..., d["nope"]:]
        choice = torch._fused_sdp_choice(q, k, v.requires_grad_(True), None, 0.0, True, scale=scale)
        env["sdpa_choice"] = next((n for n, e in SDPBackend.__members__.items() if int(e.value) == choice), str(choice))
    except Exception as ex:  # a private function: say so rather than guess
        env["sdpa_choice"] = f"unknown ({type(ex).__name__}: {str(ex)[:80]})"
    return env


def time_interleaved_host(fns, rounds):
    """time_interleaved's schedule with the host clock (CPU smoke runs): name -> median seconds."""
    ts = {k: [] for k in fns}
    for f in fns.values():
        f()
    for _ in range(rounds):
        for k, f in fns.items():
            t0 = time.perf_counter()
            f()
            ts[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in ts.items()}


def capture_error(ex):
    """The first line of the error that broke a capture, and of the one that started it: torch.cuda.graph's exit
    raises its own error (capture invalidated) over the operation's."""
    first = lambda e: f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:100]}"  # noqa: E731
    root = ex
    while root.__context__ is not None and root.__context__ is not root:
        root = root.__context__
    return first(ex) if root is ex else f"{first(root)}; then {first(ex)}"


def finite_reldiff(a, b):
    d = reldiff(a, b)
    return d if math.isfinite(d) else math.inf


def bench_row(ref, ours, config, d, b, T, dev, dtype, args, tol):
    torch.manual_seed(1)
    x = torch.randn(b, T, d["hidden"], device=dev, dtype=dtype, requires_grad=True)
    d_out = torch.randn(b, T, d["hidden"], device=dev, dtype=dtype)
    positions = torch.arange(T, device=dev)[None].expand(b, T)
    cos, sin = hf.DeepseekV3RotaryEmbedding(config).to(dev)(x, positions)
    names = [n for n, _ in ref.named_parameters()]
    ref_params, our_params = [ref.get_parameter(n) for n in names], [ours.get_parameter(n) for n in names]

    def step_transformers():
        out = ref(x, (cos, sin), None)[0]
        return (out,) + torch.autograd.grad(out, [x] + ref_params, d_out)

    def step_mla():
        out = ours(x)
        return (out,) + torch.autograd.grad(out, [x] + our_params, d_out)

    keys = ["out", "d_hidden"] + names
    want = [t.detach() for t in step_transformers()]
    got = [t.detach() for t in step_mla()]
    checks = {k: finite_reldiff(g, w) for k, g, w in zip(keys, got, want)}
    worst_key = max(checks, key=checks.get)
    row = dict(batch=b, tokens=T, checks=checks, worst_check=checks[worst_key], worst_check_tensor=worst_key, tol=tol)
    print(f"b{b} T{T} check mla vs transformers: worst {checks[worst_key]:.2e} ({worst_key}); "
          + ", ".join(f"{k} {v:.1e}" for k, v in checks.items()), flush=True)

    if dtype != torch.float32 and T <= args.fp32_ref_tokens:  # which side is nearer the float32 result
        try:
            ref32 = copy.deepcopy(ref).float()
            x32 = x.detach().float().requires_grad_(True)
            cos32, sin32 = hf.DeepseekV3RotaryEmbedding(config).to(dev)(x32, positions)
            out32 = ref32(x32, (cos32, sin32), None)[0]
            exact = [out32.detach()] + list(torch.autograd.grad(out32, [x32] + list(ref32.parameters()), d_out.float()))
            for side, res in (("mla", got), ("transformers", want)):
                diffs = {k: finite_reldiff(r, e) for k, r, e in zip(keys, res, exact)}
                row[f"{side}_vs_fp32"] = diffs
                print(f"b{b} T{T} {side} vs transformers float32: worst {max(diffs.values()):.2e} "
                      f"({max(diffs, key=diffs.get)})", flush=True)
            del ref32, x32, out32, exact
        except Exception as ex:
            row["fp32_reference"] = f"failed ({type(ex).__name__}: {str(ex)[:120]})"
            print(f"b{b} T{T} float32 reference: {row['fp32_reference']}", flush=True)
    del want, got
    if dev.type == "cuda":
        torch.cuda.empty_cache()

    steps = {"mla": step_mla, "transformers": step_transformers}
    launch, method, graphs = {}, {}, []
    for name, f in steps.items():
        method[name] = "eager"
        if dev.type == "cuda" and not args.no_graph:
            try:
                graphs.append(graph_of(f, 1))
                launch[name], method[name] = graphs[-1].replay, "graph"
                launch[name + " eager"] = f
                continue
            except Exception as ex:
                torch.cuda.synchronize()
                method[name] = f"eager ({capture_error(ex)})"
                print(f"b{b} T{T} {name}: CUDA graph capture failed, timed eagerly: {method[name]}", flush=True)
        launch[name] = f
    if dev.type == "cuda":
        t = time_interleaved(launch, rounds=args.rounds)
    else:
        t = time_interleaved_host(launch, args.rounds)
    ms = {k: v * 1e3 for k, v in t.items()}
    eager = {s: ms.get(s + " eager", ms[s]) for s in steps}
    fwd, bwd = flop_count(d, b, T)
    row.update(gflop=(fwd + bwd) / 1e9, gflop_forward=fwd / 1e9, gflop_backward=bwd / 1e9,
               mla_ms=ms["mla"], transformers_ms=ms["transformers"], speedup=ms["transformers"] / ms["mla"],
               mla_TFLOPS=(fwd + bwd) / ms["mla"] / 1e9, transformers_TFLOPS=(fwd + bwd) / ms["transformers"] / 1e9,
               method=method, mla_eager_ms=eager["mla"], transformers_eager_ms=eager["transformers"],
               speedup_both_eager=eager["transformers"] / eager["mla"], rounds=args.rounds)
    del graphs, launch
    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
    return row


def table(rows, unit):
    short = {"graph": "graph", "eager": "eager"}
    lines = [f"{'rows':14} {'mla ms':>9} {'tf+SDPA ms':>10} {'speedup':>8} {'mla ' + unit:>12} {'tf ' + unit:>11} "
             f"{'eager x':>8} {'worst diff':>10}  method (mla / tf)"]
    per = 1.0 if unit == "TFLOP/s" else 1e3  # GFLOP/s on the CPU
    for r in rows:
        how = "{} / {}".format(*(short.get(r["method"][s], "eager*") for s in ("mla", "transformers")))
        lines.append(f"{'b%d T%d' % (r['batch'], r['tokens']):14} {r['mla_ms']:9.3f} {r['transformers_ms']:10.3f} "
                     f"{r['speedup']:7.2f}x {r['mla_TFLOPS'] * per:12.1f} "
                     f"{r['transformers_TFLOPS'] * per:11.1f} {r['speedup_both_eager']:7.2f}x "
                     f"{r['worst_check']:10.1e}  {how}"
                     + ("  CHECK FAILED" if r["worst_check"] > r["tol"] else ""))
    if any(short.get(v) is None for r in rows for v in r["method"].values()):
        lines.append("eager*: CUDA graph capture failed; the reason is in the json's method field and printed above")
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, nargs="+", help="sequence lengths, one row each (default 4096 16384; "
                   "smoke: 64)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--rounds", type=int, default=9, help="interleaved timed rounds (median)")
    p.add_argument("--tol", type=float, help="worst relative L2 difference allowed (5e-2 bf16, 1e-4 float32)")
    p.add_argument("--fp32-ref-tokens", type=int, default=4096, help="compare with transformers in float32 up to T")
    p.add_argument("--dtype", choices=["bfloat16", "float32"], help="default bfloat16 on CUDA, float32 on the CPU")
    p.add_argument("--no-graph", action="store_true", help="time both sides eagerly")
    p.add_argument("--smoke", action="store_true", help="a tiny layer (hidden 64, 4 heads), T=64; CPU if no GPU")
    p.add_argument("--json", help="write every number here")
    args = p.parse_args()

    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, args.dtype or ("bfloat16" if dev.type == "cuda" else "float32"))
    d = SMOKE if args.smoke else V3
    tokens = args.tokens or ([64] if args.smoke else [4096, 16384])
    tol = args.tol if args.tol is not None else (5e-2 if dtype == torch.bfloat16 else 1e-4)
    if args.smoke:
        args.rounds = min(args.rounds, 3)
    if dev.type == "cpu":
        args.no_graph = True

    config = hf_config(d)
    ref, ours = build_layers(config, dev, dtype)
    env = dict(device=torch.cuda.get_device_name() if dev.type == "cuda" else f"cpu ({platform.machine()})",
               torch=torch.__version__, transformers=transformers.__version__, python=platform.python_version(),
               cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version() if dev.type == "cuda" else None,
               mla=getattr(mla, "__version__", None), commit=os.environ.get("MLA_COMMIT"), dtype=str(dtype),
               config=d, rope=YARN, softmax_scale=ref.scaling, smoke=args.smoke,
               **sdpa_environment(d, args.batch, tokens[0], dev, dtype, ref.scaling))
    print(" ".join(f"{k} {env[k]}" for k in ("device", "torch", "transformers", "cuda", "cudnn", "dtype")))
    if "sdpa_enabled" in env:
        print("SDPA backends enabled: " + ", ".join(k for k, on in env["sdpa_enabled"].items() if on)
              + f"; torch picks {env['sdpa_choice']} for b{args.batch} T{tokens[0]}")
    else:
        print(f"SDPA on {dev.type}: torch picks {env['sdpa_choice']}")

    rows = [bench_row(ref, ours, config, d, args.batch, T, dev, dtype, args, tol) for T in tokens]
    unit = "TFLOP/s" if dev.type == "cuda" else "GFLOP/s"
    print(f"\n{'V3' if d is V3 else 'tiny'} attention layer forward+backward (all weight grads + d_hidden), {dtype}, "
          f"same run, median of {args.rounds} interleaved rounds; speedup = transformers ms / mla ms")
    print(table(rows, unit))
    target = [r for r in rows if d is V3 and r["batch"] == 1 and r["tokens"] == 4096]
    if target:
        print(f"target b1 T4096 >= 1.5x: {target[0]['speedup']:.2f}x "
              f"({'reached' if target[0]['speedup'] >= 1.5 else 'not reached'})")
    if args.json:
        with open(args.json + ".tmp", "w") as f:
            json.dump(dict(env=env, rows=rows), f, indent=1)
        os.replace(args.json + ".tmp", args.json)
    worst = max(r["worst_check"] for r in rows)
    if worst > tol:
        sys.exit(f"layer_train_vs_sdpa: mla and transformers disagree (worst relative difference {worst:.2e} > {tol})")


if __name__ == "__main__":
    main()
