"""Block sizes of the Mosaic (TPU) kernels: frozen dataclasses with their default
choosers, the tuning as data keyed by device kind (jax.devices()[0].device_kind,
"generic" for any TPU without its own entry)."""
from __future__ import annotations

import dataclasses
import numbers

import jax

TUNING = {
    # Not tuned on a TPU yet: the defaults the kernels were written with.
    "generic": {"prefill": dict(block_q=128, block_k=512), "decode": dict(block_k=512)},
}
VMEM_BUDGET = 12 * 2**20   # stay under the 16 MiB default scoped VMEM limit


def device_tuning(device_kind: str | None = None) -> dict:
  if device_kind is None:
    try:
      dev = jax.devices()[0]
      device_kind = dev.device_kind if dev.platform == "tpu" else "generic"
    except Exception:  # pragma: no cover
      device_kind = "generic"
  return TUNING.get(device_kind, TUNING["generic"])


def _check_fields(obj):
  for f in dataclasses.fields(obj):
    val = getattr(obj, f.name)
    if val is None:
      continue
    if not isinstance(val, numbers.Integral) or isinstance(val, bool) or val < 1:
      raise ValueError(f"{f.name} must be a positive int, got {val!r}.")
    if f.name in ("block_q", "block_k") and val % 16:
      raise ValueError(f"{f.name} must be a multiple of 16 for the mosaic_tpu backend, got {val}.")


@dataclasses.dataclass(frozen=True)
class PrefillBlockSizes:
  """block_q: preferred q rows per KV head (halved until VMEM fits); block_k:
  preferred keys per block (the largest multiple of 128 <= it dividing kv_len)."""
  block_q: int | None = None
  block_k: int | None = None

  def __post_init__(self):
    _check_fields(self)

  @classmethod
  def get_default(cls) -> "PrefillBlockSizes":
    return cls(**device_tuning()["prefill"])

  def resolve(self) -> "PrefillBlockSizes":
    d = self.get_default()
    return PrefillBlockSizes(block_q=self.block_q or d.block_q, block_k=self.block_k or d.block_k)


def default_num_splits(batch, heads_kv, kv_len, block_k):
  # One TensorCore per chip on v5e/v6e, two on v4/v5p (megacore): two splits
  # keep both cores busy at batch 1; more splits only add merge traffic.
  del heads_kv
  return 2 if batch == 1 and kv_len >= 4 * block_k else 1


@dataclasses.dataclass(frozen=True)
class DecodeBlockSizes:
  """block_k: preferred keys per block (as for prefill); num_splits: None ->
  default_num_splits of the block the cache allows."""
  block_k: int | None = None
  num_splits: int | None = None

  def __post_init__(self):
    _check_fields(self)

  @classmethod
  def get_default(cls) -> "DecodeBlockSizes":
    return cls(**device_tuning()["decode"])

  def resolve(self) -> "DecodeBlockSizes":
    """block_k filled; num_splits stays None until the kernel knows its block (see decode)."""
    return DecodeBlockSizes(block_k=self.block_k or self.get_default().block_k, num_splits=self.num_splits)
