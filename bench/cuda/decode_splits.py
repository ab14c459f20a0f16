"""The decode scheduler's smallest split (MLA_CUDA_DECODE_MIN_TILES, in 64-key tiles; the default is 4) on the
small and uneven batches, same run: for each row, one graph per setting (20 calls with a DecodeSchedule each),
replays interleaved, outputs compared with the default's.

    PYTHONPATH=<mla package> python3 bench/cuda/decode_splits.py [min_tiles ...]   (default: 4 2 1)
"""
import math
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from vs_anchors import graph_of, time_interleaved  # noqa: E402

import mla  # noqa: E402

ROWS = [  # name, sequence lengths, s_q, h_q
    ("b1 s_k4096 h128", [4096], 1, 128),
    ("b1 s_k65536 h128", [65536], 1, 128),
    ("b32 s_k4096 h128", [4096] * 32, 1, 128),
    ("b8 s_k4096 h16", [4096] * 8, 1, 16),
    ("imbalanced 65536+63x1024 h128", [65536] + [1024] * 63, 1, 128),
    ("long 2x131072 h128", [131072] * 2, 1, 128),
    ("long 4x32768 h16", [32768] * 4, 1, 16),
    ("b128 s_k8192 h128", [8192] * 128, 1, 128),
]
PAGE = 64


def main():
    settings = sys.argv[1:] or ["4", "2", "1"]
    torch.manual_seed(0)
    print(f"{'row':32} " + " ".join(f"{'min ' + m + ' ms':>11}" for m in settings) + "   max |diff|")
    for name, lens, s_q, h_q in ROWS:
        b, nblk = len(lens), [math.ceil(n / PAGE) for n in lens]
        perm = torch.randperm(sum(nblk), device="cuda", dtype=torch.int32)
        table = torch.zeros(b, max(nblk), dtype=torch.int32, device="cuda")
        o = 0
        for i, n in enumerate(nblk):
            table[i, :n] = perm[o:o + n]
            o += n
        q = (torch.randn(b, s_q, h_q, 576, device="cuda") / 10).clamp(-1, 1).bfloat16()
        kv = (torch.randn(sum(nblk), PAGE, 1, 576, device="cuda") / 10).clamp(-1, 1).bfloat16()
        seqlens = torch.tensor(lens, dtype=torch.int32, device="cuda")
        graphs, outs, scheds = {}, {}, {}
        for m in settings:
            os.environ["MLA_CUDA_DECODE_MIN_TILES"] = m
            # A graph reads its schedule's workspace (the work list) at every replay: keep each schedule alive as
            # long as its graph (dropping it let the allocator hand the work list's memory to the next schedule).
            sched = scheds[m] = mla.DecodeSchedule()

            def call(m=m, sched=sched):
                outs[m] = mla.decode_with_kvcache(q, kv, table, seqlens, head_dim_v=512, softmax_scale=576 ** -0.5,
                                                  causal=True, schedule=sched)[0]
            graphs[m] = graph_of(call)  # the work list is written at the first call, with this setting
        os.environ.pop("MLA_CUDA_DECODE_MIN_TILES")
        t = time_interleaved({m: g.replay for m, g in graphs.items()}, rounds=15, per=20)
        diff = max((outs[m].float() - outs[settings[0]].float()).abs().max().item() for m in settings)
        print(f"{name:32} " + " ".join(f"{t[m] * 1e3:11.4f}" for m in settings) + f"   {diff:.2e}")
        del graphs, scheds, q, kv


if __name__ == "__main__":
    main()
