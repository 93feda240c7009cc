"""One attention entry point for the model: xla reference | naive expansion | pallas kernels.

Caches are stacked over layers ([L, B, T, H, D]); every path takes the whole stacked
array plus the layer index so the Pallas kernels can read the layer in place.

Value term, per query row and KV head h (DESIGN.md section 1):
    O_h = P V_base,h + s * (P LR) B_h          (reordered: LR never expanded)
    O_h = P (V_base,h + s * LR B_h)            (naive: expand, then attend)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

IMPLS = ("auto", "xla", "pallas")

# Queries are processed in chunks of this many rows on the XLA path so long prefills
# never materialise a [q_len, kv_len] score matrix for all rows at once.
_XLA_Q_CHUNK = 512


def check_impl(impl: str) -> str:
    if impl not in IMPLS:
        raise ValueError(f"attention impl={impl!r} is not supported; allowed: {IMPLS}")
    return impl


def resolve_impl(impl: str) -> str:
    """'auto' -> 'pallas' on GPU/TPU, 'xla' elsewhere."""
    check_impl(impl)
    if impl == "auto":
        return "pallas" if jax.default_backend() in ("gpu", "cuda", "rocm", "tpu") else "xla"
    return impl


def _xla_attention(q, k, v, lr, lora_b, scale, kv_lengths, q_offsets, sliding_window):
    """Reference attention in float32. q [B,S,Hq,D]; k,v [B,T,Hkv,*]; lr [B,T,r] or None."""
    B, S, Hq, D = q.shape
    T, Hkv = k.shape[1], k.shape[2]
    G = Hq // Hkv
    kf = k.astype(jnp.float32)
    vf = v.astype(jnp.float32)
    key_pos = jnp.arange(T)

    def chunk(q_c, row0):
        # q_c [B, C, Hq, D]; rows row0 .. row0+C of the query block.
        C = q_c.shape[1]
        qg = q_c.astype(jnp.float32).reshape(B, C, Hkv, G, D)
        s = jnp.einsum("bchgd,bthd->bhgct", qg, kf) / jnp.sqrt(jnp.float32(D))
        q_pos = q_offsets[:, None] + row0 + jnp.arange(C)[None, :]  # [B, C]
        mask = (key_pos[None, None, :] <= q_pos[:, :, None]) & (
            key_pos[None, None, :] < kv_lengths[:, None, None]
        )
        if sliding_window is not None:
            mask &= key_pos[None, None, :] > q_pos[:, :, None] - sliding_window
        mask = mask[:, None, None]  # [B,1,1,C,T]
        s = jnp.where(mask, s, -jnp.inf)
        m = jnp.max(s, axis=-1, keepdims=True)
        m = jnp.where(jnp.isfinite(m), m, 0.0)
        p = jnp.where(mask, jnp.exp(s - m), 0.0)
        l = jnp.sum(p, axis=-1, keepdims=True)
        p = p / jnp.where(l == 0, 1.0, l)  # fully masked rows -> zeros, not NaN
        o = jnp.einsum("bhgct,bthd->bchgd", p, vf)
        if lr is not None:
            plr = jnp.einsum("bhgct,btr->bchgr", p, lr.astype(jnp.float32))
            o = o + scale[:, None, None, None, None] * jnp.einsum(
                "bchgr,bhrd->bchgd", plr, lora_b.astype(jnp.float32)
            )
        return o.reshape(B, C, Hq, v.shape[-1])

    if S <= _XLA_Q_CHUNK:
        out = chunk(q, 0)
    else:
        n = -(-S // _XLA_Q_CHUNK)
        pad = n * _XLA_Q_CHUNK - S
        qp = jnp.pad(q, ((0, 0), (0, pad), (0, 0), (0, 0)))
        qc = qp.reshape(B, n, _XLA_Q_CHUNK, Hq, D).swapaxes(0, 1)
        outs = jax.lax.map(lambda a: chunk(a[0], a[1]), (qc, jnp.arange(n) * _XLA_Q_CHUNK))
        out = outs.swapaxes(0, 1).reshape(B, n * _XLA_Q_CHUNK, Hq, -1)[:, :S]
    return out.astype(q.dtype)


def attend(
    q: jax.Array,
    k_cache: jax.Array,
    v_cache: jax.Array,
    *,
    layer,
    kv_lengths: jax.Array,
    q_offsets: jax.Array,
    lr_cache: jax.Array | None = None,
    lora_b: jax.Array | None = None,
    lora_scale: jax.Array | None = None,
    impl: str = "xla",
    naive_expansion: bool = False,
    sliding_window: int | None = None,
) -> jax.Array:
    """Causal attention of q [B,S,Hq,D] over a stacked cache's layer `layer`.

    k_cache, v_cache: [L, B, T, Hkv, D]; lr_cache: [L, B, T, r] or None; lora_b: [B, Hkv, r, D]
    (each row's agent B); lora_scale: [B]. Query row t of batch row b sits at absolute
    position q_offsets[b] + t and sees keys j <= that position and j < kv_lengths[b].
    naive_expansion: materialise V = V_base + s LR B for the layer first (the ablation).
    """
    impl = resolve_impl(impl)
    if lr_cache is not None and (lora_b is None or lora_scale is None):
        raise ValueError("lr_cache given without lora_b and lora_scale")
    if impl == "pallas" and sliding_window is not None and sliding_window < k_cache.shape[2]:
        raise NotImplementedError(
            f"the pallas attention has no sliding window (sliding_window={sliding_window} < "
            f"max_len={k_cache.shape[2]}); use attention impl 'xla' or max_len <= sliding_window"
        )
    if naive_expansion and lr_cache is not None:
        expanded = jnp.einsum("btr,bhrd->bthd", lr_cache[layer].astype(jnp.float32),
                              lora_b.astype(jnp.float32))
        v = v_cache[layer].astype(jnp.float32) + lora_scale[:, None, None, None] * expanded
        return _attend_layer(q, k_cache[layer], v.astype(v_cache.dtype), None, None, None,
                             kv_lengths, q_offsets, impl, sliding_window)
    if impl == "pallas":
        from pallas_kernels.flash_lora_attention import flash_lora_attention

        return flash_lora_attention(
            q, k_cache, v_cache, lr_cache, lora_b,
            lora_scale=lora_scale if lora_b is not None else 1.0,
            kv_lengths=kv_lengths, q_offsets=q_offsets, causal=True, layer=layer,
        )
    lr = None if lr_cache is None else lr_cache[layer]
    return _attend_layer(q, k_cache[layer], v_cache[layer], lr, lora_b, lora_scale,
                         kv_lengths, q_offsets, impl, sliding_window)


def _attend_layer(q, k, v, lr, lora_b, lora_scale, kv_lengths, q_offsets, impl, sliding_window):
    """Attention over one layer's (already sliced) arrays."""
    if impl == "pallas":
        from pallas_kernels.flash_lora_attention import flash_lora_attention

        return flash_lora_attention(
            q, k, v, lr, lora_b, lora_scale=lora_scale if lora_b is not None else 1.0,
            kv_lengths=kv_lengths, q_offsets=q_offsets, causal=True,
        )
    return _xla_attention(q, k, v, lr, lora_b, lora_scale, kv_lengths, q_offsets, sliding_window)
