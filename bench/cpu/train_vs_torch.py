"""CPU training benchmark (issue 13): the V2-Lite attention layer's forward + backward over one sequence of T
tokens, mla's fast path against PyTorch eager float32 autograd of transformers' DeepseekV3Attention, on the same
random weights and inputs, the same threads, in the same run.

Rows, timed in turn within every repetition (interleaved, so that the shared machine's drifts hit all alike), medians
after warm-up:
- mla: mla.train.forward + mla.train.backward (NumPy in and out: the C++ fast path plus the copies to NumPy);
- mla module: mla.train.MultiheadLatentAttention (fast path) under torch autograd, backward(); its operators
  rebuild the C++ weights from the parameters and copy the saved state to tensors and back, so it costs a little
  more;
- torch eager / torch sdpa: DeepseekV3Attention with transformers' eager attention (explicit [H, T, T] softmax) and
  with torch's scaled_dot_product_attention, forward + backward (out·d_out).sum().backward().

Checks (before timing): the output, d_hidden and every weight gradient of mla against each torch row, relative
Frobenius error; exits non-zero past 1e-4. FLOPs: the dense count of the projections (forward 2·T·Σ in·out,
backward twice that) and of the causal attention (T(T+1)/2 query-key pairs per head; forward q·k over d_n + d_r and
P·V over d_v, backward five such products), which every row does at least.

Usage: PYTHONPATH=<folder with the mla package> ~/.cache/mla-bench-venv/bin/python bench/cpu/train_vs_torch.py
       [--tokens 1024] [--reps 5] [--threads 2]
"""
import argparse
import copy
import json
import pathlib
import platform
import statistics
import sys
import time

import numpy as np
import torch
import transformers
from transformers.models.deepseek_v3 import modeling_deepseek_v3 as hf

import mla
import mla.train as train

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))  # bench/, for v2lite
import v2lite  # noqa: E402

p = argparse.ArgumentParser()
p.add_argument("--tokens", type=int, default=1024)
p.add_argument("--reps", type=int, default=5, help="timed repetitions per row (median)")
p.add_argument("--warmup", type=int, default=1)
p.add_argument("--threads", type=int, default=2)
args = p.parse_args()
torch.set_num_threads(args.threads)
T = args.tokens

# DeepSeek-V2-Lite's attention (bench/v2lite.py, shared with bench/transformers_anchor.py).
config = v2lite.config()
D, H, DC, DN, DR, DV = v2lite.D, v2lite.H, v2lite.DC, v2lite.DN, v2lite.DR, v2lite.DV
DQK = DN + DR


def log(*what):
    print(*what, file=sys.stderr, flush=True)


def rel_err(a, b):
    a, b = torch.as_tensor(a).double(), torch.as_tensor(b).double()
    return float((a - b).norm() / b.norm())


def loadavg():
    return " ".join(open("/proc/loadavg").read().split()[:3])


load_before = loadavg()
torch.manual_seed(0)
base = hf.DeepseekV3Attention(config, layer_idx=0).float()
with torch.no_grad():  # random weights at the scale of a trained layer (as transformers_anchor.py)
    for name, w in base.named_parameters():
        w.copy_(1 + 0.2 * torch.randn_like(w) if "layernorm" in name else torch.randn_like(w) * w.shape[-1] ** -0.5)
tensors = {k: v.detach().numpy().copy() for k, v in base.state_dict().items()}
mla_config = mla.Config.from_json(json.dumps(config.to_dict(), default=str))
weights = train.weights_from_tensors(mla_config, tensors)

x = torch.randn(T, D)
d_out = torch.randn(T, D)
cu = np.array([0, T], np.int32)
rotary = hf.DeepseekV3RotaryEmbedding(config)
cos, sin = rotary(x[None], torch.arange(T)[None])


