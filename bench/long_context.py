#!/usr/bin/env python3
"""Long context with many agents: which schemes fit, and how fast base_lr_shared runs there.

For each scheme it predicts the cache bytes for N agents at T tokens (docs/design.md
formulas), allocates the scheme's caches (fit check), and for the schemes in --run runs
the trajectory: append T random tokens, then every agent generates --gen tokens.

  python -m bench.long_context --shape llama-3.1-8b --tokens 131072 --agents 8
  python -m bench.long_context --shape tiny --tokens 2048 --agents 4     # CPU smoke run

Prints a table; writes JSON to --out (default results/long_context/<timestamp>/).
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

from bench.common import is_oom, results_dir, run_info, write_json


def predicted_cache_bytes(cfg, scheme, agents, tokens, rank, itemsize, critical):
    """Bytes of the scheme's cache arrays for `agents` agents and `tokens` tokens."""
    L, kv = cfg.num_layers, 2 * cfg.num_kv_heads * cfg.head_dim
    per_layer_token = {
        "non_shared": agents * kv,
        "full_shared": kv,
        "base_shared": kv + agents * rank,
        "base_lr_shared": kv + rank,
    }
    if scheme == "droidspeak":
        return tokens * itemsize * (L * kv + agents * len(critical) * kv + cfg.hidden_size)
    return tokens * itemsize * L * per_layer_token[scheme]


def main(argv=None):
    from lragent_jax.config import preset
    from lragent_jax.engine import Engine
    from lragent_jax.lora import random_adapters
    from lragent_jax.model import Llama
    from lragent_jax.schemes import SCHEMES, default_critical_layers
    from lragent_jax.session import Session

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", default="tiny")
    p.add_argument("--tokens", type=int, default=None, help="trajectory tokens (default 131072; tiny 2048)")
    p.add_argument("--agents", type=int, default=8)
    p.add_argument("--gen", type=int, default=8, help="tokens each agent generates")
    p.add_argument("--run", default="base_lr_shared,full_shared", help="schemes to run end to end")
    p.add_argument("--fit", default="all", help="schemes to allocate only (fit check)")
    p.add_argument("--prefill-buckets", default="64,1024")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)

    cfg = preset(args.shape)
    dtype = jnp.dtype("float32" if args.shape == "tiny" else "bfloat16")
    T = args.tokens or (2048 if args.shape == "tiny" else 131072)
    names = tuple(f"agent{i}" for i in range(args.agents))
    dev = jax.devices()[0]
    stats0 = dev.memory_stats() or {}
    limit = stats0.get("bytes_limit")
    print(f"device {dev.device_kind}, jax {jax.__version__}; {args.shape}, {T} tokens, {args.agents} agents; "
          f"device memory limit {limit / 2**30 if limit else float('nan'):.1f} GiB", flush=True)
    model = Llama(cfg, dtype=dtype, rngs=nnx.Rngs(0))
    lora = random_adapters(cfg, names, rank=8, dtype=dtype)
    engine = Engine(model, lora, prefill_buckets=tuple(int(b) for b in args.prefill_buckets.split(",")))
    weight_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(engine.params))
    critical = default_critical_layers(cfg.num_layers, args.shape)
    run = set(SCHEMES if args.run == "all" else args.run.split(","))
    fit = set(SCHEMES if args.fit == "all" else args.fit.split(",")) | run
    max_len = T + args.agents * args.gen + 8
    rows = []
    rng = np.random.default_rng(0)
    context = rng.integers(0, min(cfg.vocab_size, 32000), T).tolist()
    # Schemes that run go first: a failed allocation can leave the allocator fragmented.
    order = [x for x in SCHEMES if x in run] + [x for x in SCHEMES if x in fit and x not in run]
    for scheme in order:
        pred = predicted_cache_bytes(cfg, scheme, args.agents, max_len, 8, dtype.itemsize, critical)
        row = dict(scheme=scheme, predicted_cache_GiB=pred / 2**30,
                   predicted_total_GiB=(pred + weight_bytes) / 2**30, status="?")
        t0 = time.perf_counter()
        try:
            s = Session(engine, scheme, max_len=max_len, stop_ids=(), critical_layers=critical)
            jax.block_until_ready(jax.tree_util.tree_leaves(vars(s.scheme)))
            row["cache_GiB"] = s.cache_bytes / 2**30
            row["status"] = "fits (caches allocated)"
            if scheme in run:
                s.append(context)
                turns = []
                for a in names:
                    s.generate(a, args.gen, greedy=True)
                    t = s.turns[-1]
                    turns.append(dict(agent=a, ttft_s=t.ttft_s, decode_s=t.decode_s, catch_up=t.catch_up_tokens))
                row["turns"] = turns
                row["first_ttft_s_incl_compile"] = turns[0]["ttft_s"]
                rest = turns[2:] or turns  # agents 1 and 2 compile (first long prefill; first short one)
                row["later_ttft_s_median"] = float(np.median([t["ttft_s"] for t in rest]))
                row["decode_ms_per_token_median"] = 1e3 * float(np.median([t["decode_s"] / max(1, args.gen - 1)
                                                                           for t in rest]))
                row["status"] = "ran"
            del s
        except Exception as e:  # noqa: BLE001
            if not is_oom(e):
                raise
            row["status"] = "OOM"
            row["error"] = str(e).splitlines()[0][:200]
        gc.collect()
        st = dev.memory_stats() or {}
        row["peak_GiB"] = st.get("peak_bytes_in_use", 0) / 2**30 if st else None
        row["seconds"] = time.perf_counter() - t0
        rows.append(row)
        print(f"{scheme:<15} predicted cache {row['predicted_cache_GiB']:7.1f} GiB (+ weights = "
              f"{row['predicted_total_GiB']:6.1f}), allocated {row.get('cache_GiB', float('nan')):7.1f}  {row['status']}"
              + (f"  TTFT after compile {row['later_ttft_s_median']:.3f} s, decode "
                 f"{row['decode_ms_per_token_median']:.2f} ms/token" if row["status"] == "ran" else ""),
              flush=True)
    # Where each scheme stops fitting: the largest T whose caches + weights fit the device limit.
    if limit:
        for row in rows:
            per_token = predicted_cache_bytes(cfg, row["scheme"], args.agents, 1, 8, dtype.itemsize, critical)
            row["max_tokens_predicted"] = int((limit - weight_bytes) // per_token)
            print(f"{row['scheme']:<15} caches + weights fit up to ~{row['max_tokens_predicted']:,} tokens "
                  f"with {args.agents} agents (allocator limit, activations not counted)", flush=True)
    result = dict(**run_info(), jax=jax.__version__, shape=args.shape, tokens=T, agents=args.agents, gen=args.gen, weight_bytes=weight_bytes,
                  bytes_limit=limit, rows=rows)
    out = results_dir("long_context", args.out)
    print(f"wrote {write_json(os.path.join(out, f'long-context-{args.shape}.json'), result)}")
    return result


if __name__ == "__main__":
    main()
