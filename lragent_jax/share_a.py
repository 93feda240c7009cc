"""Make any set of LoRA adapters shared-A, so base_lr_shared can serve them (docs/design.md section 1).

"stack": per layer and projection, A = [A_1 | ... | A_N] (rank R = r_1 + ... + r_N) and agent
i's B_i' holds s_i B_i in its own r_i rows and zeros elsewhere. Then x A B_i' = s_i x A_i B_i for
every x: each agent's LoRA output is unchanged (up to float rounding of s_i B_i). The adapters'
scales s_i (alpha/r, or alpha/sqrt(r) with rsLoRA) differ in general, and a stacked adapter has
one rank, so they are folded into B and the result has alpha = rank (scale 1).

"svd": compress the stack to `rank` directions. The shared A that keeps the most of the agents'
delta weights D_i = A B_i' (Frobenius norm, summed over agents; Eckart-Young) is spanned by the
top left singular vectors of [D_1 | ... | D_N] = A [B_1' | ... | B_N'], i.e. of the stacked A
weighted by what the B's do with it (a plain SVD of A alone would keep directions some B ignores).
With A = Q R (QR), that is Q U_k for the SVD U S V^T of the small R [B_1' | ... | B_N']; then
A'' = Q U_k (orthonormal columns) and B_i'' = U_k^T R B_i', so A'' B_i'' = P_k D_i with P_k the
projection on those directions. Each agent keeps ||P_k D_i||^2 / ||D_i||^2 of its delta (summed
over layers and projections): the report gives it; it grows with rank (nested projections) and
is 1 at rank R, where svd reproduces stack's LoRA outputs.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from .config import PROJECTIONS, LoraConfig
from .lora import LoraProjection, LoraWeights

__all__ = ["share_a", "METHODS"]

METHODS = ("stack", "svd")


def _stacked_factors(adapters: LoraWeights, proj: str):
    """float64 A [L, d_in, R] and B' [L, N, R, d_out] of the exact stack for one projection."""
    p = adapters.projections[proj]
    a_all = np.asarray(jax.device_get(p.a), np.float64)
    b_all = np.asarray(jax.device_get(p.b), np.float64)
    L, d_in, d_out = a_all.shape[0], a_all.shape[2], b_all.shape[3]
    ranks = [c.rank for c in adapters.configs]
    R, N = sum(ranks), adapters.num_adapters
    a = np.zeros((L, d_in, R))
    b = np.zeros((L, N, R, d_out))
    lo = 0
    for i, (cfg, r) in enumerate(zip(adapters.configs, ranks)):
        if proj in cfg.target_modules:  # untargeted: A block and B_i' stay zero
            a[:, :, lo:lo + r] = a_all[:, 0 if p.shared_a else i, :, :r]
            b[:, i, lo:lo + r] = cfg.scale * b_all[:, i, :r]
        lo += r
    return a, b


def _compress(a: np.ndarray, b: np.ndarray, rank: int):
    """Top-`rank` shared A of the delta weights (module docstring). a [L, d_in, R], b [L, N, R, d_out]
    -> (A'' [L, d_in, rank], B'' [L, N, rank, d_out], kept energy [L, N], total energy [L, N])."""
    L, d_in, R = a.shape
    N, d_out = b.shape[1], b.shape[3]
    a_out = np.zeros((L, d_in, rank))
    b_out = np.zeros((L, N, rank, d_out))
    kept = np.zeros((L, N))
    total = np.zeros((L, N))
    for layer in range(L):
        q, r = np.linalg.qr(a[layer])  # q [d_in, m], r [m, R], m = min(d_in, R)
        rb = np.einsum("mr,nro->nmo", r, b[layer])  # R B_i' [N, m, d_out]: D_i = q (R B_i')
        u, _, _ = np.linalg.svd(np.concatenate(list(rb), axis=1), full_matrices=False)
        k = min(rank, u.shape[1])
        uk = u[:, :k]
        a_out[layer, :, :k] = q @ uk
        proj_b = np.einsum("mk,nmo->nko", uk, rb)
        b_out[layer, :, :k] = proj_b
        kept[layer] = (proj_b ** 2).sum(axis=(1, 2))
        total[layer] = (rb ** 2).sum(axis=(1, 2))
    return a_out, b_out, kept, total


