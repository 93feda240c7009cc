"""The XLA reference of Flash-LoRA-Attention and the naive LoRA expansion.

* ``reference_attention`` / ``reference_from_canon``: float32 math, LoRA term
  in the reordered form ``s * (P @ LR) @ B`` (no expansion), dense over the
  whole cache: the form ``backend="xla"`` (xla_chunked.py, which reads only the
  visible key chunks) is tested against, and whose gradient it uses.
  Memory-sane for long q_len: queries are processed in chunks (``lax.map``)
  sized so one chunk's [batch, heads, chunk, kv_len] scores stay around 2**25
  floats. Has the sliding window (as has xla_chunked; the Pallas kernels not).
* ``expand_values``: the naive expansion ``V = V_base + s * LR @ B`` per head;
  ``flash_lora_attention.naive_lora_attention`` runs plain attention on it.
* ``reference_float64``: the same in float64 numpy (out and lse), what the kernel tests
  and the GPU checks (bench.kernels, bench.gpu_mgpu_check) compare every backend with.

Imports nothing from flash_lora_attention.py (which imports this file).
"""
from __future__ import annotations

import functools

import jax
import numpy as np
import jax.numpy as jnp
from jax import lax

from pallas_kernels._args import Canon, canonicalize

# Scores of one query chunk hold at most about this many float32 elements.
_CHUNK_SCORE_ELEMS = 1 << 25


def _layer_slice(x, layer):
  return lax.dynamic_index_in_dim(x, layer, axis=0, keepdims=False)


def _attend_chunk(q, k, v, lr, lora_b, scale, kv_len, q_off, row0, *, causal,
                  sm_scale, per_q_head_b, return_lse=False, sliding_window=None):
  """q [B,C,Hq,D] (rows row0..row0+C); k,v [B,S,Hkv,D]; lr [B,S,R] | None.

  Returns o [B,C,Hq,D] float32, or (o, lse [B,C,Hq] float32) with return_lse.
  """
  b, c, hq, d = q.shape
  s_len, hkv = k.shape[1], k.shape[2]
  g = hq // hkv
  qg = q.astype(jnp.float32).reshape(b, c, hkv, g, d)
  scores = jnp.einsum("bchgd,bshd->bhgcs", qg, k.astype(jnp.float32),
                      precision=lax.Precision.HIGHEST) * sm_scale
  cols = jnp.arange(s_len, dtype=jnp.int32)
  valid = cols[None, None, :] < kv_len[:, None, None]                     # [B,1,S]
  pos = q_off[:, None] + row0 + jnp.arange(c, dtype=jnp.int32)[None, :]    # [B,C]
  if causal:
    valid = valid & (cols[None, None, :] <= pos[:, :, None])             # [B,C,S]
  if sliding_window is not None:
    valid = valid & (cols[None, None, :] > pos[:, :, None] - sliding_window)
  valid = valid[:, None, None]                                           # [B,1,1,C|1,S]
  scores = jnp.where(valid, scores, -jnp.inf)
  m = jnp.max(scores, axis=-1, keepdims=True)
  m = jnp.where(jnp.isfinite(m), m, 0.0)
  p = jnp.where(valid, jnp.exp(scores - m), 0.0)
  l = jnp.sum(p, axis=-1, keepdims=True)
  p = p / jnp.where(l > 0, l, 1.0)       # rows that see no key -> zeros, never NaN
  o = jnp.einsum("bhgcs,bshd->bchgd", p, v.astype(jnp.float32),
                 precision=lax.Precision.HIGHEST)
  if lr is not None:
    plr = jnp.einsum("bhgcs,bsr->bchgr", p, lr.astype(jnp.float32),
                     precision=lax.Precision.HIGHEST)
    bm = lora_b.astype(jnp.float32)
    if per_q_head_b:
      bm = bm.reshape(b, hkv, g, *bm.shape[2:])
      lo = jnp.einsum("bchgr,bhgrd->bchgd", plr, bm, precision=lax.Precision.HIGHEST)
    else:
      lo = jnp.einsum("bchgr,bhrd->bchgd", plr, bm, precision=lax.Precision.HIGHEST)
    o = o + scale.reshape(b, 1, hkv, g, 1) * lo
  o = o.reshape(b, c, hq, d)
  if not return_lse:
    return o
  # natural-log softmax denominator (max included); -inf where no key is visible
  lse = jnp.where(l > 0, m + jnp.log(jnp.where(l > 0, l, 1.0)), -jnp.inf)   # [B,Hkv,G,C,1]
  return o, jnp.moveaxis(lse[..., 0], 3, 1).reshape(b, c, hq)


