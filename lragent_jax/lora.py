"""Multi-LoRA weights: many adapters stacked per projection, applied per sequence.

Each targeted projection holds A [L, Na, d_in, r] and B [L, N, r, d_out] for N adapters
(Na = 1 when every adapter has the same A: shared-A / HydraLoRA style). Adapters of
different ranks are zero-padded to the largest rank, which is exact. Every batch row
carries an adapter id; id -1 means "no adapter" (the base model).
"""

from __future__ import annotations

from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from .config import PROJECTIONS, ConfigError, LoraConfig, ModelConfig


class SharedAError(ValueError):
    """Adapters were required to share A (base_lr_shared) but do not."""


@struct.dataclass
class LoraProjection:
    """All adapters' LoRA factors for one projection, stacked over layers."""

    a: jax.Array  # [L, Na, d_in, r]; Na == 1 when A is shared
    b: jax.Array  # [L, N, r, d_out]
    scale: jax.Array  # [N] float32, alpha/r (or alpha/sqrt(r) with rsLoRA); 0 where untargeted
    shared_a: bool = struct.field(pytree_node=False, default=False)

    @property
    def rank(self) -> int:
        return self.a.shape[-1]

    def down(self, layer, x: jax.Array, adapter_ids: jax.Array) -> jax.Array:
        """x A for each row's adapter: [B, S, d_in] -> [B, S, r] (unscaled)."""
        a = self.a[layer]
        if self.shared_a:
            return jnp.einsum("bsd,dr->bsr", x, a[0], preferred_element_type=jnp.float32).astype(x.dtype)
        a_rows = a[jnp.maximum(adapter_ids, 0)]
        return jnp.einsum("bsd,bdr->bsr", x, a_rows, preferred_element_type=jnp.float32).astype(x.dtype)

    def row_b(self, layer, adapter_ids: jax.Array) -> jax.Array:
        """Each row's B for this layer: [B, r, d_out]."""
        return self.b[layer][jnp.maximum(adapter_ids, 0)]

    def row_scale(self, adapter_ids: jax.Array) -> jax.Array:
        """Each row's scale [B] (float32); 0 for rows without an adapter (id < 0)."""
        return jnp.where(adapter_ids >= 0, self.scale[jnp.maximum(adapter_ids, 0)], 0.0)

    def delta(self, layer, x: jax.Array, adapter_ids: jax.Array) -> jax.Array:
        """s (x A) B for each row: [B, S, d_in] -> [B, S, d_out] in x's dtype."""
        xa = self.down(layer, x, adapter_ids)
        out = jnp.einsum("bsr,bro->bso", xa, self.row_b(layer, adapter_ids),
                         preferred_element_type=jnp.float32)
        return (out * self.row_scale(adapter_ids)[:, None, None]).astype(x.dtype)


@struct.dataclass
class LoraWeights:
    """Every loaded adapter, by projection. Adapter i is `names[i]`."""

    projections: dict  # short projection name -> LoraProjection
    names: tuple = struct.field(pytree_node=False, default=())
    configs: tuple = struct.field(pytree_node=False, default=())  # LoraConfig per adapter

    def __contains__(self, proj: str) -> bool:
        return proj in self.projections

    def get(self, proj: str) -> LoraProjection | None:
        return self.projections.get(proj)

    @property
    def num_adapters(self) -> int:
        return len(self.names)

    def adapter_id(self, name: str) -> int:
        if name not in self.names:
            raise KeyError(f"unknown agent {name!r}; loaded adapters: {list(self.names)}")
        return self.names.index(name)

    def value_rank(self) -> int:
        v = self.get("v")
        return 0 if v is None else v.rank

    def require_shared_a(self, proj: str = "v", atol: float = 0.0) -> None:
        """Raise SharedAError naming the adapters, layer and largest difference if A differs."""
        p = self.get(proj)
        if p is None:
            raise SharedAError(f"no adapter has LoRA on {proj}_proj; a shared-A value cache needs it")
        if p.shared_a or self.num_adapters <= 1:
            return
        a = np.asarray(jax.device_get(p.a), dtype=np.float32)  # [L, N, d_in, r]
        diff = np.abs(a - a[:, :1]).max(axis=(2, 3))  # [L, N] vs adapter 0
        layer, idx = np.unravel_index(np.argmax(diff), diff.shape)
        if diff[layer, idx] > atol:
            raise SharedAError(
                f"base_lr_shared needs adapters that share A on {proj}_proj, but adapters "
                f"{self.names[0]!r} and {self.names[idx]!r} differ at layer {layer} "
                f"(max |A_{self.names[0]} - A_{self.names[idx]}| = {diff[layer, idx]:.3g}); "
                f"make them share A with --share-a stack|svd:R (scripts/generate.py) or "
                f"lragent_jax.share_a.share_a, or use base_shared"
            )


