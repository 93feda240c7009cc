"""pallas_kernels.skinny_matmul: interpret mode against float64 numpy, and lowering for CUDA
(Triton IR verified), so a kernel that would not compile on a GPU fails CI."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.skinny_matmul import default_split_k, skinny_matmul


@pytest.mark.parametrize("m,k,n,dtype,kw", [
    (1, 256, 384, "float32", {}),
    (3, 300, 200, "float32", dict(block_k=64, block_n=64, split_k=3)),   # ragged K and N, 3 splits
    (16, 128, 64, "bfloat16", dict(split_k=1)),
    (2, 512, 1000, "float32", dict(block_k=32, split_k=7)),             # splits re-balanced: none empty
    (5, 64, 48, "float16", {}),
])
def test_matches_float64(m, k, n, dtype, kw):
  rng = np.random.default_rng(m * 1000 + n)
  x = jnp.asarray(rng.normal(size=(m, k)), dtype)
  w = jnp.asarray(rng.normal(size=(k, n)), dtype)
  y = skinny_matmul(x, w, interpret=True, **kw)
  assert y.shape == (m, n) and y.dtype == jnp.dtype(dtype)
  ref = np.asarray(x, np.float64) @ np.asarray(w, np.float64)
  err = np.abs(np.asarray(y, np.float64) - ref).max() / np.abs(ref).max()
  # float32 inputs: IEEE dot (HIGHEST) -> ~1e-7; 16-bit: output rounding (bf16 8 bits).
  assert err < (1e-5 if dtype == "float32" else 1e-2), err


def test_out_dtype_and_errors():
  x = jnp.ones((2, 64), jnp.bfloat16)
  w = jnp.ones((64, 32), jnp.bfloat16)
  y = skinny_matmul(x, w, out_dtype=jnp.float32, interpret=True)
  assert y.dtype == jnp.float32 and float(y[0, 0]) == 64.0
  with pytest.raises(ValueError, match="1 to 16 rows"):
    skinny_matmul(jnp.ones((17, 64), jnp.bfloat16), w, interpret=True)
  with pytest.raises(ValueError, match="x \\[M, K\\] and w \\[K, N\\]"):
    skinny_matmul(x, jnp.ones((63, 32), jnp.bfloat16), interpret=True)
  with pytest.raises(ValueError, match="one dtype"):
    skinny_matmul(x, w.astype(jnp.float32), interpret=True)
  with pytest.raises(ValueError, match="power of two"):
    skinny_matmul(x, w, block_n=48, interpret=True)


def test_default_split_fills_the_machine():
  assert default_split_k(112, 32, sms=132) == 3       # [4096 x 14336]: 112 N blocks
  assert default_split_k(32, 112, sms=132) == 9       # [14336 x 4096]
  assert default_split_k(1002, 32, sms=132) == 1      # LM head
  assert default_split_k(8, 2, sms=132) == 1          # tiny K: never below 4 K blocks a split


@pytest.mark.parametrize("m,k,n,dtype", [(1, 4096, 1024, jnp.bfloat16), (2, 300, 200, jnp.float32)])
def test_lowers_for_cuda(m, k, n, dtype):
  from tests.test_kernel_lowering import _check_triton_ir, _triton_modules

  x = jax.ShapeDtypeStruct((m, k), dtype)
  w = jax.ShapeDtypeStruct((k, n), dtype)
  lowered = jax.jit(lambda a, b: skinny_matmul(a, b)).trace(x, w).lower(lowering_platforms=("cuda",))
  texts = _triton_modules(lowered)
  _check_triton_ir(texts, min_dots=1)
