#!/usr/bin/env python3
"""Time the paper's 17-step agent trace (docs/trace.md) under each cache scheme.

Prints a table (throughput, TTFT, end-to-end time, cache and peak memory, catch-up tokens),
writes results.json and trace.png to --out. Compile time is excluded: each (scheme, Lctx)
first replays the same steps on a throwaway session (see lragent_jax/trace.py).

  python scripts/bench_trace.py --shape tiny --quick                  # CPU smoke run, seconds
  python scripts/bench_trace.py --shape llama-3.1-8b                  # GPU: Lctx 1024,4096,8192
  python scripts/bench_trace.py --shape llama-3.1-8b --paper          # Lctx 256 ... 16384
  python scripts/bench_trace.py --model PATH --adapter plan=P --adapter action=A --adapter reflect=R

--shape builds RANDOM weights of a preset (no download) with random shared-A q/v LoRA adapters
(rank 8, alpha 16) named plan, action, reflect. Out-of-memory runs are recorded as OOM and the
sweep goes on. Exit code 2 on bad arguments, 1 if some run failed for another reason.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import statistics
import sys
import time
import traceback

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

SHAPES = ("tiny", "llama-3.2-1b", "llama-3.1-8b", "ministral-8b")
DTYPES = ("float32", "bfloat16", "float16")
PAPER_LCTX = (256, 512, 1024, 2048, 4096, 8192, 16384)
DEFAULT_LCTX = {"tiny": (64, 256)}
DEFAULT_LCTX_LARGE = (1024, 4096, 8192)
QUICK_LCTX = (16, 32)
QUICK_SCALE = 0.125
QUICK_BUCKETS = (64,)  # one prefill bucket: fewer programs to compile in a smoke run
NAIVE_SCHEMES = ("base_shared", "base_lr_shared")
# DESIGN.md section 3: Llama-3.1-8B, one A6000, at 33.7k tokens (Lctx 8192).
# (throughput tok/s, TTFT s) per scheme.
PAPER_AT_33K = {"non_shared": (683.2, 38.87), "full_shared": (1697.6, 9.13), "droidspeak": (931.0, 25.43),
                "base_shared": (969.6, 23.91), "base_lr_shared": (1678.1, 9.19)}
PAPER_TTFT_NS_OVER_BLR = 38.87 / 9.19  # 4.23x
PAPER_TPUT_BLR_OVER_NS = 1678.1 / 683.2  # 2.46x
PAPER_RATIO_LCTX = 8192


def paper_ratios(ours: str) -> tuple[float, float]:
    """(TTFT non_shared/ours, throughput ours/non_shared) in the paper; `ours` may carry an hf_ prefix."""
    key = ours[3:] if ours.startswith("hf_") else ours
    (t_ns, f_ns), (t, f) = PAPER_AT_33K["non_shared"], PAPER_AT_33K[key]
    return f_ns / f, t / t_ns


from lragent_jax.cli import UsageError, positive_int_list  # noqa: E402  (no jax at import: bench_hf_peft reuses this file)


def log(*a):
    print(*a, flush=True)


# ---- shared reporting helpers (bench_hf_peft.py imports these; keep them free of jax) ---------
parse_int_list = positive_int_list  # '4,8' -> [4, 8]; a UsageError naming the flag otherwise


def parse_adapters(specs):
    from lragent_jax.cli import parse_adapter_specs

    adapters = parse_adapter_specs(specs)
    missing = [a for a in ("plan", "action", "reflect") if a not in adapters]
    if missing:
        raise UsageError(f"the trace needs adapters plan, action and reflect; missing --adapter for {missing}")
    return adapters


def is_oom(exc: BaseException) -> bool:
    text = f"{type(exc).__name__}: {exc}".lower()
    return any(s in text for s in ("resource_exhausted", "resource exhausted", "outofmemory", "out of memory"))


def failed_point(exc: BaseException, base: dict) -> dict:
    """The result row of a point that raised: OOM (the sweep goes on) or ERROR (logged with
    its traceback; the script's exit code becomes 1)."""
    if is_oom(exc):
        res = {**base, "status": "OOM", "error": str(exc).splitlines()[0][:300]}
        log(f"    OOM: {res['error'][:160]}")
    else:
        res = {**base, "status": "ERROR", "error": f"{type(exc).__name__}: {exc}"[:1000]}
        log(f"    ERROR: {res['error'][:300]}")
        traceback.print_exc()
        sys.stderr.flush()
    return res


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
    return _save(fig, axes, path, title)


def _save(fig, axes, path, title):
    import matplotlib.pyplot as plt

    for ax in axes:
        ax.minorticks_off()
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


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
    return _save(fig, axes, path, title)


def write_json(path, payload):
    with open(path, "w") as f:
        json.dump(payload, f, indent=1, default=str)


def default_out(prefix="trace"):
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    return os.path.join("bench", "results", f"{prefix}-{stamp}")


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
    p.add_argument("--attention", default="auto", choices=("auto", "xla", "pallas"))
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
    p.add_argument("--out", default=None, help="output folder (default bench/results/trace-<date>)")

    from lragent_jax.cli import check_model_and_adapters, strict_parser

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
    if args.shape:
        from lragent_jax.config import preset
        from lragent_jax.lora import random_adapters
        from lragent_jax.model import Llama

        dtype = jnp.dtype(args.dtype or ("float32" if args.shape == "tiny" else "bfloat16"))
        cfg = preset(args.shape)
        model = Llama(cfg, dtype=dtype, rngs=nnx.Rngs(args.seed))
        lora = random_adapters(cfg, ("plan", "action", "reflect"), rank=8, alpha=16, targets=("q", "v"),
                               shared_a=True, seed=args.seed, dtype=dtype)
        return Engine(model, lora, **kw), dtype
    from lragent_jax import loading

    adapters = parse_adapters(args.adapter)
    dtype = jnp.dtype(args.dtype or "bfloat16")
    model = loading.load_model(args.model, dtype=dtype)
    lora = loading.load_adapters(adapters, model, dtype=dtype)
    return Engine(model, lora, **kw), dtype


def run_point(engine, scheme, naive, lctx, batch, args, scale, critical, model_name):
    from lragent_jax.trace import run_trace

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
    from lragent_jax.trace import trace_total_tokens

    out = args.out or default_out("trace")
    os.makedirs(out, exist_ok=True)
    dev = jax.devices()[0]
    card = getattr(dev, "device_kind", str(dev))
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
        "benchmark": "lragent_jax trace (DESIGN.md section 3)",
        "card": card,
        "backend": jax.default_backend(),
        "jax_version": jax.__version__,
        "python": platform.python_version(),
        "host": platform.node(),
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
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
