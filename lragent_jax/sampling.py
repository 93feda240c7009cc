"""Token sampling: greedy, temperature, top-k, top-p; per-row parameters as arrays.

Parameters are arrays (not static), so changing them never recompiles.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from .checks import count, finite_number

INT32_MAX = 2**31 - 1
_API_NAMES = {"temperature": "temperature", "top_k": "top_k", "top_p": "top_p"}


def check_sampling(temperature, top_k, top_p, names=None) -> tuple[float, int, float]:
    """(temperature, top_k, top_p) checked and normalised, or ValueError naming the bad one.

    temperature: finite, >= 0 (0 = greedy); inf would divide every logit to 0 (uniform
    sampling), NaN would make every draw NaN. top_k: integer in [0, 2**31 - 1] (0 = off;
    values above the vocabulary keep everything). top_p: finite in (0, 1].
    names: how to call each in the message (e.g. {"temperature": "--temperature", ...}).
    """
    n = {**_API_NAMES, **(names or {})}
    t = finite_number(temperature, n["temperature"], low=0.0)
    k = count(top_k, f"{n['top_k']} (0 = off)", minimum=0)
    if k > INT32_MAX:
        raise ValueError(f"{n['top_k']} must be <= {INT32_MAX}, got {top_k!r}")
    p = finite_number(top_p, n["top_p"], low=0.0, low_open=True, high=1.0)
    return t, k, p


@struct.dataclass
class SamplingParams:
    temperature: jax.Array  # [B] float32; 0 means greedy
    top_k: jax.Array  # [B] int32; 0 means no top-k
    top_p: jax.Array  # [B] float32; 1 means no top-p

    @classmethod
    def make(cls, batch: int, *, greedy: bool = False, temperature: float = 1.0, top_k: int = 0,
             top_p: float = 1.0) -> "SamplingParams":
        batch = count(batch, "batch")
        temperature, top_k, top_p = check_sampling(temperature, top_k, top_p)
        t = 0.0 if greedy else temperature
        return cls(
            temperature=jnp.full((batch,), t, jnp.float32),
            top_k=jnp.full((batch,), top_k, jnp.int32),
            top_p=jnp.full((batch,), top_p, jnp.float32),
        )


def filter_logits(logits: jax.Array, top_k: jax.Array, top_p: jax.Array) -> jax.Array:
    """Set logits outside each row's top-k and top-p (nucleus) sets to -inf. logits [B, V]."""
    V = logits.shape[-1]
    sorted_desc = -jnp.sort(-logits, axis=-1)
    k = jnp.where(top_k > 0, jnp.minimum(top_k, V), V)
    kth = jnp.take_along_axis(sorted_desc, (k - 1)[:, None], axis=-1)  # [B, 1]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
    # Nucleus over what top-k kept: keep the smallest prefix whose mass reaches top_p.
    sorted_desc = jnp.where(jnp.arange(V)[None, :] < k[:, None], sorted_desc, -jnp.inf)
    probs = jax.nn.softmax(sorted_desc, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    keep = mass_before < top_p[:, None]
    n_keep = jnp.maximum(jnp.sum(keep, axis=-1), 1)
    threshold = jnp.take_along_axis(sorted_desc, (n_keep - 1)[:, None], axis=-1)
    return jnp.where(logits < threshold, -jnp.inf, logits)


def sample(logits: jax.Array, params: SamplingParams, key: jax.Array) -> jax.Array:
    """Next token per row [B] int32. logits [B, V] float32."""
    greedy_tokens = jnp.argmax(logits, axis=-1).astype(jnp.int32)

    def stochastic(_):
        t = jnp.where(params.temperature > 0, params.temperature, 1.0)
        filtered = filter_logits(logits / t[:, None], params.top_k, params.top_p)
        drawn = jax.random.categorical(key, filtered, axis=-1).astype(jnp.int32)
        return jnp.where(params.temperature > 0, drawn, greedy_tokens)

    # Skip the vocabulary sort entirely when every row is greedy.
    return jax.lax.cond(jnp.any(params.temperature > 0), stochastic, lambda _: greedy_tokens, None)
