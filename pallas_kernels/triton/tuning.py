"""Block sizes of the Triton kernels: the frozen dataclasses, their default
choosers, and the measured tuning as data keyed by device kind.

``TUNING[jax.devices()[0].device_kind]`` (or ``TUNING["generic"]`` for any
other GPU) holds the measured launch settings; hardware facts (shared memory
per block by compute capability, SM count) come from ``SMEM_BY_CC`` and the
device. The defaults fit the tiles into the card's shared memory: a card that
cannot hold the measured tiles gets smaller ones (docs/kernels.md).
"""
from __future__ import annotations

import dataclasses
import numbers

import jax
from jax.experimental import pallas as pl

from pallas_kernels._args import next_pow2

# Measured on H200 (JAX 0.11.2), the defaults on every GPU without its own entry.
_H200 = {
    # Prefill at q = kv = 8k, head dim 128 (bench/results/2026-11-28-s4-h200/call6): with LoRA
    # 128 x 128 tiles, 2 stages, 8 warps (1.83 ms; 2.22 ms at 128 x 64 / 3 / 8, 2.39-2.87 ms
    # with 4 warps); plain 64 x 64, 3 stages, 4 warps (1.50 ms; 1.90-1.94 ms with 8 warps).
    "prefill_lora": dict(block_q=128, block_k=128, num_warps=8, num_stages=2),
    "prefill_plain": dict(block_q=64, block_k=64, num_warps=4, num_stages=3),
    # Decode: block_k 64 / 3 stages beats 128 / 2 by 6-7% at batch 8 and 4k (plain and LoRA)
    # and ties it at 32k (bench/results/2026-11-28-s4-h200/call4).
    "decode": dict(block_k=64, num_warps=4, num_stages=3),
    # More than two resident decode programs per SM measured no faster.
    "decode_most_resident_per_sm": 2,
    # Columns of decode's LR tile (LR padded by masked loads; a tensor-core dot needs >= 16):
    # 32 beat 16 (which spilled registers), 64 and 128 (batch 8 at 32k: 360.6 us vs 476.7 /
    # 390.0 / 368.0; docs/benchmarks.md section 9a).
    "decode_lr_width": 32,
}
TUNING = {"NVIDIA H200": _H200, "generic": _H200}

# Max dynamic shared memory per block by compute capability (bytes). Unknown / no GPU: H100.
SMEM_BY_CC = {"7.5": 64 * 1024, "8.0": 163 * 1024, "8.6": 99 * 1024, "8.7": 163 * 1024,
              "8.9": 99 * 1024, "9.0": 227 * 1024}
_DEFAULT_SMEM = 227 * 1024
_DEFAULT_SMS = 132  # H100 SXM
NUM_WARPS = (1, 2, 4, 8, 16)


def _gpu():
  try:
    dev = jax.devices()[0]
  except Exception:  # pragma: no cover
    return None
  return dev if dev.platform == "gpu" else None


def device_tuning(device_kind: str | None = None) -> dict:
  """The measured settings for a device kind (default: this machine's first device)."""
  if device_kind is None:
    dev = _gpu()
    device_kind = dev.device_kind if dev is not None else "generic"
  return TUNING.get(device_kind, TUNING["generic"])


def smem_per_block() -> int:
  dev = _gpu()
  cc = str(getattr(dev, "compute_capability", None)) if dev is not None else None
  return SMEM_BY_CC.get(cc, _DEFAULT_SMEM)


def smem_budget() -> int:
  """What the defaults may fill: ~70% of a block's shared memory."""
  return int(0.7 * smem_per_block())


def num_sms() -> int:
  dev = _gpu()
  return int(getattr(dev, "core_count", _DEFAULT_SMS) or _DEFAULT_SMS) if dev is not None else _DEFAULT_SMS


def _check_fields(obj, pow2_fields):
  for f in dataclasses.fields(obj):
    val = getattr(obj, f.name)
    if val is None:
      continue
    if not isinstance(val, numbers.Integral) or isinstance(val, bool) or val < 1:
      raise ValueError(f"{f.name} must be a positive int, got {val!r}.")
    if f.name in pow2_fields and (val < 16 or val & (val - 1)):
      raise ValueError(f"{f.name} must be a power of two >= 16 for the triton backend, got {val}.")
    if f.name == "num_warps" and val not in NUM_WARPS:
      raise ValueError(f"num_warps must be one of {NUM_WARPS}, got {val}.")


