"""Pallas Mosaic (TPU) split-K decode kernel of Flash-LoRA-Attention.

Grid (B, splits, KV blocks per split); each split writes a normalised partial
(o, racc) and its log-sum-exp; merge_splits (jnp) merges them (rank-wide
partials with the same weights) and multiplies by B once. With
``return_lse=True`` the merged lse [B, Tq, Hq] float32 is a by-product of the
merge (the kernel is the same either way). Layout rules in common.py.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels._args import round_up
from pallas_kernels.tpu.common import init_scratch, iter_heads, kv_spec, prepare_cache, safe_inv, update
from pallas_kernels.tpu.tuning import DecodeBlockSizes, default_num_splits


def _decode_nblocks(kv_len, q_off, *, bk, tq, causal):
  hi = jnp.minimum(kv_len, q_off + tq) if causal else kv_len
  return lax.div(jnp.maximum(hi, 0) + (bk - 1), bk)


def _decode_block(s, j, nb, ns):
  """KV block of (split s, step j), its split's length and the clamped index."""
  per = lax.div(nb + (ns - 1), ns)
  blk = s * per + j
  clamped = jnp.maximum(jnp.minimum(s * per + jnp.minimum(j, per - 1), nb - 1), 0)
  return blk, per, clamped


def _decode_kernel(layer_ref, kvlen_ref, qoff_ref, q_ref, k_ref, v_ref, *refs,
                   has_lora, causal, sm_scale, bk, hkv, group, tq, ns, nbs):
  del layer_ref
  if has_lora:
    lr_ref, opart_ref, rpart_ref, lse_ref, m_ref, l_ref, acc_ref, racc_ref = refs
  else:
    lr_ref = rpart_ref = racc_ref = None
    opart_ref, lse_ref, m_ref, l_ref, acc_ref = refs
  bi, s, j = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  kv_len = kvlen_ref[bi]
  q_off = qoff_ref[bi]
  mp = q_ref.shape[1]
  nb = _decode_nblocks(kv_len, q_off, bk=bk, tq=tq, causal=causal)
  blk, per, _ = _decode_block(s, j, nb, ns)

  @pl.when(j == 0)
  def _init():
    init_scratch(m_ref, l_ref, acc_ref, racc_ref)

  @pl.when((j < per) & (blk < nb))
  def _compute():
    shape = (mp, bk)
    col = blk * bk + lax.broadcasted_iota(jnp.int32, shape, 1)
    valid = col < kv_len
    if causal:
      # row = t * group + g sees col iff col <= q_off + t, i.e. row >= (col - q_off) * group
      row = lax.broadcasted_iota(jnp.int32, shape, 0)
      valid = valid & (row >= (col - q_off) * group)
    lr = lr_ref[...] if has_lora else None
    vs = dict(iter_heads(v_ref, hkv))
    for h, k in iter_heads(k_ref, hkv):
      update(h, q_ref[h], k, vs.pop(h), lr, valid, m_ref, l_ref, acc_ref, racc_ref,
              sm_scale)

  @pl.when(j == nbs - 1)
  def _finish():
    for h in range(hkv):
      l = l_ref[h]
      inv = safe_inv(l)
      opart_ref[h] = acc_ref[h] * inv
      if has_lora:
        rpart_ref[h] = racc_ref[h] * inv
      lse_ref[h] = jnp.where(l > 0, m_ref[h] + jnp.log(jnp.where(l > 0, l, 1.0)), -jnp.inf)


