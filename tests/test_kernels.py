"""Flash-LoRA-Attention kernels vs a float64 numpy reference (Pallas interpret mode, CPU).

Both Pallas backends (triton, mosaic_tpu) run in interpret mode, both kernels
(prefill, split-K decode). Interpret mode fills every output buffer and every
out-of-bounds block padding with NaN before the kernel runs
(test_interpret_mode_poisons_outputs pins that), so "no NaN and matches the
reference" means every output element was written and padding never leaked.

Tolerances (relative to max |reference|): float32 2e-5 (f32 math end to end;
the observed error is ~1e-6, the margin covers accumulation order), 16-bit
inputs 1e-2 (P is rounded to the input dtype before the P @ V and P @ LR dots,
as in every flash kernel; observed ~3e-3).

The heavy sweep is marked slow: `pytest -m slow tests/test_kernels.py`; what
it alone used to cover (rank 1 and 64, non-causal decode, float32 stacked
caches) runs in the fast cases at small sizes.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels import flash_lora_attention, naive_lora_attention, reference_attention
from pallas_kernels.reference import reference_float64

PALLAS = ("triton", "mosaic_tpu")
# Interpret-mode programs are big; cheaper XLA:CPU codegen cuts compile time ~30%.
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def compiled(f, *args):
  return jax.jit(f).trace(*args).lower().compile(compiler_options=FAST_COMPILE)


# ----------------------------------------------------------------------------
# float64 numpy reference
# ----------------------------------------------------------------------------
def np_reference(q, k, v, lr, lora_b, scale, kv_len, q_off, causal, sm_scale=None, layer=None, window=None):
  return reference_float64(q, k, v, lr, lora_b, scale, kv_len, q_off, causal=causal, sm_scale=sm_scale,
                           layer=layer, window=window)[0]


# ----------------------------------------------------------------------------
# cases
# ----------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Case:
  tq: int = 1
  b: int = 2
  s: int = 256
  hq: int = 8
  hkv: int = 2
  d: int = 128
  r: int | None = 8            # None: no LoRA term
  dtype: str = "float32"
  per_q_head_b: bool = False
  scale: str = "row"           # "scalar" | "row" ([B]) | "head" ([B, Hq])
  kv: str = "ragged"           # "full" | "ragged" | "empty_row" (one row with kv_lengths 0)
  q_off: str = "default"       # "default" (kv_len - tq) | "early" (queries before the end) | "none_visible"
  causal: bool = True
  layers: int | None = None    # stacked cache [L, ...] (layer 1 read)
  kw: tuple = ()               # block sizes / kernel choice

  def __str__(self):
    f = dataclasses.fields(self)
    return ",".join(f"{x.name}={getattr(self, x.name)}" for x in f
                    if getattr(self, x.name) != x.default)


def make_inputs(c: Case, seed=0):
  # numpy RNG: eager jax.random would compile once per shape (seconds each).
  rng = np.random.default_rng(seed)
  dt = jnp.dtype(c.dtype)
  lead = (c.layers,) if c.layers else ()
  normal = lambda shape, sd=1.0: jnp.asarray((sd * rng.standard_normal(shape)).astype(np.float32)).astype(dt)
  q = normal((c.b, c.tq, c.hq, c.d))
  k = normal(lead + (c.b, c.s, c.hkv, c.d))
  v = normal(lead + (c.b, c.s, c.hkv, c.d))
  lr = lora_b = None
  scale = 1.0
  if c.r is not None:
    lr = normal(lead + (c.b, c.s, c.r))
    lora_b = normal((c.b, c.hq if c.per_q_head_b else c.hkv, c.r, c.d), 0.3)
    if c.scale == "scalar":
      scale = 0.75
    elif c.scale == "row":
      scale = jnp.asarray(rng.uniform(0.25, 2.0, c.b), jnp.float32)
    else:
      scale = jnp.asarray(rng.uniform(0.25, 2.0, (c.b, c.hq)), jnp.float32)
  kv = np.full((c.b,), c.s, np.int32)
  if c.kv in ("ragged", "empty_row"):
    kv[0] = max(c.tq, c.s - 37)   # not a multiple of any block size
  if c.kv == "empty_row":
    kv[-1] = 0
  qo = kv - c.tq
  if c.q_off == "early":
    qo = np.maximum(qo - 5, 0)
  elif c.q_off == "none_visible":
    qo[0] = -c.tq - 3             # row 0's queries precede every key: output zeros
  return dict(q=q, k=k, v=v, lr=lr, lora_b=lora_b, lora_scale=scale,
              kv_lengths=jnp.asarray(kv), q_offsets=jnp.asarray(qo))


def expected(c: Case, x):
  scale = x["lora_scale"]
  scale = np.broadcast_to(np.asarray(scale, np.float64).reshape(
      (c.b, 1) if np.ndim(scale) == 1 else np.shape(scale) or (1, 1)), (c.b, c.hq))
  return np_reference(x["q"], x["k"], x["v"], x["lr"], x["lora_b"], scale,
                      np.asarray(x["kv_lengths"]), np.asarray(x["q_offsets"]),
                      c.causal, layer=1 if c.layers else None)


def run(c: Case, backend, x=None, fn=flash_lora_attention):
  x = make_inputs(c) if x is None else x
  kw = dict(c.kw)
  interp = backend != "xla"
  if backend == "xla":
    kw = {k: v for k, v in kw.items() if k == "q_chunk"}
  else:
    kw.pop("q_chunk", None)
  layer = 1 if c.layers else None

  def f(x):
    return fn(x["q"], x["k"], x["v"], x["lr"], x["lora_b"], lora_scale=x["lora_scale"],
              kv_lengths=x["kv_lengths"], q_offsets=x["q_offsets"], causal=c.causal,
              layer=layer, backend=backend, interpret=interp, **kw)

  return compiled(f, x)(x), x


def tol(c: Case):
  return 2e-5 if c.dtype == "float32" else 1e-2


def check(c: Case, out, x):
  ref = expected(c, x)
  out = np.asarray(jnp.asarray(out).astype(jnp.float32), np.float64)
  assert out.shape == ref.shape
  assert not np.isnan(out).any(), "NaN in output: an element was not written or padding leaked"
  scale = max(np.abs(ref).max(), 1e-6)
  err = np.abs(out - ref).max() / scale
  assert err < tol(c), f"{c}: max error {err:.3e} (relative to max |ref| {scale:.3g})"
  return ref, out


# Fast sweep: every case runs on both Pallas backends (kernel picked by q_len
# unless forced). Together they cover GQA 3:1 / 4:1 / 8:1, MQA, 1:1, ragged
# kv_lengths, q_offsets before the end, q_len 1 / 4 / 37, rank 3 / 8 / 16 / none,
# head_dim 64 / 80 / 96 / 128 / 256, per-row / per-head scales, per-q-head B,
# split-K merging, kv_len not a multiple of the block, 16-bit dtypes; rank 1 / 64,
# non-causal decode and prefill, float32 caches stacked over layers.
FAST_CASES = [
    Case(tq=1, d=128, r=8, hq=8, hkv=2, kw=(("num_splits", 3), ("block_k", 32))),
    Case(tq=4, d=64, r=16, hq=16, hkv=2, dtype="bfloat16", q_off="early"),
    Case(tq=1, d=256, r=3, hq=4, hkv=1, scale="head", kv="empty_row"),
    Case(tq=37, d=128, r=8, hq=8, hkv=1, per_q_head_b=True, kw=(("block_q", 16), ("block_k", 32))),
    Case(tq=37, d=96, r=None, hq=4, hkv=4, dtype="bfloat16", s=200, causal=False),
    Case(tq=37, d=80, r=16, hq=8, hkv=2, s=200, q_off="none_visible"),
    Case(tq=20, d=64, r=8, hq=8, hkv=2, dtype="float16", scale="head", kv="empty_row",
         kw=(("block_q", 16), ("block_k", 64))),
    # rank 1, non-causal decode, float32 stacked cache (formerly only in the slow sweep)
    Case(tq=1, d=64, r=1, hq=4, hkv=2, s=64, causal=False, layers=2, kw=(("num_splits", 2), ("block_k", 16))),
    # rank 64 (the kernels' largest) in decode (stacked, float32) and non-causal prefill
    Case(tq=3, d=64, r=64, hq=8, hkv=2, s=64, layers=2, scale="scalar",
         kw=(("num_splits", 2), ("block_k", 16))),
    Case(tq=20, d=64, r=64, hq=4, hkv=2, s=64, causal=False, kw=(("block_q", 16), ("block_k", 32))),
    # GQA 3:1, a group that is no power of two (the default miniature's 6 query / 2 KV heads), decode and prefill
    Case(tq=1, d=64, r=8, hq=6, hkv=2, kw=(("num_splits", 2), ("block_k", 32))),
    Case(tq=37, d=64, r=8, hq=6, hkv=2, s=200, kw=(("block_q", 16), ("block_k", 32))),
]


@pytest.mark.parametrize("backend", PALLAS)
@pytest.mark.parametrize("case", FAST_CASES, ids=str)
def test_kernel_matches_float64(case, backend):
  out, x = run(case, backend)
  ref, out = check(case, out, x)
  if case.kv == "empty_row" or case.q_off == "none_visible":
    row = -1 if case.kv == "empty_row" else 0
    assert np.all(out[row] == 0.0), "rows that see no key must be exactly zero"


def test_triton_decode_many_splits_chunked_merge():
  """More splits than one merge tile holds (chunked merge), most of them empty,
  128 stacked (q row, head) rows, per-query-head B."""
  c = Case(tq=16, d=128, r=8, hq=16, hkv=2, per_q_head_b=True,
           kw=(("num_splits", 100), ("block_k", 16)))
  out, x = run(c, "triton")
  check(c, out, x)


@pytest.mark.parametrize("case", [
    Case(tq=3, d=64, r=3, hq=8, hkv=2, per_q_head_b=True, dtype="bfloat16", kw=(("num_splits", 1),)),
    Case(tq=2, d=128, r=8, hq=8, hkv=2, kw=(("num_splits", 3), ("block_k", 16))),
    Case(tq=1, d=128, r=8, hq=8, hkv=2, kv="empty_row", kw=(("num_splits", 4), ("block_k", 16))),
    Case(tq=2, d=96, r=8, hq=8, hkv=2, per_q_head_b=True, kw=(("num_splits", 3), ("block_k", 16))),
    Case(tq=1, d=64, r=16, hq=4, hkv=1, dtype="bfloat16", kw=(("num_splits", 1),)),
    Case(tq=4, d=64, r=3, hq=8, hkv=2, q_off="early", kw=(("num_splits", 1), ("block_k", 16))),
    Case(tq=2, d=64, r=3, hq=8, hkv=2, per_q_head_b=True, dtype="bfloat16", kw=(("num_splits", 2),)),
    Case(tq=1, d=64, r=32, hq=4, hkv=2, kw=(("num_splits", 2), ("block_k", 16))),
], ids=str)
def test_triton_decode_lora_shapes(case):
  """The decode kernel's LoRA term == float64 where its LR tile is padded (rank 3 / 8
  to 32 columns), exact (rank 16 on a 64-wide head: min(32, 64)) or grows to the rank
  (32): with splits, with one split (the fused epilogue, also per-query-head B), with
  a row that sees no key, at head dims 64 / 96 / 128."""
  out, x = run(case, "triton")
  check(case, out, x)


def test_interpret_mode_poisons_outputs():
  """The poison premise of these tests: interpret mode starts outputs as NaN."""
  def kernel(x_ref, o_ref):
    @pl.when(pl.program_id(0) == 0)
    def _():
      o_ref[...] = x_ref[...]

  out = pl.pallas_call(kernel, grid=(2,), in_specs=[pl.BlockSpec((8,), lambda i: (i,))],
                       out_specs=pl.BlockSpec((8,), lambda i: (i,)),
                       out_shape=jax.ShapeDtypeStruct((16,), jnp.float32),
                       interpret=True)(jnp.ones((16,), jnp.float32))
  assert np.all(np.asarray(out[:8]) == 1.0) and np.all(np.isnan(np.asarray(out[8:])))


@pytest.mark.parametrize("backend", PALLAS + ("xla",))
@pytest.mark.parametrize("tq", [1, 24])
def test_stacked_cache_traced_layer_in_fori_loop(backend, tq):
  """[L, ...] caches, layer a traced int32 inside jit + fori_loop (decode and prefill)."""
  c = Case(tq=tq, layers=3, d=128, r=8, hq=8, hkv=2, s=128, dtype="bfloat16",
           kw=(("block_q", 16),) if tq > 1 else ())
  x = make_inputs(c)
  kw = dict(c.kw) if backend != "xla" else {}

  def f(x):
    def body(layer, acc):
      o = flash_lora_attention(x["q"], x["k"], x["v"], x["lr"], x["lora_b"],
                               lora_scale=x["lora_scale"], kv_lengths=x["kv_lengths"],
                               layer=layer, backend=backend, interpret=backend != "xla", **kw)
      return acc.at[layer].set(o.astype(jnp.float32))
    return lax.fori_loop(0, 3, body, jnp.zeros((3,) + x["q"].shape, jnp.float32))

  outs = np.asarray(compiled(f, x)(x))
  for layer in range(3):
    ref = np_reference(x["q"], x["k"], x["v"], x["lr"], x["lora_b"],
                       np.broadcast_to(np.asarray(x["lora_scale"])[:, None], (c.b, c.hq)),
                       np.asarray(x["kv_lengths"]), np.asarray(x["kv_lengths"]) - tq, True,
                       layer=layer)
    err = np.abs(outs[layer] - ref).max() / np.abs(ref).max()
    assert err < 1e-2, (layer, err)


@pytest.mark.parametrize("backend", PALLAS)
def test_naive_expansion_agrees_with_fused(backend):
  # per-query-head B and scale: the naive path must expand per query head
  c = Case(tq=1, d=64, r=8, hq=4, hkv=2, scale="head", per_q_head_b=True)
  x = make_inputs(c)
  fused, _ = run(c, backend, x)
  naive, _ = run(c, backend, x, fn=naive_lora_attention)
  ref = expected(c, x)
  np.testing.assert_allclose(np.asarray(naive), np.asarray(fused), atol=2e-5 * np.abs(ref).max())


def test_xla_reference_chunked_matches_float64():
  c = Case(tq=37, d=64, r=8, hq=8, hkv=2, per_q_head_b=True, q_off="early",
           kw=(("q_chunk", 8),))
  out, x = run(c, "xla")
  check(c, out, x)
  whole = compiled(lambda x: reference_attention(
      x["q"], x["k"], x["v"], x["lr"], x["lora_b"], lora_scale=x["lora_scale"],
      kv_lengths=x["kv_lengths"], q_offsets=x["q_offsets"]), x)(x)   # one chunk
  np.testing.assert_allclose(np.asarray(whole), np.asarray(out), atol=1e-5)


def test_lora_zero_b_equals_plain_attention():
  c = Case(tq=5, d=64, r=8)
  x = make_inputs(c)
  x0 = dict(x, lora_b=jnp.zeros_like(x["lora_b"]))
  with_zero, _ = run(c, "triton", x0)
  plain = flash_lora_attention(x["q"], x["k"], x["v"], kv_lengths=x["kv_lengths"],
                               q_offsets=x["q_offsets"], backend="xla")
  np.testing.assert_allclose(np.asarray(with_zero), np.asarray(plain), atol=1e-5)


# ----------------------------------------------------------------------------
# clear errors
# ----------------------------------------------------------------------------
def _x(**over):
  x = make_inputs(Case(tq=2, d=64, r=8, s=32))
  x.update(over)
  return x


@pytest.mark.parametrize("bad,match", [
    (dict(backend="cuda"), "backend must be one of"),
    (dict(k=jnp.zeros((2, 32, 3, 64))), "v_base must have the same shape"),
    (dict(q=jnp.zeros((2, 2, 8, 48))), "head_dim"),
    (dict(lr=jnp.zeros((2, 32, 65)), lora_b=jnp.zeros((2, 2, 65, 64))), "rank"),
    (dict(lora_b=jnp.zeros((2, 3, 8, 64))), "lora_b must have shape"),
    (dict(lora_b=None), "lr and lora_b must be given together"),
    (dict(lora_scale=jnp.ones((3,))), "lora_scale must be"),
    (dict(kv_lengths=jnp.ones((3,), jnp.int32)), "kv_lengths must have shape"),
    (dict(q=jnp.zeros((2, 2, 8, 64), jnp.int32)), "dtype"),
    (dict(layer=0), "layer was given"),
    (dict(block_q=100), "power of two"),
    (dict(tile=3), "unknown keyword"),
    (dict(lora_dot="mma"), "unknown keyword 'lora_dot'"),      # retired knobs
    (dict(lr_prefetch=True), "unknown keyword 'lr_prefetch'"),
    (dict(lr_width=32), "unknown keyword 'lr_width'"),
    (dict(num_warps=3), "num_warps must be one of"),
    (dict(num_splits=0), "num_splits must be a positive int"),
    (dict(kernel="fused"), "kernel must be one of"),
    (dict(backend="mosaic_tpu", block_k=40), "multiple of 16 for the mosaic_tpu backend"),
    (dict(sliding_window=0), "sliding_window must be a positive python int"),
    (dict(return_lse="yes"), "return_lse must be a python bool"),
])
def test_bad_arguments_raise_clear_errors(bad, match):
  x = _x()
  kw = dict(lora_scale=x["lora_scale"], kv_lengths=x["kv_lengths"], backend="triton",
            interpret=True)
  for key in ("q", "k", "lr", "lora_b"):
    if key in bad:
      x[key] = bad.pop(key)
  kw.update(bad)
  with pytest.raises(ValueError, match=match):
    flash_lora_attention(x["q"], x["k"], x["v"], x["lr"], x["lora_b"], **kw)


def test_kernel_limits_only_bind_the_pallas_backends():
  """Rank > 64, a head_dim that is not a multiple of 16 and mixed q / cache dtypes are
  the kernels' limits: backend 'xla' (the model's XLA attention) takes them (float64
  check for the first two)."""
  rng = np.random.default_rng(3)
  f = lambda *s: jnp.asarray(rng.standard_normal(s), jnp.float32)
  q, k, v, lr, lb = f(1, 3, 2, 8), f(1, 16, 1, 8), f(1, 16, 1, 8), f(1, 16, 80), f(1, 1, 80, 8)
  out = compiled(lambda *a: flash_lora_attention(*a, lora_scale=0.5, backend="xla"), q, k, v, lr, lb)(q, k, v, lr, lb)
  ref = np_reference(q, k, v, lr, lb, np.full((1, 2), 0.5), [16], [13], True)
  np.testing.assert_allclose(np.asarray(out), ref, rtol=1e-5, atol=1e-5)   # float32 math
  mixed = compiled(lambda *a: flash_lora_attention(*a, lora_scale=0.5, backend="xla"),
                   q.astype(jnp.bfloat16), k, v, lr, lb)(q.astype(jnp.bfloat16), k, v, lr, lb)
  assert mixed.dtype == jnp.bfloat16   # q's dtype; a model whose cache dtype differs runs on xla
  with pytest.raises(ValueError, match="must share one dtype for the Pallas kernels"):
    flash_lora_attention(q.astype(jnp.bfloat16), k, v, lr, lb, backend="triton", interpret=True)
  with pytest.raises(ValueError, match="head_dim must be a multiple of 16 in"):
    flash_lora_attention(q, k, v, lr, lb, backend="triton", interpret=True)
  with pytest.raises(ValueError, match=r"rank \(lr.shape\[-1\]\) must be in \[1, 64\]"):
    flash_lora_attention(f(1, 3, 2, 16), f(1, 16, 1, 16), f(1, 16, 1, 16), lr, f(1, 1, 80, 16),
                         backend="triton", interpret=True)


def test_sliding_window_reference_and_pallas_refusal():
  """sliding_window: the XLA reference masks keys at or before position - window (float64
  check, ragged rows, LoRA on); the Pallas backends refuse a window shorter than the cache
  and accept one that masks nothing."""
  c = Case(tq=5, d=64, r=8, s=32, q_off="early")
  x = make_inputs(c)
  args = (x["q"], x["k"], x["v"], x["lr"], x["lora_b"])
  kw = dict(lora_scale=x["lora_scale"], kv_lengths=x["kv_lengths"], q_offsets=x["q_offsets"])
  out = compiled(lambda a, kw: flash_lora_attention(*a, sliding_window=7, backend="xla", **kw), args, kw)(args, kw)
  scale = np.broadcast_to(np.asarray(x["lora_scale"], np.float64)[:, None], (c.b, c.hq))
  ref = np_reference(*args, scale, np.asarray(x["kv_lengths"]), np.asarray(x["q_offsets"]), True, window=7)
  assert np.abs(np.asarray(out) - ref).max() < 2e-5 * np.abs(ref).max()
  full = np_reference(*args, scale, np.asarray(x["kv_lengths"]), np.asarray(x["q_offsets"]), True)
  assert np.abs(full - ref).max() > 1e-2   # the window changed something
  with pytest.raises(NotImplementedError, match="no sliding window"):
    flash_lora_attention(*args, sliding_window=7, backend="triton", interpret=True, **kw)
  wide = compiled(lambda a, kw: flash_lora_attention(*a, sliding_window=32, backend="triton", interpret=True,
                                                     **kw), args, kw)(args, kw)
  assert np.abs(np.asarray(wide) - full).max() < 2e-5 * np.abs(full).max()


def test_stacked_cache_requires_layer():
  x = make_inputs(Case(tq=1, d=64, r=8, s=32, layers=2))
  with pytest.raises(ValueError, match="layer is required"):
    flash_lora_attention(x["q"], x["k"], x["v"], x["lr"], x["lora_b"], backend="xla")
  with pytest.raises(ValueError, match=r"layer must be in \[0, 2\)"):
    flash_lora_attention(x["q"], x["k"], x["v"], x["lr"], x["lora_b"], layer=2, backend="xla")


# ----------------------------------------------------------------------------
# slow sweep (not in CI): seeded random cases on both backends
# ----------------------------------------------------------------------------
def _random_cases(n, seed=1234):
  rng = np.random.default_rng(seed)
  cases = []
  for _ in range(n):
    hkv = int(rng.choice([1, 2, 4]))
    g = int(rng.choice([1, 4, 8]))
    tq = int(rng.choice([1, 2, 3, 16, 37, 64]))
    cases.append(Case(
        tq=tq, b=int(rng.choice([1, 3])), s=int(rng.choice([64, 128, 200, 384])),
        hq=hkv * g, hkv=hkv, d=int(rng.choice([64, 80, 96, 128, 256])),
        r=[None, 1, 8, 16, 64][int(rng.integers(5))],
        dtype=str(rng.choice(["float32", "bfloat16", "float16"])),
        per_q_head_b=bool(rng.integers(2)), scale=str(rng.choice(["scalar", "row", "head"])),
        kv=str(rng.choice(["full", "ragged", "empty_row"])),
        q_off=str(rng.choice(["default", "early"])), causal=bool(rng.integers(4) > 0),
        layers=[None, 2][int(rng.integers(2))],
        kw=(("block_k", int(rng.choice([32, 64]))),) + ((("num_splits", 2),) if tq <= 16 else
                                                         (("block_q", 16),))))
  return cases


@pytest.mark.slow
@pytest.mark.parametrize("backend", PALLAS)
@pytest.mark.parametrize("case", _random_cases(16), ids=str)
def test_random_sweep(case, backend):
  if case.kv == "empty_row" and case.b == 1:
    case = dataclasses.replace(case, kv="ragged")
  out, x = run(case, backend)
  check(case, out, x)


def test_triton_decode_splits_fill_one_wave(monkeypatch):
  """The default split count never launches more programs than the GPU holds at
  once (a partial second wave measured +22% on H200), keeps >= 1 split and two KV
  blocks per split; the shared-memory estimate reproduces ncu's figures (H200) and
  the LoRA tile's extra bytes drop the resident count when the SM cannot hold them."""
  from pallas_kernels.triton import tuning as tt

  monkeypatch.setattr(tt, "smem_per_block", lambda: 227 * 1024)  # Hopper, on any machine
  # ncu, H200 (bench/results/2026-11-28-s4-h200/call4 and call3): head dim 128, 16 q rows, bf16.
  assert tt.decode_smem(16, 64, 3, 128, 0, 2, 0) == 71_680
  assert tt.decode_smem(16, 64, 3, 128, 32, 2, 2) == 79_872
  assert tt.decode_smem(16, 128, 2, 128, 32, 2, 2) == 81_920
  for b in (1, 2, 3, 5, 8, 16, 31, 64):
    for kv in (16, 300, 4096, 131072):
      for per_sm in (1, 2):
        ns = tt.default_num_splits(b, 8, kv, 64, per_sm, sms=132)
        assert ns >= 1
        assert ns == 1 or b * 8 * ns <= per_sm * 132
        assert ns == 1 or ns <= -(-kv // 64) // 2
  assert tt.default_num_splits(8, 8, 32768, 64, 2, sms=132) == 4  # 256 programs of 264 slots
  assert tt.default_num_splits(1, 8, 32768, 64, 2, sms=132) == 33
  big = tt.decode_smem(16, 64, 3, 256, 64, 2, 2)  # head dim 256: one program per SM
  assert tt.resident_programs_per_sm(big, 4) == 1
  assert tt.resident_programs_per_sm(tt.decode_smem(16, 64, 3, 128, 32, 2, 2), 4) == 2
  assert tt.resident_programs_per_sm(1024, 8) == 1  # worst-case registers of 8 warps
  monkeypatch.setattr(tt, "smem_per_block", lambda: 99 * 1024)  # L4: one LoRA program per SM
  assert tt.resident_programs_per_sm(tt.decode_smem(16, 64, 3, 128, 32, 2, 2), 4) == 1


def test_triton_tuning_is_data_keyed_by_device_kind():
  """The measured defaults (H200) are the generic fallback; an unknown device kind gets
  them, and the decode LR tile is 32 wide for ranks <= 32, the rank above (capped at
  the padded head dim only from below 16)."""
  from pallas_kernels.triton import tuning as tt

  assert tt.device_tuning("NVIDIA H200") is tt.TUNING["generic"]
  assert tt.device_tuning("Some future GPU") is tt.TUNING["generic"]
  g = tt.TUNING["generic"]
  assert g["decode"] == dict(block_k=64, num_warps=4, num_stages=3)
  assert g["prefill_lora"] == dict(block_q=128, block_k=128, num_warps=8, num_stages=2)
  assert g["prefill_plain"] == dict(block_q=64, block_k=64, num_warps=4, num_stages=3)
  assert [tt.lr_tile_width(r, 128) for r in (1, 8, 16, 32, 64)] == [32, 32, 32, 32, 64]
  assert tt.lr_tile_width(8, 16) == 16   # head dim 16: the tile never exceeds it below 16


def test_triton_block_size_overrides_still_fit(monkeypatch):
  """A caller who sets only block_k gets a stage count that fits the block's shared
  memory (the defaults' 3 stages with block_k 256 would not); explicit stages are kept."""
  from pallas_kernels.triton import tuning as tt

  monkeypatch.setattr(tt, "smem_per_block", lambda: 227 * 1024)
  kw = dict(batch=1, tq=1, group=4, heads_kv=8, s_len=32768, d=128, r=8, itemsize=2, lr_itemsize=2)
  c = tt.DecodeBlockSizes(block_k=256).resolve(**kw)
  assert c.block_k == 256 and c.num_stages == 2
  assert tt.decode_smem(16, 256, c.num_stages, 128, 32, 2, 2) <= 227 * 1024
  assert tt.DecodeBlockSizes(block_k=256, num_stages=3).resolve(**kw).num_stages == 3
  assert tt.DecodeBlockSizes(num_splits=7).resolve(**kw).num_splits == 7
  with pytest.raises(ValueError, match="num_splits"):
    tt.DecodeBlockSizes(num_splits=0)
  assert tt.DecodeBlockSizes.get_default(**kw) == tt.DecodeBlockSizes().resolve(**kw)
  pk = dict(tq=8192, s_len=8192, d=128, itemsize=2)
  p = tt.PrefillBlockSizes(block_k=128).resolve(r=8, lr_itemsize=2, **pk)
  assert p.block_k == 128 and tt.prefill_smem(p.block_q, 128, p.num_stages, 128, 16, 2, 2) <= 227 * 1024
  p = tt.PrefillBlockSizes(block_k=128).resolve(r=0, lr_itemsize=0, **pk)
  assert p.num_stages == 3 and tt.prefill_smem(p.block_q, 128, 3, 128, 0, 2, 0) <= 227 * 1024
  with pytest.raises(dataclasses.FrozenInstanceError):
    p.block_k = 64


def _pallas_call_grids(f, *args):
  """name -> grid of every pallas_call in f's jaxpr."""
  grids = {}

  def walk(jaxpr):
    for eqn in jaxpr.eqns:
      if eqn.primitive.name == "pallas_call":
        gm = eqn.params["grid_mapping"]
        grids[str(eqn.params.get("name_and_src_info", eqn.params.get("name", "")))] = tuple(gm.grid)
      for sub in jax.extend.core.jaxprs_in_params(eqn.params):
        walk(sub)

  walk(jax.make_jaxpr(f)(*args).jaxpr)
  return grids


@pytest.mark.parametrize("lora", [True, False])
def test_triton_decode_launches_the_configured_splits(lora):
  """decode with num_splits None launches DecodeBlockSizes' default split count (the
  rule the benchmarks measured): the split pass's grid, read from the jaxpr."""
  from pallas_kernels.triton.tuning import DecodeBlockSizes

  rng = np.random.default_rng(1)
  b, s, hq, hkv, d, r = 2, 1024, 8, 2, 64, 8
  q, k, v = (jnp.asarray(rng.normal(size=sh), jnp.float32) for sh in ((b, 1, hq, d), (b, s, hkv, d), (b, s, hkv, d)))
  lr = jnp.asarray(rng.normal(size=(b, s, r)), jnp.float32) if lora else None
  lb = jnp.asarray(rng.normal(size=(b, hkv, r, d)), jnp.float32) if lora else None
  grids = _pallas_call_grids(
      lambda q, k, v, lr, lb: flash_lora_attention(q, k, v, lr, lb, backend="triton", interpret=True),
      q, k, v, lr, lb)
  want = DecodeBlockSizes.get_default(batch=b, tq=1, group=hq // hkv, heads_kv=hkv, s_len=s, d=d,
                                      r=r if lora else 0, itemsize=4, lr_itemsize=4 if lora else 0).num_splits
  split = [g for name, g in grids.items() if "flash_lora_decode_split" in name]
  assert want > 1 and split == [(want, b, hkv)], grids


def test_triton_prefill_defaults_per_variant(monkeypatch):
  """Prefill defaults: the measured fastest tiles per variant where they fit (LoRA
  128x128 / 2 stages / 8 warps, plain 64x64 / 3 / 4 on Hopper); on a card whose shared
  memory cannot hold them, tiles that fit its budget; Triton's own request for the
  failing tuner config (241,664 B, H200) is what the estimate gives."""
  from pallas_kernels.triton import tuning as tt

  assert tt.prefill_smem(128, 128, 3, 128, 16, 2, 2) == 241_664
  monkeypatch.setattr(tt, "smem_per_block", lambda: 227 * 1024)
  assert tt.prefill_defaults(128, 16, 2, 2, 8192, 8192) == dict(block_q=128, block_k=128, num_warps=8, num_stages=2)
  assert tt.prefill_defaults(128, 0, 2, 0, 8192, 8192) == dict(block_q=64, block_k=64, num_warps=4, num_stages=3)
  assert tt.PrefillBlockSizes.get_default(tq=8192, s_len=8192, d=128, r=8, itemsize=2, lr_itemsize=2) == \
      tt.PrefillBlockSizes(block_q=128, block_k=128, num_warps=8, num_stages=2)
  for per_block in (163 * 1024, 99 * 1024, 64 * 1024):  # A100, L4, T4
    monkeypatch.setattr(tt, "smem_per_block", lambda pb=per_block: pb)
    for dp, rp in ((64, 16), (128, 16), (128, 0), (256, 16), (256, 0)):
      c = tt.prefill_defaults(dp, rp, 2, 2 if rp else 0, 4096, 4096)
      assert tt.prefill_smem(c["block_q"], c["block_k"], c["num_stages"], dp, rp, 2, 2) <= per_block, (per_block, dp, rp, c)


def test_mosaic_block_sizes_defaults_and_checks():
  """TPU block sizes: generic defaults 128 / 512, given values kept, multiples of 16 only."""
  from pallas_kernels.tpu import tuning as tpt

  assert tpt.PrefillBlockSizes.get_default() == tpt.PrefillBlockSizes(block_q=128, block_k=512)
  assert tpt.PrefillBlockSizes(block_k=256).resolve() == tpt.PrefillBlockSizes(block_q=128, block_k=256)
  assert tpt.DecodeBlockSizes(num_splits=3).resolve() == tpt.DecodeBlockSizes(block_k=512, num_splits=3)
  with pytest.raises(ValueError, match="multiple of 16 for the mosaic_tpu backend"):
    tpt.DecodeBlockSizes(block_k=100)


def test_auto_backend_falls_back_to_xla_when_jax_drops_triton(monkeypatch):
  """When a JAX release removes Pallas Triton, "auto" on a GPU runs the XLA path (with a warning)."""
  import importlib
  fla = importlib.import_module("pallas_kernels.flash_lora_attention")  # the module, not the function
  monkeypatch.setattr(fla.jax, "default_backend", lambda: "gpu")
  monkeypatch.setattr(fla, "mosaic_gpu_available", lambda: False)   # a non-Hopper GPU
  assert fla.resolve_backend("auto") == ("triton" if fla.triton_available() else "xla")
  monkeypatch.setattr(fla, "triton_available", lambda: False)
  with pytest.warns(UserWarning, match="no Pallas Triton backend"):
    assert fla.resolve_backend("auto") == "xla"
