"""Pallas Triton (GPU) kernels: prefill.py, decode.py (split-K decode + merge),
common.py (the shared online softmax), tuning.py (block sizes, measured defaults)."""
from pallas_kernels.triton.decode import decode, merge
from pallas_kernels.triton.prefill import prefill
from pallas_kernels.triton.tuning import DecodeBlockSizes, PrefillBlockSizes

__all__ = ["DecodeBlockSizes", "PrefillBlockSizes", "decode", "merge", "prefill"]
