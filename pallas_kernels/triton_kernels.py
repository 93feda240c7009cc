"""Pallas Triton (GPU) kernels for Flash-LoRA-Attention.

Two kernels (see docs/kernels.md for the design and the block-size reasoning):

* ``prefill``: grid (q blocks, batch, query heads). Each program keeps a
  [block_q, D] q tile and runs the online softmax over KV blocks with TWO
  running accumulators: acc [block_q, D] (P @ V_base) and racc [block_q, Rp]
  (P @ LR), both rescaled by the same factor. The epilogue normalises both and
  adds ``scale * racc @ B_h`` once. Fully masked KV blocks (causal, kv_lengths)
  are skipped through the loop bounds; blocks that need no mask run a loop
  without mask arithmetic.
* ``decode`` (split-K): grid (kv splits, batch, KV heads). All query heads of
  the KV group and all q rows are stacked as the rows of one q tile (row = t*G
  + g, padded to >= 16 for tl.dot), so K, V_base and LR are read once per KV
  head. Each split writes a normalised partial (o, racc) and its log-sum-exp; a
  small merge kernel combines the splits with log-sum-exp weights (the
  rank-wide partials the same way) and only then multiplies by B, once.
  With one split the decode kernel applies the epilogue itself.

``return_lse=True`` (static) adds a float32 [B, Tq, Hq] output: the natural
log-sum-exp of each row (-inf for rows that see no key), written by the
prefill epilogue, the one-split decode kernel or the merge kernel. With the
default False the kernels have no such output and are unchanged.

Caches come stacked over layers ([L, B, S, Hkv, D]); the layer index is an
int32 input read inside the kernel and used as a pointer offset, so the layer
is never copied. head_dim and rank are padded to powers of two (rank >= 16)
by masked loads, never by copying K/V/LR; kv_len needs no padding either
(keys past kv_lengths[b] are masked loads), so the Triton path makes no
wrapper-side copy of the cache for any kv_len.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl

try:  # The Triton backend is deprecated in JAX >= 0.11 but still shipped.
  from jax.experimental.pallas import triton as plgpu
except ImportError:  # pragma: no cover
  plgpu = None

from pallas_kernels._args import next_pow2

LOG2E = math.log2(math.e)
LN2 = math.log(2.0)
# Finite mask value: exp2(NEG - m) == 0 and NEG - NEG == 0, so masked rows
# never produce inf - inf = NaN.
NEG = -0.7 * float(np.finfo(np.float32).max)

# Max dynamic shared memory per block by compute capability (bytes); defaults
# keep the pipelined tiles within ~70% of it. Unknown / no GPU: assume H100.
_SMEM_BY_CC = {"7.5": 64 * 1024, "8.0": 163 * 1024, "8.6": 99 * 1024, "8.7": 163 * 1024,
               "8.9": 99 * 1024, "9.0": 227 * 1024}


def _smem_per_block() -> int:
  cc = None
  try:
    dev = jax.devices()[0]
    if dev.platform == "gpu":
      cc = str(getattr(dev, "compute_capability", None))
  except Exception:  # pragma: no cover
    pass
  return _SMEM_BY_CC.get(cc, 227 * 1024)


def smem_budget() -> int:
  return int(0.7 * _smem_per_block())


def _tiles_smem(rows, block_k, stages, dp, rp, itemsize, lr_itemsize):
  return rows * dp * itemsize + stages * block_k * (2 * dp * itemsize + rp * lr_itemsize)


def prefill_defaults(dp, rp, itemsize, lr_itemsize, tq, s_len):
  """block_q / block_k / num_warps / num_stages for the prefill kernel (rp 0: no LoRA).

  Measured on H200 at q = kv = 8k, head dim 128 (bench/results/2026-11-28-s4-h200/call6):
  the LoRA kernel is fastest with 128 x 128 tiles, 2 stages, 8 warps (1.83 ms; 2.22 ms at
  128 x 64 / 3 / 8, 2.39-2.87 ms with 4 warps); the plain kernel with 64 x 64 tiles,
  3 stages, 4 warps (1.50 ms; 1.90-1.94 ms with 8 warps). Each is taken where its tiles
  fit (`_tiles_smem` matches Triton's request exactly); otherwise 64-key tiles within
  ~70% of the block's shared memory."""
  bq = min(128 if dp <= 128 else 64, max(16, next_pow2(tq)))
  big_k = min(128, max(16, next_pow2(s_len)))
  if rp and bq == 128 and _tiles_smem(bq, big_k, 2, dp, rp, itemsize, lr_itemsize) <= 0.95 * _smem_per_block():
    return dict(block_q=bq, block_k=big_k, num_warps=8, num_stages=2)
  if not rp and dp <= 128:
    bq64, bk64 = min(64, bq), min(64, big_k)
    if _tiles_smem(bq64, bk64, 3, dp, 0, itemsize, 0) <= smem_budget():
      return dict(block_q=bq64, block_k=bk64, num_warps=4, num_stages=3)
  bk = min(64, max(16, next_pow2(s_len)))
  stages = 3 if dp <= 128 else 2
  budget = smem_budget()
  while _tiles_smem(bq, bk, stages, dp, rp, itemsize, lr_itemsize) > budget:
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


def _fill_block_sizes(given, dflt, caps, smem_of, least_stages):
  """The given block sizes (capped by `caps`), the rest from `dflt`; a stage count left
  unset drops (not below least_stages) until smem_of(config) fits the block's shared
  memory, so a larger block_k alone still compiles."""
  cfg = {k: min(given[k], caps[k]) if given.get(k) and k in caps else (given.get(k) or dflt[k]) for k in dflt}
  if given.get("num_stages") is None:
    while cfg["num_stages"] > least_stages and smem_of(cfg) > _smem_per_block():
      cfg["num_stages"] -= 1
  return cfg


def prefill_config(*, tq, s_len, d, r, itemsize, lr_itemsize, block_q=None, block_k=None,
                   num_warps=None, num_stages=None):
  """The prefill kernel's block sizes: the given ones, the rest from prefill_defaults
  (_fill_block_sizes). r: the LoRA rank, 0 without."""
  dp = next_pow2(d)
  rp = max(16, next_pow2(r)) if r else 0
  return _fill_block_sizes(
      dict(block_q=block_q, block_k=block_k, num_warps=num_warps, num_stages=num_stages),
      prefill_defaults(dp, rp, itemsize, lr_itemsize, tq, s_len),
      dict(block_q=max(16, next_pow2(tq)), block_k=max(16, next_pow2(s_len))),
      lambda c: _tiles_smem(c["block_q"], c["block_k"], c["num_stages"], dp, rp, itemsize, lr_itemsize), 1)


def decode_smem(mp, block_k, stages, dp, rp, itemsize, lr_itemsize):
  """Shared memory (bytes) of one decode program as Triton lays it out: the q
  tile, stages - 1 buffers of the K / V / LR tiles, and 32 bytes of scratch per
  key of the block. Fits ncu's figures exactly on H200 (head dim 128, 16 q rows):
  71,680 plain at block_k 64 / 3 stages, 79,872 LR-32 at 64 / 3, 81,920 at 128 / 2."""
  tiles = block_k * (2 * dp * itemsize + rp * lr_itemsize)
  return mp * dp * itemsize + max(1, stages - 1) * tiles + 32 * block_k


def decode_defaults(mp, dp, rp, itemsize, lr_itemsize, s_len):
  # block_k 64 / 3 stages: on H200 at batch 8 and 4k it beats 128 / 2 by 6-7% (plain and
  # LoRA) and ties it at 32k (bench/results/2026-11-28-s4-h200/call4).
  bk = min(64, max(16, next_pow2(s_len)))
  stages = 3
  budget = smem_budget()
  while bk > 16 and decode_smem(mp, bk, stages, dp, rp, itemsize, lr_itemsize) > budget:
    bk //= 2
  return dict(block_k=bk, num_warps=4, num_stages=stages)


def resident_programs_per_sm(smem_bytes, num_warps, most=2):
  """How many decode programs one SM holds at once, by shared memory (1 KB per
  block is the driver's) and by worst-case registers (255 a thread), capped at
  `most`: more than two resident programs measured no faster on H200."""
  by_smem = (_smem_per_block() + 1024) // (smem_bytes + 1024)
  by_regs = 65536 // (255 * 32 * num_warps)
  return int(max(1, min(most, by_smem, by_regs)))


def _compiler_params(num_warps, num_stages):
  return plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages)


