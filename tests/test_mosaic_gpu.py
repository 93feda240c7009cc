"""The "mosaic_gpu" backend (Pallas Mosaic GPU prefill for Hopper) on a CPU-only machine.

* knob checks and the calls it hands to the Triton kernels (decode, float32, head_dim
  no multiple of 64): those run here in interpret mode against the float32 XLA reference;
* the kernel itself in Pallas' GPU interpret mode (JAX >= 0.11): same code as on the GPU
  except that wgmma's register operands go through shared memory; the interpreter also
  checks the barrier protocol (every phase observed). Run in a child process with a time
  limit: on this 2-core machine GQA + LoRA + return_lse at head_dim 64 / rank 8-16 never
  finished (at head_dim 128 / rank 64 it does), its memory warpgroup blocked inside XLA's
  CPU runtime rather than on a kernel barrier, so it is left out here;
* lowering for cuda: `jax.jit(f).trace(...).lower(lowering_platforms=("cuda",))` runs
  the whole Pallas -> Mosaic GPU lowering in Python (shared-memory transforms, wgmma
  shape and swizzle rules, layouts, barriers), which is where a bad tile or a dtype
  mismatch (the float16 tiles of JAX's example with bfloat16 inputs) fails; the PTX
  compile happens later, on a GPU. Numerics need the GPU: bench/gpu_mgpu_check.py.
"""
from __future__ import annotations

import importlib.util
import re

import jax
import jax.numpy as jnp
import numpy as np

import pytest
from jax import lax

from bench.gpu_mgpu_check import abstract_h100, cuda_target
from bench.tpu_fit import placed_shapes
from pallas_kernels import flash_lora_attention, reference_attention
from pallas_kernels._args import canonicalize
from pallas_kernels.flash_lora_attention import run_canonical

pytestmark = pytest.mark.filterwarnings("ignore:The Pallas Triton backend is deprecated:DeprecationWarning")
SD = jax.ShapeDtypeStruct
HAS_MGPU = importlib.util.find_spec("jax.experimental.pallas.mosaic_gpu") is not None
# Lowers with JAX 0.10.2, 0.11.2 and 0.12.0.1 (checked); a JAX without Mosaic GPU skips.
needs_mgpu = pytest.mark.skipif(not HAS_MGPU, reason=f"JAX {jax.__version__} has no Pallas Mosaic GPU")


def _rand(shape, dtype, seed):
  return jax.random.normal(jax.random.key(seed), shape, jnp.float32).astype(dtype)


def _inputs(tq=40, s=64, b=2, hq=4, hkv=2, d=32, r=8, layers=2, dtype=jnp.float32):
  q = _rand((b, tq, hq, d), dtype, 0)
  k = _rand((layers, b, s, hkv, d), dtype, 1)
  v = _rand((layers, b, s, hkv, d), dtype, 2)
  lr = _rand((layers, b, s, r), dtype, 3)
  bm = _rand((b, hkv, r, d), dtype, 4) * 0.3
  return q, k, v, lr, bm


@pytest.mark.parametrize("kw,msg", [
    (dict(block_q=48), "block_q must be a multiple of 64 up to 256 for the mosaic_gpu backend"),
    (dict(block_k=96), "block_k must be a multiple of 64 up to 256 for the mosaic_gpu backend"),
    (dict(block_k=512), "block_k must be a multiple of 64 up to 256"),
    (dict(num_stages=1), "num_stages must be >= 2"),
    (dict(lr_pad=12), r"lr_pad must be one of \(8, 16\)"),
    (dict(q_chunk=4), "unknown keyword 'q_chunk' for backend 'mosaic_gpu'"),
    # Triton-only knobs are checked too (they go to the Triton kernels it hands calls on to).
    (dict(num_splits=0), "num_splits must be a positive int"),
    (dict(num_warps=3), "num_warps"),
])
def test_bad_knobs(kw, msg):
  q, k, v, lr, bm = _inputs()
  with pytest.raises(ValueError, match=msg):
    flash_lora_attention(q, k, v, lr, bm, layer=1, backend="mosaic_gpu", interpret=True, **kw)


