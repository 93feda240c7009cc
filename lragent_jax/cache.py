"""KV cache pytrees. Each class is a *view* a model call runs against.

All arrays are preallocated to a capacity T (max_len rounded up to a multiple of
CACHE_ALIGN), stacked over layers, and indexed by absolute trajectory position: slot
t holds token t. Which slots are valid is bookkeeping the session owns (it passes
kv_lengths per call), so one cache can be shared by agents that have processed
different prefixes. Writes go through a scatter with mode="drop": padding tokens
get an out-of-range slot and are never written.

Views (per layer, `update_and_attend(layer, q, k, values, step)`):
  DenseKV      K and full V = X W_v + s (X A_v) B       non_shared, full_shared
  LoRAKV       K, V_base = X W_v, LR = X A_v            base_shared, base_lr_shared
  DroidSpeakKV shared K, V for all layers + own K, V at critical layers, + hidden cache
  ConcurrentKV N agents' branches over one read-only shared prefix
  ChunkKV      stores nothing: attention over the chunk's own K/V (forward.forward_logits)
What the engine and the model ask of a view is the CacheView protocol.
Static flags (write / write_base / write_shared) select what a call may write, so the
catch-up of one agent never overwrites what another agent produced.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from . import attention, sharding
from .config import ModelConfig
from .model import StepInputs, ValueParts

CACHE_ALIGN = 128  # kernels read KV in blocks; capacity is a multiple of this


def capacity(max_len: int) -> int:
    return -(-int(max_len) // CACHE_ALIGN) * CACHE_ALIGN


def write_slots(buf: jax.Array, layer, write_positions: jax.Array, new: jax.Array) -> jax.Array:
    """buf[layer, b, write_positions[b, s]] = new[b, s] (layer None: buf[b, ...]); out-of-range
    slots are dropped."""
    lead = () if layer is None else (layer,)
    mesh = sharding.context_mesh()
    if mesh is not None and mesh.shape.get(sharding.DATA, 1) > 1:
        # Rows as a batching dimension of the scatter: XLA then writes each data shard's rows where
        # they live; with explicit row indices it all-gathers every new K / V / LR over data first.
        def one_row(row_buf, pos, x):
            return row_buf.at[(*lead, pos)].set(x.astype(row_buf.dtype), mode="drop")

        return jax.vmap(one_row, in_axes=(len(lead), 0, 0), out_axes=len(lead))(buf, write_positions, new)
    rows = jnp.arange(new.shape[0])[:, None]
    return buf.at[(*lead, rows, write_positions)].set(new.astype(buf.dtype), mode="drop")


def _nbytes(*arrays) -> int:
    return int(sum(a.size * a.dtype.itemsize for a in arrays if a is not None))


@runtime_checkable
class CacheView(Protocol):
    """What the engine and the model need of a cache view (every view below is one)."""

    @property
    def capacity(self) -> int:
        """Slots per row; a write to this slot (or beyond) is dropped."""

    @property
    def needs_new_kv(self) -> bool:
        """False when the view already holds the new tokens' K and V_base (a catch-up that
        writes only LR): the model then skips the k and v products and passes None."""

    @property
    def hidden_layer(self) -> int | None:
        """The layer whose input hidden states the view caches (a catch-up may start
        there, see read_hidden / store_hidden), or None."""

    def read_hidden(self, positions: jax.Array) -> jax.Array:
        """Cached hidden states [B, S, d] at positions [B, S] (hidden_layer's input)."""

    def store_hidden(self, hidden: jax.Array, step: StepInputs) -> "CacheView":
        """Write hidden_layer's input hidden states [B, S, d] for the new tokens (if allowed)."""

    def update_and_attend(self, layer, q, k, values: ValueParts, step: StepInputs) -> tuple:
        """Write what the view stores of the new tokens at `layer` and attend: (out, view)."""


class ViewDefaults:
    """CacheView members for a view that always takes new K/V and caches no hidden states
    (subclass it; a view overrides what it does differently)."""

    needs_new_kv = True
    hidden_layer = None

    def read_hidden(self, positions):
        raise ValueError(f"{type(self).__name__} caches no hidden states: a forward starts at layer 0")

    def store_hidden(self, hidden, step):
        raise ValueError(f"{type(self).__name__} caches no hidden states")


@struct.dataclass
class AttnOptions:
    """Static attention choices carried by every view."""

    impl: str = "xla"
    naive_expansion: bool = False
    sliding_window: int | None = None


@struct.dataclass
class DenseKV(ViewDefaults):
    """K and full V per layer: [L, B, T, Hkv, D] each."""

    k: jax.Array
    v: jax.Array
    write: bool = struct.field(pytree_node=False, default=True)
    opts: AttnOptions = struct.field(pytree_node=False, default=AttnOptions())

    @classmethod
    def create(cls, config: ModelConfig, batch: int, max_len: int, dtype, *, num_layers=None,
               opts: AttnOptions = AttnOptions()):
        shape = (num_layers or config.num_layers, batch, capacity(max_len), config.num_kv_heads, config.head_dim)
        return cls(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype), opts=opts)

    @property
    def nbytes(self) -> int:
        return _nbytes(self.k, self.v)

    @property
    def capacity(self) -> int:
        return self.k.shape[2]

    def store(self, layer, k, values: ValueParts, step: StepInputs) -> "DenseKV":
        """Write the new tokens' K and full V (if this view may write)."""
        if not self.write:
            return self
        return self.replace(
            k=write_slots(self.k, layer, step.write_positions, k),
            v=write_slots(self.v, layer, step.write_positions, values.full()),
        )

    def update_and_attend(self, layer, q, k, values: ValueParts, step: StepInputs):
        new = self.store(layer, k, values, step)
        out = attention.attend(
            q, new.k, new.v, layer=layer, kv_lengths=step.kv_lengths, q_offsets=step.q_offsets,
            impl=self.opts.impl, sliding_window=self.opts.sliding_window,
        )
        return out, new


