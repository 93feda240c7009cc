"""Multi-agent Session: one shared trajectory (or a batch of them), named agents, one scheme.

    session = Session(engine, scheme="base_lr_shared", max_len=8192, tokenizer=tok)
    session.append("Question: ...")
    plan = session.generate("plan", max_new_tokens=32)      # catch up, then decode
    session.append(tool_output)
    act = session.generate("action", max_new_tokens=8)

append() only records tokens; generate() makes the agent catch up as its scheme
requires, decodes, and appends what it generated to the trajectory. Every turn is
recorded in `session.turns` with its catch-up work and timings.

Integrity: every public method checks all of its input before it changes anything, and runs
as one transaction: the pre-call host state (trajectory lengths, turn records, RNG counter,
pending branches, the scheme's held counts and cache references) is kept by reference, and a
failure rolls it back. The jitted steps donate their caches, so a step that ran leaves the old
buffers deleted; but a step writes only slots past the held counts, so its output caches with the
old counts are the old state (the slots it wrote are never read). Only when a step failed after
its inputs were donated (no live output) is the Session marked broken. A Ctrl-C during a turn is
held until the turn ends, then the turn is rolled back and KeyboardInterrupt raised.
"""

from __future__ import annotations

import contextlib
import dataclasses
import numbers
import signal
import threading
import time
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from . import checks, sharding
from .cache import AttnOptions
from .config import check_dtype, preset_name
from .engine import BASE_AGENT, Engine
from .memory import check_cache_fits
from .sampling import SamplingParams
from .schemes import (DROIDSPEAK_LAYERS, Scheme, canonical_scheme, check_critical_layers, default_critical_layers,
                      make_scheme)


class SessionBrokenError(RuntimeError):
    """A failure inside a jitted step consumed (donated) this Session's caches."""


