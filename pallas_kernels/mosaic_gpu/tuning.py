"""Block sizes of the Mosaic GPU (Hopper, sm90) prefill kernel: the frozen
dataclass, its default chooser and the tuning as data keyed by device kind.

Imports nothing from jax.experimental.pallas.mosaic_gpu, so that the package
and the knob checks work on JAX versions without (or with a different) Mosaic GPU.
"""
from __future__ import annotations

import dataclasses
import numbers

import jax

# Starting point: JAX 0.11.2's ops/gpu/attention_mgpu.py measured on an H200 (plain attention,
# float16, causal, 16k / 32k: 644 / 619 TFLOP/s at block_q 64, block_kv 128, 2 stages).
# Not yet measured with the LoRA accumulator: bench/gpu_mgpu_check.py sweeps block_k.
_H200 = {"prefill": dict(block_q=64, block_k=128, num_stages=2)}
TUNING = {"NVIDIA H200": _H200, "generic": _H200}

# Shared memory of one block on sm90 (bytes) and what the tiles may fill.
SMEM_PER_BLOCK = 227 * 1024


def device_tuning(device_kind: str | None = None) -> dict:
  if device_kind is None:
    try:
      dev = jax.devices()[0]
      device_kind = dev.device_kind if dev.platform == "gpu" else "generic"
    except Exception:  # pragma: no cover
      device_kind = "generic"
  return TUNING.get(device_kind, TUNING["generic"])


# Narrowest LR tile by default: 8 columns (ranks 1-8 run P @ LR at N = 8). Measured on one
# H200 (JAX 0.11.2, rank 8, causal, 16k / 32k): LoRA over plain +4.0% / +3.8% against +5.7% /
# +4.4% with 16 columns (docs/benchmarks.md 1c). lr_pad=16 keeps the 16-column tile.
LR_PAD_DEFAULT = 8
LR_PADS = (8, 16)


def lr_width(r: int, lr_pad: int = LR_PAD_DEFAULT) -> int:
  """Columns of the LR tile, i.e. the N of the P @ LR wgmma: the rank padded to a width
  wgmma takes. 16 / 32 / 64 columns: the tile is row-major with a 32 / 64 / 128-byte
  swizzle (its row in 16-bit types). 8 columns (ranks <= 8 with lr_pad 8): 16-byte rows
  have no swizzle Mosaic GPU's wgmma takes, so that tile is stored K-major ([8, block_k],
  128-byte swizzle) and the wrapper hands the kernel LR transposed."""
  if lr_pad not in LR_PADS:
    raise ValueError(f"lr_pad must be one of {LR_PADS} for the mosaic_gpu backend, got {lr_pad!r}.")
  for w in (8, 16, 32, 64):
    if w >= lr_pad and r <= w:
      return w
  raise ValueError(f"LoRA rank must be <= 64 for the mosaic_gpu backend, got {r}.")


def lora_rows(lr_cols: int) -> int:
  """Rows of the B tile = columns of the LoRA accumulator: the epilogue wgmma
  (racc [block_q, Rp] @ B [Rp, D]) takes K in multiples of 16 for 16-bit types, so an
  8-column LR tile fills half of a 16-column accumulator (B's padded rows are zero)."""
  return max(lr_cols, 16)


def prefill_smem(block_q, block_k, stages, d, lr_cols, itemsize=2):
  """Shared memory (bytes) of one program: q/out tiles of the two compute
  warpgroups, `stages` K, V and LR tiles, one B tile, the lse rows."""
  b_rows = lora_rows(lr_cols) if lr_cols else 0
  return itemsize * (2 * block_q * d + stages * block_k * (2 * d + lr_cols) + b_rows * d) + 2 * block_q * 4


@dataclasses.dataclass(frozen=True)
class PrefillBlockSizes:
  """block_q: query rows per compute warpgroup (two per program; multiple of 64);
  block_k: keys per pipeline stage (multiple of 64); num_stages: K/V/LR buffers
  (>= 2); lr_pad: 8 or 16, the fewest columns of the LR tile (ranks <= 8 run P @ LR
  with N = 8 instead of 16; ranks > 16 are unaffected). None: chosen by resolve."""
  block_q: int | None = None
  block_k: int | None = None
  num_stages: int | None = None
  lr_pad: int | None = None

  def __post_init__(self):
    for f in dataclasses.fields(self):
      val = getattr(self, f.name)
      if val is None:
        continue
      if not isinstance(val, numbers.Integral) or isinstance(val, bool) or val < 1:
        raise ValueError(f"{f.name} must be a positive int, got {val!r}.")
      # wgmma takes 64 rows at a time; a TMA box has at most 256 rows.
      if f.name in ("block_q", "block_k") and (val % 64 or val > 256):
        raise ValueError(f"{f.name} must be a multiple of 64 up to 256 for the mosaic_gpu backend, got {val}.")
      if f.name == "num_stages" and val < 2:
        raise ValueError(f"num_stages must be >= 2 for the mosaic_gpu backend, got {val}.")
      if f.name == "lr_pad" and val not in LR_PADS:
        raise ValueError(f"lr_pad must be one of {LR_PADS} for the mosaic_gpu backend, got {val}.")

  def resolve(self, *, s_len, d, r, itemsize=2) -> "PrefillBlockSizes":
    """The given sizes, the rest from TUNING; block_k falls back to 64 when kv_len
    is no multiple of the default; stages drop (not below 2) until the tiles fit."""
    t = device_tuning()["prefill"]
    bq = self.block_q or t["block_q"]
    # 64-key blocks where kv_len is no multiple of the default or holds fewer than two of them.
    bk = self.block_k or (t["block_k"] if s_len % t["block_k"] == 0 and s_len >= 2 * t["block_k"] else 64)
    stages = self.num_stages or t["num_stages"]
    lr_pad = self.lr_pad or t.get("lr_pad", LR_PAD_DEFAULT)
    lr_cols = lr_width(r, lr_pad) if r else 0
    while self.num_stages is None and stages > 2 and \
        prefill_smem(bq, bk, stages, d, lr_cols, itemsize) > SMEM_PER_BLOCK:
      stages -= 1
    return PrefillBlockSizes(block_q=bq, block_k=bk, num_stages=stages, lr_pad=lr_pad)
