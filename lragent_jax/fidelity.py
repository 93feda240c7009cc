"""Is cache sharing safe for *your* adapters? Value-cache similarity and scheme fidelity.

Two measurements, both on the user's own checkpoint (docs/design.md section 1 notation):

1. `value_similarity(engine, tokens)` -- the paper's Tables 1-2. Every agent runs the
   model over the same trajectory with its own adapter (so each agent has its own hidden
   states X_i, even for the base cache), and a recording cache captures per layer and
   token:
       full     V_i      = X_i W_v + s_i (X_i A_i) B_i    what a non_shared cache stores
       base     V_base,i = X_i W_v                        what base_shared shares
       adapter  s_i (X_i A_i) B_i                         the LoRA output on the values
       lr       LR_i     = X_i A_i                        what base_lr_shared shares
   For each kind, layer l and agent pair (i, j) the similarity is

       sim_l(i, j) = mean over tokens t of cos(u_i[l, t], u_j[l, t]),
       cos(a, b)   = <a, b> / (|a| |b|)

   where u[l, t] is token t's whole vector at layer l, flattened over KV heads and head
   dim (Hkv * D numbers; r numbers for LR), computed in float64. A token whose vector
   has zero norm for either agent has no defined cosine: it is left out of the mean and
   counted in `undefined` (a layer where every token is undefined reports NaN, e.g. the
   adapter output of all-zero B). Reported per layer: the mean over all agent pairs
   (and each pair separately); `average` is the mean over layers. LR similarity only
   means "the same cache" when all agents share A_v (`shared_a`); with independent A
   the r-dim coordinates of different agents are unrelated and the number is reported
   for completeness only.

2. `scheme_fidelity(engine, prompt, turns)` -- how far each sharing scheme drifts from
   non_shared over a multi-turn run:
     * free-running greedy decoding: per turn, the fraction of positions where the
       scheme's token equals non_shared's (over the longer of the two), and the first
       position where they differ;
     * teacher forcing: both sessions score the same (non_shared) turn tokens with
       Session.score (same appends in between), and we report the mean and max over all
       scored positions of KL(P_non_shared || P_scheme) of the next-token distributions
       (float64 log-softmax on the host) and the top-1 agreement of the two.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from . import attention
from .cache import ViewDefaults, write_slots
from .cache import capacity as cache_capacity
from .engine import Engine
from .model import StepInputs, ValueParts
from .schemes import canonical_scheme
from .session import Session

KINDS = ("full", "base", "adapter", "lr")

COSINE_DEFINITION = (
    "per layer: mean over agent pairs (i<j) of the mean over tokens t of cos(u_i[l,t], u_j[l,t]), "
    "u[l,t] = token t's value vector at layer l flattened over KV heads x head_dim (r for LR), float64; "
    "tokens where either vector has zero norm are excluded (counted as undefined); average = mean over layers"
)


# ---- 1. value-cache similarity ---------------------------------------------------------------
@struct.dataclass
class RecordingKV(ViewDefaults):
    """A cache view that attends like a non_shared cache and records every value part.

    k, v: [L, B, T, Hkv, D] in the model dtype -- exactly what DenseKV stores, so the
    forward is the non_shared forward. base [L, B, T, Hkv, D] (X W_v, cache dtype),
    adapter [L, B, T, Hkv, D] float32 (s (X A) B), lr [L, B, T, r] (X A, cache dtype)
    or None when no adapter has LoRA on v_proj.
    """

    k: jax.Array
    v: jax.Array
    base: jax.Array
    adapter: jax.Array
    lr: jax.Array | None
    impl: str = struct.field(pytree_node=False, default="xla")
    sliding_window: int | None = struct.field(pytree_node=False, default=None)

    @classmethod
    def create(cls, config, batch, max_len, rank, dtype, *, impl="xla", sliding_window=None):
        shape = (config.num_layers, batch, cache_capacity(max_len), config.num_kv_heads, config.head_dim)
        lr = jnp.zeros(shape[:3] + (rank,), dtype) if rank else None
        return cls(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype), base=jnp.zeros(shape, dtype),
                   adapter=jnp.zeros(shape, jnp.float32), lr=lr, impl=impl, sliding_window=sliding_window)

    @property
    def capacity(self) -> int:
        return self.k.shape[2]

    def update_and_attend(self, layer, q, k, values: ValueParts, step: StepInputs):
        wp = step.write_positions
        new = self.replace(k=write_slots(self.k, layer, wp, k), v=write_slots(self.v, layer, wp, values.full()),
                           base=write_slots(self.base, layer, wp, values.base))
        if values.lr is not None and self.lr is not None:
            delta = values.scale[:, None, None, None] * jnp.einsum(
                "bsr,bhrd->bshd", values.lr, values.lora_b, preferred_element_type=jnp.float32)
            new = new.replace(adapter=write_slots(self.adapter, layer, wp, delta), lr=write_slots(self.lr, layer, wp, values.lr))
        out = attention.attend(q, new.k, new.v, layer=layer, kv_lengths=step.kv_lengths, q_offsets=step.q_offsets,
                               impl=self.impl, sliding_window=self.sliding_window)
        return out, new


def record_values(engine: Engine, tokens: Sequence[int], agents=None, *, attention_impl: str = "xla"):
    """Run every agent over `tokens` (one batch row per agent) and return the recording.

    The forward is the engine's own prefill (bucketed chunks, any layer mode) over a
    RecordingKV view, so it is exactly the non_shared forward. Returns (RecordingKV with
    batch axis = agents, last-token logits [N, V]); only the first len(tokens) slots of
    the buffers are meaningful.
    """
    tokens = [int(t) for t in tokens]
    agents = _check_agents(engine, agents)
    cfg = engine.config
    V = cfg.vocab_size
    bad = [t for t in tokens if not 0 <= t < V]
    if bad:
        raise ValueError(f"token ids out of range [0, {V}): {bad[:5]}")
    if not tokens:
        raise ValueError("the trajectory is empty: give at least one token")
    T = len(tokens)
    N = len(agents)
    rank = engine.lora.value_rank() if engine.lora is not None else 0
    sw = cfg.sliding_window if cfg.sliding_window and cfg.sliding_window < cache_capacity(T) else None
    cache = RecordingKV.create(cfg, N, T, rank, engine.dtype, impl=attention_impl, sliding_window=sw)
    logits, cache = engine.prefill(cache, [tokens] * N, np.zeros(N, np.int64), engine.adapter_ids(agents))
    return cache, logits


def _check_agents(engine: Engine, agents):
    names = tuple(engine.lora.names) if engine.lora is not None else ()
    if agents is None:
        agents = names
    agents = tuple(agents)
    for a in agents:
        if a not in names:
            raise KeyError(f"unknown agent {a!r}; agents: {list(names)}")
    if len(set(agents)) < 2:
        raise ValueError(f"value similarity compares agents: need at least two distinct adapters, got {list(agents)}")
    return agents


def token_cosines(x: np.ndarray) -> dict:
    """x [N, T, F] (one vector per agent and token) -> {(i, j): cos [T] float64, NaN where undefined}."""
    x = np.asarray(x, np.float64)
    norms = np.linalg.norm(x, axis=-1)
    out = {}
    for i, j in itertools.combinations(range(x.shape[0]), 2):
        den = norms[i] * norms[j]
        dot = np.einsum("tf,tf->t", x[i], x[j])
        with np.errstate(invalid="ignore", divide="ignore"):
            out[(i, j)] = np.where(den > 0, dot / np.where(den > 0, den, 1.0), np.nan)
    return out


def _nanmean(x) -> float:
    x = np.asarray(x, np.float64)
    ok = ~np.isnan(x)
    return float(x[ok].mean()) if ok.any() else float("nan")


@dataclasses.dataclass
class SimilarityResult:
    """Per-layer agent-pair cosine similarity of value-cache parts (see the module doc)."""

    agents: tuple
    num_tokens: int
    shared_a: bool  # all agents share A_v: the LR similarity compares the same cache
    has_value_lora: bool
    per_layer: dict  # kind -> float64 [L], mean over agent pairs (NaN: undefined everywhere)
    pairs: dict  # kind -> {"a|b": float64 [L]}
    undefined: dict  # kind -> int [L], tokens x pairs without a defined cosine
    adapter_norm_ratio: np.ndarray  # [L], mean over agents and tokens of |s (X A) B| / |X W_v|
    definition: str = COSINE_DEFINITION

    @property
    def average(self) -> dict:
        return {k: _nanmean(v) for k, v in self.per_layer.items()}

    @property
    def num_layers(self) -> int:
        return len(self.adapter_norm_ratio)

    def to_dict(self) -> dict:
        return _jsonable({
            "agents": list(self.agents), "num_tokens": self.num_tokens, "num_layers": self.num_layers,
            "shared_a": self.shared_a, "has_value_lora": self.has_value_lora,
            "per_layer": self.per_layer, "average": self.average, "pairs": self.pairs,
            "undefined": self.undefined, "adapter_norm_ratio": self.adapter_norm_ratio,
            "definition": self.definition,
        })


def similarity_from_values(values: dict, agents, *, shared_a: bool, has_value_lora: bool = True,
                           num_tokens: int | None = None) -> SimilarityResult:
    """values: kind -> array [L, N, T, F...] (agents on axis 1; numpy or device arrays, fetched one
    layer at a time). Only the first num_tokens tokens count (default all)."""
    agents = tuple(agents)

    def layer_of(arr, layer):
        x = np.asarray(arr[layer], np.float64)
        return x[:, :num_tokens] if num_tokens is not None else x

    pair_names = ["|".join((agents[i], agents[j])) for i, j in itertools.combinations(range(len(agents)), 2)]
    per_layer, pairs, undefined = {}, {}, {}
    L = T = None
    for kind in KINDS:
        arr = values.get(kind)
        if arr is None:
            continue
        L, N = arr.shape[:2]
        T = arr.shape[2] if num_tokens is None else num_tokens
        pl = np.full(L, np.nan)
        pp = {p: np.full(L, np.nan) for p in pair_names}
        und = np.zeros(L, np.int64)
        for layer in range(L):
            cos = token_cosines(layer_of(arr, layer).reshape(N, T, -1))
            means = []
            for name, c in zip(pair_names, cos.values()):
                pp[name][layer] = _nanmean(c)
                und[layer] += int(np.isnan(c).sum())
                means.append(pp[name][layer])
            pl[layer] = _nanmean(means)
        per_layer[kind], pairs[kind], undefined[kind] = pl, pp, und
    if "lr" not in per_layer and L is not None:  # no LoRA on v: no LR cache at all
        per_layer["lr"] = np.full(L, np.nan)
        pairs["lr"] = {p: np.full(L, np.nan) for p in pair_names}
        undefined["lr"] = np.full(L, len(pair_names) * T, np.int64)
    ratio = np.full(L, np.nan)
    if "adapter" in values and "base" in values:
        for layer in range(L):
            a = np.linalg.norm(layer_of(values["adapter"], layer).reshape(N, T, -1), axis=-1)
            b = np.linalg.norm(layer_of(values["base"], layer).reshape(N, T, -1), axis=-1)
            with np.errstate(invalid="ignore", divide="ignore"):
                ratio[layer] = _nanmean(np.where(b > 0, a / np.where(b > 0, b, 1.0), np.nan))
    return SimilarityResult(agents=agents, num_tokens=int(T), shared_a=bool(shared_a), has_value_lora=has_value_lora,
                            per_layer=per_layer, pairs=pairs, undefined=undefined, adapter_norm_ratio=ratio)


def value_similarity(engine: Engine, tokens: Sequence[int], agents=None, *,
                     attention_impl: str = "xla") -> SimilarityResult:
    """Paper Tables 1-2 for `engine`'s adapters on one trajectory (token ids); see the module doc.

    All agents run as one batch (one row each); memory is about 5 value-sized buffers
    [L, N, len(tokens), Hkv, D]. Use a few hundred to a few thousand tokens.
    """
    agents = _check_agents(engine, agents)
    rec, _ = record_values(engine, tokens, agents, attention_impl=attention_impl)
    T = len(tokens)
    has_v = rec.lr is not None
    values = {"full": rec.v, "base": rec.base, "adapter": rec.adapter}  # [L, N, capacity, ...]
    if has_v:
        values["lr"] = rec.lr
    pv = engine.lora.get("v") if engine.lora is not None else None
    shared = bool(pv is not None and (pv.shared_a or _same_a(pv, engine.lora.names, agents)))
    return similarity_from_values(values, agents, shared_a=shared, has_value_lora=has_v, num_tokens=T)


def _same_a(pv, names, agents) -> bool:
    a = np.asarray(jax.device_get(pv.a))
    idx = [names.index(x) for x in agents]
    return bool(all(np.array_equal(a[:, idx[0]], a[:, i]) for i in idx[1:]))


# ---- 2. scheme fidelity vs non_shared --------------------------------------------------------
def log_softmax64(logits) -> np.ndarray:
    x = np.asarray(logits, np.float64)
    m = np.max(x, axis=-1, keepdims=True)
    return x - m - np.log(np.sum(np.exp(x - m), axis=-1, keepdims=True))


def kl_divergence(p_logits, q_logits) -> np.ndarray:
    """KL(P || Q) per row, float64, from logits [n, V]; tiny negative rounding clipped to 0."""
    lp, lq = log_softmax64(p_logits), log_softmax64(q_logits)
    return np.maximum(np.sum(np.exp(lp) * (lp - lq), axis=-1), 0.0)


def compare_tokens(a: Sequence[int], b: Sequence[int]) -> tuple[float, int | None]:
    """(fraction of positions equal over max(len), first differing index or None if identical)."""
    n = max(len(a), len(b))
    if n == 0:
        return 1.0, None
    eq = [x == y for x, y in zip(a, b)]
    first = next((i for i, e in enumerate(eq) if not e), None)
    if first is None and len(a) != len(b):
        first = min(len(a), len(b))
    return sum(eq) / n, first


@dataclasses.dataclass
class SchemeFidelity:
    scheme: str
    token_agreement: float  # free-running greedy: equal positions / positions, all turns
    first_divergence: int | None  # index into all generated tokens (turns concatenated); None = identical
    first_divergence_turn: int | None  # turn of the first divergence
    mean_kl: float  # teacher forcing: mean over all scored positions of KL(P_ns || P_scheme), nats
    max_kl: float
    tf_top1_agreement: float  # teacher forcing: argmax P_scheme == argmax P_ns
    positions: int  # scored positions
    turns: list  # per turn: agent, tokens, agreement, first_divergence, mean_kl, max_kl, tf_top1_agreement

    def to_dict(self) -> dict:
        return _jsonable(dataclasses.asdict(self))


@dataclasses.dataclass
class FidelityReport:
    prompt_tokens: int
    turns: list  # (agent, n)
    reference: list  # non_shared's greedy tokens per turn
    schemes: list  # SchemeFidelity
    skipped: dict  # scheme -> reason

    def to_dict(self) -> dict:
        return _jsonable({
            "prompt_tokens": self.prompt_tokens, "turns": [list(t) for t in self.turns],
            "reference": self.reference, "schemes": [s.to_dict() for s in self.schemes], "skipped": self.skipped,
        })


def _normalise_appends(appends, n_turns):
    if appends is None:
        return [[] for _ in range(n_turns)]
    appends = list(appends)
    if appends and all(isinstance(t, (int, np.integer)) for t in appends):  # one list after every turn
        return [[int(t) for t in appends] for _ in range(n_turns)]
    if len(appends) != n_turns:
        raise ValueError(f"appends: give one token list (or None) per turn ({n_turns}), got {len(appends)}")
    return [[int(t) for t in (a or [])] for a in appends]


def _normalise_turns(engine, turns):
    agents = tuple(engine.lora.names) if engine.lora is not None else ("base",)
    out = []
    for t in turns:
        agent, n = t
        if agent not in agents:
            raise KeyError(f"unknown agent {agent!r} in turns; agents: {list(agents)}")
        if int(n) < 1:
            raise ValueError(f"turn ({agent!r}, {n}): the number of tokens must be >= 1")
        out.append((agent, int(n)))
    if not out:
        raise ValueError("turns is empty: give at least one (agent, n)")
    return out


def scheme_fidelity(engine: Engine, prompt: Sequence[int], turns, schemes=None, *, appends=None,
                    max_len: int | None = None, stop_ids=(), critical_layers=None, model_name=None,
                    attention: str = "auto") -> FidelityReport:
    """Compare each scheme with non_shared over `turns` [(agent, n), ...] from `prompt` (ids).

    appends: None, one token list appended after every turn, or one list (or None) per turn
    (e.g. tool output). stop_ids: default () so each turn has exactly n tokens.
    schemes: default every scheme but non_shared (name it to compare it with itself);
    base_lr_shared is skipped (with the reason
    in `skipped`) when the adapters do not share A and the scheme was not asked for.
    """
    from .lora import SharedAError
    from .schemes import SCHEMES

    prompt = [int(t) for t in prompt]
    if not prompt:
        raise ValueError("prompt is empty: give at least one token")
    turns = _normalise_turns(engine, turns)
    apps = _normalise_appends(appends, len(turns))
    explicit = schemes is not None
    schemes = [canonical_scheme(s) for s in (schemes if explicit else SCHEMES)]
    # non_shared is only compared with itself when asked for (a sanity check: agreement 1, KL 0)
    schemes = [s for s in dict.fromkeys(schemes) if explicit or s != "non_shared"]
    need = len(prompt) + sum(n for _, n in turns) + sum(len(a) for a in apps)
    max_len = max_len or need
    if need > max_len:
        raise ValueError(f"prompt + turns + appends = {need} tokens exceed max_len={max_len}")
    kw = dict(max_len=max_len, stop_ids=tuple(stop_ids), critical_layers=critical_layers, model_name=model_name,
              attention=attention)

    def free_run(scheme):
        s = Session(engine, scheme, **kw)
        s.append(prompt)
        out = []
        for (agent, n), app in zip(turns, apps):
            out.append(s.generate(agent, n, greedy=True)[0])
            if app:
                s.append(app)
        return out

    def teacher_forced(scheme, reference):
        s = Session(engine, scheme, **kw)
        s.append(prompt)
        out = []
        for (agent, _), toks, app in zip(turns, reference, apps):
            out.append(s.score(agent, toks)[0])
            if app:
                s.append(app)
        return out

    reference = free_run("non_shared")
    ref_logits = teacher_forced("non_shared", reference)
    results, skipped = [], {}
    for scheme in schemes:
        try:
            tokens = free_run(scheme)
        except SharedAError as e:
            if explicit:
                raise
            skipped[scheme] = str(e)
            continue
        logits = teacher_forced(scheme, reference)
        per_turn, kls, top1 = [], [], []
        first, first_turn, offset = None, None, 0
        for i, ((agent, _), ref, got, lp, lq) in enumerate(zip(turns, reference, tokens, ref_logits, logits)):
            agree, div = compare_tokens(got, ref)
            if div is not None and first is None:
                first, first_turn = offset + div, i
            offset += len(ref)
            kl = kl_divergence(lp, lq)
            t1 = np.argmax(lp, -1) == np.argmax(lq, -1)
            kls.append(kl)
            top1.append(t1)
            per_turn.append({"agent": agent, "tokens": got, "agreement": agree, "first_divergence": div,
                             "mean_kl": float(kl.mean()), "max_kl": float(kl.max()),
                             "tf_top1_agreement": float(t1.mean())})
        kl_all, t1_all = np.concatenate(kls), np.concatenate(top1)
        n_eq = sum(sum(a == b for a, b in zip(g, r)) for g, r in zip(tokens, reference))
        n_pos = sum(max(len(g), len(r)) for g, r in zip(tokens, reference))
        results.append(SchemeFidelity(
            scheme=scheme, token_agreement=n_eq / n_pos if n_pos else 1.0, first_divergence=first,
            first_divergence_turn=first_turn, mean_kl=float(kl_all.mean()), max_kl=float(kl_all.max()),
            tf_top1_agreement=float(t1_all.mean()), positions=int(kl_all.size), turns=per_turn))
    return FidelityReport(prompt_tokens=len(prompt), turns=turns, reference=reference, schemes=results,
                          skipped=skipped)


# ---- helpers ---------------------------------------------------------------------------------
def _jsonable(x):
    """numpy -> lists, NaN/inf -> None, tuple keys -> strings (strict JSON)."""
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.ndarray):
        return _jsonable(x.tolist())
    if isinstance(x, (np.floating, float)):
        x = float(x)
        return x if math.isfinite(x) else None
    if isinstance(x, np.integer):
        return int(x)
    if isinstance(x, np.bool_):
        return bool(x)
    return x
