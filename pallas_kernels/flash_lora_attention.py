"""Public entry point of Flash-LoRA-Attention: argument checks and dispatch.

    out = softmax(q k^T * sm_scale + mask) @ V_base
          + lora_scale * (softmax(...) @ LR) @ lora_b[head]

computed without expanding LR to [kv_len, heads, head_dim] (DESIGN.md section 1).

Backends: "triton" (Pallas Triton lowering, any NVIDIA GPU), "mosaic_tpu"
(Pallas TPU), "xla" (jnp reference in float32), "auto" (by
jax.default_backend(): gpu -> triton, tpu -> mosaic_tpu, otherwise xla).
``interpret=True`` runs the Pallas backend in interpret mode (CPU tests).

Kernels: q_len <= ``decode_max_q_len`` (default 16) uses the split-K decode
kernel (on Triton also only while q_len * heads_q / heads_kv <= 128 rows),
longer q_len the prefill kernel; ``kernel="prefill" | "decode"`` forces one.

``return_lse=True`` (static) also returns the float32 log-sum-exp of every
query row, so that attention over disjoint key ranges (a shared prefix with
stacked queries, then each branch's suffix) can be merged exactly with
``merge_partials`` (pallas_kernels/merge.py).
"""
from __future__ import annotations

import numbers

import jax
import numpy as np

from pallas_kernels import reference
from pallas_kernels._args import Canon, canonicalize

BACKENDS = ("auto", "triton", "mosaic_tpu", "xla")
KERNELS = ("prefill", "decode")
DECODE_MAX_Q_LEN = 16
TRITON_DECODE_MAX_ROWS = 128   # stacked (q row, query head) rows of one KV head

# Keyword "block sizes" accepted per backend (they apply to the kernel that runs;
# num_splits only to decode).
_TUNABLES = {
    "triton": ("block_q", "block_k", "num_warps", "num_stages", "num_splits", "lora_dot",
               "lr_prefetch", "lr_width"),
    "mosaic_tpu": ("block_q", "block_k", "num_splits"),
    "xla": ("q_chunk",),
}
_DISPATCH_KEYS = ("kernel", "decode_max_q_len")


def resolve_backend(backend: str) -> str:
  if backend not in BACKENDS:
    raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}.")
  if backend != "auto":
    return backend
  platform = jax.default_backend()
  if platform in ("gpu", "cuda", "rocm"):
    return "triton"
  if platform == "tpu":
    return "mosaic_tpu"
  return "xla"


def _check_tunables(backend, kw):
  allowed = _TUNABLES[backend] + _DISPATCH_KEYS
  for key, val in kw.items():
    if key not in allowed:
      raise ValueError(f"unknown keyword {key!r} for backend {backend!r}; allowed: {allowed}.")
    if key == "kernel":
      if val not in KERNELS + (None,):
        raise ValueError(f"kernel must be one of {KERNELS} or None, got {val!r}.")
      continue
    if val is None:
      continue
    if key == "lr_prefetch":
      if not isinstance(val, (bool, np.bool_)):
        raise ValueError(f"lr_prefetch must be a bool (triton decode), got {val!r}.")
      continue
    if key == "lora_dot":
      from pallas_kernels.triton_kernels import LORA_DOTS

      if val not in LORA_DOTS:
        raise ValueError(f"lora_dot must be one of {LORA_DOTS} (triton decode), got {val!r}.")
      continue
    if not isinstance(val, numbers.Integral) or val < 1:
      raise ValueError(f"{key} must be a positive int, got {val!r}.")
    if key in ("block_q", "block_k") and backend == "triton" and (val < 16 or val & (val - 1)):
      raise ValueError(f"{key} must be a power of two >= 16 for the triton backend, got {val}.")
    if key in ("block_q", "block_k") and backend == "mosaic_tpu" and val % 16:
      raise ValueError(f"{key} must be a multiple of 16 for the mosaic_tpu backend, got {val}.")
    if key == "lr_width" and (val < 16 or val & (val - 1)):
      raise ValueError(f"lr_width must be a power of two >= 16 (triton decode), got {val}.")
    if key == "num_warps" and val not in (1, 2, 4, 8, 16):
      raise ValueError(f"num_warps must be one of (1, 2, 4, 8, 16), got {val}.")


def _check_return_lse(return_lse):
  if not isinstance(return_lse, (bool, np.bool_)):
    raise ValueError(f"return_lse must be a python bool (static), got {return_lse!r}.")
  return bool(return_lse)


def choose_kernel(c: Canon, backend: str, kernel=None, decode_max_q_len=None) -> str:
  if kernel is not None:
    return kernel
  dims = c.dims
  limit = DECODE_MAX_Q_LEN if decode_max_q_len is None else decode_max_q_len
  if dims["Tq"] > limit:
    return "prefill"
  if backend == "triton" and dims["Tq"] * dims["G"] > TRITON_DECODE_MAX_ROWS:
    return "prefill"
  return "decode"


