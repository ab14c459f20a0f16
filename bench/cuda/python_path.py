"""What the Python call adds to a decode on the GPU: mla.decode_with_kvcache (the torch custom operator, with a
DecodeSchedule) against the C++ planned run called directly through the extension (`_mla.decode` into preallocated
out / lse / workspace, splits_ready), on the same tensors, each captured 20 times in one CUDA graph, replays
interleaved; then the kernels one eager call of each launches (torch.profiler), so that any extra GPU work of
the Python path is named.

    PYTHONPATH=<mla package> python3 bench/cuda/python_path.py

MLA_BENCH_ONLY=<substring> keeps the rows whose name contains it.
"""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from vs_anchors import graph_of, time_interleaved  # noqa: E402

import mla  # noqa: E402
from mla import _mla  # noqa: E402

ROWS = [  # name, batch, s_q, h_q, s_k
    ("b128 s_k8192 h128", 128, 1, 128, 8192),
    ("b128 s_k8192 h16", 128, 1, 16, 8192),
    ("b1 s_k4096 h128", 1, 1, 128, 4096),
    ("b32 s_k4096 h128", 32, 1, 128, 4096),
]
PAGE = 64


def kernels_of(fn):
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return sorted({e.name[:60] for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA})


def main():
    torch.manual_seed(0)
    only = os.environ.get("MLA_BENCH_ONLY", "")
    print(f"{'row':22} {'python ms':>10} {'direct ms':>10} {'python/direct':>13} {'out equal':>9}")
    for name, b, s_q, h_q, s_k in ROWS:
        if only not in name:
            continue
        pages = (s_k + PAGE - 1) // PAGE
        table = torch.randperm(b * pages, device="cuda", dtype=torch.int32).reshape(b, pages)
        kv = (torch.randn(b * pages, PAGE, 1, 576, device="cuda") / 10).clamp(-1, 1).bfloat16()
        q = (torch.randn(b, s_q, h_q, 576, device="cuda") / 10).clamp(-1, 1).bfloat16()
        seqlens = torch.full((b,), s_k, device="cuda", dtype=torch.int32)
        scale = 576 ** -0.5
        sched = mla.DecodeSchedule()
        outs = {}

        def python_call():
            outs["python"] = mla.decode_with_kvcache(q, kv, table, seqlens, head_dim_v=512, softmax_scale=scale,
                                                     causal=True, schedule=sched)[0]

        nbytes = _mla.decode_workspace_bytes(b, s_q, h_q, 576, 512, PAGE, "bfloat16", "cuda")
        ws = torch.empty(max(nbytes, 1), dtype=torch.uint8, device="cuda")
        out = torch.empty(b, s_q, h_q, 512, dtype=torch.bfloat16, device="cuda")
        lse = torch.empty(b, h_q, s_q, dtype=torch.float32, device="cuda")
        _mla.decode(q, kv, table, seqlens, out, lse, 512, scale, True, workspace=ws,
                    stream=torch.cuda.current_stream().cuda_stream)  # writes the work list
        torch.cuda.synchronize()

        def direct_call():
            _mla.decode(q, kv, table, seqlens, out, lse, 512, scale, True, workspace=ws,
                        stream=torch.cuda.current_stream().cuda_stream, splits_ready=True)
            outs["direct"] = out

        graphs = {"python": graph_of(python_call), "direct": graph_of(direct_call)}
        t = time_interleaved({k: g.replay for k, g in graphs.items()}, rounds=15, per=20)
        tp, td = t["python"] * 1e3, t["direct"] * 1e3
        equal = torch.equal(outs["python"], outs["direct"])
        print(f"{name:22} {tp:10.4f} {td:10.4f} {tp / td:12.3f}x {str(equal):>9}")
        print(f"  kernels, python call: {kernels_of(python_call)}")
        print(f"  kernels, direct call: {kernels_of(direct_call)}")


if __name__ == "__main__":
    main()
