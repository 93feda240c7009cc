"""Pallas Mosaic (TPU) prefill kernel of Flash-LoRA-Attention.

Grid (B, q blocks, KV blocks), epilogue in-kernel; layout and fast-path rules
in common.py. ``return_lse=True`` (static) also returns the natural
log-sum-exp [B, Tq, Hq] float32 (-inf for rows that see no key): an extra
[B, Hkv, G, Tq, 1] output of the kernel. With False the kernel is unchanged.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels._args import next_pow2, round_up
from pallas_kernels.tpu.common import (NN_DIMS, init_scratch, iter_heads, kv_spec, prepare_cache, safe_inv,
                                       update, vmem_bytes)
from pallas_kernels.tpu.tuning import VMEM_BUDGET, PrefillBlockSizes


def _prefill_nblocks(i, kv_len, q_off, *, bq, bk, tq, causal):
  if causal:
    t_last = jnp.minimum((i + 1) * bq, tq) - 1
    hi = jnp.minimum(kv_len, q_off + t_last + 1)
  else:
    hi = kv_len
  return lax.div(jnp.maximum(hi, 0) + (bk - 1), bk)


def _prefill_kernel(layer_ref, kvlen_ref, qoff_ref, q_ref, k_ref, v_ref, *refs,
                    has_lora, per_q_head_b, causal, sm_scale, bq, bk, hkv, group,
                    tq, nk, return_lse=False):
  del layer_ref  # used by the index maps only
  lse_ref = None
  if has_lora:
    lr_ref, b_ref, scale_ref, o_ref, *refs = refs
  else:
    lr_ref = b_ref = scale_ref = None
    o_ref, *refs = refs
  if return_lse:
    lse_ref, *refs = refs
  if has_lora:
    m_ref, l_ref, acc_ref, racc_ref = refs
  else:
    racc_ref = None
    m_ref, l_ref, acc_ref = refs
  bi, i, j = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  kv_len = kvlen_ref[bi]
  q_off = qoff_ref[bi]
  dp = q_ref.shape[-1]
  rows_m = group * bq
  nblk = _prefill_nblocks(i, kv_len, q_off, bq=bq, bk=bk, tq=tq, causal=causal)

  @pl.when(j == 0)
  def _init():
    init_scratch(m_ref, l_ref, acc_ref, racc_ref)

  @pl.when(j < nblk)
  def _compute():
    shape = (rows_m, bk)
    col = j * bk + lax.broadcasted_iota(jnp.int32, shape, 1)
    valid = col < kv_len
    if causal:
      # row = g * bq + tt (bq is a power of two); query position q_off + i*bq + tt
      tt = lax.broadcasted_iota(jnp.int32, shape, 0) & (bq - 1)
      valid = valid & (col <= q_off + i * bq + tt)
    lr = lr_ref[...] if has_lora else None
    vs = dict(iter_heads(v_ref, hkv))
    for h, k in iter_heads(k_ref, hkv):
      q = q_ref[h].reshape(rows_m, dp)
      update(h, q, k, vs.pop(h), lr, valid, m_ref, l_ref, acc_ref, racc_ref, sm_scale)

  @pl.when(j == nk - 1)
  def _finish():
    for h in range(hkv):
      inv = safe_inv(l_ref[h])
      o = acc_ref[h] * inv
      if has_lora:
        rr = racc_ref[h] * inv
        for g in range(group):
          hq = h * group + g
          bm = b_ref[hq if per_q_head_b else h].astype(jnp.float32)
          og = o[g * bq:(g + 1) * bq] + scale_ref[bi, hq] * lax.dot_general(
              rr[g * bq:(g + 1) * bq], bm, NN_DIMS, preferred_element_type=jnp.float32)
          o_ref[h, g] = og.astype(o_ref.dtype)
      else:
        o_ref[h] = o.reshape(group, bq, dp).astype(o_ref.dtype)
      if return_lse:
        l = l_ref[h]
        lse = jnp.where(l > 0, m_ref[h] + jnp.log(jnp.where(l > 0, l, 1.0)), -jnp.inf)
        for g in range(group):
          lse_ref[h, g] = lse[g * bq:(g + 1) * bq]


def prefill(q, k, v, layer, kv_len, q_off, lr, lora_b, scale, *, causal, sm_scale,
            block_sizes: PrefillBlockSizes | None = None, interpret=False, return_lse=False):
  """Flash-LoRA prefill on TPU. Canonical shapes (see _args.Canon); [B,Tq,Hq,D]
  (and the float32 lse [B,Tq,Hq] with return_lse). block_sizes: None fields from
  PrefillBlockSizes.get_default."""
  cfg = (block_sizes or PrefillBlockSizes()).resolve()
  block_q, block_k = cfg.block_q, cfg.block_k
  b, tq, hq, d = q.shape
  hkv0 = k.shape[3]
  group = hq // hkv0
  has_lora = lr is not None
  per_q_head_b = has_lora and lora_b.shape[1] != hkv0
  k, v, lr, layer, bk, dp, hkv = prepare_cache(k, v, lr, layer, block_k)
  itemsize = jnp.dtype(q.dtype).itemsize
  r = lr.shape[-1] if has_lora else 0
  bq = max(16, min(next_pow2(block_q), next_pow2(tq)))
  while bq > 16 and vmem_bytes(hkv * group * bq, hq * bq, dp, r, bk, hkv, itemsize,
                                hq * bq * dp * itemsize,
                                lse_rows=hkv * group * bq if return_lse else 0) > VMEM_BUDGET:
    bq //= 2
  tq_pad = round_up(tq, bq)
  nq, nk = tq_pad // bq, k.shape[2] // bk
  # q and o are small next to the cache: relayout them to [B, Hkv, G, Tq, Dp]
  # so that each KV head's query heads are the rows of one tile.
  qt = q.reshape(b, tq, hkv0, group, d).transpose(0, 2, 3, 1, 4)
  qt = jnp.pad(qt, ((0, 0), (0, hkv - hkv0), (0, 0), (0, tq_pad - tq), (0, dp - d)))
  if has_lora and hkv != hkv0:   # padded dummy KV head: give it a zero B
    pad_b = (hkv - hkv0) * (group if per_q_head_b else 1)
    lora_b = jnp.pad(lora_b, ((0, 0), (0, pad_b), (0, 0), (0, 0)))
    scale = jnp.pad(scale, ((0, 0), (0, (hkv - hkv0) * group)))
  if has_lora and dp != d:
    lora_b = jnp.pad(lora_b, ((0, 0), (0, 0), (0, 0), (0, dp - d)))

  nblk = functools.partial(_prefill_nblocks, bq=bq, bk=bk, tq=tq, causal=causal)

  def kv_index(bi, i, j, layer_ref, kvlen_ref, qoff_ref):
    last = jnp.maximum(nblk(i, kvlen_ref[bi], qoff_ref[bi]) - 1, 0)
    return (layer_ref[0], bi, jnp.minimum(j, last), 0, 0)

  q_spec = pl.BlockSpec((None, hkv, group, bq, dp), lambda bi, i, j, *_: (bi, 0, 0, i, 0))
  in_specs = [q_spec, kv_spec(k, bk, kv_index), kv_spec(v, bk, kv_index)]
  args = [qt, k, v]
  scratch = [pltpu.VMEM((hkv, group * bq, 1), jnp.float32),
             pltpu.VMEM((hkv, group * bq, 1), jnp.float32),
             pltpu.VMEM((hkv, group * bq, dp), jnp.float32)]
  if has_lora:
    in_specs += [
        pl.BlockSpec((None, None, bk, r), lambda *a: kv_index(*a)[:3] + (0,)),
        pl.BlockSpec((None, lora_b.shape[1], r, dp), lambda bi, i, j, *_: (bi, 0, 0, 0)),
        pl.BlockSpec(memory_space=pltpu.SMEM),
    ]
    args += [lr, lora_b, scale]
    scratch.append(pltpu.VMEM((hkv, group * bq, r), jnp.float32))
  kernel = functools.partial(
      _prefill_kernel, has_lora=has_lora, per_q_head_b=per_q_head_b, causal=causal,
      sm_scale=float(sm_scale), bq=bq, bk=bk, hkv=hkv, group=group, tq=tq, nk=nk,
      **({"return_lse": True} if return_lse else {}))
  out_specs = q_spec
  out_shape = jax.ShapeDtypeStruct(qt.shape, q.dtype)
  if return_lse:   # lane dim 1 spans the array: [B, Hkv, G, Tq_pad, 1]
    out_specs = [q_spec, pl.BlockSpec((None, hkv, group, bq, 1),
                                      lambda bi, i, j, *_: (bi, 0, 0, i, 0))]
    out_shape = [out_shape, jax.ShapeDtypeStruct(qt.shape[:-1] + (1,), jnp.float32)]
  grid_spec = pltpu.PrefetchScalarGridSpec(
      num_scalar_prefetch=3, grid=(b, nq, nk), in_specs=in_specs,
      out_specs=out_specs, scratch_shapes=scratch)
  res = pl.pallas_call(
      kernel, grid_spec=grid_spec,
      out_shape=out_shape,
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=("parallel", "parallel", "arbitrary")),
      interpret=interpret, name="flash_lora_prefill_tpu",
  )(layer.reshape(1), kv_len, q_off, *args)
  ot = res[0] if return_lse else res
  ot = ot[:, :hkv0, :, :tq, :d]
  out = ot.transpose(0, 3, 1, 2, 4).reshape(b, tq, hq, d)
  if not return_lse:
    return out
  lse = res[1][:, :hkv0, :, :tq, 0]                       # [B, Hkv, G, Tq]
  return out, lse.transpose(0, 3, 1, 2).reshape(b, tq, hq)
