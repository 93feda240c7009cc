"""The five cache-sharing schemes: what each stores and what an agent must catch up on.

A scheme owns its cache arrays and knows, per batch row, how many trajectory tokens
each of them holds (slots [0, held)). When an agent takes a turn, `prepare` runs the
catch-up its scheme requires and then the tokens nobody has processed yet, and returns
the logits at the last token; `decode` generates with the right cache view. The
semantics are docs/design.md section 2:

  non_shared      per agent K, V                    catch up on everything unseen
  full_shared     one K, V (producer's LoRA in V)   nothing to catch up
  droidspeak      shared K, V + own K, V at critical layers C (+ hidden state at min C)
                                                    re-run layers min C .. max C on unseen tokens
  base_shared     one K, V_base; LR per agent       "LR prefill": own hidden states, LR only
  base_lr_shared  one K, V_base, LR (shared A)      nothing to catch up

As in HF-style generation, the last token an agent generates is sampled but not fed back
within its turn; it is processed (and cached) at the start of the next turn, by whichever
agent takes it, together with any appended context.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

import copy

from . import sharding
from .cache import AttnOptions, ConcurrentKV, DenseKV, DroidSpeakKV, LoRAKV, capacity, copy_suffix
from .engine import Engine

SCHEMES = ("non_shared", "full_shared", "droidspeak", "base_shared", "base_lr_shared")
SCHEME_ALIASES = {"ns": "non_shared", "fs": "full_shared", "ds": "droidspeak", "bs": "base_shared",
                  "blr": "base_lr_shared"}

# DroidSpeak critical layers from the paper (docs/design.md section 2), by preset shape name.
DROIDSPEAK_LAYERS = {
    "llama-3.1-8b": (0, 2, 16, 19, 20, 22, 23, 24, 26, 30, 31),
    "ministral-8b": (1, 4, 5, 12, 14, 15, 17, 21, 22, 25, 29, 31),
}


def canonical_scheme(name: str) -> str:
    key = name.strip().lower().replace("-", "_")
    key = SCHEME_ALIASES.get(key, key)
    if key not in SCHEMES:
        raise ValueError(f"unknown scheme {name!r}; allowed: {', '.join(SCHEMES)}")
    return key


def default_critical_layers(num_layers: int, model_name: str | None = None) -> tuple[int, ...]:
    """The paper's set for Llama-3.1-8B (32 layers) / Ministral-8B (36 layers), else a third of the
    layers spread out. model_name (a preset name) picks a set explicitly."""
    if model_name in DROIDSPEAK_LAYERS:
        return DROIDSPEAK_LAYERS[model_name]
    by_depth = {32: DROIDSPEAK_LAYERS["llama-3.1-8b"], 36: DROIDSPEAK_LAYERS["ministral-8b"]}
    if num_layers in by_depth:
        return by_depth[num_layers]
    n = max(1, num_layers // 3)
    return tuple(sorted(set(int(round(i)) for i in np.linspace(0, num_layers - 1, n))))


def check_critical_layers(critical_layers, num_layers: int) -> tuple[int, ...]:
    """Validate a user's droidspeak layer set: non-empty integers in [0, num_layers)."""
    layers = list(critical_layers)
    if not layers or any(isinstance(c, bool) or int(c) != c for c in layers):
        raise ValueError(f"droidspeak critical layers must be a non-empty list of integers, got {critical_layers!r}")
    crit = tuple(sorted(set(int(c) for c in layers)))
    if crit[0] < 0 or crit[-1] >= num_layers:
        raise ValueError(f"droidspeak critical layers must lie in 0..{num_layers - 1}, got {crit}")
    return crit


def _copy_state(v):
    """A dict is copied (its values are replaced per agent), a numpy count array too; jax arrays
    and cache views are immutable and kept by reference."""
    if isinstance(v, dict):
        return {k: _copy_state(x) for k, x in v.items()}
    return v.copy() if isinstance(v, np.ndarray) else v


def _rows(traj, lo, hi):
    """Per-row token slices traj[b][lo[b]:hi[b]]."""
    return [list(t[a:b]) for t, a, b in zip(traj, lo, hi)]


def _lengths(traj) -> np.ndarray:
    return np.array([len(t) for t in traj], np.int64)


# Rows outside a turn's `active` mask take part in its batched calls with no tokens: every cache
# write of theirs goes to the dropped slot (n_valid 0), so their caches stay bit for bit as they
# were, and their held counts are kept. Their reads are pinned at position 1 (slot 0 only), so
# they stay finite and in bounds whatever the row holds; their outputs are discarded.
_IDLE_START = 1