def share_a(adapters: LoraWeights, method: str = "stack", rank: int | None = None) -> tuple[LoraWeights, dict]:
    """Shared-A adapters with the same names, for base_lr_shared; see the module docstring.

    method "stack": exact, rank = sum of the adapters' ranks (rank must be None or that sum).
    method "svd": rank directions (1 <= rank <= that sum).
    Returns (LoraWeights with A stored once per projection, scale 1 for every adapter (alpha =
    rank), target modules = the union of the adapters'; report dict: method, rank, source_ranks,
    "kept" {name: fraction of the squared Frobenius norm of its delta weights s_i A_i B_i kept,
    over all layers and projections}, "kept_by_projection" {proj: {name: fraction}},
    "rel_error" {name: ||D_i - D_i''|| / ||D_i||}). An adapter with all-zero B (e.g. untrained)
    counts as fully kept.
    """
    if method not in METHODS:
        raise ValueError(f"share_a method={method!r}; allowed: {METHODS}")
    if not isinstance(adapters, LoraWeights) or not adapters.projections:
        raise ValueError("share_a needs LoraWeights with at least one projection (e.g. from load_adapters)")
    total_rank = sum(c.rank for c in adapters.configs)
    if method == "stack" and rank not in (None, total_rank):
        raise ValueError(f"share_a stack has rank {total_rank} (the sum of the adapters' ranks); got rank={rank}; "
                         f"use method='svd' to choose a rank")
    if method == "svd":
        if rank is None or isinstance(rank, bool) or int(rank) != rank or not 1 <= rank <= total_rank:
            raise ValueError(f"share_a svd needs rank in 1..{total_rank} (the sum of the adapters' ranks), "
                             f"got {rank!r}")
        rank = int(rank)
    else:
        rank = total_rank

    names = adapters.names
    projections = {}
    kept_sum = np.zeros(len(names))
    total_sum = np.zeros(len(names))
    kept_by_proj = {}
    for proj in PROJECTIONS:
        if proj not in adapters.projections:
            continue
        dtype = adapters.projections[proj].a.dtype
        a, b = _stacked_factors(adapters, proj)
        if method == "svd":
            a, b, kept, total = _compress(a, b, rank)
        else:  # exact: everything kept
            kept = total = np.ones((a.shape[0], len(names)))
        kept_n, total_n = kept.sum(axis=0), total.sum(axis=0)
        kept_by_proj[proj] = {n: float(k / t) if t > 0 else 1.0 for n, k, t in zip(names, kept_n, total_n)}
        kept_sum += kept_n
        total_sum += total_n
        projections[proj] = LoraProjection(
            a=jnp.asarray(a[:, None], dtype), b=jnp.asarray(b, dtype),
            scale=jnp.ones((len(names),), jnp.float32), shared_a=True,
        )
    targets = tuple(p for p in PROJECTIONS if p in projections)
    cfg = LoraConfig(rank=rank, alpha=float(rank), target_modules=targets)
    kept = {n: float(k / t) if t > 0 else 1.0 for n, k, t in zip(names, kept_sum, total_sum)}
    report = {
        "method": method,
        "rank": rank,
        "source_ranks": {n: c.rank for n, c in zip(names, adapters.configs)},
        "kept": kept,
        "kept_by_projection": kept_by_proj,
        "rel_error": {n: float(np.sqrt(max(0.0, 1.0 - f))) for n, f in kept.items()},
    }
    return LoraWeights(projections=projections, names=names, configs=(cfg,) * len(names)), report