def _dot(a, b, trans_b=False):
  dims = (((1,), (1,)), ((), ())) if trans_b else (((1,), (0,)), ((), ()))
  # Pallas-Triton maps the DEFAULT precision of float32 dots to TF32 (10-bit
  # mantissa); ask for IEEE float32 so f32 inputs and the f32 epilogue
  # (rank-wide accumulator @ B) keep ~1e-6 accuracy. 16-bit dots are unaffected.
  prec = lax.Precision.HIGHEST if a.dtype == jnp.float32 else None
  return lax.dot_general(a, b, dims, precision=prec, preferred_element_type=jnp.float32)


def _cdiv(x, n: int):
  return lax.div(x + (n - 1), n)  # x >= 0 everywhere it is used


def _load(ref, mask):
  if mask is None:
    return plgpu.load(ref)
  return plgpu.load(ref, mask=mask, other=0)


def _and(a, b):
  if a is None:
    return b
  if b is None:
    return a
  return a & b


def _load_lr(lr_ref, layer, j, block_k, mask):
  start = pl.multiple_of(j * block_k, block_k)
  return _load(lr_ref.at[layer, pl.ds(start, block_k), :], mask)


def _attend_block(j, carry, *, q, k_ref, v_ref, lr_ref, layer, block_k, kv_len,
                  dmask, rmask, qk_scale, valid_fn, masked, prefetch_hi=None):
  """One KV block of the online softmax with the extra rank-wide accumulator.

  prefetch_hi (unmasked blocks only): the LR tile of this block arrives in the
  carry, loaded one iteration ahead, and the tile of block min(j + 1,
  prefetch_hi - 1) is loaded here; see _run_blocks.
  """
  if prefetch_hi is not None:
    acc, racc, m_i, l_i, lrt = carry
    lr_next = _load_lr(lr_ref, layer, jnp.minimum(j + 1, prefetch_hi - 1), block_k, rmask)
  else:
    acc, racc, m_i, l_i = carry
  start = pl.multiple_of(j * block_k, block_k)
  cols = start + jnp.arange(block_k, dtype=jnp.int32)
  in_len = (cols < kv_len)[:, None] if masked else None
  kmask = _and(in_len, dmask)
  k = _load(k_ref.at[layer, pl.ds(start, block_k), :], kmask)
  s = _dot(q, k, trans_b=True) * qk_scale          # log2-domain scores
  if masked:
    valid = valid_fn(cols)
    s = jnp.where(valid, s, NEG)
  m_new = jnp.maximum(m_i, jnp.max(s, axis=1))
  alpha = jnp.exp2(m_i - m_new)
  p = jnp.exp2(s - m_new[:, None])
  if masked:
    p = jnp.where(valid, p, 0.0)
  l_i = l_i * alpha + jnp.sum(p, axis=1)
  v = _load(v_ref.at[layer, pl.ds(start, block_k), :], kmask)
  acc = acc * alpha[:, None] + _dot(p.astype(v.dtype), v)
  if lr_ref is not None:
    if prefetch_hi is None:
      lrt = _load(lr_ref.at[layer, pl.ds(start, block_k), :], _and(in_len, rmask))
    if lrt.shape[-1] < 16:   # lora_dot="fma": rank-wide product on the CUDA cores
      racc = racc * alpha[:, None] + jnp.sum(p[:, :, None] * lrt.astype(jnp.float32)[None], axis=1)
    else:
      racc = racc * alpha[:, None] + _dot(p.astype(lrt.dtype), lrt)
  if prefetch_hi is not None:
    return acc, racc, m_new, l_i, lr_next
  return acc, racc, m_new, l_i


