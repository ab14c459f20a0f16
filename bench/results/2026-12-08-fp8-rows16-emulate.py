"""Emulates src/cuda/sm80/decode/fp8_rows16.cu's fragment math for one 64-key tile (one block of 16 rows), lane by
lane, in float64, against q · dequantised keys and p · dequantised values: the e4m3 -> bf16 shift, Q's column order
(s_position), the B fragments of S from each thread's 32 bytes, the byte pairing of V's fragments (byte_perm), the
per-group scales and the 2^32 / 2^88 / 2^60 factors, the C-fragment to output-column map. It checks the index
mathematics only (not synchronisation, shared-memory sizes or how the tensor cores round).

    python3 -m pip install numpy && python3 bench/results/2026-12-08-fp8-rows16-emulate.py
"""
import numpy as np
rng = np.random.default_rng(1)

def bf16_bits_to_f(u):  # uint16/uint32 low half -> float64
    return (np.asarray(u, np.uint32) << 16).view(np.float32).astype(np.float64)
def f_to_bf16_bits(x):  # round to nearest even
    b = np.asarray(x, np.float32).view(np.uint32).astype(np.uint64)
    return ((b + 0x7fff + ((b >> 16) & 1)) >> 16).astype(np.uint32)
def e4m3(b):
    b = np.asarray(b, np.int64); s = np.where(b & 0x80, -1.0, 1.0); e = (b >> 3) & 15; m = b & 7
    return s * np.where(e == 0, 2.0**-6 * (m / 8), 2.0**(e - 7) * (1 + m / 8))
def odd(w): return ((w & 0x80008000) | ((w >> 4) & 0x07f007f0)) & 0xffffffff
def even(w): return odd((w << 8) & 0xffffffff)
def lanes(r): return bf16_bits_to_f(r & 0xffff), bf16_bits_to_f(r >> 16)
def byte_perm(x, y, s):
    src = [(x >> (8 * i)) & 255 for i in range(4)] + [(y >> (8 * i)) & 255 for i in range(4)]
    return sum(int(src[(s >> (4 * i)) & 7]) << (8 * i) for i in range(4))
def s_position(d):
    if d >= 512: return d
    g, q, s, t = d // 128, d % 128 // 32, d % 32 // 4, d % 4
    return 16 * (8 * g + s) + 2 * q + t // 2 + 8 * (t % 2)

# A tile: 64 rows of 656 bytes.
keys = 64
lat = rng.integers(0, 256, (keys, 512)); lat[(lat & 0x7f) == 0x7f] = 0x10   # no NaN bytes
scales = (10.0 ** rng.uniform(-3, 1, (keys, 4))).astype(np.float32)
rope = f_to_bf16_bits(rng.standard_normal((keys, 64)))
rows = np.zeros((keys, 656), np.uint8)
rows[:, :512] = lat
rows[:, 512:528] = scales.view(np.uint8).reshape(keys, 16)
rows[:, 528:656] = rope.astype(np.uint16).view(np.uint8).reshape(keys, 128)
kdeq = np.concatenate([e4m3(lat) * np.repeat(scales.astype(np.float64), 128, axis=1), bf16_bits_to_f(rope)], 1)
qbits = f_to_bf16_bits(rng.standard_normal((16, 576)))
q = bf16_bits_to_f(qbits)
def word(key, off): return int(rows[key, off:off + 4].view(np.uint32)[0])

# Q in S's column order, latent times 2^32: logical A [16, 576].
A = np.zeros((16, 576))
for d in range(576):
    A[:, s_position(d)] = q[:, d] * (2.0**32 if d < 512 else 1.0)
S = np.zeros((16, 64))
acc_all = {}  # (warp, group or 'r') -> C [16 rows, 8 keys]
for w in range(8):
    for lane in range(32):
        n, qd = lane // 4, lane % 4
        key = 8 * w + n
        for g in range(4):
            for s in range(8):
                wd = word(key, 128 * g + 32 * qd + 4 * s)
                b0 = lanes(even(wd)); b1 = lanes(odd(wd))
                kk = 8 * g + s
                for k, v in ((2 * qd, b0[0]), (2 * qd + 1, b0[1]), (2 * qd + 8, b1[0]), (2 * qd + 9, b1[1])):
                    acc_all.setdefault((w, g), np.zeros((16, 8)))[:, n] += A[:, 16 * kk + k] * v
        for kk in (range(4) if qd == 0 else ()):  # rope, natural order (ldmatrix semantics: B[k][n] = row key n, col dim k)
            for k in range(16):
                acc_all.setdefault((w, 'r'), np.zeros((16, 8)))[:, n] += A[:, 512 + 16 * kk + k] * bf16_bits_to_f(rope[key, 16 * kk + k])
for w in range(8):
    for c in range(8):  # C column = key 8w + c
        key = 8 * w + c
        sc = scales[key].astype(np.float64)
        latent = sum(acc_all[(w, g)][:, c] * 2.0**88 * sc[g] for g in range(4))
        S[:, key] = latent + acc_all[(w, 'r')][:, c]
S_ref = q @ kdeq.T
print("S max rel err", np.abs(S - S_ref).max() / np.abs(S_ref).max())

# O: probabilities p (any), P'_g = bf16(p * scale_g * 2^60), B from bytes paired by key with byte_perm.
p = rng.uniform(0, 1, (16, 64))
exact = '--unrounded' in __import__('sys').argv  # P' kept in float64: O must then be exact too
Pg = [p * scales[:, g].astype(np.float64)[None, :] * 2.0**60 for g in range(4)]
if not exact:
    Pg = [bf16_bits_to_f(f_to_bf16_bits(x)) for x in Pg]
O = np.zeros((16, 512))
for w in range(8):
    g = w // 2
    o = np.zeros((8, 16, 8))  # [j][row][n]
    for lane in range(32):
        n, qd = lane // 4, lane % 4
        for kk in range(4):
            k0 = 16 * kk + 2 * qd
            v = {kx: rows[kx, 64 * w + 8 * n: 64 * w + 8 * n + 8].view(np.uint32) for kx in (k0, k0 + 1, k0 + 8, k0 + 9)}
            for j in range(8):
                sel = (j % 4) * 0x0011 + 0x4400 + (j % 4) * 0x1100
                lo = byte_perm(int(v[k0][j // 4]), int(v[k0 + 1][j // 4]), sel)
                hi = byte_perm(int(v[k0 + 8][j // 4]), int(v[k0 + 9][j // 4]), sel)
                b0 = lanes(odd(lo)); b1 = lanes(odd(hi))
                for kx, val in ((k0, b0[0]), (k0 + 1, b0[1]), (k0 + 8, b1[0]), (k0 + 9, b1[1])):
                    o[j][:, n] += Pg[g][:, kx] * val
    # C fragment: thread (row, quad) holds n = 2q, 2q+1 -> columns col0 + j and col0 + 8 + j, col0 = 64w + 16q
    for qd in range(4):
        col0 = 64 * w + 16 * qd
        for j in range(8):
            O[:, col0 + j] = o[j][:, 2 * qd] * 2.0**60
            O[:, col0 + 8 + j] = o[j][:, 2 * qd + 1] * 2.0**60
O_ref = p @ kdeq[:, :512]
print("O max rel err", np.abs(O - O_ref).max() / np.abs(O_ref).max())
