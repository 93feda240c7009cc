"""Pallas Triton (GPU) prefill kernel of Flash-LoRA-Attention.

Grid (q blocks, batch, query heads). Each program keeps a [block_q, D] q tile
and runs the online softmax over KV blocks with TWO running accumulators: acc
[block_q, D] (P @ V_base) and racc [block_q, Rp] (P @ LR), both rescaled by
the same factor. The epilogue normalises both and adds ``scale * racc @ B_h``
once. Fully masked KV blocks (causal, kv_lengths) are skipped through the loop
bounds; blocks that need no mask run a loop without mask arithmetic. The
heaviest (last) causal q blocks run first.

``return_lse=True`` (static) adds a float32 [B, Tq, Hq] output: the natural
log-sum-exp of each row (-inf for rows that see no key). Block sizes:
tuning.PrefillBlockSizes (docs/kernels.md).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels._args import next_pow2
from pallas_kernels.triton.common import (LOG2E, and_, cdiv, compiler_params, dot, load, lse_nat,
                                          masks, plgpu, run_blocks)
from pallas_kernels.triton.tuning import PrefillBlockSizes


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
  dmask, rmask = masks(d, dp, r if has_lora else rp, rp)

  q_start = i * block_q
  rows = q_start + jnp.arange(block_q, dtype=jnp.int32)
  row_ok = None if tq % block_q == 0 else (rows < tq)[:, None]
  io_mask = and_(row_ok, dmask)
  q = load(q_ref, io_mask)

  t_last = jnp.minimum(q_start + block_q, tq) - 1
  if causal:
    hi = jnp.minimum(kv_len, q_off + t_last + 1)   # keys any row of the block sees
    full = jnp.minimum(kv_len, q_off + q_start + 1)  # keys every row sees
  else:
    hi = full = kv_len
  hi = jnp.maximum(hi, 0)
  full = jnp.maximum(full, 0)
  n_blocks = cdiv(hi, block_k)
  n_full = lax.div(full, block_k)

  def valid_fn(cols):
    ok = cols[None, :] < kv_len
    if causal:
      ok = ok & (cols[None, :] <= (q_off + rows)[:, None])
    return ok

  acc, racc, m_i, l_i = run_blocks(
      q, lo_full=0, hi_full=n_full, lo_mask=n_full, hi_mask=n_blocks,
      m_rows=block_q, dp=dp, rp=rp, k_ref=k_ref, v_ref=v_ref, lr_ref=lr_ref,
      layer=layer, block_k=block_k, kv_len=kv_len, dmask=dmask, rmask=rmask,
      qk_scale=qk_scale, valid_fn=valid_fn)
  inv = jnp.where(l_i > 0, 1.0 / jnp.where(l_i > 0, l_i, 1.0), 0.0)  # no key -> 0
  o = acc * inv[:, None]
  if has_lora:
    bmat = load(b_ref, and_(None if r == rp else (jnp.arange(rp) < r)[:, None], dmask))
    o = o + scale_ref[bi, h] * dot(racc * inv[:, None], bmat.astype(jnp.float32))
  plgpu.store(o_ref, o.astype(o_ref.dtype), mask=io_mask)
  if return_lse:
    plgpu.store(lse_ref, lse_nat(m_i, l_i), mask=None if row_ok is None else rows < tq)


def prefill(q, k, v, layer, kv_len, q_off, lr, lora_b, scale, *, causal, sm_scale,
            block_sizes: PrefillBlockSizes | None = None, interpret=False, return_lse=False):
  """Flash-LoRA prefill. Canonical shapes (see _args.Canon); returns [B,Tq,Hq,D]
  (and the float32 lse [B,Tq,Hq] with return_lse).

  block_sizes: sizes left as None get the measured, shared-memory-aware defaults
  (PrefillBlockSizes.resolve).
  """
  b, tq, hq, d = q.shape
  num_layers, _, s_len, hkv, _ = k.shape
  group = hq // hkv
  has_lora = lr is not None
  dp = next_pow2(d)
  r = lr.shape[-1] if has_lora else 0
  rp = max(16, next_pow2(r)) if has_lora else 16
  cfg = (block_sizes or PrefillBlockSizes()).resolve(
      tq=tq, s_len=s_len, d=d, r=r, itemsize=jnp.dtype(q.dtype).itemsize,
      lr_itemsize=jnp.dtype(lr.dtype).itemsize if has_lora else 0)
  block_q, block_k, num_warps, num_stages = cfg.block_q, cfg.block_k, cfg.num_warps, cfg.num_stages
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
      compiler_params=compiler_params(num_warps, num_stages),
      interpret=interpret,
      name="flash_lora_prefill",
  )(*args)
  return tuple(res) if return_lse else res
