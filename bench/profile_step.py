#!/usr/bin/env python3
"""Where a decode step's time goes: every GPU kernel of a few decode steps, by name.

Two halves, because the profiler runs on the GPU machine and the summary anywhere:

  # on the GPU: the timed region is only the decode loop (compile and prefill excluded)
  ncu --profile-from-start off --clock-control none --csv --print-units base \\
      --metrics gpu__time_duration.sum,dram__bytes_read.sum --log-file step.csv \\
      python -m bench.profile_step run --shape llama-3.1-8b --context 4096
  # anywhere: per-kernel time per step, its share, and its read bandwidth
  python -m bench.profile_step summarize step.csv --steps 4
  # no profiler: only the step's weight products, timed (the rest of a step is the difference)
  python -m bench.profile_step products --shape llama-3.1-8b

`run` opens the profiler range (cuProfilerStart) around one decode call of
--new-tokens steps on a warm, compiled engine; without ncu it just times that call.
The summary shows how much of a step is weight-streaming products, attention,
and the small element-wise kernels around them (launch-bound on a GPU).
"""

from __future__ import annotations

import argparse
import contextlib
import collections
import csv
import ctypes
import json
import os
import sys

from lragent_jax.config import PRESETS  # no jax: summarize runs without it


def run(args):
    import jax
    import numpy as np
    from flax import nnx
    import jax.numpy as jnp

    from lragent_jax.cache import AttnOptions, LoRAKV
    from lragent_jax.config import preset
    from lragent_jax.engine import Engine
    from lragent_jax.lora import random_adapters
    from lragent_jax.model import Llama
    from bench.step import decode_step_time, random_prompt

    cfg = preset(args.shape)
    dtype = jnp.dtype("float32" if args.shape == "tiny" else "bfloat16")
    model = Llama(cfg, dtype=dtype, rngs=nnx.Rngs(0))
    lora = random_adapters(cfg, rank=8, dtype=dtype)
    engine = Engine(model, lora)
    B, ctx, n = args.batch, args.context, args.new_tokens

    def new_cache():
        return LoRAKV.create(cfg, B, ctx + n + 1, 8, dtype, opts=AttnOptions(impl=args.attention))

    @contextlib.contextmanager
    def profiler_range():  # what ncu --profile-from-start off profiles; nothing off a GPU
        cuda = None
        if jax.default_backend() == "gpu":
            try:
                cuda = ctypes.CDLL("libcuda.so.1")
            except OSError:
                pass
        if cuda is not None:
            cuda.cuProfilerStart()
        try:
            yield
        finally:
            if cuda is not None:
                cuda.cuProfilerStop()

    step_s = decode_step_time(engine, new_cache, random_prompt(cfg, B, ctx), np.zeros((B,), np.int32), n,
                              around=profiler_range)
    print(f"decode of {n} tokens = {n - 1} steps (batch {B}, context {ctx}): {1e3 * step_s * (n - 1):.2f} ms "
          f"({1e3 * step_s:.2f} ms per step; under a profiler this is not the speed)")


