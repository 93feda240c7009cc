"""Public entry point of Flash-LoRA-Attention: backend choice, knob checks, dispatch.

    out = softmax(q k^T * sm_scale + mask) @ V_base
          + lora_scale * (softmax(...) @ LR) @ lora_b[head]

computed without expanding LR to [kv_len, heads, head_dim] (docs/kernels.md).

Backends: "triton" (Pallas Triton lowering, any NVIDIA GPU; triton/), "mosaic_gpu"
(Pallas Mosaic GPU prefill for Hopper sm90, mosaic_gpu/; decode and the calls that
prefill does not support run the Triton kernels; in interpret mode it runs in Pallas' GPU
interpreter on JAX >= 0.11, the Triton kernels before), "mosaic_tpu"
(Pallas TPU; tpu/), "xla" (jnp in float32, reading only the visible key chunks;
xla_chunked.py; reference.py holds the dense form it is tested against), "auto"
(by jax.default_backend(): gpu -> mosaic_gpu on sm90 (Hopper), triton on other NVIDIA
GPUs, tpu -> mosaic_tpu, otherwise xla).
``interpret=True`` runs the Pallas backend in interpret mode (CPU tests).

Kernels: q_len <= ``decode_max_q_len`` (default 16) uses the split-K decode
kernel (on Triton also only while q_len * heads_q / heads_kv <= 128 rows),
longer q_len the prefill kernel; ``kernel="prefill" | "decode"`` forces one.

``return_lse=True`` (static) also returns the float32 log-sum-exp of every
query row, so that attention over disjoint key ranges (a shared prefix with
stacked queries, then each branch's suffix) can be merged exactly with
``merge_partials`` (merge.py).
"""
from __future__ import annotations

import importlib.util
import numbers
import warnings

import jax
import numpy as np

from pallas_kernels import reference, xla_chunked
from pallas_kernels._args import Canon, canonicalize, check_kernel_limits

BACKENDS = ("auto", "triton", "mosaic_gpu", "mosaic_tpu", "xla")
KERNELS = ("prefill", "decode")
DECODE_MAX_Q_LEN = 16
TRITON_DECODE_MAX_ROWS = 128   # stacked (q row, query head) rows of one KV head
# Whether "auto" picks "mosaic_gpu" on sm90 (Hopper) GPUs. On one H200 (JAX 0.11.2) its prefill
# passed every numerics case and ran 1.5x the Triton kernel's speed, and the paper's trace at
# 33.7k tokens cut time-to-first-token by 16% (docs/benchmarks.md 1c, 3f). False keeps Triton.
AUTO_PICKS_MOSAIC_GPU = True
MOSAIC_GPU_MIN_CC = 9.0
MOSAIC_GPU_MAX_CC = 10.0   # exclusive: the prefill is wgmma, sm_90a only (Blackwell has tcgen05)

# Keyword knobs accepted per backend: each lands in the block-size dataclass of the
# kernel that runs (num_splits: decode only; block_q: prefill only).
MOSAIC_GPU_TRITON_KNOBS = ("num_warps", "num_splits")
KNOBS = {
    "triton": ("block_q", "block_k", "num_warps", "num_stages", "num_splits"),
    # The first four: its Mosaic GPU prefill (mosaic_gpu.tuning.PrefillBlockSizes). The
    # Triton-only two go to the Triton kernels it hands decode and unsupported calls to (so
    # code written for "auto" on other GPUs keeps working on Hopper); those calls otherwise
    # run Triton's measured defaults.
    "mosaic_gpu": ("block_q", "block_k", "num_stages", "lr_pad") + MOSAIC_GPU_TRITON_KNOBS,
    "mosaic_tpu": ("block_q", "block_k", "num_splits"),
    "xla": ("q_chunk", "kv_chunk"),
}
_DISPATCH_KEYS = ("kernel", "decode_max_q_len")


def triton_available() -> bool:
  """Whether this JAX still ships Pallas' Triton backend (deprecated in 0.12, to be removed)."""
  return importlib.util.find_spec("jax.experimental.pallas.triton") is not None


def mosaic_gpu_available() -> bool:
  """Whether this JAX ships Pallas Mosaic GPU and the first device is a Hopper (sm90) GPU."""
  if importlib.util.find_spec("jax.experimental.pallas.mosaic_gpu") is None:
    return False
  try:
    dev = jax.devices()[0]
    return dev.platform == "gpu" and _is_hopper(dev)
  except Exception:  # pragma: no cover
    return False


def _is_hopper(dev) -> bool:
  return MOSAIC_GPU_MIN_CC <= _compute_capability(dev) < MOSAIC_GPU_MAX_CC


def _compute_capability(dev) -> float:
  return float(getattr(dev, "compute_capability", 0) or 0)


def _warn_no_triton(what: str, stacklevel: int):
  warnings.warn(f"this JAX has no Pallas Triton backend (deprecated since JAX 0.12): {what} the XLA path",
                stacklevel=stacklevel + 1)


