#!/usr/bin/env python
"""Benchmark the Flash-LoRA-Attention Triton kernels against floors and baselines.

One run measures, on the same device:
  * floors: device copy bandwidth (elementwise read+write of 2 GiB) and the
    bf16 matmul rate (8192^3);
  * decode (split-K kernel): batch 1 and 8, kv_len 4k..128k, 32 query heads,
    8 KV heads, head_dim 128, rank 8, bf16 -- our kernel with and without the
    LoRA term, the naive expansion (V = V_base + s LR B, then our plain
    kernel) and jax.experimental.pallas.ops.gpu.decode_attention.gqa;
    reported as bytes (K + V_base + LR + q + out) / time and as a fraction
    of the copy bandwidth;
  * prefill (causal): q_len = kv_len 1k..32k and a 4k chunk after a 28k
    prefix -- ours with / without LoRA, naive, and ops.gpu.attention.mha
    (plain MHA on K/V repeated to 32 heads, no q offset so not for the chunk);
    reported as TFLOP/s (4 * heads * head_dim * visible (query, key) pairs,
    i.e. the causal triangle counted exactly) and as a fraction of the matmul
    rate.

Timing: every method runs inside ONE jitted executable that calls it many
times (up to 64, >= 2 ms of work) over rotated copies of the inputs (distinct
buffers, more than 4x the L2 in total where memory allows; every call has its
own q buffer so XLA cannot merge calls) so neither L2 hits nor Python dispatch
flatter or penalise small shapes; warm-up, then the median over samples of 3
back-to-back executions, divided by the number of calls.

--check first compares the Triton kernels with the float32 XLA reference at a
few shapes and prints PASS/FAIL. --tune (default on a GPU) picks block sizes
from a handful of configurations before the sweep.

GPU:  python -m bench.kernels --check
CPU:  python -m bench.kernels --quick --check   (interpret mode, tiny shapes)
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import os
import sys
import time
import traceback

import numpy as np

import jax
import jax.numpy as jnp

from bench.common import parse_lens, results_dir
from pallas_kernels import flash_lora_attention, naive_lora_attention, reference_attention
from pallas_kernels.triton import tuning as triton_tuning

L2_BYTES = 50 * 2**20          # H100: 50 MiB
ROTATE_TARGET = 4 * L2_BYTES   # rotated inputs span at least this much
MIN_EXEC_SECONDS = 2e-3        # each timed executable runs at least this long
PIPELINE = 3                   # executions dispatched back to back per timing sample


# ----------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------
def fmt_len(n):
  return f"{n // 1024}k" if n % 1024 == 0 and n >= 1024 else str(n)


class Timer:
  """Median time per call of fn(*inputs) with rotated inputs, in one executable.

  The executable calls fn ``calls`` times, cycling through the rotated input
  tuples; each call gets its OWN copy of the first argument (q), so XLA can
  never merge identical calls (CSE) and the count stays honest. ``est_s``
  (expected seconds per call) sizes the executable to run >= MIN_EXEC_SECONDS
  so Python dispatch is amortised, with a single compilation.
  """

  def __init__(self, reps, max_calls=64):
    self.reps = reps
    self.max_calls = max_calls

  def __call__(self, fn, rotations, calls=None, est_s=None):
    n_rot = len(rotations)
    if calls is None:
      want = math.ceil(MIN_EXEC_SECONDS / est_s) if est_s else n_rot
      calls = max(n_rot, min(self.max_calls, (want // n_rot + (want % n_rot > 0)) * n_rot))
    firsts = [jnp.copy(rotations[i % n_rot][0]) for i in range(calls)]
    rests = [r[1:] for r in rotations]
    # Inner jit: JAX lowers fn ONCE as a shared private function (with JAX >
    # 0.10.2 every lowered pallas_call compiles its Triton kernel; 64 inlined
    # copies would compile it 64 times).
    one = jax.jit(fn)

    def many(firsts, rests):
      return tuple(one(firsts[i], *rests[i % n_rot]) for i in range(calls))

    f = jax.jit(many)
    jax.block_until_ready(f(firsts, rests))          # compile + warm-up
    jax.block_until_ready(f(firsts, rests))
    # Each sample dispatches PIPELINE executions back to back and blocks once,
    # so host dispatch overlaps device work; median over samples.
    ts = []
    for _ in range(self.reps):
      t0 = time.perf_counter()
      outs = [f(firsts, rests) for _ in range(PIPELINE)]
      jax.block_until_ready(outs)
      ts.append((time.perf_counter() - t0) / PIPELINE)
      del outs
    del firsts
    return float(np.median(ts)) / calls, calls


MAX_ROT = 16


def n_rotations(bytes_per_call):
  return int(max(1, min(MAX_ROT, math.ceil(ROTATE_TARGET / max(bytes_per_call, 1)))))


def est_decode_s(nbytes, quick):
  return None if quick else nbytes / 2.5e12      # ~H100 HBM3 effective


def est_prefill_s(flops, quick):
  return None if quick else flops / 300e12


def rand(key, shape, dtype, scale=1.0):
  return (scale * jax.random.normal(key, shape, jnp.float32)).astype(dtype)


def device_info():
  d = jax.devices()[0]
  return dict(device_kind=d.device_kind, platform=d.platform, num_devices=jax.device_count(),
              jax_version=jax.__version__,
              date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              sm_count=triton_tuning.num_sms() if d.platform == "gpu" else None)


# ----------------------------------------------------------------------------
# floors
# ----------------------------------------------------------------------------
def measure_floors(args, timer):
  n = (512 * 2**20 if not args.quick else 16 * 2**20) // 2      # bf16 elements per buffer
  x = jnp.ones((n,), jnp.bfloat16)
  t, _ = timer(lambda a: a * jnp.bfloat16(2), [(x,)], calls=4 if not args.quick else 2)
  copy_bw = 2 * n * 2 / t
  del x
  m = 8192 if not args.quick else 512
  a = rand(jax.random.key(1), (m, m), jnp.bfloat16)
  b = rand(jax.random.key(2), (m, m), jnp.bfloat16)
  t, _ = timer(lambda a, b: jnp.dot(a, b, preferred_element_type=jnp.bfloat16), [(a, b)],
               calls=4 if not args.quick else 2)
  mm = 2 * m ** 3 / t
  print(f"floors: copy bandwidth {copy_bw / 1e12:.3f} TB/s (read+write of {2 * n * 2 / 2**20:.0f} MiB), "
        f"bf16 matmul {mm / 1e12:.1f} TFLOP/s ({m}^3)")
  return dict(copy_bytes_per_s=copy_bw, matmul_flops_per_s=mm, copy_bytes=2 * n * 2, matmul_m=m)


# ----------------------------------------------------------------------------
# numerics check (--check)
# ----------------------------------------------------------------------------
CHECKS = [
    # name, kind args
    dict(name="decode gqa4 ragged stacked L2 bf16", b=4, tq=1, s=4096, hq=32, hkv=8, d=128, r=8,
         layers=2, kv=[4096, 1000, 3333, 0]),
    dict(name="decode tq4 prefix per-q-head B d64 r16", b=2, tq=4, s=2048, hq=16, hkv=2, d=64, r=16,
         per_q_b=True, kv=[2048, 777]),
    dict(name="decode mqa d256 r3 f32", b=2, tq=1, s=1000, hq=8, hkv=1, d=256, r=3,
         dtype="float32", kv=[1000, 513]),
    dict(name="prefill causal 1k gqa4 bf16", b=2, tq=1024, s=1024, hq=32, hkv=8, d=128, r=8,
         kv=[1024, 1024]),
    dict(name="prefill 512 after 1536 prefix gqa8 d96 r16", b=1, tq=512, s=2048, hq=32, hkv=4,
         d=96, r=16, kv=[2048]),
    dict(name="prefill d80 f32 plain", b=1, tq=300, s=300, hq=4, hkv=4, d=80, r=None,
         dtype="float32", kv=[300]),
]
QUICK_CHECKS = [
    dict(name="decode gqa4 ragged stacked bf16", b=2, tq=1, s=256, hq=8, hkv=2, d=128, r=8,
         layers=2, kv=[256, 100]),
    dict(name="prefill 64 after prefix d96 r16", b=1, tq=64, s=192, hq=8, hkv=2, d=96, r=16,
         kv=[192]),
]


def run_checks(args, interpret):
  print("\n== numerics: triton kernels vs float32 XLA reference ==")
  results, all_ok = [], True
  for c in (QUICK_CHECKS if args.quick else CHECKS):
    dt = jnp.dtype(c.get("dtype", "bfloat16"))
    ks = jax.random.split(jax.random.key(7), 6)
    lead = (c["layers"],) if c.get("layers") else ()
    b, tq, s, hq, hkv, d, r = (c[k] for k in ("b", "tq", "s", "hq", "hkv", "d", "r"))
    q = rand(ks[0], (b, tq, hq, d), dt)
    k = rand(ks[1], lead + (b, s, hkv, d), dt)
    v = rand(ks[2], lead + (b, s, hkv, d), dt)
    lr = lb = None
    if r:
      lr = rand(ks[3], lead + (b, s, r), dt)
      lb = rand(ks[4], (b, hq if c.get("per_q_b") else hkv, r, d), dt, 0.3)
    kv = jnp.asarray(c["kv"], jnp.int32)
    scale = jnp.linspace(0.5, 2.0, b).astype(jnp.float32)
    layer = jnp.int32(c["layers"] - 1) if lead else None
    try:
      f = jax.jit(lambda q, k, v, lr, lb, kv, sc, ly: flash_lora_attention(
          q, k, v, lr, lb, lora_scale=sc, kv_lengths=kv, layer=ly, backend="triton",
          interpret=interpret))
      out = np.asarray(f(q, k, v, lr, lb, kv, scale, layer).astype(jnp.float32))
      ref = np.asarray(jax.jit(lambda *a: reference_attention(*a[:5], lora_scale=a[6],
                                                              kv_lengths=a[5], layer=a[7]))(
          q, k, v, lr, lb, kv, scale, layer).astype(jnp.float32))
      err = float(np.abs(out - ref).max() / max(np.abs(ref).max(), 1e-6))
      tol = 2e-4 if dt == jnp.float32 else 1.5e-2
      zero_ok = all(np.all(out[i] == 0) for i in range(b) if c["kv"][i] == 0)
      ok = bool(np.isfinite(out).all() and err < tol and zero_ok)
      msg = f"rel err {err:.2e} (tol {tol:g})" + ("" if zero_ok else ", empty row not zero")
    except Exception as e:  # noqa: BLE001
      ok, msg, err = False, f"{type(e).__name__}: {str(e)[:300]}", None
    all_ok &= ok
    print(f"  {'PASS' if ok else 'FAIL'}  {c['name']}: {msg}")
    results.append(dict(name=c["name"], ok=ok, rel_err=err, msg=msg))
  print(f"numerics: {'PASS' if all_ok else 'FAIL'}")
  return dict(ok=all_ok, cases=results)


# ----------------------------------------------------------------------------
# decode
# ----------------------------------------------------------------------------
HQ, HKV, D, R = 32, 8, 128, 8
# None = the kernel's own defaults (what users get); --tune may pick other tiles. The
# decode split count is always the kernel's (one wave of resident programs): tuning it
# at batch 1 and applying it at batch 8 brought back a partial second wave.
DEFAULT_DECODE_CFG = dict(block_k=None, num_warps=None, num_stages=None)
DEFAULT_PREFILL_CFG = dict(block_q=None, block_k=None, num_warps=None, num_stages=None)


def resolved_decode_cfg(b, kv, cfg, rank):
  """The launch configuration the decode kernel will use for cfg (Nones filled in) at
  LoRA rank `rank` (0: the plain kernel)."""
  sizes = triton_tuning.DecodeBlockSizes(**cfg).resolve(
      batch=b, tq=1, group=HQ // HKV, heads_kv=HKV, s_len=kv, d=D, r=rank, itemsize=2,
      lr_itemsize=2 if rank else 0)
  return dataclasses.asdict(sizes)


def resolved_prefill_cfg(tq, kv, cfg, lora):
  """The block sizes the prefill kernel will use for cfg (Nones filled in)."""
  sizes = triton_tuning.PrefillBlockSizes(**cfg).resolve(
      tq=tq, s_len=kv, d=D, r=R if lora else 0, itemsize=2, lr_itemsize=2 if lora else 0)
  return dataclasses.asdict(sizes)


def decode_inputs(b, kv, n_rot, dtype=jnp.bfloat16):
  rots = []
  for i in range(n_rot):
    ks = jax.random.split(jax.random.key(100 + i), 5)
    q = rand(ks[0], (b, 1, HQ, D), dtype)
    k = rand(ks[1], (b, kv, HKV, D), dtype)
    v = rand(ks[2], (b, kv, HKV, D), dtype)
    lr = rand(ks[3], (b, kv, R), dtype)
    lb = rand(ks[4], (b, HKV, R, D), dtype, 0.3)
    rots.append((q, k, v, lr, lb))
  return rots


def decode_bytes(b, kv, lora, itemsize=2):
  kvb = 2 * b * kv * HKV * D * itemsize
  lrb = b * kv * R * itemsize if lora else 0
  return kvb + lrb + 2 * b * HQ * D * itemsize


def decode_methods(cfg, interpret):
  scale = 2.0
  kw = dict(backend="triton", interpret=interpret, **cfg)

  def ours(q, k, v, lr, lb):
    return flash_lora_attention(q, k, v, lr, lb, lora_scale=scale, **kw)

  def plain(q, k, v, lr, lb):
    return flash_lora_attention(q, k, v, **kw)

  def naive(q, k, v, lr, lb):
    return naive_lora_attention(q, k, v, lr, lb, lora_scale=scale, **kw)

  def gqa(q, k, v, lr, lb):
    from jax.experimental.pallas.ops.gpu import decode_attention
    return decode_attention.gqa(q[:, 0], k, v, interpret=interpret)

  return dict(ours_lora=(ours, True), ours_plain=(plain, False), naive=(naive, True),
              gqa=(gqa, False))


def pick_fastest(cands, time_one, fallback):
  """Times every candidate config (time_one(c) -> (seconds, printable)); a config that
  fails (e.g. too much shared memory) is recorded and skipped. Returns (best or
  fallback, rows)."""
  best, rows = None, []
  for c in cands:
    try:
      t, shown = time_one(c)
      print(f"  {c}: {shown}")
      rows.append(dict(c, time_s=t))
      if best is None or t < best[1]:
        best = (c, t)
    except Exception as e:  # noqa: BLE001
      print(f"  {c}: FAILED {type(e).__name__}: {str(e)[:200]}")
      rows.append(dict(c, error=f"{type(e).__name__}: {str(e)[:300]}"))
  return (best[0] if best else fallback), rows


def tune_decode(args, timer, interpret):
  b, kv = 1, (32768 if not args.quick else 512)
  cands = [dict(block_k=bk, num_warps=w, num_stages=st)
           for (bk, w, st) in [(64, 4, 3), (64, 8, 3), (128, 4, 2), (128, 4, 3), (256, 8, 2)]]
  if args.quick:
    cands = cands[:2]
  print(f"\n== tuning decode at batch {b}, kv {fmt_len(kv)} ==")
  nbytes = decode_bytes(b, kv, True)
  rots = decode_inputs(b, kv, n_rotations(nbytes))

  def time_one(c):
    t, _ = timer(decode_methods(c, interpret)["ours_lora"][0], rots,
                 est_s=est_decode_s(nbytes, args.quick))
    return t, f"{t * 1e6:8.1f} us  {nbytes / t / 1e9:7.1f} GB/s"

  return pick_fastest(cands, time_one, DEFAULT_DECODE_CFG)


def bench_decode(args, timer, floors, interpret, tuned):
  print("\n== decode (q_len 1, 32 q heads, 8 KV heads, head_dim 128, rank 8, bf16) ==")
  kvs = args.kv_lens or ([256, 512] if args.quick else [4096, 8192, 16384, 32768, 65536, 131072])
  batches = [1, 2] if args.quick else [1, 8]
  recs = []
  hdr = f"{'batch':>5} {'kv':>6} {'method':>10} {'us':>9} {'GB/s':>8} {'%copy':>6}"
  print(hdr)
  for b in batches:
    for kv in kvs:
      bytes_lora = decode_bytes(b, kv, True)
      n_rot = n_rotations(bytes_lora)
      try:
        rots = decode_inputs(b, kv, n_rot)
      except Exception as e:  # noqa: BLE001  (out of memory)
        print(f"{b:5d} {fmt_len(kv):>6}  skipped: {type(e).__name__}")
        continue
      for name, (fn, lora) in decode_methods(tuned, interpret).items():
        nbytes = decode_bytes(b, kv, lora)
        ours = name.startswith("ours") or name == "naive"
        rec = dict(kind="decode", batch=b, kv_len=kv, q_len=1, method=name, bytes=nbytes,
                   config=resolved_decode_cfg(b, kv, tuned, R if name == "ours_lora" else 0) if ours else None)
        try:
          t, calls = timer(fn, rots, est_s=est_decode_s(nbytes, args.quick))
          rec.update(time_s=t, calls_per_exec=calls, rotations=n_rot,
                     bytes_per_s=nbytes / t, frac_copy=nbytes / t / floors["copy_bytes_per_s"])
          print(f"{b:5d} {fmt_len(kv):>6} {name:>10} {t * 1e6:9.1f} {nbytes / t / 1e9:8.1f} "
                f"{100 * rec['frac_copy']:5.1f}%")
        except Exception as e:  # noqa: BLE001
          rec.update(error=f"{type(e).__name__}: {str(e)[:400]}")
          print(f"{b:5d} {fmt_len(kv):>6} {name:>10}  FAILED {rec['error'][:120]}")
        recs.append(rec)
      del rots
  return recs


# ----------------------------------------------------------------------------
# prefill
# ----------------------------------------------------------------------------
def prefill_inputs(tq, kv, dtype=jnp.bfloat16):
  ks = jax.random.split(jax.random.key(3), 5)
  q = rand(ks[0], (1, tq, HQ, D), dtype)
  k = rand(ks[1], (1, kv, HKV, D), dtype)
  v = rand(ks[2], (1, kv, HKV, D), dtype)
  lr = rand(ks[3], (1, kv, R), dtype)
  lb = rand(ks[4], (1, HKV, R, D), dtype, 0.3)
  return (q, k, v, lr, lb)


def prefill_flops(tq, kv):
  q_off = kv - tq
  pairs = sum(min(kv, q_off + t + 1) for t in range(tq))
  return 4 * HQ * D * pairs


def prefill_methods(cfgs, interpret, tq, kv):
  """cfgs: {"lora": block sizes of the LoRA kernel, "plain": of the plain one (naive runs
  the plain kernel on the expanded V, so it takes those too)}."""
  scale = 2.0
  kl = dict(backend="triton", interpret=interpret, **cfgs["lora"])
  kp = dict(backend="triton", interpret=interpret, **cfgs["plain"])
  m = dict(
      ours_lora=lambda q, k, v, lr, lb: flash_lora_attention(q, k, v, lr, lb, lora_scale=scale, **kl),
      ours_plain=lambda q, k, v, lr, lb: flash_lora_attention(q, k, v, **kp),
      naive=lambda q, k, v, lr, lb: naive_lora_attention(q, k, v, lr, lb, lora_scale=scale, **kp),
  )
  if tq == kv:
    def mha(q, k, v, lr, lb):
      from jax.experimental.pallas.ops.gpu import attention
      g = HQ // HKV
      return attention.mha(q, jnp.repeat(k, g, axis=2), jnp.repeat(v, g, axis=2), None,
                           sm_scale=1.0 / math.sqrt(D), causal=True, interpret=interpret)
    m["mha"] = mha
  return m


def tune_prefill(args, timer, interpret):
  n = 8192 if not args.quick else 128
  cands = [dict(block_q=bq, block_k=bk, num_warps=w, num_stages=st)
           for (bq, bk, w, st) in [(128, 64, 8, 3), (128, 64, 4, 3), (128, 128, 8, 2),
                                   (128, 128, 8, 3), (64, 64, 4, 3)]]
  if args.quick:
    cands = cands[:2]
  print(f"\n== tuning prefill at q = kv = {fmt_len(n)} ==")
  x = prefill_inputs(n, n)

  # The two variants want different tiles (H200: LoRA 128x128/2/8, plain 64x64/3/4),
  # so each is tuned on its own and then benchmarked at its own best.
  best, rows = {}, []
  for variant in ("lora", "plain"):
    def time_one(c, variant=variant):
      fn = prefill_methods({variant: c, "lora" if variant == "plain" else "plain": c}, interpret, n, n)
      t, _ = timer(fn["ours_" + variant], [x], calls=1)
      return t, f"{variant:5s} {t * 1e3:8.2f} ms  {prefill_flops(n, n) / t / 1e12:6.1f} TFLOP/s"

    best[variant], got = pick_fastest(cands, time_one, DEFAULT_PREFILL_CFG)
    rows += [dict(r, variant=variant) for r in got]
  return best, rows


def bench_prefill(args, timer, floors, interpret, tuned):
  print("\n== prefill (causal, batch 1, 32 q heads, 8 KV heads, head_dim 128, rank 8, bf16) ==")
  lens = args.kv_lens or ([128] if args.quick else [1024, 2048, 4096, 8192, 16384, 32768])
  shapes = [(n, n) for n in lens] + ([(64, 256)] if args.quick else [(4096, 32768)])
  recs = []
  print(f"{'q_len':>6} {'kv':>6} {'method':>10} {'ms':>9} {'TFLOP/s':>8} {'%mm':>6}")
  for tq, kv in shapes:
    x = prefill_inputs(tq, kv)
    flops = prefill_flops(tq, kv)
    for name, fn in prefill_methods(tuned, interpret, tq, kv).items():
      lora_kernel = name == "ours_lora"  # naive runs the plain kernel on the expanded V
      cfg = None if name == "mha" else resolved_prefill_cfg(tq, kv, tuned["lora" if lora_kernel else "plain"],
                                                             lora_kernel)
      rec = dict(kind="prefill", batch=1, q_len=tq, kv_len=kv, q_offset=kv - tq, method=name,
                 flops=flops, config=cfg)
      try:
        t, calls = timer(fn, [x], est_s=est_prefill_s(flops, args.quick))
        rec.update(time_s=t, calls_per_exec=calls, flops_per_s=flops / t,
                   frac_matmul=flops / t / floors["matmul_flops_per_s"])
        print(f"{fmt_len(tq):>6} {fmt_len(kv):>6} {name:>10} {t * 1e3:9.3f} {flops / t / 1e12:8.1f} "
              f"{100 * rec['frac_matmul']:5.1f}%")
      except Exception as e:  # noqa: BLE001
        rec.update(error=f"{type(e).__name__}: {str(e)[:400]}")
        print(f"{fmt_len(tq):>6} {fmt_len(kv):>6} {name:>10}  FAILED {rec['error'][:120]}")
      recs.append(rec)
    del x
  return recs


# ----------------------------------------------------------------------------
# targets, plot
# ----------------------------------------------------------------------------
def _t(recs, **sel):
  for r in recs:
    if all(r.get(k) == v for k, v in sel.items()) and "time_s" in r:
      return r
  return None


def evaluate_targets(recs):
  out = []

  def add(name, ok, detail):
    out.append(dict(target=name, ok=ok, detail=detail))

  dec = [r for r in recs if r["kind"] == "decode" and r["method"] == "ours_lora" and "time_s" in r]
  for r in dec:
    if r["kv_len"] >= 16384:
      add(f"decode b{r['batch']} kv{fmt_len(r['kv_len'])} >= 85% copy bw",
          r["frac_copy"] >= 0.85, f"{100 * r['frac_copy']:.1f}%")
    base = dict(kind="decode", batch=r["batch"], kv_len=r["kv_len"])
    g, p, n = _t(recs, method="gqa", **base), _t(recs, method="ours_plain", **base), \
        _t(recs, method="naive", **base)
    if g:
      add(f"decode b{r['batch']} kv{fmt_len(r['kv_len'])} >= 2x gqa",
          g["time_s"] / r["time_s"] >= 2, f"{g['time_s'] / r['time_s']:.2f}x")
    if p:
      add(f"decode b{r['batch']} kv{fmt_len(r['kv_len'])} LoRA <= 5% over plain",
          r["time_s"] / p["time_s"] <= 1.05, f"+{100 * (r['time_s'] / p['time_s'] - 1):.1f}%")
    if n and r["kv_len"] == 32768:
      add(f"decode b{r['batch']} kv32k >= 1.5x naive", n["time_s"] / r["time_s"] >= 1.5,
          f"{n['time_s'] / r['time_s']:.2f}x")
  pre = [r for r in recs if r["kind"] == "prefill" and r["method"] == "ours_lora" and "time_s" in r]
  for r in pre:
    tag = f"prefill q{fmt_len(r['q_len'])} kv{fmt_len(r['kv_len'])}"
    if r["kv_len"] >= 8192:
      add(f"{tag} >= 50% matmul rate", r["frac_matmul"] >= 0.5, f"{100 * r['frac_matmul']:.1f}%")
    p = _t(recs, kind="prefill", method="ours_plain", q_len=r["q_len"], kv_len=r["kv_len"])
    if p:
      add(f"{tag} LoRA <= 10% over plain", r["time_s"] / p["time_s"] <= 1.10,
          f"+{100 * (r['time_s'] / p['time_s'] - 1):.1f}%")
  return out


def plot(recs, floors, info, path):
  try:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
  except Exception as e:  # noqa: BLE001
    print(f"no plot: {e}")
    return None
  fig, axes = plt.subplots(1, 2, figsize=(13, 4.8))
  ax = axes[0]
  styles = {"ours_lora": "-o", "ours_plain": "--o", "naive": ":s", "gqa": "-.^", "mha": "-.^"}
  for b in sorted({r["batch"] for r in recs if r["kind"] == "decode"}):
    for m in ("ours_lora", "ours_plain", "naive", "gqa"):
      pts = sorted((r["kv_len"], r["bytes_per_s"] / 1e9) for r in recs
                   if r["kind"] == "decode" and r["batch"] == b and r["method"] == m and "time_s" in r)
      if pts:
        ax.plot(*zip(*pts), styles[m], label=f"{m} b{b}", alpha=0.85 if b == 1 else 0.55)
  ax.axhline(floors["copy_bytes_per_s"] / 1e9, color="k", lw=1, label="copy bandwidth")
  ax.set_xscale("log", base=2)
  ax.set_xlabel("kv_len")
  ax.set_ylabel("GB/s (K+V+LR+q+out)")
  ax.set_title("decode")
  ax.legend(fontsize=7, ncol=2)
  ax = axes[1]
  for m in ("ours_lora", "ours_plain", "naive", "mha"):
    pts = sorted((r["kv_len"], r["flops_per_s"] / 1e12) for r in recs
                 if r["kind"] == "prefill" and r["method"] == m and "time_s" in r
                 and r["q_len"] == r["kv_len"])
    if pts:
      ax.plot(*zip(*pts), styles[m], label=m)
  ax.axhline(floors["matmul_flops_per_s"] / 1e12, color="k", lw=1, label="bf16 matmul")
  ax.set_xscale("log", base=2)
  ax.set_xlabel("q_len = kv_len (causal)")
  ax.set_ylabel("TFLOP/s")
  ax.set_title("prefill")
  ax.legend(fontsize=7)
  fig.suptitle(f"Flash-LoRA-Attention on {info['device_kind']} (JAX {info['jax_version']}, "
               f"{info['date'][:10]})", fontsize=10)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return path


# ----------------------------------------------------------------------------
def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--quick", action="store_true", help="tiny shapes (CPU: Pallas interpret mode)")
  ap.add_argument("--out", default=None, help="output directory (JSON + PNG; default results/kernels/<timestamp>/)")
  ap.add_argument("--only", choices=["decode", "prefill"], default=None)
  ap.add_argument("--kv-lens", type=parse_lens, default=None, help="e.g. 4k,16k,32k")
  ap.add_argument("--check", action="store_true", help="verify numerics first (PASS/FAIL)")
  ap.add_argument("--tune", dest="tune", action="store_true", default=None,
                  help="pick block sizes first (default on GPU)")
  ap.add_argument("--no-tune", dest="tune", action="store_false")
  ap.add_argument("--reps", type=int, default=None)
  args = ap.parse_args(argv)

  t_start = time.time()
  info = device_info()
  on_gpu = info["platform"] == "gpu"
  interpret = not on_gpu
  if interpret and not args.quick:
    print("no GPU: running in Pallas interpret mode; use --quick (full shapes would take hours)")
  tune = on_gpu if args.tune is None else args.tune
  timer = Timer(args.reps or (3 if args.quick else 10), max_calls=2 if args.quick else 64)
  if args.quick:
    global MAX_ROT
    MAX_ROT = 2
  print(f"device: {info['device_kind']} ({info['platform']}), jax {info['jax_version']}, {info['date']}")
  args.out = results_dir("kernels", args.out)

  result = dict(info=info, command=" ".join(sys.argv), args=vars(args) | {"kv_lens": args.kv_lens}, records=[])
  if args.check:
    result["check"] = run_checks(args, interpret)
  floors = measure_floors(args, timer)
  result["floors"] = floors

  dec_cfg = DEFAULT_DECODE_CFG
  pre_cfg = dict(lora=DEFAULT_PREFILL_CFG, plain=DEFAULT_PREFILL_CFG)
  if tune:
    if args.only != "prefill":
      dec_cfg, result["tune_decode"] = tune_decode(args, timer, interpret)
    if args.only != "decode":
      pre_cfg, result["tune_prefill"] = tune_prefill(args, timer, interpret)
  result["decode_config"], result["prefill_config"] = dec_cfg, pre_cfg
  print(f"\ndecode config {dec_cfg}\nprefill config {pre_cfg}")

  if args.only != "prefill":
    result["records"] += bench_decode(args, timer, floors, interpret, dec_cfg)
  if args.only != "decode":
    result["records"] += bench_prefill(args, timer, floors, interpret, pre_cfg)

  result["targets"] = evaluate_targets(result["records"])
  print("\n== targets ==")
  for t in result["targets"]:
    print(f"  {'PASS' if t['ok'] else 'MISS'}  {t['target']}: {t['detail']}")
  if "check" in result:
    print(f"numerics check: {'PASS' if result['check']['ok'] else 'FAIL'}")
  result["wall_seconds"] = time.time() - t_start
  stamp = info["date"][:19].replace(":", "").replace("-", "")
  path = os.path.join(args.out, f"kernels_{stamp}.json")
  with open(path, "w") as f:
    json.dump(result, f, indent=1, default=str)
  png = plot(result["records"], floors, info, os.path.join(args.out, f"kernels_{stamp}.png"))
  print(f"\nwrote {path}" + (f" and {png}" if png else "") + f" in {result['wall_seconds']:.0f}s")
  return 0 if result.get("check", {}).get("ok", True) else 1


if __name__ == "__main__":
  try:
    sys.exit(main())
  except Exception:  # pragma: no cover
    traceback.print_exc()
    sys.exit(2)
