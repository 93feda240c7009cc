"""The "mosaic_gpu" backend (Pallas Mosaic GPU prefill for Hopper) on a CPU-only machine.

* knob checks and the calls it hands to the Triton kernels (decode, interpret mode,
  float32, head_dim no multiple of 64): those run here in interpret mode against the
  float32 XLA reference;
* lowering for cuda: `jax.jit(f).trace(...).lower(lowering_platforms=("cuda",))` runs
  the whole Pallas -> Mosaic GPU lowering in Python (shared-memory transforms, wgmma
  shape and swizzle rules, layouts, barriers), which is where a bad tile or a dtype
  mismatch (the float16 tiles of JAX's example with bfloat16 inputs) fails; the PTX
  compile happens later, on a GPU. Numerics need the GPU: bench/gpu_mgpu_check.py.
"""
from __future__ import annotations

import contextlib
import importlib.util

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

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
    (dict(num_warps=4), "unknown keyword 'num_warps' for backend 'mosaic_gpu'"),
])
def test_bad_knobs(kw, msg):
  q, k, v, lr, bm = _inputs()
  with pytest.raises(ValueError, match=msg):
    flash_lora_attention(q, k, v, lr, bm, layer=1, backend="mosaic_gpu", interpret=True, **kw)


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
  """Interpret mode runs the Triton kernels (decode for tq=1, prefill for 40): float32,
  so within 2e-5 of the float32 XLA reference (summation order only)."""
  q, k, v, lr, bm = _inputs(tq=tq)
  kw = dict(lora_scale=1.5, layer=1, kv_lengths=jnp.array([64, 50]), q_offsets=jnp.array([24, 3]))
  out = flash_lora_attention(q, k, v, lr, bm, backend="mosaic_gpu", interpret=True, **kw)
  ref = reference_attention(q, k, v, lr, bm, **kw)
  np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=2e-5, rtol=2e-5)


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


def _target():
  """JAX >= 0.12 lowers for cuda on a CPU machine only with an abstract GPU device."""
  sharding = jax.sharding
  if not hasattr(sharding, "AbstractDevice"):
    return contextlib.nullcontext()
  device = sharding.AbstractDevice(device_kind="NVIDIA H100", num_cores=132, platform="cuda")
  return sharding.use_abstract_mesh(sharding.AbstractMesh((1,), ("x",), abstract_device=device))


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
    (200, 128, 24, jnp.float16, dict(return_lse=True)),
    (256, 128, 64, jnp.bfloat16, dict(block_k=64)),
    (128, 64, 16, jnp.bfloat16, dict(per_q_b=True)),
    (256, 256, 32, jnp.bfloat16, dict(block_k=64)),
    (384, 128, None, jnp.bfloat16, dict(causal=False)),
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
  operands = lambda r: _mgpu_calls(_lower(256, 128, r, layers=3, s=256, b=1))[0].split(" : (")[-1]
  in_place = operands(16)
  assert in_place.count("tensor<3x1x256x2x128xbf16>") == 2       # K and V, all layers
  assert "tensor<3x1x256x16xbf16>" in in_place                   # LR, all layers
  # Rank 8 is padded to 16: only that layer's LR is copied (K and V still in place).
  padded = operands(8)
  assert padded.count("tensor<3x1x256x2x128xbf16>") == 2 and "tensor<1x1x256x16xbf16>" in padded


@needs_mgpu
def test_decode_stays_on_triton():
  lowered = _lower(1, 128, 8)
  assert not _mgpu_calls(lowered)
  assert "__gpu$xla.gpu.triton" in lowered.as_text()