def run_canonical(c: Canon, backend: str, interpret=False, return_lse=False, **block_sizes):
  """Runs a resolved backend on canonical arguments (see _args.Canon).

  Returns out, or (out, lse) when ``return_lse`` (a static python bool).
  """
  _check_tunables(backend, block_sizes)
  return_lse = _check_return_lse(return_lse)
  if backend == "xla":
    return reference.reference_from_canon(c, q_chunk=block_sizes.get("q_chunk"),
                                          return_lse=return_lse)
  kernel = choose_kernel(c, backend, block_sizes.pop("kernel", None),
                         block_sizes.pop("decode_max_q_len", None))
  kw = {k: v for k, v in block_sizes.items() if v is not None}
  if kernel == "prefill":
    kw.pop("num_splits", None)
    kw.pop("lora_dot", None)
    kw.pop("lr_prefetch", None)
    kw.pop("lr_width", None)
  else:
    kw.pop("block_q", None)
  args = (c.q, c.k, c.v, c.layer, c.kv_len, c.q_off, c.lr, c.lora_b, c.scale)
  common = dict(causal=c.causal, sm_scale=c.sm_scale, interpret=interpret)
  if return_lse:   # only passed when set: the default path is the unchanged kernel call
    common["return_lse"] = True
  if backend == "triton":
    from pallas_kernels import triton_kernels as tk
    fn = tk.prefill if kernel == "prefill" else tk.decode
  else:
    from pallas_kernels import tpu_kernels as tpk
    fn = tpk.prefill if kernel == "prefill" else tpk.decode
  return fn(*args, **common, **kw)


def flash_lora_attention(q, k, v_base, lr=None, lora_b=None, *, lora_scale=1.0,
                         kv_lengths=None, q_offsets=None, causal=True, sm_scale=None,
                         layer=None, backend="auto", interpret=False, return_lse=False,
                         **block_sizes):
  """Flash attention with the LRAgent LoRA value term, fused.

  Args:
    q: [batch, q_len, heads_q, head_dim] (float32 / bfloat16 / float16).
    k, v_base: [batch, kv_len, heads_kv, head_dim], or stacked over layers
      [num_layers, batch, kv_len, heads_kv, head_dim] together with ``layer``.
    lr: [batch, kv_len, rank] (or [num_layers, batch, kv_len, rank]) or None.
    lora_b: [batch, heads_kv, rank, head_dim] or [batch, heads_q, rank, head_dim].
    lora_scale: python float, or array [batch] or [batch, heads_q].
    kv_lengths: [batch] int32 valid keys per row (default kv_len).
    q_offsets: [batch] int32 absolute position of query row 0 (default
      kv_lengths - q_len). Query t of row b sees keys j <= q_offsets[b] + t
      and j < kv_lengths[b] (causal=True); only the latter when causal=False.
    sm_scale: python float, default 1/sqrt(head_dim).
    layer: python int or traced int32 scalar; read inside the kernel.
    backend: "auto" | "triton" | "mosaic_tpu" | "xla".
    interpret: run the Pallas kernel in interpret mode.
    return_lse: python bool (static). Also return the log-sum-exp of each row.
    **block_sizes: triton: block_q, block_k, num_warps, num_stages, num_splits,
      lora_dot ("mma" | "fma" | "wide": how decode forms P @ LR),
      lr_prefetch (bool: decode loads LR one block ahead),
      lr_width (decode's LR tile width for "mma"/"wide": a power of two >= 16);
      mosaic_tpu: block_q, block_k, num_splits; xla: q_chunk; any backend:
      kernel ("prefill" | "decode"), decode_max_q_len.

  Returns:
    [batch, q_len, heads_q, head_dim] in q's dtype. Rows that see no key are 0.
    With ``return_lse=True`` a pair (out, lse): lse [batch, q_len, heads_q]
    float32 is the natural log of the row's softmax denominator, max included,
    ``lse = m + log(sum_j exp(s_j - m))`` over the visible keys with
    ``s_j = q . k_j * sm_scale``; -inf for rows that see no key. The LoRA term
    does not change it. Merge results over disjoint key ranges with
    ``merge_partials``.
  """
  backend = resolve_backend(backend)
  _check_tunables(backend, block_sizes)
  c = canonicalize(q, k, v_base, lr, lora_b, lora_scale=lora_scale,
                   kv_lengths=kv_lengths, q_offsets=q_offsets, causal=causal,
                   sm_scale=sm_scale, layer=layer)
  return run_canonical(c, backend, interpret=interpret, return_lse=return_lse, **block_sizes)