def test_lr_tile_width():
  """lr_pad 8 narrows only ranks <= 8 to an 8-column LR tile; the B tile / LoRA accumulator
  stays >= 16 (the epilogue wgmma's K); 8 is the default (measured faster on an H200)."""
  from pallas_kernels.mosaic_gpu import tuning as t
  assert [t.lr_width(r, 16) for r in (1, 8, 9, 16, 17, 33, 64)] == [16, 16, 16, 16, 32, 64, 64]
  assert [t.lr_width(r) for r in (1, 8, 9, 64)] == [8, 8, 16, 64]
  assert [t.lr_width(r, 8) for r in (1, 4, 8, 9, 16, 17, 64)] == [8, 8, 8, 16, 16, 32, 64]
  assert [t.lora_rows(w) for w in (8, 16, 32, 64)] == [16, 16, 32, 64]
  with pytest.raises(ValueError, match="rank must be <= 64"):
    t.lr_width(65, 8)
  assert t.PrefillBlockSizes().resolve(s_len=1024, d=128, r=8).lr_pad == 8
  assert t.PrefillBlockSizes(lr_pad=16).resolve(s_len=1024, d=128, r=8).lr_pad == 16
  assert t.PrefillBlockSizes(lr_pad=8).resolve(s_len=1024, d=128, r=8).lr_pad == 8
  # 2 stages x 128 keys x 8 columns x 2 bytes less LR buffer than at 16 columns.
  assert t.prefill_smem(64, 128, 2, 128, 16) - t.prefill_smem(64, 128, 2, 128, 8) == 2 * 128 * 8 * 2


def test_unsupported_reasons():
  from pallas_kernels.mosaic_gpu import unsupported_reason
  q, k, v, lr, bm = _inputs(s=128, d=64, dtype=jnp.bfloat16)
  assert unsupported_reason(canonicalize(q, k, v, lr, bm, layer=0)) is None
  assert "float32" in unsupported_reason(canonicalize(*_inputs(d=64), layer=0))
  assert "head_dim 32" in unsupported_reason(canonicalize(*_inputs(dtype=jnp.bfloat16), layer=0))
  assert "no multiple of 64" in unsupported_reason(
      canonicalize(*_inputs(s=96, d=64, dtype=jnp.bfloat16), layer=0))


@pytest.mark.parametrize("tq", [1, 40])
def test_fallback_to_triton_matches_reference(tq):
  """float32 and head_dim 32 run the Triton kernels (decode for tq=1, prefill for 40):
  within 2e-5 of the float32 XLA reference (summation order only)."""
  q, k, v, lr, bm = _inputs(tq=tq)
  kw = dict(lora_scale=1.5, layer=1, kv_lengths=jnp.array([64, 50]), q_offsets=jnp.array([24, 3]))
  out = flash_lora_attention(q, k, v, lr, bm, backend="mosaic_gpu", interpret=True, **kw)
  ref = reference_attention(q, k, v, lr, bm, **kw)
  np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=2e-5, rtol=2e-5)


def test_triton_knobs_reach_the_kernels_it_hands_on_to(monkeypatch):
  """num_splits / num_warps under mosaic_gpu (what "auto" is on Hopper) reach the Triton decode
  it hands the call to; the Mosaic prefill's own knobs (block_k here) do not."""
  import pallas_kernels.triton as triton_pkg
  seen, decode = [], triton_pkg.decode
  monkeypatch.setattr(triton_pkg, "decode", lambda *a, **kw: seen.append(kw["block_sizes"]) or decode(*a, **kw))
  q, k, v, lr, bm = _inputs(tq=1)
  flash_lora_attention(q, k, v, lr, bm, layer=1, backend="mosaic_gpu", interpret=True, num_splits=2,
                       num_warps=2, block_k=128)
  assert len(seen) == 1 and seen[0].num_splits == 2 and seen[0].num_warps == 2
  assert seen[0].block_k != 128


@pytest.mark.parametrize("flag,sm90,want", [(False, True, "triton"), (True, True, "mosaic_gpu"),
                                             (True, False, "triton")])
def test_auto_picks_mosaic_gpu_only_behind_the_flag(monkeypatch, flag, sm90, want):
  import importlib
  fla = importlib.import_module("pallas_kernels.flash_lora_attention")
  monkeypatch.setattr(fla.jax, "default_backend", lambda: "gpu")
  monkeypatch.setattr(fla, "triton_available", lambda: True)
  monkeypatch.setattr(fla, "mosaic_gpu_available", lambda: sm90)
  monkeypatch.setattr(fla, "AUTO_PICKS_MOSAIC_GPU", flag)
  assert fla.resolve_backend("auto") == want