def decode(q, k, v, layer, kv_len, q_off, lr, lora_b, scale, *, causal, sm_scale,
           block_sizes: DecodeBlockSizes | None = None, interpret=False, return_lse=False):
  """Split-K Flash-LoRA decode on TPU; splits merged by merge_splits. [B,Tq,Hq,D]
  (and the float32 lse [B,Tq,Hq] with return_lse). block_sizes: None fields from
  DecodeBlockSizes.get_default; num_splits None -> default_num_splits."""
  cfg = (block_sizes or DecodeBlockSizes()).resolve()
  block_k, num_splits = cfg.block_k, cfg.num_splits
  b, tq, hq, d = q.shape
  hkv0 = k.shape[3]
  group = hq // hkv0
  has_lora = lr is not None
  per_q_head_b = has_lora and lora_b.shape[1] != hkv0
  k, v, lr, layer, bk, dp, hkv = prepare_cache(k, v, lr, layer, block_k)
  s_len = k.shape[2]
  r = lr.shape[-1] if has_lora else 0
  ns = default_num_splits(b, hkv, s_len, bk) if num_splits is None else int(num_splits)
  nbs = pl.cdiv(s_len // bk, ns)
  m_rows = tq * group
  mp = round_up(m_rows, 16 if jnp.dtype(q.dtype).itemsize == 2 else 8)
  # rows (t, g) of each KV head: [B, Hkv, Mp, Dp]
  qt = q.reshape(b, tq, hkv0, group, d).transpose(0, 2, 1, 3, 4).reshape(b, hkv0, m_rows, d)
  qt = jnp.pad(qt, ((0, 0), (0, hkv - hkv0), (0, mp - m_rows), (0, dp - d)))

  nblocks = functools.partial(_decode_nblocks, bk=bk, tq=tq, causal=causal)

  def kv_index(bi, s, j, layer_ref, kvlen_ref, qoff_ref):
    _, _, clamped = _decode_block(s, j, nblocks(kvlen_ref[bi], qoff_ref[bi]), ns)
    return (layer_ref[0], bi, clamped, 0, 0)

  in_specs = [pl.BlockSpec((None, hkv, mp, dp), lambda bi, s, j, *_: (bi, 0, 0, 0)),
              kv_spec(k, bk, kv_index), kv_spec(v, bk, kv_index)]
  args = [qt, k, v]
  part = lambda w: pl.BlockSpec((None, None, hkv, mp, w), lambda bi, s, j, *_: (bi, s, 0, 0, 0))
  out_specs = [part(dp)]
  out_shape = [jax.ShapeDtypeStruct((b, ns, hkv, mp, dp), jnp.float32)]
  scratch = [pltpu.VMEM((hkv, mp, 1), jnp.float32), pltpu.VMEM((hkv, mp, 1), jnp.float32),
             pltpu.VMEM((hkv, mp, dp), jnp.float32)]
  if has_lora:
    in_specs.append(pl.BlockSpec((None, None, bk, r), lambda *a: kv_index(*a)[:3] + (0,)))
    args.append(lr)
    out_specs.append(part(r))
    out_shape.append(jax.ShapeDtypeStruct((b, ns, hkv, mp, r), jnp.float32))
    scratch.append(pltpu.VMEM((hkv, mp, r), jnp.float32))
  out_specs.append(part(1))
  out_shape.append(jax.ShapeDtypeStruct((b, ns, hkv, mp, 1), jnp.float32))
  kernel = functools.partial(
      _decode_kernel, has_lora=has_lora, causal=causal, sm_scale=float(sm_scale),
      bk=bk, hkv=hkv, group=group, tq=tq, ns=ns, nbs=nbs)
  grid_spec = pltpu.PrefetchScalarGridSpec(
      num_scalar_prefetch=3, grid=(b, ns, nbs), in_specs=in_specs,
      out_specs=out_specs, scratch_shapes=scratch)
  parts = pl.pallas_call(
      kernel, grid_spec=grid_spec, out_shape=out_shape,
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=("parallel", "parallel", "arbitrary")),
      interpret=interpret, name="flash_lora_decode_tpu",
  )(layer.reshape(1), kv_len, q_off, *args)
  return merge_splits(parts, lora_b, scale, has_lora=has_lora, per_q_head_b=per_q_head_b,
                      hkv0=hkv0, group=group, tq=tq, d=d, dtype=q.dtype,
                      return_lse=return_lse)


def merge_splits(parts, lora_b, scale, *, has_lora, per_q_head_b, hkv0, group, tq, d, dtype,
                 return_lse=False):
  """Log-sum-exp merge of the splits (o and the rank-wide r alike), then r @ B once.

  With return_lse also the merged lse [B, Tq, Hq] (m + log sum_s exp(lse_s - m)).
  """
  if has_lora:
    opart, rpart, lse = parts
  else:
    (opart, lse), rpart = parts, None
  b = opart.shape[0]
  m_rows = tq * group
  lse = lse[:, :, :hkv0, :m_rows]                           # [B, NS, Hkv, M, 1]
  m = jnp.max(lse, axis=1, keepdims=True)
  w = jnp.exp(lse - jnp.where(jnp.isfinite(m), m, 0.0))     # empty split -> 0
  den = jnp.sum(w, axis=1)
  inv = jnp.where(den > 0, 1.0 / jnp.where(den > 0, den, 1.0), 0.0)
  o = jnp.sum(w * opart[:, :, :hkv0, :m_rows, :d], axis=1) * inv    # [B, Hkv, M, D]
  o = o.reshape(b, hkv0, tq, group, d)
  if has_lora:
    rr = (jnp.sum(w * rpart[:, :, :hkv0, :m_rows], axis=1) * inv).reshape(b, hkv0, tq, group, -1)
    bm = lora_b.astype(jnp.float32)
    if per_q_head_b:
      lo = jnp.einsum("bhtgr,bhgrd->bhtgd", rr, bm.reshape(b, hkv0, group, *bm.shape[2:]),
                      precision=lax.Precision.HIGHEST)
    else:
      lo = jnp.einsum("bhtgr,bhrd->bhtgd", rr, bm, precision=lax.Precision.HIGHEST)
    o = o + scale.reshape(b, hkv0, 1, group, 1) * lo
  out = o.transpose(0, 2, 1, 3, 4).reshape(b, tq, hkv0 * group, d).astype(dtype)
  if not return_lse:
    return out
  m0 = jnp.where(jnp.isfinite(m[:, 0]), m[:, 0], 0.0)                 # [B, Hkv, M, 1]
  tot = jnp.where(den > 0, m0 + jnp.log(jnp.where(den > 0, den, 1.0)), -jnp.inf)
  tot = tot[..., 0].reshape(b, hkv0, tq, group).transpose(0, 2, 1, 3)
  return out, tot.reshape(b, tq, hkv0 * group)
