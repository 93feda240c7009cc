"""The XLA backend reads only the visible key chunks (pallas_kernels/xla_chunked.py).

Numerics against the float64 numpy reference of test_kernels (tolerance 2e-5 of max
|reference| for float32 caches, as there: float32 math, the observed error is ~4e-7;
1e-2 for bfloat16 caches) and against the dense float32 reference (reference.py), over
ragged kv_lengths, q_offsets, GQA, sliding windows, rank none / 8, per-query-head B,
stacked caches with a traced layer, query chunks, and key lengths at the chunk
boundaries (1, chunk, chunk + 1). That the loop stops at the visible keys is asserted
without timing: cache slots in chunks past the visible range (and, with a window,
before it) hold NaN, and since 0 * NaN = NaN any read of them would poison the output
(the dense reference, which reads every slot, does come out NaN).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import flash_lora_attention, reference_attention
from pallas_kernels.xla_chunked import KV_CHUNK, key_range, num_kv_chunks
from test_kernels import np_reference

CHUNK = 32  # kv_chunk of these tests: small, so short caches span several chunks


def make(b=2, tq=1, s=160, hq=8, hkv=2, d=32, r=8, layers=None, per_q_head_b=False, dtype=jnp.float32, seed=0):
  rng = np.random.default_rng(seed)
  lead = (layers,) if layers else ()
  normal = lambda shape, sd=1.0: jnp.asarray((sd * rng.standard_normal(shape)).astype(np.float32)).astype(dtype)
  x = dict(q=normal((b, tq, hq, d)), k=normal(lead + (b, s, hkv, d)), v=normal(lead + (b, s, hkv, d)),
           lr=None, lora_b=None, lora_scale=1.0)
  if r:
    x.update(lr=normal(lead + (b, s, r)), lora_b=normal((b, hq if per_q_head_b else hkv, r, d), 0.3),
             lora_scale=jnp.asarray(rng.uniform(0.25, 2.0, (b, hq)), jnp.float32))
  return x


def attend(x, kv, qo, *, layer=None, causal=True, window=None, fn=flash_lora_attention, **kw):
  f = lambda x, kv, qo, layer: fn(x["q"], x["k"], x["v"], x["lr"], x["lora_b"], lora_scale=x["lora_scale"],
                                  kv_lengths=kv, q_offsets=qo, causal=causal, layer=layer,
                                  sliding_window=window, **kw)
  return np.asarray(jax.jit(f)(x, jnp.asarray(kv, jnp.int32), jnp.asarray(qo, jnp.int32), layer), np.float64)


def expected(x, kv, qo, *, layer=None, causal=True, window=None):
  hq = x["q"].shape[2]
  scale = np.broadcast_to(np.asarray(x["lora_scale"], np.float64), (x["q"].shape[0], hq))
  return np_reference(x["q"], x["k"], x["v"], x["lr"], x["lora_b"], scale, np.asarray(kv), np.asarray(qo),
                      causal, layer=layer, window=window)


def rel_err(out, ref):
  assert not np.isnan(out).any()
  return np.abs(out - ref).max() / max(np.abs(ref).max(), 1e-6)


# (name, make() kwargs, kv_lengths, q_offsets (None: kv - tq), attend kwargs)
CASES = [
    ("decode_ragged_lengths_at_chunk_edges", dict(b=4), [1, CHUNK, CHUNK + 1, 150], None, {}),
    ("decode_no_lora_gqa_4to1", dict(b=3, r=0), [CHUNK, 3 * CHUNK + 5, 0], None, {}),
    ("decode_full_cache_last_chunk_clamped", dict(b=2, s=150), [150, 97], None, {}),
    ("prefill_query_chunks", dict(tq=37, s=200), [200, 120], [163, 70], dict(q_chunk=8)),
    ("prefill_per_q_head_b_early_offsets", dict(tq=20, per_q_head_b=True), [160, 90], [100, 40], {}),
    ("sliding_window_decode", dict(b=2), [150, 70], None, dict(window=40)),
    ("sliding_window_prefill", dict(tq=24, s=200), [200, 130], None, dict(window=33, q_chunk=8)),
    ("non_causal_prefix", dict(tq=5), [97, 1], [0, 0], dict(causal=False)),
    ("queries_before_every_key", dict(tq=3), [64, 64], [-10, 61], {}),
    ("stacked_cache_traced_layer", dict(layers=3), [CHUNK + 1, 140], None, dict(layer=2)),
]


@pytest.mark.parametrize("name,mk,kv,qo,kw", CASES, ids=[c[0] for c in CASES])
def test_chunked_matches_float64_and_dense_reference(name, mk, kv, qo, kw):
  x = make(**mk)
  qo = np.asarray(kv) - x["q"].shape[1] if qo is None else qo
  kw = dict(kw)
  layer = kw.pop("layer", None)
  causal, window = kw.pop("causal", True), kw.pop("window", None)
  ref = expected(x, kv, qo, layer=layer, causal=causal, window=window)
  out = attend(x, kv, qo, layer=layer, causal=causal, window=window, backend="xla", kv_chunk=CHUNK, **kw)
  assert rel_err(out, ref) < 2e-5, name
  dense = attend(x, kv, qo, layer=layer, causal=causal, window=window, fn=reference_attention)
  np.testing.assert_allclose(out, dense, atol=1e-5 * np.abs(ref).max())


def test_default_chunk_and_bfloat16_cache():
  x = make(b=2, s=KV_CHUNK + 128, tq=2, dtype=jnp.bfloat16)
  kv, qo = [KV_CHUNK + 1, KV_CHUNK], [KV_CHUNK - 1, KV_CHUNK - 2]
  out = attend(x, kv, qo, backend="xla")
  assert rel_err(out, expected(x, kv, qo)) < 1e-2


def test_lse_matches_float64():
  x = make(b=3, tq=4)
  kv, qo = [1, 70, 160], [-3, 66, 156]          # row 0 sees no key at all: lse -inf, output 0
  f = jax.jit(lambda x: flash_lora_attention(x["q"], x["k"], x["v"], x["lr"], x["lora_b"],
                                             lora_scale=x["lora_scale"], kv_lengths=jnp.asarray(kv),
                                             q_offsets=jnp.asarray(qo), backend="xla", kv_chunk=CHUNK,
                                             return_lse=True))
  out, lse = f(x)
  q, k = np.asarray(x["q"], np.float64), np.asarray(x["k"], np.float64)
  hkv = k.shape[2]
  g = q.shape[2] // hkv
  for b in range(3):
    for t in range(4):
      visible = min(kv[b], qo[b] + t + 1)
      for h in range(q.shape[2]):
        if visible <= 0:
          assert lse[b, t, h] == -np.inf and not np.asarray(out[b, t, h]).any()
          continue
        s = k[b, :visible, h // g] @ q[b, t, h] / np.sqrt(q.shape[-1])
        want = s.max() + np.log(np.exp(s - s.max()).sum())
        assert abs(float(lse[b, t, h]) - want) < 1e-4 * max(1.0, abs(want))


@pytest.mark.parametrize("window", [None, 40])
@pytest.mark.parametrize("tq", [1, 12])
def test_chunks_outside_the_visible_range_are_never_read(tq, window):
  s, b = 8 * CHUNK, 2
  x = make(b=b, s=s, tq=tq)
  kv = np.array([6 * CHUNK + 7, 5 * CHUNK])
  qo = kv - tq
  # First and last visible chunk of the batch (the loop covers the union of the rows' ranges).
  hi = int(kv.max())
  lo = 0 if window is None else int((qo.min() - window + 1) // CHUNK * CHUNK)
  end = -(-hi // CHUNK) * CHUNK
  poison = np.zeros((s,), bool)
  poison[end:] = True
  poison[:lo] = True
  assert poison[end:].any() and (window is None or lo > 0)
  nan = lambda a: jnp.where(jnp.asarray(poison)[None, :, None, None] if a.ndim == 4
                            else jnp.asarray(poison)[None, :, None], jnp.nan, a)
  xp = dict(x, k=nan(x["k"]), v=nan(x["v"]), lr=nan(x["lr"]))
  out = attend(xp, kv, qo, window=window, backend="xla", kv_chunk=CHUNK)
  ref = expected(x, kv, qo, window=window)
  assert rel_err(out, ref) < 2e-5
  # The dense reference reads every slot: the poison shows (so the test can fail).
  assert np.isnan(attend(xp, kv, qo, window=window, fn=reference_attention)).any()


def test_loop_trip_count_is_the_visible_chunks():
  # key_range / num_kv_chunks set the loop's trip count (xla_chunked._attend_q_chunk).
  kv, qo = jnp.asarray([200, 3]), jnp.asarray([199, 2])
  lo, hi = key_range(kv, qo, 0, 1, causal=True, sliding_window=None, capacity=131072)
  assert (int(lo), int(hi)) == (0, 200)
  assert int(num_kv_chunks(lo, hi, 512)[1]) == 1
  assert int(num_kv_chunks(lo, hi, 64)[1]) == 4
  lo, hi = key_range(kv, qo, 0, 1, causal=True, sliding_window=50, capacity=131072)
  assert (int(lo), int(hi)) == (0, 200)      # row 1's window starts at 0
  lo, hi = key_range(jnp.asarray([200]), jnp.asarray([199]), 0, 1, causal=True, sliding_window=50, capacity=4096)
  assert (int(lo), int(hi)) == (150, 200)
  start, n = num_kv_chunks(lo, hi, 64)
  assert (int(start), int(n)) == (128, 2)
  lo, hi = key_range(jnp.asarray([0]), jnp.asarray([0]), 0, 1, causal=True, sliding_window=None, capacity=64)
  assert int(num_kv_chunks(lo, hi, 64)[1]) == 0


def test_gradient_is_the_dense_references():
  x = make(b=2, tq=6, s=96)
  kv, qo = jnp.asarray([96, 50]), jnp.asarray([90, 44])

  def loss(fn, q, k, v, lr, lb, **kw):
    o = fn(q, k, v, lr, lb, lora_scale=x["lora_scale"], kv_lengths=kv, q_offsets=qo, **kw)
    return jnp.sum(jnp.sin(o))

  args = (x["q"], x["k"], x["v"], x["lr"], x["lora_b"])
  got = jax.grad(lambda *a: loss(flash_lora_attention, *a, backend="xla", kv_chunk=CHUNK), argnums=range(5))(*args)
  want = jax.grad(lambda *a: loss(reference_attention, *a), argnums=range(5))(*args)
  for g, w in zip(got, want):
    assert np.abs(np.asarray(w)).max() > 0
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=1e-5 * np.abs(np.asarray(w)).max())


@pytest.mark.parametrize("bad", [0, -1, 2.5, True])
def test_bad_kv_chunk_is_one_clear_error(bad):
  x = make(b=1, s=64)
  with pytest.raises(ValueError, match="kv_chunk must be a positive int"):
    flash_lora_attention(x["q"], x["k"], x["v"], backend="xla", kv_chunk=bad)
