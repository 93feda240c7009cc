"""Pallas Mosaic (TPU) kernels for Flash-LoRA-Attention.

Layout choices forced by Mosaic (blocks' last two dims must be multiples of
(8, 128) or span the array) and the cache layout [L, B, S, Hkv, D]:

* K / V_base blocks are [block_k, Hkv, D] (all KV heads: the last two dims span
  the array), fetched straight from the stacked cache: the layer index is a
  scalar-prefetch operand used by the BlockSpec index maps, so the pipeline
  DMAs the layer's tiles in place -- no copy of the layer. The per-head
  [block_k, D] tiles are read in-kernel with sublane-strided loads (32-bit
  types) or, for 16-bit types, strided loads of 32-bit words that hold two
  heads followed by a bit split (the trick of JAX's ragged paged attention).
* LR blocks are [block_k, R] (R spans the array), lora_b [Hb, R, D].
* One program handles every KV head of a (batch row, q block) so K / V_base /
  LR are read once; the G query heads of a KV head are the rows of its q tile.
* Masked KV blocks are skipped: the index maps clamp the block index to the
  last live block (so the pipeline issues no new DMA) and ``pl.when`` skips the
  compute.

Fast path requirements (otherwise the wrapper takes ONE copy of the layer's
slice, padded: documented slow path): head_dim % 128 == 0, kv_len % 128 == 0
(or kv_len a multiple of 16 below 128), and for 16-bit caches an even Hkv or
Hkv == 1.

Prefill: grid (B, q blocks, KV blocks), epilogue in-kernel.
Decode (split-K): grid (B, splits, KV blocks per split); each split writes a
normalised partial (o, racc) and its log-sum-exp; the wrapper merges them
(rank-wide partials with the same weights) and multiplies by B once.

``return_lse=True`` (static) also returns the natural log-sum-exp [B, Tq, Hq]
float32 (-inf for rows that see no key): an extra [B, Hkv, G, Tq, 1] output of
the prefill kernel, and a by-product of the split merge for decode (the decode
kernel is the same either way). With False the prefill kernel is unchanged.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels._args import next_pow2, round_up

NEG = -0.7 * float(np.finfo(np.float32).max)
NT_DIMS = (((1,), (1,)), ((), ()))
NN_DIMS = (((1,), (0,)), ((), ()))
VMEM_BUDGET = 12 * 2**20   # stay under the 16 MiB default scoped VMEM limit


def _compute_dtype(dtype):
  # float16 matmuls are not native on every TPU generation: compute in f32.
  return jnp.float32 if jnp.dtype(dtype) == jnp.float16 else dtype


def _iter_heads(ref, hkv):
  """Yields (h, [block_k, D] value) for every KV head of a K/V block.

  ``ref`` is the [1, 1, bk, Hkv, D] block (unit leading dims kept: Mosaic's
  memref bitcast needs the unsqueezed rank) or [1, 1, bk, D] when Hkv == 1.
  """
  if ref.ndim == 4:                       # Hkv == 1: the wrapper dropped the axis
    yield 0, ref[0, 0]
    return
  bk, _, dp = ref.shape[2:]
  dtype = jnp.dtype(ref.dtype)
  if dtype.itemsize == 4:
    flat = ref.reshape(bk * hkv, dp)
    for h in range(hkv):
      yield h, flat[pl.ds(h, bk, stride=hkv), :]
    return
  # 16-bit: sublane row pairs (head 2i, head 2i+1) share one 32-bit word.
  half = hkv // 2
  words = ref.bitcast(jnp.uint32).reshape(bk * half, dp)
  for hp in range(half):
    w = words[pl.ds(hp, bk, stride=half), :]
    if dtype == jnp.bfloat16:
      lo = pltpu.bitcast(w << 16, jnp.float32).astype(jnp.bfloat16)
      hi = pltpu.bitcast(w & jnp.uint32(0xFFFF0000), jnp.float32).astype(jnp.bfloat16)
    else:
      lo = pltpu.bitcast((w & jnp.uint32(0xFFFF)).astype(jnp.uint16), dtype)
      hi = pltpu.bitcast((w >> 16).astype(jnp.uint16), dtype)
    yield 2 * hp, lo
    yield 2 * hp + 1, hi


def _update(h, q, k, v, lr, valid, m_ref, l_ref, acc_ref, racc_ref, sm_scale):
  """Online-softmax step for KV head h with the rank-wide second accumulator."""
  cd = _compute_dtype(q.dtype)
  s = lax.dot_general(q.astype(cd), k.astype(cd), NT_DIMS,
                      preferred_element_type=jnp.float32) * sm_scale
  s = jnp.where(valid, s, NEG)
  m_prev = m_ref[h]
  m_new = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))
  alpha = jnp.exp(m_prev - m_new)
  p = jnp.where(valid, jnp.exp(s - m_new), 0.0)
  l_ref[h] = alpha * l_ref[h] + jnp.sum(p, axis=1, keepdims=True)
  acc_ref[h] = alpha * acc_ref[h] + lax.dot_general(
      p.astype(cd), v.astype(cd), NN_DIMS, preferred_element_type=jnp.float32)
  if lr is not None:
    lcd = _compute_dtype(lr.dtype)
    racc_ref[h] = alpha * racc_ref[h] + lax.dot_general(
        p.astype(lcd), lr.astype(lcd), NN_DIMS, preferred_element_type=jnp.float32)
  m_ref[h] = m_new


def _init_scratch(m_ref, l_ref, acc_ref, racc_ref):
  m_ref[...] = jnp.full(m_ref.shape, -jnp.inf, jnp.float32)
  l_ref[...] = jnp.zeros(l_ref.shape, jnp.float32)
  acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)
  if racc_ref is not None:
    racc_ref[...] = jnp.zeros(racc_ref.shape, jnp.float32)


def _safe_inv(l):
  return jnp.where(l > 0, 1.0 / jnp.where(l > 0, l, 1.0), 0.0)


# ----------------------------------------------------------------------------
# Live KV block counts (shared by kernels and index maps; scalar code).
# ----------------------------------------------------------------------------
def _prefill_nblocks(i, kv_len, q_off, *, bq, bk, tq, causal):
  if causal:
    t_last = jnp.minimum((i + 1) * bq, tq) - 1
    hi = jnp.minimum(kv_len, q_off + t_last + 1)
  else:
    hi = kv_len
  return lax.div(jnp.maximum(hi, 0) + (bk - 1), bk)


def _decode_nblocks(kv_len, q_off, *, bk, tq, causal):
  hi = jnp.minimum(kv_len, q_off + tq) if causal else kv_len
  return lax.div(jnp.maximum(hi, 0) + (bk - 1), bk)


def _decode_block(s, j, nb, ns):
  """KV block of (split s, step j), its split's length and the clamped index."""
  per = lax.div(nb + (ns - 1), ns)
  blk = s * per + j
  clamped = jnp.maximum(jnp.minimum(s * per + jnp.minimum(j, per - 1), nb - 1), 0)
  return blk, per, clamped