def _run_blocks(q, *, lo_full, hi_full, lo_mask, hi_mask, m_rows, dp, rp, lr_prefetch=False, **kw):
  """Online softmax over blocks [lo_full, hi_full) without masks, then
  [lo_mask, hi_mask) with masks.

  lr_prefetch: in the unmasked loop, load each block's LR tile one iteration
  ahead, carried in registers (a test of whether the LR load's latency is what
  the LoRA term costs: on an H200 it changed the decode time by -4% to +10%,
  so it is not; docs/perf-notes.md).
  """
  acc = jnp.zeros((m_rows, dp), jnp.float32)
  lr_ref = kw["lr_ref"]
  racc = jnp.zeros((m_rows, rp), jnp.float32) if lr_ref is not None else None
  m_i = jnp.full((m_rows,), -jnp.inf, jnp.float32)
  l_i = jnp.zeros((m_rows,), jnp.float32)
  carry = (acc, racc, m_i, l_i)
  if lr_ref is not None and lr_prefetch:
    # First tile, masked to the valid rows (the range may be empty).
    j0 = jnp.maximum(jnp.minimum(lo_full, hi_full - 1), 0)
    rows0 = j0 * kw["block_k"] + jnp.arange(kw["block_k"], dtype=jnp.int32)
    lr0 = _load_lr(lr_ref, kw["layer"], j0, kw["block_k"],
                   _and((rows0 < kw["kv_len"])[:, None], kw["rmask"]))
    carry = lax.fori_loop(lo_full, hi_full, functools.partial(
        _attend_block, q=q, masked=False, prefetch_hi=hi_full, **kw), carry + (lr0,))[:4]
  else:
    carry = lax.fori_loop(lo_full, hi_full,
                          functools.partial(_attend_block, q=q, masked=False, **kw), carry)
  carry = lax.fori_loop(lo_mask, hi_mask,
                        functools.partial(_attend_block, q=q, masked=True, **kw), carry)
  return carry


def _lse_nat(m2, l):
  """Natural-log lse from a log2-domain max m2 and a row sum l (relative to m2);
  -inf where l == 0 (no visible key)."""
  return jnp.where(l > 0, (m2 + jnp.log2(jnp.where(l > 0, l, 1.0))) * LN2, -jnp.inf)


def _masks(d, dp, r, rp):
  dmask = None if d == dp else (jnp.arange(dp, dtype=jnp.int32) < d)[None, :]
  rmask = None if r == rp else (jnp.arange(rp, dtype=jnp.int32) < r)[None, :]
  return dmask, rmask


# ----------------------------------------------------------------------------
# Prefill
# ----------------------------------------------------------------------------
def _prefill_kernel(layer_ref, kvlen_ref, qoff_ref, q_ref, k_ref, v_ref, *refs,
                    has_lora, causal, qk_scale, block_q, block_k, nq, tq, d, r,
                    return_lse=False):
  lse_ref = None
  if return_lse:
    *refs, lse_ref = refs
  if has_lora:
    lr_ref, b_ref, scale_ref, o_ref = refs
  else:
    lr_ref = b_ref = scale_ref = None
    (o_ref,) = refs
  i = nq - 1 - pl.program_id(0)          # heaviest (last) causal q blocks first
  bi = pl.program_id(1)
  h = pl.program_id(2)
  layer = layer_ref[0]
  kv_len = kvlen_ref[bi]
  q_off = qoff_ref[bi]
  dp = q_ref.shape[-1]
  rp = lr_ref.shape[-1] if has_lora else 16
  dmask, rmask = _masks(d, dp, r if has_lora else rp, rp)

  q_start = i * block_q
  rows = q_start + jnp.arange(block_q, dtype=jnp.int32)
  row_ok = None if tq % block_q == 0 else (rows < tq)[:, None]
  io_mask = _and(row_ok, dmask)
  q = _load(q_ref, io_mask)

  t_last = jnp.minimum(q_start + block_q, tq) - 1
  if causal:
    hi = jnp.minimum(kv_len, q_off + t_last + 1)   # keys any row of the block sees
    full = jnp.minimum(kv_len, q_off + q_start + 1)  # keys every row sees
  else:
    hi = full = kv_len
  hi = jnp.maximum(hi, 0)
  full = jnp.maximum(full, 0)
  n_blocks = _cdiv(hi, block_k)
  n_full = lax.div(full, block_k)

  def valid_fn(cols):
    ok = cols[None, :] < kv_len
    if causal:
      ok = ok & (cols[None, :] <= (q_off + rows)[:, None])
    return ok

  acc, racc, m_i, l_i = _run_blocks(
      q, lo_full=0, hi_full=n_full, lo_mask=n_full, hi_mask=n_blocks,
      m_rows=block_q, dp=dp, rp=rp, k_ref=k_ref, v_ref=v_ref, lr_ref=lr_ref,
      layer=layer, block_k=block_k, kv_len=kv_len, dmask=dmask, rmask=rmask,
      qk_scale=qk_scale, valid_fn=valid_fn)
  inv = jnp.where(l_i > 0, 1.0 / jnp.where(l_i > 0, l_i, 1.0), 0.0)  # no key -> 0
  o = acc * inv[:, None]
  if has_lora:
    bmat = _load(b_ref, _and(None if r == rp else (jnp.arange(rp) < r)[:, None], dmask))
    o = o + scale_ref[bi, h] * _dot(racc * inv[:, None], bmat.astype(jnp.float32))
  plgpu.store(o_ref, o.astype(o_ref.dtype), mask=io_mask)
  if return_lse:
    plgpu.store(lse_ref, _lse_nat(m_i, l_i), mask=None if row_ok is None else rows < tq)


