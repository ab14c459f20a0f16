"""Training with mla: the layer's forward over whole causal sequences and its backward.

Two implementations of the same computation (C++ ``mla/train.hpp``, host memory):

* :func:`forward` / :func:`backward`: the fast CPU path, float32 with fp32 accumulation (oneDNN GEMMs for the
  projections and their gradients, FlashAttention-style attention backward over the threads). Agrees with the
  reference to about 1e-6 relative.
* :func:`forward_reference` / :func:`backward_reference`: the scalar reference (plain loops in double): correct to
  transformers' float64 autograd, and slow; the ground truth the fast path is tested against.
* :class:`MultiheadLatentAttention` (needs torch 2.4+): a ``torch.nn.Module`` whose parameters are the
  checkpoint's tensors under transformers' names, whose forward is the custom operator
  ``torch.ops.mla.train_attention`` over the fast path (or the reference: ``reference=True``), with its backward
  registered (so ``torch.compile`` traces it); it trains with any torch optimizer (float32, CPU). On CUDA (or in
  bf16) it runs ``path="ops"``: torch projections around mla's attention kernels (docs/training.md).
"""
import atexit
from typing import Dict, Optional, Tuple

import numpy as np

from . import _mla
from ._mla import Config, LayerWeights

__all__ = ["forward", "backward", "forward_reference", "backward_reference", "weights_from_tensors",
           "weights_to_tensors", "MultiheadLatentAttention"]


def weights_from_tensors(config: Config, tensors: Dict[str, np.ndarray]) -> LayerWeights:
    """LayerWeights from float32 arrays named as in the checkpoint without the layer prefix (``q_a_proj.weight``,
    ``q_a_layernorm.weight``, ``q_b_proj.weight`` or ``q_proj.weight``, ``kv_a_proj_with_mqa.weight``,
    ``kv_a_layernorm.weight``, ``kv_b_proj.weight``, ``o_proj.weight``, and the biases when the config has them).
    A missing, extra or mis-shaped tensor is a ValueError naming it."""
    return _mla.weights_from_tensors(config, {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in tensors.items()})


def weights_to_tensors(weights: LayerWeights) -> Dict[str, np.ndarray]:
    """The layer's tensors as float32 arrays, named as :func:`weights_from_tensors` takes them."""
    return _mla.weights_to_tensors(weights)


def _cu_seqlens(cu_seqlens, tokens: int) -> np.ndarray:
    if cu_seqlens is None:
        return np.array([0, tokens], dtype=np.int32)
    return np.ascontiguousarray(np.asarray(cu_seqlens), dtype=np.int32)


def _hidden_2d(hidden, op: str) -> np.ndarray:
    hidden = np.ascontiguousarray(hidden, dtype=np.float32)
    if hidden.ndim != 2:
        raise ValueError(f"{op}: hidden must be 2-D [tokens, hidden_size], got shape {list(hidden.shape)}")
    return hidden


def _positions(positions) -> Optional[np.ndarray]:
    return None if positions is None else np.ascontiguousarray(positions, dtype=np.int64)


def forward(weights: LayerWeights, hidden: np.ndarray, cu_seqlens=None,
            positions: Optional[np.ndarray] = None) -> Tuple[np.ndarray, object]:
    """out [T, D], saved = the layer on packed sequences ``hidden [T, D]`` (float32), each attending causally to
    itself; the fast CPU path. ``cu_seqlens``: ``[batch + 1]`` prefix sums (default: one sequence); ``positions``:
    ``[T]`` int64 (default 0..n-1 within each sequence). ``saved`` is what :func:`backward` needs."""
    hidden = _hidden_2d(hidden, "forward")
    return _mla.train_forward_fast(weights, hidden, _cu_seqlens(cu_seqlens, hidden.shape[0]), _positions(positions))


def backward(weights: LayerWeights, saved, d_out: np.ndarray) -> Tuple[np.ndarray, Dict[str, np.ndarray]]:
    """d_hidden [T, D] and the gradient of every weight (named as in :func:`weights_to_tensors`) for the output
    gradient ``d_out [T, D]``, from :func:`forward`'s ``saved``; the fast CPU path."""
    return _mla.train_backward_fast(weights, saved, np.ascontiguousarray(d_out, dtype=np.float32))


