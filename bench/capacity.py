#!/usr/bin/env python3
"""Decode speed against cache capacity: one trajectory length, max_len swept.

A Session preallocates its caches to max_len; decoding should cost what the trajectory
holds, not what the cache could hold. Each max_len gets its own Session over one Engine,
the same context is appended to all, and every round each Session's agent generates
--gen tokens (greedy, no stop tokens); rounds go round-robin over the max_lens so a busy
machine slows every point alike. Decode tokens/s is (tokens - 1) / decode seconds of a
turn (the first token comes from the prefill); the table gives each point's median over
the rounds after the first (which compiles) and its ratio to the --reference max_len,
and the best round's (on a shared machine other load only ever slows a round down).
The context is --trajectory minus the generated tokens, so the last turn ends at
--trajectory tokens (default 1024: every default max_len holds it).

  python -m bench.capacity                                        # CPU: the miniature
  python -m bench.capacity --shape llama-3.1-8b --attention pallas  # GPU, random weights
  python -m bench.capacity --shape tiny --max-lens 1024,8192 --rounds 2   # smoke run

Prints a table; writes JSON and a PNG to --out (default results/capacity/<timestamp>/).
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np

from bench.common import (UsageError, failed_point, log, positive_int_list, results_dir, run_info, save_plot,
                          write_json)

DEFAULT_MAX_LENS = "1024,2048,8192,32768,131072"
FLAT_WITHIN = 0.10  # the target: max_len 128k within 10% of max_len 2k


def load_engine(shape: str, dtype_name: str | None, layer_mode: str):
    """(engine, agent, vocab, description): the shipped miniature, or a preset with random weights."""
    import jax.numpy as jnp
    from flax import nnx

    from lragent_jax.config import preset
    from lragent_jax.engine import Engine
    from lragent_jax.lora import random_adapters
    from lragent_jax.miniature import load_miniature
    from lragent_jax.model import Llama

    if shape == "miniature":
        dtype = jnp.dtype(dtype_name or "float32")
        model, lora, _, _ = load_miniature("shared", dtype=dtype)
        what = "the miniature (trained weights)"
    else:
        cfg = preset(shape)
        dtype = jnp.dtype(dtype_name or ("float32" if shape == "tiny" else "bfloat16"))
        model = Llama(cfg, dtype=dtype, rngs=nnx.Rngs(0))
        lora = random_adapters(cfg, rank=8, dtype=dtype)
        what = f"{shape} (random weights)"
    engine = Engine(model, lora, layer_mode=layer_mode)
    return engine, lora.names[0], model.config.vocab_size, f"{what}, {dtype}"


def summarize(points: list, reference: int) -> None:
    """Median tokens/s per point and its ratio to the reference max_len's (in place)."""
    for pt in points:
        rates = pt.get("decode_tokens_per_s", [])[1:]  # round 0 compiles
        pt["median_tokens_per_s"] = float(np.median(rates)) if rates else None
        pt["best_tokens_per_s"] = float(np.max(rates)) if rates else None
    for key, ratio in (("median_tokens_per_s", "vs_reference"), ("best_tokens_per_s", "best_vs_reference")):
        ref = next((pt[key] for pt in points if pt["max_len"] == reference), None)
        for pt in points:
            pt[ratio] = pt[key] / ref if pt[key] and ref else None