def _start(held, active) -> np.ndarray:
    return np.where(active, held, _IDLE_START)


class Scheme:
    """Base class: bookkeeping of the slots each cache part holds."""

    name = ""
    needs_value_lora = False

    def __init__(self, engine: Engine, agents, batch: int, max_len: int, dtype, opts: AttnOptions):
        self.engine = engine
        self.agents = tuple(agents)
        self.batch = batch
        self.max_len = max_len
        self.dtype = dtype
        self.opts = opts
        self.config = engine.config

    # How many tokens of each row some cache already holds (work nobody must redo).
    def processed(self) -> np.ndarray:
        raise NotImplementedError

    @property
    def nbytes(self) -> int:
        raise NotImplementedError

    @property
    def capacity(self) -> int:
        """Slots (tokens) per row every cache array of this scheme holds."""
        return capacity(self.max_len)

    def prepare(self, agent: str, traj, want_logits=True, active=None):
        """Catch up and prefill for `agent`; returns (logits, catch-up tokens [B], new tokens [B]).

        logits: [B, V] at the last token, or with want_logits="all" one array per row over
        the tokens of the final prefill (whose last `new` entries are the new tokens).
        active: bool [B] (None: every row); other rows process nothing and keep their counts.
        """
        raise NotImplementedError

    def decode(self, agent, first_token, start, sampling, key, max_new_tokens, stop_ids, active=None):
        """Decode from first_token at `start`; returns (tokens [B, n], counts [B]; 0 for inactive rows)."""
        raise NotImplementedError

    def _active(self, active) -> np.ndarray:
        return np.ones(self.batch, bool) if active is None else np.asarray(active, bool)

    def _engine_decode(self, view, agent, first_token, start, sampling, key, max_new_tokens, stop_ids, active):
        """engine.decode where inactive rows stop at once (limit 1: no step writes for them)."""
        limits = np.where(active, np.broadcast_to(max_new_tokens, active.shape), 1)
        first = np.where(active, sharding.to_host(first_token), 0)
        tokens, counts, view = self.engine.decode(view, first, _start(start, active), self._ids(agent), sampling,
                                                  key, max_new_tokens=limits, stop_ids=stop_ids)
        return tokens, np.where(active, sharding.to_host(counts), 0), view

    def _ids(self, agent):
        return np.full((self.batch,), self.engine.adapter_ids([agent])[0], np.int32)

    # ---- state a turn changes (Session snapshots it before a turn, checkpoints save it) -----
    # Attributes fixed at construction; everything else (held counts, cache arrays) is state.
    _FIXED = frozenset({"engine", "agents", "batch", "max_len", "dtype", "opts", "config", "critical",
                        "_catch_up_layers"})

    def state(self) -> dict:
        """{attribute: value} of every held count (numpy, copied) and cache (jax pytree, by
        reference: the arrays themselves are never written in place, a step returns new ones)."""
        return {k: _copy_state(v) for k, v in vars(self).items() if k not in self._FIXED}

    def set_state(self, state: dict) -> None:
        for k, v in state.items():
            setattr(self, k, _copy_state(v))

    @staticmethod
    def is_count(name: str) -> bool:
        """Held counts (host bookkeeping) are the attributes named held*; the rest are caches."""
        return name.startswith("held")

    # ---- concurrent branches -------------------------------------------------------------
    # The generic path (every scheme): each agent in turn catches up and decodes from the same
    # fork state; the bookkeeping is then restored, so a dropped branch leaves the trajectory
    # and every cache's valid prefix as they were. Schemes whose caches are shared by all agents
    # (full_shared, base_lr_shared) override branch() to decode all agents in one loop.

    def _counters(self) -> dict:
        """Every held-count attribute (which slots of which cache are valid)."""
        return {k: copy.deepcopy(v) for k, v in vars(self).items() if k.startswith("held")}

    def _restore(self, counters: dict) -> None:
        for k, v in counters.items():
            setattr(self, k, copy.deepcopy(v))

    def _keep_after_branch(self, agent, snapshot: dict, after: dict, T: np.ndarray) -> dict:
        """Counters valid after the agent's branch was dropped (default: the fork's)."""
        return snapshot

    def branch(self, agents, traj, first_fn, max_new, stop_ids, sampling_for, keys):
        """Decode one branch per agent from the current state; returns ({agent: (tokens, counts)},
        pending state for adopt). first_fn(logits, sampling, key) samples the first token."""
        T = np.array([len(t) for t in traj])
        snapshot = self._counters()
        out = {}
        for i, agent in enumerate(agents):
            self._restore(snapshot)
            logits, _, _ = self.prepare(agent, traj)
            first = first_fn(logits, sampling_for(agent, self.batch), keys[i][0])
            tokens, counts = self.decode(agent, first, T, sampling_for(agent, self.batch), keys[i][1], max_new[agent],
                                         stop_ids)
            out[agent] = (sharding.to_host(tokens), sharding.to_host(counts))
            snapshot = self._keep_after_branch(agent, snapshot, self._counters(), T)
        self._restore(snapshot)
        return out, None

    def adopt(self, agent, traj, tokens, pending) -> None:
        """Make the caches as if `agent` had generated `tokens` (one list per row) at the fork:
        it processes them (all but the last, as generate() leaves it) with its own adapters."""
        for b, t in enumerate(tokens):
            traj[b].extend(t[:-1])
        self.prepare(agent, traj, want_logits=False)
        for b, t in enumerate(tokens):
            traj[b].extend(t[-1:])


