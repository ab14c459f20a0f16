"""mla: DeepSeek Multi-head Latent Attention, thin Python bindings over the mla C++ core.

* :class:`Config`, :class:`LayerWeights`: a layer's shape and weights (from a Hugging Face checkpoint folder,
  a preset, or random).
* :class:`Attention`: one MLA layer; call it on hidden states with a :class:`LatentCache`.
* :class:`Communicator`: an NCCL rank for tensor parallelism with one process per GPU
  (``Communicator.from_process_group()`` over a torch.distributed group; ``Attention(..., communicator=)``).
* :func:`decode_with_kvcache` (FlashMLA's ``flash_mla_with_kvcache``) and :func:`prefill` (varlen expanded
  attention): the kernels as functions over NumPy arrays or PyTorch tensors; :func:`prefill_backward`, the
  gradients of prefill's q, k and v.
* :func:`quantize_fp8_kvcache`, :func:`dequantize_fp8_kvcache`: cache rows to and from the fp8_ds_mla bytes of
  an fp8 cache (``decode_with_kvcache(..., is_fp8_kvcache=True)``, ``LatentCache(dtype="fp8")``).

Errors: bad arguments raise ValueError, wrong dtypes TypeError, a missing folder FileNotFoundError, a full
cache :class:`OutOfPages` (a RuntimeError), other library errors RuntimeError; messages come from the library.
When PyTorch is importable the kernels are also registered as ``torch.ops.mla.*`` custom operators (set
MLA_NO_TORCH=1 to skip importing torch).
"""
import os as _os
import importlib.util as _util

_with_torch = _os.environ.get("MLA_NO_TORCH", "") != "1" and _util.find_spec("torch") is not None
if _with_torch:
    # torch before _mla: a CUDA build of _mla links libnccl.so.2, and the first one loaded serves the process. Loaded
    # first from the CUDA toolkit (an older NCCL than torch's own), it left torch unimportable ("libtorch_cuda.so:
    # undefined symbol: ncclCommResume"); torch's NCCL serves mla's few calls as well.
    try:
        import torch as _torch  # noqa: F401
    except ImportError:  # a broken torch install must not break the NumPy API
        _with_torch = False

from . import _mla
from ._api import (Attention, Communicator, DecodeSchedule, LatentCache, decode_with_kvcache, dequantize_fp8_kvcache,
                   prefill, prefill_backward, quantize_fp8_kvcache, run_sequences)
from ._mla import Config, LayerWeights, OutOfPages, available_devices

__version__ = "0.1.0"

__all__ = [
    "Attention",
    "Communicator",
    "Config",
    "LatentCache",
    "LayerWeights",
    "OutOfPages",
    "available_devices",
    "DecodeSchedule",
    "decode_with_kvcache",
    "dequantize_fp8_kvcache",
    "prefill",
    "prefill_backward",
    "quantize_fp8_kvcache",
    "run_sequences",
]

if _with_torch:
    try:
        from . import _torch_ops  # noqa: F401  (registers torch.ops.mla.*)
    except ImportError:
        pass
