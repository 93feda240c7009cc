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


def _xla_attention(q, k, v, lr, lora_b, scale, kv_lengths, q_offsets, sliding_window, *, causal=True,
                   return_lse=False):
    """Reference attention in float32. q [B,S,Hq,D]; k,v [B,T,Hkv,*]; lr [B,T,r] or None.

    lora_b: [B, Hkv, r, D] (per KV head) or [B, Hq, r, D] (per query head); scale: [B] or
    [B, Hq]. With return_lse also returns the log-sum-exp of the scores [B, S, Hq] (-inf for
    rows that see no key), so partial attentions can be merged (pallas_kernels.merge).
    """
    B, S, Hq, D = q.shape
    T, Hkv = k.shape[1], k.shape[2]
    G = Hq // Hkv
    kf = k.astype(jnp.float32)
    vf = v.astype(jnp.float32)
    key_pos = jnp.arange(T)
    if lr is not None:
        # per query head B and scale: [B, Hkv, G, r, D] and [B, Hkv, G]
        b5 = lora_b.astype(jnp.float32)
        b5 = b5[:, :, None] if b5.shape[1] == Hkv and Hq != Hkv else b5.reshape(B, Hkv, G, *b5.shape[2:])
        b5 = jnp.broadcast_to(b5, (B, Hkv, G) + lora_b.shape[2:])
        sc = jnp.asarray(scale, jnp.float32)
        sc = jnp.broadcast_to(sc[:, None] if sc.ndim == 1 else sc, (B, Hq)).reshape(B, Hkv, G)

    def chunk(q_c, row0):
        # q_c [B, C, Hq, D]; rows row0 .. row0+C of the query block.
        C = q_c.shape[1]
        qg = q_c.astype(jnp.float32).reshape(B, C, Hkv, G, D)
        s = jnp.einsum("bchgd,bthd->bhgct", qg, kf) / jnp.sqrt(jnp.float32(D))
        q_pos = q_offsets[:, None] + row0 + jnp.arange(C)[None, :]  # [B, C]
        mask = jnp.broadcast_to(key_pos[None, None, :] < kv_lengths[:, None, None], (B, C, T))
        if causal:
            mask &= key_pos[None, None, :] <= q_pos[:, :, None]
        if sliding_window is not None:
            mask &= key_pos[None, None, :] > q_pos[:, :, None] - sliding_window
        mask = mask[:, None, None]  # [B,1,1,C,T]
        s = jnp.where(mask, s, -jnp.inf)
        m = jnp.max(s, axis=-1, keepdims=True)
        m = jnp.where(jnp.isfinite(m), m, 0.0)
        p = jnp.where(mask, jnp.exp(s - m), 0.0)
        l = jnp.sum(p, axis=-1, keepdims=True)
        lse = jnp.where(l > 0, m + jnp.log(jnp.where(l > 0, l, 1.0)), -jnp.inf)  # [B,Hkv,G,C,1]
        p = p / jnp.where(l == 0, 1.0, l)  # fully masked rows -> zeros, not NaN
        o = jnp.einsum("bhgct,bthd->bchgd", p, vf)
        if lr is not None:
            plr = jnp.einsum("bhgct,btr->bchgr", p, lr.astype(jnp.float32))
            o = o + sc[:, None, :, :, None] * jnp.einsum("bchgr,bhgrd->bchgd", plr, b5)
        lse = lse[..., 0].transpose(0, 3, 1, 2).reshape(B, C, Hq)
        return o.reshape(B, C, Hq, v.shape[-1]), lse

    if S <= _XLA_Q_CHUNK:
        out, lse = chunk(q, 0)
    else:
        n = -(-S // _XLA_Q_CHUNK)
        pad = n * _XLA_Q_CHUNK - S
        qp = jnp.pad(q, ((0, 0), (0, pad), (0, 0), (0, 0)))
        qc = qp.reshape(B, n, _XLA_Q_CHUNK, Hq, D).swapaxes(0, 1)
        outs, lses = jax.lax.map(lambda a: chunk(a[0], a[1]), (qc, jnp.arange(n) * _XLA_Q_CHUNK))
        out = outs.swapaxes(0, 1).reshape(B, n * _XLA_Q_CHUNK, Hq, -1)[:, :S]
        lse = lses.swapaxes(0, 1).reshape(B, n * _XLA_Q_CHUNK, Hq)[:, :S]
    out = out.astype(q.dtype)
    return (out, lse) if return_lse else out


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
    causal: bool = True,
    return_lse: bool = False,
):
    """Attention of q [B,S,Hq,D] over a stacked cache's layer `layer`.

    k_cache, v_cache: [L, B, T, Hkv, D]; lr_cache: [L, B, T, r] or None; lora_b: [B, Hkv, r, D]
    (each row's agent B) or [B, Hq, r, D] (per query head); lora_scale: [B] or [B, Hq]. Query
    row t of batch row b sits at absolute position q_offsets[b] + t and sees keys j < kv_lengths[b]
    (and j <= its position when causal). naive_expansion: materialise V = V_base + s LR B for the
    layer first (the ablation). return_lse: also return the scores' log-sum-exp [B, S, Hq].
    """
    impl = resolve_impl(impl)
    if lr_cache is not None and (lora_b is None or lora_scale is None):
        raise ValueError("lr_cache given without lora_b and lora_scale")
    if impl == "pallas" and sliding_window is not None and sliding_window < k_cache.shape[2]:
        raise NotImplementedError(
            f"the pallas attention has no sliding window (sliding_window={sliding_window} < "
            f"max_len={k_cache.shape[2]}); use attention impl 'xla' or max_len <= sliding_window"
        )
    kw = dict(kv_lengths=kv_lengths, q_offsets=q_offsets, causal=causal, return_lse=return_lse)
    if naive_expansion and lr_cache is not None:
        expanded = jnp.einsum("btr,bhrd->bthd", lr_cache[layer].astype(jnp.float32),
                              lora_b.astype(jnp.float32))
        v = v_cache[layer].astype(jnp.float32) + lora_scale[:, None, None, None] * expanded
        return _attend_layer(q, k_cache[layer], v.astype(v_cache.dtype), None, None, None, impl=impl,
                             sliding_window=sliding_window, **kw)
    if impl == "pallas":
        from pallas_kernels.flash_lora_attention import flash_lora_attention

        extra = {"return_lse": True} if return_lse else {}  # only kernels with LSE output take it
        return flash_lora_attention(
            q, k_cache, v_cache, lr_cache, lora_b, lora_scale=lora_scale if lora_b is not None else 1.0,
            kv_lengths=kv_lengths, q_offsets=q_offsets, causal=causal, layer=layer, **extra,
        )
    lr = None if lr_cache is None else lr_cache[layer]
    return _attend_layer(q, k_cache[layer], v_cache[layer], lr, lora_b, lora_scale, impl=impl,
                         sliding_window=sliding_window, **kw)