# ----------------------------------------------------------------------------
# Prefill
# ----------------------------------------------------------------------------
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
    _init_scratch(m_ref, l_ref, acc_ref, racc_ref)

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
    vs = dict(_iter_heads(v_ref, hkv))
    for h, k in _iter_heads(k_ref, hkv):
      q = q_ref[h].reshape(rows_m, dp)
      _update(h, q, k, vs.pop(h), lr, valid, m_ref, l_ref, acc_ref, racc_ref, sm_scale)

  @pl.when(j == nk - 1)
  def _finish():
    for h in range(hkv):
      inv = _safe_inv(l_ref[h])
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


def _pick_block_k(s_len, pref):
  """Largest block <= pref (halving) that divides s_len and is a multiple of
  128, or s_len itself when it is short and a multiple of 16; None means the
  cache needs padding (slow path)."""
  if s_len <= min(pref, 128):
    return s_len if s_len % 16 == 0 else None
  bk = pref
  while bk >= 128:
    if s_len % bk == 0 and bk % 128 == 0:
      return bk
    bk //= 2
  return None


def _prepare_cache(k, v, lr, layer, block_k):
  """Returns (k, v, lr, layer, bk, dp, hkv_store) ready for the kernels.

  Fast path: no copy. Slow path (head_dim % 128, odd Hkv for 16-bit types,
  kv_len without a suitable block): one padded copy of the layer's slice.
  """
  num_layers, b, s_len, hkv, d = k.shape
  dp = round_up(d, 128)
  odd_16bit = jnp.dtype(k.dtype).itemsize == 2 and hkv > 1 and hkv % 2 == 1
  bk = _pick_block_k(s_len, block_k)
  if dp != d or odd_16bit or bk is None:
    if bk is None:
      bk = min(block_k, round_up(s_len, 16))
    s_pad = round_up(s_len, bk)
    h_pad = hkv + (1 if odd_16bit else 0)
    take = lambda x: lax.dynamic_index_in_dim(x, layer, 0, keepdims=True)
    k = jnp.pad(take(k), ((0, 0), (0, 0), (0, s_pad - s_len), (0, h_pad - hkv), (0, dp - d)))
    v = jnp.pad(take(v), ((0, 0), (0, 0), (0, s_pad - s_len), (0, h_pad - hkv), (0, dp - d)))
    if lr is not None:
      lr = jnp.pad(take(lr), ((0, 0), (0, 0), (0, s_pad - s_len), (0, 0)))
    layer = jnp.zeros((), jnp.int32)
    hkv = h_pad
  if hkv == 1:   # drop the unit head axis: [L, B, S, D] blocks are plain 2-D tiles
    k = k.reshape(k.shape[:3] + k.shape[4:])
    v = v.reshape(v.shape[:3] + v.shape[4:])
  return k, v, lr, layer, bk, dp, hkv


