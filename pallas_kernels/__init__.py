"""Flash-LoRA-Attention: Pallas kernels (Triton GPU, Mosaic TPU) and the XLA reference.

    from pallas_kernels import flash_lora_attention, naive_lora_attention, reference_attention
    from pallas_kernels import merge_partials    # combine (out, lse) of disjoint key ranges

Layout (after jax/experimental/pallas/ops): flash_lora_attention.py (the entry
point), xla_chunked.py (backend "xla": only the visible key chunks), reference.py
(the dense XLA reference and the naive expansion), merge.py,
_args.py / _lora_args.py (argument checks), triton/ and tpu/ (one kernel a file,
block sizes and measured tuning in each backend's tuning.py).
"""
from pallas_kernels.flash_lora_attention import (BACKENDS, flash_lora_attention, naive_lora_attention,
                                                 resolve_backend)
from pallas_kernels.merge import (merge_attention, merge_partials, split_query_heads,
                                  stack_query_heads)
from pallas_kernels.reference import reference_attention

__all__ = [
    "BACKENDS",
    "flash_lora_attention",
    "merge_attention",
    "merge_partials",
    "naive_lora_attention",
    "reference_attention",
    "resolve_backend",
    "split_query_heads",
    "stack_query_heads",
]
