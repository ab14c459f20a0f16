"""torch.nn modules over mla (need torch 2.4+).

* :class:`MultiheadLatentAttention`: one trainable MLA layer (mla.train.MultiheadLatentAttention; docs/training.md).
"""


def __getattr__(name):
    if name == "MultiheadLatentAttention":
        from .train import MultiheadLatentAttention

        return MultiheadLatentAttention
    raise AttributeError(f"module 'mla.nn' has no attribute '{name}'")