def forward_reference(weights: LayerWeights, hidden: np.ndarray, cu_seqlens=None,
                      positions: Optional[np.ndarray] = None) -> Tuple[np.ndarray, object]:
    """:func:`forward` through the scalar reference (double inside); ``saved`` is what :func:`backward_reference`
    needs."""
    hidden = _hidden_2d(hidden, "forward_reference")
    return _mla.train_forward(weights, hidden, _cu_seqlens(cu_seqlens, hidden.shape[0]), _positions(positions))


def backward_reference(weights: LayerWeights, saved, d_out: np.ndarray) -> Tuple[np.ndarray, Dict[str, np.ndarray]]:
    """:func:`backward` through the scalar reference, from :func:`forward_reference`'s ``saved``."""
    return _mla.train_backward(weights, saved, np.ascontiguousarray(d_out, dtype=np.float32))


# layer key -> (Config, tensor names, reference?): what the custom operators cannot take as arguments
_LAYERS: Dict[int, tuple] = {}
atexit.register(_LAYERS.clear)  # before the extension's teardown, which reports objects still alive as leaks


def _weights_of(key: int, params) -> LayerWeights:
    config, names, _ = _LAYERS[key]
    return weights_from_tensors(config, {n: p.detach().cpu().numpy() for n, p in zip(names, params)})


def _functions_of(key: int):
    """(forward, backward) of the layer: the fast path, or the reference."""
    return (forward_reference, backward_reference) if _LAYERS[key][2] else (forward, backward)


def _register_ops(torch):
    """torch.ops.mla.train_attention and its backward as custom operators (torch >= 2.4), with fake
    implementations and the autograd formula registered, so that torch.compile traces a module's forward and
    backward without running them. On the fast path the forward operator also returns what the backward needs
    (the C++ SavedF32 as flat tensors, marked non-differentiable); on the reference path those are empty and the
    backward recomputes the forward."""
    from typing import List

    Tensor = torch.Tensor

    def positions_or_none(positions: Tensor):
        return positions.cpu().numpy() if positions.numel() else None

    def saved_sizes(layer: int, tokens: int) -> List[int]:
        """Lengths of the saved tensors after out: positions, then _mla.train_saved_to_arrays' float arrays."""
        c, _, reference = _LAYERS[layer]
        if reference:
            return [0] * 10
        H, dq, dn, dr, dv, dc = (c.num_heads, c.q_lora_rank, c.qk_nope_head_dim, c.qk_rope_head_dim,
                                 c.v_head_dim, c.kv_lora_rank)
        return [tokens, tokens * dq, tokens * dq, tokens * H * (dn + dr), tokens * dc, tokens * dc, tokens * dr,
                tokens * H * (dn + dv), tokens * H, tokens * H * dv]

    @torch.library.custom_op("mla::train_attention", mutates_args=())
    def train_attention(hidden: Tensor, cu_seqlens: Tensor, positions: Tensor, layer: int,
                        params: List[Tensor]) -> List[Tensor]:
        fwd, _ = _functions_of(layer)
        out, saved = fwd(_weights_of(layer, params), hidden.detach().cpu().numpy(), cu_seqlens.cpu().numpy(),
                         positions_or_none(positions))
        if _LAYERS[layer][2]:
            state = [torch.empty(0, dtype=torch.int64)] + [torch.empty(0) for _ in range(9)]
        else:
            state = [torch.from_numpy(a) for a in _mla.train_saved_to_arrays(saved)]
        return [torch.from_numpy(out).to(hidden.device)] + state

    @train_attention.register_fake
    def _(hidden, cu_seqlens, positions, layer, params):
        sizes = saved_sizes(layer, hidden.shape[0])
        return ([torch.empty_like(hidden), hidden.new_empty(sizes[0], dtype=torch.int64)] +
                [hidden.new_empty(n) for n in sizes[1:]])

    @torch.library.custom_op("mla::train_attention_backward", mutates_args=())
    def train_attention_backward(d_out: Tensor, hidden: Tensor, cu_seqlens: Tensor, positions: Tensor, layer: int,
                                 params: List[Tensor], state: List[Tensor]) -> List[Tensor]:
        weights = _weights_of(layer, params)
        fwd, bwd = _functions_of(layer)
        x = np.ascontiguousarray(hidden.detach().cpu().numpy())
        cu = np.ascontiguousarray(cu_seqlens.cpu().numpy(), dtype=np.int32)
        if _LAYERS[layer][2]:
            _, saved = fwd(weights, x, cu, positions_or_none(positions))
        else:
            saved = _mla.train_saved_from_arrays(x, cu, state[0].numpy(), [t.numpy() for t in state[1:]])
        d_hidden, grads = bwd(weights, saved, d_out.detach().cpu().numpy())
        names = _LAYERS[layer][1]
        return [torch.from_numpy(d_hidden)] + [torch.from_numpy(grads[n]) for n in names]

    @train_attention_backward.register_fake
    def _(d_out, hidden, cu_seqlens, positions, layer, params, state):
        return [torch.empty_like(hidden)] + [torch.empty_like(p) for p in params]

    def setup_context(ctx, inputs, output):
        hidden, cu_seqlens, positions, layer, params = inputs
        ctx.mark_non_differentiable(*output[1:])
        ctx.save_for_backward(hidden, cu_seqlens, positions, *params, *output[1:])
        ctx.layer, ctx.params = layer, len(params)

    def backward(ctx, grads):
        hidden, cu_seqlens, positions, *rest = ctx.saved_tensors
        params, state = rest[:ctx.params], rest[ctx.params:]
        g = torch.ops.mla.train_attention_backward(grads[0], hidden, cu_seqlens, positions, ctx.layer, params, state)
        return g[0], None, None, None, list(g[1:])

    train_attention.register_autograd(backward, setup_context=setup_context)
    return torch.ops.mla.train_attention


