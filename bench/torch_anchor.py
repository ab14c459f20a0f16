"""PyTorch eager anchor for `mla bench` on the CPU: the same V2-Lite layer shapes in bf16, timed in the same run.

Run by scripts/bench-cpu.sh with Debian's python3-torch (`/usr/bin/python3`). Prints one JSON object.
Rows: prefill of T tokens (expanded form, causal softmax attention), one decode step at context L with an absorbed latent
cache, and one decode step that re-expands the whole latent cache (what transformers does).
"""
import json
import statistics
import sys
import time

import torch

torch.set_num_threads(2)
torch.manual_seed(0)
T = int(sys.argv[1]) if len(sys.argv) > 1 else 1024
L = int(sys.argv[2]) if len(sys.argv) > 2 else 4096
REPS = int(sys.argv[3]) if len(sys.argv) > 3 else 7
D, H, DC, DN, DR, DV = 2048, 16, 512, 128, 64, 128
DQK = DN + DR
dt = torch.bfloat16
scale = DQK ** -0.5


def w(o, i):
    return (torch.rand(o, i) * 2 - 1).mul_((3.0 / i) ** 0.5).to(dt)


Wq, Wkva, Wkvb, Wo = w(H * DQK, D), w(DC + DR, D), w(H * (DN + DV), DC), w(D, H * DV)
g = torch.ones(DC, dtype=dt)


def rms(x):
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6)).to(dt) * g


def rope(x, pos):
    inv = 1.0 / (10000 ** (torch.arange(0, DR, 2).float() / DR))
    a = pos.float()[:, None] * inv[None]
    c, s = a.cos(), a.sin()
    x1, x2 = x[..., 0::2].float(), x[..., 1::2].float()
    if x.dim() == 3:
        c, s = c[:, None], s[:, None]
    return torch.stack((x1 * c - x2 * s, x1 * s + x2 * c), -1).flatten(-2).to(dt)


def attention(q, k, v, causal):
    """softmax(q·kᵀ·scale) v per head; q [H, n, d], k [H, L, d], v [H, L, dv]. torch 1.13 has no SDPA."""
    s = (q @ k.transpose(1, 2)).float() * scale
    if causal:
        n, L = s.shape[-2:]
        s.masked_fill_(torch.ones(n, L, dtype=torch.bool).triu(L - n + 1), float("-inf"))
    return torch.softmax(s, -1).to(dt) @ v


def timed(f):
    f()
    ts = []
    for _ in range(REPS):
        t0 = time.perf_counter()
        f()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def prefill(x):
    n = x.shape[0]
    pos = torch.arange(n)
    q = (x @ Wq.T).view(n, H, DQK)
    kv = x @ Wkva.T
    c, kr = rms(kv[:, :DC]), rope(kv[:, DC:], pos)
    qr = rope(q[..., DN:], pos)
    kvb = (c @ Wkvb.T).view(n, H, DN + DV)
    k = torch.cat([kvb[..., :DN], kr[:, None].expand(n, H, DR)], -1)
    qq = torch.cat([q[..., :DN], qr], -1)
    o = attention(qq.transpose(0, 1), k.transpose(0, 1), kvb[..., DN:].transpose(0, 1), True)
    return o.transpose(0, 1).reshape(n, H * DV) @ Wo.T


Wuk = Wkvb.view(H, DN + DV, DC)[:, :DN]  # [H, DN, DC]
Wuv = Wkvb.view(H, DN + DV, DC)[:, DN:]  # [H, DV, DC]
cache = (torch.rand(L, DC + DR) * 2 - 1).to(dt)


def decode_absorbed(x):
    pos = torch.tensor([L - 1])
    q = (x @ Wq.T).view(H, DQK)
    kv = x @ Wkva.T
    row = torch.cat([rms(kv[:, :DC]), rope(kv[:, DC:], pos)], -1)
    keys = torch.cat([cache[: L - 1], row], 0)
    qhat = torch.einsum("hd,hdc->hc", q[:, :DN], Wuk)
    qa = torch.cat([qhat, rope(q[None, :, DN:], pos)[0]], -1)
    p = torch.softmax((qa @ keys.T).float() * scale, -1).to(dt)
    ohat = p @ keys[:, :DC]
    o = torch.einsum("hc,hvc->hv", ohat, Wuv)
    return o.reshape(1, H * DV) @ Wo.T


def decode_reexpand(x):
    pos = torch.tensor([L - 1])
    q = (x @ Wq.T).view(H, DQK)
    kv = x @ Wkva.T
    row = torch.cat([rms(kv[:, :DC]), rope(kv[:, DC:], pos)], -1)
    keys = torch.cat([cache[: L - 1], row], 0)
    kvb = (keys[:, :DC] @ Wkvb.T).view(L, H, DN + DV)
    k = torch.cat([kvb[..., :DN], keys[:, None, DC:].expand(L, H, DR)], -1)
    qq = torch.cat([q[:, :DN], rope(q[None, :, DN:], pos)[0]], -1)
    o = attention(qq[:, None], k.transpose(0, 1), kvb[..., DN:].transpose(0, 1), False)
    return o.reshape(1, H * DV) @ Wo.T


def gemm_peak():
    a, b = torch.rand(2048, 2048).to(dt), torch.rand(2048, 2048).to(dt)
    return 2 * 2048 ** 3 / timed(lambda: a @ b.T) / 1e9


def copy_gbps():
    src = torch.ones(256 << 20, dtype=torch.uint8)
    dst = torch.empty_like(src)
    return 2 * src.numel() / timed(lambda: dst.copy_(src)) / 1e9


with torch.inference_mode():
    x = (torch.rand(T, D) * 2 - 1).to(dt)
    x1 = (torch.rand(1, D) * 2 - 1).to(dt)
    res = {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "gemm_bf16_gflops": gemm_peak(),
        "copy_gbps": copy_gbps(),
        "prefill_ms": timed(lambda: prefill(x)) * 1e3,
        "decode_latent_ms": timed(lambda: decode_absorbed(x1)) * 1e3,
        "decode_reexpand_ms": timed(lambda: decode_reexpand(x1)) * 1e3,
        "tokens": T,
        "context": L,
    }
print(json.dumps(res))
