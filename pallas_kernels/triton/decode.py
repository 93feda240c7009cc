"""Pallas Triton (GPU) split-K decode kernel of Flash-LoRA-Attention, and its merge.

Grid (kv splits, batch, KV heads). All query heads of the KV group and all q
rows are stacked as the rows of one q tile (row = t*G + g, padded to >= 16 for
tl.dot), so K, V_base and LR are read once per KV head. P @ LR runs on the
tensor cores over an LR tile padded by masked loads to tuning.lr_tile_width
columns (32 for ranks <= 32). Each split writes a normalised partial (o, racc)
and its log-sum-exp; a small merge kernel combines the splits with
log-sum-exp weights (the rank-wide partials the same way) and only then
multiplies by B, once. With one split the decode kernel applies the epilogue
itself.

``return_lse=True`` (static) adds a float32 [B, Tq, Hq] output: the natural
log-sum-exp of each row (-inf for rows that see no key), written by the
one-split decode kernel or the merge kernel. Block sizes:
tuning.DecodeBlockSizes (docs/kernels.md).
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
from pallas_kernels.triton.tuning import DecodeBlockSizes, lr_tile_width


def _row_ids(mp, group):
  rows = jnp.arange(mp, dtype=jnp.int32)
  return rows, lax.div(rows, group), lax.rem(rows, group)


def _lora_rows(rr, *, bi, h, b_ref, scale_ref, g_row, group, per_q_head_b, r, rp, dmask):
  """scale[row] * rr[row] @ B[head(row)] for the stacked (t, g) rows."""
  mp = rr.shape[0]
  bmask = and_(None if r == rp else (jnp.arange(rp) < r)[:, None], dmask)
  hq_rows = h * group + g_row
  sc = plgpu.load(scale_ref.at[jnp.full((mp,), bi, jnp.int32), hq_rows])
  if not per_q_head_b:
    bmat = load(b_ref.at[h, :, :], bmask).astype(jnp.float32)
    term = dot(rr, bmat)
  else:
    def body(g, term):
      bmat = load(b_ref.at[h * group + g, :, :], bmask).astype(jnp.float32)
      sel = jnp.where((g_row == g)[:, None], rr, 0.0)
      return term + dot(sel, bmat)
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
              mask=and_(row_ok[:, None], dmask))


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
                   tq, d, r, group, mp, fused, return_lse=False):
  # fused (one split): finish the rows here, no merge kernel
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
  dmask, rmask = masks(d, dp, r if has_lora else rp, rp)

  rows, t_row, g_row = _row_ids(mp, group)
  row_ok = rows < tq * group
  shape = (mp, dp)
  q = plgpu.load(
      q_ref.at[jnp.broadcast_to(t_row[:, None], shape),
               jnp.broadcast_to((h * group + g_row)[:, None], shape),
               jnp.broadcast_to(jnp.arange(dp, dtype=jnp.int32)[None, :], shape)],
      mask=and_(row_ok[:, None], dmask), other=0)

  if causal:
    hi = jnp.minimum(kv_len, q_off + tq)
    full = jnp.minimum(kv_len, q_off + 1)
  else:
    hi = full = kv_len
  hi = jnp.maximum(hi, 0)
  full = jnp.maximum(full, 0)
  nb = cdiv(hi, block_k)
  n_full = lax.div(full, block_k)
  # Balanced split of this row's live blocks (kv_lengths, not max_len).
  per = cdiv(nb, num_splits)
  b_lo = sid * per
  b_hi = jnp.minimum(b_lo + per, nb)

  def valid_fn(cols):
    ok = cols[None, :] < kv_len
    if causal:
      ok = ok & (cols[None, :] <= (q_off + t_row)[:, None])
    return ok

  acc, racc, m_i, l_i = run_blocks(
      q, lo_full=b_lo, hi_full=jnp.minimum(b_hi, n_full),
      lo_mask=jnp.maximum(b_lo, n_full), hi_mask=b_hi, m_rows=mp, dp=dp, rp=rp,
      k_ref=k_ref, v_ref=v_ref, lr_ref=lr_ref, layer=layer, block_k=block_k,
      kv_len=kv_len, dmask=dmask, rmask=rmask, qk_scale=qk_scale,
      valid_fn=valid_fn)

  if fused:
    if return_lse:
      o_ref, lse_out_ref = outs
      _store_lse_rows(lse_out_ref, lse_nat(m_i, l_i), h=h, t_row=t_row, g_row=g_row,
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
  plgpu.store(opart_ref, acc * inv[:, None], mask=and_(rmask_rows, dmask))
  if has_lora:
    plgpu.store(rpart_ref, racc * inv[:, None], mask=and_(rmask_rows, rmask))
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
    lse = lse_nat(jnp.where(den > 0, mx, 0.0), den)
    plgpu.store(lse_out_ref.at[t_row, hq_row], lse, mask=row_ok & (ci == 0))


def decode(q, k, v, layer, kv_len, q_off, lr, lora_b, scale, *, causal, sm_scale,
           block_sizes: DecodeBlockSizes | None = None, interpret=False, return_lse=False):
  """Split-K Flash-LoRA decode. Canonical shapes; returns [B, Tq, Hq, D]
  (and the float32 lse [B, Tq, Hq] with return_lse).

  block_sizes: sizes left as None get the measured, shared-memory-aware defaults
  (DecodeBlockSizes.resolve; num_splits: one wave of resident programs).
  """
  b, tq, hq, d = q.shape
  num_layers, _, s_len, hkv, _ = k.shape
  group = hq // hkv
  has_lora = lr is not None
  per_q_head_b = has_lora and lora_b.shape[1] != hkv
  dp = next_pow2(d)
  r = lr.shape[-1] if has_lora else 0
  rp = lr_tile_width(r, dp) if has_lora else 16
  mp = max(16, next_pow2(tq * group))
  cfg = (block_sizes or DecodeBlockSizes()).resolve(
      batch=b, tq=tq, group=group, heads_kv=hkv, s_len=s_len, d=d, r=r,
      itemsize=jnp.dtype(q.dtype).itemsize, lr_itemsize=jnp.dtype(lr.dtype).itemsize if has_lora else 0)
  block_k, num_warps, num_stages, ns = cfg.block_k, cfg.num_warps, cfg.num_stages, cfg.num_splits
  statics = dict(has_lora=has_lora, per_q_head_b=per_q_head_b, num_splits=ns, fused=ns == 1,
                 tq=tq, d=d, r=r, group=group, mp=mp)
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
  params = compiler_params(num_warps, num_stages)
  kernel = functools.partial(_decode_kernel, causal=causal,
                             qk_scale=float(sm_scale) * LOG2E, block_k=block_k, **statics)
  if ns == 1:
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

  parts = split_pass(kernel, in_specs, args, b=b, hkv=hkv, ns=ns, m_rows=tq * group, mp=mp, d=d,
                     dp=dp, r=r, rp=rp, has_lora=has_lora, params=params, interpret=interpret)
  return merge(*parts, lora_b, scale, tq=tq, hq=hq, d=d, out_dtype=q.dtype,
               return_lse=return_lse, interpret=interpret)


def split_pass(kernel, in_specs, args, *, b, hkv, ns, m_rows, mp, d, dp, r, rp, has_lora,
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
      compiler_params=compiler_params(4, 1),
      interpret=interpret, name="flash_lora_decode_merge",
  )(*m_args)
  return tuple(res) if return_lse else res
