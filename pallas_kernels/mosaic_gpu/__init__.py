"""Pallas Mosaic GPU (Hopper, sm90) kernels: flash_lora_prefill.py (the prefill),
tuning.py (block sizes). Decode stays on the Triton kernel.

Nothing here imports jax.experimental.pallas.mosaic_gpu at import time: the kernel
imports it on first use, so JAX versions without it keep the package importable.
"""
from pallas_kernels.mosaic_gpu.flash_lora_prefill import interpret_available, prefill, unsupported_reason
from pallas_kernels.mosaic_gpu.tuning import PrefillBlockSizes

__all__ = ["PrefillBlockSizes", "interpret_available", "prefill", "unsupported_reason"]
