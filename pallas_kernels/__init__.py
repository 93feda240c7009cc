"""Flash-LoRA-Attention: Pallas kernels (Triton GPU, Mosaic TPU) and references.

    from pallas_kernels import flash_lora_attention, naive_lora_attention, reference_attention
"""
from pallas_kernels.flash_lora_attention import BACKENDS, flash_lora_attention, resolve_backend
from pallas_kernels.reference import naive_lora_attention, reference_attention

__all__ = [
    "BACKENDS",
    "flash_lora_attention",
    "naive_lora_attention",
    "reference_attention",
    "resolve_backend",
]