def _fill(given, dflt, caps, smem_of, least_stages):
  """The given block sizes (capped by `caps`), the rest from `dflt`; a stage count left
  unset drops (not below least_stages) until smem_of(config) fits the block's shared
  memory, so a larger block_k alone still compiles."""
  cfg = {k: min(given[k], caps[k]) if given.get(k) and k in caps else (given.get(k) or dflt[k]) for k in dflt}
  if given.get("num_stages") is None:
    while cfg["num_stages"] > least_stages and smem_of(cfg) > smem_per_block():
      cfg["num_stages"] -= 1
  return cfg


# ----------------------------------------------------------------------------
# Prefill
# ----------------------------------------------------------------------------
def prefill_smem(rows, block_k, stages, dp, rp, itemsize, lr_itemsize):
  """Shared memory (bytes) of one prefill program as Triton requests it."""
  return rows * dp * itemsize + stages * block_k * (2 * dp * itemsize + rp * lr_itemsize)


def prefill_defaults(dp, rp, itemsize, lr_itemsize, tq, s_len, tuning=None):
  """block_q / block_k / num_warps / num_stages for the prefill kernel (rp 0: no LoRA):
  the measured tiles of the variant (TUNING) where they fit (`prefill_smem` matches
  Triton's request exactly); otherwise 64-key tiles within ~70% of the block's shared
  memory."""
  t = device_tuning() if tuning is None else tuning
  lora, plain = t["prefill_lora"], t["prefill_plain"]
  bq = min(lora["block_q"] if dp <= 128 else 64, max(16, next_pow2(tq)))
  big_k = min(lora["block_k"], max(16, next_pow2(s_len)))
  if rp and bq == lora["block_q"] and \
      prefill_smem(bq, big_k, lora["num_stages"], dp, rp, itemsize, lr_itemsize) <= 0.95 * smem_per_block():
    return dict(block_q=bq, block_k=big_k, num_warps=lora["num_warps"], num_stages=lora["num_stages"])
  if not rp and dp <= 128:
    bqp, bkp = min(plain["block_q"], bq), min(plain["block_k"], max(16, next_pow2(s_len)))
    if prefill_smem(bqp, bkp, plain["num_stages"], dp, 0, itemsize, 0) <= smem_budget():
      return dict(block_q=bqp, block_k=bkp, num_warps=plain["num_warps"], num_stages=plain["num_stages"])
  bk = min(64, max(16, next_pow2(s_len)))
  stages = 3 if dp <= 128 else 2
  budget = smem_budget()
  while prefill_smem(bq, bk, stages, dp, rp, itemsize, lr_itemsize) > budget:
    if stages > 2:
      stages -= 1
    elif bk > 16:
      bk //= 2
    elif bq > 16:
      bq //= 2
    else:
      break
  warps = 8 if dp >= 128 and bq >= 128 else 4
  return dict(block_q=bq, block_k=bk, num_warps=warps, num_stages=stages)


@dataclasses.dataclass(frozen=True)
class PrefillBlockSizes:
  """Launch settings of the Triton prefill kernel; None: chosen by get_default."""
  block_q: int | None = None
  block_k: int | None = None
  num_warps: int | None = None
  num_stages: int | None = None

  def __post_init__(self):
    _check_fields(self, ("block_q", "block_k"))

  @classmethod
  def get_default(cls, *, tq, s_len, d, r, itemsize, lr_itemsize) -> "PrefillBlockSizes":
    """The measured defaults for this shape (r: LoRA rank, 0 without)."""
    return cls().resolve(tq=tq, s_len=s_len, d=d, r=r, itemsize=itemsize, lr_itemsize=lr_itemsize)

  def resolve(self, *, tq, s_len, d, r, itemsize, lr_itemsize) -> "PrefillBlockSizes":
    """The given sizes (blocks capped at the padded problem), the rest from
    prefill_defaults; a stage count left unset drops until the tiles fit."""
    dp = next_pow2(d)
    rp = max(16, next_pow2(r)) if r else 0
    cfg = _fill(dataclasses.asdict(self), prefill_defaults(dp, rp, itemsize, lr_itemsize, tq, s_len),
                dict(block_q=max(16, next_pow2(tq)), block_k=max(16, next_pow2(s_len))),
                lambda c: prefill_smem(c["block_q"], c["block_k"], c["num_stages"], dp, rp, itemsize,
                                       lr_itemsize), 1)
    return PrefillBlockSizes(**cfg)


# ----------------------------------------------------------------------------
# Decode
# ----------------------------------------------------------------------------
def lr_tile_width(r, dp, tuning=None) -> int:
  """Columns of decode's LR tile (columns past rank r are masked loads of zeros):
  the measured width (capped at the padded head dim dp), never under 16 or next_pow2(r)."""
  t = device_tuning() if tuning is None else tuning
  return max(16, next_pow2(r), min(t["decode_lr_width"], dp))