class _OneCacheScheme(Scheme):
    """A scheme whose state is one view per 'owner' with a held count per row."""

    def _view(self, agent, catch_up: bool):
        raise NotImplementedError

    def _store(self, agent, view):
        raise NotImplementedError

    def _held(self, agent) -> np.ndarray:
        raise NotImplementedError

    def _set_held(self, agent, held: np.ndarray):
        raise NotImplementedError

    def prepare(self, agent, traj, want_logits=True, active=None):
        active = self._active(active)
        held = self._held(agent)
        T = np.where(active, _lengths(traj), held)  # inactive rows: nothing to process
        before = self.processed()
        logits, view = self.engine.prefill(self._view(agent, False), _rows(traj, held, T), _start(held, active),
                                           self._ids(agent), want_logits=want_logits)
        self._store(agent, view)
        self._set_held(agent, T)
        new = np.where(active, T - np.maximum(before, held), 0)
        return logits, T - held - new, new

    def decode(self, agent, first_token, start, sampling, key, max_new_tokens, stop_ids, active=None):
        active = self._active(active)
        tokens, counts, view = self._engine_decode(self._view(agent, False), agent, first_token, start, sampling,
                                                   key, max_new_tokens, stop_ids, active)
        self._store(agent, view)
        # the last token is not fed back
        self._set_held(agent, np.where(active, np.asarray(start) + counts - 1, self._held(agent)))
        return tokens, counts


class NonShared(_OneCacheScheme):
    name = "non_shared"

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self.caches = {a: self.engine.allocate(lambda: DenseKV.create(self.config, self.batch, self.max_len,
                                                                      self.dtype, opts=self.opts))
                       for a in self.agents}
        self.held = {a: np.zeros(self.batch, np.int64) for a in self.agents}

    def processed(self):
        return np.max(np.stack(list(self.held.values())), axis=0)

    @property
    def nbytes(self):
        return sum(c.nbytes for c in self.caches.values())

    def _view(self, agent, catch_up):
        return self.caches[agent]

    def _store(self, agent, view):
        self.caches[agent] = view

    def _held(self, agent):
        return self.held[agent]

    def _set_held(self, agent, held):
        self.held[agent] = np.asarray(held, np.int64)

    def _keep_after_branch(self, agent, snapshot, after, T):
        # The agent's own cache is valid up to the trajectory's last token (its catch-up is kept).
        kept = copy.deepcopy(snapshot)
        kept["held"][agent] = np.minimum(after["held"][agent], T - 1)
        return kept