def plot(points, path, title, reference):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [p for p in points if p.get("median_tokens_per_s")]
    fig, ax = plt.subplots(figsize=(6, 4))
    xs = [p["max_len"] for p in ok]
    ax.plot(xs, [p["median_tokens_per_s"] for p in ok], "o-", label="decode tokens/s (median)")
    ax.plot(xs, [p["best_tokens_per_s"] for p in ok], "^--", label="decode tokens/s (best round)")
    for p in ok:
        ax.plot([p["max_len"]] * len(p["decode_tokens_per_s"][1:]), p["decode_tokens_per_s"][1:], ".",
                color="gray", alpha=0.5)
    ref = next((p["median_tokens_per_s"] for p in ok if p["max_len"] == reference), None)
    if ref:
        ax.axhspan(ref * (1 - FLAT_WITHIN), ref * (1 + FLAT_WITHIN), color="green", alpha=0.1,
                   label=f"within {FLAT_WITHIN:.0%} of max_len {reference}")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("max_len (cache capacity, tokens)")
    ax.set_ylabel("decode tokens/s")
    ax.set_ylim(bottom=0)
    return save_plot(fig, [ax], path, title)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", default="miniature", help="'miniature' (the shipped one) or a preset (random weights)")
    p.add_argument("--dtype", default=None, help="default: float32 for miniature / tiny, else bfloat16")
    p.add_argument("--scheme", default="base_lr_shared")
    p.add_argument("--attention", default="auto", choices=("auto", "xla", "pallas"))
    p.add_argument("--layer-mode", default="auto", choices=("auto", "scan", "per_layer"))
    p.add_argument("--max-lens", default=DEFAULT_MAX_LENS, help="comma list of Session max_len values")
    p.add_argument("--trajectory", type=int, default=1024,
                   help="tokens in the cache after the last turn: rounds x gen generated, the rest appended first")
    p.add_argument("--gen", type=int, default=16, help="tokens generated per turn (>= 2)")
    p.add_argument("--rounds", type=int, default=9, help="turns per max_len; the first compiles and is not counted")
    p.add_argument("--reference", type=int, default=2048, help="max_len the others are compared with")
    p.add_argument("--out", default=None, help="output folder (default results/capacity/<timestamp>/)")
    args = p.parse_args(argv)
    try:
        max_lens = sorted(set(positive_int_list(args.max_lens, "--max-lens")))
        if args.gen < 2 or args.rounds < 2:
            raise UsageError("--gen >= 2 and --rounds >= 2 (the first compiles) are needed")
        trajectory, context_len = args.trajectory, args.trajectory - args.rounds * args.gen
        if context_len < 1:
            raise UsageError(f"--trajectory {trajectory} leaves no context before {args.rounds} x {args.gen} "
                             "generated tokens")
        if max_lens[0] < trajectory:
            raise UsageError(f"--max-lens {max_lens[0]} is shorter than --trajectory {trajectory}")
    except UsageError as e:
        p.error(str(e))

    import jax

    from lragent_jax.cache import capacity
    from lragent_jax.session import Session

    engine, agent, vocab, what = load_engine(args.shape, args.dtype, args.layer_mode)
    dev = jax.devices()[0]
    log(f"device {dev.device_kind} ({jax.default_backend()}), jax {jax.__version__}; {what}; {args.scheme}, "
        f"attention {args.attention}, layers {engine.layer_mode}; trajectory {context_len} + "
        f"{args.rounds} x {args.gen} = {trajectory} tokens")
    context = np.random.default_rng(0).integers(2, vocab, context_len).tolist()
    points, sessions = [], {}
    for max_len in max_lens:
        pt = dict(max_len=max_len, status="ok", decode_tokens_per_s=[], ttft_s=[])
        try:
            s = Session(engine, args.scheme, max_len=max_len, attention=args.attention, stop_ids=())
            s.append(context)
            pt["capacity"], pt["cache_MiB"] = capacity(max_len), s.cache_bytes / 2**20
            sessions[max_len] = s
        except Exception as e:  # noqa: BLE001
            pt = failed_point(e, pt)
        points.append(pt)
    for r in range(args.rounds):
        for pt in points:
            s = sessions.get(pt["max_len"])
            if s is None or pt["status"] != "ok":
                continue
            try:
                t = time.perf_counter()
                s.generate(agent, args.gen, greedy=True)
                turn = s.turns[-1]
                pt["decode_tokens_per_s"].append((turn.generated_tokens - 1) / turn.decode_s)
                pt["ttft_s"].append(turn.ttft_s)
                log(f"  round {r} max_len {pt['max_len']:>7}: {pt['decode_tokens_per_s'][-1]:8.1f} tokens/s, "
                    f"TTFT {turn.ttft_s * 1e3:7.1f} ms ({time.perf_counter() - t:.1f} s)")
            except Exception as e:  # noqa: BLE001
                pt.update(failed_point(e, pt))
                sessions.pop(pt["max_len"], None)
    summarize(points, args.reference)
    nan = lambda x: float("nan") if x is None else x  # noqa: E731
    log(f"\n{'max_len':>8} {'cache MiB':>10} {'median tok/s':>13} {'vs ' + str(args.reference):>8} "
        f"{'best tok/s':>11} {'vs ' + str(args.reference):>8}  status")
    for pt in points:
        log(f"{pt['max_len']:>8} {nan(pt.get('cache_MiB')):>10.1f} {nan(pt.get('median_tokens_per_s')):>13.1f} "
            f"{nan(pt.get('vs_reference')):>8.2f} {nan(pt.get('best_tokens_per_s')):>11.1f} "
            f"{nan(pt.get('best_vs_reference')):>8.2f}  {pt['status']}")
    result = dict(**run_info(), model=what, scheme=args.scheme, attention=args.attention,
                  layer_mode=engine.layer_mode, context=context_len, gen=args.gen, rounds=args.rounds,
                  trajectory=trajectory, reference=args.reference, flat_within=FLAT_WITHIN, points=points)
    out = results_dir("capacity", args.out)
    name = f"capacity-{args.shape}-{args.attention}"
    log(f"wrote {write_json(os.path.join(out, name + '.json'), result)}")
    title = f"{what}: decode vs max_len ({dev.device_kind}, trajectory {trajectory})"
    try:
        log(f"wrote {plot(points, os.path.join(out, name + '.png'), title, args.reference)}")
    except ImportError:
        log("matplotlib missing: no PNG")
    return result


if __name__ == "__main__":
    main()
