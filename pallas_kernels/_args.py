"""Argument checking and canonicalisation for Flash-LoRA-Attention.

One job: turn the public arguments (many accepted shapes) into one canonical
form that every backend (xla reference, Triton, Mosaic TPU) consumes, and
raise a ValueError naming the argument and the allowed values for bad input.
The LoRA operands are checked in _lora_args.py; the kernels' own limits
(one dtype, head_dim, rank) in check_kernel_limits.

Canonical form (see ``Canon``):
  q        [B, Tq, Hq, D]
  k, v     [L, B, S, Hkv, D]      (a 4-D cache gets a free leading axis, L = 1)
  layer    int32 scalar array     (0 for a 4-D cache; clipped into [0, L-1])
  lr       [L, B, S, R] or None
  lora_b   [B, Hb, R, D] or None  (Hb == Hkv: one B per KV head; Hb == Hq: per query head)
  scale    [B, Hq] float32        (per row and query head LoRA scale)
  kv_len   [B] int32              (clipped into [0, S])
  q_off    [B] int32              (absolute position of query row 0)
"""
from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Any

import jax.numpy as jnp
import numpy as np

from pallas_kernels._lora_args import check_float, check_lora, shape_str

# What the Pallas kernels handle (the XLA reference has no such limits).
KERNEL_MAX_RANK = 64
KERNEL_MAX_HEAD_DIM = 256


