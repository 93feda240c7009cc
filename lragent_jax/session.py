"""Multi-agent Session: one shared trajectory (or a batch of them), named agents, one scheme.

    session = Session(engine, scheme="base_lr_shared", max_len=8192, tokenizer=tok)
    session.append("Question: ...")
    plan = session.generate("plan", max_new_tokens=32)      # catch up, then decode
    session.append(tool_output)
    act = session.generate("action", max_new_tokens=8)

append() only records tokens; generate() makes the agent catch up as its scheme
requires, decodes, and appends what it generated to the trajectory. Every turn is
recorded in `session.turns` with its catch-up work and timings.
"""

from __future__ import annotations

import dataclasses
import numbers
import time
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from .cache import AttnOptions
from .engine import BASE_AGENT, Engine
from .sampling import SamplingParams
from .config import preset_name
from .schemes import DROIDSPEAK_LAYERS, canonical_scheme, default_critical_layers, make_scheme


@dataclasses.dataclass
class TurnStats:
    agent: str
    catch_up_tokens: int  # tokens recomputed that some cache already held (all rows)
    new_tokens: int  # tokens processed for the first time at the turn's start (all rows)
    prefill_s: float  # catch-up + prefill, up to the logits of the last token
    ttft_s: float  # turn start to the first generated token on the host
    decode_s: float  # the rest of the turn
    generated_tokens: int  # all rows

    @property
    def total_s(self) -> float:
        return self.ttft_s + self.decode_s


