"""PyTorch: tensors in and out (bf16 included), the torch.library custom ops (opcheck, torch.compile), the goldens
with torch inputs, and the layer against transformers' DeepseekV3Attention on random weights. Skips without torch."""
import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import mla  # noqa: E402
from conftest import GOLDEN_CASES, TOLERANCE, Golden, hf_config, rel_error  # noqa: E402


def paged_reference(q, kv_cache, block_table, cache_seqlens, dv, scale, causal):
    """Plain torch paged decode in float64: gather each sequence's rows through its block table."""
    b, s_q, h_q, d = q.shape
    page = kv_cache.shape[1]
    out = torch.zeros(b, s_q, h_q, dv, dtype=torch.float64)
    lse = torch.full((b, h_q, s_q), float("inf"), dtype=torch.float64)
    for i in range(b):
        n = int(cache_seqlens[i])
        t = torch.arange(n)
        keys = kv_cache[block_table[i, t // page].long(), t % page, 0].double()  # [n, d]
        for j in range(s_q):
            visible = n - (s_q - 1 - j) if causal else n
            if visible <= 0:
                continue
            s = scale * q[i, j].double() @ keys[:visible].T
            lse[i, :, j] = torch.logsumexp(s, -1)
            out[i, j] = torch.softmax(s, -1) @ keys[:visible, :dv]
    return out, lse


def paged_tensors(lengths, page_size, d, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    pages_per = [-(-n // page_size) for n in lengths]
    num_pages = sum(pages_per) + 2
    order = torch.randperm(num_pages, generator=g).to(torch.int32)
    table = torch.zeros(len(lengths), max(pages_per + [1]), dtype=torch.int32)
    kv = torch.full((num_pages, page_size, 1, d), float("nan"), dtype=dtype)
    nxt = 0
    for i, n in enumerate(lengths):
        table[i, : pages_per[i]] = order[nxt : nxt + pages_per[i]]
        nxt += pages_per[i]
        t = torch.arange(n)
        kv[table[i, t // page_size].long(), t % page_size, 0] = (torch.rand(n, d, generator=g) * 2 - 1).to(dtype)
    return kv, table, torch.tensor(lengths, dtype=torch.int32)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("h_q, s_q, page_size", [(128, 1, 64), (16, 2, 1), (3, 4, 256), (1, 1, 16)])
def test_decode_torch_matches_paged_reference(dtype, h_q, s_q, page_size):
    lengths = [0, 100, 257, 5]
    kv, table, seqlens = paged_tensors(lengths, page_size, 576, dtype, seed=h_q + s_q)
    q = (torch.rand(len(lengths), s_q, h_q, 576) * 2 - 1).to(dtype)
    out, lse = mla.decode_with_kvcache(q, kv, table, seqlens, 512, causal=s_q > 1)
    assert isinstance(out, torch.Tensor) and out.dtype == dtype and out.shape == (4, s_q, h_q, 512)
    assert lse.dtype == torch.float32 and lse.shape == (4, h_q, s_q)
    want, want_lse = paged_reference(q, kv, table, seqlens, 512, 576**-0.5, s_q > 1)
    tol = {torch.bfloat16: 2e-2, torch.float16: 1e-3, torch.float32: 2e-6}[dtype]
    assert rel_error(out.float().numpy(), want.numpy()) < tol
    assert torch.equal(torch.isinf(lse), torch.isinf(want_lse))
    finite = ~torch.isinf(want_lse)
    torch.testing.assert_close(lse[finite].double(), want_lse[finite], rtol=1e-4, atol=1e-4)


def test_prefill_torch_bf16():
    g = torch.Generator().manual_seed(0)
    n_q, n_k = [50, 3], [50, 20]
    cu_q = torch.tensor([0, 50, 53], dtype=torch.int32)
    cu_k = torch.tensor([0, 50, 70], dtype=torch.int32)
    q = (torch.rand(53, 4, 192, generator=g) - 0.5).bfloat16()
    k = (torch.rand(70, 4, 192, generator=g) - 0.5).bfloat16()
    v = (torch.rand(70, 4, 128, generator=g) - 0.5).bfloat16()
    out, lse = mla.prefill(q, k, v, cu_q, cu_k, softmax_scale=0.2)
    assert out.dtype == torch.bfloat16 and lse.shape == (4, 53)
    for b in range(2):
        qs, ks, vs = q[cu_q[b] : cu_q[b + 1]].double(), k[cu_k[b] : cu_k[b + 1]].double(), v[cu_k[b] : cu_k[b + 1]].double()
        s = 0.2 * torch.einsum("ihd,thd->hit", qs, ks)
        mask = torch.arange(n_k[b])[None, :] > (n_k[b] - n_q[b] + torch.arange(n_q[b]))[:, None]
        s = s.masked_fill(mask, float("-inf"))
        want = torch.einsum("hit,thd->ihd", torch.softmax(s, -1), vs)
        assert rel_error(out[cu_q[b] : cu_q[b + 1]].float().numpy(), want.numpy()) < 2e-2
        torch.testing.assert_close(lse[:, cu_q[b] : cu_q[b + 1]].double(), torch.logsumexp(s, -1), rtol=1e-4, atol=1e-4)


def decode_args(dtype=torch.bfloat16):
    kv, table, seqlens = paged_tensors([30, 0, 65], 16, 576, dtype, seed=3)
    q = (torch.rand(3, 2, 16, 576) - 0.5).to(dtype)
    return q, kv.nan_to_num(0.0), table, seqlens


def test_custom_ops_are_registered_and_pass_opcheck():
    assert hasattr(torch.ops.mla, "decode_with_kvcache") and hasattr(torch.ops.mla, "prefill")
    q, kv, table, seqlens = decode_args()
    torch.library.opcheck(torch.ops.mla.decode_with_kvcache.default, (q, kv, table, seqlens, 512, 0.1, True))
    cu = torch.tensor([0, 5, 9], dtype=torch.int32)
    qp, kp, vp = torch.rand(9, 2, 32), torch.rand(9, 2, 32), torch.rand(9, 2, 16)
    torch.library.opcheck(torch.ops.mla.prefill.default, (qp, kp, vp, cu, cu, 0.2, True))


def test_torch_compile_traces_the_op_without_graph_breaks():
    q, kv, table, seqlens = decode_args()

    def step(q, kv, table, seqlens):
        out, lse = mla.decode_with_kvcache(q * 2, kv, table, seqlens, 512, softmax_scale=0.05, causal=True)
        return out.float().sum(-1), lse

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    got, got_lse = compiled(q, kv, table, seqlens)
    want, want_lse = step(q, kv, table, seqlens)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(got_lse, want_lse)


def test_mixed_frameworks_are_a_type_error():
    q, kv, table, seqlens = decode_args(torch.float32)
    with pytest.raises(TypeError, match="pass one framework"):
        mla.decode_with_kvcache(q, kv, table.numpy(), seqlens, 512)
    with pytest.raises(TypeError, match="pass one framework"):
        mla.decode_with_kvcache(q.numpy(), kv, table.numpy(), seqlens.numpy(), 512)
    with pytest.raises(TypeError, match="block_table must be int32, got int64"):
        mla.decode_with_kvcache(q, kv, table.long(), seqlens, 512)


def test_requires_grad_inputs_are_accepted():
    q, kv, table, seqlens = decode_args(torch.float32)
    out, _ = mla.decode_with_kvcache(q.requires_grad_(), kv, table, seqlens, 512)
    assert out.shape == (3, 2, 16, 512)


@pytest.mark.parametrize("name", GOLDEN_CASES)
@pytest.mark.parametrize("dtype", ["f32", "bf16"])
def test_golden_with_torch_tensors(name, dtype):
    g = Golden(name)
    layer = mla.Attention.from_pretrained(g.dir, dtype=dtype)
    B, T, _ = g.hidden.shape
    cache = layer.make_cache(num_pages=B * (T // 16 + 2), page_size=16, page_order_seed=1)
    seqs = [cache.add_sequence() for _ in range(B)]
    hidden = torch.from_numpy(g.hidden)
    if dtype == "bf16":
        hidden = hidden.bfloat16()  # the golden hidden states are exact in bf16
    out = layer(hidden, cache, torch.from_numpy(g.positions), sequences=seqs)
    assert isinstance(out, torch.Tensor) and out.dtype == hidden.dtype
    assert rel_error(out.float().numpy(), g.output) < TOLERANCE[dtype]


def test_layer_cache_as_a_torch_bf16_kv_cache():
    layer = mla.Attention.random("v2-lite", seed=2, dtype="bf16")
    cache = layer.make_cache(num_pages=8, page_size=16, page_order_seed=4)
    seqs = [cache.add_sequence() for _ in range(2)]
    layer(torch.randn(2, 20, 2048), cache, sequences=seqs)
    kv = cache.kv_cache("torch")
    assert kv.dtype == torch.bfloat16 and kv.shape == (8, 16, 1, 576)
    q = torch.randn(2, 1, 16, 576).bfloat16()
    table, lens = torch.from_numpy(cache.block_tables(seqs)), torch.from_numpy(cache.lengths(seqs))
    out, lse = mla.decode_with_kvcache(q, kv, table, lens, 512)
    want, _ = paged_reference(q, kv, table, lens, 512, 576**-0.5, False)
    assert rel_error(out.float().numpy(), want.numpy()) < 2e-2
    # the view shares memory with the cache: rows read back agree with the view
    t = cache.block_table(seqs[1])
    torch.testing.assert_close(kv[int(t[1]), 3, 0].float(), torch.from_numpy(cache.read(seqs[1])[19]))


# ---- against transformers ----


CUDA = torch.cuda.is_available() and "cuda" in mla.available_devices()


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not CUDA, reason="no GPU"))])
def test_layer_matches_transformers_deepseek_v3_attention(tmp_path, device):
    transformers = pytest.importorskip("transformers")
    from safetensors.torch import save_file
    from transformers.models.deepseek_v3 import modeling_deepseek_v3 as hf

    config = hf_config(transformers, 192, heads=6, q_lora_rank=80, kv_lora_rank=64, nope=24, rope=16, v=20)
    torch.manual_seed(0)
    attn = hf.DeepseekV3Attention(config, layer_idx=0).double().eval()
    with torch.no_grad():
        for name, p in attn.named_parameters():
            if "layernorm" in name:
                p.copy_((1 + 0.2 * torch.randn_like(p)).float())
            else:
                p.copy_((torch.randn_like(p) * p.shape[-1] ** -0.5).float())  # exact in the f32 checkpoint
    save_file({f"model.layers.0.self_attn.{k}": v.float().contiguous() for k, v in attn.state_dict().items()},
              str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps(config.to_dict(), default=str))

    B, T = 2, 70
    hidden = torch.randn(B, T, 192, dtype=torch.float64)
    positions = torch.arange(T).expand(B, T)
    rotary = hf.DeepseekV3RotaryEmbedding(config)
    cos, sin = rotary(hidden.float(), positions)
    mask = torch.full((T, T), float("-inf"), dtype=torch.float64).triu(1)[None, None]
    with torch.no_grad():
        want = attn(hidden, (cos.double(), sin.double()), mask)[0]

    for dtype, tol in (("f32", 1e-5), ("bf16", 2e-2)):
        layer = mla.Attention.from_pretrained(tmp_path, device=device, dtype=dtype)
        cache = layer.make_cache(num_pages=16, page_size=16)
        seqs = [cache.add_sequence() for _ in range(B)]
        x = hidden.float().to(device)
        # prefill 50 tokens, then decode the rest one by one (expanded, then absorbed form)
        outs = [layer(x[:, :50], cache, sequences=seqs)]
        for t in range(50, T):
            outs.append(layer(x[:, t : t + 1], cache, sequences=seqs))
        got = torch.cat(outs, dim=1).cpu()
        err = rel_error(got.numpy(), want.numpy())
        print(f"transformers {dtype} on {device}: relative error {err:.3g}")
        assert err < tol, f"{dtype}: relative error {err:.3g} against transformers"
