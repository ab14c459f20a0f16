"""mla beside the anchors, in one run, on identical tensors (run by scripts/gpu.sh on the GPU machine).

    python3 bench/cuda/vs_anchors.py --json OUT.json [grid] [decode] [prefill]

decode:  mla.decode_with_kvcache (with a DecodeSchedule, i.e. the work list computed once, as the anchors' metadata
         objects are; and without one, "no sched") beside FlashMLA's flash_mla_with_kvcache and FlashAttention-3's MLA decode
         (flash_attn_with_kvcache with q_pe + qv over strided views of the cache, as vLLM's FLASH_ATTN_MLA backend
         calls it), each call captured N times in one CUDA graph, replays interleaved, median per call. An anchor
         that is not importable is left out and no ratio is printed against it.
prefill: mla.prefill (varlen, 192/128, causal) beside torch SDPA's cuDNN backend, each call captured in a CUDA graph
         where it can be (else timed eagerly, and the row says so), interleaved, median.
grid:    FlashMLA's own dense-decode test grid (its data generator, torch reference and tolerances) run against
         mla.decode_with_kvcache; needs FlashMLA's tests/ folder on PYTHONPATH.

Every timed pair is checked to agree (relative L2 difference of the outputs) before it is timed.
The anchors are built from snapshots in the git-ignored .anchors/ folder (docs/benchmarks.md); none of their code
is in this repository.
"""
import json
import math
import os
import random
import sys
import time
import traceback

import torch

dev = torch.device("cuda")
REPS = 20  # calls per graph


def graph_of(fn, n=REPS):
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(n):
            fn()
    torch.cuda.synchronize()
    return g


