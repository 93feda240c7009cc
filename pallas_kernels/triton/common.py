"""Shared pieces of the Pallas Triton kernels: loads, dots, and the online
softmax over KV blocks with the extra rank-wide accumulator.

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

import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl

try:  # The Triton backend is deprecated in JAX >= 0.11 but still shipped.
  from jax.experimental.pallas import triton as plgpu
except ImportError:  # pragma: no cover
  plgpu = None

LOG2E = math.log2(math.e)
LN2 = math.log(2.0)
# Finite mask value: exp2(NEG - m) == 0 and NEG - NEG == 0, so masked rows
# never produce inf - inf = NaN.
NEG = -0.7 * float(np.finfo(np.float32).max)


def compiler_params(num_warps, num_stages):
  return plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages)


def dot(a, b, trans_b=False):
  dims = (((1,), (1,)), ((), ())) if trans_b else (((1,), (0,)), ((), ()))
  # Pallas-Triton maps the DEFAULT precision of float32 dots to TF32 (10-bit
  # mantissa); ask for IEEE float32 so f32 inputs and the f32 epilogue
  # (rank-wide accumulator @ B) keep ~1e-6 accuracy. 16-bit dots are unaffected.
  prec = lax.Precision.HIGHEST if a.dtype == jnp.float32 else None
  return lax.dot_general(a, b, dims, precision=prec, preferred_element_type=jnp.float32)


def cdiv(x, n: int):
  return lax.div(x + (n - 1), n)  # x >= 0 everywhere it is used


def load(ref, mask):
  if mask is None:
    return plgpu.load(ref)
  return plgpu.load(ref, mask=mask, other=0)


def and_(a, b):
  if a is None:
    return b
  if b is None:
    return a
  return a & b


def _attend_block(j, carry, *, q, k_ref, v_ref, lr_ref, layer, block_k, kv_len,
                  dmask, rmask, qk_scale, valid_fn, masked):
  """One KV block of the online softmax with the extra rank-wide accumulator."""
  acc, racc, m_i, l_i = carry
  start = pl.multiple_of(j * block_k, block_k)
  cols = start + jnp.arange(block_k, dtype=jnp.int32)
  in_len = (cols < kv_len)[:, None] if masked else None
  kmask = and_(in_len, dmask)
  k = load(k_ref.at[layer, pl.ds(start, block_k), :], kmask)
  s = dot(q, k, trans_b=True) * qk_scale          # log2-domain scores
  if masked:
    valid = valid_fn(cols)
    s = jnp.where(valid, s, NEG)
  m_new = jnp.maximum(m_i, jnp.max(s, axis=1))
  alpha = jnp.exp2(m_i - m_new)
  p = jnp.exp2(s - m_new[:, None])
  if masked:
    p = jnp.where(valid, p, 0.0)
  l_i = l_i * alpha + jnp.sum(p, axis=1)
  v = load(v_ref.at[layer, pl.ds(start, block_k), :], kmask)
  acc = acc * alpha[:, None] + dot(p.astype(v.dtype), v)
  if lr_ref is not None:
    lrt = load(lr_ref.at[layer, pl.ds(start, block_k), :], and_(in_len, rmask))
    racc = racc * alpha[:, None] + dot(p.astype(lrt.dtype), lrt)
  return acc, racc, m_new, l_i


def run_blocks(q, *, lo_full, hi_full, lo_mask, hi_mask, m_rows, dp, rp, **kw):
  """Online softmax over blocks [lo_full, hi_full) without masks, then
  [lo_mask, hi_mask) with masks. Returns (acc, racc | None, m, l)."""
  acc = jnp.zeros((m_rows, dp), jnp.float32)
  racc = jnp.zeros((m_rows, rp), jnp.float32) if kw["lr_ref"] is not None else None
  m_i = jnp.full((m_rows,), -jnp.inf, jnp.float32)
  l_i = jnp.zeros((m_rows,), jnp.float32)
  carry = (acc, racc, m_i, l_i)
  carry = lax.fori_loop(lo_full, hi_full,
                        functools.partial(_attend_block, q=q, masked=False, **kw), carry)
  return lax.fori_loop(lo_mask, hi_mask,
                       functools.partial(_attend_block, q=q, masked=True, **kw), carry)


def lse_nat(m2, l):
  """Natural-log lse from a log2-domain max m2 and a row sum l (relative to m2);
  -inf where l == 0 (no visible key)."""
  return jnp.where(l > 0, (m2 + jnp.log2(jnp.where(l > 0, l, 1.0))) * LN2, -jnp.inf)


def masks(d, dp, r, rp):
  dmask = None if d == dp else (jnp.arange(dp, dtype=jnp.int32) < d)[None, :]
  rmask = None if r == rp else (jnp.arange(rp, dtype=jnp.int32) < r)[None, :]
  return dmask, rmask
