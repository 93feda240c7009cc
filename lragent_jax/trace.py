"""The paper's efficiency trace (DESIGN.md section 3) as data, and a timed runner over a Session.

One iteration is 17 agent steps. Before each step `prefill` tokens are appended to the
trajectory (prompt, observation, tool output); then the step's agent takes its turn and
generates exactly `gen` tokens (greedy, no stop tokens):

    step  agent    prefill  gen
    1     plan     512      32
    2     plan     8        8
    3     action   8        8
    4     plan     Lctx     32      (also 7, 10, 13)
    5     plan     8        8       (also 8, 11, 14)
    6     action   8        8       (also 9, 12, 15)
    16    reflect  32       32
    17    reflect  8        8

The trajectory ends with 912 + 4 * Lctx tokens. `scale` shrinks the fixed 512/32/8 sizes
(for fast tests only; the default 1 is exactly the paper's trace).

    from lragent_jax.trace import run_trace
    result = run_trace(engine, "base_lr_shared", 1024, seed=0)
    result["throughput_tok_s"], result["ttft_s"], result["cache_bytes"]

Timing excludes compilation: with warmup=True (the default) the runner first replays the same
steps on a throwaway session of the same max_len, batch and options. Every jitted program the
timed run needs (each prefill chunk bucket x logits mode x cache view, each decode buffer, the
sampler) has then been compiled, because the timed run issues calls of identical shapes. The
runner checks this: `result["compiles_during_timing"]` counts traces of the engine's jitted
functions during the timed run (0 = clean).

The step table and token helpers import no JAX (scripts/bench_hf_peft.py uses them with torch).
"""

from __future__ import annotations

import dataclasses
import gc
import time

import numpy as np

PAPER_LCTX = (256, 512, 1024, 2048, 4096, 8192, 16384)
PAPER_FIXED_TOKENS = 912  # trajectory tokens of one iteration besides the 4 Lctx prefills
LCTX_STEPS = (4, 7, 10, 13)


@dataclasses.dataclass(frozen=True)
class TraceStep:
    step: int  # 1-based
    agent: str  # plan | action | reflect
    prefill: int  # tokens appended before the step
    gen: int  # tokens the agent generates


def _scaled(n: int, scale: float) -> int:
    return n if scale == 1 else max(1, int(round(n * scale)))


def trace_steps(lctx: int, *, scale: float = 1.0) -> list[TraceStep]:
    """The 17 steps of one iteration with context length `lctx` at steps 4, 7, 10, 13.

    scale: multiplies the fixed sizes (512, 32, 8; at least 1 token each) - for quick tests;
    Lctx is never scaled. The default 1 is the paper's trace.
    """
    if int(lctx) != lctx or lctx < 1:
        raise ValueError(f"lctx must be a positive integer, got {lctx!r}")
    if not scale > 0:
        raise ValueError(f"scale must be > 0, got {scale!r}")
    lctx = int(lctx)
    s = lambda n: _scaled(n, scale)  # noqa: E731
    steps = [TraceStep(1, "plan", s(512), s(32)), TraceStep(2, "plan", s(8), s(8)),
             TraceStep(3, "action", s(8), s(8))]
    for i in range(4):
        k = 4 + 3 * i
        steps += [TraceStep(k, "plan", lctx, s(32)), TraceStep(k + 1, "plan", s(8), s(8)),
                  TraceStep(k + 2, "action", s(8), s(8))]
    steps += [TraceStep(16, "reflect", s(32), s(32)), TraceStep(17, "reflect", s(8), s(8))]
    return steps


def trace_total_tokens(lctx: int, *, scale: float = 1.0) -> int:
    """Trajectory length at the end of the iteration (per row): 912 + 4 * lctx at scale 1."""
    return sum(st.prefill + st.gen for st in trace_steps(lctx, scale=scale))


def trace_agents(steps) -> tuple[str, ...]:
    return tuple(dict.fromkeys(st.agent for st in steps))


def expected_catch_up(scheme: str, steps, *, batch: int = 1) -> int:
    """Catch-up tokens (recomputed context some cache already held) the session must report.

    non_shared: each agent processes every token it has not processed yet, its own last
    generated token included (it is never fed back during decode); base_shared and droidspeak
    recompute (part of) the same tokens, so their counts equal non_shared's. full_shared and
    base_lr_shared recompute nothing.
    """
    from .schemes import canonical_scheme

    scheme = canonical_scheme(scheme)
    if scheme in ("full_shared", "base_lr_shared"):
        return 0
    held = {a: 0 for a in trace_agents(steps)}
    processed = 0  # tokens some cache holds
    T = 0
    total = 0
    for st in steps:
        T += st.prefill
        total += processed - held[st.agent]
        processed = held[st.agent] = T + st.gen - 1
        T += st.gen
    return total * batch