def _check_hopper():
  """backend "mosaic_gpu" asked for by name on a GPU that is not a Hopper: one clear line, not a
  compile error from wgmma (an sm_90a instruction). Off a GPU (lowering for cuda on a CPU
  machine) there is nothing to check."""
  dev = jax.devices()[0]
  if dev.platform == "gpu" and not _is_hopper(dev):
    raise ValueError(f"backend 'mosaic_gpu' runs on Hopper GPUs (compute capability 9.x); this "
                     f"{getattr(dev, 'device_kind', 'GPU')} is {_compute_capability(dev):g}: use backend "
                     f"'triton' or 'auto'.")


def resolve_backend(backend: str) -> str:
  if backend not in BACKENDS:
    raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}.")
  if backend != "auto":
    return backend
  platform = jax.default_backend()
  if platform in ("gpu", "cuda", "rocm"):
    if AUTO_PICKS_MOSAIC_GPU and mosaic_gpu_available():
      return "mosaic_gpu"
    if triton_available():
      return "triton"
    _warn_no_triton("attention on this GPU runs", stacklevel=2)
    return "xla"
  if platform == "tpu":
    return "mosaic_tpu"
  return "xla"


def _block_size_classes(backend):
  if backend == "mosaic_gpu":
    from pallas_kernels.mosaic_gpu import tuning as mgpu_tuning   # no Mosaic GPU import
    return mgpu_tuning.PrefillBlockSizes, None
  if backend == "triton":
    from pallas_kernels.triton import tuning
  else:
    from pallas_kernels.tpu import tuning
  return tuning.PrefillBlockSizes, tuning.DecodeBlockSizes


def _pick(cls, kw):
  names = {f for f in cls.__dataclass_fields__}
  return cls(**{k: v for k, v in kw.items() if k in names})


def check_knobs(backend: str, kw: dict):
  """Checks the keyword knobs of a resolved backend; returns (dispatch keys, knobs).

  Every value is checked up front (also those of the kernel that will not run),
  so a bad knob fails the same way at every shape.
  """
  allowed = KNOBS[backend] + _DISPATCH_KEYS
  for key in kw:
    if key not in allowed:
      raise ValueError(f"unknown keyword {key!r} for backend {backend!r}; allowed: {allowed}.")
  dispatch = {k: kw[k] for k in _DISPATCH_KEYS if k in kw}
  if dispatch.get("kernel") not in KERNELS + (None,):
    raise ValueError(f"kernel must be one of {KERNELS} or None, got {dispatch['kernel']!r}.")
  knobs = {k: v for k, v in kw.items() if k not in _DISPATCH_KEYS and v is not None}
  for key in ("decode_max_q_len", "q_chunk", "kv_chunk"):
    val = kw.get(key)
    if val is not None and (not isinstance(val, numbers.Integral) or isinstance(val, bool) or val < 1):
      raise ValueError(f"{key} must be a positive int, got {val!r}.")
  if backend != "xla":
    prefill_cls, decode_cls = _block_size_classes(backend)
    _pick(prefill_cls, knobs)   # validates (ValueError naming the knob)
    if decode_cls is not None:
      _pick(decode_cls, knobs)
  if backend == "mosaic_gpu":
    handed_on = _triton_knobs(knobs)
    for cls in _block_size_classes("triton"):
      _pick(cls, handed_on)
  return dispatch, knobs


def _triton_knobs(knobs):
  """The knobs of a mosaic_gpu call that go to the Triton kernels it hands calls on to."""
  return {k: v for k, v in knobs.items() if k in MOSAIC_GPU_TRITON_KNOBS}


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
  if backend in ("triton", "mosaic_gpu") and dims["Tq"] * dims["G"] > TRITON_DECODE_MAX_ROWS:
    return "prefill"
  return "decode"