def products(args):
    """Time only a step's weight products: every layer's q, k, v, o, gate, up, down and the
    LM head on one token row (padded as the model pads), unrolled like the GPU engine."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from lragent_jax.config import preset
    from lragent_jax.model import Llama, _matmul
    from bench.common import median_time

    cfg = preset(args.shape)
    dtype = jnp.dtype("float32" if args.shape == "tiny" else "bfloat16")
    model = Llama(cfg, dtype=dtype, rngs=nnx.Rngs(0))
    layers = [layer.weights() for layer in model.layers]  # the arrays a per_layer Engine runs
    head = model.lm_head[...] if model.lm_head is not None else model.embed[...].T
    rows = model.min_matmul_rows

    @jax.jit
    def all_products(x, layers, head):
        for w in layers:
            q = _matmul(x, w["wq"], rows)
            kv = jnp.concatenate([_matmul(x, w["wk"], rows), _matmul(x, w["wv"], rows)], -1)
            x = x + _matmul(q + 0 * kv.sum(), w["wo"], rows)   # keep k, v live
            g, u = _matmul(x, w["w_gate"], rows), _matmul(x, w["w_up"], rows)
            x = x + _matmul(g * u, w["w_down"], rows)
        return _matmul(x, head, rows, out_dtype=jnp.float32)

    x = jnp.ones((args.batch, cfg.hidden_size), dtype) * 0.01
    nbytes = sum(a.size * a.dtype.itemsize for a in jax.tree_util.tree_leaves((layers, head)))
    dt = median_time(all_products, x, layers, head)
    print(f"weight products of one step (batch {args.batch}, "
          f"padded to {rows} rows): {1e3 * dt:.2f} ms, "
          f"{nbytes / 1e9:.2f} GB at {nbytes / dt / 1e9:.0f} GB/s")


UNIT_SCALE = {"nsecond": 1.0, "usecond": 1e3, "msecond": 1e6, "second": 1e9, "ns": 1.0, "us": 1e3,
              "ms": 1e6, "s": 1e9, "byte": 1.0, "Kbyte": 1e3, "Mbyte": 1e6, "Gbyte": 1e9}


def summarize(args):
    """Group an ncu CSV (gpu__time_duration.sum [ns], dram__bytes_read.sum [byte]) by kernel."""
    try:
        with open(args.csv) as f:
            lines = f.readlines()
    except OSError as e:
        raise SystemExit(f"{args.csv}: {e.strerror}") from None
    start = next((i for i, line in enumerate(lines) if line.startswith('"ID"')), None)
    if start is None:
        raise SystemExit(f"{args.csv}: no ncu CSV header (\"ID\",...) found; run ncu with --csv")
    per = collections.defaultdict(lambda: {"ns": 0.0, "bytes": 0.0, "n": 0})
    seen = set()
    for row in csv.DictReader(lines[start:]):
        name = row["Kernel Name"]
        key = (row["ID"], name)
        try:
            val = float(row["Metric Value"].replace(",", "") or 0)
        except ValueError:
            raise SystemExit(f"{args.csv}: {row['Metric Name']} of {name[:60]} is {row['Metric Value']!r}, "
                             "not a number") from None
        unit = row.get("Metric Unit", "")
        if unit not in UNIT_SCALE:
            raise SystemExit(f"{args.csv}: unknown unit {unit!r} of {row['Metric Name']}")
        val *= UNIT_SCALE[unit]   # to nanoseconds and bytes
        if row["Metric Name"] == "gpu__time_duration.sum":
            per[name]["ns"] += val
            if key not in seen:
                per[name]["n"] += 1
                seen.add(key)
        elif row["Metric Name"] == "dram__bytes_read.sum":
            per[name]["bytes"] += val
    total = sum(v["ns"] for v in per.values())
    if total <= 0:
        raise SystemExit(f"{args.csv}: no gpu__time_duration.sum values; run ncu with "
                         "--metrics gpu__time_duration.sum,dram__bytes_read.sum")
    steps = args.steps
    print(f"{len(seen)} kernels, {total / 1e6 / steps:.3f} ms of kernel time per step "
          f"({steps} steps)\n")
    print(f"{'us/step':>9} {'share':>6} {'n/step':>7} {'GB/s':>7}  kernel")
    rows = sorted(per.items(), key=lambda kv: -kv[1]["ns"])
    for name, v in rows[: args.top]:
        bw = v["bytes"] / v["ns"] if v["ns"] else 0.0
        print(f"{v['ns'] / 1e3 / steps:9.1f} {100 * v['ns'] / total:5.1f}% {v['n'] / steps:7.1f} "
              f"{bw:7.0f}  {name[:110]}")
    rest = rows[args.top:]
    if rest:
        ns, n = sum(v["ns"] for _, v in rest), sum(v["n"] for _, v in rest)
        print(f"{ns / 1e3 / steps:9.1f} {100 * ns / total:5.1f}% {n / steps:7.1f}          ({len(rest)} other kernels)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(steps=steps, total_ns_per_step=total / steps,
                           kernels={k: v for k, v in rows}), f, indent=1)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="run decode steps inside the profiler range")
    r.add_argument("--shape", default="tiny", choices=sorted(PRESETS))
    r.add_argument("--context", type=int, default=4096)
    r.add_argument("--batch", type=int, default=1)
    r.add_argument("--new-tokens", type=int, default=5, help="tokens; the first comes from prefill, so steps = this - 1")
    r.add_argument("--attention", default="auto", choices=("auto", "xla", "pallas"))
    m = sub.add_parser("products", help="time only the step's weight products")
    m.add_argument("--shape", default="tiny", choices=sorted(PRESETS))
    m.add_argument("--batch", type=int, default=1)
    s = sub.add_parser("summarize", help="group an ncu CSV by kernel name")
    s.add_argument("csv")
    s.add_argument("--steps", type=int, default=4, help="decode steps inside the profiled range (--new-tokens - 1)")
    s.add_argument("--top", type=int, default=25)
    s.add_argument("--json", default=None)
    args = p.parse_args(argv)
    if args.cmd == "products":
        if args.batch < 1:
            p.error("--batch must be positive")
        products(args)
    elif args.cmd == "run":
        if min(args.context, args.batch) < 1 or args.new_tokens < 2:
            p.error("--context and --batch must be positive, --new-tokens at least 2")
        run(args)
    else:
        if args.steps < 1:
            p.error("--steps must be positive")
        summarize(args)


if __name__ == "__main__":
    main()