def time_interleaved(fns, rounds=15, per=1):
    """fns: name -> callable launching work; returns name -> median seconds per call. per: calls per launch, one
    number for all or name -> number."""
    per = per if isinstance(per, dict) else {k: per for k in fns}
    ts = {k: [] for k in fns}
    for f in fns.values():
        f()
        f()
    torch.cuda.synchronize()
    for _ in range(rounds):
        for k, f in fns.items():
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            f()
            b.record()
            torch.cuda.synchronize()
            ts[k].append(a.elapsed_time(b) / 1e3 / per[k])
    return {k: sorted(v)[len(v) // 2] for k, v in ts.items()}


def reldiff(a, b):
    a, b = a.float(), b.float()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def try_import(name):
    try:
        return __import__(name)
    except Exception as ex:  # an anchor that is not built: no column, no ratio
        print(f"anchor {name}: not available ({type(ex).__name__}: {str(ex)[:120]})", file=sys.stderr)
        return None


DECODE_CASES = [  # (name, lengths, s_q, h_q): the rows of the project's decode table
    ("b128 s_q1 s_k4096 h128", [4096] * 128, 1, 128), ("b128 s_q1 s_k8192 h128", [8192] * 128, 1, 128),
    ("b128 s_q1 s_k16384 h128", [16384] * 128, 1, 128), ("b128 s_q1 s_k32768 h128", [32768] * 128, 1, 128),
    ("b128 s_q2 s_k8192 h128", [8192] * 128, 2, 128), ("b64 s_q4 s_k8192 h128 (MTP)", [8192] * 64, 4, 128),
    ("b128 s_q1 s_k8192 h16", [8192] * 128, 1, 16), ("b128 s_q1 s_k32768 h16", [32768] * 128, 1, 16),
    ("b64 s_q1 s_k8192 h64", [8192] * 64, 1, 64), ("b1 s_q1 s_k65536 h128", [65536], 1, 128),
    ("b8 s_q1 s_k4096 h16", [4096] * 8, 1, 16), ("b1 s_q1 s_k4096 h128 (V3 step)", [4096], 1, 128),
    ("b32 s_q1 s_k4096 h128 (V3 step)", [4096] * 32, 1, 128),
    ("imbalanced 65536+63x1024 h128", [65536] + [1024] * 63, 1, 128),
    ("imbalanced 32x(256,16384) h16", [256, 16384] * 32, 1, 16), ("long 2x131072 h128", [131072] * 2, 1, 128),
    ("moderate 32x4096 h128", [4096] * 32, 1, 128), ("long 4x32768 h16", [32768] * 4, 1, 16),
    ("varlen 64x(1..8192) s_q2 h128", [1 + (i * 2654435761) % 8192 for i in range(64)], 2, 128),
]


def decode_bench(rows, page=64):
    import mla
    flash_mla = try_import("flash_mla")
    fa3 = try_import("flash_attn_interface")
    only = os.environ.get("MLA_BENCH_ONLY")
    for name, lens, s_q, h_q in DECODE_CASES:
        if only and only not in name:
            continue
        try:
            torch.manual_seed(0)
            b = len(lens)
            nblk = [math.ceil(n / page) for n in lens]
            perm = torch.randperm(sum(nblk), device=dev, dtype=torch.int32)
            table = torch.zeros(b, max(nblk), dtype=torch.int32, device=dev)
            o = 0
            for i, n in enumerate(nblk):
                table[i, :n] = perm[o:o + n]
                o += n
            q = (torch.randn(b, s_q, h_q, 576, device=dev) / 10).clamp(-1, 1).bfloat16()
            kv = (torch.randn(sum(nblk), page, 1, 576, device=dev) / 10).clamp(-1, 1).bfloat16()
            seqlens = torch.tensor(lens, dtype=torch.int32, device=dev)
            scale = 576 ** -0.5
            sched = mla.DecodeSchedule()  # the work list once, as FlashMLA's metadata and FA3's scheduler_metadata
            fns = {"mla": lambda: mla.decode_with_kvcache(q, kv, table, seqlens, head_dim_v=512, softmax_scale=scale,
                                                          causal=True, schedule=sched),
                   "mla_call": lambda: mla.decode_with_kvcache(q, kv, table, seqlens, head_dim_v=512,
                                                               softmax_scale=scale, causal=True)}
            if s_q * h_q <= 16:  # A/B: the sm90 kernel on 64-row blocks instead of the 16-row sm80 kernel
                sched64 = mla.DecodeSchedule()

                def pad64():
                    os.environ["MLA_CUDA_DECODE_SM90_SMALL"] = "1"
                    try:
                        return mla.decode_with_kvcache(q, kv, table, seqlens, head_dim_v=512, softmax_scale=scale,
                                                       causal=True, schedule=sched64)
                    finally:
                        del os.environ["MLA_CUDA_DECODE_SM90_SMALL"]
                fns["mla_pad64"] = pad64
            if flash_mla is not None:
                meta, _ = flash_mla.get_mla_metadata()
                fns["flashmla"] = lambda: flash_mla.flash_mla_with_kvcache(q, kv, table, seqlens, 512, meta, None,
                                                                           softmax_scale=scale, causal=True)
            if fa3 is not None:
                c_cache, pe_cache = kv[..., :512], kv[..., 512:]  # strided views of the same cache, as vLLM
                q_nope, q_pe = q[..., :512].contiguous(), q[..., 512:].contiguous()
                meta_fa = fa3.get_scheduler_metadata(b, s_q, max(lens), h_q, 1, 64, seqlens, q.dtype, headdim_v=512,
                                                     page_size=page, causal=True)
                fns["fa3"] = lambda: fa3.flash_attn_with_kvcache(q_pe, pe_cache, c_cache, qv=q_nope, cache_seqlens=seqlens,
                                                                 page_table=table, causal=True, softmax_scale=scale,
                                                                 scheduler_metadata=meta_fa, return_softmax_lse=True)
            outs = {k: f()[0] for k, f in fns.items()}
            agree = {f"{k}_out_reldiff": reldiff(outs["mla"], v) for k, v in outs.items() if k != "mla"}
            graphs = {k: graph_of(f) for k, f in fns.items()}
            t = time_interleaved({k: g.replay for k, g in graphs.items()}, per=REPS)
            tot = sum(lens)
            flop = h_q * s_q * tot * 2 * (576 + 512)
            byts = 2 * (tot * 576 + b * s_q * h_q * (576 + 512))
            row = dict(section="decode", case=name, page=page, **{f"{k}_ms": v * 1e3 for k, v in t.items()},
                       mla_TFLOPS=flop / t["mla"] / 1e12, mla_GBps=byts / t["mla"] / 1e9, **agree)
            anchors = [k for k in t if not k.startswith("mla")]
            if anchors:
                best = min(anchors, key=lambda k: t[k])
                row.update(best_anchor=best, speed_vs_best=t[best] / t["mla"],
                           **{f"speed_vs_{k}": t[k] / t["mla"] for k in anchors})
            rows.append(row)
            print(json.dumps(row), flush=True)
            del graphs, q, kv, table
        except Exception:
            rows.append(dict(section="decode", case=name, error=traceback.format_exc()[-800:]))
            print(rows[-1]["error"], file=sys.stderr)


PREFILL_CASES = [(1, 128, 4096), (1, 128, 16384), (4, 16, 8192), (1, 16, 32768), (8, 128, 1024)]


def prefill_bench(rows):
    import mla
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel
    for b, H, T in PREFILL_CASES:
        try:
            torch.manual_seed(0)
            q = torch.randn(b, H, T, 192, device=dev, dtype=torch.bfloat16)
            k = torch.randn(b, H, T, 192, device=dev, dtype=torch.bfloat16)
            v = torch.randn(b, H, T, 128, device=dev, dtype=torch.bfloat16)
            scale = 192 ** -0.5
            qv, kk, vv = (x.transpose(1, 2).reshape(b * T, H, x.shape[-1]).contiguous() for x in (q, k, v))
            cu = torch.arange(0, (b + 1) * T, T, dtype=torch.int32, device=dev)

            def f_cudnn():
                with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                    return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)

            def f_mla():
                return mla.prefill(qv, kk, vv, cu, cu, causal=True, softmax_scale=scale)

            ref = f_cudnn().transpose(1, 2).reshape(b * T, H, 128)
            diff = reldiff(f_mla()[0], ref)
            fns, how = {"cudnn": f_cudnn, "mla": f_mla}, {}
            launch = {}
            for name, f in fns.items():
                try:
                    g = graph_of(f, 4)
                    launch[name], how[name] = g.replay, "graph"
                except Exception as ex:
                    torch.cuda.synchronize()
                    launch[name], how[name] = f, f"eager ({type(ex).__name__}: {str(ex)[:80]})"
            per = {k: 4 if how[k] == "graph" else 1 for k in launch}
            t = {k: v * 1e3 for k, v in time_interleaved(launch, rounds=9, per=per).items()}  # ms
            flop = 2 * b * H * (T * T / 2) * (192 + 128)
            row = dict(section="prefill", case=f"b{b} H{H} T{T}", mla_ms=t["mla"], cudnn_ms=t["cudnn"],
                       speed_vs_cudnn=t["cudnn"] / t["mla"], mla_TFLOPS=flop / t["mla"] / 1e9,
                       cudnn_TFLOPS=flop / t["cudnn"] / 1e9, out_reldiff=diff, timing=how)
            rows.append(row)
            print(json.dumps(row), flush=True)
        except Exception:
            rows.append(dict(section="prefill", case=f"b{b} H{H} T{T}", error=traceback.format_exc()[-800:]))
            print(rows[-1]["error"], file=sys.stderr)


def grid_test(rows, budget_s):
    import mla
    try:
        import kernelkit as kk
        import test_flash_mla_dense_decoding as T
    except Exception as ex:
        rows.append(dict(section="grid", error=f"FlashMLA's tests not importable: {ex}"))
        return
    torch.set_default_dtype(torch.bfloat16)
    torch.set_default_device(dev)
    cases = [T.TestParam(b, s_q, s_k, v, c, test_performance=False, block_size=64, h_q=h, h_kv=1)
             for b in [1, 2, 6, 64] for s_q in [1, 2, 4] for s_k in [20, 140, 4096]
             for h in [1, 3, 9, 63, 64, 126, 128] for v in [False, True] for c in [False, True]]
    cases += [T.TestParam(128, 2, 4096, is_varlen=True, is_causal=c, test_performance=False, have_zero_seqlen_k=True,
                          h_q=h, h_kv=1) for h in [1, 3, 9, 63, 64, 126, 128] for c in [False, True]]
    random.Random(1).shuffle(cases)
    t0, n, ok, fails = time.time(), 0, 0, []
    for t in cases:
        if time.time() - t0 > budget_s:
            break
        try:
            seqlens, q, table, kv = T.generate_test_data(t)
            out, lse = mla.decode_with_kvcache(q, kv, table, seqlens, head_dim_v=t.dv, causal=t.is_causal)
            ref_o, ref_l = T.reference_torch(seqlens, table, q, kv, t.dv, t.is_causal)
            good = kk.check_is_allclose("out", out, ref_o, abs_tol=8e-4, rel_tol=2.01 / 128, cos_diff_tol=5e-6, quiet=True)
            good &= kk.check_is_allclose("lse", lse, ref_l, abs_tol=1e-6, rel_tol=8.01 / 65536, quiet=True)
        except Exception as ex:
            good = False
            fails.append(f"{t}: {type(ex).__name__}: {str(ex)[:160]}")
        n += 1
        ok += bool(good)
        if not good and len(fails) < 8:
            fails.append(str(t))
    torch.set_default_device(None)
    torch.set_default_dtype(torch.float32)
    rows.append(dict(section="grid", run=n, passed=ok, total=len(cases), failures=fails[:8],
                     seconds=round(time.time() - t0, 1)))
    print(json.dumps(rows[-1]), flush=True)


def table(rows):
    """The short table (scripts/gpu.sh prints it last)."""
    lines = []
    dec = [r for r in rows if r["section"] == "decode" and "error" not in r]
    if dec:
        cols = [c for c in ("flashmla", "fa3") if any(f"{c}_ms" in r for r in dec)]
        lines.append(f"{'decode (same run, CUDA graphs)':36s} {'mla ms':>8s} {'(no sched)':>10s} "
                     + " ".join(f"{c + ' ms':>11s}" for c in cols)
                     + f" {'TFLOP/s':>8s} {'GB/s':>6s}" + (f" {'vs best':>8s}" if cols else ""))
        for r in dec:
            s = f"{r['case']:36s} {r['mla_ms']:8.4f} {r['mla_call_ms']:10.4f} " + " ".join(
                f"{r[c + '_ms']:11.4f}" if c + "_ms" in r else f"{'-':>11s}" for c in cols)
            s += f" {r['mla_TFLOPS']:8.1f} {r['mla_GBps']:6.0f}"
            if "speed_vs_best" in r:
                s += f" {r['speed_vs_best']:7.2f}x"
            if "mla_pad64_ms" in r:
                s += f"  (pad64 {r['mla_pad64_ms']:.4f} ms)"
            lines.append(s)
    pre = [r for r in rows if r["section"] == "prefill" and "error" not in r]
    if pre:
        lines.append(f"{'prefill from Python (same run)':36s} {'mla ms':>8s} {'cuDNN ms':>11s} {'TFLOP/s':>8s} {'vs cuDNN':>9s}")
        for r in pre:
            lines.append(f"{r['case']:36s} {r['mla_ms']:8.3f} {r['cudnn_ms']:11.3f} {r['mla_TFLOPS']:8.1f} "
                         f"{r['speed_vs_cudnn']:8.2f}x" + ("" if r["timing"]["mla"] == "graph" else "  (mla eager)"))
    for r in rows:
        if r["section"] == "grid":
            lines.append(f"FlashMLA's test grid on mla: {r.get('passed')}/{r.get('run')} passed "
                         f"({r.get('total')} cases, {r.get('seconds')} s)" if "error" not in r else f"grid: {r['error']}")
        elif "error" in r:
            lines.append(f"{r['section']} {r.get('case', '')}: ERROR {r['error'].splitlines()[-1]}")
    return "\n".join(lines)


if __name__ == "__main__":
    args = sys.argv[1:]
    out = None
    if "--json" in args:
        i = args.index("--json")
        out = args[i + 1]
        del args[i:i + 2]
    what = args or ["grid", "decode", "prefill"]
    rows = [dict(section="env", gpu=torch.cuda.get_device_name(), torch=torch.__version__)]
    if "grid" in what:
        grid_test(rows, float(os.environ.get("GRID_BUDGET_S", "60")))
    if "decode" in what:
        decode_bench(rows)
    if "prefill" in what:
        prefill_bench(rows)
    if out:
        with open(out + ".tmp", "w") as f:
            json.dump(rows, f, indent=1)
        os.replace(out + ".tmp", out)
    print(table(rows))