_target = cuda_target  # an abstract H100 where the JAX needs one to lower for cuda


def _lower(tq, d, r, *, s=512, b=2, hq=8, hkv=2, layers=3, dtype=jnp.bfloat16, per_q_b=False,
           return_lse=False, causal=True, **kw):
  """What the model does: a fori_loop over layers with a traced layer index, ragged rows."""
  lora = () if r is None else (SD((layers, b, s, r), dtype), SD((b, hq if per_q_b else hkv, r, d), dtype))
  args = (SD((b, tq, hq, d), dtype), SD((layers, b, s, hkv, d), dtype), SD((layers, b, s, hkv, d), dtype)) \
      + (lora or (None, None))

  def f(q, k, v, lr, lora_b):
    def body(layer, acc):
      o = flash_lora_attention(q, k, v, lr, lora_b, lora_scale=jnp.full((b,), 2.0), causal=causal,
                               kv_lengths=jnp.array([s - 5, s // 2], jnp.int32)[:b],
                               q_offsets=jnp.array([s - 5 - tq, 7], jnp.int32)[:b],
                               layer=layer, backend="mosaic_gpu", return_lse=return_lse, **kw)
      if return_lse:
        o, lse = o
        return acc + o.astype(jnp.float32) + lse[..., None]
      return acc + o.astype(jnp.float32)
    return lax.fori_loop(0, layers, body, jnp.zeros((b, tq, hq, d), jnp.float32))

  with _target():
    return jax.jit(f).trace(*args).lower(lowering_platforms=("cuda",))


def _mgpu_calls(lowered):
  return [line for line in lowered.as_text().splitlines() if "custom_call @mosaic_gpu" in line]


@needs_mgpu
@pytest.mark.parametrize("tq,d,r,dtype,kw", [
    (256, 128, 8, jnp.bfloat16, {}),
    (256, 128, 8, jnp.bfloat16, dict(lr_pad=16)),
    (200, 128, 24, jnp.float16, dict(return_lse=True)),
    (256, 128, 64, jnp.bfloat16, dict(block_k=64)),
    (128, 64, 16, jnp.bfloat16, dict(per_q_b=True)),
    (256, 256, 32, jnp.bfloat16, dict(block_k=64)),
    (384, 128, None, jnp.bfloat16, dict(causal=False)),
    # lr_pad 16 at rank 4; lr_pad 8 (the default): the K-major 8-column LR tile.
    (200, 128, 4, jnp.float16, dict(lr_pad=16, per_q_b=True)),
    (200, 128, 4, jnp.float16, dict(lr_pad=8, return_lse=True)),
    (256, 128, 1, jnp.bfloat16, dict(lr_pad=8, block_k=64, per_q_b=True)),
    (256, 64, 8, jnp.bfloat16, dict(lr_pad=8, causal=False)),
])
def test_lower_mosaic_gpu_prefill_for_cuda(tq, d, r, dtype, kw):
  lowered = _lower(tq, d, r, dtype=dtype, **kw)
  calls = _mgpu_calls(lowered)
  assert len(calls) == 1, f"expected one Mosaic GPU kernel, found {len(calls)}"
  # No Triton kernel: the prefill did not fall back.
  assert "__gpu$xla.gpu.triton" not in lowered.as_text()


@needs_mgpu
def test_lower_reads_stacked_cache_in_place():
  """Rank 16 / 32 / 64 (an LR width wgmma takes as is): the kernel gets the whole stacked
  K, V and LR caches and reads the layer itself (no per-layer copy in the wrapper)."""
  operands = lambda r, **kw: _mgpu_calls(_lower(256, 128, r, layers=3, s=256, b=1, **kw))[0].split(" : (")[-1]
  in_place = operands(16)
  assert in_place.count("tensor<3x1x256x2x128xbf16>") == 2       # K and V, all layers
  assert "tensor<3x1x256x16xbf16>" in in_place                   # LR, all layers
  # Rank 8 with lr_pad 16 is padded to 16: only that layer's LR is copied (K and V in place).
  padded = operands(8, lr_pad=16)
  assert padded.count("tensor<3x1x256x2x128xbf16>") == 2 and "tensor<1x1x256x16xbf16>" in padded
  # lr_pad 8 (the default): that layer's LR transposed (K-major tile); B padded to 16 rows.
  narrow = operands(8)
  assert narrow.count("tensor<3x1x256x2x128xbf16>") == 2 and "tensor<1x1x8x256xbf16>" in narrow
  assert "tensor<1x2x16x128xbf16>" in narrow


@needs_mgpu
def test_decode_stays_on_triton():
  lowered = _lower(1, 128, 8)
  assert not _mgpu_calls(lowered)
  assert "__gpu$xla.gpu.triton" in lowered.as_text()


# GPU interpret mode: (case, dict of shapes / knobs), all checked against the float64 numpy
# reference of bench/gpu_mgpu_check.py. Defaults: b 1, tq 128, s 256, hq = hkv = 1, d 64, r 8.
INTERPRET_CASES = [
    ("lr_pad 16 r8: ragged rows, stacked layers, lse", dict(tq=256, b=2, hq=2, hkv=2, kv=[256, 100], layers=2,
                                                           lse=True, knobs=dict(lr_pad=16))),
    ("GQA, q_offsets, empty row, tq padding, r24", dict(tq=100, b=2, hq=2, hkv=1, kv=[200, 0], qoff=[50, 0],
                                                         r=24)),
    ("non-causal ragged r64 d128 lse", dict(causal=False, kv=[150], r=64, d=128, lse=True)),
    ("plain GQA 4:1 lse", dict(hq=4, hkv=1, r=0, lse=True)),
    ("float16 r16, one-block cache", dict(s=128, r=16, dtype="float16", lse=True)),
    ("q_offsets 200, block_k 128, r32", dict(s=512, tq=256, r=32, qoff=[200], knobs=dict(block_k=128))),
    ("empty row with LoRA, lse", dict(b=2, kv=[256, 0], lse=True)),
    ("GQA 2:1 + LoRA r64 d128 + lse", dict(hq=2, hkv=1, r=64, d=128, lse=True)),
    # lr_pad 8 (8-column K-major LR tile) at ranks 8 / 4 / 1.
    ("lr_pad 8 r8: ragged rows, tq padding, stacked layers", dict(tq=100, b=2, kv=[200, 256], layers=2, r=8,
                                                                  knobs=dict(lr_pad=8))),
    ("lr_pad 8 r4: GQA, block_k 128, q_offsets", dict(hq=2, hkv=1, r=4, s=512, tq=256, qoff=[200],
                                                     knobs=dict(lr_pad=8, block_k=128))),
    ("lr_pad 8 r1: non-causal ragged d128, lse", dict(causal=False, kv=[150], r=1, d=128, lse=True,
                                                     knobs=dict(lr_pad=8))),
]

_CHILD = r"""
import json, sys, math
import jax, jax.numpy as jnp, numpy as np
from pallas_kernels import flash_lora_attention
from bench.gpu_mgpu_check import numpy_reference
cases = json.loads(sys.argv[1])
for name, c in cases:
  dt = jnp.dtype(c.get("dtype", "bfloat16"))
  b, tq, s, hq, hkv = c.get("b", 1), c.get("tq", 128), c.get("s", 256), c.get("hq", 1), c.get("hkv", 1)
  d, r, layers = c.get("d", 64), c.get("r", 8), c.get("layers", 1)
  ks = jax.random.split(jax.random.key(0), 5)
  rnd = lambda key, shape, sc=1.0: (sc * jax.random.normal(key, shape, jnp.float32)).astype(dt)
  q, k, v = rnd(ks[0], (b, tq, hq, d)), rnd(ks[1], (layers, b, s, hkv, d)), rnd(ks[2], (layers, b, s, hkv, d))
  lr = rnd(ks[3], (layers, b, s, r)) if r else None
  bm = rnd(ks[4], (b, hkv, r, d), 0.3) if r else None
  kv = np.asarray(c.get("kv", [s] * b), np.int32)
  qoff = np.asarray(c["qoff"], np.int32) if "qoff" in c else kv - tq
  scale = np.repeat(np.linspace(0.5, 2.0, b)[:, None], hq, 1).astype(np.float32)
  res = flash_lora_attention(q, k, v, lr, bm, lora_scale=jnp.asarray(scale), kv_lengths=kv, q_offsets=qoff,
                             causal=c.get("causal", True), layer=layers - 1, backend="mosaic_gpu",
                             interpret=True, return_lse=c.get("lse", False), **c.get("knobs", {}))
  out, lse = res if c.get("lse") else (res, None)
  f64 = lambda x: None if x is None else np.asarray(jnp.asarray(x, jnp.float32), np.float64)
  ref, ref_lse = numpy_reference(f64(q), f64(k[-1]), f64(v[-1]), None if lr is None else f64(lr[-1]), f64(bm),
                                 scale, kv, qoff, causal=c.get("causal", True), sm_scale=1 / math.sqrt(d))
  row = dict(name=name, dtype=dt.name, err=float(np.abs(f64(out) - ref).max() / np.abs(ref).max()),
             unseen_zero=bool(np.all(f64(out)[~np.isfinite(ref_lse)] == 0)))
  if lr is not None:   # how large the LoRA term is next to the error tolerance
    plain, _ = numpy_reference(f64(q), f64(k[-1]), f64(v[-1]), None, None, scale, kv, qoff,
                               causal=c.get("causal", True), sm_scale=1 / math.sqrt(d))
    row["lora_rel"] = float(np.abs(ref - plain).max() / np.abs(ref).max())
  if lse is not None:
    lse = np.asarray(lse, np.float64)
    fin = np.isfinite(ref_lse)
    row.update(lse_inf_match=bool(np.array_equal(fin, np.isfinite(lse))),
               lse_err=float(np.abs(lse[fin] - ref_lse[fin]).max()))
  print("ROW " + json.dumps(row), flush=True)
"""


@pytest.fixture(scope="module")
def interpret_rows():
  import json
  import os
  import subprocess
  import sys
  from pallas_kernels.mosaic_gpu import interpret_available
  if not interpret_available():
    pytest.skip(f"JAX {jax.__version__} has no Pallas GPU interpret mode")
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  try:
    proc = subprocess.run([sys.executable, "-c", _CHILD, json.dumps(INTERPRET_CASES)], cwd=root,
                          capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONPATH": root, "JAX_PLATFORMS": "cpu"})
    text, err = proc.stdout, proc.stderr
  except subprocess.TimeoutExpired as e:
    text, err = (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or ""), "timed out"
  rows = {}
  for line in text.splitlines():
    if line.startswith("ROW "):
      row = json.loads(line[4:])
      rows[row["name"]] = row
  return rows, err[-3000:]


@pytest.mark.parametrize("name", [n for n, _ in INTERPRET_CASES])
def test_interpret_matches_float64(interpret_rows, name):
  """bfloat16: within 1.5e-2 of max |ref| (P and the output rounded to bfloat16: 2^-8 each;
  measured ~3e-3); float16 within 4e-3 (2^-11; measured ~4e-4). lse (float32 from 16-bit
  scores) within 1e-4 absolute, -inf exactly where a row sees no key; such rows are 0."""
  rows, err = interpret_rows
  assert name in rows, f"interpret-mode case did not finish: {err}"
  row = rows[name]
  assert row["err"] < (4e-3 if row["dtype"] == "float16" else 1.5e-2), row
  if name.startswith("lr_pad 8"):
    # The LoRA term is >= 10x the tolerance: a lost or half-lost P @ LR product fails above.
    assert row["lora_rel"] > 0.15, row
  assert row["unseen_zero"], row
  if "lse_err" in row:
    assert row["lse_inf_match"] and row["lse_err"] < 1e-4, row


@needs_mgpu
@pytest.mark.parametrize("layer_mode", ["per_layer", "scan"])
def test_engine_programs_lower_with_mosaic_gpu_prefill_and_triton_decode(layer_mode):
  """The engine's own programs with attention="mosaic_gpu" (what the trace runs with
  `--attention mosaic_gpu`): the prefill chunk lowers for cuda with one Mosaic GPU kernel,
  called once per layer (per_layer) or from the layer loop (scan), nothing on Triton; the decode loop runs the
  Triton split-K kernel and no Mosaic GPU one. A bf16 model with head_dim 64, shared-A LoRA
  rank 8, a LoRAKV cache of 256 slots (a multiple of 64)."""
  import dataclasses

  from flax import nnx

  from lragent_jax.cache import AttnOptions, LoRAKV
  from lragent_jax.config import preset
  from lragent_jax.engine import Engine
  from lragent_jax.lora import random_adapters
  from lragent_jax.model import Llama
  from lragent_jax.sampling import SamplingParams

  cfg = dataclasses.replace(preset("tiny"), head_dim=64, num_layers=2)
  dt = jnp.bfloat16
  engine = Engine(Llama(cfg, dtype=dt, rngs=nnx.Rngs(0), min_matmul_rows=2), random_adapters(cfg, rank=8, dtype=dt),
                  layer_mode=layer_mode)
  cache = LoRAKV.create(cfg, 1, 256, 8, dt, opts=AttnOptions(impl="mosaic_gpu"))
  i32 = lambda *x: jnp.asarray(x, jnp.int32)
  # every input exists before the abstract-device context (JAX >= 0.12 runs nothing eagerly in it)
  chunk = (engine.params, engine.lora, cache, jnp.zeros((1, 128), jnp.int32), i32(0), i32(128), i32(1),
           jnp.asarray(True))
  loop = (engine.params, engine.lora, cache, i32(5), i32(128), i32(1), SamplingParams.make(1, greedy=True),
          jax.random.key(0), i32(4), i32(-2))
  with _target():
    prefill = engine._forward.trace(*chunk, layers=(0, cfg.num_layers), all_logits=False).lower(
        lowering_platforms=("cuda",))
    decode = engine._decode.trace(*loop, buffer=32).lower(lowering_platforms=("cuda",))
  # One Mosaic GPU kernel lowered per program, called once per layer (per_layer) or from the
  # layer loop (scan): each lowering gets a fresh module name in JAX 0.11.2, hence its own hash
  # and its own compile at run time, so one lowering per shape is what keeps warm-up short.
  text = prefill.as_text()
  want_calls = cfg.num_layers if layer_mode == "per_layer" else 1
  assert len(_mgpu_calls(prefill)) == 1 and "__gpu$xla.gpu.triton" not in text
  assert len(re.findall(r"\bcall @_prefill\(", text)) == want_calls
  assert not _mgpu_calls(decode) and "__gpu$xla.gpu.triton" in decode.as_text()


@needs_mgpu
def test_sharded_engine_prefill_lowers_with_mosaic_gpu_per_device():
  """Tensor parallel (model=2, an abstract two-GPU mesh) with attention="mosaic_gpu" (what
  "auto" is on Hopper): the prefill chunk lowers for cuda with the Mosaic GPU kernel under
  shard_map, on each device's share of the heads (2 of 4 query heads, 1 of 2 KV heads); no
  cache is gathered for it."""
  import dataclasses

  from flax import nnx
  from jax.sharding import AbstractMesh, AxisType

  from lragent_jax import sharding
  from lragent_jax.cache import AttnOptions, LoRAKV
  from lragent_jax.config import preset
  from lragent_jax.engine import Engine
  from lragent_jax.lora import random_adapters
  from lragent_jax.model import Llama

  cfg = dataclasses.replace(preset("tiny"), head_dim=64, num_layers=2)
  assert (cfg.num_heads, cfg.num_kv_heads) == (4, 2)
  dt = jnp.bfloat16
  model = nnx.eval_shape(lambda: Llama(cfg, dtype=dt, rngs=nnx.Rngs(0), min_matmul_rows=1))
  lora = jax.eval_shape(lambda: random_adapters(cfg, rank=8, dtype=dt))
  lora = lora.replace(projections={k: v.replace(shared_a=True) for k, v in lora.projections.items()})
  engine = Engine(model, lora, layer_mode="per_layer")   # shapes only: lowered, never run
  device = abstract_h100()
  mesh = AbstractMesh((1, 2), sharding.MESH_AXES, axis_types=(AxisType.Auto, AxisType.Auto),
                      **({} if device is None else {"abstract_device": device}))
  rules = sharding.rules_for(cfg, mesh)
  cache = jax.eval_shape(lambda: LoRAKV.create(cfg, 1, 256, 8, dt, opts=AttnOptions(impl="mosaic_gpu")))
  args = ((placed_shapes(engine.params[0], sharding.weight_shardings(engine.params[0], mesh, rules)), None),
          placed_shapes(lora, sharding.lora_shardings(lora, mesh, rules)),
          placed_shapes(cache, sharding.cache_shardings(cache, mesh, rules)))
  i = jax.ShapeDtypeStruct((1,), jnp.int32)
  with jax.sharding.use_abstract_mesh(mesh):
    lowered = engine._forward.trace(*args, jax.ShapeDtypeStruct((1, 128), jnp.int32), i, i, i,
                                    jax.ShapeDtypeStruct((), jnp.bool_), layers=(0, cfg.num_layers),
                                    all_logits=False).lower(lowering_platforms=("cuda",))
  calls = _mgpu_calls(lowered)
  assert len(calls) == 1 and "__gpu$xla.gpu.triton" not in lowered.as_text()
  operands = calls[0].split(" : (")[-1]
  assert "tensor<1x128x2x64xbf16>" in operands             # q: this device's 2 query heads
  assert operands.count("tensor<2x1x256x1x64xbf16>") == 2   # K, V: 1 KV head, all layers, in place
  assert "all-gather" not in lowered.as_text() and "all_gather" not in lowered.as_text()


@pytest.mark.parametrize("cc,want", [("9.0", True), ("8.0", False), ("8.9", False), ("10.0", False),
                                     ("12.0", False)])
def test_mosaic_gpu_available_only_on_hopper(monkeypatch, cc, want):
  """The prefill is wgmma (sm_90a only: Blackwell, 10.x and 12.x, has tcgen05 instead), so
  "auto" may pick it on compute capability 9.x only."""
  import importlib
  from types import SimpleNamespace
  fla = importlib.import_module("pallas_kernels.flash_lora_attention")
  monkeypatch.setattr(fla.jax, "devices", lambda: [SimpleNamespace(platform="gpu", compute_capability=cc)])
  assert fla.mosaic_gpu_available() is want


@pytest.mark.parametrize("cc", ["8.0", "10.0"])
def test_mosaic_gpu_by_name_on_another_gpu_is_one_clear_line(monkeypatch, cc):
  """Asked for by name on an Ampere or Blackwell GPU: a ValueError naming the device and what to
  use, raised before any lowering (wgmma would fail to compile there)."""
  import importlib
  from types import SimpleNamespace
  fla = importlib.import_module("pallas_kernels.flash_lora_attention")
  dev = SimpleNamespace(platform="gpu", compute_capability=cc, device_kind="NVIDIA X")
  monkeypatch.setattr(fla.jax, "devices", lambda: [dev])
  q, k, v, lr, bm = _inputs(tq=128, s=128, d=64, dtype=jnp.bfloat16)
  with pytest.raises(ValueError, match=rf"backend 'mosaic_gpu' runs on Hopper GPUs \(compute capability 9.x\); "
                                       rf"this NVIDIA X is {float(cc):g}: use backend 'triton' or 'auto'"):
    flash_lora_attention(q, k, v, lr, bm, layer=1, backend="mosaic_gpu")


def test_fallback_without_pallas_triton_runs_the_xla_path(monkeypatch):
  """A decode call (which the Mosaic GPU kernel hands on) on a JAX without Pallas Triton runs the
  XLA path instead of failing to import Triton."""
  import importlib
  fla = importlib.import_module("pallas_kernels.flash_lora_attention")
  monkeypatch.setattr(fla, "triton_available", lambda: False)
  calls, xla = [], fla.xla_chunked.chunked_from_canon
  monkeypatch.setattr(fla.xla_chunked, "chunked_from_canon", lambda *a, **kw: calls.append(1) or xla(*a, **kw))
  q, k, v, lr, bm = _inputs(tq=1, s=64)
  with pytest.warns(UserWarning, match="no Pallas Triton backend"):
    got = flash_lora_attention(q, k, v, lr, bm, layer=1, backend="mosaic_gpu", interpret=True)
  want = reference_attention(q, k, v, lr, bm, layer=1)
  assert calls == [1]
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
