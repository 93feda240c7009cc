"""return_lse and merge_partials: attention over disjoint key ranges, merged.

Every backend (xla, and triton / mosaic_tpu in interpret mode) and both
kernels (prefill; split-K decode with the merge kernel, and the one-split
decode that finishes rows itself) against a float64 numpy reference:

* lse = m + log(sum_j exp(s_j - m)) over the visible keys, -inf (and output 0)
  for rows that see no key; LoRA on / off; GQA and MQA; ragged kv_lengths;
  q_offsets before the end and before every key;
* keys split into [0, T0) (same cache, kv_lengths clipped) and [T0, S) (a
  sliced cache, kv_lengths and q_offsets shifted by T0), merged with
  merge_partials == one call over all keys;
* concurrent agents: N = 3 agents' decode queries stacked as extra query heads
  over one shared prefix (per-query-head lora_b / lora_scale) == N separate
  calls; merged with each agent's own suffix == attention over prefix + suffix.

Interpret mode starts outputs as NaN (tests/test_kernels.py pins that), so a
finite (or exactly -inf where expected) lse proves every element was written.
"""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import (flash_lora_attention, merge_attention, merge_partials,
                            split_query_heads, stack_query_heads)
from test_kernels import compiled

BACKENDS = ("xla", "triton", "mosaic_tpu")
OUT_TOL = 2e-5      # relative to max |ref| (float32 inputs)
LSE_ATOL = 2e-5


# ----------------------------------------------------------------------------
# float64 reference with an explicit [B, Tq, S] visibility mask
# ----------------------------------------------------------------------------
def f64(x):
  return None if x is None else np.asarray(jnp.asarray(x).astype(jnp.float32), np.float64)


def visible(kv_len, q_off, tq, s, causal=True):
  cols = np.arange(s)[None, None, :]
  ok = cols < np.asarray(kv_len)[:, None, None]
  if causal:
    ok = ok & (cols <= np.asarray(q_off)[:, None, None] + np.arange(tq)[None, :, None])
  return np.broadcast_to(ok, (len(kv_len), tq, s))


def np_attend(q, k, v, lr, lora_b, scale, valid, sm_scale=None):
  """out [B,Tq,Hq,D], lse [B,Tq,Hq] (float64); scale [B,Hq]; lora_b [B,Hkv|Hq,R,D]."""
  q, k, v, lr, lora_b = map(f64, (q, k, v, lr, lora_b))
  b, tq, hq, d = q.shape
  hkv = k.shape[2]
  g = hq // hkv
  sm_scale = 1.0 / np.sqrt(d) if sm_scale is None else sm_scale
  sc = np.einsum("bthgd,bshd->bthgs", q.reshape(b, tq, hkv, g, d), k) * sm_scale
  vis = valid[:, :, None, None, :]
  sc = np.where(vis, sc, -np.inf)
  m = sc.max(-1)
  m0 = np.where(np.isfinite(m), m, 0.0)
  p = np.where(vis, np.exp(sc - m0[..., None]), 0.0)
  l = p.sum(-1)
  with np.errstate(divide="ignore"):
    lse = np.where(l > 0, m0 + np.log(np.where(l > 0, l, 1.0)), -np.inf)
  p = p / np.where(l > 0, l, 1.0)[..., None]
  o = np.einsum("bthgs,bshd->bthgd", p, v)
  if lr is not None:
    bm = lora_b if lora_b.shape[1] == hq else np.repeat(lora_b, g, axis=1)
    lo = np.einsum("bthgr,bhgrd->bthgd", np.einsum("bthgs,bsr->bthgr", p, lr),
                   bm.reshape(b, hkv, g, *bm.shape[2:]))
    o = o + np.asarray(scale, np.float64).reshape(b, 1, hkv, g, 1) * lo
  return o.reshape(b, tq, hq, d), lse.reshape(b, tq, hq)


def check(out, lse, ref_out, ref_lse, what=""):
  out = f64(out)
  lse = np.asarray(lse)
  assert lse.dtype == np.float32 and lse.shape == ref_lse.shape, (lse.dtype, lse.shape)
  assert not np.isnan(out).any() and not np.isnan(lse).any(), f"{what}: NaN (unwritten element)"
  fin = np.isfinite(ref_lse)
  np.testing.assert_array_equal(np.isneginf(lse), ~fin, err_msg=f"{what}: -inf rows")
  np.testing.assert_allclose(lse[fin], ref_lse[fin], rtol=1e-6, atol=LSE_ATOL, err_msg=what)
  assert np.all(out[~fin] == 0.0), f"{what}: rows that see no key must be exactly 0"
  err = np.abs(out - ref_out).max() / max(np.abs(ref_out).max(), 1e-6)
  assert err < OUT_TOL, f"{what}: out max rel error {err:.3e}"


