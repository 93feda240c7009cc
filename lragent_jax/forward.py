"""The plain, cache-free forward: float32 logits of whole sequences, for training.

It sits above model.py and cache.py (the model's layers over cache.ChunkKV, a view that stores
nothing), so neither of those imports the other's way back.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from .cache import ChunkKV
from .lora import LoraWeights
from .model import Llama, StepInputs


def forward_logits(model: Llama, tokens: jax.Array, lora: LoraWeights | None = None,
                   adapter_ids: jax.Array | None = None, *, lengths: jax.Array | None = None) -> jax.Array:
    """Cache-free causal forward for training: float32 logits [B, S, V].

    tokens [B, S] int32 at positions 0..S-1; adapter_ids [B] (-1: base model; default:
    adapter 0 with lora, else -1); lengths [B]: valid tokens per row (right padding: keys
    at or past a row's length are masked; the logits of padding positions are meaningless).
    Runs the engine's layers over a view that stores nothing (cache.ChunkKV: attention over
    the chunk's own K/V on the XLA path), so it is jit-able and differentiable w.r.t. the
    LoRA arrays (and the model's).
    """
    tokens = jnp.asarray(tokens, jnp.int32)
    B, S = tokens.shape
    if adapter_ids is None:
        adapter_ids = jnp.full((B,), 0 if lora is not None else -1, jnp.int32)
    positions = jnp.broadcast_to(jnp.arange(S, dtype=jnp.int32), (B, S))
    step = StepInputs(
        positions=positions,
        write_positions=positions,
        kv_lengths=jnp.full((B,), S, jnp.int32) if lengths is None else jnp.asarray(lengths, jnp.int32),
        q_offsets=jnp.zeros((B,), jnp.int32),
        adapter_ids=jnp.asarray(adapter_ids, jnp.int32),
    )
    x, _ = model.run_layers(model.embed_tokens(tokens), ChunkKV(capacity=S), step, lora)
    return model.logits(x)
