#!/usr/bin/env python3
"""Is KV cache sharing safe for your adapters? Value-cache similarity and scheme fidelity.

Prints (1) per layer the mean cosine similarity between agents of the full value cache,
the base cache, the adapter output and the LR cache (the LRAgent paper's Tables 1-2),
and (2) per scheme the drift from non_shared over a multi-turn run: greedy token
agreement, first divergence, and teacher-forced KL(P_non_shared || P_scheme) and top-1
agreement. Definitions: docs/fidelity.md.

With no --model it runs the embedded demo: a tiny Llama with RANDOM weights and three
random shared-A adapters. Its numbers show the tool works, not how real adapters behave.

  python scripts/fidelity.py
  python scripts/fidelity.py --model meta-llama/Llama-3.1-8B-Instruct \\
      --adapter plan=./plan --adapter action=./action --adapter reflect=./reflect \\
      --trajectory traj.txt --turn plan:32 --turn action:8 --turn reflect:32 --out results/
  python scripts/fidelity.py --json --random-tokens 64 --schemes fs,blr

Exit code 2 with a one-line message on bad input.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys

from lragent_jax.cli import (
    DTYPES, UsageError, int_list, load_agents, parse_adapter_specs, strict_parser)


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="HF hub id or local folder (config.json + safetensors); default: embedded demo")
    p.add_argument("--adapter", action="append", default=[], metavar="NAME=PATH",
                   help="PEFT LoRA adapter (folder or hub id) of agent NAME; repeatable, at least two")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--trajectory", metavar="FILE", help="text file to use as the trajectory (needs a tokenizer)")
    g.add_argument("--random-tokens", type=int, default=None, metavar="N",
                   help="a trajectory of N random token ids (default 256 when no --trajectory)")
    p.add_argument("--turn", action="append", default=[], metavar="AGENT:N",
                   help="a turn of the scheme comparison: AGENT generates N tokens; repeatable, in order "
                        "(default: each agent once, 16 tokens)")
    p.add_argument("--append-ids", default=None, metavar="IDS",
                   help="comma-separated token ids appended after every turn (e.g. a tool output)")
    p.add_argument("--schemes", default=None,
                   help="comma list of schemes to compare with non_shared (default: all others; "
                        "base_lr_shared is skipped when the adapters do not share A)")
    p.add_argument("--critical-layers", default=None, help="droidspeak critical layers, comma-separated")
    p.add_argument("--dtype", default=None, choices=DTYPES,
                   help="parameter and cache dtype (default: bfloat16 for --model, float32 for the demo)")
    p.add_argument("--max-len", type=int, default=None,
                   help="cache capacity of the scheme runs (default: trajectory + turns + appends)")
    p.add_argument("--attention", default="auto", choices=("auto", "xla", "pallas"),
                   help="attention of the scheme runs (the similarity pass uses xla)")
    p.add_argument("--seed", type=int, default=0, help="seed of --random-tokens and of the demo weights")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout and nothing else")
    p.add_argument("--out", metavar="DIR", help="also write DIR/fidelity.json and DIR/fidelity_cosine.png")
    return strict_parser(p).parse_args(argv)


def build(args):
    """(model, lora, tokenizer, model_name, random_weights)."""
    if args.model is not None and len(parse_adapter_specs(args.adapter)) < 2:
        raise UsageError("give at least two --adapter NAME=PATH: fidelity compares agents")
    return load_agents(args.model, args.adapter, args.dtype, args.seed)


def trajectory_tokens(args, model, tokenizer):
    import numpy as np

    V = model.config.vocab_size
    if args.trajectory is not None:
        if tokenizer is None:
            raise UsageError(f"--trajectory needs a tokenizer and {args.model!r} has none; use --random-tokens")
        try:
            with open(args.trajectory, encoding="utf-8") as f:
                text = f.read()
        except OSError as e:
            raise UsageError(f"--trajectory {args.trajectory!r}: {e.strerror}") from None
        tokens = [int(t) for t in tokenizer.encode(text)]
        if not tokens:
            raise UsageError(f"--trajectory {args.trajectory!r} encodes to no tokens")
        return tokens, f"file {args.trajectory}"
    n = 256 if args.random_tokens is None else args.random_tokens
    if n < 1:
        raise UsageError(f"--random-tokens must be >= 1, got {n}")
    rng = np.random.default_rng(args.seed)
    bos = model.config.bos_token_id
    tokens = ([bos] if bos is not None else []) + rng.integers(0, V, n - (bos is not None)).tolist()
    return tokens[:n], f"{n} random token ids (seed {args.seed})"


def parse_turns(specs, agents):
    if not specs:
        return [(a, 16) for a in agents]
    turns = []
    for spec in specs:
        name, sep, n = spec.partition(":")
        if name not in agents:
            raise UsageError(f"unknown agent {name!r} in --turn {spec!r}; agents: {', '.join(agents)}")
        try:
            n = int(n) if sep else 16
        except ValueError:
            raise UsageError(f"--turn {spec!r}: N must be an integer") from None
        if n < 1:
            raise UsageError(f"--turn {spec!r}: N must be >= 1")
        turns.append((name, n))
    return turns


def _fmt(x, spec=".4f"):
    return "n/a" if x is None else format(x, spec)


def print_human(result):
    sim = result["similarity"]
    if result["random_weights"]:
        print("NOTE: embedded demo model with RANDOM weights and random adapters: these numbers show the tool "
              "works, not how trained adapters behave. Use --model/--adapter for your checkpoint.")
    print(f"model: {result['model']}   agents: {', '.join(sim['agents'])}   trajectory: {result['trajectory']}"
          f" ({sim['num_tokens']} tokens)   dtype: {result['dtype']}")
    lr_note = "A_v shared" if sim["shared_a"] else "A_v NOT shared: the LR column compares unrelated bases"
    if not sim["has_value_lora"]:
        lr_note = "no LoRA on v_proj: no adapter output, no LR cache"
    print(f"\nvalue-cache cosine similarity between agents (mean over agent pairs and tokens; {lr_note})")
    print(f"{'layer':>5} {'full':>8} {'base':>8} {'adapter':>8} {'LR':>8} {'|ad|/|base|':>12}")
    pl = sim["per_layer"]
    for i in range(sim["num_layers"]):
        print(f"{i:>5} {_fmt(pl['full'][i]):>8} {_fmt(pl['base'][i]):>8} {_fmt(pl['adapter'][i]):>8} "
              f"{_fmt(pl['lr'][i]):>8} {_fmt(sim['adapter_norm_ratio'][i], '.3f'):>12}")
    av = sim["average"]
    print(f"{'avg':>5} {_fmt(av['full']):>8} {_fmt(av['base']):>8} {_fmt(av['adapter']):>8} {_fmt(av['lr']):>8}")
    print("(paper, Llama-3.1-8B: full 0.958, base 0.973, adapter 0.054, LR ~0.95 with shared A)")

    sf = result["scheme_fidelity"]
    turns = " ".join(f"{a}:{n}" for a, n in sf["turns"])
    print(f"\nscheme fidelity vs non_shared (greedy; prompt {sf['prompt_tokens']} tokens; turns {turns})")
    print(f"{'scheme':<16} {'tok agree':>9} {'first div':>9} {'mean KL':>10} {'max KL':>10} {'TF top-1':>8}")
    for s in sf["schemes"]:
        div = "-" if s["first_divergence"] is None else str(s["first_divergence"])
        print(f"{s['scheme']:<16} {s['token_agreement']:>9.3f} {div:>9} {s['mean_kl']:>10.3g} "
              f"{s['max_kl']:>10.3g} {s['tf_top1_agreement']:>8.3f}")
    for name, reason in sf["skipped"].items():
        print(f"{name:<16} skipped: {reason}")
    print("(tok agree / first div: free-running greedy tokens; KL in nats and TF top-1: teacher-forced on "
          "non_shared's tokens; first div '-' = identical)")


def save_outputs(result, out_dir):
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "fidelity.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
    written = [path]
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker
    except ImportError:
        print("warning: matplotlib is not installed; no PNG written (pip install matplotlib)", file=sys.stderr)
        return written
    sim = result["similarity"]
    fig, ax = plt.subplots(figsize=(7, 4))
    layers = list(range(sim["num_layers"]))
    for kind, label in (("full", "full V"), ("base", "base X W_v"), ("adapter", "adapter s(XA)B"), ("lr", "LR X A")):
        ys = [float("nan") if y is None else y for y in sim["per_layer"][kind]]
        ax.plot(layers, ys, marker="o", label=label)
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.set_xlabel("layer")
    ax.set_ylabel("mean cosine similarity between agents")
    title = f"{result['model']}" + (" (RANDOM weights)" if result["random_weights"] else "")
    ax.set_title(title, fontsize=9)
    ax.axhline(0, color="gray", lw=0.5)
    ax.legend(fontsize=8)
    fig.tight_layout()
    png = os.path.join(out_dir, "fidelity_cosine.png")
    fig.savefig(png, dpi=120)
    plt.close(fig)
    written.append(png)
    return written


def main(argv=None):
    try:
        args = parse_args(sys.argv[1:] if argv is None else argv)
        if args.max_len is not None and args.max_len < 2:
            raise UsageError(f"--max-len must be >= 2, got {args.max_len}")
        appends = int_list(args.append_ids, "--append-ids") if args.append_ids else None
        critical = int_list(args.critical_layers, "--critical-layers") if args.critical_layers else None

        import jax

        from lragent_jax import fidelity
        from lragent_jax.engine import Engine
        from lragent_jax.schemes import canonical_scheme

        schemes = None
        if args.schemes is not None:
            try:
                schemes = [canonical_scheme(s) for s in args.schemes.split(",") if s.strip()]
            except ValueError as e:
                raise UsageError(f"--schemes: {e}") from None
            if not schemes:
                raise UsageError("--schemes is empty")
        model, lora, tokenizer, model_name, random_weights = build(args)
        if appends:
            V = model.config.vocab_size
            bad = [t for t in appends if not 0 <= t < V]
            if bad:
                raise UsageError(f"--append-ids: token ids out of range [0, {V}): {bad[:5]}")
        tokens, source = trajectory_tokens(args, model, tokenizer)
        turns = parse_turns(args.turn, list(lora.names))
        engine = Engine(model, lora)
        sim = fidelity.value_similarity(engine, tokens)
        report = fidelity.scheme_fidelity(engine, tokens, turns, schemes, appends=appends, max_len=args.max_len,
                                          critical_layers=critical, model_name=model_name, attention=args.attention)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (ValueError, KeyError, OSError, NotImplementedError) as e:
        print(f"error: {type(e).__name__}: {e.args[0] if e.args else e}", file=sys.stderr)
        return 2
    result = {
        "model": model_name,
        "random_weights": random_weights,
        "dtype": str(engine.dtype),
        "trajectory": source,
        "similarity": sim.to_dict(),
        "scheme_fidelity": report.to_dict(),
        "jax_version": jax.__version__,
        "backend": jax.default_backend(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    written = save_outputs(result, args.out) if args.out else []
    if args.json:
        print(json.dumps(result))
    else:
        print_human(result)
        for path in written:
            print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