def attn_fn(backend, **kw):
  """jit-compiled flash_lora_attention(return_lse=True) over a dict of inputs."""
  if backend == "xla":
    kw = {}

  def f(x):
    return flash_lora_attention(
        x["q"], x["k"], x["v"], x.get("lr"), x.get("lora_b"), lora_scale=x.get("scale", 1.0),
        kv_lengths=x["kv"], q_offsets=x["qo"], backend=backend, interpret=backend != "xla", return_lse=True, **kw)

  cache = {}

  def call(x):   # one compile per input signature (kv / qo values are runtime data)
    shapes = tuple((k, tuple(np.shape(v)), str(jnp.asarray(v).dtype)) for k, v in sorted(x.items()))
    if shapes not in cache:
      cache[shapes] = compiled(f, x)
    return cache[shapes](x)

  return call


def normal(rng, shape, sd=1.0):
  return jnp.asarray((sd * rng.standard_normal(shape)).astype(np.float32))


# ----------------------------------------------------------------------------
# prefill: lse vs float64, and keys [0, T0) + [T0, S) merged == all keys
# ----------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_prefill_lse_and_key_split_merge(backend):
  rng = np.random.default_rng(0)
  b, tq, hq, hkv, d, r, s, t0 = 2, 20, 8, 2, 64, 8, 256, 128
  x = dict(q=normal(rng, (b, tq, hq, d)), k=normal(rng, (b, s, hkv, d)),
           v=normal(rng, (b, s, hkv, d)), lr=normal(rng, (b, s, r)),
           lora_b=normal(rng, (b, hq, r, d), 0.3),              # per query head B
           scale=jnp.asarray(rng.uniform(0.25, 2.0, (b, hq)), jnp.float32))
  # row 0: 100 keys (none past T0), query rows 0..9 before every key -> -inf, 0;
  # row 1: all keys, queries 5 before the end.
  kv = np.array([100, s], np.int32)
  qo = np.array([-10, s - tq - 5], np.int32)
  run = attn_fn(backend, block_q=16, block_k=32) if backend == "triton" else \
      attn_fn(backend, block_q=16)

  full = run(dict(x, kv=jnp.asarray(kv), qo=jnp.asarray(qo)))
  ref_out, ref_lse = np_attend(x["q"], x["k"], x["v"], x["lr"], x["lora_b"], x["scale"],
                               visible(kv, qo, tq, s))
  assert np.isneginf(ref_lse[0, :10]).all() and np.isfinite(ref_lse[0, 10:]).all()
  check(*full, ref_out, ref_lse, "full")

  # keys [0, T0): the same cache (same compiled program), kv_lengths clipped
  part1 = run(dict(x, kv=jnp.asarray(np.minimum(kv, t0)), qo=jnp.asarray(qo)))
  # keys [T0, S): the sliced cache, kv_lengths and q_offsets shifted
  sl = lambda a: a[:, t0:]
  part2 = run(dict(x, k=sl(x["k"]), v=sl(x["v"]), lr=sl(x["lr"]),
                   kv=jnp.asarray(np.maximum(kv - t0, 0)), qo=jnp.asarray(qo - t0)))
  assert np.isneginf(np.asarray(part2[1])[0]).all(), "row 0 sees no key past T0"
  out, lse = merge_partials([part1[0], part2[0]], [part1[1], part2[1]])
  assert out.dtype == x["q"].dtype and lse.dtype == jnp.float32
  check(out, lse, ref_out, ref_lse, "merged")
  np.testing.assert_allclose(np.asarray(out), np.asarray(full[0]),
                             atol=OUT_TOL * np.abs(ref_out).max())