def special_token_ids(config) -> set[int]:
    ids = set(config.eos_token_ids or ())
    if config.bos_token_id is not None:
        ids.add(int(config.bos_token_id))
    return ids


def token_range(config) -> tuple[int, int]:
    """[low, high) of ordinary token ids: special ids near the top (Llama 3: >= 128000, the byte
    tokenizer: >= 256) cap `high`, special ids near the bottom (Mistral: 0..2) raise `low`."""
    low, high = 0, int(config.vocab_size)
    for t in sorted(special_token_ids(config)):
        if t >= config.vocab_size / 2:
            high = min(high, t)
        else:
            low = max(low, t + 1)
    if high - low < 2:
        low, high = 0, int(config.vocab_size)
    return low, high


def random_prefills(config, steps, *, batch: int = 1, seed: int = 0) -> list[list[list[int]]]:
    """Per step, per row, the random token ids appended before the step (no special ids)."""
    rng = np.random.default_rng(seed)
    low, high = token_range(config)
    return [[rng.integers(low, high, st.prefill).tolist() for _ in range(batch)] for st in steps]


def _device_memory():
    import jax

    try:
        stats = jax.devices()[0].memory_stats()
    except Exception:  # noqa: BLE001 - backends without memory stats
        stats = None
    return stats or None


def _compiles(engine) -> int:
    return int(sum(engine.trace_counts.values()))


def _replay(session, steps, prefills, *, progress=False, desc=""):
    """Run the steps on `session`; returns (per-step rows, end-to-end seconds, live-bytes max)."""
    from tqdm.auto import tqdm

    rows = []
    live_max = None
    bar = tqdm(total=len(steps), desc=desc, disable=not progress, leave=False, dynamic_ncols=True)
    t0 = time.perf_counter()
    for st, toks in zip(steps, prefills):
        session.append(toks)
        out = session.generate(st.agent, st.gen, greedy=True, stop_ids=())
        turn = session.turns[-1]
        got = {len(r) for r in out}
        if got != {st.gen}:
            raise RuntimeError(f"step {st.step}: asked for exactly {st.gen} tokens per row, got {sorted(got)}")
        mem = _device_memory()
        if mem and "bytes_in_use" in mem:
            live_max = max(live_max or 0, int(mem["bytes_in_use"]))
        rows.append({
            "step": st.step, "agent": st.agent, "prefill": st.prefill, "gen": st.gen,
            "catch_up_tokens": turn.catch_up_tokens, "new_tokens": turn.new_tokens,
            "prefill_s": turn.prefill_s, "ttft_s": turn.ttft_s, "decode_s": turn.decode_s,
        })
        bar.update(1)
    elapsed = time.perf_counter() - t0
    bar.close()
    return rows, elapsed, live_max


# Programs compile per (engine, shapes, static options); a second run with the same key needs no
# warm-up (e.g. --repeats). Keyed by id(engine), so a warm-up is only skipped for a live engine.
_WARM: set = set()