def prefill(q, k, v, layer, kv_len, q_off, lr, lora_b, scale, *, causal, sm_scale,
            block_q=None, block_k=None, num_warps=None, num_stages=None,
            interpret=False, return_lse=False):
  """Flash-LoRA prefill. Canonical shapes (see _args.Canon); returns [B,Tq,Hq,D]
  (and the float32 lse [B,Tq,Hq] with return_lse).

  Block sizes left as None get shared-memory-aware defaults (prefill_defaults).
  """
  b, tq, hq, d = q.shape
  num_layers, _, s_len, hkv, _ = k.shape
  group = hq // hkv
  has_lora = lr is not None
  dp = next_pow2(d)
  r = lr.shape[-1] if has_lora else 0
  rp = max(16, next_pow2(r)) if has_lora else 16
  cfg = prefill_config(tq=tq, s_len=s_len, d=d, r=r, itemsize=jnp.dtype(q.dtype).itemsize,
                       lr_itemsize=jnp.dtype(lr.dtype).itemsize if has_lora else 0, block_q=block_q,
                       block_k=block_k, num_warps=num_warps, num_stages=num_stages)
  block_q, block_k, num_warps, num_stages = (cfg[n] for n in ("block_q", "block_k", "num_warps", "num_stages"))
  nq = pl.cdiv(tq, block_q)
  kernel = functools.partial(
      _prefill_kernel, has_lora=has_lora, causal=causal,
      qk_scale=float(sm_scale) * LOG2E, block_q=block_q, block_k=block_k, nq=nq,
      tq=tq, d=d, r=r, **({"return_lse": True} if return_lse else {}))
  full1 = lambda n: pl.BlockSpec((n,), lambda *_: (0,))
  in_specs = [
      full1(1), full1(b), full1(b),
      pl.BlockSpec((None, block_q, None, dp), lambda i, bi, h: (bi, nq - 1 - i, h, 0)),
      # Whole (layer, kv) extent of this row and KV head: the kernel indexes
      # the layer and the KV block itself (pointer arithmetic, no copy).
      pl.BlockSpec((num_layers, None, s_len, None, dp),
                   lambda i, bi, h: (0, bi, 0, h // group, 0)),
      pl.BlockSpec((num_layers, None, s_len, None, dp),
                   lambda i, bi, h: (0, bi, 0, h // group, 0)),
  ]
  args = [layer.reshape(1), kv_len, q_off, q, k, v]
  if has_lora:
    per_q = lora_b.shape[1] != hkv
    in_specs += [
        pl.BlockSpec((num_layers, None, s_len, rp), lambda i, bi, h: (0, bi, 0, 0)),
        pl.BlockSpec((None, None, rp, dp),
                     (lambda i, bi, h: (bi, h, 0, 0)) if per_q
                     else (lambda i, bi, h: (bi, h // group, 0, 0))),
        pl.BlockSpec((b, hq), lambda *_: (0, 0)),
    ]
    args += [lr, lora_b, scale]
  out_specs = pl.BlockSpec((None, block_q, None, dp), lambda i, bi, h: (bi, nq - 1 - i, h, 0))
  out_shape = jax.ShapeDtypeStruct(q.shape, q.dtype)
  if return_lse:
    out_specs = [out_specs, pl.BlockSpec((None, block_q, None),
                                         lambda i, bi, h: (bi, nq - 1 - i, h))]
    out_shape = [out_shape, jax.ShapeDtypeStruct((b, tq, hq), jnp.float32)]
  res = pl.pallas_call(
      kernel,
      grid=(nq, b, hq),
      in_specs=in_specs,
      out_specs=out_specs,
      out_shape=out_shape,
      compiler_params=_compiler_params(num_warps, num_stages),
      interpret=interpret,
      name="flash_lora_prefill",
  )(*args)
  return tuple(res) if return_lse else res


# ----------------------------------------------------------------------------
# Split-K decode
# ----------------------------------------------------------------------------
def _row_ids(mp, group):
  rows = jnp.arange(mp, dtype=jnp.int32)
  return rows, lax.div(rows, group), lax.rem(rows, group)


def _lora_rows(rr, *, bi, h, b_ref, scale_ref, g_row, group, per_q_head_b, r, rp, dmask):
  """scale[row] * rr[row] @ B[head(row)] for the stacked (t, g) rows."""
  mp = rr.shape[0]
  bmask = _and(None if r == rp else (jnp.arange(rp) < r)[:, None], dmask)
  hq_rows = h * group + g_row
  sc = plgpu.load(scale_ref.at[jnp.full((mp,), bi, jnp.int32), hq_rows])
  mm = _dot if rp >= 16 else (lambda a, bm: jnp.sum(a[:, :, None] * bm[None], axis=1))
  if not per_q_head_b:
    bmat = _load(b_ref.at[h, :, :], bmask).astype(jnp.float32)
    term = mm(rr, bmat)
  else:
    def body(g, term):
      bmat = _load(b_ref.at[h * group + g, :, :], bmask).astype(jnp.float32)
      sel = jnp.where((g_row == g)[:, None], rr, 0.0)
      return term + mm(sel, bmat)
    term = lax.fori_loop(0, group, body, jnp.zeros((mp, b_ref.shape[-1]), jnp.float32))
  return sc[:, None] * term


def _store_rows(o_ref, o, *, h, t_row, g_row, group, row_ok, dmask):
  """Scatters the stacked (t, g) rows into o_ref [Tq, Hq, Dp] (this batch row)."""
  mp, dp = o.shape
  shape = (mp, dp)
  t_idx = jnp.broadcast_to(t_row[:, None], shape)
  h_idx = jnp.broadcast_to((h * group + g_row)[:, None], shape)
  d_idx = jnp.broadcast_to(jnp.arange(dp, dtype=jnp.int32)[None, :], shape)
  plgpu.store(o_ref.at[t_idx, h_idx, d_idx], o.astype(o_ref.dtype),
              mask=_and(row_ok[:, None], dmask))


def _store_lse_rows(lse_ref, lse, *, h, t_row, g_row, group, row_ok):
  """Scatters the stacked (t, g) rows' lse into lse_ref [Tq, Hq] (this batch row)."""
  plgpu.store(lse_ref.at[t_row, h * group + g_row], lse, mask=row_ok)


def _finish_rows(num_o, num_r, denom, *, bi, h, o_ref, b_ref, scale_ref, t_row,
                 g_row, row_ok, group, per_q_head_b, r, rp, dmask):
  inv = jnp.where(denom > 0, 1.0 / jnp.where(denom > 0, denom, 1.0), 0.0)
  o = num_o * inv[:, None]
  if num_r is not None:
    o = o + _lora_rows(num_r * inv[:, None], bi=bi, h=h, b_ref=b_ref,
                       scale_ref=scale_ref, g_row=g_row, group=group,
                       per_q_head_b=per_q_head_b, r=r, rp=rp, dmask=dmask)
  _store_rows(o_ref, o, h=h, t_row=t_row, g_row=g_row, group=group,
              row_ok=row_ok, dmask=dmask)


def _decode_kernel(layer_ref, kvlen_ref, qoff_ref, q_ref, k_ref, v_ref, *refs,
                   has_lora, per_q_head_b, causal, qk_scale, block_k, num_splits,
                   tq, d, r, group, mp, fused, lr_prefetch=False, return_lse=False):
  # fused (one split, not split_only): finish the rows here, no merge kernel
  lr_ref = b_ref = scale_ref = None
  if has_lora and fused:
    lr_ref, b_ref, scale_ref, *outs = refs
  elif has_lora:
    lr_ref, *outs = refs
  else:
    outs = refs
  sid = pl.program_id(0)
  bi = pl.program_id(1)
  h = pl.program_id(2)
  layer = layer_ref[0]
  kv_len = kvlen_ref[bi]
  q_off = qoff_ref[bi]
  dp = q_ref.shape[-1]
  rp = lr_ref.shape[-1] if has_lora else 16
  dmask, rmask = _masks(d, dp, r if has_lora else rp, rp)

  rows, t_row, g_row = _row_ids(mp, group)
  row_ok = rows < tq * group
  shape = (mp, dp)
  q = plgpu.load(
      q_ref.at[jnp.broadcast_to(t_row[:, None], shape),
               jnp.broadcast_to((h * group + g_row)[:, None], shape),
               jnp.broadcast_to(jnp.arange(dp, dtype=jnp.int32)[None, :], shape)],
      mask=_and(row_ok[:, None], dmask), other=0)

  if causal:
    hi = jnp.minimum(kv_len, q_off + tq)
    full = jnp.minimum(kv_len, q_off + 1)
  else:
    hi = full = kv_len
  hi = jnp.maximum(hi, 0)
  full = jnp.maximum(full, 0)
  nb = _cdiv(hi, block_k)
  n_full = lax.div(full, block_k)
  # Balanced split of this row's live blocks (kv_lengths, not max_len).
  per = _cdiv(nb, num_splits)
  b_lo = sid * per
  b_hi = jnp.minimum(b_lo + per, nb)

  def valid_fn(cols):
    ok = cols[None, :] < kv_len
    if causal:
      ok = ok & (cols[None, :] <= (q_off + t_row)[:, None])
    return ok

  acc, racc, m_i, l_i = _run_blocks(
      q, lo_full=b_lo, hi_full=jnp.minimum(b_hi, n_full),
      lo_mask=jnp.maximum(b_lo, n_full), hi_mask=b_hi, m_rows=mp, dp=dp, rp=rp,
      k_ref=k_ref, v_ref=v_ref, lr_ref=lr_ref, layer=layer, block_k=block_k,
      kv_len=kv_len, dmask=dmask, rmask=rmask, qk_scale=qk_scale,
      valid_fn=valid_fn, lr_prefetch=lr_prefetch)

  if fused:
    if return_lse:
      o_ref, lse_out_ref = outs
      _store_lse_rows(lse_out_ref, _lse_nat(m_i, l_i), h=h, t_row=t_row, g_row=g_row,
                      group=group, row_ok=row_ok)
    else:
      (o_ref,) = outs
    _finish_rows(acc, racc, l_i, bi=bi, h=h, o_ref=o_ref, b_ref=b_ref,
                 scale_ref=scale_ref, t_row=t_row, g_row=g_row, row_ok=row_ok,
                 group=group, per_q_head_b=per_q_head_b, r=r, rp=rp, dmask=dmask)
    return
  if has_lora:
    opart_ref, rpart_ref, lse_ref = outs
  else:
    opart_ref, lse_ref = outs
  inv = jnp.where(l_i > 0, 1.0 / jnp.where(l_i > 0, l_i, 1.0), 0.0)
  rmask_rows = row_ok[:, None]
  plgpu.store(opart_ref, acc * inv[:, None], mask=_and(rmask_rows, dmask))
  if has_lora:
    plgpu.store(rpart_ref, racc * inv[:, None], mask=_and(rmask_rows, rmask))
  lse = jnp.where(l_i > 0, m_i + jnp.log2(jnp.where(l_i > 0, l_i, 1.0)), -jnp.inf)
  lse_ref[...] = lse


def _pow2_floor(x):
  return 1 << (max(1, int(x)).bit_length() - 1)


def merge_tiling(num_splits, m_rows, dp, rp):
  """(m4, sc, dc): rows, splits per chunk and head-dim columns of one merge
  program's [sc, m4, dc] tile, kept at <= 8192 elements (registers)."""
  m4 = next_pow2(m_rows)
  nsp = next_pow2(num_splits)
  dc = min(dp, _pow2_floor(8192 // (m4 * max(rp, min(nsp, 64)))))
  sc = min(nsp, _pow2_floor(8192 // (m4 * dc)))
  return m4, sc, dc


def _merge_kernel(lse_ref, opart_ref, *refs, has_lora, per_q_head_b, num_splits,
                  tq, d, r, group, m4, sc, dc, return_lse=False):
  """Merges the splits of one (batch row, KV head, head-dim chunk).

  All splits are loaded at once as a [sc, m4, dc] tile (a sequential loop over
  splits would pay one memory latency per split); log-sum-exp weights merge
  the D-wide and the rank-wide partials alike, then B is applied once.
  With return_lse the merged lse is written by the first head-dim chunk.
  """
  lse_out_ref = None
  if return_lse:
    *refs, lse_out_ref = refs
  if has_lora:
    rpart_ref, b_ref, scale_ref, o_ref = refs
  else:
    rpart_ref = b_ref = scale_ref = None
    (o_ref,) = refs
  bi, h, ci = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  m_rows = tq * group
  rp = max(16, next_pow2(r)) if has_lora else 16
  m_ar = jnp.arange(m4, dtype=jnp.int32)
  d_ar = ci * dc + jnp.arange(dc, dtype=jnp.int32)
  r_ar = jnp.arange(rp, dtype=jnp.int32)
  row_ok = m_ar < m_rows
  n_chunks = pl.cdiv(num_splits, sc)

  def body(c, carry):
    acc, racc, mx, den = carry
    s_ar = c * sc + jnp.arange(sc, dtype=jnp.int32)
    s_ok = s_ar < num_splits
    s2 = jnp.broadcast_to(s_ar[:, None], (sc, m4))
    m2 = jnp.broadcast_to(m_ar[None, :], (sc, m4))
    ok2 = s_ok[:, None] & row_ok[None, :]
    lse = plgpu.load(lse_ref.at[s2, m2], mask=ok2, other=-jnp.inf)     # [sc, m4]
    m_new = jnp.maximum(mx, jnp.max(lse, axis=0))
    m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)
    a = jnp.exp2(mx - m_safe)
    w = jnp.exp2(lse - m_safe[None, :])                                  # empty split -> 0
    shp = (sc, m4, dc)
    s3 = jnp.broadcast_to(s_ar[:, None, None], shp)
    m3 = jnp.broadcast_to(m_ar[None, :, None], shp)
    d3 = jnp.broadcast_to(d_ar[None, None, :], shp)
    o = plgpu.load(opart_ref.at[s3, m3, d3], mask=ok2[:, :, None] & (d3 < d), other=0.0)
    acc = acc * a[:, None] + jnp.sum(w[:, :, None] * o, axis=0)
    if has_lora:
      shp = (sc, m4, rp)
      rr = plgpu.load(
          rpart_ref.at[jnp.broadcast_to(s_ar[:, None, None], shp),
                       jnp.broadcast_to(m_ar[None, :, None], shp),
                       jnp.broadcast_to(r_ar[None, None, :], shp)],
          mask=ok2[:, :, None] & (r_ar < r)[None, None, :], other=0.0)
      racc = racc * a[:, None] + jnp.sum(w[:, :, None] * rr, axis=0)
    return acc, racc, m_new, den * a + jnp.sum(w, axis=0)

  init = (jnp.zeros((m4, dc), jnp.float32),
          jnp.zeros((m4, rp), jnp.float32) if has_lora else None,
          jnp.full((m4,), -jnp.inf, jnp.float32), jnp.zeros((m4,), jnp.float32))
  if n_chunks == 1:
    acc, racc, mx, den = body(0, init)
  else:
    acc, racc, mx, den = lax.fori_loop(0, n_chunks, body, init)
  inv = jnp.where(den > 0, 1.0 / jnp.where(den > 0, den, 1.0), 0.0)
  o = acc * inv[:, None]
  t_row = lax.div(m_ar, group)
  g_row = lax.rem(m_ar, group)
  hq_row = h * group + g_row
  if has_lora:
    rr = racc * inv[:, None]                                             # [m4, rp]
    hb_row = hq_row if per_q_head_b else jnp.full((m4,), h, jnp.int32)
    shp = (m4, rp, dc)
    bt = plgpu.load(
        b_ref.at[jnp.broadcast_to(hb_row[:, None, None], shp),
                 jnp.broadcast_to(r_ar[None, :, None], shp),
                 jnp.broadcast_to(d_ar[None, None, :], shp)],
        mask=(r_ar < r)[None, :, None] & (d_ar < d)[None, None, :], other=0.0)
    lo = jnp.sum(rr[:, :, None] * bt.astype(jnp.float32), axis=1)      # rr @ B[head(row)]
    sc_row = plgpu.load(scale_ref.at[jnp.full((m4,), bi, jnp.int32), hq_row])
    o = o + sc_row[:, None] * lo
  shp = (m4, dc)
  plgpu.store(o_ref.at[jnp.broadcast_to(t_row[:, None], shp),
                       jnp.broadcast_to(hq_row[:, None], shp),
                       jnp.broadcast_to(d_ar[None, :], shp)],
              o.astype(o_ref.dtype), mask=row_ok[:, None] & (d_ar < d)[None, :])
  if return_lse:
    # den > 0 implies a finite max; the chunk-0 program writes the rows' lse.
    lse = _lse_nat(jnp.where(den > 0, mx, 0.0), den)
    plgpu.store(lse_out_ref.at[t_row, hq_row], lse, mask=row_ok & (ci == 0))


LORA_DOTS = ("mma", "fma", "wide")
DEFAULT_LORA_DOT = "mma"
# LR tile width of lora_dot="mma" when lr_width is None: 32 columns, not the 16 an MMA
# needs, measured faster (H200, JAX 0.11.2: batch 8 at 32k 476.7 -> 360.6 us, 16 wide
# spilled registers; docs/perf-notes.md section 4).
DEFAULT_MMA_LR_WIDTH = 32
DEFAULT_LR_PREFETCH = False  # measured neutral to -4% except +10% at batch 8, 128k (H200)


def lr_tile_width(r, dp, lora_dot=None, lr_width=None) -> int:
  """Columns of the LR tile inside the decode kernel (columns past rank r are masked
  loads of zeros): "fma" next_pow2(r) (at least 4; CUDA cores need no padding to 16);
  "wide" the padded head dim dp, so P @ LR has P @ V's MMA shape and layout; "mma"
  DEFAULT_MMA_LR_WIDTH (capped at dp); never under 16 or next_pow2(r) for the
  tensor-core forms. lr_width overrides the tensor-core forms' width."""
  lora_dot = DEFAULT_LORA_DOT if lora_dot is None else lora_dot
  if lora_dot not in LORA_DOTS:
    raise ValueError(f"lora_dot must be one of {LORA_DOTS}, got {lora_dot!r}.")
  least = max(16, next_pow2(r))
  if lr_width is not None:
    if lora_dot == "fma":
      raise ValueError("lr_width applies to the tensor-core forms (lora_dot 'mma' or 'wide'), not 'fma'.")
    if int(lr_width) < least or int(lr_width) & (int(lr_width) - 1):
      raise ValueError(f"lr_width must be a power of two >= max(16, rank {r}), got {lr_width}.")
    return int(lr_width)
  if lora_dot == "fma":
    return max(4, next_pow2(r))
  return max(least, dp if lora_dot == "wide" else min(DEFAULT_MMA_LR_WIDTH, dp))


def num_sms() -> int:
  try:
    dev = jax.devices()[0]
    if dev.platform == "gpu":
      return int(getattr(dev, "core_count", 132) or 132)
  except Exception:  # pragma: no cover
    pass
  return 132  # H100 SXM


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


def decode_config(*, batch, tq, group, heads_kv, s_len, d, rp, itemsize, lr_itemsize,
                  block_k=None, num_warps=None, num_stages=None, num_splits=None):
  """The decode kernel's launch configuration: the given block sizes, the rest from
  decode_defaults (_fill_block_sizes); num_splits None -> one wave of resident
  programs. rp: the LR tile's width (lr_tile_width), 0 without LoRA."""
  dp = next_pow2(d)
  mp = max(16, next_pow2(tq * group))
  cfg = _fill_block_sizes(
      dict(block_k=block_k, num_warps=num_warps, num_stages=num_stages),
      decode_defaults(mp, dp, rp, itemsize, lr_itemsize, s_len), dict(block_k=max(16, next_pow2(s_len))),
      lambda c: decode_smem(mp, c["block_k"], c["num_stages"], dp, rp, itemsize, lr_itemsize), 2)
  bk, warps, stages = cfg["block_k"], cfg["num_warps"], cfg["num_stages"]
  if num_splits is None:
    smem = decode_smem(mp, bk, stages, dp, rp, itemsize, lr_itemsize)
    ns = default_num_splits(batch, heads_kv, s_len, bk, resident_programs_per_sm(smem, warps))
  else:
    ns = int(num_splits)
    if ns < 1:
      raise ValueError(f"num_splits must be >= 1, got {num_splits}.")
  return dict(block_k=bk, num_warps=warps, num_stages=stages, num_splits=ns)


def decode(q, k, v, layer, kv_len, q_off, lr, lora_b, scale, *, causal, sm_scale,
           block_k=None, num_splits=None, num_warps=None, num_stages=None,
           lora_dot=None, lr_prefetch=None, lr_width=None, interpret=False, return_lse=False,
           split_only=False):
  """Split-K Flash-LoRA decode. Canonical shapes; returns [B, Tq, Hq, D]
  (and the float32 lse [B, Tq, Hq] with return_lse).

  Block sizes left as None get shared-memory-aware defaults (decode_defaults);
  num_splits None -> default_num_splits (one wave of resident programs).
  lora_dot: how each KV block's P @ LR is formed: "mma" (tensor cores, LR
  padded to lr_width columns by masked loads), "fma" (CUDA cores on an LR tile of
  next_pow2(rank) columns; ranks below 16 only) or "wide" (tensor cores, LR
  padded to the head dim: the rank-wide accumulator then shares P @ V's MMA
  layout, at the price of a P @ V-sized dot). None -> DEFAULT_LORA_DOT.
  lr_prefetch: load each KV block's LR tile one iteration ahead (see
  _run_blocks). None -> DEFAULT_LR_PREFETCH.
  lr_width: the LR tile's width inside the kernel for the tensor-core forms (a
  power of two >= 16 and >= rank; columns past the rank are masked loads of
  zeros). None -> max(16, next_pow2(rank), min(DEFAULT_MMA_LR_WIDTH, padded head
  dim)) for "mma" (32 for ranks <= 32), the padded head dim for "wide". Not for "fma".
  split_only: return the split pass's partials (opart, rpart or None, lse)
  instead of merging them (see merge(); for profiling the two passes apart).
  """
  b, tq, hq, d = q.shape
  num_layers, _, s_len, hkv, _ = k.shape
  group = hq // hkv
  has_lora = lr is not None
  per_q_head_b = has_lora and lora_b.shape[1] != hkv
  dp = next_pow2(d)
  r = lr.shape[-1] if has_lora else 0
  rp = lr_tile_width(r, dp, lora_dot, lr_width) if has_lora else 16
  mp = max(16, next_pow2(tq * group))
  cfg = decode_config(batch=b, tq=tq, group=group, heads_kv=hkv, s_len=s_len, d=d,
                      rp=rp if has_lora else 0, itemsize=jnp.dtype(q.dtype).itemsize,
                      lr_itemsize=jnp.dtype(lr.dtype).itemsize if has_lora else 0, block_k=block_k,
                      num_warps=num_warps, num_stages=num_stages, num_splits=num_splits)
  block_k, num_warps, num_stages, ns = (cfg[n] for n in ("block_k", "num_warps", "num_stages", "num_splits"))
  lr_prefetch = DEFAULT_LR_PREFETCH if lr_prefetch is None else bool(lr_prefetch)
  statics = dict(has_lora=has_lora, per_q_head_b=per_q_head_b, num_splits=ns,
                 fused=ns == 1 and not split_only,
                 tq=tq, d=d, r=r, group=group, mp=mp, lr_prefetch=lr_prefetch)
  lse_shape = jax.ShapeDtypeStruct((b, tq, hq), jnp.float32)
  full1 = lambda n: pl.BlockSpec((n,), lambda *_: (0,))
  in_specs = [
      full1(1), full1(b), full1(b),
      pl.BlockSpec((None, tq, hq, dp), lambda s, bi, h: (bi, 0, 0, 0)),
      pl.BlockSpec((num_layers, None, s_len, None, dp), lambda s, bi, h: (0, bi, 0, h, 0)),
      pl.BlockSpec((num_layers, None, s_len, None, dp), lambda s, bi, h: (0, bi, 0, h, 0)),
  ]
  args = [layer.reshape(1), kv_len, q_off, q, k, v]
  lora_specs, lora_args = [], []
  if has_lora:
    in_specs.append(pl.BlockSpec((num_layers, None, s_len, rp), lambda s, bi, h: (0, bi, 0, 0)))
    args.append(lr)
    hb = lora_b.shape[1]
    lora_specs = [pl.BlockSpec((None, hb, rp, dp), lambda s, bi, h: (bi, 0, 0, 0)),
                  pl.BlockSpec((b, hq), lambda *_: (0, 0))]
    lora_args = [lora_b, scale]
  out_final = jax.ShapeDtypeStruct(q.shape, q.dtype)
  params = _compiler_params(num_warps, num_stages)
  kernel = functools.partial(_decode_kernel, causal=causal,
                             qk_scale=float(sm_scale) * LOG2E, block_k=block_k, **statics)
  if ns == 1 and not split_only:
    if return_lse:
      res = pl.pallas_call(
          functools.partial(kernel, return_lse=True), grid=(1, b, hkv),
          in_specs=in_specs + lora_specs,
          out_specs=[pl.BlockSpec((None, tq, hq, dp), lambda s, bi, h: (bi, 0, 0, 0)),
                     pl.BlockSpec((None, tq, hq), lambda s, bi, h: (bi, 0, 0))],
          out_shape=[out_final, lse_shape], compiler_params=params, interpret=interpret,
          name="flash_lora_decode",
      )(*args, *lora_args)
      return tuple(res)
    return pl.pallas_call(
        kernel, grid=(1, b, hkv),
        in_specs=in_specs + lora_specs,
        out_specs=pl.BlockSpec((None, tq, hq, dp), lambda s, bi, h: (bi, 0, 0, 0)),
        out_shape=out_final, compiler_params=params, interpret=interpret,
        name="flash_lora_decode",
    )(*args, *lora_args)

  parts = _split_call(kernel, in_specs, args, b=b, hkv=hkv, ns=ns, m_rows=tq * group, mp=mp, d=d,
                      dp=dp, r=r, rp=rp, has_lora=has_lora, params=params, interpret=interpret)
  if split_only:
    return parts
  return merge(*parts, lora_b, scale, tq=tq, hq=hq, d=d, out_dtype=q.dtype,
               return_lse=return_lse, interpret=interpret)


def _split_call(kernel, in_specs, args, *, b, hkv, ns, m_rows, mp, d, dp, r, rp, has_lora,
                params, interpret):
  """The split-K pass: per (split, batch row, KV head) the normalised partials
  opart [B, Hkv, ns, M, D] (and rpart [B, Hkv, ns, M, r]) and the log2-domain
  lse [B, Hkv, ns, Mp]; rows are the stacked (t, g) query rows."""
  out_shapes = [jax.ShapeDtypeStruct((b, hkv, ns, m_rows, d), jnp.float32)]
  out_specs = [pl.BlockSpec((None, None, None, mp, dp), lambda s, bi, h: (bi, h, s, 0, 0))]
  if has_lora:
    out_shapes.append(jax.ShapeDtypeStruct((b, hkv, ns, m_rows, r), jnp.float32))
    out_specs.append(pl.BlockSpec((None, None, None, mp, rp), lambda s, bi, h: (bi, h, s, 0, 0)))
  out_shapes.append(jax.ShapeDtypeStruct((b, hkv, ns, mp), jnp.float32))
  out_specs.append(pl.BlockSpec((None, None, None, mp), lambda s, bi, h: (bi, h, s, 0)))
  # The decode kernel does not need B or the scale when it does not finish rows.
  parts = pl.pallas_call(
      kernel, grid=(ns, b, hkv), in_specs=in_specs, out_specs=out_specs,
      out_shape=out_shapes, compiler_params=params, interpret=interpret,
      name="flash_lora_decode_split",
  )(*args)
  if has_lora:
    return tuple(parts)
  opart, lse = parts
  return opart, None, lse


def merge(opart, rpart, lse, lora_b, scale, *, tq, hq, d, out_dtype, return_lse=False,
          interpret=False):
  """Merges split-K partials (from the split pass) into [B, Tq, Hq, D]; with
  rpart, the rank-wide partials are merged the same way and multiplied by B."""
  b, hkv, ns, m_rows, _ = opart.shape
  mp = lse.shape[-1]
  group = hq // hkv
  has_lora = rpart is not None
  per_q_head_b = has_lora and lora_b.shape[1] != hkv
  dp = next_pow2(d)
  r = rpart.shape[-1] if has_lora else 0
  rp = max(16, next_pow2(r)) if has_lora else 16
  m4, sc, dc = merge_tiling(ns, m_rows, dp, rp)
  kernel = functools.partial(_merge_kernel, has_lora=has_lora, per_q_head_b=per_q_head_b,
                             num_splits=ns, tq=tq, d=d, r=r, group=group, m4=m4, sc=sc, dc=dc,
                             **({"return_lse": True} if return_lse else {}))
  # Full-array blocks per (batch row, KV head); the kernel gathers its tile.
  m_specs = [pl.BlockSpec((None, None, ns, mp), lambda bi, h, c: (bi, h, 0, 0)),
             pl.BlockSpec((None, None, ns, m_rows, d), lambda bi, h, c: (bi, h, 0, 0, 0))]
  m_args = [lse, opart]
  if has_lora:
    m_specs += [pl.BlockSpec((None, None, ns, m_rows, r), lambda bi, h, c: (bi, h, 0, 0, 0)),
                pl.BlockSpec((None,) + lora_b.shape[1:], lambda bi, h, c: (bi, 0, 0, 0)),
                pl.BlockSpec((b, hq), lambda *_: (0, 0))]
    m_args += [rpart, lora_b, scale]
  out_final = jax.ShapeDtypeStruct((b, tq, hq, d), out_dtype)
  lse_shape = jax.ShapeDtypeStruct((b, tq, hq), jnp.float32)
  m_out_spec = pl.BlockSpec((None, tq, hq, d), lambda bi, h, c: (bi, 0, 0, 0))
  res = pl.pallas_call(
      kernel, grid=(b, hkv, dp // dc), in_specs=m_specs,
      out_specs=([m_out_spec, pl.BlockSpec((None, tq, hq), lambda bi, h, c: (bi, 0, 0))]
                 if return_lse else m_out_spec),
      out_shape=[out_final, lse_shape] if return_lse else out_final,
      compiler_params=_compiler_params(4, 1),
      interpret=interpret, name="flash_lora_decode_merge",
  )(*m_args)
  return tuple(res) if return_lse else res
