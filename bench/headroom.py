#!/usr/bin/env python3
"""Memory headroom: the largest batch of trajectories per scheme, its throughput, and the device
memory it needs beyond the weights and the caches.

For each scheme, in a fresh process (so the allocator's peak is that run's own):
  1. predict the largest batch B from the free memory after the weights: B rows of caches
     (memory.cache_bytes) plus the largest call's work buffers (Engine.work_bytes) must fit;
  2. run a Session at B: append --tokens random tokens per row, then one agent generates --gen
     tokens (a warm-up session of the same shapes compiles first; the timed run compiles nothing);
  3. report throughput (rows x (tokens + gen) / turn time), the allocator's peak minus the
     resident weights minus the caches (headroom), and that as a share of weights + caches;
  4. ask for B + 1: Session must refuse it in one line (CacheMemoryError) before compiling.

  # GPU, Llama-3.1-8B shape (random weights), the paper trace's 33.7k tokens:
  XLA_PYTHON_CLIENT_MEM_FRACTION=0.95 python -m bench.headroom --shape llama-3.1-8b --tokens 33680
  # CPU smoke run (~1.5 min): no device limit there, so a budget stands in for the free memory
  python -m bench.headroom --shape tiny --tokens 256 --gen 4 --free-bytes 16MiB --prefill-buckets 16,64

Prints a table; writes headroom.json and headroom.png to --out (default results/headroom/<timestamp>/).
Without device memory stats (CPU) the peak and headroom columns are '-'; tests/test_headroom.py
checks the temporaries structurally there.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import time

from bench.common import UsageError, log, results_dir, save_plot, write_json

AGENTS = ("plan", "action", "reflect")
TARGET_HEADROOM = 0.10  # issue #15: peak - (weights + caches) <= 10% of weights + caches


def parse_bytes(text: str) -> int:
    units = {"": 1, "B": 1, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "KB": 10**3, "MB": 10**6, "GB": 10**9}
    t = text.strip().upper()
    num = t.rstrip("KMGIB")
    unit = t[len(num):]
    try:
        value = float(num)
    except ValueError:
        value = None
    if value is None or unit not in units or value <= 0:
        raise UsageError(f"--free-bytes: expected a size like 8MiB or 120GiB, got {text!r}")
    return int(value * units[unit])


def parse_args(argv):
    from lragent_jax.cli import strict_parser

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--shape", default="tiny", help="preset shape (random weights; default tiny)")
    p.add_argument("--schemes", default="all", help="comma list of schemes or 'all' (default)")
    p.add_argument("--tokens", type=int, default=None, help="tokens per row (default 33680 = the trace at "
                                                            "Lctx 8192; tiny 256)")
    p.add_argument("--gen", type=int, default=8, help="tokens the agent generates after the prefill")
    p.add_argument("--batch", type=int, default=None, help="run this batch instead of the predicted largest")
    p.add_argument("--free-bytes", default=None, help="budget standing in for the free memory after the weights "
                                                      "(e.g. 8MiB; default: measured on the device)")
    p.add_argument("--prefill-buckets", default=None, help="engine prefill buckets (default: the engine's)")
    p.add_argument("--compile-cache", default=None, metavar="DIR", help="persistent JAX compilation cache")
    p.add_argument("--out", default=None, help="output folder (default results/headroom/<timestamp>/)")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # one scheme, in a child process
    args = strict_parser(p).parse_args(argv)
    args.tokens = args.tokens or (256 if args.shape == "tiny" else 33680)
    for name in ("tokens", "gen"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.batch is not None and args.batch < 1:
        raise UsageError(f"--batch must be >= 1, got {args.batch}")
    args.free = parse_bytes(args.free_bytes) if args.free_bytes else None
    from lragent_jax.cli import positive_int_list
    from lragent_jax.config import PRESETS
    from lragent_jax.schemes import SCHEMES, canonical_scheme

    if args.shape not in PRESETS:
        raise UsageError(f"--shape: unknown {args.shape!r}; allowed: {sorted(PRESETS)}")
    args.buckets = tuple(positive_int_list(args.prefill_buckets, "--prefill-buckets")) if args.prefill_buckets \
        else None
    try:
        args.scheme_list = list(SCHEMES) if args.schemes.strip().lower() == "all" else \
            list(dict.fromkeys(canonical_scheme(s) for s in args.schemes.split(",") if s.strip()))
    except ValueError as e:
        raise UsageError(f"--schemes: {e}") from None
    return args


# ---- one scheme (child process) ------------------------------------------------------------------
def largest_batch(per_row: int, work_of, free: int) -> int:
    """The largest B with B x per_row + work_of(B) <= free (0 when not even one row fits)."""
    b = free // per_row
    while b > 0 and b * per_row + work_of(b) > free:
        b -= 1
    return int(b)


def _turn(engine, scheme, batch, max_len, context, gen, seed):
    """One Session: append `context` (one list per row), the first agent generates `gen` tokens.
    Returns (seconds, ttft seconds, cache bytes)."""
    import jax

    from lragent_jax.session import Session

    s = Session(engine, scheme, batch=batch, max_len=max_len, stop_ids=(), seed=seed)
    jax.block_until_ready(jax.tree_util.tree_leaves(s.scheme.state()))
    t0 = time.perf_counter()
    s.append(context)
    s.generate(AGENTS[0], gen, greedy=True)
    seconds = time.perf_counter() - t0
    turn, cache = s.turns[-1], s.cache_bytes
    del s
    gc.collect()
    return seconds, turn.ttft_s, cache


def worker(args) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from bench.common import is_oom, run_info
    from lragent_jax import memory
    from lragent_jax.config import preset
    from lragent_jax.engine import Engine
    from lragent_jax.lora import random_adapters
    from lragent_jax.model import Llama
    from lragent_jax.schemes import default_critical_layers
    from lragent_jax.session import Session

    if args.compile_cache:
        jax.config.update("jax_compilation_cache_dir", args.compile_cache)
    scheme = args.worker
    cfg = preset(args.shape)
    dtype = jnp.dtype("float32" if args.shape == "tiny" else "bfloat16")
    model = Llama(cfg, dtype=dtype, rngs=nnx.Rngs(0))
    lora = random_adapters(cfg, AGENTS, rank=8, alpha=16, targets=("q", "v"), shared_a=True, dtype=dtype)
    engine = Engine(model, lora, **({"prefill_buckets": args.buckets} if args.buckets else {}))
    del model  # the engine holds the weights
    gc.collect()
    dev = jax.devices()[0]
    stats = dev.memory_stats() or {}
    weights = sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves((engine.params, engine.lora)))
    resident = stats.get("bytes_in_use")  # weights + adapters + whatever else is live now
    measured_free, measured = memory.available_bytes(dev)
    free = args.free if args.free is not None else measured_free
    max_len = args.tokens + args.gen
    critical = default_critical_layers(cfg.num_layers, args.shape) if scheme == "droidspeak" else ()
    kw = dict(num_agents=len(AGENTS), max_len=max_len, dtype=dtype, value_rank=8, num_critical=len(critical))
    per_row = memory.cache_bytes(scheme, cfg, batch=1, **kw)
    row = dict(**run_info(), scheme=scheme, shape=args.shape, dtype=str(dtype), tokens=args.tokens, gen=args.gen,
               max_len=max_len, weight_bytes=weights, resident_bytes=resident, bytes_limit=stats.get("bytes_limit"),
               free_bytes=free, free_measured=measured if args.free is None else f"--free-bytes {args.free_bytes}",
               cache_bytes_per_row=per_row, max_call_tokens=engine.max_call_tokens,
               predicted_batch_caches_only=int(free // per_row),
               predicted_batch=largest_batch(per_row, engine.work_bytes, free))
    batch = args.batch or row["predicted_batch"]
    row.update(batch=batch, work_bytes_predicted=engine.work_bytes(batch) if batch else None,
               prefill_chunk=engine.call_buckets(batch)[-1] if batch else None)
    log(f"[{scheme}] {dev.device_kind}: weights {memory.fmt_bytes(weights)}, free {memory.fmt_bytes(free)}; "
        f"caches {memory.fmt_bytes(per_row)} a row -> largest batch {row['predicted_batch']} "
        f"({row['predicted_batch_caches_only']} from the caches alone); running batch {batch}")
    if batch < 1:
        row["status"] = "nothing fits"
        return row
    rng = np.random.default_rng(0)
    context = [rng.integers(0, min(cfg.vocab_size, 32000), args.tokens).tolist() for _ in range(batch)]
    try:
        row["warmup_s"], _, _ = _turn(engine, scheme, batch, max_len, context, args.gen, seed=1)
        seconds, ttft, caches = _turn(engine, scheme, batch, max_len, context, args.gen, seed=0)
        row.update(status="ran", seconds=seconds, ttft_s=ttft, cache_bytes=caches,
                   throughput_tok_s=batch * (args.tokens + args.gen) / seconds,
                   decode_ms_per_token=1e3 * (seconds - ttft) / max(1, args.gen - 1))
    except Exception as e:  # noqa: BLE001 - an OOM is this benchmark's finding, not a crash
        if not is_oom(e):
            raise
        row.update(status="OOM", error=str(e).splitlines()[0][:300])
    stats = dev.memory_stats() or {}
    if "cache_bytes" in row:  # the work buffers predicted, as a share of what is resident
        row["work_share_predicted"] = row["work_bytes_predicted"] / ((resident or weights) + row["cache_bytes"])
    if "peak_bytes_in_use" in stats and resident is not None and "cache_bytes" in row:
        row["peak_bytes"] = int(stats["peak_bytes_in_use"])
        row["headroom_bytes"] = row["peak_bytes"] - resident - row["cache_bytes"]
        row["headroom_share"] = row["headroom_bytes"] / (resident + row["cache_bytes"])
    # One more row must be refused at once, in one line, before anything is allocated or compiled.
    t0 = time.perf_counter()
    compiles = sum(engine.trace_counts.values())
    try:
        if args.free is None:
            Session(engine, scheme, batch=batch + 1, max_len=max_len, stop_ids=())
        else:  # a budget, not the device: the same check Session runs, against the budget
            tokens = (batch + 1) * engine.call_buckets(batch + 1)[-1]
            memory.check_cache_fits(scheme, cfg, batch=batch + 1, work_bytes=engine.work_bytes(batch + 1),
                                    work=f"work buffers (a prefill call of {tokens} tokens)", free=free, **kw)
        row["next_batch"] = "fits (not refused)"
    except memory.CacheMemoryError as e:
        row["next_batch"] = str(e)
    row["next_batch_refused_s"] = time.perf_counter() - t0
    row["next_batch_compiles"] = sum(engine.trace_counts.values()) - compiles
    return row


# ---- report (parent process: never touches the device, so each child gets all of it) ----------
def print_table(rows):
    def num(v, fmt, width):
        return f"{v:{width}{fmt}}" if isinstance(v, (int, float)) else f"{'-':>{width}}"

    gib = lambda n: num(n / 2**30 if isinstance(n, (int, float)) else None, ".2f", 8)  # noqa: E731
    pct = lambda x: num(100 * x if isinstance(x, (int, float)) else None, ".1f", 6)  # noqa: E731
    log(f"{'scheme':<15} {'B pred':>6} {'B run':>5} {'status':>7} {'tok/s':>10} {'TTFT s':>7} {'caches GiB':>10} "
        f"{'work GiB':>8} {'work %':>6} {'peak GiB':>8} {'head GiB':>8} {'head %':>6}  B+1")
    for r in rows:
        refused = r.get("next_batch", "fits")
        refused = "-" if "next_batch" not in r else refused if "fits" in refused else \
            f"refused in {r['next_batch_refused_s']:.2f} s, {r['next_batch_compiles']} compiles"
        log(f"{r['scheme']:<15} {num(r.get('predicted_batch'), 'd', 6)} {num(r.get('batch'), 'd', 5)} "
            f"{r['status']:>7} {num(r.get('throughput_tok_s'), '.1f', 10)} {num(r.get('ttft_s'), '.2f', 7)} "
            f"{gib(r.get('cache_bytes')):>10} {gib(r.get('work_bytes_predicted'))} {pct(r.get('work_share_predicted'))} "
            f"{gib(r.get('peak_bytes'))} {gib(r.get('headroom_bytes'))} {pct(r.get('headroom_share'))}  {refused}")
    log("work: the largest call's temporaries as predicted (Engine.work_bytes); head: the allocator's peak minus "
        "the resident weights minus the caches; % of weights + caches")
    for r in rows:
        if "next_batch" in r and "fits" not in r["next_batch"]:
            log(f"  {r['scheme']} B+1: {r['next_batch']}")


def plot(rows, path, title):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    x = np.arange(len(rows))
    names = [r["scheme"] for r in rows]
    w = 0.27
    axes[0].bar(x - w, [r.get("predicted_batch_caches_only", 0) for r in rows], w, label="caches alone")
    axes[0].bar(x, [r.get("predicted_batch", 0) for r in rows], w, label="caches + work buffers (predicted)")
    axes[0].bar(x + w, [r.get("batch", 0) if r.get("status") == "ran" else 0 for r in rows], w, label="ran")
    axes[0].set_xticks(x, names, rotation=20, fontsize=8)
    axes[0].set_ylabel("trajectories (batch)")
    axes[0].set_title("largest batch that fits", fontsize=9)
    axes[0].set_ylim(0, 1.35 * max([1] + [r.get("predicted_batch_caches_only", 0) for r in rows]))
    share = lambda r, k: 100 * r[k] if r.get(k) is not None else 0  # noqa: E731
    axes[1].bar(x - 0.2, [share(r, "work_share_predicted") for r in rows], 0.4, label="work buffers (predicted)")
    axes[1].bar(x + 0.2, [share(r, "headroom_share") for r in rows], 0.4, label="peak - (weights + caches)")
    axes[1].axhline(100 * TARGET_HEADROOM, color="r", ls="--", label="target 10%")
    axes[1].set_xticks(x, names, rotation=20, fontsize=8)
    axes[1].set_ylabel("% of weights + caches")
    axes[1].legend(fontsize=8)  # save_plot labels the first panel only
    axes[1].set_title("headroom at that batch" + ("" if any(r.get("headroom_share") is not None for r in rows)
                                                  else " (no device memory stats)"), fontsize=9)
    return save_plot(fig, axes, path, title)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    try:
        args = parse_args(argv)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.worker:
        print("ROW " + json.dumps(worker(args), default=str), flush=True)
        return 0
    out = results_dir("headroom", args.out)
    t0 = time.perf_counter()
    rows, failed = [], False
    for scheme in args.scheme_list:
        proc = subprocess.run([sys.executable, "-m", "bench.headroom", *argv, "--worker", scheme],
                              stdout=subprocess.PIPE, text=True)
        found = [line[4:] for line in proc.stdout.splitlines() if line.startswith("ROW ")]
        for line in proc.stdout.splitlines():
            if not line.startswith("ROW "):
                log(line)
        if proc.returncode or not found:
            rows.append(dict(scheme=scheme, status="ERROR", error=f"worker exit code {proc.returncode}"))
            failed = True
            continue
        rows.append(json.loads(found[-1]))
    log("")
    print_table(rows)
    info = next((r for r in rows if "card" in r), {})
    payload = dict(benchmark="lragent_jax memory headroom (bench/headroom.py)",
                   card=info.get("card"), jax_version=info.get("jax_version"), date=info.get("date"),
                   command=" ".join(["python -m bench.headroom", *argv]), target_headroom_share=TARGET_HEADROOM,
                   rows=rows, wall_s=time.perf_counter() - t0)
    jpath = write_json(os.path.join(out, "headroom.json"), payload)
    ppath = plot(rows, os.path.join(out, "headroom.png"),
                 f"headroom: {args.shape}, {args.tokens} tokens/row on {info.get('card', '?')}, "
                 f"jax {info.get('jax_version', '?')}")
    log(f"\nwrote {jpath} and {ppath}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