def reference_from_canon(c: Canon, q_chunk: int | None = None, return_lse: bool = False):
  """Float32 reference on canonical arguments; returns [B, Tq, Hq, D] in q's dtype,
  with return_lse also the float32 log-sum-exp [B, Tq, Hq]."""
  dims = c.dims
  b, tq, hq, s_len = dims["B"], dims["Tq"], dims["Hq"], dims["S"]
  k = _layer_slice(c.k, c.layer)
  v = _layer_slice(c.v, c.layer)
  lr = None if c.lr is None else _layer_slice(c.lr, c.layer)
  per_q_head_b = c.lora_b is not None and c.lora_b.shape[1] != dims["Hkv"]
  attend = functools.partial(
      _attend_chunk, k=k, v=v, lr=lr, lora_b=c.lora_b, scale=c.scale,
      kv_len=c.kv_len, q_off=c.q_off, causal=c.causal, sm_scale=c.sm_scale,
      per_q_head_b=per_q_head_b, return_lse=return_lse, sliding_window=c.sliding_window)
  if q_chunk is None:
    q_chunk = max(1, _CHUNK_SCORE_ELEMS // max(1, b * hq * s_len))
    q_chunk = 1 << (q_chunk.bit_length() - 1)   # power of two, for fewer recompiles
  if tq <= q_chunk:
    res = attend(c.q, row0=0)
  else:
    n = -(-tq // q_chunk)
    qp = jnp.pad(c.q, ((0, 0), (0, n * q_chunk - tq), (0, 0), (0, 0)))
    qc = jnp.moveaxis(qp.reshape(b, n, q_chunk, *qp.shape[2:]), 1, 0)
    outs = lax.map(lambda a: attend(a[0], row0=a[1]),
                   (qc, jnp.arange(n, dtype=jnp.int32) * q_chunk))
    # [n, B, q_chunk, ...] -> [B, Tq, ...]
    unchunk = lambda x: jnp.moveaxis(x, 0, 1).reshape(b, n * q_chunk, *x.shape[3:])[:, :tq]
    res = jax.tree.map(unchunk, outs)
  if return_lse:
    out, lse = res
    return out.astype(c.q.dtype), lse
  return res.astype(c.q.dtype)


def reference_attention(q, k, v_base, lr=None, lora_b=None, *, lora_scale=1.0,
                        kv_lengths=None, q_offsets=None, causal=True,
                        sm_scale=None, layer=None, sliding_window=None, q_chunk=None,
                        return_lse=False):
  """Plain jnp Flash-LoRA-Attention reference (float32 math, chunked over queries).

  Same arguments and semantics as ``flash_lora_attention`` (``return_lse`` and
  ``sliding_window`` included); ``q_chunk`` overrides the query chunk size of
  the memory-sane loop.
  """
  c = canonicalize(q, k, v_base, lr, lora_b, lora_scale=lora_scale,
                   kv_lengths=kv_lengths, q_offsets=q_offsets, causal=causal,
                   sm_scale=sm_scale, layer=layer, sliding_window=sliding_window)
  return reference_from_canon(c, q_chunk=q_chunk, return_lse=return_lse)


def expand_values(c: Canon):
  """Naive expansion of the layer's values: returns (k, v) for plain attention.

  V[b, s, h] = V_base[b, s, h] + scale[b, h] * LR[b, s] @ B[b, h], computed in
  float32 and stored in the cache dtype (as a naive implementation would).
  When B or the scale differ between the query heads of a KV group, V (and K,
  repeated) are expanded per query head.
  """
  dims = c.dims
  b, hq, hkv, g = dims["B"], dims["Hq"], dims["Hkv"], dims["G"]
  k = _layer_slice(c.k, c.layer)
  v = _layer_slice(c.v, c.layer)
  if c.lr is None:
    return k, v
  lr = _layer_slice(c.lr, c.layer).astype(jnp.float32)
  bm = c.lora_b.astype(jnp.float32)
  if c.lora_per_q_head:
    if bm.shape[1] == hkv:
      bm = jnp.repeat(bm, g, axis=1)
    k = jnp.repeat(k, g, axis=2)
    v = jnp.repeat(v, g, axis=2)
    scale = c.scale                                   # [B, Hq]
  else:
    scale = c.scale[:, ::g]                           # [B, Hkv], equal inside a group
  delta = jnp.einsum("bsr,bhrd->bshd", lr, bm, precision=lax.Precision.HIGHEST)
  v = (v.astype(jnp.float32) + scale[:, None, :, None] * delta).astype(c.v.dtype)
  return k, v


def reference_float64(q, k, v, lr, lora_b, scale, kv_len, q_off, *, causal, sm_scale=None, layer=None,
                      window=None):
  """Flash-LoRA attention in float64 numpy: (out [B,Tq,Hq,D], lse [B,Tq,Hq]).

  q [B,Tq,Hq,D]; k, v [B,S,Hkv,D], or [L,B,S,Hkv,D] with `layer`; lr [B,S,R] (or [L,..]) or
  None; lora_b [B,Hkv|Hq,R,D]; scale [B,Hq]; kv_len, q_off [B]. Query t of row b sits at
  q_off[b] + t and sees keys j < kv_len[b] (j <= its position when causal; j > position - window
  with a window). Rows that see no key: 0 and lse -inf. Inputs of any dtype (JAX or numpy)."""
  f = lambda x: None if x is None else np.asarray(x).astype(np.float64)  # bf16 via ml_dtypes; float64 kept
  q, k, v, lr, lora_b = map(f, (q, k, v, lr, lora_b))
  if layer is not None:
    k, v = k[layer], v[layer]
    lr = None if lr is None else lr[layer]
  b, tq, hq, d = q.shape
  s, hkv = k.shape[1], k.shape[2]
  g = hq // hkv
  sm_scale = 1.0 / np.sqrt(d) if sm_scale is None else sm_scale
  sc = np.einsum("bthgd,bshd->bhgts", q.reshape(b, tq, hkv, g, d), k) * sm_scale
  cols, pos = np.arange(s), np.asarray(q_off)[:, None, None] + np.arange(tq)[None, :, None]
  valid = cols[None, None, :] < np.asarray(kv_len)[:, None, None]
  if causal:
    valid = valid & (cols[None, None, :] <= pos)
  if window is not None:
    valid = valid & (cols[None, None, :] > pos - window)
  valid = np.broadcast_to(valid, (b, tq, s))[:, None, None]
  sc = np.where(valid, sc, -np.inf)
  m = sc.max(-1, keepdims=True)
  m = np.where(np.isfinite(m), m, 0.0)
  p = np.where(valid, np.exp(sc - m), 0.0)
  l = p.sum(-1, keepdims=True)
  p = p / np.where(l > 0, l, 1.0)
  o = np.einsum("bhgts,bshd->bthgd", p, v)
  if lr is not None:
    plr = np.einsum("bhgts,bsr->bthgr", p, lr)
    bm = lora_b if lora_b.shape[1] == hq else np.repeat(lora_b, g, axis=1)
    bm = bm.reshape(b, hkv, g, *bm.shape[2:])
    o = o + np.asarray(scale, np.float64).reshape(b, 1, hkv, g, 1) * np.einsum("bthgr,bhgrd->bthgd", plr, bm)
  l, m = l[..., 0], m[..., 0]                                                      # [B,Hkv,G,Tq]
  lse = np.where(l > 0, m + np.log(np.where(l > 0, l, 1.0)), -np.inf)
  return o.reshape(b, tq, hq, d), lse.transpose(0, 3, 1, 2).reshape(b, tq, hq)
