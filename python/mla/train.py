"""Training with mla: the layer's forward over whole causal sequences and its backward.

Today this is the scalar **reference** (C++ ``mla/train.hpp``: plain loops in double, host memory): correct to
transformers' float64 autograd, and slow. The fast CPU and CUDA backward passes are not built yet (docs/training.md).

* :func:`forward_reference` / :func:`backward_reference`: NumPy in and out.
* :class:`MultiheadLatentAttention` (needs torch): a ``torch.nn.Module`` whose parameters are the checkpoint's
  tensors under transformers' names, whose forward is a ``torch.autograd.Function`` over the two functions
  above; it trains with any torch optimizer (float32, CPU).
"""
from typing import Dict, Optional, Tuple

import numpy as np

from . import _mla
from ._mla import Config, LayerWeights

__all__ = ["forward_reference", "backward_reference", "weights_from_tensors", "weights_to_tensors",
           "MultiheadLatentAttention"]


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


def forward_reference(weights: LayerWeights, hidden: np.ndarray, cu_seqlens=None,
                      positions: Optional[np.ndarray] = None) -> Tuple[np.ndarray, object]:
    """out [T, D], saved = the layer on packed sequences ``hidden [T, D]`` (float32), each attending causally to
    itself. ``cu_seqlens``: ``[batch + 1]`` prefix sums (default: one sequence); ``positions``: ``[T]`` int64
    (default 0..n-1 within each sequence). ``saved`` is what :func:`backward_reference` needs."""
    hidden = np.ascontiguousarray(hidden, dtype=np.float32)
    if hidden.ndim != 2:
        raise ValueError(f"forward_reference: hidden must be 2-D [tokens, hidden_size], got shape {list(hidden.shape)}")
    pos = None if positions is None else np.ascontiguousarray(positions, dtype=np.int64)
    return _mla.train_forward(weights, hidden, _cu_seqlens(cu_seqlens, hidden.shape[0]), pos)


def backward_reference(weights: LayerWeights, saved, d_out: np.ndarray) -> Tuple[np.ndarray, Dict[str, np.ndarray]]:
    """d_hidden [T, D] and the gradient of every weight (named as in :func:`weights_to_tensors`) for the output
    gradient ``d_out [T, D]``."""
    return _mla.train_backward(weights, saved, np.ascontiguousarray(d_out, dtype=np.float32))


def _module_class():
    import torch

    class _Function(torch.autograd.Function):
        @staticmethod
        def forward(ctx, module, hidden, cu_seqlens, positions, *params):
            names = module._tensor_names
            weights = weights_from_tensors(module.config, {n: p.detach().cpu().numpy() for n, p in zip(names, params)})
            out, saved = forward_reference(weights, hidden.detach().cpu().numpy(), cu_seqlens, positions)
            ctx.weights, ctx.saved, ctx.names = weights, saved, names
            return torch.from_numpy(out).to(hidden.device)

        @staticmethod
        def backward(ctx, d_out):
            d_hidden, grads = backward_reference(ctx.weights, ctx.saved, d_out.detach().cpu().numpy())
            ctx.weights = ctx.saved = None  # what forward kept is not needed twice
            return (None, torch.from_numpy(d_hidden), None, None, *(torch.from_numpy(grads[n]) for n in ctx.names))

    class MultiheadLatentAttention(torch.nn.Module):
        """One MLA layer as a trainable ``torch.nn.Module`` (float32, CPU; the scalar reference underneath).

        Parameters are registered under transformers' ``DeepseekV3Attention`` names (``q_a_proj.weight``, ...),
        so ``load_state_dict`` takes that layer's state dict and the checkpoint's tensors (prefix removed).
        ``forward(hidden)`` takes ``[B, T, D]`` (B sequences of T tokens) or ``[T, D]`` with ``cu_seqlens``; every
        sequence attends causally to itself, at positions 0..n-1 unless ``positions`` is given.
        """

        def __init__(self, config: Config, dtype=torch.float32, device="cpu", seed: int = 0):
            super().__init__()
            if dtype != torch.float32 or torch.device(device).type != "cpu":
                raise ValueError("MultiheadLatentAttention: only float32 on the CPU for now (the reference backward);"
                                 f" got dtype={dtype}, device={device}")
            self.config = config
            tensors = weights_to_tensors(LayerWeights.random(config, seed))
            self._tensor_names = list(tensors)
            for name, value in tensors.items():
                module_name, attr = name.rsplit(".", 1)
                if not hasattr(self, module_name):
                    self.add_module(module_name, torch.nn.Module())
                getattr(self, module_name).register_parameter(attr, torch.nn.Parameter(torch.from_numpy(value)))

        @classmethod
        def from_pretrained(cls, path, layer: int = 0) -> "MultiheadLatentAttention":
            """The layer's weights from a checkpoint folder (any format mla.LayerWeights.load reads)."""
            weights = LayerWeights.load(str(path), layer)
            module = cls(weights.config)
            with torch.no_grad():
                for name, value in weights_to_tensors(weights).items():
                    module.get_parameter(name).copy_(torch.from_numpy(value))
            return module

        def forward(self, hidden, cu_seqlens=None, positions=None):
            if hidden.dim() == 3:
                if cu_seqlens is not None:
                    raise ValueError("MultiheadLatentAttention: pass cu_seqlens only with packed [T, D] hidden states")
                B, T, D = hidden.shape
                cu = np.arange(0, (B + 1) * T, T, dtype=np.int32)
                pos = None if positions is None else np.asarray(torch.as_tensor(positions).reshape(-1))
                out = _Function.apply(self, hidden.reshape(B * T, D), cu, pos, *self._params())
                return out.reshape(B, T, D)
            if hidden.dim() != 2:
                raise ValueError(f"MultiheadLatentAttention: hidden must be [B, T, D] or [T, D], got {list(hidden.shape)}")
            cu = None if cu_seqlens is None else np.asarray(torch.as_tensor(cu_seqlens))
            pos = None if positions is None else np.asarray(torch.as_tensor(positions))
            return _Function.apply(self, hidden, cu, pos, *self._params())

        def _params(self):
            return [self.get_parameter(n) for n in self._tensor_names]

    return MultiheadLatentAttention


def __getattr__(name):
    if name == "MultiheadLatentAttention":
        cls = _module_class()
        globals()[name] = cls
        return cls
    raise AttributeError(name)
