"""Flax NNX Llama-family decoder (Llama 2/3/3.1/3.2, Mistral) with multi-LoRA projections.

Each layer holds its own weight pytree (a list of DecoderLayer, as they run unrolled on
an accelerator); an Engine in "scan" mode stacks its own copy and runs the layers under a
lax.fori_loop, so compile time does not grow with depth. The model knows
nothing about cache sharing: each layer hands its queries, keys and value parts to
the cache object it is given (see cache.py), which writes what its scheme stores and
runs attention. Numerics follow transformers' LlamaForCausalLM (RMSNorm in float32,
rotate-half RoPE, float32 logits).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from .config import ModelConfig
from .lora import LoraWeights


def rope_inv_freq(config: ModelConfig) -> np.ndarray:
    """Inverse frequencies [head_dim // 2] with Llama-3 / linear scaling, as transformers does."""
    D = config.head_dim
    inv = 1.0 / (config.rope_theta ** (np.arange(0, D, 2, dtype=np.int64).astype(np.float32) / D))
    inv = inv.astype(np.float32)
    rs = config.rope_scaling_dict
    kind = config.rope_type
    if kind == "linear":
        inv = inv / np.float32(rs["factor"])
    elif kind == "llama3":
        factor = rs["factor"]
        low, high = rs["low_freq_factor"], rs["high_freq_factor"]
        old_len = rs["original_max_position_embeddings"]
        low_wavelen, high_wavelen = old_len / low, old_len / high
        wavelen = 2 * math.pi / inv
        scaled = np.where(wavelen > low_wavelen, inv / factor, inv)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        inv = np.where(medium, smoothed, scaled).astype(np.float32)
    return inv


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate-half RoPE. x [B, S, H, D]; cos, sin [B, S, D] (already in x's dtype)."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos[:, :, None, :] + rotated * sin[:, :, None, :]


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    xf = x.astype(jnp.float32)
    xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    return weight * xf.astype(x.dtype)


def _matmul(x, w, min_rows: int = 1, out_dtype=None):
    """x [..., d] @ w [d, e] with float32 accumulation, in out_dtype (default x's).

    min_rows: when x has fewer rows (all leading dims together) than this, zero rows
    are appended for the product and dropped after. On an H100 XLA's one-row
    (matrix-vector) product streams the weights markedly slower than its two-row
    product (docs/perf-notes.md), so a batch-1 decode step pads to two rows.
    """
    lead, d = x.shape[:-1], x.shape[-1]
    rows = math.prod(lead)
    x2 = x.reshape(rows, d)
    if rows < min_rows:
        x2 = jnp.concatenate([x2, jnp.zeros((min_rows - rows, d), x.dtype)], axis=0)
    y = jnp.einsum("nd,de->ne", x2, w, preferred_element_type=jnp.float32)
    return y[:rows].reshape(*lead, w.shape[-1]).astype(out_dtype or x.dtype)


@dataclasses.dataclass(frozen=True)
class ValueParts:
    """What a layer hands the cache for the value path of its new tokens."""

    base: jax.Array  # X W_v, [B, S, Hkv, D]
    lr: jax.Array | None = None  # X A_v (unscaled), [B, S, r]
    lora_b: jax.Array | None = None  # each row's B_v, [B, Hkv, r, D]
    scale: jax.Array | None = None  # each row's scale, [B] float32

    def full(self) -> jax.Array:
        """V = X W_v + s (X A_v) B_v, the value an unshared cache stores."""
        if self.lr is None:
            return self.base
        delta = jnp.einsum("bsr,bhrd->bshd", self.lr, self.lora_b, preferred_element_type=jnp.float32)
        return (self.base.astype(jnp.float32) + self.scale[:, None, None, None] * delta).astype(self.base.dtype)


@dataclasses.dataclass(frozen=True)
class StepInputs:
    """Per-call position bookkeeping shared by all layers (built by the engine)."""

    positions: jax.Array  # [B, S] absolute position of each new token
    write_positions: jax.Array  # [B, S] slot to write (== positions; out of range for padding)
    kv_lengths: jax.Array  # [B] keys visible after this chunk is written
    q_offsets: jax.Array  # [B] position of each row's first new token
    adapter_ids: jax.Array  # [B] adapter of each row (-1: base model)


def _normal(rngs: nnx.Rngs, shape, dtype, std=0.02):
    return (std * jax.random.normal(rngs.params(), shape, jnp.float32)).astype(dtype)


LAYER_PARAMS = ("attn_norm", "wq", "wk", "wv", "wo", "mlp_norm", "w_gate", "w_up", "w_down")


class DecoderLayer(nnx.Module):
    """One decoder layer's weights (HF weights transposed to [in, out])."""

    def __init__(self, config: ModelConfig, *, dtype, rngs: nnx.Rngs):
        d, f = config.hidden_size, config.intermediate_size
        self.attn_norm = nnx.Param(jnp.ones((d,), dtype))
        self.wq = nnx.Param(_normal(rngs, (d, config.q_dim), dtype))
        self.wk = nnx.Param(_normal(rngs, (d, config.kv_dim), dtype))
        self.wv = nnx.Param(_normal(rngs, (d, config.kv_dim), dtype))
        self.wo = nnx.Param(_normal(rngs, (config.q_dim, d), dtype))
        self.mlp_norm = nnx.Param(jnp.ones((d,), dtype))
        self.w_gate = nnx.Param(_normal(rngs, (d, f), dtype))
        self.w_up = nnx.Param(_normal(rngs, (d, f), dtype))
        self.w_down = nnx.Param(_normal(rngs, (f, d), dtype))

    def weights(self) -> dict:
        return {name: getattr(self, name)[...] for name in LAYER_PARAMS}


def stacked_layer_weights(model: "Llama") -> dict:
    """{name: [L, ...]}: a new stacked copy of the model's layer weights, for
    run_layers(stacked=...) (a lax.fori_loop over layers). Costs one more copy of the
    layer weights in memory; the model is not changed."""
    return {name: jnp.stack([getattr(layer, name)[...] for layer in model.layers]) for name in LAYER_PARAMS}


class Llama(nnx.Module):
    """Llama-family causal LM. Random weights (seeded by rngs) until loading.py fills them.

    The layers are a list of DecoderLayer (one weight pytree per layer, as they run
    unrolled on an accelerator: no slice of a stacked array is copied per step).
    """

    def __init__(self, config: ModelConfig, *, dtype=jnp.bfloat16, rngs: nnx.Rngs | None = None,
                 min_matmul_rows: int | None = None):
        rngs = rngs if rngs is not None else nnx.Rngs(0)
        self.config = config
        # Weight products with fewer rows are padded to this many (see _matmul);
        # None: 2 on GPUs, where one-row products are slow, else 1 (no padding).
        if min_matmul_rows is None:
            min_matmul_rows = 2 if jax.default_backend() in ("gpu", "cuda", "rocm") else 1
        if isinstance(min_matmul_rows, bool) or not isinstance(min_matmul_rows, (int, np.integer)) \
                or min_matmul_rows < 1:
            raise ValueError(f"min_matmul_rows must be a positive int, got {min_matmul_rows!r}")
        self.min_matmul_rows = int(min_matmul_rows)
        self.dtype = jnp.dtype(dtype)
        self.embed = nnx.Param(_normal(rngs, (config.vocab_size, config.hidden_size), dtype))
        self.layers = nnx.List([DecoderLayer(config, dtype=dtype, rngs=rngs) for _ in range(config.num_layers)])
        self.final_norm = nnx.Param(jnp.ones((config.hidden_size,), dtype))
        if config.tie_word_embeddings:
            self.lm_head = None
        else:
            self.lm_head = nnx.Param(_normal(rngs, (config.hidden_size, config.vocab_size), dtype))

    # ---- pieces ------------------------------------------------------------------------
    def embed_tokens(self, tokens: jax.Array) -> jax.Array:
        return jnp.take(self.embed[...], tokens, axis=0)

    def logits(self, hidden: jax.Array) -> jax.Array:
        """Final norm + LM head; float32 logits. hidden [..., d]."""
        h = rms_norm(hidden, self.final_norm[...], self.config.rms_norm_eps)
        # tied: XLA reads the table transposed in place
        head = self.embed[...].T if self.lm_head is None else self.lm_head[...]
        return _matmul(h, head, self.min_matmul_rows, out_dtype=jnp.float32)

    def rope(self, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
        inv = jnp.asarray(rope_inv_freq(self.config))
        angles = positions.astype(jnp.float32)[..., None] * inv  # [B, S, D/2]
        emb = jnp.concatenate([angles, angles], axis=-1)
        return jnp.cos(emb).astype(self.dtype), jnp.sin(emb).astype(self.dtype)

    # ---- the decoder -------------------------------------------------------------------
    def run_layers(
        self,
        x: jax.Array,
        cache,
        step: StepInputs,
        lora: LoraWeights | None,
        *,
        layers: tuple[int, int] | None = None,
        stacked: dict | None = None,
    ):
        """Run decoder layers [start, stop) on hidden states x [B, S, d]; returns (x, cache).

        `cache` is a cache view (cache.CacheView): per layer it receives (layer, q, k, values)
        and returns the attention output and its updated self. By default the layers run
        unrolled over the model's per-layer weights (static layer indices). stacked: the
        layer weights stacked on axis 0 (stacked_layer_weights), run in a lax.fori_loop
        instead: compile time independent of depth.
        """
        cfg = self.config
        start, stop = layers if layers is not None else (0, cfg.num_layers)
        B, S, _ = x.shape
        cos, sin = self.rope(step.positions)
        ids = step.adapter_ids
        lp = {p: (lora.get(p) if lora is not None else None) for p in ("q", "k", "v", "o", "gate", "up", "down")}
        # A view that already holds these tokens' K and V_base (a base_shared catch-up)
        # writes only LR: skip the k and v products.
        needs_kv = cache.needs_new_kv

        def proj(name, layer, h, weight):
            y = _matmul(h, weight, self.min_matmul_rows)
            return y if lp[name] is None else y + lp[name].delta(layer, h, ids)

        def body(layer, carry, lw):
            x, cache = carry
            h = rms_norm(x, lw["attn_norm"], cfg.rms_norm_eps)
            q = proj("q", layer, h, lw["wq"]).reshape(B, S, cfg.num_heads, cfg.head_dim)
            k = v_base = None
            if needs_kv:
                k = proj("k", layer, h, lw["wk"]).reshape(B, S, cfg.num_kv_heads, cfg.head_dim)
                v_base = _matmul(h, lw["wv"], self.min_matmul_rows).reshape(B, S, cfg.num_kv_heads, cfg.head_dim)
            if lp["v"] is not None:
                pv = lp["v"]
                values = ValueParts(
                    base=v_base,
                    lr=pv.down(layer, h, ids),
                    lora_b=pv.row_b(layer, ids).reshape(B, pv.rank, cfg.num_kv_heads, cfg.head_dim).swapaxes(1, 2),
                    scale=pv.row_scale(ids),
                )
            else:
                values = ValueParts(base=v_base)
            q = apply_rope(q, cos, sin)
            k = apply_rope(k, cos, sin) if needs_kv else None
            attn, cache = cache.update_and_attend(layer, q, k, values, step)
            x = x + proj("o", layer, attn.reshape(B, S, cfg.q_dim), lw["wo"])
            h = rms_norm(x, lw["mlp_norm"], cfg.rms_norm_eps)
            gate = proj("gate", layer, h, lw["w_gate"])
            up = proj("up", layer, h, lw["w_up"])
            x = x + proj("down", layer, jax.nn.silu(gate) * up, lw["w_down"])
            return x, cache

        if stop <= start:
            return x, cache
        if stacked is None:
            carry = (x, cache)
            for layer in range(start, stop):
                carry = body(layer, carry, self.layers[layer].weights())
            return carry
        return jax.lax.fori_loop(start, stop, lambda i, c: body(i, c, {n: w[i] for n, w in stacked.items()}),
                                 (x, cache))