def decode_smem(mp, block_k, stages, dp, rp, itemsize, lr_itemsize):
  """Shared memory (bytes) of one decode program as Triton lays it out: the q
  tile, stages - 1 buffers of the K / V / LR tiles, and 32 bytes of scratch per
  key of the block. Fits ncu's figures exactly on H200 (head dim 128, 16 q rows):
  71,680 plain at block_k 64 / 3 stages, 79,872 LR-32 at 64 / 3, 81,920 at 128 / 2."""
  tiles = block_k * (2 * dp * itemsize + rp * lr_itemsize)
  return mp * dp * itemsize + max(1, stages - 1) * tiles + 32 * block_k


def decode_defaults(mp, dp, rp, itemsize, lr_itemsize, s_len, tuning=None):
  t = (device_tuning() if tuning is None else tuning)["decode"]
  bk = min(t["block_k"], max(16, next_pow2(s_len)))
  budget = smem_budget()
  while bk > 16 and decode_smem(mp, bk, t["num_stages"], dp, rp, itemsize, lr_itemsize) > budget:
    bk //= 2
  return dict(block_k=bk, num_warps=t["num_warps"], num_stages=t["num_stages"])


def resident_programs_per_sm(smem_bytes, num_warps, most=None):
  """How many decode programs one SM holds at once, by shared memory (1 KB per
  block is the driver's) and by worst-case registers (255 a thread), capped at
  `most` (TUNING's decode_most_resident_per_sm)."""
  most = device_tuning()["decode_most_resident_per_sm"] if most is None else most
  by_smem = (smem_per_block() + 1024) // (smem_bytes + 1024)
  by_regs = 65536 // (255 * 32 * num_warps)
  return int(max(1, min(most, by_smem, by_regs)))


def default_num_splits(batch, heads_kv, kv_len, block_k, per_sm=2, sms=None):
  """As many (batch, KV head, split) programs as the GPU holds at once (per_sm
  resident programs on each SM), never more: a partial second wave costs as much
  as a full one (H200, batch 8: 5 splits = 320 programs over 264 slots ran
  +22% with the LoRA tile, 4 splits +3%). At least two KV blocks per split on a
  full cache."""
  sms = num_sms() if sms is None else sms
  want = (per_sm * sms) // (batch * heads_kv)
  most = max(1, pl.cdiv(kv_len, block_k) // 2)
  return int(max(1, min(want, most)))


@dataclasses.dataclass(frozen=True)
class DecodeBlockSizes:
  """Launch settings of the Triton split-K decode kernel; None: chosen by get_default
  (num_splits: one wave of resident programs)."""
  block_k: int | None = None
  num_warps: int | None = None
  num_stages: int | None = None
  num_splits: int | None = None

  def __post_init__(self):
    _check_fields(self, ("block_k",))

  @classmethod
  def get_default(cls, *, batch, tq, group, heads_kv, s_len, d, r, itemsize,
                  lr_itemsize) -> "DecodeBlockSizes":
    """The measured defaults for this shape (r: LoRA rank, 0 without)."""
    return cls().resolve(batch=batch, tq=tq, group=group, heads_kv=heads_kv, s_len=s_len, d=d, r=r,
                         itemsize=itemsize, lr_itemsize=lr_itemsize)

  def resolve(self, *, batch, tq, group, heads_kv, s_len, d, r, itemsize, lr_itemsize) -> "DecodeBlockSizes":
    """The given sizes (block_k capped at the padded kv_len), the rest from
    decode_defaults; num_splits None -> one wave of resident programs."""
    dp = next_pow2(d)
    rp = lr_tile_width(r, dp) if r else 0
    mp = max(16, next_pow2(tq * group))
    cfg = _fill(dict(block_k=self.block_k, num_warps=self.num_warps, num_stages=self.num_stages),
                decode_defaults(mp, dp, rp, itemsize, lr_itemsize, s_len),
                dict(block_k=max(16, next_pow2(s_len))),
                lambda c: decode_smem(mp, c["block_k"], c["num_stages"], dp, rp, itemsize, lr_itemsize), 2)
    ns = self.num_splits
    if ns is None:
      smem = decode_smem(mp, cfg["block_k"], cfg["num_stages"], dp, rp, itemsize, lr_itemsize)
      ns = default_num_splits(batch, heads_kv, s_len, cfg["block_k"],
                              resident_programs_per_sm(smem, cfg["num_warps"]))
    return DecodeBlockSizes(num_splits=int(ns), **cfg)
