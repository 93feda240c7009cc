#!/usr/bin/env python3
"""Concurrent agents: decode-step time of N agents branching from one shared trajectory.

For N in --agents and each context length: the fast path (Session.generate_concurrent under
base_lr_shared or full_shared: one jitted loop, the shared prefix read once per KV head for
all agents) against the same N branches decoded one after another (the generic path).
Step time = (time for G tokens - time for 1 token) / (G - 1), compile excluded (each
configuration runs once untimed first).

  python -m bench.concurrent --shape llama-3.1-8b --context 8192,32768,131072 --agents 1,2,4,8
  python -m bench.concurrent --shape tiny --quick          # CPU smoke run

Target (issue 6, H100/H200): N = 4 at 32k <= 1.3x one agent's step; N = 8 <= 1.6x.
Prints a table; writes JSON to --out (default results/concurrent/<timestamp>/).
"""

from __future__ import annotations

import argparse
import gc
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from bench.common import UsageError, positive_int_list, results_dir, run_info, write_json


def main(argv=None):
    from lragent_jax.config import ConfigError, preset
    from lragent_jax.engine import Engine
    from lragent_jax.lora import random_adapters
    from lragent_jax.model import Llama
    from lragent_jax.schemes import Scheme
    from lragent_jax.session import Session

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", default="tiny")
    p.add_argument("--scheme", default="base_lr_shared", choices=("base_lr_shared", "full_shared"))
    p.add_argument("--context", default=None, help="comma list of context lengths (default 8192,32768,131072)")
    p.add_argument("--agents", default="1,2,4,8")
    p.add_argument("--gen", type=int, default=33, help="tokens per branch in the timed run")
    p.add_argument("--attention", default="auto", choices=("auto", "xla", "pallas"))
    p.add_argument("--no-sequential", action="store_true", help="skip the one-after-another baseline")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)

    try:
        cfg = preset(args.shape)
        # Largest context first, on a fresh heap: on an H100 a 131k-capacity cache allocated
        # after two other sessions' caches failed on fragmentation (2026-11-28).
        contexts = sorted(positive_int_list(args.context or ("256,512" if args.quick else "8192,32768,131072"),
                                            "--context"), reverse=True)
        ns = positive_int_list(args.agents, "--agents")
        if args.gen < 2:
            raise UsageError("--gen must be >= 2 (the step time is a difference of two runs)")
    except (UsageError, ConfigError) as e:
        p.error(str(e))
    dtype = jnp.dtype("float32" if args.shape == "tiny" else "bfloat16")
    gen = 5 if args.quick else args.gen
    names = tuple(f"agent{i}" for i in range(max(ns)))
    dev = jax.devices()[0]
    print(f"device {dev.device_kind}, jax {jax.__version__}; {args.shape} {args.scheme}", flush=True)
    model = Llama(cfg, dtype=dtype, rngs=nnx.Rngs(0))
    engine = Engine(model, random_adapters(cfg, names, rank=8, dtype=dtype), prefill_buckets=(64, 1024))
    max_len = max(contexts) + gen + 16  # one capacity for every point: programs compile once
    rng = np.random.default_rng(0)

    def session_at(ctx):
        s = Session(engine, args.scheme, max_len=max_len, stop_ids=(), attention=args.attention)
        s.append(rng.integers(0, min(cfg.vocab_size, 32000), ctx).tolist())
        s.generate(names[0], 2, greedy=True)  # the shared cache now holds the context
        return s

    def timed(s, agents, n, sequential):
        branch = s.scheme.branch
        if sequential:  # the generic path: agents one after another on the same fork state
            s.scheme.branch = lambda *a, **k: Scheme.branch(s.scheme, *a, **k)
        t = time.perf_counter()
        s.generate_concurrent({a: n for a in agents}, greedy=True)
        dt = time.perf_counter() - t
        s.scheme.branch = branch
        s.discard_branches()
        return dt

    rows = []
    for ctx in contexts:
        s = session_at(ctx)
        for n_agents in ns:
            agents = names[:n_agents]
            for sequential in ([False] if args.no_sequential else [False, True]):
                timed(s, agents, gen, sequential)  # compile
                timed(s, agents, 1, sequential)
                t_gen = timed(s, agents, gen, sequential)
                t_one = timed(s, agents, 1, sequential)
                step = (t_gen - t_one) / (gen - 1)
                row = dict(context=ctx, agents=n_agents, path="sequential" if sequential else "concurrent",
                           step_ms=1e3 * step, branch_s=t_gen)
                rows.append(row)
                print(f"ctx {ctx:>7}  N={n_agents}  {row['path']:>10}: {row['step_ms']:8.2f} ms per decode step "
                      f"(all {n_agents} agents)", flush=True)
        del s
        gc.collect()
    for ctx in contexts:
        one = next((r["step_ms"] for r in rows if r["context"] == ctx and r["agents"] == 1
                    and r["path"] == "concurrent"), None)
        for r in rows:
            if r["context"] == ctx and one:
                r["vs_one_agent"] = r["step_ms"] / one
    print(f"\n{'context':>8} {'N':>3} {'path':>11} {'ms/step':>9} {'x 1 agent':>10}")
    for r in rows:
        print(f"{r['context']:>8} {r['agents']:>3} {r['path']:>11} {r['step_ms']:>9.2f} {r.get('vs_one_agent', 0):>10.2f}")
    result = dict(**run_info(), jax=jax.__version__, shape=args.shape, scheme=args.scheme, gen=gen, rows=rows)
    out = results_dir("concurrent", args.out)
    print(f"wrote {write_json(os.path.join(out, f'concurrent-{args.shape}.json'), result)}")
    return result


if __name__ == "__main__":
    main()