def torch_layer(attn):
    layer = copy.deepcopy(base)
    layer.config = copy.deepcopy(config)
    layer.config._attn_implementation = attn
    mask = torch.full((T, T), float("-inf")).triu(1)[None, None] if attn == "eager" else None
    xg = x[None].clone().requires_grad_(True)

    def run():
        layer.zero_grad(set_to_none=True)
        xg.grad = None
        out = layer(xg, (cos, sin), mask)[0]
        (out * d_out[None]).sum().backward()
        return out.detach()[0], xg.grad[0], {k: p.grad for k, p in layer.named_parameters()}

    return run


def mla_functions():
    out, saved = train.forward(weights, x.numpy(), cu)
    d_hidden, grads = train.backward(weights, saved, d_out.numpy())
    return out, d_hidden, grads


module = train.MultiheadLatentAttention(mla_config)
module.load_state_dict(base.state_dict())
xm = x.clone().requires_grad_(True)


def mla_module():
    module.zero_grad(set_to_none=True)
    xm.grad = None
    out = module(xm)
    (out * d_out).sum().backward()
    return out.detach(), xm.grad, {k: p.grad for k, p in module.named_parameters()}


rows = {"mla": mla_functions, "mla module": mla_module, "torch eager": torch_layer("eager"),
        "torch sdpa": torch_layer("sdpa")}

# Checks: mla against each torch row (and the module against the functions).
checks = {}
ref_out, ref_dx, ref_grads = mla_functions()
for name in ("mla module", "torch eager", "torch sdpa"):
    out, dx, grads = rows[name]()
    errs = {"out": rel_err(out, ref_out), "d_hidden": rel_err(dx, ref_dx)}
    errs.update({k: rel_err(grads[k], ref_grads[k]) for k in ref_grads})
    checks[name] = errs
    log(f"check mla vs {name}: worst {max(errs.values()):.2e} ({max(errs, key=errs.get)})")
worst = max(max(e.values()) for e in checks.values())

times = {name: [] for name in rows}
for rep in range(args.warmup + args.reps):
    for name, f in rows.items():
        t0 = time.perf_counter()
        f()
        if rep >= args.warmup:
            times[name].append(time.perf_counter() - t0)
    log(f"rep {rep}: " + ", ".join(f"{n} {times[n][-1] * 1e3:.0f} ms" for n in rows if times[n]))
load_after = loadavg()

proj = D * H * DQK + D * (DC + DR) + DC * H * (DN + DV) + H * DV * D  # multiply-adds per token
pairs = H * T * (T + 1) // 2
flops_fwd = 2 * T * proj + 2 * pairs * (DQK + DV)
flops_bwd = 2 * 2 * T * proj + 2 * pairs * (3 * DQK + 2 * DV)
flops = flops_fwd + flops_bwd
med = {n: statistics.median(t) for n, t in times.items()}
res = {
    "tokens": T, "threads": args.threads, "reps": args.reps, "warmup": args.warmup,
    "torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version(),
    "cpu_capability": torch.backends.cpu.get_cpu_capability(), "numpy": np.__version__,
    "gflop": flops / 1e9, "gflop_forward": flops_fwd / 1e9, "gflop_backward": flops_bwd / 1e9,
    "median_ms": {n: v * 1e3 for n, v in med.items()}, "times_ms": {n: [t * 1e3 for t in v] for n, v in times.items()},
    "gflops": {n: flops / v / 1e9 for n, v in med.items()},
    "speedup_of_mla": {n: med[n] / med["mla"] for n in rows},
    "checks": checks, "worst_check": worst, "load_before": load_before, "load_after": load_after,
}
print(json.dumps(res, indent=1))
log(f"\nV2-Lite layer forward+backward, T={T}, {args.threads} threads, {flops / 1e9:.1f} GFLOP "
    f"(forward {flops_fwd / 1e9:.1f}, backward {flops_bwd / 1e9:.1f})")
for n in rows:
    log(f"  {n:12s} {med[n] * 1e3:8.1f} ms  {flops / med[n] / 1e9:6.1f} GFLOP/s  "
        f"mla is {med[n] / med['mla']:.2f}x faster")
log(f"load average before {load_before}, after {load_after}; worst check {worst:.2e}")
if worst > 1e-4:
    sys.exit(f"train_vs_torch: mla and torch disagree (worst relative error {worst:.2e} > 1e-4)")
