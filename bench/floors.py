#!/usr/bin/env python3
"""How far a bench.trace run is from its floor (issue 5): TTFT against the prefill floor,
end-to-end time against prefill floor + decode floor.

  prefill floor = sum over prefill calls of max(FLOPs / bf16 matmul rate,
                                               bytes read / copy bandwidth)
      FLOPs per prefilled token at position p: 2 * (weights multiplied) + causal attention
      4 * layers * q_heads * head_dim * (p + 1/2); the LM head once per prefill call. The
      byte term (every weight once, plus the cache before the call) is what bounds the
      trace's many 8-token turns: FLOPs alone would put their floor near zero.
  decode floor = decode passes * (weight bytes read + cache bytes read) / copy bandwidth
      a turn generating g tokens runs g - 1 decode passes (the first token comes from
      the prefill's logits); each reads every weight but the embedding table and the
      cached K, V_base (and LR for base_lr_shared) of every earlier token of its row.

The floors are the device's copy bandwidth and matmul rate measured on the same card
(bench.step and bench.kernels print them):

  python -m bench.floors bench/results/.../results.json --copy-gbps 3314 --tflops 620.9
"""

from __future__ import annotations

import argparse
import json
import os
import sys

# schemes whose attention also reads the agent's LR (rank values per token and layer)
LR_SCHEMES = ("base_lr_shared", "base_shared")


def model_counts(cfg, itemsize=2):
    """(weights multiplied per token excluding the LM head, LM head size, bytes a decode pass
    reads for weights, cache bytes per cached token without LR, LR bytes per token per rank)."""
    from lragent_jax.config import PROJECTIONS

    L, d, kvd = cfg.num_layers, cfg.hidden_size, cfg.kv_dim
    per_layer = sum(a * b for a, b in map(cfg.projection_dims, PROJECTIONS))
    head = d * cfg.vocab_size
    # every weight (norms too) but the embedding table, which a step gathers one row of
    # unless it doubles as the LM head
    weight_bytes = (cfg.num_params() - (0 if cfg.tie_word_embeddings else head)) * itemsize
    return L * per_layer, head, weight_bytes, 2 * L * kvd * itemsize, L * itemsize


def row_floors(row, cfg, copy_bps, flops_per_s, rank=8, itemsize=2):
    """Prefill and decode floors (seconds) of one bench.trace result row (its steps'
    new_tokens count every row of the batch)."""
    mult, head, wbytes, kv_tok, lr_tok_rank = model_counts(cfg, itemsize)
    attn = 4 * cfg.num_layers * cfg.num_heads * cfg.head_dim
    per_tok_cache = kv_tok + (rank * lr_tok_rank if row["scheme"] in LR_SCHEMES else 0)
    B = row.get("batch", 1)
    pos, prefill_s, dbytes = 0, 0.0, 0.0
    for st in row["steps"]:
        n = st["new_tokens"] // B      # prefill tokens per row (catch-up and carried token too)
        flops = B * (2 * mult * n + attn * n * (pos + n / 2) + 2 * head)
        pbytes = wbytes + B * per_tok_cache * (pos + n)  # weights, earlier cache read, new cache written
        prefill_s += max(flops / flops_per_s, pbytes / copy_bps)
        pos += n
        # decode passes: each feeds one sampled token and reads it with all before it; the
        # turn's last sampled token is fed by the next turn's prefill (in its new_tokens)
        for _ in range(st["gen"] - 1):
            pos += 1
            dbytes += wbytes + B * per_tok_cache * pos
    return prefill_s, dbytes / copy_bps


def jnp_itemsize(dtype: str) -> int:
    import numpy as np
    import ml_dtypes  # noqa: F401  (bfloat16 as a numpy dtype)

    return np.dtype(getattr(ml_dtypes, dtype, dtype)).itemsize


def run_config(data, shape, parser):
    """The model config of a bench.trace run: --shape, the run's preset, or its checkpoint."""
    from lragent_jax.config import ConfigError, ModelConfig, preset

    name = shape or (data.get("args") or {}).get("shape")
    try:
        if name:
            return preset(name)
        from lragent_jax.loading import resolve_path

        return ModelConfig.from_pretrained(resolve_path(data["model"], allow_patterns=("config.json",)))
    except (ConfigError, OSError, KeyError, ValueError) as e:
        parser.error(f"cannot tell the run's model config ({e}); pass --shape")


def check_results(data) -> None:
    """ValueError naming what a bench.trace results.json lacks that the floors read."""
    if not isinstance(data, dict) or not isinstance(data.get("results"), list):
        raise ValueError("no 'results' list")
    ok = [r for r in data["results"] if isinstance(r, dict) and r.get("status", "ok") == "ok"]
    missing = {k for k in ("card", "jax_version", "date") if k not in data}
    missing |= {k for r in ok for k in ("scheme", "label", "lctx", "ttft_s", "end_to_end_s", "steps") if k not in r}
    missing |= {f"steps[].{k}" for r in ok for st in r.get("steps", ()) for k in ("new_tokens", "gen")
                if k not in st}
    if missing:
        raise ValueError(f"missing keys {sorted(missing)}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("results", help="bench.trace results.json")
    p.add_argument("--copy-gbps", type=float, required=True, help="measured copy bandwidth, GB/s")
    p.add_argument("--tflops", type=float, required=True, help="measured bf16 matmul rate, TFLOP/s")
    p.add_argument("--rank", type=int, default=8, help="LoRA rank of the run (LR bytes)")
    p.add_argument("--shape", default=None,
                   help="preset shape of the model (default: the run's --shape, or its checkpoint's config.json)")
    args = p.parse_args(argv)
    if args.copy_gbps <= 0 or args.tflops <= 0 or args.rank < 1:
        p.error("--copy-gbps, --tflops and --rank must be positive")
    try:
        with open(args.results) as f:
            data = json.load(f)
        check_results(data)
    except (OSError, ValueError) as e:  # JSONDecodeError is a ValueError
        p.error(f"{args.results}: not a readable bench.trace results.json ({e})")
    cfg = run_config(data, args.shape, p)
    itemsize = jnp_itemsize(data.get("dtype", "bfloat16"))
    print(f"{data['card']}, jax {data['jax_version']}, {data['date'][:10]}; floors: copy "
          f"{args.copy_gbps:.0f} GB/s, matmul {args.tflops:.1f} TFLOP/s")
    print(f"{'scheme':<22} {'Lctx':>6} {'batch':>5} {'TTFT s':>8} {'floor':>7} {'x':>5} "
          f"{'e2e s':>7} {'floor':>7} {'x':>5}")
    out = []
    for row in data["results"]:
        if row.get("status", "ok") != "ok":
            continue
        pf, df = row_floors(row, cfg, args.copy_gbps * 1e9, args.tflops * 1e12, args.rank, itemsize)
        rec = dict(scheme=row["label"], lctx=row["lctx"], batch=row.get("batch", 1),
                   ttft_s=row["ttft_s"], prefill_floor_s=pf, ttft_vs_floor=row["ttft_s"] / pf,
                   e2e_s=row["end_to_end_s"], e2e_floor_s=pf + df,
                   e2e_vs_floor=row["end_to_end_s"] / (pf + df))
        out.append(rec)
        print(f"{rec['scheme']:<22} {rec['lctx']:>6} {rec['batch']:>5} {rec['ttft_s']:8.3f} {pf:7.3f} "
              f"{rec['ttft_vs_floor']:5.2f} {rec['e2e_s']:7.3f} {pf + df:7.3f} {rec['e2e_vs_floor']:5.2f}")
    return out


if __name__ == "__main__":
    main()
