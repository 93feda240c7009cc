"""Flax NNX Llama-family decoder (Llama 2/3/3.1/3.2, Mistral) with multi-LoRA projections.

Layer weights are stacked on a leading layer axis and the layers run under a
lax.fori_loop (a scan), so compile time does not grow with depth. The model knows
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


MATMUL_IMPLS = ("xla", "triton")


def _matmul(x, w, min_rows: int = 1, out_dtype=None, impl: str = "xla"):
    """x [..., d] @ w [d, e] with float32 accumulation, in out_dtype (default x's).

    impl="triton": products of at most 16 rows run pallas_kernels.skinny_matmul (Pallas
    interpret mode off GPUs); larger ones, and impl="xla", run XLA's dot.

    min_rows: when x has fewer rows (all leading dims together) than this, zero rows
    are appended for the product and dropped after. On an H100 XLA's one-row
    (matrix-vector) product streams the weights markedly slower than its two-row
    product (docs/perf-notes.md), so a batch-1 decode step pads to two rows.
    """
    lead, d = x.shape[:-1], x.shape[-1]
    rows = math.prod(lead)
    x2 = x.reshape(rows, d)
    if impl == "triton" and rows <= 16:
        from pallas_kernels.skinny_matmul import skinny_matmul

        interpret = jax.default_backend() not in ("gpu", "cuda")
        y = skinny_matmul(x2, w, out_dtype=out_dtype or x.dtype, interpret=interpret)
        return y.reshape(*lead, w.shape[-1])
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
# Fused per-layer weights (Engine(fuse_projections=True)): name -> the LAYER_PARAMS it
# concatenates along the output dim.
FUSED_PARAMS = {"wqkv": ("wq", "wk", "wv"), "w_gate_up": ("w_gate", "w_up")}


def fused_split_points(config: ModelConfig) -> dict:
    """Where each fused matrix splits into its parts (jnp.split indices, last axis)."""
    q, kv, f = config.q_dim, config.kv_dim, config.intermediate_size
    return {"wqkv": [q, q + kv], "w_gate_up": [f]}


class DecoderLayers(nnx.Module):
    """All decoder layers' weights, stacked on axis 0 (HF weights transposed to [in, out])."""

    def __init__(self, config: ModelConfig, *, dtype, rngs: nnx.Rngs):
        L, d, f = config.num_layers, config.hidden_size, config.intermediate_size
        self.attn_norm = nnx.Param(jnp.ones((L, d), dtype))
        self.wq = nnx.Param(_normal(rngs, (L, d, config.q_dim), dtype))
        self.wk = nnx.Param(_normal(rngs, (L, d, config.kv_dim), dtype))
        self.wv = nnx.Param(_normal(rngs, (L, d, config.kv_dim), dtype))
        self.wo = nnx.Param(_normal(rngs, (L, config.q_dim, d), dtype))
        self.mlp_norm = nnx.Param(jnp.ones((L, d), dtype))
        self.w_gate = nnx.Param(_normal(rngs, (L, d, f), dtype))
        self.w_up = nnx.Param(_normal(rngs, (L, d, f), dtype))
        self.w_down = nnx.Param(_normal(rngs, (L, f, d), dtype))


class Llama(nnx.Module):
    """Llama-family causal LM. Random weights (seeded by rngs) until loading.py fills them."""

    def __init__(self, config: ModelConfig, *, dtype=jnp.bfloat16, rngs: nnx.Rngs | None = None,
                 min_matmul_rows: int | None = None, matmul_impl: str = "xla"):
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
        # "triton": weight products of <= 16 rows (decode) through pallas_kernels.skinny_matmul.
        if matmul_impl not in MATMUL_IMPLS:
            raise ValueError(f"matmul_impl must be one of {MATMUL_IMPLS}, got {matmul_impl!r}")
        if matmul_impl == "triton" and jax.default_backend() == "tpu":
            raise ValueError('matmul_impl="triton" is a GPU kernel; use "xla" on TPU')
        self.matmul_impl = matmul_impl
        self.dtype = jnp.dtype(dtype)
        self.embed = nnx.Param(_normal(rngs, (config.vocab_size, config.hidden_size), dtype))
        self.layers = DecoderLayers(config, dtype=dtype, rngs=rngs)
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
        if self.lm_head is None:  # tied: XLA reads the table transposed in place; a kernel would need a copy
            return _matmul(h, self.embed[...].T, self.min_matmul_rows, out_dtype=jnp.float32)
        return _matmul(h, self.lm_head[...], self.min_matmul_rows, out_dtype=jnp.float32, impl=self.matmul_impl)

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
        scan: bool = True,
        layer_weights: list | None = None,
    ):
        """Run decoder layers [start, stop) on hidden states x [B, S, d]; returns (x, cache).

        `cache` is any cache view from cache.py: per layer it receives (layer, q, k, values)
        and returns the attention output and its updated self. scan=True runs the layers in
        a lax.fori_loop (compile time independent of depth); scan=False unrolls them with
        static layer indices (longer compiles; lets XLA see each layer's weights statically).
        layer_weights: optional per-layer dicts {name: array} (LAYER_PARAMS) used instead of the
        stacked weights, so no layer slice is ever copied (requires scan=False); a dict may
        hold q|k|v as "wqkv" and gate|up as "w_gate_up" (FUSED_PARAMS) instead.
        """
        cfg = self.config
        start, stop = layers if layers is not None else (0, cfg.num_layers)
        B, S, _ = x.shape
        cos, sin = self.rope(step.positions)
        w = self.layers
        ids = step.adapter_ids
        lp = {p: (lora.get(p) if lora is not None else None) for p in ("q", "k", "v", "o", "gate", "up", "down")}

        if layer_weights is not None and scan:
            raise ValueError("per-layer weights need scan=False (unrolled layers)")
        if layer_weights is None and w.wq[...].ndim != 3:
            raise ValueError("this model's stacked layer weights were released to a per-layer Engine; "
                             "call lragent_jax.engine.ensure_stacked(model) first")

        # A cache view may declare it needs no new K / V_base (it only writes LR): skip them.
        needs_kv = getattr(cache, "needs_new_kv", True)

        def with_lora(name, layer, h, y):
            return y if lp[name] is None else y + lp[name].delta(layer, h, ids)

        def mm(h, weight):
            return _matmul(h, weight, self.min_matmul_rows, impl=self.matmul_impl)

        def proj(name, layer, h, weight):
            return with_lora(name, layer, h, mm(h, weight))

        splits = fused_split_points(cfg)

        def body(layer, carry):
            x, cache = carry
            if layer_weights is not None:
                lw = layer_weights[layer]
            else:
                lw = {name: getattr(w, name)[...][layer] for name in LAYER_PARAMS}
            h = rms_norm(x, lw["attn_norm"], cfg.rms_norm_eps)
            if "wqkv" in lw and needs_kv:  # fused weights (Engine(fuse_projections=True)): one product
                q, k, v_base = jnp.split(mm(h, lw["wqkv"]), splits["wqkv"], axis=-1)
                q, k = with_lora("q", layer, h, q), with_lora("k", layer, h, k)
            elif "wqkv" in lw:  # catch-up: only q's columns (K and V_base are cached already)
                q = proj("q", layer, h, lw["wqkv"][:, :cfg.q_dim])
                k = v_base = None
            else:
                q = proj("q", layer, h, lw["wq"])
                if needs_kv:
                    k = proj("k", layer, h, lw["wk"])
                    v_base = mm(h, lw["wv"])
                else:  # the cache already holds these tokens' K and V_base (base_shared catch-up)
                    k = v_base = None
            q = q.reshape(B, S, cfg.num_heads, cfg.head_dim)
            if needs_kv:
                k = k.reshape(B, S, cfg.num_kv_heads, cfg.head_dim)
                v_base = v_base.reshape(B, S, cfg.num_kv_heads, cfg.head_dim)
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
            if "w_gate_up" in lw:
                gate, up = jnp.split(mm(h, lw["w_gate_up"]), splits["w_gate_up"], axis=-1)
                gate, up = with_lora("gate", layer, h, gate), with_lora("up", layer, h, up)
            else:
                gate = proj("gate", layer, h, lw["w_gate"])
                up = proj("up", layer, h, lw["w_up"])
            x = x + proj("down", layer, jax.nn.silu(gate) * up, lw["w_down"])
            return x, cache

        if stop <= start:
            return x, cache
        if not scan:
            carry = (x, cache)
            for layer in range(start, stop):
                carry = body(layer, carry)
            return carry
        return jax.lax.fori_loop(start, stop, body, (x, cache))