def run_trace(engine, scheme: str, lctx: int, *, batch: int = 1, seed: int = 0, attention: str = "auto",
              naive_expansion: bool = False, critical_layers=None, model_name: str | None = None,
              progress: bool = True, warmup: bool = True, scale: float = 1.0, label: str | None = None,
              max_len: int | None = None) -> dict:
    """Time one iteration of the trace for one scheme; returns a JSON-ready result dict.

    Args:
      engine: an Engine whose adapters include plan, action and reflect.
      scheme: a name from schemes.SCHEMES (or alias).
      lctx: context tokens appended before steps 4, 7, 10, 13.
      batch: independent trajectories (different random tokens) advanced together; every
        count and the throughput include all rows.
      seed: token ids (and the throwaway warm-up's ids, seed + 1).
      attention, naive_expansion, critical_layers, model_name: passed to Session.
      progress: tqdm bar over the steps.
      warmup: replay the same steps first on a throwaway session (same max_len), so the timed
        run compiles nothing; skipped when this engine already ran the same configuration.
      scale: shrink the fixed step sizes (tests only; 1 = the paper's trace).
      label: the row name in reports (default: scheme, "+naive" with naive_expansion).
      max_len: cache capacity (default: the trace's length). A sweep that gives every Lctx the
        same capacity compiles its programs once (shapes depend on capacity, not on Lctx).

    Result keys: scheme, label, lctx, batch, max_len, tokens_per_row, total_tokens, steps (per
    step: agent, prefill, gen, catch_up_tokens, new_tokens, prefill_s, ttft_s, decode_s),
    ttft_s (sum over steps of the time to each step's first token, catch-up included),
    decode_s, end_to_end_s (first append to last token, host time included), throughput_tok_s
    (total_tokens / end_to_end_s), catch_up_tokens, generated_tokens, cache_bytes (the
    scheme's preallocated cache arrays), peak_bytes (device allocator's peak since process
    start, or None where the backend has no memory stats), peak_bytes_before (the same before
    this run and its warm-up: peak_bytes > peak_bytes_before means the peak is this
    configuration's own),
    live_bytes_max (largest bytes_in_use seen after a step), warmup_s, compiles_during_timing,
    compile_excluded.
    """
    from .schemes import canonical_scheme
    from .session import Session

    scheme = canonical_scheme(scheme)
    steps = trace_steps(lctx, scale=scale)
    agents = trace_agents(steps)
    names = tuple(engine.lora.names) if engine.lora is not None else ()
    missing = [a for a in agents if a not in names]
    if missing:
        raise ValueError(f"the trace needs adapters named {list(agents)}; the engine has {list(names)} "
                         f"(missing {missing})")
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    per_row = trace_total_tokens(lctx, scale=scale)
    label = label or (scheme + ("+naive" if naive_expansion else ""))
    if max_len is not None and max_len < per_row:
        raise ValueError(f"max_len={max_len} is shorter than the trace ({per_row} tokens at Lctx={lctx})")
    capacity = int(max_len or per_row)
    kw = dict(batch=batch, max_len=capacity, attention=attention, naive_expansion=naive_expansion,
              critical_layers=critical_layers, model_name=model_name, stop_ids=())

    # Same programs <=> same capacity and options, whatever Lctx is.
    key = (id(engine), scheme, ("cap", capacity) if max_len else int(lctx), float(scale), batch, attention,
           naive_expansion,
           tuple(critical_layers) if critical_layers is not None else None, model_name)
    warmup_s = 0.0
    mem0 = _device_memory()  # before the warm-up, whose peak equals the timed run's (same shapes)
    if warmup and key not in _WARM:
        t0 = time.perf_counter()
        ws = Session(engine, scheme, seed=seed + 1, **kw)
        _replay(ws, steps, random_prefills(engine.config, steps, batch=batch, seed=seed + 1),
                progress=progress, desc=f"{label} Lctx={lctx} warm-up")
        del ws
        gc.collect()
        warmup_s = time.perf_counter() - t0
        _WARM.add(key)

    prefills = random_prefills(engine.config, steps, batch=batch, seed=seed)
    session = Session(engine, scheme, seed=seed, **kw)
    c0 = _compiles(engine)
    rows, e2e, live_max = _replay(session, steps, prefills, progress=progress, desc=f"{label} Lctx={lctx}")
    compiles = _compiles(engine) - c0
    if warmup:
        _WARM.add(key)
    mem1 = _device_memory()

    lengths = [len(t) for t in session.trajectory]
    if set(lengths) != {per_row}:
        raise RuntimeError(f"trajectory lengths {sorted(set(lengths))} != expected {per_row} tokens per row")
    total = per_row * batch
    cache_bytes = int(session.cache_bytes)
    alloc = session.scheme.capacity  # every cache array has one slot per token of capacity
    stats = session.stats()
    del session
    gc.collect()

    ttft = float(sum(r["ttft_s"] for r in rows))
    return {
        "scheme": scheme,
        "label": label,
        "naive_expansion": bool(naive_expansion),
        "lctx": int(lctx),
        "scale": float(scale),
        "batch": int(batch),
        "max_len": capacity,
        "tokens_per_row": per_row,
        "total_tokens": total,
        "steps": rows,
        "ttft_s": ttft,
        "prefill_s": float(sum(r["prefill_s"] for r in rows)),
        "decode_s": float(sum(r["decode_s"] for r in rows)),
        "end_to_end_s": float(e2e),
        "throughput_tok_s": total / e2e if e2e > 0 else float("nan"),
        "catch_up_tokens": int(stats["catch_up_tokens"]),
        "new_tokens": int(stats["new_tokens"]),
        "generated_tokens": int(stats["generated_tokens"]),
        "cache_bytes": cache_bytes,
        "cache_bytes_trajectory": cache_bytes * per_row // alloc,  # the arrays cut to the trajectory
        "peak_bytes": int(mem1["peak_bytes_in_use"]) if mem1 and "peak_bytes_in_use" in mem1 else None,
        "peak_bytes_before": int(mem0["peak_bytes_in_use"]) if mem0 and "peak_bytes_in_use" in mem0 else None,
        "live_bytes_max": live_max,
        "warmup_s": warmup_s,
        "compiles_during_timing": compiles,
        "compile_excluded": bool(warmup) and compiles == 0,
    }