def _sequence_positions(torch, lengths, device):
    """int64 positions 0..n-1 of each of the packed sequences of the host ``lengths``, built on ``device`` with no
    host->device copy and no sync: only Python integers reach the device, as the arguments of arange's kernel, so
    a CUDA graph capture bakes them in, as it does prefill's per-sequence launches from the same host lengths.
    (A host tensor of starts or lengths would need a copy: a pageable one cannot be captured, and a pinned one
    captured by a graph must outlive it unchanged; torch.repeat_interleave with device repeats reads the output
    size back unless given, and with host repeats copies them.) One arange and a repeat when every sequence has
    the same length ([B, T, D] input), else one arange per sequence and a cat."""
    n = lengths[0] if lengths else 0
    if all(x == n for x in lengths):
        return torch.arange(n, dtype=torch.int64, device=device).repeat(len(lengths))
    return torch.cat([torch.arange(x, dtype=torch.int64, device=device) for x in lengths])


def _module_class():
    import torch

    if not (hasattr(torch.library, "custom_op") and hasattr(torch.library, "register_fake")):
        raise ImportError("mla.train.MultiheadLatentAttention needs torch 2.4 or newer (torch.library.custom_op)")
    op = _register_ops(torch)

    class MultiheadLatentAttention(torch.nn.Module):
        """One MLA layer as a trainable ``torch.nn.Module``.

        Parameters are registered under transformers' ``DeepseekV3Attention`` names (``q_a_proj.weight``, ...),
        so ``load_state_dict`` takes that layer's state dict and the checkpoint's tensors (prefix removed).
        ``forward(hidden)`` takes ``[B, T, D]`` (B sequences of T tokens) or ``[T, D]`` with ``cu_seqlens``; every
        sequence attends causally to itself, at positions 0..n-1 unless ``positions`` is given.

        ``path`` says what computes it:

        * ``"layer"``: the whole layer in C++ (:func:`forward` / :func:`backward`; float32 on the CPU only).
        * ``"reference"`` (or ``reference=True``): the scalar reference (double inside, slow; float32, CPU).
        * ``"ops"``: the projections, norms and RoPE as torch operations (autograd, cuBLAS on the GPU) around
          mla's attention kernels: :func:`mla.prefill` forward and :func:`mla.prefill_backward` (FlashAttention-
          style, probabilities recomputed from the saved log-sum-exp). Any device mla's kernels run on; float32 or
          bfloat16 (bf16 storage, fp32 accumulation and norm statistics).
        * ``"auto"`` (default): ``"layer"`` for float32 on the CPU, ``"ops"`` otherwise.

        On CUDA, ``path="ops"`` copies nothing between host and device and never synchronises the host: the
        lengths stay on the host (prefill and its backward launch per sequence from them) and the default
        positions are made on the GPU, so a whole forward + backward can be captured in a ``torch.cuda.CUDAGraph``.
        Pass ``cu_seqlens`` as a list or CPU tensor (a CUDA one is read back: one sync) and explicit ``positions``
        as a tensor on the layer's device (CPU positions are copied to it on every call, which a capture refuses).
        """

        def __init__(self, config: Config, dtype=torch.float32, device="cpu", seed: int = 0,
                     reference: bool = False, path: str = "auto"):
            super().__init__()
            device = torch.device(device)
            if reference:
                path = "reference"
            if path not in ("auto", "layer", "reference", "ops"):
                raise ValueError(f"MultiheadLatentAttention: path must be 'auto', 'layer', 'reference' or 'ops', "
                                 f"got {path!r}")
            if dtype not in (torch.float32, torch.bfloat16):
                raise ValueError(f"MultiheadLatentAttention: dtype must be torch.float32 or torch.bfloat16, got {dtype}")
            if path == "auto":
                path = "layer" if dtype == torch.float32 and device.type == "cpu" else "ops"
            if path in ("layer", "reference") and (dtype != torch.float32 or device.type != "cpu"):
                raise ValueError(f"MultiheadLatentAttention: path={path!r} runs in float32 on the CPU only; got "
                                 f"dtype={dtype}, device={device} (path='ops' runs elsewhere)")
            self.config = config
            self.path = path
            self.reference = path == "reference"
            tensors = weights_to_tensors(LayerWeights.random(config, seed))
            self._tensor_names = list(tensors)
            self._layer = len(_LAYERS)
            _LAYERS[self._layer] = (config, self._tensor_names, self.reference)
            for name, value in tensors.items():
                module_name, attr = name.rsplit(".", 1)
                if not hasattr(self, module_name):
                    self.add_module(module_name, torch.nn.Module())
                param = torch.nn.Parameter(torch.from_numpy(value).to(device=device, dtype=dtype))
                getattr(self, module_name).register_parameter(attr, param)
            self.register_buffer("_inv_freq", torch.tensor(config.rope_inv_freq, dtype=torch.float32, device=device),
                                 persistent=False)

        @classmethod
        def from_pretrained(cls, pretrained_dir, layer: int = 0, **kwargs) -> "MultiheadLatentAttention":
            """The layer's weights from a checkpoint folder (any format mla.LayerWeights.load reads); ``kwargs``
            go to the constructor (e.g. ``device="cuda"``, ``dtype=torch.bfloat16``, ``reference=True``)."""
            weights = LayerWeights.load(str(pretrained_dir), layer)
            module = cls(weights.config, **kwargs)
            with torch.no_grad():
                for name, value in weights_to_tensors(weights).items():
                    module.get_parameter(name).copy_(torch.from_numpy(value))
            return module

        def forward(self, hidden, cu_seqlens=None, positions=None):
            if hidden.dim() == 3:
                if cu_seqlens is not None:
                    raise ValueError("MultiheadLatentAttention: pass cu_seqlens only with packed [T, D] hidden states")
                B, T, D = hidden.shape
                cu = torch.arange(0, (B + 1) * T, T, dtype=torch.int32)
                pos = None if positions is None else torch.as_tensor(positions).reshape(-1)
                return self._packed(hidden.reshape(B * T, D), cu, pos).reshape(B, T, D)
            if hidden.dim() != 2:
                raise ValueError("MultiheadLatentAttention: hidden must be [B, T, D] or [T, D], "
                                 f"got {list(hidden.shape)}")
            if cu_seqlens is None:
                cu = torch.tensor([0, hidden.shape[0]], dtype=torch.int32)
            else:
                cu = torch.as_tensor(cu_seqlens, dtype=torch.int32)
            return self._packed(hidden, cu, None if positions is None else torch.as_tensor(positions))

        def _packed(self, hidden, cu, positions):
            if self.path == "ops":
                return self._ops_forward(hidden, cu, positions)
            pos = torch.empty(0, dtype=torch.int64) if positions is None else positions.to(torch.int64)
            return op(hidden, cu.cpu(), pos.cpu(), self._layer, self._params())[0]

        def _ops_forward(self, hidden, cu, positions):
            """The layer as torch operations around mla.prefill (whose autograd is mla.prefill_backward)."""
            from . import prefill

            c, dev = self.config, self._inv_freq.device
            if hidden.device != dev or hidden.dtype != self._weight().dtype:
                raise ValueError(f"MultiheadLatentAttention: hidden is {hidden.dtype} on {hidden.device}, the layer "
                                 f"is {self._weight().dtype} on {dev}")
            T = hidden.shape[0]
            H, dn, dr, dv, dc = c.num_heads, c.qk_nope_head_dim, c.qk_rope_head_dim, c.v_head_dim, c.kv_lora_rank
            # The lengths stay on the host: validated there, and given to prefill as a CPU tensor, which launches
            # per sequence from them with nothing read back (graph-capturable); its autograd hands the same CPU
            # tensor to prefill_backward. (CUDA cu_seqlens from the caller are read back here: one sync.)
            cu_host = cu.cpu()
            if cu_host.dim() != 1 or cu_host.numel() < 2 or int(cu_host[0]) != 0 or int(cu_host[-1]) != T:
                raise ValueError(f"MultiheadLatentAttention: cu_seqlens must be [batch + 1] prefix sums from 0 to "
                                 f"{T}, got {cu_host.tolist()}")
            lengths = cu_host[1:] - cu_host[:-1]
            if bool((lengths < 0).any()):
                raise ValueError(f"MultiheadLatentAttention: cu_seqlens must not decrease, got {cu_host.tolist()}")
            if positions is None:  # 0 .. n-1 within each sequence, made on the layer's device
                positions = _sequence_positions(torch, lengths.tolist(), dev)
            elif positions.shape != (T,):
                raise ValueError(f"MultiheadLatentAttention: positions must be [{T}], got {list(positions.shape)}")
            # positions on the layer's device are used as they are; others (CPU ones on a GPU) are copied here
            angle = positions.to(device=dev, dtype=torch.float32)[:, None] * self._inv_freq  # fp32, as the spec
            cos, sin = torch.cos(angle) * c.rope_magnitude, torch.sin(angle) * c.rope_magnitude

            def rope(x):  # adjacent pairs (x[2i], x[2i+1]) of the last dim, turned by the token's angles
                xf = x.float()
                a, b = xf[..., 0::2], xf[..., 1::2]
                cs, sn = (cos, sin) if x.dim() == 2 else (cos[:, None], sin[:, None])
                return torch.stack((a * cs - b * sn, a * sn + b * cs), dim=-1).flatten(-2).to(x.dtype)

            def rms_norm(x, gamma):  # statistics in fp32, epsilon 1e-6 (the latent norms' own)
                xf = x.float()
                return (gamma.float() * (xf * torch.rsqrt(xf.square().mean(-1, keepdim=True) + 1e-6))).to(x.dtype)

            linear, p, bias = torch.nn.functional.linear, self.get_parameter, self._bias
            if c.q_lora_rank > 0:
                qa = rms_norm(linear(hidden, p("q_a_proj.weight"), bias("q_a_proj")), p("q_a_layernorm.weight"))
                q = linear(qa, p("q_b_proj.weight"))
            else:
                q = linear(hidden, p("q_proj.weight"), bias("q_proj"))
            q = q.view(T, H, dn + dr)
            latent, k_pe = linear(hidden, p("kv_a_proj_with_mqa.weight"), bias("kv_a_proj_with_mqa")).split([dc, dr], -1)
            kv = linear(rms_norm(latent, p("kv_a_layernorm.weight")), p("kv_b_proj.weight")).view(T, H, dn + dv)
            k_nope, v = kv.split([dn, dv], -1)
            q = torch.cat((q[..., :dn], rope(q[..., dn:])), -1)
            k = torch.cat((k_nope, rope(k_pe)[:, None, :].expand(T, H, dr)), -1)
            out, _ = prefill(q, k, v.contiguous(), cu_host, cu_host, softmax_scale=c.softmax_scale, causal=True)
            return linear(out.reshape(T, H * dv), p("o_proj.weight"), bias("o_proj"))

        def _weight(self):  # one projection weight: the layer's dtype and device
            return self.get_parameter("q_b_proj.weight" if self.config.q_lora_rank > 0 else "q_proj.weight")

        def _bias(self, module_name):
            name = module_name + ".bias"
            return self.get_parameter(name) if name in self._tensor_names else None

        def _params(self):
            return [self.get_parameter(n) for n in self._tensor_names]

    return MultiheadLatentAttention


def __getattr__(name):
    if name == "MultiheadLatentAttention":
        cls = _module_class()
        globals()[name] = cls
        return cls
    raise AttributeError(name)
