"""The paper's 17-step agent trace (docs/trace.md): the step table, a timed runner over a
Session, and the benchmark that times it under each cache scheme.

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

    from bench.trace import run_trace
    result = run_trace(engine, "base_lr_shared", 1024, seed=0)
    result["throughput_tok_s"], result["ttft_s"], result["cache_bytes"]

Timing excludes compilation: with warmup=True (the default) the runner first replays the same
steps on a throwaway session of the same max_len, batch and options, so every jitted program
the timed run needs has been compiled; `result["compiles_during_timing"]` counts traces of the
engine's jitted functions during the timed run (0 = clean).

The benchmark prints a table (throughput, TTFT, end-to-end time, cache and peak memory,
catch-up tokens) and writes results.json and trace.png to --out (default
results/trace/<timestamp>/):

  python -m bench.trace --shape tiny --quick                  # CPU smoke run, seconds
  python -m bench.trace --shape llama-3.1-8b                  # GPU: Lctx 1024,4096,8192
  python -m bench.trace --shape llama-3.1-8b --paper          # Lctx 256 ... 16384
  python -m bench.trace --model PATH --adapter plan=P --adapter action=A --adapter reflect=R

--shape builds RANDOM weights of a preset (no download) with random shared-A q/v LoRA adapters
(rank 8, alpha 16) named plan, action, reflect. Out-of-memory runs are recorded as OOM and the
sweep goes on. Exit code 2 on bad arguments, 1 if some run failed for another reason.

The step table, token helpers and reporting import no JAX (bench.hf_peft uses them with torch).
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import os
import statistics
import sys
import time

import numpy as np

from bench.common import (
    UsageError, check_model_and_adapters, failed_point, log, positive_int_list, results_dir, run_info, save_plot,
    write_json,
)

SHAPES = ("tiny", "llama-3.2-1b", "llama-3.1-8b", "ministral-8b", "llama-3.1-70b")
DTYPES = ("float32", "bfloat16", "float16")
PAPER_LCTX = (256, 512, 1024, 2048, 4096, 8192, 16384)
DEFAULT_LCTX = {"tiny": (64, 256)}
DEFAULT_LCTX_LARGE = (1024, 4096, 8192)
QUICK_LCTX = (16, 32)
QUICK_SCALE = 0.125
QUICK_BUCKETS = (64,)  # one prefill bucket: fewer programs to compile in a smoke run
NAIVE_SCHEMES = ("base_shared", "base_lr_shared")
# The paper's Table (docs/trace.md): Llama-3.1-8B, one A6000, at 33.7k tokens (Lctx 8192).
# (throughput tok/s, TTFT s) per scheme.
PAPER_AT_33K = {"non_shared": (683.2, 38.87), "full_shared": (1697.6, 9.13), "droidspeak": (931.0, 25.43),
                "base_shared": (969.6, 23.91), "base_lr_shared": (1678.1, 9.19)}
PAPER_TTFT_NS_OVER_BLR = 38.87 / 9.19  # 4.23x
PAPER_TPUT_BLR_OVER_NS = 1678.1 / 683.2  # 2.46x
PAPER_RATIO_LCTX = 8192


# ---- the trace: step table and timed runner -----------------------------------------------------
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
    from lragent_jax.schemes import canonical_scheme

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
    from lragent_jax.schemes import canonical_scheme
    from lragent_jax.session import Session

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


def paper_ratios(ours: str) -> tuple[float, float]:
    """(TTFT non_shared/ours, throughput ours/non_shared) in the paper; `ours` may carry an hf_ prefix."""
    key = ours[3:] if ours.startswith("hf_") else ours
    (t_ns, f_ns), (t, f) = PAPER_AT_33K["non_shared"], PAPER_AT_33K[key]
    return f_ns / f, t / t_ns


# ---- reporting (bench.hf_peft imports these; keep them free of jax) ---------------------------
parse_int_list = positive_int_list  # '4,8' -> [4, 8]; a UsageError naming the flag otherwise


def parse_adapters(specs):
    from lragent_jax.cli import parse_adapter_specs

    adapters = parse_adapter_specs(specs)
    missing = [a for a in ("plan", "action", "reflect") if a not in adapters]
    if missing:
        raise UsageError(f"the trace needs adapters plan, action and reflect; missing --adapter for {missing}")
    return adapters


def mib(x):
    return None if x is None else x / 2**20


def _fmt(v, spec):
    return "-" if v is None else format(v, spec)


def print_table(rows, *, peak_note=""):
    head = (f"{'scheme':<22} {'Lctx':>6} {'batch':>5} {'total':>7} {'tput tok/s':>11} {'TTFT s':>8} {'e2e s':>8} "
            f"{'cache MiB':>10} {'peak MiB':>10} {'catch-up':>9}")
    log(head)
    log("-" * len(head))
    for r in rows:
        if r.get("status") != "ok":
            log(f"{r['label']:<22} {r['lctx']:>6} {r.get('batch', 1):>5} {r['tokens_per_row']:>7} {r['status']:>11}"
                + (f"  ({r.get('error', '')[:60]})" if r.get("status") == "ERROR" else ""))
            continue
        peak = _fmt(mib(r.get("peak_bytes")), ".0f")
        if r.get("peak_bytes") is not None and r.get("peak_is_own") is False:
            peak = "<=" + peak
        log(f"{r['label']:<22} {r['lctx']:>6} {r.get('batch', 1):>5} {r['tokens_per_row']:>7} {r['throughput_tok_s']:>11.1f} "
            f"{r['ttft_s']:>8.3f} {r['end_to_end_s']:>8.3f} {mib(r.get('cache_bytes_trajectory', r['cache_bytes'])):>10.2f} {peak:>10} "
            f"{r['catch_up_tokens']:>9}")
    if peak_note:
        log(peak_note)


def ratios(rows, ref="non_shared", ours="base_lr_shared"):
    """Per (Lctx, batch) where both ran: TTFT ref/ours and throughput ours/ref."""
    by = {(r["label"], r["lctx"], r.get("batch", 1)): r for r in rows if r.get("status") == "ok"}
    out = []
    for lctx, batch in sorted({(r["lctx"], r.get("batch", 1)) for r in rows}):
        a, b = by.get((ref, lctx, batch)), by.get((ours, lctx, batch))
        if a and b and b["ttft_s"] > 0 and a["throughput_tok_s"] > 0:
            out.append({"lctx": lctx, "batch": batch, "tokens_per_row": a["tokens_per_row"],
                        "ttft_ratio": a["ttft_s"] / b["ttft_s"],
                        "throughput_ratio": b["throughput_tok_s"] / a["throughput_tok_s"]})
    return out


def print_ratios(rs, ref="non_shared", ours="base_lr_shared"):
    if not rs:
        log(f"(ratios need both {ref} and {ours} to finish at some Lctx)")
        return
    p_ttft, p_tput = paper_ratios(ours)
    log(f"\nratios (paper, Llama-3.1-8B on an A6000 at Lctx {PAPER_RATIO_LCTX} = 33.7k tokens, "
        f"{ours.removeprefix('hf_')} vs non_shared: TTFT {p_ttft:.2f}x, throughput {p_tput:.2f}x)")
    for r in rs:
        log(f"  Lctx {r['lctx']:>6} batch {r.get('batch', 1)} ({r['tokens_per_row']} tokens): TTFT {ref}/{ours} = {r['ttft_ratio']:.2f}x "
            f"(paper {p_ttft:.2f}x), throughput {ours}/{ref} = {r['throughput_ratio']:.2f}x "
            f"(paper {p_tput:.2f}x)")


def plot(rows, path, title):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("matplotlib is not installed: no plot")
        return None
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    labels = list(dict.fromkeys(r["label"] for r in rows))
    for label in labels:
        pts = sorted((r["tokens_per_row"], r) for r in rows if r["label"] == label and r.get("status") == "ok")
        style = "--" if "naive" in label or label.startswith("hf_") else "-"
        if pts:
            xs = [p[0] for p in pts]
            axes[0].plot(xs, [p[1]["throughput_tok_s"] for p in pts], style, marker="o", label=label)
            axes[1].plot(xs, [p[1]["ttft_s"] for p in pts], style, marker="o", label=label)
        oom = [r["tokens_per_row"] for r in rows if r["label"] == label and r.get("status") == "OOM"]
        for x in oom:
            axes[0].axvline(x, color="red", alpha=0.15)
    lengths = sorted({r["tokens_per_row"] for r in rows})
    for ax, name in zip(axes, ("throughput (trajectory tokens / s)", "TTFT, sum over 17 steps (s)")):
        ax.set_xlabel("trajectory length (tokens per row)")
        ax.set_ylabel(name)
        if lengths and lengths[-1] > 2 * lengths[0]:
            ax.set_xscale("log", base=2)
        ax.set_xticks(lengths, [f"{n / 1000:.1f}k" if n >= 1000 else str(n) for n in lengths])
    axes[1].set_yscale("log")
    return save_plot(fig, axes, path, title)


def plot_batches(rows, path, title):
    """Throughput (all rows' tokens / s) and TTFT against batch, one line per (scheme, Lctx)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    batches = sorted({r["batch"] for r in rows})
    for label, lctx in dict.fromkeys((r["label"], r["lctx"]) for r in rows):
        pts = sorted((r["batch"], r) for r in rows
                     if r["label"] == label and r["lctx"] == lctx and r.get("status") == "ok")
        if pts:
            xs = [p[0] for p in pts]
            axes[0].plot(xs, [p[1]["throughput_tok_s"] for p in pts], marker="o", label=f"{label} Lctx {lctx}")
            axes[1].plot(xs, [p[1]["ttft_s"] for p in pts], marker="o", label=f"{label} Lctx {lctx}")
    for ax, name in zip(axes, ("throughput (tokens of all rows / s)", "TTFT, sum over 17 steps (s)")):
        ax.set_xlabel("independent trajectories per step (batch)")
        ax.set_ylabel(name)
        ax.set_xscale("log", base=2)
        ax.set_xticks(batches, [str(b) for b in batches])
    return save_plot(fig, axes, path, title)


# ---- this benchmark ---------------------------------------------------------------------------
def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    src = p.add_mutually_exclusive_group()
    src.add_argument("--model", help="HF folder or hub id (config.json + safetensors)")
    src.add_argument("--shape", choices=SHAPES, help="random weights of a preset shape (default: tiny)")
    p.add_argument("--adapter", action="append", default=[], metavar="NAME=PATH",
                   help="PEFT adapter for agent NAME (repeatable; with --model; plan, action, reflect needed)")
    p.add_argument("--schemes", default="all", help="comma list of schemes or 'all' (default)")
    p.add_argument("--lctx", default=None,
                   help="comma list of context lengths (default: 64,256 for tiny, 1024,4096,8192 otherwise)")
    p.add_argument("--paper", action="store_true", help="Lctx = the paper's 256,512,...,16384")
    p.add_argument("--naive-expansion", action="store_true",
                   help="add base_shared+naive and base_lr_shared+naive rows (V expanded before attention)")
    p.add_argument("--attention", default="auto", choices=("auto", "xla", "pallas", "triton", "mosaic_gpu"),
                   help="attention kernel: auto / pallas = the platform's Pallas kernel; triton or mosaic_gpu "
                        "(Hopper prefill) by name on a GPU")
    p.add_argument("--batch", default="1",
                   help="independent trajectories per jitted step; a comma list (1,4,16) sweeps it "
                        "and adds a throughput-against-batch plot")
    p.add_argument("--dtype", default=None, choices=DTYPES,
                   help="weights and caches (default bfloat16; float32 for tiny)")
    p.add_argument("--repeats", type=int, default=1, help="timed runs per point; the median end-to-end run is "
                                                          "reported")
    p.add_argument("--critical-layers", default=None, help="droidspeak layers (default: paper's set per shape)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-len", type=int, default=None,
                   help="one cache capacity for every point (>= the longest trace): programs then compile "
                        "once for the whole sweep; cache MiB is also reported cut to each trajectory")
    p.add_argument("--scale", type=float, default=1.0,
                   help="shrink the fixed 512/32/8-token steps (smoke tests; 1 = the paper's trace)")
    p.add_argument("--quick", action="store_true",
                   help=f"smoke run: Lctx {','.join(map(str, QUICK_LCTX))}, --scale {QUICK_SCALE} (not the paper's "
                        "trace)")
    p.add_argument("--prefill-buckets", default=None,
                   help="engine prefill chunk buckets, comma list (default: the engine's 16,64,256,1024)")
    p.add_argument("--no-warmup", action="store_true", help="time the first run (compile included)")
    p.add_argument("--no-progress", action="store_true", help="no tqdm bars")
    p.add_argument("--compile-cache", default=None, metavar="DIR",
                   help="persistent JAX compilation cache (reused by later invocations)")
    p.add_argument("--out", default=None, help="output folder (default results/trace/<timestamp>/, git-ignored)")

    from lragent_jax.cli import add_mesh_flag, strict_parser

    add_mesh_flag(p)

    args = strict_parser(p).parse_args(argv)
    check_model_and_adapters(args.model, args.adapter, hint="--shape makes its own random adapters")
    args.batches = list(dict.fromkeys(positive_int_list(args.batch, "--batch")))
    if args.repeats < 1:
        raise UsageError(f"--repeats must be >= 1, got {args.repeats}")
    if not args.scale > 0:
        raise UsageError(f"--scale must be > 0, got {args.scale}")
    if args.paper and (args.lctx or args.quick):
        raise UsageError("--paper sets Lctx; do not combine it with --lctx or --quick")
    if args.model is None and args.shape is None:
        args.shape = "tiny"
    from lragent_jax.cli import parse_mesh

    if args.mesh is not None:  # before JAX starts NCCL: NVLink multicast is broken on the 2-H200 host
        os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    args.mesh_obj = parse_mesh(args.mesh, batch=min(args.batches))
    return args


def resolve(args):
    from lragent_jax.schemes import SCHEMES, canonical_scheme

    if args.schemes.strip().lower() == "all":
        schemes = list(SCHEMES)
    else:
        try:
            schemes = list(dict.fromkeys(canonical_scheme(s) for s in args.schemes.split(",") if s.strip()))
        except ValueError as e:
            raise UsageError(f"--schemes: {e}") from None
        if not schemes:
            raise UsageError("--schemes is empty")
    if args.paper:
        lctx = list(PAPER_LCTX)
    elif args.lctx:
        lctx = parse_int_list(args.lctx, "--lctx")
    elif args.quick:
        lctx = list(QUICK_LCTX)
    else:
        lctx = list(DEFAULT_LCTX.get(args.shape, DEFAULT_LCTX_LARGE))
    scale = QUICK_SCALE if args.quick and args.scale == 1.0 else args.scale
    if args.prefill_buckets:
        args.buckets = tuple(parse_int_list(args.prefill_buckets, "--prefill-buckets"))
    else:
        args.buckets = QUICK_BUCKETS if args.quick else None
    runs = []
    for s in schemes:
        runs.append((s, False))
        if args.naive_expansion and s in NAIVE_SCHEMES:
            runs.append((s, True))
    critical = parse_int_list(args.critical_layers, "--critical-layers") if args.critical_layers else None
    return runs, sorted(lctx), scale, critical


def model_name_of(args):
    if args.shape:
        return args.shape
    low = os.path.basename(os.path.normpath(args.model)).lower()
    for name, keys in (("llama-3.1-8b", ("llama-3.1-8b",)), ("ministral-8b", ("ministral-8b",))):
        if any(k in low for k in keys):
            return name
    return args.model


def build_engine(args):
    import jax.numpy as jnp
    from flax import nnx

    from lragent_jax.engine import Engine

    kw = {"prefill_buckets": args.buckets} if args.buckets else {}
    mesh = args.mesh_obj
    kw["mesh"] = mesh
    if args.shape:
        from lragent_jax.config import preset
        from lragent_jax.lora import random_adapters
        from lragent_jax.model import Llama

        dtype = jnp.dtype(args.dtype or ("float32" if args.shape == "tiny" else "bfloat16"))
        cfg = preset(args.shape)
        def make():
            return Llama(cfg, dtype=dtype, rngs=nnx.Rngs(args.seed))

        if mesh is None:
            model = make()
        else:  # weights born sharded: a 70B model never exists whole on one device
            from lragent_jax.sharding import init_sharded

            model = init_sharded(cfg, mesh, dtype=dtype, seed=args.seed)
        lora = random_adapters(cfg, ("plan", "action", "reflect"), rank=8, alpha=16, targets=("q", "v"),
                               shared_a=True, seed=args.seed, dtype=dtype)
        return Engine(model, lora, **kw), dtype
    from lragent_jax import loading

    adapters = parse_adapters(args.adapter)
    dtype = jnp.dtype(args.dtype or "bfloat16")
    model = loading.load_model(args.model, dtype=dtype, mesh=mesh)
    lora = loading.load_adapters(adapters, model, dtype=dtype)
    return Engine(model, lora, **kw), dtype


def run_point(engine, scheme, naive, lctx, batch, args, scale, critical, model_name):
    reps = []
    for _ in range(args.repeats):
        reps.append(run_trace(engine, scheme, lctx, batch=batch, seed=args.seed, attention=args.attention,
                              naive_expansion=naive, critical_layers=critical, model_name=model_name,
                              progress=not args.no_progress, warmup=not args.no_warmup, scale=scale,
                              max_len=args.max_len))
        gc.collect()
    e2e = [r["end_to_end_s"] for r in reps]
    med = sorted(reps, key=lambda r: r["end_to_end_s"])[(len(reps) - 1) // 2]
    res = dict(med)
    res["repeats_end_to_end_s"] = e2e
    res["repeats_ttft_s"] = [r["ttft_s"] for r in reps]
    res["repeats_throughput_tok_s"] = [r["throughput_tok_s"] for r in reps]
    res["end_to_end_s_stdev"] = statistics.stdev(e2e) if len(e2e) > 1 else 0.0
    res["warmup_s"] = reps[0]["warmup_s"]
    res["compiles_during_timing"] = sum(r["compiles_during_timing"] for r in reps)
    res["compile_excluded"] = all(r["compile_excluded"] for r in reps)
    if res["peak_bytes"] is not None and reps[0]["peak_bytes_before"] is not None:
        res["peak_is_own"] = res["peak_bytes"] > reps[0]["peak_bytes_before"]
    return res


# Run order inside one Lctx: smaller caches first, so the allocator's monotone peak usually rises
# with every run and reads as that run's own peak (the table marks the others "<=").
_MEMORY_ORDER = ("base_lr_shared", "full_shared", "base_shared", "droidspeak", "non_shared")


def main(argv=None):
    t_start = time.perf_counter()
    try:
        args = parse_args(sys.argv[1:] if argv is None else argv)
        runs, lctxs, scale, critical = resolve(args)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    import jax

    if args.compile_cache:
        jax.config.update("jax_compilation_cache_dir", args.compile_cache)
    out = results_dir("trace", args.out)
    info = run_info()
    card = info["card"]
    log(f"device: {card} ({jax.default_backend()}), jax {jax.__version__}; building "
        f"{args.shape or args.model} ...")
    t0 = time.perf_counter()
    try:
        engine, dtype = build_engine(args)
    except (ValueError, KeyError, FileNotFoundError) as e:
        print(f"error: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
    model_name = model_name_of(args)
    log(f"model ready in {time.perf_counter() - t0:.1f} s ({dtype}); schemes "
        f"{[s + ('+naive' if n else '') for s, n in runs]}; Lctx {lctxs}; scale {scale}; batch {args.batches}; "
        f"compile {'excluded (warm-up replay)' if not args.no_warmup else 'INCLUDED (--no-warmup)'}")
    if scale != 1.0:
        log(f"NOTE: --scale {scale}: fixed step sizes shrunk; this is not the paper's trace")

    order = sorted(runs, key=lambda r: (_MEMORY_ORDER.index(r[0]), r[1]))
    results = []
    failed = False
    for batch, lctx, (scheme, naive) in [(b, lc, r) for b in args.batches for lc in lctxs for r in order]:
        label = scheme + ("+naive" if naive else "")
        total = trace_total_tokens(lctx, scale=scale)
        log(f"[{time.perf_counter() - t_start:7.1f}s] {label} Lctx={lctx} batch={batch} ({total} tokens/row) ...")
        base = {"scheme": scheme, "label": label, "naive_expansion": naive, "lctx": lctx, "batch": batch,
                "scale": scale, "tokens_per_row": total, "total_tokens": total * batch}
        try:
            res = {**base, **run_point(engine, scheme, naive, lctx, batch, args, scale, critical, model_name)}
            res["status"] = "ok"
            log(f"    {res['throughput_tok_s']:.1f} tok/s, TTFT {res['ttft_s']:.3f} s, e2e "
                f"{res['end_to_end_s']:.3f} s, warm-up {res['warmup_s']:.1f} s, compiles during timing "
                f"{res['compiles_during_timing']}")
        except Exception as e:  # noqa: BLE001 - one failed point must not end the sweep
            res = failed_point(e, base)
            failed |= res["status"] == "ERROR"
        results.append(res)
        gc.collect()

    pos = {(s + ("+naive" if n else "")): i for i, (s, n) in enumerate(runs)}
    results.sort(key=lambda r: (r["batch"], pos[r["label"]], r["lctx"]))
    log("")
    note = ("peak MiB: device allocator's peak since process start; '<=' = not above earlier runs' peak"
            if any(r.get("peak_bytes") is not None for r in results) else
            "peak MiB: '-' = this backend reports no device memory stats")
    log(f"compile time excluded: {not args.no_warmup}; throughput = trajectory tokens of all rows / "
        f"end-to-end time")
    print_table(results, peak_note=note)
    rs = ratios(results)
    print_ratios(rs)

    payload = {
        "benchmark": "lragent_jax trace (docs/trace.md)",
        **info,
        "args": vars(args),
        "model": args.shape or args.model,
        "random_weights": args.shape is not None,
        "dtype": str(dtype),
        "scale": scale,
        "lctx": lctxs,
        "compile_excluded": not args.no_warmup,
        "paper": {"ttft_ns_over_blr": PAPER_TTFT_NS_OVER_BLR, "throughput_blr_over_ns": PAPER_TPUT_BLR_OVER_NS,
                  "at_lctx": PAPER_RATIO_LCTX, "throughput_tok_s_and_ttft_s": PAPER_AT_33K},
        "ratios": rs,
        "results": results,
        "wall_s": time.perf_counter() - t_start,
    }
    jpath = os.path.join(out, "results.json")
    write_json(jpath, payload)
    what = f"{args.shape or args.model} ({dtype}) on {card}, jax {jax.__version__}"
    ppath = plot([r for r in results if r["batch"] == args.batches[0]], os.path.join(out, "trace.png"),
                 f"trace: {what}, batch {args.batches[0]}")
    if len(args.batches) > 1:
        bpath = plot_batches(results, os.path.join(out, "trace_batch.png"), f"trace against batch: {what}")
        ppath = f"{ppath} and {bpath}" if ppath and bpath else ppath
    log(f"\nwrote {jpath}" + (f" and {ppath}" if ppath else "") + f" in {time.perf_counter() - t_start:.1f} s")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
