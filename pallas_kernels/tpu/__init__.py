"""Pallas Mosaic (TPU) kernels: prefill.py, decode.py (split-K decode + jnp merge),
common.py (layout helpers, the online-softmax step), tuning.py (block sizes)."""
from pallas_kernels.tpu.decode import decode
from pallas_kernels.tpu.prefill import prefill
from pallas_kernels.tpu.tuning import DecodeBlockSizes, PrefillBlockSizes

__all__ = ["DecodeBlockSizes", "PrefillBlockSizes", "decode", "prefill"]