@struct.dataclass
class LoRAKV(ViewDefaults):
    """K [L,B,T,Hkv,D], V_base [L,B,T,Hkv,D] and the low-rank value cache LR [L,B,T,r].

    Attention applies each row's B after attention: O = P V_base + s (P LR) B.
    write_base=False writes only LR (base_shared catch-up over tokens whose K and
    V_base another agent already cached).
    """

    k: jax.Array
    v_base: jax.Array
    lr: jax.Array
    write_base: bool = struct.field(pytree_node=False, default=True)
    opts: AttnOptions = struct.field(pytree_node=False, default=AttnOptions())

    @classmethod
    def create(cls, config: ModelConfig, batch: int, max_len: int, rank: int, dtype, *,
               opts: AttnOptions = AttnOptions()):
        T = capacity(max_len)
        shape = (config.num_layers, batch, T, config.num_kv_heads, config.head_dim)
        return cls(k=jnp.zeros(shape, dtype), v_base=jnp.zeros(shape, dtype),
                   lr=jnp.zeros((config.num_layers, batch, T, rank), dtype), opts=opts)

    @property
    def nbytes(self) -> int:
        return _nbytes(self.k, self.v_base, self.lr)

    @property
    def needs_new_kv(self) -> bool:
        """Without base writes (a catch-up) the model can skip the k and v projections."""
        return self.write_base

    @property
    def capacity(self) -> int:
        return self.k.shape[2]

    def update_and_attend(self, layer, q, k, values: ValueParts, step: StepInputs):
        if values.lr is None:
            raise ValueError("a base+LR value cache needs adapters with LoRA on v_proj")
        new = self.replace(lr=write_slots(self.lr, layer, step.write_positions, values.lr))
        if self.write_base:
            new = new.replace(
                k=write_slots(self.k, layer, step.write_positions, k),
                v_base=write_slots(self.v_base, layer, step.write_positions, values.base),
            )
        out = attention.attend(
            q, new.k, new.v_base, layer=layer, kv_lengths=step.kv_lengths, q_offsets=step.q_offsets,
            lr_cache=new.lr, lora_b=values.lora_b, lora_scale=values.scale, impl=self.opts.impl,
            naive_expansion=self.opts.naive_expansion, sliding_window=self.opts.sliding_window,
        )
        return out, new


