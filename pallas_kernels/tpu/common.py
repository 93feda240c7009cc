"""Shared pieces of the Pallas Mosaic (TPU) kernels.

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
"""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels._args import round_up

NEG = -0.7 * float(np.finfo(np.float32).max)
NT_DIMS = (((1,), (1,)), ((), ()))
NN_DIMS = (((1,), (0,)), ((), ()))


def compute_dtype(dtype):
  # float16 matmuls are not native on every TPU generation: compute in f32.
  return jnp.float32 if jnp.dtype(dtype) == jnp.float16 else dtype


def iter_heads(ref, hkv):
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


def update(h, q, k, v, lr, valid, m_ref, l_ref, acc_ref, racc_ref, sm_scale):
  """Online-softmax step for KV head h with the rank-wide second accumulator."""
  cd = compute_dtype(q.dtype)
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
    lcd = compute_dtype(lr.dtype)
    racc_ref[h] = alpha * racc_ref[h] + lax.dot_general(
        p.astype(lcd), lr.astype(lcd), NN_DIMS, preferred_element_type=jnp.float32)
  m_ref[h] = m_new


def init_scratch(m_ref, l_ref, acc_ref, racc_ref):
  m_ref[...] = jnp.full(m_ref.shape, -jnp.inf, jnp.float32)
  l_ref[...] = jnp.zeros(l_ref.shape, jnp.float32)
  acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)
  if racc_ref is not None:
    racc_ref[...] = jnp.zeros(racc_ref.shape, jnp.float32)


def safe_inv(l):
  return jnp.where(l > 0, 1.0 / jnp.where(l > 0, l, 1.0), 0.0)


def pick_block_k(s_len, pref):
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


def prepare_cache(k, v, lr, layer, block_k):
  """Returns (k, v, lr, layer, bk, dp, hkv_store) ready for the kernels.

  Fast path: no copy. Slow path (head_dim % 128, odd Hkv for 16-bit types,
  kv_len without a suitable block): one padded copy of the layer's slice.
  """
  num_layers, b, s_len, hkv, d = k.shape
  dp = round_up(d, 128)
  odd_16bit = jnp.dtype(k.dtype).itemsize == 2 and hkv > 1 and hkv % 2 == 1
  bk = pick_block_k(s_len, block_k)
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


def kv_spec(k, bk, index_fn):
  # Leading unit dims are kept (not squeezed) on purpose, see _iter_heads.
  if k.ndim == 4:
    return pl.BlockSpec((1, 1, bk, k.shape[-1]), lambda *a: index_fn(*a)[:3] + (0,))
  return pl.BlockSpec((1, 1, bk, k.shape[-2], k.shape[-1]), index_fn)


def vmem_bytes(rows, hq_rows, dp, r, bk, hkv, itemsize, out_rows, lse_rows=0):
  lane = lambda n: round_up(max(n, 1), 128)
  sub = max(hkv, 8 * (4 // itemsize))
  # lse_rows: rows of a [.., rows, 1] float32 output block (lane-padded to 128)
  io = 2 * (hq_rows * dp * itemsize + out_rows + lse_rows * 128 * 4)
  kv = 2 * (2 * bk * sub * dp * itemsize + bk * lane(r) * itemsize)
  scratch = rows * (dp + 2 * 128 + lane(r)) * 4
  return io + kv + scratch