# ----------------------------------------------------------------------------
# decode: N agents stacked over a shared prefix, merged with their suffixes
# ----------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_decode_stacked_agents_prefix_suffix_merge(backend):
  rng = np.random.default_rng(1)
  n_ag, b, hq, hkv, d, r = 3, 2, 4, 2, 64, 8
  p_len, s_len = 256, 32                      # shared prefix cache, per-agent suffix cache
  g = hq // hkv
  prefix = dict(k=normal(rng, (b, p_len, hkv, d)), v=normal(rng, (b, p_len, hkv, d)),
                lr=normal(rng, (b, p_len, r)))          # shared A: one LR cache for all
  plen = np.array([200, 256], np.int32)                  # ragged prefix lengths
  suf_len = np.array([[5, 32], [17, 0], [32, 1]], np.int32)   # [agent, row]; 0: empty suffix
  agents = [dict(q=normal(rng, (b, 1, hq, d)), lora_b=normal(rng, (b, hkv, r, d), 0.3),
                 scale=jnp.asarray(rng.uniform(0.25, 2.0, (b,)), jnp.float32),
                 k=normal(rng, (b, s_len, hkv, d)), v=normal(rng, (b, s_len, hkv, d)),
                 lr=normal(rng, (b, s_len, r))) for _ in range(n_ag)]

  if backend == "triton":     # prefix: split-K + merge kernel; suffix: one-split decode
    run_prefix, run_suffix = attn_fn(backend, num_splits=3, block_k=32), \
        attn_fn(backend, num_splits=1, block_k=16)
  else:                       # mosaic: 2 splits of 128 keys on the prefix
    run_prefix, run_suffix = attn_fn(backend, num_splits=2, block_k=128), attn_fn(backend)

  # prefix, all agents in one call: queries stacked as extra query heads of each
  # KV head, each agent's B expanded per query head, scales per query head.
  per_head_b = [jnp.repeat(a["lora_b"], g, axis=1) for a in agents]          # [B, Hq, r, D]
  per_head_s = [jnp.broadcast_to(a["scale"][:, None], (b, hq)) for a in agents]
  stacked = dict(prefix, q=stack_query_heads([a["q"] for a in agents], hkv),
                 lora_b=stack_query_heads(per_head_b, hkv, axis=1),
                 scale=stack_query_heads(per_head_s, hkv, axis=1),
                 kv=jnp.asarray(plen), qo=jnp.asarray(plen))   # queries after the prefix
  assert stacked["q"].shape == (b, 1, n_ag * hq, d)
  assert stacked["lora_b"].shape == (b, n_ag * hq, r, d)
  out_st, lse_st = run_prefix(stacked)
  outs_p = split_query_heads(out_st, n_ag, hkv)
  lses_p = split_query_heads(lse_st, n_ag, hkv)

  for n, a in enumerate(agents):
    # stacked == a separate prefix call of agent n
    sep = run_prefix(dict(prefix, q=a["q"], lora_b=a["lora_b"], scale=a["scale"],
                          kv=jnp.asarray(plen), qo=jnp.asarray(plen)))
    ref_out, ref_lse = np_attend(a["q"], prefix["k"], prefix["v"], prefix["lr"], a["lora_b"],
                                 np.broadcast_to(np.asarray(a["scale"])[:, None], (b, hq)),
                                 visible(plen, plen, 1, p_len))
    check(*sep, ref_out, ref_lse, f"agent {n} prefix, separate")
    check(outs_p[n], lses_p[n], ref_out, ref_lse, f"agent {n} prefix, stacked")
    np.testing.assert_allclose(np.asarray(outs_p[n]), np.asarray(sep[0]),
                               atol=OUT_TOL * np.abs(ref_out).max())
    np.testing.assert_allclose(np.asarray(lses_p[n]), np.asarray(sep[1]), atol=LSE_ATOL)

    # the agent's own suffix (its query is its last token: causal, default q_offsets)
    kv_s = suf_len[n]
    suf = run_suffix(dict(q=a["q"], k=a["k"], v=a["v"], lr=a["lr"], lora_b=a["lora_b"],
                          scale=a["scale"], kv=jnp.asarray(kv_s), qo=jnp.asarray(kv_s - 1)))
    out, lse = merge_attention(outs_p[n], lses_p[n], suf[0], suf[1])

    # reference: one attention over [prefix[:plen], suffix[:suf_len]]
    cat = lambda pa, sa: jnp.concatenate([pa, sa], axis=1)
    cols = np.arange(p_len + s_len)[None, None, :]
    vis = (cols < plen[:, None, None]) | ((cols >= p_len) & (cols - p_len < kv_s[:, None, None]))
    ref_out, ref_lse = np_attend(a["q"], cat(prefix["k"], a["k"]), cat(prefix["v"], a["v"]),
                                 cat(prefix["lr"], a["lr"]), a["lora_b"],
                                 np.broadcast_to(np.asarray(a["scale"])[:, None], (b, hq)), vis)
    check(out, lse, ref_out, ref_lse, f"agent {n} prefix + suffix")