@dataclasses.dataclass
class TurnStats:
    agent: str
    catch_up_tokens: int  # tokens recomputed that some cache already held (all rows)
    new_tokens: int  # tokens processed for the first time at the turn's start (all rows)
    prefill_s: float  # catch-up + prefill, up to the logits of the last token
    ttft_s: float  # turn start to the first generated token on the host
    decode_s: float  # the rest of the turn
    generated_tokens: int  # all rows
    rows: list = dataclasses.field(default_factory=list)  # the rows that took the turn (empty: every row)
    catch_up_by_row: list = dataclasses.field(default_factory=list)  # per row of the batch (0 if not in the turn)
    new_by_row: list = dataclasses.field(default_factory=list)

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
        from .attention import check_impl

        # Everything is checked before the caches are allocated.
        batch = checks.count(batch, "batch")
        max_len = checks.count(max_len, "max_len", minimum=2)
        check_impl(attention)
        scheme_name = canonical_scheme(scheme)
        cache_dtype = check_dtype(engine.dtype if cache_dtype is None else cache_dtype, "cache_dtype")
        stop_ids = _token_list(engine.config.eos_token_ids if stop_ids is None else stop_ids, "stop_ids")
        seed = _integer(seed, "seed")
        cfg = engine.config
        if critical_layers is None:
            name = model_name if model_name in DROIDSPEAK_LAYERS else preset_name(cfg)
            critical_layers = default_critical_layers(cfg.num_layers, name)
        # Only droidspeak reads the critical layers (other schemes keep None, as they ignore them).
        critical_layers = check_critical_layers(critical_layers, cfg.num_layers) if scheme_name == "droidspeak" \
            else None
        agents = tuple(engine.lora.names) if engine.lora is not None else (BASE_AGENT,)
        # Caches + the largest call's temporaries, refused in one line before anything is allocated
        # or compiled (an over-large batch otherwise fails deep in XLA, or after minutes of remat).
        call_tokens = batch * engine.call_buckets(batch)[-1]
        check_cache_fits(scheme_name, cfg, max_len=max_len, num_agents=len(agents), dtype=cache_dtype, batch=batch,
                         value_rank=engine.lora.value_rank() if engine.lora is not None else 0,
                         num_critical=len(critical_layers or ()), work_bytes=engine.work_bytes(batch),
                         work=f"work buffers (a prefill call of {call_tokens} tokens)")

        self.engine = engine
        self.scheme_name = scheme_name
        # Without adapters there is one agent, "base" (the plain model).
        self.agents = agents
        self.batch = batch
        self.max_len = max_len
        self.tokenizer = tokenizer
        self.stop_ids = stop_ids
        self.critical_layers = critical_layers
        self.attn_options = AttnOptions(
            impl=attention, naive_expansion=bool(naive_expansion),
            sliding_window=cfg.sliding_window if cfg.sliding_window and cfg.sliding_window < max_len else None)
        self.scheme = make_scheme(self.scheme_name, engine, self.agents, batch, self.max_len, cache_dtype,
                                  self.attn_options, critical_layers=critical_layers)
        self.trajectory: list[list[int]] = [[] for _ in range(batch)]
        self.turns: list[TurnStats] = []
        self._seed = seed
        self._key_counter = 0
        self._pending = None  # branches of the last generate_concurrent()
        self._broken: str | None = None

    # ---- integrity -----------------------------------------------------------------------
    def _check_usable(self) -> None:
        if self._broken is not None:
            raise SessionBrokenError(self._broken)

    @contextlib.contextmanager
    def _transaction(self):
        """Run the body as one step: on any failure the Session is as before (or marked broken)."""
        self._check_usable()
        saved = dict(lengths=[len(t) for t in self.trajectory], turns=len(self.turns), key_counter=self._key_counter,
                     pending=self._pending, scheme=self.scheme.state())
        with _HeldInterrupt() as interrupt:
            try:
                yield
                interrupt.raise_if_pending()
            except BaseException as error:
                self._roll_back(saved, error)
                raise

    def _roll_back(self, saved: dict, error: BaseException) -> None:
        for row, n in zip(self.trajectory, saved["lengths"]):
            del row[n:]
        del self.turns[saved["turns"]:]
        self._key_counter = saved["key_counter"]
        self._pending = saved["pending"]
        old = saved["scheme"]
        caches = lambda state: {k: v for k, v in state.items() if not Scheme.is_count(k)}  # noqa: E731
        if _all_live(caches(old)):  # no step consumed them: the exact old state
            self.scheme.set_state(old)
            return
        now = caches(self.scheme.state())
        if _all_live(now):  # the steps' outputs with the old counts: slots past them are never read
            self.scheme.set_state({**old, **now})
            return
        reason = " ".join(str(error).split()) or "no message"
        self._broken = (f"this Session is unusable: {type(error).__name__} ({reason[:200]}) happened inside a jitted "
                        f"step after its caches were donated; restore a checkpoint with Session.restore(path, engine) "
                        f"or start a new Session")

    # ---- building the trajectory ---------------------------------------------------------
    def _to_rows(self, tokens_or_text, what: str = "tokens") -> list[list[int]]:
        if isinstance(tokens_or_text, str):
            if self.tokenizer is None:
                raise ValueError("append(text) needs a tokenizer; pass token ids or give Session a tokenizer")
            ids = self.tokenizer.encode(tokens_or_text, add_special_tokens=not any(self.trajectory))
            rows = [list(ids) for _ in range(self.batch)]
        else:
            try:
                seq = list(tokens_or_text)
            except TypeError:
                raise ValueError(f"{what}: expected text, token ids or one id list per row, got "
                                 f"{tokens_or_text!r}") from None
            if seq and isinstance(seq[0], (list, tuple, np.ndarray)):
                if len(seq) != self.batch:
                    raise ValueError(f"{what}: got token lists for {len(seq)} rows; this session has "
                                     f"batch={self.batch}")
                rows = [_token_list(r, what) for r in seq]
            else:
                rows = [_token_list(seq, what)] * self.batch
        V = self.engine.config.vocab_size
        for b, r in enumerate(rows):
            bad = [t for t in r if not 0 <= t < V]
            if bad:
                raise ValueError(f"{what}: token ids out of range [0, {V}): {bad[:5]}")
            if len(self.trajectory[b]) + len(r) > self.max_len:
                raise ValueError(f"{what}: context of {len(self.trajectory[b]) + len(r)} tokens exceeds "
                                 f"max_len={self.max_len}")
        return [list(r) for r in rows]

    def _extend(self, rows) -> None:
        for b, r in enumerate(rows):
            self.trajectory[b].extend(r)

    def append(self, tokens_or_text) -> None:
        """Add context (text, token ids, or one id list per row) without computing anything."""
        self._check_usable()
        rows = self._to_rows(tokens_or_text)
        with self._transaction():
            self._extend(rows)
            self._pending = None  # concurrent branches forked before this point are stale

    # ---- turns ---------------------------------------------------------------------------
    def _agent(self, agent) -> str:
        if not isinstance(agent, str) or agent not in self.agents:
            raise KeyError(f"unknown agent {agent!r}; agents: {list(self.agents)}")
        return agent

    def _next_key(self, seed):
        self._key_counter += 1
        base = self._seed if seed is None else seed
        return jax.random.fold_in(jax.random.key(base), self._key_counter)

    def _check_room(self, max_new_tokens: int, what: str, active=None) -> np.ndarray:
        T = np.array([len(t) for t in self.trajectory])
        mine = T if active is None else T[active]
        if mine.min() == 0:
            raise ValueError(f"the trajectory is empty: append() a prompt before {what}()")
        if mine.max() + max_new_tokens > self.max_len:
            raise ValueError(f"trajectory of {mine.max()} tokens + max_new_tokens={max_new_tokens} exceeds "
                             f"max_len={self.max_len}")
        return T

    def _row_mask(self, rows) -> np.ndarray:
        """rows: None (every row), a bool mask [batch], or row indices -> bool mask [batch], not empty."""
        if rows is None:
            return np.ones(self.batch, bool)
        if isinstance(rows, (str, bytes)) or not hasattr(rows, "__iter__"):
            raise ValueError(f"rows: expected a bool mask of {self.batch} rows or a list of row indices, got {rows!r}")
        values = list(rows)
        if values and all(isinstance(v, (bool, np.bool_)) for v in values):
            if len(values) != self.batch:
                raise ValueError(f"rows: a mask of {len(values)} entries for a session of batch={self.batch}")
            mask = np.array(values, bool)
        else:
            bad = [v for v in values if isinstance(v, (bool, np.bool_)) or not isinstance(v, numbers.Integral)
                   or not 0 <= v < self.batch]
            if bad:
                raise ValueError(f"rows: {bad[0]!r} is not a row index in 0..{self.batch - 1} (or give a bool mask)")
            if len(set(int(v) for v in values)) != len(values):
                raise ValueError(f"rows: repeated row index in {values!r}")
            mask = np.zeros(self.batch, bool)
            mask[[int(v) for v in values]] = True
        if not mask.any():
            raise ValueError("rows selects no row; a turn needs at least one")
        return mask

    def generate(self, agent: str, max_new_tokens: int = 32, *, greedy: bool = False, temperature: float = 1.0,
                 top_k: int = 0, top_p: float = 1.0, seed: int | None = None, stop_ids=None,
                 rows=None) -> list[list[int]]:
        """The agent catches up, then decodes up to max_new_tokens per row; returns each row's tokens.

        rows: the rows that take this turn (a bool mask [batch] or row indices; default every row).
        The others generate nothing (their list is empty): their trajectory, their caches (bit for
        bit) and held counts stay as they were, so their next turn is as if this one never ran.
        """
        self._check_usable()
        self._agent(agent)
        max_new_tokens = checks.count(max_new_tokens, "max_new_tokens")
        active = self._row_mask(rows)
        T = self._check_room(max_new_tokens, "generate", active)
        sampling = SamplingParams.make(self.batch, greedy=greedy, temperature=temperature, top_k=top_k, top_p=top_p)
        stops = self.stop_ids if stop_ids is None else _token_list(stop_ids, "stop_ids")
        seed = None if seed is None else _integer(seed, "seed")

        with self._transaction():
            key = self._next_key(seed)
            k_first, k_rest = jax.random.split(key)
            t0 = time.perf_counter()
            logits, catch_up, new = self.scheme.prepare(agent, self.trajectory, active=active)
            jax.block_until_ready(logits)
            t1 = time.perf_counter()
            first = self.engine.sample(logits, sampling, k_first)
            first = sharding.to_host(first)
            t2 = time.perf_counter()
            tokens, counts = self.scheme.decode(agent, first, T, sampling, k_rest, max_new_tokens, stops,
                                                active=active)
            tokens = sharding.to_host(tokens)
            t3 = time.perf_counter()

            out = [tokens[b, : counts[b]].tolist() if active[b] else [] for b in range(self.batch)]
            self._extend(out)
            self.turns.append(TurnStats(
                agent=agent, catch_up_tokens=int(np.sum(catch_up)), new_tokens=int(np.sum(new)), prefill_s=t1 - t0,
                ttft_s=t2 - t0, decode_s=t3 - t2, generated_tokens=int(np.sum(counts)),
                rows=[] if active.all() else np.flatnonzero(active).tolist(),
                catch_up_by_row=np.asarray(catch_up).tolist(), new_by_row=np.asarray(new).tolist()))
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
        self._check_usable()
        if not isinstance(requests, Mapping) or not requests:
            raise ValueError("generate_concurrent takes a non-empty dict {agent: max_new_tokens or options}, "
                             f"got {requests!r}")
        defaults = dict(greedy=greedy, temperature=temperature, top_k=top_k, top_p=top_p)
        opts, max_new = {}, {}
        for agent, req in requests.items():
            self._agent(agent)
            if isinstance(req, Mapping):
                req = dict(req)
            elif isinstance(req, numbers.Number):  # 2.5 is refused by checks.count below
                req = {"max_new_tokens": req}
            else:
                raise ValueError(f"agent {agent!r}: expected max_new_tokens (an int) or a dict of options, got {req!r}")
            n = checks.count(req.pop("max_new_tokens", 32), f"agent {agent!r}: max_new_tokens")
            bad = set(req) - set(defaults)
            if bad:
                raise ValueError(f"agent {agent!r}: unknown options {sorted(bad)}; allowed: max_new_tokens, "
                                 f"{', '.join(defaults)}")
            opts[agent] = SamplingParams.make(1, **{**defaults, **req})
            max_new[agent] = n
        T = self._check_room(max(max_new.values()), "generate_concurrent")
        agents = list(requests)
        stops = self.stop_ids if stop_ids is None else _token_list(stop_ids, "stop_ids")
        seed = None if seed is None else _integer(seed, "seed")

        def sampling_for(agent, rows):
            return jax.tree.map(lambda x: jnp.repeat(x, rows), opts[agent])

        with self._transaction():
            key = self._next_key(seed)
            keys = [tuple(jax.random.split(k)) for k in jax.random.split(key, len(agents))]
            t0 = time.perf_counter()
            out, pending = self.scheme.branch(agents, self.trajectory, self.engine.sample, max_new, stops,
                                              sampling_for, keys)
            elapsed = time.perf_counter() - t0
            branches = {a: [tok[b, : cnt[b]].tolist() for b in range(self.batch)] for a, (tok, cnt) in out.items()}
            self._pending = dict(T=T, branches=branches, scheme_state=pending, elapsed_s=elapsed)
        return branches

    def adopt(self, agent: str) -> list[list[int]]:
        """The agent's branch from the last generate_concurrent() joins the trajectory."""
        self._check_usable()
        pending = self._pending
        if pending is None:
            raise ValueError("no concurrent branches to adopt: call generate_concurrent() first")
        if agent not in pending["branches"]:
            raise KeyError(f"no branch for agent {agent!r}; branches: {list(pending['branches'])}")
        if not np.array_equal(np.array([len(t) for t in self.trajectory]), pending["T"]):
            raise ValueError("the trajectory changed since generate_concurrent(); its branches are stale")
        tokens = pending["branches"][agent]
        with self._transaction():
            self._pending = None
            self.scheme.adopt(agent, self.trajectory, tokens, pending["scheme_state"])
        return tokens

    def discard_branches(self) -> None:
        """Drop the branches of the last generate_concurrent() (nothing in the caches to undo)."""
        self._check_usable()
        self._pending = None

    def score(self, agent: str, tokens) -> list[np.ndarray]:
        """Teacher forcing: the agent catches up, then processes `tokens` as if it had generated
        them (they join the trajectory). Returns per row the float32 logits [n, V] the agent
        assigned before each of the n tokens (row i predicts tokens[i]).
        """
        self._check_usable()
        self._agent(agent)
        rows = self._to_rows(tokens, "score() tokens")
        if any(len(r) == 0 for r in rows):
            raise ValueError("score() needs at least one token per row")
        if min(len(t) for t in self.trajectory) == 0:
            raise ValueError("the trajectory is empty: append() a prompt before score()")
        with self._transaction():
            first, _, _ = self.scheme.prepare(agent, self.trajectory)
            first = sharding.to_host(first)
            self._extend([r[:-1] for r in rows])
            rest, _, _ = self.scheme.prepare(agent, self.trajectory, want_logits="all")
            self._extend([r[-1:] for r in rows])
            self._pending = None
        out = []
        for b, r in enumerate(rows):
            tail = rest[b][len(rest[b]) - (len(r) - 1):] if len(r) > 1 else rest[b][:0]
            out.append(np.concatenate([first[b : b + 1], tail]))
        return out

    # ---- checkpoints ---------------------------------------------------------------------
    def save(self, path) -> None:
        """Write this Session (caches, trajectory, counts, RNG position, identities) to the folder
        `path`, atomically: an interrupted save leaves `path` absent or holding the previous
        checkpoint. Pending concurrent branches are not saved. See checkpoint.py."""
        from .checkpoint import save_session

        self._check_usable()
        save_session(self, path)

    @classmethod
    def restore(cls, path, engine: Engine, *, scheme: str | None = None, tokenizer=None) -> "Session":
        """The Session saved at `path`, on `engine` (which must hold the same model weights and
        adapters; `scheme`, if given, must be the saved one). It continues token for token."""
        from .checkpoint import restore_session

        return restore_session(path, engine, session_cls=cls, turn_cls=TurnStats, scheme=scheme, tokenizer=tokenizer)

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