@struct.dataclass
class DroidSpeakKV(ViewDefaults):
    """DroidSpeak: shared K, V at every layer, the agent's own K, V at critical layers.

    own_k / own_v: [|C|, B, T, Hkv, D]; critical[i] is the layer of slot i. hidden
    [B, T, d] caches the input of the first critical layer, so a catch-up can start
    there. write_shared=False during catch-up: the agent then writes only its own
    critical layers and reads the producer's K, V everywhere else.
    """

    shared: DenseKV
    own_k: jax.Array
    own_v: jax.Array
    hidden: jax.Array
    critical: tuple = struct.field(pytree_node=False, default=())
    write_shared: bool = struct.field(pytree_node=False, default=True)

    @property
    def hidden_layer(self) -> int:
        return min(self.critical)

    def read_hidden(self, positions: jax.Array) -> jax.Array:
        rows = jnp.arange(positions.shape[0])[:, None]
        return self.hidden[rows, jnp.minimum(positions, self.capacity - 1)]

    def store_hidden(self, hidden: jax.Array, step: StepInputs) -> "DroidSpeakKV":
        if not self.write_shared:  # a catch-up reads the producer's hidden states
            return self
        return self.replace(hidden=write_slots(self.hidden, None, step.write_positions, hidden))

    @property
    def capacity(self) -> int:
        return self.shared.capacity

    @property
    def nbytes(self) -> int:
        return self.shared.nbytes + _nbytes(self.own_k, self.own_v, self.hidden)

    def update_and_attend(self, layer, q, k, values: ValueParts, step: StepInputs):
        slot_of_layer = np.full((self.shared.k.shape[0],), -1, np.int32)
        slot_of_layer[list(self.critical)] = np.arange(len(self.critical), dtype=np.int32)
        slot = int(slot_of_layer[layer]) if isinstance(layer, int) else jnp.asarray(slot_of_layer)[layer]
        shared = self.shared.replace(write=self.write_shared)

        def critical_layer(operands):
            shared, own_k, own_v = operands
            shared = shared.store(layer, k, values, step)
            own = DenseKV(k=own_k, v=own_v, opts=shared.opts)
            out, own = own.update_and_attend(slot, q, k, values, step)
            return out, (shared, own.k, own.v)

        def shared_layer(operands):
            shared, own_k, own_v = operands
            out, shared = shared.update_and_attend(layer, q, k, values, step)
            return out, (shared, own_k, own_v)

        operands = (shared, self.own_k, self.own_v)
        if isinstance(layer, int):  # per-layer weights: the branch is known when tracing
            branch = critical_layer if slot_of_layer[layer] >= 0 else shared_layer
            out, (shared, own_k, own_v) = branch(operands)
        else:
            out, (shared, own_k, own_v) = jax.lax.cond(slot >= 0, critical_layer, shared_layer, operands)
        return out, self.replace(shared=shared.replace(write=True), own_k=own_k, own_v=own_v)


