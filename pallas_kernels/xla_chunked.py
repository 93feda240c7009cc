"""The XLA backend of Flash-LoRA-Attention: cost that follows the valid keys, not the cache.

``backend="xla"`` runs this. Keys are read in chunks of ``kv_chunk`` (a named default,
``KV_CHUNK``; a knob of the xla backend) with an online softmax, and the loop runs only
over the chunks some query can see: up to ``max(kv_lengths)`` (causal: the last query's
position + 1), and from the first key inside the sliding window. The trip count is traced
(``lax.fori_loop`` with a traced bound lowers to a while loop), so a cache preallocated to
200k slots holding a 200-token trajectory costs one chunk per layer, not 200k columns.
Each chunk is a ``dynamic_slice`` of the stacked [L, B, S, ...] cache, so no layer slice
is copied either.

Same contract as reference.py (float32 math, LoRA term as ``s * (P @ LR) @ B``, GQA,
ragged kv_lengths, q_offsets, sliding window, rows that see no key -> zeros and lse
-inf). Long q_len: queries run in chunks (``lax.map``) so one chunk's scores stay near
``SCORE_ELEMS`` floats; each query chunk bounds its own key range.

Gradients: a while loop with a traced trip count has no reverse-mode derivative, so the
function is a ``jax.custom_vjp``: when differentiated it runs the dense reference
(reference.reference_from_canon) forward and backward, exactly what training ran
before (its keys are a training chunk's own, all valid, so dense costs nothing extra).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels import reference
from pallas_kernels._args import Canon

# Keys per loop step: big enough that the loop's per-step cost is small next to the
# chunk's matmuls, small enough that a short trajectory in a long cache reads little.
KV_CHUNK = 512
# Scores of one query chunk against one key chunk hold about this many float32 elements.
SCORE_ELEMS = 1 << 25

_HI = lax.Precision.HIGHEST


def _pow2_floor(x: int) -> int:
  return 1 << (max(1, int(x)).bit_length() - 1)


def key_range(kv_len, q_off, row0, rows, *, causal, sliding_window, capacity):
  """[lo, hi): the keys any of the query rows row0..row0+rows-1 of any batch row may see.

  hi = max over the batch of kv_len (causal: min(kv_len, last query position + 1));
  lo = 0, or with a window the smallest first key inside it. Both int32 scalars in [0, capacity].
  """
  hi = kv_len
  if causal:
    hi = jnp.minimum(hi, q_off + row0 + rows)
  hi = jnp.clip(jnp.max(hi), 0, capacity)
  lo = jnp.zeros((), jnp.int32)
  if sliding_window is not None:
    lo = jnp.clip(jnp.min(q_off + row0 - sliding_window + 1), 0, capacity)
  return jnp.minimum(lo, hi), hi


def num_kv_chunks(lo, hi, kv_chunk: int):
  """Loop steps that cover [lo, hi) with chunks aligned to kv_chunk (traced int32)."""
  lo_al = (lo // kv_chunk) * kv_chunk
  return lo_al, (jnp.maximum(hi - lo_al, 0) + kv_chunk - 1) // kv_chunk


def _attend_q_chunk(q, row0, *, c: Canon, kv_chunk, per_q_head_b):
  """q [B, C, Hq, D] (rows row0..row0+C-1) over the visible key chunks.

  Returns o [B, C, Hq, D] float32 and lse [B, C, Hq] float32.
  """
  b, rows, hq, d = q.shape
  _, _, s_len, hkv, _ = c.k.shape
  g = hq // hkv
  kc = min(kv_chunk, s_len)
  qg = q.astype(jnp.float32).reshape(b, rows, hkv, g, d)
  pos = c.q_off[:, None] + row0 + jnp.arange(rows, dtype=jnp.int32)[None, :]     # [B, C]
  lo, hi = key_range(c.kv_len, c.q_off, row0, rows, causal=c.causal,
                     sliding_window=c.sliding_window, capacity=s_len)
  lo_al, n = num_kv_chunks(lo, hi, kc)
  r = 0 if c.lr is None else c.lr.shape[-1]

  def body(i, carry):
    m, l, acc, racc = carry
    start = lo_al + i * kc
    # The last chunk may stick out of the cache: read the in-range chunk ending at
    # the cache's end and mask the keys an earlier step already covered (cols < start).
    s0 = jnp.minimum(start, s_len - kc)
    k = lax.dynamic_slice(c.k, (c.layer, 0, s0, 0, 0), (1, b, kc, hkv, d))[0]
    v = lax.dynamic_slice(c.v, (c.layer, 0, s0, 0, 0), (1, b, kc, hkv, d))[0]
    cols = s0 + jnp.arange(kc, dtype=jnp.int32)
    valid = (cols[None, None, :] >= start) & (cols[None, None, :] < c.kv_len[:, None, None])   # [B,1,kc]
    if c.causal:
      valid = valid & (cols[None, None, :] <= pos[:, :, None])                            # [B,C,kc]
    if c.sliding_window is not None:
      valid = valid & (cols[None, None, :] > pos[:, :, None] - c.sliding_window)
    valid = valid[:, None, None]                                                           # [B,1,1,C|1,kc]
    scores = jnp.einsum("bchgd,bshd->bhgcs", qg, k.astype(jnp.float32), precision=_HI) * c.sm_scale
    scores = jnp.where(valid, scores, -jnp.inf)
    m_new = jnp.maximum(m, jnp.max(scores, axis=-1))
    m_safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
    alpha = jnp.exp(m - m_safe)                        # m = -inf (nothing seen yet) -> 0
    p = jnp.where(valid, jnp.exp(scores - m_safe[..., None]), 0.0)
    l = l * alpha + jnp.sum(p, axis=-1)
    acc = acc * alpha[..., None] + jnp.einsum("bhgcs,bshd->bhgcd", p, v.astype(jnp.float32), precision=_HI)
    if racc is not None:
      lr = lax.dynamic_slice(c.lr, (c.layer, 0, s0, 0), (1, b, kc, r))[0]
      racc = racc * alpha[..., None] + jnp.einsum("bhgcs,bsr->bhgcr", p, lr.astype(jnp.float32),
                                                  precision=_HI)
    return m_new, l, acc, racc

  init = (jnp.full((b, hkv, g, rows), -jnp.inf, jnp.float32),
          jnp.zeros((b, hkv, g, rows), jnp.float32),
          jnp.zeros((b, hkv, g, rows, d), jnp.float32),
          None if c.lr is None else jnp.zeros((b, hkv, g, rows, r), jnp.float32))
  m, l, acc, racc = lax.fori_loop(0, n, body, init)
  inv = jnp.where(l > 0, 1.0 / jnp.where(l > 0, l, 1.0), 0.0)[..., None]   # rows that see no key -> 0
  o = acc * inv                                                             # [B,Hkv,G,C,D]
  if racc is not None:
    plr = racc * inv
    bm = c.lora_b.astype(jnp.float32)
    if per_q_head_b:
      lo_term = jnp.einsum("bhgcr,bhgrd->bhgcd", plr, bm.reshape(b, hkv, g, *bm.shape[2:]), precision=_HI)
    else:
      lo_term = jnp.einsum("bhgcr,bhrd->bhgcd", plr, bm, precision=_HI)
    o = o + c.scale.reshape(b, hkv, g, 1, 1) * lo_term
  o = jnp.moveaxis(o, 3, 1).reshape(b, rows, hq, d)
  lse = jnp.where(l > 0, m + jnp.log(jnp.where(l > 0, l, 1.0)), -jnp.inf)   # [B,Hkv,G,C]
  return o, jnp.moveaxis(lse, 3, 1).reshape(b, rows, hq)


def _forward(c: Canon, q_chunk, kv_chunk):
  dims = c.dims
  b, tq, hq, s_len = dims["B"], dims["Tq"], dims["Hq"], dims["S"]
  kc = min(kv_chunk, s_len)
  per_q_head_b = c.lora_b is not None and c.lora_b.shape[1] != dims["Hkv"]
  attend = functools.partial(_attend_q_chunk, c=c, kv_chunk=kc, per_q_head_b=per_q_head_b)
  if q_chunk is None:
    q_chunk = _pow2_floor(max(1, SCORE_ELEMS // max(1, b * hq * kc)))   # power of two: fewer programs
  if tq <= q_chunk:
    return attend(c.q, 0)
  n = -(-tq // q_chunk)
  qp = jnp.pad(c.q, ((0, 0), (0, n * q_chunk - tq), (0, 0), (0, 0)))
  qc = jnp.moveaxis(qp.reshape(b, n, q_chunk, *qp.shape[2:]), 1, 0)
  outs = lax.map(lambda a: attend(a[0], a[1]), (qc, jnp.arange(n, dtype=jnp.int32) * q_chunk))
  unchunk = lambda x: jnp.moveaxis(x, 0, 1).reshape(b, n * q_chunk, *x.shape[3:])[:, :tq]
  return jax.tree.map(unchunk, outs)


def _canon(arrays, statics) -> Canon:
  q, k, v, lr, lora_b, scale, kv_len, q_off, layer = arrays
  causal, sm_scale, sliding_window, lora_per_q_head = statics
  return Canon(q=q, k=k, v=v, layer=layer, lr=lr, lora_b=lora_b, scale=scale, kv_len=kv_len, q_off=q_off,
               causal=causal, sm_scale=sm_scale, lora_per_q_head=lora_per_q_head, sliding_window=sliding_window)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _chunked(statics, q_chunk, kv_chunk, arrays):
  o, lse = _forward(_canon(arrays, statics), q_chunk, kv_chunk)
  return o.astype(arrays[0].dtype), lse


def _dense(statics, arrays):
  """The dense reference as a function of the float operands (the rest closed over)."""
  ints = arrays[6:]
  return lambda *floats: reference.reference_from_canon(_canon(floats + ints, statics), return_lse=True)


def _chunked_fwd(statics, q_chunk, kv_chunk, arrays):
  # Differentiated: run the dense reference and keep its residuals (what jax.grad of the
  # reference keeps), so a training step costs what it did before; see the module docstring.
  out, vjp = jax.vjp(_dense(statics, arrays), *arrays[:6])
  return out, vjp


def _chunked_bwd(statics, q_chunk, kv_chunk, vjp, cts):
  return (vjp(cts) + (None, None, None),)


_chunked.defvjp(_chunked_fwd, _chunked_bwd)


def chunked_from_canon(c: Canon, q_chunk: int | None = None, kv_chunk: int | None = None,
                       return_lse: bool = False):
  """Flash-LoRA-Attention on canonical arguments, reading only the visible key chunks.

  Returns [B, Tq, Hq, D] in q's dtype, with return_lse also the float32 lse [B, Tq, Hq].
  q_chunk: query rows per lax.map step (default: scores near SCORE_ELEMS); kv_chunk: keys
  per loop step (default KV_CHUNK).
  """
  statics = (c.causal, c.sm_scale, c.sliding_window, c.lora_per_q_head)
  arrays = (c.q, c.k, c.v, c.lr, c.lora_b, c.scale, c.kv_len, c.q_off, c.layer)
  out, lse = _chunked(statics, q_chunk, KV_CHUNK if kv_chunk is None else int(kv_chunk), arrays)
  return (out, lse) if return_lse else out