def _kv_spec(k, bk, index_fn):
  # Leading unit dims are kept (not squeezed) on purpose, see _iter_heads.
  if k.ndim == 4:
    return pl.BlockSpec((1, 1, bk, k.shape[-1]), lambda *a: index_fn(*a)[:3] + (0,))
  return pl.BlockSpec((1, 1, bk, k.shape[-2], k.shape[-1]), index_fn)


def _vmem_bytes(rows, hq_rows, dp, r, bk, hkv, itemsize, out_rows, lse_rows=0):
  lane = lambda n: round_up(max(n, 1), 128)
  sub = max(hkv, 8 * (4 // itemsize))
  # lse_rows: rows of a [.., rows, 1] float32 output block (lane-padded to 128)
  io = 2 * (hq_rows * dp * itemsize + out_rows + lse_rows * 128 * 4)
  kv = 2 * (2 * bk * sub * dp * itemsize + bk * lane(r) * itemsize)
  scratch = rows * (dp + 2 * 128 + lane(r)) * 4
  return io + kv + scratch


def prefill(q, k, v, layer, kv_len, q_off, lr, lora_b, scale, *, causal, sm_scale,
            block_q=128, block_k=512, interpret=False, return_lse=False):
  """Flash-LoRA prefill on TPU. Canonical shapes (see _args.Canon); [B,Tq,Hq,D]
  (and the float32 lse [B,Tq,Hq] with return_lse)."""
  b, tq, hq, d = q.shape
  hkv0 = k.shape[3]
  group = hq // hkv0
  has_lora = lr is not None
  per_q_head_b = has_lora and lora_b.shape[1] != hkv0
  k, v, lr, layer, bk, dp, hkv = _prepare_cache(k, v, lr, layer, block_k)
  itemsize = jnp.dtype(q.dtype).itemsize
  r = lr.shape[-1] if has_lora else 0
  bq = max(16, min(next_pow2(block_q), next_pow2(tq)))
  while bq > 16 and _vmem_bytes(hkv * group * bq, hq * bq, dp, r, bk, hkv, itemsize,
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
  in_specs = [q_spec, _kv_spec(k, bk, kv_index), _kv_spec(v, bk, kv_index)]
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


# ----------------------------------------------------------------------------
# Split-K decode
# ----------------------------------------------------------------------------
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
    _init_scratch(m_ref, l_ref, acc_ref, racc_ref)

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
    vs = dict(_iter_heads(v_ref, hkv))
    for h, k in _iter_heads(k_ref, hkv):
      _update(h, q_ref[h], k, vs.pop(h), lr, valid, m_ref, l_ref, acc_ref, racc_ref,
              sm_scale)

  @pl.when(j == nbs - 1)
  def _finish():
    for h in range(hkv):
      l = l_ref[h]
      inv = _safe_inv(l)
      opart_ref[h] = acc_ref[h] * inv
      if has_lora:
        rpart_ref[h] = racc_ref[h] * inv
      lse_ref[h] = jnp.where(l > 0, m_ref[h] + jnp.log(jnp.where(l > 0, l, 1.0)), -jnp.inf)


def default_num_splits(batch, heads_kv, kv_len, block_k):
  # One TensorCore per chip on v5e/v6e, two on v4/v5p (megacore): two splits
  # keep both cores busy at batch 1; more splits only add merge traffic.
  del heads_kv
  return 2 if batch == 1 and kv_len >= 4 * block_k else 1


def decode(q, k, v, layer, kv_len, q_off, lr, lora_b, scale, *, causal, sm_scale,
           block_k=512, num_splits=None, interpret=False, return_lse=False):
  """Split-K Flash-LoRA decode on TPU; splits merged by merge_splits. [B,Tq,Hq,D]
  (and the float32 lse [B,Tq,Hq] with return_lse)."""
  b, tq, hq, d = q.shape
  hkv0 = k.shape[3]
  group = hq // hkv0
  has_lora = lr is not None
  per_q_head_b = has_lora and lora_b.shape[1] != hkv0
  k, v, lr, layer, bk, dp, hkv = _prepare_cache(k, v, lr, layer, block_k)
  s_len = k.shape[2]
  r = lr.shape[-1] if has_lora else 0
  ns = default_num_splits(b, hkv, s_len, bk) if num_splits is None else int(num_splits)
  if ns < 1:
    raise ValueError(f"num_splits must be >= 1, got {num_splits}.")
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
              _kv_spec(k, bk, kv_index), _kv_spec(v, bk, kv_index)]
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