def _attend_layer(q, k, v, lr, lora_b, lora_scale, *, impl, sliding_window, kv_lengths, q_offsets, causal,
                  return_lse):
    """Attention over one layer's (already sliced) arrays."""
    if impl == "pallas":
        from pallas_kernels.flash_lora_attention import flash_lora_attention

        extra = {"return_lse": True} if return_lse else {}
        return flash_lora_attention(
            q, k, v, lr, lora_b, lora_scale=lora_scale if lora_b is not None else 1.0,
            kv_lengths=kv_lengths, q_offsets=q_offsets, causal=causal, **extra,
        )
    return _xla_attention(q, k, v, lr, lora_b, lora_scale, kv_lengths, q_offsets, sliding_window, causal=causal,
                          return_lse=return_lse)


def attend_concurrent(
    q: jax.Array,
    *,
    n_agents: int,
    layer,
    prefix_k: jax.Array,
    prefix_v: jax.Array,
    prefix_lr: jax.Array | None,
    prefix_lengths: jax.Array,
    suffix_k: jax.Array,
    suffix_v: jax.Array,
    suffix_lr: jax.Array | None,
    suffix_lengths: jax.Array,
    suffix_q_offsets: jax.Array,
    lora_b: jax.Array | None,
    lora_scale: jax.Array | None,
    impl: str = "xla",
) -> jax.Array:
    """N agents' branches forked from one shared prefix: the cascade pattern.

    q: [B*N, S, Hq, D], row b*N + i = agent i's branch of trajectory b. The prefix cache
    ([L, B, T, ...]) is read ONCE per KV head for all agents: their queries are stacked as extra
    query rows of each KV head, each with its agent's B (per query head). Each branch's own
    suffix ([L, B*N, S_suf, ...], slot 0 = the fork position) is attended causally per row. The
    two parts merge with log-sum-exp weights. lora_b: [B*N, Hkv, r, D]; lora_scale: [B*N].
    """
    R, S, Hq, D = q.shape
    N = n_agents
    B, Hkv = R // N, prefix_k.shape[3]
    G = Hq // Hkv
    # q head (kv, i, g): KV head kv's rows hold every agent's G query heads, contiguous.
    qs = q.reshape(B, N, S, Hkv, G, D).transpose(0, 2, 3, 1, 4, 5).reshape(B, S, Hkv * N * G, D)
    pb = ps = None
    if prefix_lr is not None:
        r = lora_b.shape[2]
        pb = lora_b.reshape(B, N, Hkv, 1, r, D).transpose(0, 2, 1, 3, 4, 5)
        pb = jnp.broadcast_to(pb, (B, Hkv, N, G, r, D)).reshape(B, Hkv * N * G, r, D)
        ps = jnp.broadcast_to(lora_scale.reshape(B, 1, N, 1), (B, Hkv, N, G)).reshape(B, Hkv * N * G)
    o_p, lse_p = attend(qs, prefix_k, prefix_v, layer=layer, kv_lengths=prefix_lengths,
                        q_offsets=jnp.zeros_like(prefix_lengths), lr_cache=prefix_lr, lora_b=pb, lora_scale=ps,
                        impl=impl, causal=False, return_lse=True)
    o_p = o_p.reshape(B, S, Hkv, N, G, D).transpose(0, 3, 1, 2, 4, 5).reshape(R, S, Hq, D)
    lse_p = lse_p.reshape(B, S, Hkv, N, G).transpose(0, 3, 1, 2, 4).reshape(R, S, Hq)
    o_s, lse_s = attend(q, suffix_k, suffix_v, layer=layer, kv_lengths=suffix_lengths, q_offsets=suffix_q_offsets,
                        lr_cache=suffix_lr, lora_b=lora_b if suffix_lr is not None else None,
                        lora_scale=lora_scale if suffix_lr is not None else None, impl=impl, return_lse=True)
    from pallas_kernels.merge import merge_attention  # exact: O is linear in P (see its docstring)

    return merge_attention(o_p, lse_p, o_s, lse_s)[0]