def _check_factor(name: str, proj: str, factor: str, t: np.ndarray, dtype) -> None:
    """ConfigError if a LoRA factor holds NaN/inf or values its storage dtype turns into inf:
    either would make every token the adapter touches NaN (greedy decoding then prints token 0)."""
    finite = np.isfinite(t)
    if not finite.all():
        raise ConfigError(f"adapter {name!r}: {proj}_proj lora_{factor} has {int(t.size - finite.sum())} "
                          f"NaN/inf values")
    limit = float(jnp.finfo(dtype).max)
    if t.size and float(np.abs(t).max()) > limit:
        raise ConfigError(f"adapter {name!r}: {proj}_proj lora_{factor} has values above {limit:.4g}, the "
                          f"largest {jnp.dtype(dtype).name}; load the adapters in float32 or bfloat16")


def stack_adapters(
    model_config: ModelConfig,
    adapters: Mapping[str, tuple[LoraConfig, Mapping[str, tuple[np.ndarray, np.ndarray]]]],
    dtype=jnp.float32,
) -> LoraWeights:
    """Stack per-adapter factors into LoraWeights.

    adapters: name -> (LoraConfig, {proj: (A [L, d_in, r], B [L, r, d_out])}). Projections an
    adapter does not target get B = 0 and scale 0 for it. A is stored once per projection
    when it is bit-identical across adapters (shared-A).
    """
    if not adapters:
        raise ConfigError("no adapters given")
    names = tuple(adapters)
    configs = tuple(adapters[n][0] for n in names)
    L = model_config.num_layers
    projections = {}
    for proj in PROJECTIONS:
        users = [n for n in names if proj in adapters[n][1]]
        if not users:
            continue
        d_in, d_out = model_config.projection_dims(proj)
        rank = max(adapters[n][1][proj][0].shape[-1] for n in users)
        a_all = np.zeros((L, len(names), d_in, rank), np.float32)
        b_all = np.zeros((L, len(names), rank, d_out), np.float32)
        scale = np.zeros((len(names),), np.float32)
        for i, n in enumerate(names):
            if proj not in adapters[n][1]:
                continue
            a, b = (np.asarray(t, np.float32) for t in adapters[n][1][proj])
            r = a.shape[-1]
            if a.shape != (L, d_in, r) or b.shape != (L, r, d_out):
                raise ConfigError(
                    f"adapter {n!r}: {proj}_proj factors have shapes A{a.shape} B{b.shape}; "
                    f"expected A{(L, d_in, r)} B{(L, r, d_out)}"
                )
            for factor, t in (("A", a), ("B", b)):
                _check_factor(n, proj, factor, t, dtype)
            a_all[:, i, :, :r] = a
            b_all[:, i, :r, :] = b
            scale[i] = configs[i].scale
        shared = len(users) == len(names) and bool(np.all(a_all == a_all[:, :1]))
        if shared:
            a_all = a_all[:, :1]
        projections[proj] = LoraProjection(
            a=jnp.asarray(a_all, dtype), b=jnp.asarray(b_all, dtype), scale=jnp.asarray(scale),
            shared_a=shared,
        )
    return LoraWeights(projections=projections, names=names, configs=configs)


def random_adapters(
    model_config: ModelConfig,
    names=("plan", "action", "reflect"),
    *,
    rank: int = 8,
    alpha: float = 16.0,
    targets=("q", "v"),
    shared_a: bool = True,
    seed: int = 0,
    a_std: float | None = None,
    b_std: float = 0.02,
    dtype=jnp.float32,
) -> LoraWeights:
    """Random adapters (non-zero B) for demos, tests and benchmarks; shared A by default."""
    rng = np.random.default_rng(seed)
    L = model_config.num_layers
    lcfg = LoraConfig(rank=rank, alpha=alpha, target_modules=tuple(targets))
    shared = {}
    per = {}
    for n in names:
        factors = {}
        for proj in targets:
            d_in, d_out = model_config.projection_dims(proj)
            std = a_std if a_std is not None else 1.0 / np.sqrt(d_in)
            if shared_a:
                if proj not in shared:
                    shared[proj] = rng.normal(0, std, (L, d_in, rank)).astype(np.float32)
                a = shared[proj]
            else:
                a = rng.normal(0, std, (L, d_in, rank)).astype(np.float32)
            b = rng.normal(0, b_std, (L, rank, d_out)).astype(np.float32)
            factors[proj] = (a, b)
        per[n] = (lcfg, factors)
    return stack_adapters(model_config, per, dtype=dtype)