class FullShared(_OneCacheScheme):
    name = "full_shared"

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self.cache = self._create()
        self.held = np.zeros(self.batch, np.int64)

    def _create(self):
        return self.engine.allocate(lambda: DenseKV.create(self.config, self.batch, self.max_len, self.dtype,
                                                           opts=self.opts))

    def processed(self):
        return self.held

    @property
    def nbytes(self):
        return self.cache.nbytes

    def _view(self, agent, catch_up):
        return self.cache

    def _store(self, agent, view):
        self.cache = view

    def _held(self, agent):
        return self.held

    def _set_held(self, agent, held):
        self.held = np.asarray(held, np.int64)

    # ---- concurrent branches: all agents in one jitted loop over the shared prefix --------------
    def branch(self, agents, traj, first_fn, max_new, stop_ids, sampling_for, keys):
        N, B = len(agents), self.batch
        T = np.array([len(t) for t in traj])
        fork = self.held.copy()
        ids = np.tile(self.engine.adapter_ids(agents), B)  # row b*N + i = agent i, trajectory b
        limits = np.tile([max_new[a] for a in agents], B)
        view = ConcurrentKV.create(self.cache, np.repeat(fork, N), N, int((T - fork).max() + limits.max()),
                                   allocate=self.engine.allocate)
        rows = [list(traj[b][fork[b]:]) for b in range(B) for _ in agents]
        sampling = _stack_sampling([sampling_for(a, 1) for a in agents], B)
        logits, view = self.engine.prefill(view, rows, np.repeat(fork, N), ids)
        # The read-only prefix went through the donating step: hold its live copy at once, so a
        # failure later in the turn rolls back to valid arrays.
        self.cache = view.prefix
        first = first_fn(logits, sampling, keys[0][0])
        tokens, counts, view = self.engine.decode(view, first, np.repeat(T, N), ids, sampling, keys[0][1],
                                                  max_new_tokens=limits, stop_ids=stop_ids)
        self.cache = view.prefix
        tokens, counts = sharding.to_host(tokens), sharding.to_host(counts)
        out = {a: (tokens[i::N], counts[i::N]) for i, a in enumerate(agents)}
        return out, dict(view=view, fork=fork, T=T, agents=tuple(agents))

    def adopt(self, agent, traj, tokens, pending) -> None:
        if pending is None:
            return super().adopt(agent, traj, tokens, pending)
        # Copy the agent's suffix (tail + its generated tokens but the last) into the shared cache.
        view, fork, T = pending["view"], pending["fork"], pending["T"]
        N = len(pending["agents"])
        rows = np.arange(self.batch) * N + pending["agents"].index(agent)
        count = (T - fork) + np.array([len(t) for t in tokens]) - 1
        args = (jnp.asarray(rows), jnp.asarray(fork, jnp.int32), jnp.asarray(count, jnp.int32))
        c = self.cache
        if isinstance(c, LoRAKV):
            self.cache = c.replace(k=copy_suffix(c.k, view.suf_k, *args), v_base=copy_suffix(c.v_base, view.suf_v, *args),
                                   lr=copy_suffix(c.lr, view.suf_lr, *args))
        else:
            self.cache = c.replace(k=copy_suffix(c.k, view.suf_k, *args), v=copy_suffix(c.v, view.suf_v, *args))
        self.held = fork + count
        for b, t in enumerate(tokens):
            traj[b].extend(t)


class BaseLRShared(FullShared):
    """One K, V_base and LR for everyone; requires adapters that share A_v."""

    name = "base_lr_shared"
    needs_value_lora = True

    def _create(self):
        lora = self.engine.lora
        if lora is None:
            raise ValueError("base_lr_shared needs adapters with LoRA on v_proj; none are loaded")
        lora.require_shared_a("v")
        return self.engine.allocate(lambda: LoRAKV.create(self.config, self.batch, self.max_len, lora.value_rank(),
                                                          self.dtype, opts=self.opts))


class _SharedPlusOwn(Scheme):
    """A shared cache part every agent reads plus a part each agent owns and catches up on.

    held_shared [B]: tokens the shared part holds; held_own[agent] [B] <= held_shared: tokens
    the agent's own part holds. A turn first runs the catch-up (tokens in the shared part
    but not the agent's own: only the own part is written, over `_catch_up_layers`), then the
    tokens nobody has processed (both parts written).
    """

    _catch_up_layers = None  # None: all layers

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self.held_shared = np.zeros(self.batch, np.int64)
        self.held_own = {a: np.zeros(self.batch, np.int64) for a in self.agents}

    def _view(self, agent, write_shared: bool):
        raise NotImplementedError

    def _store(self, agent, view):
        raise NotImplementedError

    def processed(self):
        return self.held_shared

    def prepare(self, agent, traj, want_logits=True, active=None):
        active = self._active(active)
        ids = self._ids(agent)
        held_own, held_shared = self.held_own[agent], self.held_shared
        T = np.where(active, _lengths(traj), held_shared)  # inactive rows: nothing to process
        caught_up = np.where(active, held_shared, held_own)
        catch_up = caught_up - held_own
        if catch_up.any():
            _, view = self.engine.prefill(self._view(agent, False), _rows(traj, held_own, caught_up),
                                          _start(held_own, active), ids, layers=self._catch_up_layers,
                                          want_logits=False)
            self._store(agent, view)
        logits, view = self.engine.prefill(self._view(agent, True), _rows(traj, held_shared, T),
                                           _start(held_shared, active), ids, want_logits=want_logits)
        self._store(agent, view)
        new = T - held_shared
        self.held_shared = T.astype(np.int64)
        self.held_own[agent] = np.where(active, T, held_own).astype(np.int64)
        return logits, catch_up, new

    def decode(self, agent, first_token, start, sampling, key, max_new_tokens, stop_ids, active=None):
        active = self._active(active)
        tokens, counts, view = self._engine_decode(self._view(agent, True), agent, first_token, start, sampling, key,
                                                   max_new_tokens, stop_ids, active)
        self._store(agent, view)
        end = np.asarray(start) + counts - 1
        self.held_shared = np.where(active, end, self.held_shared).astype(np.int64)
        self.held_own[agent] = np.where(active, end, self.held_own[agent]).astype(np.int64)
        return tokens, counts

    def _keep_after_branch(self, agent, snapshot, after, T):
        # The own part's catch-up over tokens that were shared before the fork stays valid.
        kept = copy.deepcopy(snapshot)
        kept["held_own"][agent] = np.minimum(after["held_own"][agent], snapshot["held_shared"])
        return kept


