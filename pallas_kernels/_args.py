"""Argument checking and canonicalisation for Flash-LoRA-Attention.

One job: turn the public arguments (many accepted shapes) into one canonical
form that every backend (xla reference, Triton, Mosaic TPU) consumes, and
raise a ValueError naming the argument and the allowed values for bad input.

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

ALLOWED_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
MAX_RANK = 64
MAX_HEAD_DIM = 256


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

  @property
  def has_lora(self) -> bool:
    return self.lr is not None

  @property
  def dims(self):
    b, tq, hq, d = self.q.shape
    l, _, s, hkv, _ = self.k.shape
    r = 0 if self.lr is None else self.lr.shape[-1]
    return dict(B=b, Tq=tq, Hq=hq, D=d, L=l, S=s, Hkv=hkv, G=hq // hkv, R=r)


def _shape_str(x) -> str:
  return "None" if x is None else str(tuple(x.shape))


def _check_float(name, x):
  dt = jnp.dtype(x.dtype)
  if dt not in ALLOWED_DTYPES:
    raise ValueError(
        f"{name} has dtype {dt}; allowed dtypes are float32, bfloat16, float16.")


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
                 layer=None) -> Canon:
  """Checks the public arguments and returns their canonical form."""
  for name, x in (("q", q), ("k", k), ("v_base", v_base)):
    if not hasattr(x, "shape") or not hasattr(x, "dtype"):
      raise ValueError(f"{name} must be an array, got {type(x).__name__}.")
    _check_float(name, x)
  if q.ndim != 4:
    raise ValueError(f"q must have shape [batch, q_len, heads_q, head_dim], got {_shape_str(q)}.")
  if k.ndim not in (4, 5):
    raise ValueError(
        "k must have shape [batch, kv_len, heads_kv, head_dim] or, stacked over layers, "
        f"[num_layers, batch, kv_len, heads_kv, head_dim]; got {_shape_str(k)}.")
  if tuple(v_base.shape) != tuple(k.shape):
    raise ValueError(f"v_base must have the same shape as k {_shape_str(k)}, got {_shape_str(v_base)}.")
  if jnp.dtype(k.dtype) != jnp.dtype(q.dtype) or jnp.dtype(v_base.dtype) != jnp.dtype(q.dtype):
    raise ValueError(
        f"q, k and v_base must share one dtype, got q {q.dtype}, k {k.dtype}, v_base {v_base.dtype}.")

  stacked = k.ndim == 5
  if stacked and layer is None:
    raise ValueError(
        "layer is required when k and v_base are stacked over layers "
        f"(k shape {_shape_str(k)} = [num_layers, batch, kv_len, heads_kv, head_dim]).")
  if not stacked and layer is not None:
    raise ValueError(
        f"layer was given but k has shape {_shape_str(k)} (4-D, not stacked over layers); "
        "pass the stacked [num_layers, ...] cache or layer=None.")
  k5 = k if stacked else k[None]
  v5 = v_base if stacked else v_base[None]
  num_layers, b, s, hkv, d = k5.shape
  bq, tq, hq, dq = q.shape
  if bq != b:
    raise ValueError(f"q batch {bq} does not match k batch {b} (q {_shape_str(q)}, k {_shape_str(k)}).")
  if dq != d:
    raise ValueError(f"q head_dim {dq} does not match k head_dim {d}.")
  if d % 16 or not 16 <= d <= MAX_HEAD_DIM:
    raise ValueError(f"head_dim must be a multiple of 16 in [16, {MAX_HEAD_DIM}] (e.g. 64, 80, 96, 128, 256), got {d}.")
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

  # LoRA operands.
  if (lr is None) != (lora_b is None):
    raise ValueError("lr and lora_b must be given together (both or neither); "
                     f"got lr {_shape_str(lr)}, lora_b {_shape_str(lora_b)}.")
  lr4 = b4 = None
  per_q_head = False
  scale = None
  if lr is not None:
    _check_float("lr", lr)
    _check_float("lora_b", lora_b)
    want_lr_ndim = k.ndim - 1
    if lr.ndim != want_lr_ndim or tuple(lr.shape[:-1]) != tuple(k.shape[:-2]):
      lay = "[num_layers, batch, kv_len, rank]" if stacked else "[batch, kv_len, rank]"
      raise ValueError(f"lr must have shape {lay} matching k {_shape_str(k)}, got {_shape_str(lr)}.")
    r = lr.shape[-1]
    if not 1 <= r <= MAX_RANK:
      raise ValueError(f"LoRA rank (lr.shape[-1]) must be in [1, {MAX_RANK}], got {r}.")
    if lora_b.ndim != 4 or lora_b.shape[0] != b or lora_b.shape[2] != r or lora_b.shape[3] != d \
        or lora_b.shape[1] not in (hkv, hq):
      raise ValueError(
          f"lora_b must have shape [batch, heads_kv, rank, head_dim]=({b}, {hkv}, {r}, {d}) or "
          f"[batch, heads_q, rank, head_dim]=({b}, {hq}, {r}, {d}), got {_shape_str(lora_b)}.")
    per_q_head = lora_b.shape[1] != hkv
    lr4 = lr if stacked else lr[None]
    b4 = lora_b
    if isinstance(lora_scale, numbers.Real) and not isinstance(lora_scale, bool):
      scale = jnp.full((b, hq), float(lora_scale), jnp.float32)
    else:
      sc = jnp.asarray(lora_scale)
      if not jnp.issubdtype(sc.dtype, jnp.floating) and not jnp.issubdtype(sc.dtype, jnp.integer):
        raise ValueError(f"lora_scale must be a float or a float array, got dtype {sc.dtype}.")
      sc = sc.astype(jnp.float32)
      if sc.ndim == 0:
        scale = jnp.broadcast_to(sc, (b, hq))
      elif sc.shape == (b,):
        scale = jnp.broadcast_to(sc[:, None], (b, hq))
      elif sc.shape == (b, hq):
        scale = sc
        per_q_head = per_q_head or hq != hkv
      else:
        raise ValueError(
            f"lora_scale must be a float or an array of shape [batch]=({b},) or "
            f"[batch, heads_q]=({b}, {hq}), got {tuple(sc.shape)}.")

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

  return Canon(q=q, k=k5, v=v5, layer=layer_arr, lr=lr4, lora_b=b4, scale=scale,
               kv_len=kv_len, q_off=q_off, causal=bool(causal),
               sm_scale=float(sm_scale), lora_per_q_head=per_q_head)


def next_pow2(x: int) -> int:
  return 1 << max(0, (int(x) - 1).bit_length())


def round_up(x: int, m: int) -> int:
  return -(-int(x) // m) * m