@struct.dataclass
class ConcurrentKV(ViewDefaults):
    """N agents' branches forked from one shared cache (full_shared / base_lr_shared).

    prefix: the shared DenseKV or LoRAKV, read only: branches never write it, so a dropped
    branch leaves no trace. Each branch row (row b*N + i = agent i on trajectory b) writes its
    own tokens, from the fork position on, into small suffix buffers: suf_k [L, B*N, S, Hkv, D],
    suf_v (full V with a DenseKV prefix, V_base with a LoRAKV prefix) and suf_lr [L, B*N, S, r].
    fork [B*N]: the prefix length (first suffix position) of each row. Attention reads the prefix
    once for all N agents (attention.attend_concurrent) and merges each row's suffix part.
    """

    prefix: object
    suf_k: jax.Array
    suf_v: jax.Array
    suf_lr: jax.Array | None
    fork: jax.Array
    n_agents: int = struct.field(pytree_node=False, default=1)

    @classmethod
    def create(cls, prefix, fork_per_row, n_agents: int, suffix_len: int, allocate=None):
        """allocate(make): how the suffix buffers are created (Engine.allocate: sharded on a mesh)."""
        L, B, _, H, D = prefix.k.shape
        R, S = B * n_agents, capacity(suffix_len)
        lr = isinstance(prefix, LoRAKV)
        dtype, lr_dtype = prefix.k.dtype, prefix.lr.dtype if lr else None

        def make():
            return dict(suf_k=jnp.zeros((L, R, S, H, D), dtype), suf_v=jnp.zeros((L, R, S, H, D), dtype),
                        suf_lr=jnp.zeros((L, R, S, prefix.lr.shape[-1]), lr_dtype) if lr else None)

        return cls(prefix=prefix, **(make() if allocate is None else allocate(make)),
                   fork=jnp.asarray(fork_per_row, jnp.int32), n_agents=n_agents)

    @property
    def capacity(self) -> int:
        return self.prefix.capacity

    def update_and_attend(self, layer, q, k, values: ValueParts, step: StepInputs):
        lora = isinstance(self.prefix, LoRAKV)
        if self.prefix.opts.sliding_window is not None:
            raise NotImplementedError("concurrent branches do not support a sliding-window model yet; use "
                                      "generate() per agent, or max_len <= sliding_window")
        if lora and values.lr is None:
            raise ValueError("a base+LR value cache needs adapters with LoRA on v_proj")
        S = self.suf_k.shape[2]
        slot = jnp.where(step.write_positions < self.capacity, step.write_positions - self.fork[:, None], S)
        new = self.replace(
            suf_k=write_slots(self.suf_k, layer, slot, k),
            suf_v=write_slots(self.suf_v, layer, slot, values.base if lora else values.full()),
            suf_lr=write_slots(self.suf_lr, layer, slot, values.lr) if lora else None,
        )
        B = self.fork.shape[0] // self.n_agents
        p = self.prefix
        out = attention.attend_concurrent(
            q, n_agents=self.n_agents, layer=layer,
            prefix_k=p.k, prefix_v=p.v_base if lora else p.v, prefix_lr=p.lr if lora else None,
            prefix_lengths=self.fork.reshape(B, self.n_agents)[:, 0],
            suffix_k=new.suf_k, suffix_v=new.suf_v, suffix_lr=new.suf_lr,
            suffix_lengths=step.kv_lengths - self.fork, suffix_q_offsets=step.q_offsets - self.fork,
            lora_b=values.lora_b if lora else None, lora_scale=values.scale if lora else None,
            impl=p.opts.impl,
        )
        return out, new


@struct.dataclass
class ChunkKV(ViewDefaults):
    """Stores nothing: each layer attends over the chunk's own K and full V (causal, keys
    below step.kv_lengths) through the XLA attention path, so gradients flow. The cache-free
    forward of forward.forward_logits (training)."""

    capacity: int = struct.field(pytree_node=False, default=0)

    def update_and_attend(self, layer, q, k, values: ValueParts, step: StepInputs):
        out = attention.attend(q, k[None], values.full()[None], layer=0, kv_lengths=step.kv_lengths,
                               q_offsets=step.q_offsets, impl="xla")
        return out, self


def _copy_suffix_impl(dst, src, rows, fork, count):
    """dst[:, b, fork[b] + s] = src[:, rows[b], s] for s < count[b] (the adopted branch)."""
    sel = src[:, rows]  # [L, B, S, ...]
    S = sel.shape[2]
    s = jnp.arange(S)[None, :]
    pos = jnp.where(s < count[:, None], fork[:, None] + s, dst.shape[2])
    b = jnp.arange(sel.shape[1])[:, None]
    return dst.at[:, b, pos].set(sel, mode="drop")


copy_suffix = jax.jit(_copy_suffix_impl, donate_argnums=(0,))