class Session:
    """Named agents sharing one trajectory through one cache scheme.

    Args:
      engine: an Engine holding the model and the stacked adapters (agents = adapter names).
      scheme: one of schemes.SCHEMES (aliases ns, fs, ds, bs, blr).
      batch: number of independent trajectories advanced together.
      max_len: longest trajectory (tokens) the caches hold.
      tokenizer: optional; enables append(text) and turn text.
      attention: "auto" | "xla" | "pallas" (see attention.py).
      naive_expansion: base_shared / base_lr_shared expand V = V_base + s LR B before attention.
      critical_layers: droidspeak's critical layer set (default: the paper's set for the
        preset named by `model_name`, else a third of the layers).
      stop_ids: default stop tokens of generate() (default: the model's eos ids).
      seed: base seed of sampling. Turn k draws from fold_in(key(seed), k), so a session replays
        exactly from the same seed; a per-call seed= replaces the base seed for that call.
    """

    def __init__(self, engine: Engine, scheme: str = "non_shared", *, batch: int = 1, max_len: int = 4096,
                 tokenizer=None, attention: str = "auto", naive_expansion: bool = False,
                 critical_layers=None, model_name: str | None = None, cache_dtype=None,
                 stop_ids=None, seed: int = 0):
        if batch < 1:
            raise ValueError(f"batch must be >= 1, got {batch}")
        if max_len < 2:
            raise ValueError(f"max_len must be >= 2, got {max_len}")
        from .attention import check_impl

        check_impl(attention)
        self.engine = engine
        self.scheme_name = canonical_scheme(scheme)
        # Without adapters there is one agent, "base" (the plain model).
        self.agents = tuple(engine.lora.names) if engine.lora is not None else (BASE_AGENT,)
        self.batch = batch
        self.max_len = int(max_len)
        self.tokenizer = tokenizer
        self.stop_ids = tuple(engine.config.eos_token_ids if stop_ids is None else stop_ids)
        if critical_layers is None:
            name = model_name if model_name in DROIDSPEAK_LAYERS else preset_name(engine.config)
            critical_layers = default_critical_layers(engine.config.num_layers, name)
        cfg = engine.config
        opts = AttnOptions(impl=attention, naive_expansion=naive_expansion,
                           sliding_window=cfg.sliding_window if cfg.sliding_window and cfg.sliding_window < max_len else None)
        self.scheme = make_scheme(self.scheme_name, engine, self.agents, batch, self.max_len,
                                  cache_dtype or engine.dtype, opts, critical_layers=critical_layers)
        self.trajectory: list[list[int]] = [[] for _ in range(batch)]
        self.turns: list[TurnStats] = []
        self._seed = seed
        self._key_counter = 0
        self._pending = None  # branches of the last generate_concurrent()

    # ---- building the trajectory ---------------------------------------------------------
    def _to_rows(self, tokens_or_text) -> list[list[int]]:
        if isinstance(tokens_or_text, str):
            if self.tokenizer is None:
                raise ValueError("append(text) needs a tokenizer; pass token ids or give Session a tokenizer")
            ids = self.tokenizer.encode(tokens_or_text, add_special_tokens=not any(self.trajectory))
            return [list(ids) for _ in range(self.batch)]
        seq = list(tokens_or_text)
        if seq and isinstance(seq[0], (list, tuple, np.ndarray)):
            if len(seq) != self.batch:
                raise ValueError(f"got token lists for {len(seq)} rows; this session has batch={self.batch}")
            return [[int(t) for t in r] for r in seq]
        return [[int(t) for t in seq] for _ in range(self.batch)]

    def append(self, tokens_or_text) -> None:
        """Add context (text, token ids, or one id list per row) without computing anything."""
        rows = self._to_rows(tokens_or_text)
        V = self.engine.config.vocab_size
        for b, r in enumerate(rows):
            bad = [t for t in r if not 0 <= t < V]
            if bad:
                raise ValueError(f"token ids out of range [0, {V}): {bad[:5]}")
            if len(self.trajectory[b]) + len(r) > self.max_len:
                raise ValueError(
                    f"context of {len(self.trajectory[b]) + len(r)} tokens exceeds max_len={self.max_len}")
        for b, r in enumerate(rows):
            self.trajectory[b].extend(r)
        self._pending = None  # concurrent branches forked before this point are stale

    # ---- turns ---------------------------------------------------------------------------
    def _next_key(self, seed):
        self._key_counter += 1
        base = self._seed if seed is None else seed
        return jax.random.fold_in(jax.random.key(base), self._key_counter)

    def generate(self, agent: str, max_new_tokens: int = 32, *, greedy: bool = False, temperature: float = 1.0,
                 top_k: int = 0, top_p: float = 1.0, seed: int | None = None, stop_ids=None) -> list[list[int]]:
        """The agent catches up, then decodes up to max_new_tokens per row; returns each row's tokens."""
        if agent not in self.agents:
            raise KeyError(f"unknown agent {agent!r}; agents: {list(self.agents)}")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        T = np.array([len(t) for t in self.trajectory])
        if T.min() == 0:
            raise ValueError("the trajectory is empty: append() a prompt before generate()")
        if T.max() + max_new_tokens > self.max_len:
            raise ValueError(f"trajectory of {T.max()} tokens + max_new_tokens={max_new_tokens} exceeds "
                             f"max_len={self.max_len}")
        sampling = SamplingParams.make(self.batch, greedy=greedy, temperature=temperature, top_k=top_k, top_p=top_p)
        stops = self.stop_ids if stop_ids is None else tuple(stop_ids)
        key = self._next_key(seed)
        k_first, k_rest = jax.random.split(key)

        t0 = time.perf_counter()
        logits, catch_up, new = self.scheme.prepare(agent, self.trajectory)
        jax.block_until_ready(logits)
        t1 = time.perf_counter()
        first = self.engine.sample(logits, sampling, k_first)
        first = np.asarray(first)
        t2 = time.perf_counter()
        tokens, counts = self.scheme.decode(agent, first, T, sampling, k_rest, max_new_tokens, stops)
        tokens = np.asarray(tokens)
        t3 = time.perf_counter()

        out = [tokens[b, : counts[b]].tolist() for b in range(self.batch)]
        for b in range(self.batch):
            self.trajectory[b].extend(out[b])
        self.turns.append(TurnStats(agent=agent, catch_up_tokens=catch_up, new_tokens=new, prefill_s=t1 - t0,
                                    ttft_s=t2 - t0, decode_s=t3 - t2, generated_tokens=int(np.sum(counts))))
        return out

    # ---- concurrent agents ---------------------------------------------------------------
    def generate_concurrent(self, requests, *, greedy: bool = False, temperature: float = 1.0, top_k: int = 0,
                            top_p: float = 1.0, seed: int | None = None, stop_ids=None) -> dict:
        """Fork the trajectory into one branch per agent at the current position and decode them all.

        requests: {agent: max_new_tokens} or {agent: {"max_new_tokens": n, "greedy": ..., "temperature":
        ..., "top_k": ..., "top_p": ...}} (options not given fall back to the keyword arguments).
        Returns {agent: [tokens per row]}. The trajectory and the shared caches are unchanged: call
        adopt(agent) to let one branch join the trajectory (as if that agent had generated it), or
        append() tokens of any branch yourself. full_shared and base_lr_shared decode all branches
        in one jitted loop reading the shared prefix once per step; the other schemes run the
        branches one after another (each agent catches up first).
        """
        if not isinstance(requests, Mapping) or not requests:
            raise ValueError("generate_concurrent takes a non-empty dict {agent: max_new_tokens or options}, "
                             f"got {requests!r}")
        defaults = dict(greedy=greedy, temperature=temperature, top_k=top_k, top_p=top_p)
        opts, max_new = {}, {}
        for agent, req in requests.items():
            if agent not in self.agents:
                raise KeyError(f"unknown agent {agent!r}; agents: {list(self.agents)}")
            if isinstance(req, numbers.Integral) and not isinstance(req, bool):
                req = {"max_new_tokens": int(req)}
            elif isinstance(req, Mapping):
                req = dict(req)
            else:
                raise ValueError(f"agent {agent!r}: expected max_new_tokens (an int) or a dict of options, got {req!r}")
            n = req.pop("max_new_tokens", 32)
            bad = set(req) - set(defaults)
            if bad:
                raise ValueError(f"agent {agent!r}: unknown options {sorted(bad)}; allowed: max_new_tokens, "
                                 f"{', '.join(defaults)}")
            if n < 1:
                raise ValueError(f"agent {agent!r}: max_new_tokens must be >= 1, got {n}")
            opts[agent] = SamplingParams.make(1, **{**defaults, **req})
            max_new[agent] = int(n)
        T = np.array([len(t) for t in self.trajectory])
        if T.min() == 0:
            raise ValueError("the trajectory is empty: append() a prompt before generate_concurrent()")
        if T.max() + max(max_new.values()) > self.max_len:
            raise ValueError(f"trajectory of {T.max()} tokens + max_new_tokens={max(max_new.values())} exceeds "
                             f"max_len={self.max_len}")
        agents = list(requests)
        stops = self.stop_ids if stop_ids is None else tuple(stop_ids)
        key = self._next_key(seed)
        keys = [tuple(jax.random.split(k)) for k in jax.random.split(key, len(agents))]

        def sampling_for(agent, rows):
            return jax.tree.map(lambda x: jnp.repeat(x, rows), opts[agent])

        t0 = time.perf_counter()
        out, pending = self.scheme.branch(agents, self.trajectory, self.engine.sample, max_new, stops,
                                          sampling_for, keys)
        elapsed = time.perf_counter() - t0
        branches = {a: [tok[b, : cnt[b]].tolist() for b in range(self.batch)] for a, (tok, cnt) in out.items()}
        self._pending = dict(T=T, branches=branches, scheme_state=pending, elapsed_s=elapsed)
        return branches

    def adopt(self, agent: str) -> list[list[int]]:
        """The agent's branch from the last generate_concurrent() joins the trajectory."""
        pending = getattr(self, "_pending", None)
        if pending is None:
            raise ValueError("no concurrent branches to adopt: call generate_concurrent() first")
        if agent not in pending["branches"]:
            raise KeyError(f"no branch for agent {agent!r}; branches: {list(pending['branches'])}")
        if not np.array_equal(np.array([len(t) for t in self.trajectory]), pending["T"]):
            raise ValueError("the trajectory changed since generate_concurrent(); its branches are stale")
        tokens = pending["branches"][agent]
        self._pending = None
        self.scheme.adopt(agent, self.trajectory, tokens, pending["scheme_state"])
        return tokens

    def discard_branches(self) -> None:
        """Drop the branches of the last generate_concurrent() (nothing in the caches to undo)."""
        self._pending = None

    def score(self, agent: str, tokens) -> list[np.ndarray]:
        """Teacher forcing: the agent catches up, then processes `tokens` as if it had generated
        them (they join the trajectory). Returns per row the float32 logits [n, V] the agent
        assigned before each of the n tokens (row i predicts tokens[i]).
        """
        if agent not in self.agents:
            raise KeyError(f"unknown agent {agent!r}; agents: {list(self.agents)}")
        rows = self._to_rows(tokens)
        if any(len(r) == 0 for r in rows):
            raise ValueError("score() needs at least one token per row")
        if min(len(t) for t in self.trajectory) == 0:
            raise ValueError("the trajectory is empty: append() a prompt before score()")
        first, _, _ = self.scheme.prepare(agent, self.trajectory)
        first = np.asarray(first)
        self.append([r[:-1] for r in rows])
        rest, _, _ = self.scheme.prepare(agent, self.trajectory, want_logits="all")
        self.append([r[-1:] for r in rows])
        out = []
        for b, r in enumerate(rows):
            tail = rest[b][len(rest[b]) - (len(r) - 1):] if len(r) > 1 else rest[b][:0]
            out.append(np.concatenate([first[b : b + 1], tail]))
        return out

    # ---- reporting -----------------------------------------------------------------------
    @property
    def cache_bytes(self) -> int:
        """Bytes of every cache array this scheme holds (preallocated to max_len)."""
        return self.scheme.nbytes

    def text(self, tokens) -> str | None:
        return None if self.tokenizer is None else self.tokenizer.decode(tokens)

    def stats(self) -> dict:
        total_tokens = int(sum(len(t) for t in self.trajectory))
        elapsed = sum(t.total_s for t in self.turns)
        return {
            "scheme": self.scheme_name,
            "batch": self.batch,
            "trajectory_tokens": total_tokens,
            "turns": len(self.turns),
            "catch_up_tokens": sum(t.catch_up_tokens for t in self.turns),
            "new_tokens": sum(t.new_tokens for t in self.turns),
            "generated_tokens": sum(t.generated_tokens for t in self.turns),
            "ttft_s": sum(t.ttft_s for t in self.turns),
            "prefill_s": sum(t.prefill_s for t in self.turns),
            "decode_s": sum(t.decode_s for t in self.turns),
            "elapsed_s": elapsed,
            "tokens_per_s": total_tokens / elapsed if elapsed > 0 else 0.0,
            "cache_bytes": self.cache_bytes,
        }