class BaseShared(_SharedPlusOwn):
    """One K and V_base (shared part); each agent its own LR = X_a A_v,a, filled by an LR prefill."""

    name = "base_shared"
    needs_value_lora = True

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        lora = self.engine.lora
        if lora is None or "v" not in lora:
            raise ValueError("base_shared needs adapters with LoRA on v_proj")
        base = self.engine.allocate(lambda: LoRAKV.create(self.config, self.batch, self.max_len, lora.value_rank(),
                                                          self.dtype, opts=self.opts))
        self.k, self.v_base = base.k, base.v_base
        self.lr = {a: jnp.zeros_like(base.lr) for a in self.agents}  # keeps base.lr's sharding

    @property
    def nbytes(self):
        return int(self.k.nbytes + self.v_base.nbytes + sum(x.nbytes for x in self.lr.values()))

    def _view(self, agent, write_shared):
        return LoRAKV(k=self.k, v_base=self.v_base, lr=self.lr[agent], write_base=write_shared, opts=self.opts)

    def _store(self, agent, view):
        self.k, self.v_base, self.lr[agent] = view.k, view.v_base, view.lr


class DroidSpeak(_SharedPlusOwn):
    """Shared K, V at all layers; own K, V at critical layers; hidden state at min(C).

    The catch-up re-runs layers min(C) .. max(C) from the cached hidden state.
    """

    name = "droidspeak"

    def __init__(self, *args, critical_layers=None, **kw):
        super().__init__(*args, **kw)
        L = self.config.num_layers
        crit = check_critical_layers(default_critical_layers(L) if critical_layers is None else critical_layers, L)
        self.critical = crit
        self._catch_up_layers = (crit[0], crit[-1] + 1)
        allocate = self.engine.allocate
        self.shared = allocate(lambda: DenseKV.create(self.config, self.batch, self.max_len, self.dtype,
                                                      opts=self.opts))
        self.own = {a: allocate(lambda: DenseKV.create(self.config, self.batch, self.max_len, self.dtype,
                                                       num_layers=len(crit), opts=self.opts)) for a in self.agents}
        self.hidden = allocate(lambda: {"hidden": jnp.zeros((self.batch, capacity(self.max_len),
                                                             self.config.hidden_size), self.dtype)})["hidden"]

    @property
    def nbytes(self):
        return int(self.shared.nbytes + sum(o.nbytes for o in self.own.values()) + self.hidden.nbytes)

    def _view(self, agent, write_shared):
        own = self.own[agent]
        return DroidSpeakKV(shared=self.shared, own_k=own.k, own_v=own.v, hidden=self.hidden,
                            critical=self.critical, write_shared=write_shared)

    def _store(self, agent, view):
        self.shared, self.hidden = view.shared, view.hidden
        self.own[agent] = self.own[agent].replace(k=view.own_k, v=view.own_v)


def _stack_sampling(per_agent, batch):
    """Per-agent SamplingParams of one row each -> rows b*N + i."""
    return jax.tree.map(lambda *xs: jnp.tile(jnp.concatenate(xs), batch), *per_agent)


SCHEME_CLASSES = {c.name: c for c in (NonShared, FullShared, DroidSpeak, BaseShared, BaseLRShared)}


def make_scheme(name: str, engine: Engine, agents, batch: int, max_len: int, dtype, opts: AttnOptions,
                critical_layers=None) -> Scheme:
    name = canonical_scheme(name)
    cls = SCHEME_CLASSES[name]
    if name == "droidspeak":
        return cls(engine, agents, batch, max_len, dtype, opts, critical_layers=critical_layers)
    return cls(engine, agents, batch, max_len, dtype, opts)