@dataclasses.dataclass(frozen=True)
class Canon:
  q: Any
  k: Any
  v: Any
  layer: Any
  lr: Any
  lora_b: Any
  scale: Any
  kv_len: Any
  q_off: Any
  causal: bool
  sm_scale: float
  # True when lora_scale varies inside a KV group or lora_b is per query head;
  # only the naive expansion cares (it must then expand per query head).
  lora_per_q_head: bool
  # Keys at positions <= query position - sliding_window are masked (None: no window);
  # only the XLA reference implements it.
  sliding_window: int | None = None

  @property
  def has_lora(self) -> bool:
    return self.lr is not None

  @property
  def dims(self):
    b, tq, hq, d = self.q.shape
    l, _, s, hkv, _ = self.k.shape
    r = 0 if self.lr is None else self.lr.shape[-1]
    return dict(B=b, Tq=tq, Hq=hq, D=d, L=l, S=s, Hkv=hkv, G=hq // hkv, R=r)


def _as_int_vector(name, x, batch):
  x = jnp.asarray(x)
  if not jnp.issubdtype(x.dtype, jnp.integer):
    raise ValueError(f"{name} must be an integer array of shape [batch]={batch}, got dtype {x.dtype}.")
  if x.ndim == 0:
    x = jnp.broadcast_to(x, (batch,))
  if x.shape != (batch,):
    raise ValueError(f"{name} must have shape [batch]=({batch},) (or be a scalar), got {tuple(x.shape)}.")
  return x.astype(jnp.int32)


def canonicalize(q, k, v_base, lr=None, lora_b=None, *, lora_scale=1.0,
                 kv_lengths=None, q_offsets=None, causal=True, sm_scale=None,
                 layer=None, sliding_window=None) -> Canon:
  """Checks the public arguments and returns their canonical form."""
  for name, x in (("q", q), ("k", k), ("v_base", v_base)):
    if not hasattr(x, "shape") or not hasattr(x, "dtype"):
      raise ValueError(f"{name} must be an array, got {type(x).__name__}.")
    check_float(name, x)
  if q.ndim != 4:
    raise ValueError(f"q must have shape [batch, q_len, heads_q, head_dim], got {shape_str(q)}.")
  if k.ndim not in (4, 5):
    raise ValueError(
        "k must have shape [batch, kv_len, heads_kv, head_dim] or, stacked over layers, "
        f"[num_layers, batch, kv_len, heads_kv, head_dim]; got {shape_str(k)}.")
  if tuple(v_base.shape) != tuple(k.shape):
    raise ValueError(f"v_base must have the same shape as k {shape_str(k)}, got {shape_str(v_base)}.")

  stacked = k.ndim == 5
  if stacked and layer is None:
    raise ValueError(
        "layer is required when k and v_base are stacked over layers "
        f"(k shape {shape_str(k)} = [num_layers, batch, kv_len, heads_kv, head_dim]).")
  if not stacked and layer is not None:
    raise ValueError(
        f"layer was given but k has shape {shape_str(k)} (4-D, not stacked over layers); "
        "pass the stacked [num_layers, ...] cache or layer=None.")
  k5 = k if stacked else k[None]
  v5 = v_base if stacked else v_base[None]
  num_layers, b, s, hkv, d = k5.shape
  bq, tq, hq, dq = q.shape
  if bq != b:
    raise ValueError(f"q batch {bq} does not match k batch {b} (q {shape_str(q)}, k {shape_str(k)}).")
  if dq != d:
    raise ValueError(f"q head_dim {dq} does not match k head_dim {d}.")
  if hq % hkv:
    raise ValueError(f"heads_q ({hq}) must be a multiple of heads_kv ({hkv}).")
  if tq < 1:
    raise ValueError(f"q_len must be >= 1, got {tq}.")
  if s < 1:
    raise ValueError(f"kv_len must be >= 1, got {s}.")

  # Layer index: python int (checked) or traced int32 scalar (clipped so that a
  # bad value can never read outside the cache).
  if stacked:
    if isinstance(layer, numbers.Integral) and not isinstance(layer, bool):
      if not 0 <= int(layer) < num_layers:
        raise ValueError(f"layer must be in [0, {num_layers}), got {layer}.")
      layer_arr = jnp.asarray(int(layer), jnp.int32)
    else:
      layer_arr = jnp.asarray(layer)
      if layer_arr.size != 1 or not jnp.issubdtype(layer_arr.dtype, jnp.integer):
        raise ValueError(f"layer must be a python int or an integer scalar array, got {layer!r}.")
      layer_arr = jnp.clip(layer_arr.reshape(()).astype(jnp.int32), 0, num_layers - 1)
  else:
    layer_arr = jnp.zeros((), jnp.int32)

  lr4, b4, scale, per_q_head = check_lora(lr, lora_b, lora_scale, k=k, b=b, hq=hq, hkv=hkv, d=d)
  kv_len = (jnp.full((b,), s, jnp.int32) if kv_lengths is None
            else jnp.clip(_as_int_vector("kv_lengths", kv_lengths, b), 0, s))
  if q_offsets is None:
    q_off = kv_len - tq
  else:
    q_off = _as_int_vector("q_offsets", q_offsets, b)

  if sm_scale is None:
    sm_scale = 1.0 / math.sqrt(d)
  if not isinstance(sm_scale, numbers.Real):
    raise ValueError(f"sm_scale must be a python float (static), got {type(sm_scale).__name__}.")
  if not isinstance(causal, (bool, np.bool_)):
    raise ValueError(f"causal must be a python bool, got {causal!r}.")

  if sliding_window is not None and (
      not isinstance(sliding_window, numbers.Integral) or isinstance(sliding_window, bool) or sliding_window < 1):
    raise ValueError(f"sliding_window must be a positive python int or None, got {sliding_window!r}.")

  return Canon(q=q, k=k5, v=v5, layer=layer_arr, lr=lr4, lora_b=b4, scale=scale,
               kv_len=kv_len, q_off=q_off, causal=bool(causal),
               sm_scale=float(sm_scale), lora_per_q_head=per_q_head,
               sliding_window=None if sliding_window is None else int(sliding_window))


def check_kernel_limits(c: Canon) -> None:
  """The Pallas kernels' limits: one dtype for q, k and v_base; head_dim and rank
  (the XLA reference computes in float32 and takes any)."""
  if jnp.dtype(c.k.dtype) != jnp.dtype(c.q.dtype) or jnp.dtype(c.v.dtype) != jnp.dtype(c.q.dtype):
    raise ValueError(f"q, k and v_base must share one dtype for the Pallas kernels, got q {c.q.dtype}, "
                     f"k {c.k.dtype}, v_base {c.v.dtype}; backend='xla' takes mixed dtypes.")
  dims = c.dims
  d, r = dims["D"], dims["R"]
  if d % 16 or not 16 <= d <= KERNEL_MAX_HEAD_DIM:
    raise ValueError(f"head_dim must be a multiple of 16 in [16, {KERNEL_MAX_HEAD_DIM}] for the Pallas "
                     f"kernels (e.g. 64, 80, 96, 128, 256), got {d}; backend='xla' takes any.")
  if c.has_lora and not 1 <= r <= KERNEL_MAX_RANK:
    raise ValueError(f"LoRA rank (lr.shape[-1]) must be in [1, {KERNEL_MAX_RANK}] for the Pallas kernels, "
                     f"got {r}; backend='xla' takes any.")


def next_pow2(x: int) -> int:
  return 1 << max(0, (int(x) - 1).bit_length())


def round_up(x: int, m: int) -> int:
  return -(-int(x) // m) * m
