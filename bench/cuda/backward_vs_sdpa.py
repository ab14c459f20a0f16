"""mla's attention backward (mla.prefill_backward: varlen, 192/128, causal, bf16) beside the backward of torch SDPA's
cuDNN backend, same run, same tensors: the five prefill shapes of ../shared/PERFORMANCE.md.

    PYTHONPATH=<mla package> python3 bench/cuda/backward_vs_sdpa.py [--json OUT.json]

SDPA's side is torch.autograd.grad of its output with the forward's graph kept (retain_graph), so only its backward
runs; mla's side is one torch.ops.mla.prefill_backward call with the forward's out and lse. Each side is captured
in a CUDA graph where it can be (else timed eagerly, and the row says so), replays interleaved, median. The
gradients are compared (relative L2 difference) before timing. FLOPs counted as 2.5x the causal forward's
(FlashAttention's convention: five GEMMs of the forward's two).
"""
import json
import os
import sys

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from vs_anchors import PREFILL_CASES, graph_of, reldiff, time_interleaved  # noqa: E402

import mla  # noqa: E402


def main():
    args = sys.argv[1:]
    out_path = args[args.index("--json") + 1] if "--json" in args else None
    rows = [dict(section="env", gpu=torch.cuda.get_device_name(), torch=torch.__version__)]
    print(f"{'shape':16} {'mla ms':>9} {'cuDNN ms':>9} {'mla TFLOP/s':>11} {'vs cuDNN':>9}  grad reldiff (q, k, v)")
    for b, H, T in PREFILL_CASES:
        torch.manual_seed(0)
        dev, scale = "cuda", 192 ** -0.5
        q = torch.randn(b, H, T, 192, device=dev, dtype=torch.bfloat16, requires_grad=True)
        k = torch.randn(b, H, T, 192, device=dev, dtype=torch.bfloat16, requires_grad=True)
        v = torch.randn(b, H, T, 128, device=dev, dtype=torch.bfloat16, requires_grad=True)
        d_out = torch.randn(b, H, T, 128, device=dev, dtype=torch.bfloat16)
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            ref_out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)

        def packed(x):  # [b, H, T, d] -> [b·T, H, d]
            return x.detach().transpose(1, 2).reshape(b * T, H, x.shape[-1]).contiguous()

        qp, kp, vp, dop = packed(q), packed(k), packed(v), packed(d_out)
        cu = torch.arange(0, (b + 1) * T, T, dtype=torch.int32)  # host lengths: no copy, capturable
        out, lse = mla.prefill(qp, kp, vp, cu.cuda(), cu.cuda(), causal=True, softmax_scale=scale)
        grads = {}

        def f_cudnn():
            grads["cudnn"] = torch.autograd.grad(ref_out, (q, k, v), d_out, retain_graph=True)

        def f_mla():
            grads["mla"] = torch.ops.mla.prefill_backward(qp, kp, vp, out, lse, dop, cu, cu, scale, True)

        f_cudnn()
        f_mla()
        diff = [reldiff(grads["mla"][i], packed(grads["cudnn"][i])) for i in range(3)]
        launch, how = {}, {}
        for name, f in (("cudnn", f_cudnn), ("mla", f_mla)):
            for attempt in range(2):  # cuDNN's first capture in a process can fail on its lazy set-up: once more
                try:
                    launch[name], how[name] = graph_of(f, 2).replay, "graph"
                    break
                except Exception as ex:
                    torch.cuda.synchronize()
                    launch[name], how[name] = f, f"eager ({type(ex).__name__}: {str(ex)[:80]})"
        per = {k: 2 if how[k] == "graph" else 1 for k in launch}
        t = {k: s * 1e3 for k, s in time_interleaved(launch, rounds=7, per=per).items()}
        flop = 2.5 * 2 * b * H * (T * T / 2) * (192 + 128)
        row = dict(section="backward", case=f"b{b} H{H} T{T}", mla_ms=t["mla"], cudnn_ms=t["cudnn"],
                   speed_vs_cudnn=t["cudnn"] / t["mla"], mla_TFLOPS=flop / t["mla"] / 1e9,
                   cudnn_TFLOPS=flop / t["cudnn"] / 1e9, grad_reldiff=diff, timing=how)
        rows.append(row)
        print(f"{row['case']:16} {t['mla']:9.3f} {t['cudnn']:9.3f} {row['mla_TFLOPS']:11.0f} "
              f"{row['speed_vs_cudnn']:8.2f}x  {diff[0]:.1e} {diff[1]:.1e} {diff[2]:.1e}"
              + ("" if how["mla"] == "graph" and how["cudnn"] == "graph" else f"  {how}"), flush=True)
        del q, k, v, ref_out, grads, launch
    if out_path:
        with open(out_path + ".tmp", "w") as f:
            json.dump(rows, f, indent=1)
        os.replace(out_path + ".tmp", out_path)


if __name__ == "__main__":
    main()
