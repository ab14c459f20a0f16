"""mla's decode over an fp8 cache against the same decode over a bf16 cache, same run, same rows (the bf16 cache
holds the fp8 rows dequantised), each side's call captured 20 times in one CUDA graph, replays interleaved.

    PYTHONPATH=<mla package> python3 bench/cuda/fp8_vs_bf16.py

MLA_BENCH_ONLY=<substring> keeps the rows whose name contains it (as scripts/gpu.sh does). Rows with h_q·s_q <= 32
also time the opt-in 16-row fp8 kernel (MLA_CUDA_DECODE_FP8_ROWS16=1 while its graph is captured) in the same
interleaved rounds, with its own max |diff| against the bf16 cache (it multiplies the fp8 values exactly instead of
bf16(fp8 · scale), so it is not bit-identical). TB/s: the fp8 rows' bytes (656 a key) over the rows16 time.
"""
import os
import statistics

import torch

import mla

ROWS = [  # name, batch, s_q, h_q, s_k
    ("b128 s_k8192 h16", 128, 1, 16, 8192),
    ("b128 s_k32768 h16", 128, 1, 16, 32768),
    ("b8 s_k4096 h16", 8, 1, 16, 4096),
    ("b64 s_q2 s_k8192 h16", 64, 2, 16, 8192),
    ("b128 s_k8192 h128", 128, 1, 128, 8192),
    ("b1 s_k65536 h128", 1, 1, 128, 65536),
]
PAGE = 64
POOL = 4096  # pages: 172 MB of fp8 rows, 302 MB of bf16


def graph_of(fn, reps=20):
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        fn()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(reps):
            fn()
    return g


def time_graph(g, reps=20):
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    g.replay()
    b.record()
    torch.cuda.synchronize()
    return a.elapsed_time(b) / reps


def main():
    torch.manual_seed(0)
    # One pool of random rows (far larger than L2) that every row's block tables draw pages from.
    rows = torch.randn(POOL, PAGE, 1, 576) * 0.5
    fp8 = mla.quantize_fp8_kvcache(rows).cuda()
    bf16 = mla.dequantize_fp8_kvcache(fp8.cpu()).to(torch.bfloat16).cuda()
    print(f"{'row':24} {'bf16 ms':>9} {'fp8 ms':>9} {'fp8 speedup':>11} {'max |diff|':>10} "
          f"{'rows16 ms':>9} {'rows16 speedup':>14} {'rows16 TB/s':>11} {'max |diff|':>10}")
    only = os.environ.get("MLA_BENCH_ONLY", "")
    for name, b, s_q, h_q, s_k in ROWS:
        if only not in name:
            continue
        pages = (s_k + PAGE - 1) // PAGE
        table = torch.randint(0, POOL, (b, pages), device="cuda", dtype=torch.int32)
        seqlens = torch.full((b,), s_k, device="cuda", dtype=torch.int32)
        q = (torch.randn(b, s_q, h_q, 576, device="cuda") * 0.5).to(torch.bfloat16)
        outs = {}

        def call(kv, is_fp8, key):
            def f():
                outs[key] = mla.decode_with_kvcache(q, kv, table, seqlens, 512, causal=True, is_fp8_kvcache=is_fp8)
            return f

        graphs = {"bf16": graph_of(call(bf16, False, "bf16")), "fp8": graph_of(call(fp8, True, "fp8"))}
        if s_q * h_q <= 32:
            os.environ["MLA_CUDA_DECODE_FP8_ROWS16"] = "1"
            graphs["rows16"] = graph_of(call(fp8, True, "rows16"))
            del os.environ["MLA_CUDA_DECODE_FP8_ROWS16"]
        times = {k: [] for k in graphs}
        for _ in range(10):
            for k, g in graphs.items():
                times[k].append(time_graph(g))

        def diff(key):
            return (outs["bf16"][0].float() - outs[key][0].float()).abs().max().item()

        mb, mf = statistics.median(times["bf16"]), statistics.median(times["fp8"])
        line = f"{name:24} {mb:9.4f} {mf:9.4f} {mb / mf:10.2f}x {diff('fp8'):10.2e}"
        if "rows16" in times:
            mr = statistics.median(times["rows16"])
            line += f" {mr:9.4f} {mb / mr:13.2f}x {b * s_k * 656 / (mr * 1e-3) / 1e12:11.2f} {diff('rows16'):10.2e}"
        print(line)


if __name__ == "__main__":
    main()
