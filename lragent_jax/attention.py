"""One attention entry point for the model: a thin adapter over pallas_kernels.

Caches are stacked over layers ([L, B, T, H, D]); every path takes the whole stacked
array plus the layer index so the Pallas kernels can read the layer in place. The XLA
path is pallas_kernels' reference (reference.py), the naive expansion its expand_values.

Value term, per query row and KV head h (docs/kernels.md):
    O_h = P V_base,h + s * (P LR) B_h          (reordered: LR never expanded)
    O_h = P (V_base,h + s * LR B_h)            (naive: expand, then attend)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels import BACKENDS, flash_lora_attention, merge_attention, naive_lora_attention, resolve_backend

from . import sharding

# pallas_kernels' backends, plus "pallas": the platform's Pallas kernel (what "auto" picks).
IMPLS = BACKENDS + ("pallas",)


def check_impl(impl: str) -> str:
    if impl not in IMPLS:
        raise ValueError(f"attention impl={impl!r} is not supported; allowed: {IMPLS}")
    return impl


def resolve_impl(impl: str) -> str:
    """The pallas_kernels backend an impl runs: 'auto' and 'pallas' -> 'mosaic_gpu' on a Hopper
    GPU, 'triton' on other GPUs, 'mosaic_tpu' on TPU, 'xla' elsewhere; the others as named."""
    check_impl(impl)
    return resolve_backend("auto" if impl == "pallas" else impl)


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
    backend = resolve_impl(impl)
    if lr_cache is not None and (lora_b is None or lora_scale is None):
        raise ValueError("lr_cache given without lora_b and lora_scale")
    fn = naive_lora_attention if naive_expansion else flash_lora_attention
    mesh = sharding.context_mesh()
    if mesh is not None:  # traced over a mesh (Engine(mesh=...)): each device attends its own heads
        return sharding.attend_sharded(
            fn, mesh, q, k_cache, v_cache, lr_cache, lora_b if lr_cache is not None else None,
            lora_scale if lr_cache is not None else 1.0, kv_lengths, q_offsets, layer, return_lse=return_lse,
            causal=causal, sliding_window=sliding_window, backend=backend)
    return fn(q, k_cache, v_cache, lr_cache, lora_b if lr_cache is not None else None,
              lora_scale=lora_scale if lr_cache is not None else 1.0, kv_lengths=kv_lengths,
              q_offsets=q_offsets, causal=causal, layer=layer, sliding_window=sliding_window,
              backend=backend, return_lse=return_lse)


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
    return merge_attention(o_p, lse_p, o_s, lse_s)[0]  # exact: O is linear in P (see its docstring)