def _integer(value, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{what} must be an integer, got {value!r} ({type(value).__name__})")
    return int(value)


def _token_list(values, what: str) -> tuple[int, ...]:
    """Integer token ids (Python or numpy ints); 2.5 or "7" is refused, not truncated or parsed."""
    if isinstance(values, (str, bytes)):
        raise ValueError(f"{what}: expected token ids, got the string {values!r}")
    try:
        seq = list(values)
    except TypeError:
        raise ValueError(f"{what}: expected a list of token ids, got {values!r}") from None
    bad = [t for t in seq if isinstance(t, bool) or not isinstance(t, numbers.Integral)]
    if bad:
        raise ValueError(f"{what}: token ids must be integers, got {bad[0]!r} ({type(bad[0]).__name__})")
    return tuple(int(t) for t in seq)


def _all_live(tree) -> bool:
    """True when every array in `tree` still exists (not donated) and computed without error."""
    leaves = [x for x in jax.tree.leaves(tree) if isinstance(x, jax.Array)]
    if any(x.is_deleted() for x in leaves):
        return False
    try:
        jax.block_until_ready(leaves)
    except Exception:  # an asynchronous failure (e.g. out of memory) poisons the outputs
        return False
    return True


class _HeldInterrupt:
    """Holds a Ctrl-C (SIGINT with Python's default handler, main thread) until the turn ends.

    A KeyboardInterrupt raised between a jitted step's return and the assignment of its output
    would lose the only live copy of a donated cache; held, it is raised at the end of the turn,
    which is then rolled back.
    """

    def __enter__(self):
        self.pending = False
        self._previous = None
        if threading.current_thread() is threading.main_thread() and \
                signal.getsignal(signal.SIGINT) is signal.default_int_handler:
            self._previous = signal.signal(signal.SIGINT, self._hold)
        return self

    def _hold(self, signum, frame):
        self.pending = True

    def raise_if_pending(self):
        if self.pending:
            raise KeyboardInterrupt("interrupted during a Session call; the call was rolled back")

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
        return False