def run_canonical(c: Canon, backend: str, interpret=False, return_lse=False, **knobs):
  """Runs a resolved backend on canonical arguments (see _args.Canon).

  Returns out, or (out, lse) when ``return_lse`` (a static python bool).
  """
  dispatch, knobs = check_knobs(backend, knobs)
  return_lse = _check_return_lse(return_lse)
  if backend == "xla":
    return xla_chunked.chunked_from_canon(c, q_chunk=knobs.get("q_chunk"), kv_chunk=knobs.get("kv_chunk"),
                                          return_lse=return_lse)
  check_kernel_limits(c)
  if c.sliding_window is not None and c.sliding_window < c.dims["S"]:
    raise NotImplementedError(
        f"the Pallas kernels have no sliding window (sliding_window={c.sliding_window} < "
        f"kv_len={c.dims['S']}); use backend 'xla' (attention 'xla') or a cache no longer than the window.")
  kernel = choose_kernel(c, backend, dispatch.get("kernel"), dispatch.get("decode_max_q_len"))
  extra = {"return_lse": True} if return_lse else {}  # the default path is the unchanged kernel call
  if backend == "mosaic_gpu":
    from pallas_kernels import mosaic_gpu
    if not interpret:
      _check_hopper()
    # Falls back to the Triton kernels (their measured defaults) for decode and for the
    # calls the Mosaic GPU prefill does not take (mosaic_gpu.unsupported_reason: float32,
    # head_dim no multiple of 64, cache length no multiple of 64), and in interpret mode
    # on a JAX without Pallas' GPU interpret mode.
    if kernel == "prefill" and mosaic_gpu.unsupported_reason(c) is None and \
        (not interpret or mosaic_gpu.interpret_available()):
      return mosaic_gpu.prefill(c.q, c.k, c.v, c.layer, c.kv_len, c.q_off, c.lr, c.lora_b, c.scale,
                                causal=c.causal, sm_scale=c.sm_scale, interpret=interpret,
                                block_sizes=_pick(mosaic_gpu.PrefillBlockSizes, knobs), **extra)
    if not triton_available():  # a JAX without Pallas Triton: the XLA path, as "auto" does
      _warn_no_triton(f"the {kernel} calls the Mosaic GPU prefill does not take run", stacklevel=3)
      return xla_chunked.chunked_from_canon(c, return_lse=return_lse)
    backend, knobs = "triton", _triton_knobs(knobs)
  if backend == "triton":
    from pallas_kernels import triton as impl
  else:
    from pallas_kernels import tpu as impl
  prefill_cls, decode_cls = _block_size_classes(backend)
  if kernel == "prefill":
    fn, block_sizes = impl.prefill, _pick(prefill_cls, knobs)
  else:
    fn, block_sizes = impl.decode, _pick(decode_cls, knobs)
  return fn(c.q, c.k, c.v, c.layer, c.kv_len, c.q_off, c.lr, c.lora_b, c.scale, causal=c.causal,
            sm_scale=c.sm_scale, block_sizes=block_sizes, interpret=interpret, **extra)


def flash_lora_attention(q, k, v_base, lr=None, lora_b=None, *, lora_scale=1.0,
                         kv_lengths=None, q_offsets=None, causal=True, sm_scale=None,
                         layer=None, sliding_window=None, backend="auto", interpret=False,
                         return_lse=False, **knobs):
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
    sliding_window: python int or None; query at position p also needs keys
      j > p - sliding_window. Only the xla backend has it; the Pallas backends
      accept a window no shorter than kv_len (it masks nothing) and raise
      NotImplementedError otherwise.
    backend: "auto" | "triton" | "mosaic_gpu" | "mosaic_tpu" | "xla".
    interpret: run the Pallas kernel in interpret mode.
    return_lse: python bool (static). Also return the log-sum-exp of each row.
    **knobs: triton: block_q, block_k, num_warps, num_stages, num_splits
      (triton.tuning.PrefillBlockSizes / DecodeBlockSizes); mosaic_gpu: block_q,
      block_k, num_stages, lr_pad of its prefill (mosaic_gpu.tuning), and num_warps,
      num_splits for the Triton kernels it hands decode and unsupported calls to; mosaic_tpu:
      block_q, block_k, num_splits (tpu.tuning); xla: q_chunk, kv_chunk; any backend:
      kernel ("prefill" | "decode"), decode_max_q_len. None or absent: the
      measured defaults (get_default).

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
  check_knobs(backend, knobs)
  c = canonicalize(q, k, v_base, lr, lora_b, lora_scale=lora_scale,
                   kv_lengths=kv_lengths, q_offsets=q_offsets, causal=causal,
                   sm_scale=sm_scale, layer=layer, sliding_window=sliding_window)
  return run_canonical(c, backend, interpret=interpret, return_lse=return_lse, **knobs)


def naive_lora_attention(q, k, v_base, lr=None, lora_b=None, *, lora_scale=1.0,
                         kv_lengths=None, q_offsets=None, causal=True,
                         sm_scale=None, layer=None, sliding_window=None, backend="auto",
                         interpret=False, return_lse=False, **knobs):
  """Naive baseline: expand V = V_base + s * LR @ B per head (reference.expand_values),
  then plain attention with the given backend, so a comparison with the fused kernel
  isolates the cost of expanding the LoRA term. Same arguments as flash_lora_attention."""
  backend = resolve_backend(backend)
  check_knobs(backend, knobs)
  c = canonicalize(q, k, v_base, lr, lora_b, lora_scale=lora_scale,
                   kv_lengths=kv_lengths, q_offsets=q_offsets, causal=causal,
                   sm_scale=sm_scale, layer=layer, sliding_window=sliding_window)
  k_x, v_x = reference.expand_values(c)
  return flash_lora_attention(
      q, k_x, v_x, kv_lengths=c.kv_len, q_offsets=c.q_off, causal=c.causal,
      sm_scale=c.sm_scale, sliding_window=c.sliding_window, backend=backend,
      interpret=interpret, return_lse=return_lse, **knobs)
