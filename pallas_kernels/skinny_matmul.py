"""Skinny weight products for the decode step: x [M, K] @ w [K, N] with M <= 16.

A decode step at batch 1 is ~200 products of one (or a few) rows by a weight matrix,
and its time is the weight bytes over the bandwidth they stream at. XLA's one-row
product streams an 8B model's weights at 1.6-2.0 TB/s on an H200 against 3.1-3.9 TB/s
for a plain read (docs/perf-notes.md, section 5). This Pallas-Triton kernel streams
the weight through the software pipeline in [block_k, block_n] tiles:

* grid (N blocks, K splits): each program owns block_n output columns and a range of
  K blocks, so a [4096, 4096] weight still spreads over every SM;
* the M rows (padded to 16 inside the kernel by masked loads: no wrapper copy of x)
  form one tl.dot operand; the weight tile is read once;
* with one K split the program writes out[M, N] in the output dtype; with several it
  writes float32 partials [splits, M, N] that one small XLA reduction sums.

    from pallas_kernels.skinny_matmul import skinny_matmul
    y = skinny_matmul(x, w)                       # [M, N] in x's dtype, float32 accumulation
    y = skinny_matmul(x, w, interpret=True)       # any platform: Pallas interpret mode

Opt-in (`Llama(matmul_impl="triton")`): not yet measured on a GPU.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

try:
  from jax.experimental.pallas import triton as plgpu
except ImportError:  # pragma: no cover
  plgpu = None

from pallas_kernels._args import next_pow2
from pallas_kernels.triton_kernels import num_sms, smem_budget

MAX_ROWS = 16


def default_split_k(n_blocks_n: int, n_blocks_k: int, sms: int | None = None) -> int:
  """Enough (N block, K split) programs for about two per SM, each split >= 4 K blocks."""
  sms = num_sms() if sms is None else sms
  want = -(-2 * sms // n_blocks_n)
  return int(max(1, min(want, n_blocks_k // 4)))


def _kernel(x_ref, w_ref, o_ref, *, m, k_dim, n_dim, block_k, block_n, per_split, n_k_blocks):
  n = pl.program_id(0)
  s = pl.program_id(1)
  rows = jnp.arange(MAX_ROWS, dtype=jnp.int32)
  row_ok = rows < m
  cols = n * block_n + jnp.arange(block_n, dtype=jnp.int32)
  col_ok = None if n_dim % block_n == 0 else (cols < n_dim)[None, :]
  k_even = k_dim % block_k == 0
  shape = (MAX_ROWS, block_k)

  def body(j, acc):
    ks = j * block_k + jnp.arange(block_k, dtype=jnp.int32)
    k_ok = None if k_even else ks < k_dim
    xmask = row_ok[:, None] if k_ok is None else row_ok[:, None] & k_ok[None, :]
    xt = plgpu.load(x_ref.at[jnp.broadcast_to(rows[:, None], shape), jnp.broadcast_to(ks[None, :], shape)],
                    mask=xmask, other=0)
    wmask = col_ok
    if k_ok is not None:
      wmask = k_ok[:, None] if wmask is None else k_ok[:, None] & wmask
    start = pl.multiple_of(j * block_k, block_k)
    wref = w_ref.at[pl.ds(start, block_k), pl.ds(pl.multiple_of(n * block_n, block_n), block_n)]
    wt = plgpu.load(wref) if wmask is None else plgpu.load(wref, mask=wmask, other=0)
    prec = lax.Precision.HIGHEST if xt.dtype == jnp.float32 else None
    return acc + lax.dot_general(xt, wt, (((1,), (0,)), ((), ())), precision=prec,
                                 preferred_element_type=jnp.float32)

  lo = s * per_split
  hi = jnp.minimum(lo + per_split, n_k_blocks)
  acc = lax.fori_loop(lo, hi, body, jnp.zeros((MAX_ROWS, block_n), jnp.float32))
  oshape = (MAX_ROWS, block_n)
  omask = row_ok[:, None] if col_ok is None else row_ok[:, None] & col_ok
  plgpu.store(o_ref.at[jnp.broadcast_to(rows[:, None], oshape), jnp.broadcast_to(cols[None, :], oshape)],
              acc.astype(o_ref.dtype), mask=omask)


def skinny_matmul(x, w, *, out_dtype=None, block_n=None, block_k=None, split_k=None, num_warps=4,
                  num_stages=3, interpret=False):
  """x [M, K] @ w [K, N] -> [M, N] (M <= 16) with float32 accumulation.

  out_dtype: default x's dtype. block_n / block_k: powers of two >= 16 (default 128 /
  128, capped by the matrix). split_k: K splits (default: about two programs per SM).
  """
  if x.ndim != 2 or w.ndim != 2 or x.shape[1] != w.shape[0]:
    raise ValueError(f"skinny_matmul needs x [M, K] and w [K, N]; got {x.shape} and {w.shape}")
  m, k_dim = x.shape
  n_dim = w.shape[1]
  if not 1 <= m <= MAX_ROWS:
    raise ValueError(f"skinny_matmul handles 1 to {MAX_ROWS} rows, got {m}")
  if x.dtype != w.dtype:
    raise ValueError(f"x and w must have one dtype, got {x.dtype} and {w.dtype}")
  for name, val in (("block_n", block_n), ("block_k", block_k)):
    if val is not None and (val < 16 or val & (val - 1)):
      raise ValueError(f"{name} must be a power of two >= 16, got {val}")
  out_dtype = jnp.dtype(out_dtype or x.dtype)
  auto_k = block_k is None
  block_n = min(block_n or 128, max(16, next_pow2(n_dim)))
  block_k = min(block_k or 128, max(16, next_pow2(k_dim)))
  # Staged tiles (weights + rows) within ~70% of the card's shared memory (sm_86 / 89:
  # 99 KiB, A100: 163 KiB, H100: 227 KiB): fewer stages first, then a shorter K tile.
  item = jnp.dtype(x.dtype).itemsize
  budget = smem_budget()
  while num_stages * block_k * (block_n + MAX_ROWS) * item > budget:
    if num_stages > 2:
      num_stages -= 1
    elif auto_k and block_k > 16:
      block_k //= 2
    else:
      break
  nb_n = pl.cdiv(n_dim, block_n)
  nb_k = pl.cdiv(k_dim, block_k)
  splits = default_split_k(nb_n, nb_k) if split_k is None else int(split_k)
  if splits < 1:
    raise ValueError(f"split_k must be >= 1, got {split_k}")
  splits = min(splits, nb_k)
  per = pl.cdiv(nb_k, splits)
  splits = pl.cdiv(nb_k, per)  # no empty split
  kernel = functools.partial(_kernel, m=m, k_dim=k_dim, n_dim=n_dim, block_k=block_k,
                             block_n=block_n, per_split=per, n_k_blocks=nb_k)
  part_dtype = out_dtype if splits == 1 else jnp.float32
  out = pl.pallas_call(
      kernel,
      grid=(nb_n, splits),
      in_specs=[pl.BlockSpec((m, k_dim), lambda n, s: (0, 0)),
                pl.BlockSpec((k_dim, n_dim), lambda n, s: (0, 0))],
      out_specs=pl.BlockSpec((None, m, n_dim), lambda n, s: (s, 0, 0)),
      out_shape=jax.ShapeDtypeStruct((splits, m, n_dim), part_dtype),
      compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
      interpret=interpret,
      name="skinny_matmul",
  )(x, w)
  if splits == 1:
    return out[0]
  return out.sum(axis=0).astype(out_dtype)
