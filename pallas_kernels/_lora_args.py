"""Checks of the LoRA operands of Flash-LoRA-Attention (lr, lora_b, lora_scale).

One job: validate the LoRA arguments against the already checked q / k shapes
and return them in canonical form (see _args.Canon); a bad value raises one
ValueError naming the argument and what was expected.
"""
from __future__ import annotations

import numbers

import jax.numpy as jnp

ALLOWED_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


def shape_str(x) -> str:
  return "None" if x is None else str(tuple(x.shape))


def check_float(name, x):
  dt = jnp.dtype(x.dtype)
  if dt not in ALLOWED_DTYPES:
    raise ValueError(
        f"{name} has dtype {dt}; allowed dtypes are float32, bfloat16, float16.")


def _scale_rows(lora_scale, b, hq, hkv):
  """lora_scale (python float, [], [B] or [B, Hq]) -> ([B, Hq] float32, varies per q head)."""
  if isinstance(lora_scale, numbers.Real) and not isinstance(lora_scale, bool):
    return jnp.full((b, hq), float(lora_scale), jnp.float32), False
  sc = jnp.asarray(lora_scale)
  if not jnp.issubdtype(sc.dtype, jnp.floating) and not jnp.issubdtype(sc.dtype, jnp.integer):
    raise ValueError(f"lora_scale must be a float or a float array, got dtype {sc.dtype}.")
  sc = sc.astype(jnp.float32)
  if sc.ndim == 0:
    return jnp.broadcast_to(sc, (b, hq)), False
  if sc.shape == (b,):
    return jnp.broadcast_to(sc[:, None], (b, hq)), False
  if sc.shape == (b, hq):
    return sc, hq != hkv
  raise ValueError(
      f"lora_scale must be a float or an array of shape [batch]=({b},) or "
      f"[batch, heads_q]=({b}, {hq}), got {tuple(sc.shape)}.")


def check_lora(lr, lora_b, lora_scale, *, k, b, hq, hkv, d):
  """Returns (lr [L, B, S, R] | None, lora_b | None, scale [B, Hq] | None, lora_per_q_head).

  k is the caller's cache (4-D, or 5-D stacked over layers); lr must match its
  leading axes. lora_per_q_head: B or the scale differ inside a KV group.
  """
  if (lr is None) != (lora_b is None):
    raise ValueError("lr and lora_b must be given together (both or neither); "
                     f"got lr {shape_str(lr)}, lora_b {shape_str(lora_b)}.")
  if lr is None:
    return None, None, None, False
  check_float("lr", lr)
  check_float("lora_b", lora_b)
  stacked = k.ndim == 5
  if lr.ndim != k.ndim - 1 or tuple(lr.shape[:-1]) != tuple(k.shape[:-2]):
    lay = "[num_layers, batch, kv_len, rank]" if stacked else "[batch, kv_len, rank]"
    raise ValueError(f"lr must have shape {lay} matching k {shape_str(k)}, got {shape_str(lr)}.")
  r = lr.shape[-1]
  if r < 1:
    raise ValueError(f"LoRA rank (lr.shape[-1]) must be >= 1, got {r}.")
  if lora_b.ndim != 4 or lora_b.shape[0] != b or lora_b.shape[2] != r or lora_b.shape[3] != d \
      or lora_b.shape[1] not in (hkv, hq):
    raise ValueError(
        f"lora_b must have shape [batch, heads_kv, rank, head_dim]=({b}, {hkv}, {r}, {d}) or "
        f"[batch, heads_q, rank, head_dim]=({b}, {hq}, {r}, {d}), got {shape_str(lora_b)}.")
  scale, scale_per_q_head = _scale_rows(lora_scale, b, hq, hkv)
  per_q_head = lora_b.shape[1] != hkv or scale_per_q_head
  return (lr if stacked else lr[None]), lora_b, scale, per_q_head