# ----------------------------------------------------------------------------
# decode without LoRA: MQA, a row with no keys; out identical to return_lse=False
# ----------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_decode_lse_no_lora_empty_row(backend):
  rng = np.random.default_rng(2)
  b, tq, hq, hkv, d, s = 3, 4, 4, 1, 128, 128
  x = dict(q=normal(rng, (b, tq, hq, d)), k=normal(rng, (b, s, hkv, d)),
           v=normal(rng, (b, s, hkv, d)))
  kv = np.array([91, 0, s], np.int32)               # row 1 has no keys at all
  qo = np.array([91 - tq, -tq, s - tq - 7], np.int32)
  kw = dict(num_splits=2, block_k=32) if backend == "triton" else {}
  xx = dict(x, kv=jnp.asarray(kv), qo=jnp.asarray(qo))
  out, lse = attn_fn(backend, **kw)(xx)
  ref_out, ref_lse = np_attend(x["q"], x["k"], x["v"], None, None, None, visible(kv, qo, tq, s))
  assert np.isneginf(ref_lse[1]).all()
  check(out, lse, ref_out, ref_lse, "decode no LoRA")
  if backend != "mosaic_tpu":   # the default path is a separate (unchanged) program
    plain = compiled(lambda x: flash_lora_attention(
        x["q"], x["k"], x["v"], kv_lengths=x["kv"], q_offsets=x["qo"], backend=backend,
        interpret=backend != "xla", **(kw if backend != "xla" else {})), xx)(xx)
    np.testing.assert_array_equal(np.asarray(plain), np.asarray(out))


# ----------------------------------------------------------------------------
# merge_partials / stacking helpers (pure jnp)
# ----------------------------------------------------------------------------
def test_merge_partials_inf_parts_dtype_and_logaddexp():
  rng = np.random.default_rng(3)
  o = [jnp.asarray(rng.standard_normal((2, 3, 4, 8)), jnp.bfloat16) for _ in range(3)]
  l = [jnp.asarray(rng.standard_normal((2, 3, 4)) * 3, jnp.float32) for _ in range(3)]
  l[1] = l[1].at[0].set(-jnp.inf)                            # part 1 empty in row 0
  o[1] = o[1].at[0].set(jnp.nan)                             # ... whatever it holds
  for i in range(3):
    l[i] = l[i].at[1, 0].set(-jnp.inf)                       # (1, 0): every part empty
  out, lse = merge_partials(o, l)
  assert out.dtype == jnp.bfloat16 and lse.dtype == jnp.float32
  ls = np.stack([np.asarray(x, np.float64) for x in l])
  with np.errstate(invalid="ignore"):
    want_lse = np.logaddexp.reduce(ls, axis=0)
  np.testing.assert_allclose(np.asarray(lse), want_lse, rtol=1e-6, atol=1e-6)
  assert np.isneginf(np.asarray(lse)[1, 0]).all()
  with np.errstate(invalid="ignore"):
    w = np.nan_to_num(np.exp(ls - want_lse), nan=0.0)
  on = np.stack([np.nan_to_num(np.asarray(x.astype(jnp.float32), np.float64)) for x in o])
  want = (w[..., None] * on).sum(0)
  got = np.asarray(out.astype(jnp.float32))
  assert not np.isnan(got).any()
  np.testing.assert_allclose(got, want, atol=2e-2)           # bf16 output rounding
  assert np.all(got[1, 0] == 0.0)
  # two-part form, and a single part is the identity
  o2, l2 = merge_attention(o[0], l[0], o[2], l[2])
  o2b, l2b = merge_partials([o[0], o[2]], [l[0], l[2]])
  np.testing.assert_array_equal(np.asarray(o2.astype(jnp.float32)), np.asarray(o2b.astype(jnp.float32)))
  np.testing.assert_array_equal(np.asarray(l2), np.asarray(l2b))
  o1, l1 = merge_partials([o[0]], [l[0]])
  np.testing.assert_array_equal(np.asarray(l1), np.asarray(l[0]))
  with pytest.raises(ValueError, match="as many lses"):
    merge_partials(o, l[:2])
  with pytest.raises(ValueError, match="shape"):
    merge_partials([o[0]], [l[0][..., :2]])


def test_stack_query_heads_layout_and_roundtrip():
  hkv, g, n = 2, 3, 4
  xs = [jnp.arange(hkv * g)[None, None, :, None] + 100 * i for i in range(n)]   # [1,1,Hq,1]
  st = stack_query_heads(xs, hkv)
  # stacked head j belongs to KV head j // (n * g): the first n*g heads are KV head 0's
  heads = np.asarray(st)[0, 0, :, 0]
  assert list(heads[: n * g]) == [100 * i + h for i in range(n) for h in range(g)]
  back = split_query_heads(st, n, hkv)
  for a, bk in zip(xs, back):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(bk))
  sc = [jnp.full((2, hkv * g), float(i)) for i in range(n)]
  np.testing.assert_array_equal(np.asarray(split_query_heads(stack_query_heads(sc, hkv, axis=1),
                                                             n, hkv, axis=1)[2]), np.asarray(sc[2]))
