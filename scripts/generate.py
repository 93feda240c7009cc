#!/usr/bin/env python3
"""Run agents that share one trajectory and one KV cache, under one or more cache schemes.

With no arguments it runs the embedded default: a small Llama with RANDOM weights, a
byte-level tokenizer and three shared-A LoRA agents (plan, action, reflect), under all
five schemes. Point it at real weights with --model and --adapter.

  python scripts/generate.py
  python scripts/generate.py --model meta-llama/Llama-3.1-8B-Instruct \\
      --adapter plan=./plan --adapter action=./action --scheme base_shared \\
      --prompt "Question: ..." --turn plan:32 --turn action:8 --greedy
  python scripts/generate.py --json --prompt-ids 1,2,3 --turn plan:4   # machine-readable

Exit code 2 with a one-line message on bad input.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from lragent_jax.cli import DTYPES, UsageError, int_list, load_agents, strict_parser  # noqa: E402


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="HF hub id or local folder (config.json + safetensors); default: embedded demo")
    p.add_argument("--adapter", action="append", default=[], metavar="NAME=PATH",
                   help="PEFT LoRA adapter folder or hub id for agent NAME (repeatable)")
    p.add_argument("--scheme", default=None,
                   help="cache scheme: non_shared, full_shared, droidspeak, base_shared, base_lr_shared, "
                        "a comma list, or 'all' (default: all for the embedded demo, else non_shared)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--prompt", help="prompt text (needs a tokenizer)")
    g.add_argument("--prompt-ids", help="prompt as comma-separated token ids, e.g. 1,2,3")
    p.add_argument("--turn", action="append", default=[], metavar="AGENT[:N]",
                   help="an agent turn generating N tokens (default --max-new-tokens); repeatable, in order")
    p.add_argument("--max-new-tokens", type=int, default=None, help="default turn length (32)")
    p.add_argument("--greedy", action="store_true", help="argmax decoding (overrides temperature)")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0, help="0 = off")
    p.add_argument("--top-p", type=float, default=1.0, help="1 = off")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--stop-ids", default=None,
                   help="comma-separated stop token ids, or 'none' (default: the model's eos ids)")
    p.add_argument("--dtype", default=None, choices=DTYPES,
                   help="parameter and cache dtype (default: bfloat16 for --model, float32 for the demo)")
    p.add_argument("--max-len", type=int, default=None,
                   help="cache capacity in tokens (default: prompt + all turns)")
    p.add_argument("--attention", default="auto", choices=("auto", "xla", "pallas"),
                   help="attention implementation (auto: pallas kernels on GPU/TPU, xla on CPU)")
    p.add_argument("--naive-expansion", action="store_true",
                   help="base_shared/base_lr_shared: expand V = V_base + s*LR*B before attention (ablation)")
    p.add_argument("--critical-layers", default=None,
                   help="droidspeak critical layers, comma-separated (default: paper's set or a third of layers)")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout and nothing else")
    return strict_parser(p).parse_args(argv)


def parse_turns(specs, default_n, agents):
    turns = []
    for spec in specs:
        name, _, n = spec.partition(":")
        if name not in agents:
            raise UsageError(f"unknown agent {name!r} in --turn {spec!r}; agents: {', '.join(agents)}")
        if n:
            try:
                n = int(n)
            except ValueError:
                raise UsageError(f"--turn {spec!r}: N must be an integer") from None
        else:
            n = default_n
        if n < 1:
            raise UsageError(f"--turn {spec!r}: N must be >= 1")
        turns.append((name, n))
    return turns


def build(args):
    """Model, adapters, tokenizer, turns and prompt ids from the arguments."""
    from lragent_jax import embedded

    explicit_n = args.max_new_tokens is not None
    if not explicit_n:
        args.max_new_tokens = 32
    if args.max_new_tokens < 1:
        raise UsageError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if args.temperature < 0:
        raise UsageError(f"--temperature must be >= 0, got {args.temperature}")
    if args.top_k < 0:
        raise UsageError(f"--top-k must be >= 0, got {args.top_k}")
    if not 0 < args.top_p <= 1:
        raise UsageError(f"--top-p must be in (0, 1], got {args.top_p}")
    model, lora, tokenizer, model_name, random_weights = load_agents(args.model, args.adapter, args.dtype, args.seed)
    default_turns = list(embedded.TURNS) if random_weights else None
    prompt_text = embedded.PROMPT if random_weights else None

    agents = list(lora.names) if lora is not None else ["base"]
    turns = parse_turns(args.turn, args.max_new_tokens, agents)
    if not turns:
        turns = default_turns if (default_turns and not explicit_n) else [
            (a, args.max_new_tokens) for a in agents]

    if args.prompt_ids is not None:
        prompt = int_list(args.prompt_ids, "--prompt-ids")
        if not prompt:
            raise UsageError("--prompt-ids is empty")
        V = model.config.vocab_size
        bad = [t for t in prompt if not 0 <= t < V]
        if bad:
            raise UsageError(f"--prompt-ids: token ids out of range [0, {V}): {bad[:5]}")
    else:
        text = args.prompt if args.prompt is not None else prompt_text
        if text is None:
            raise UsageError("give --prompt TEXT or --prompt-ids 1,2,3")
        if tokenizer is None:
            raise UsageError(f"--prompt needs a tokenizer, and {args.model!r} has no tokenizer files; "
                             "use --prompt-ids")
        prompt = list(tokenizer.encode(text))
        if not prompt:
            raise UsageError("--prompt encodes to no tokens")
    return model, lora, tokenizer, turns, prompt, random_weights, model_name


def run_scheme(engine, scheme, args, tokenizer, turns, prompt, max_len, model_name):
    from lragent_jax.session import Session

    stop_ids = None
    if args.stop_ids is not None:
        stop_ids = () if args.stop_ids.strip().lower() == "none" else tuple(int_list(args.stop_ids, "--stop-ids"))
    critical = int_list(args.critical_layers, "--critical-layers") if args.critical_layers else None
    session = Session(engine, scheme, max_len=max_len, tokenizer=tokenizer, attention=args.attention,
                      naive_expansion=args.naive_expansion, critical_layers=critical, model_name=model_name,
                      stop_ids=stop_ids, seed=args.seed)
    session.append(prompt)
    out_turns = []
    for agent, n in turns:
        tokens = session.generate(agent, n, greedy=args.greedy, temperature=args.temperature, top_k=args.top_k,
                                  top_p=args.top_p)[0]
        out_turns.append({"agent": agent, "token_ids": tokens, "text": session.text(tokens)})
    return {"scheme": session.scheme_name, "turns": out_turns, "stats": session.stats(),
            "turn_stats": [vars(t) for t in session.turns]}


def agreement(turn, ref_turn):
    a, b = turn["token_ids"], ref_turn["token_ids"]
    n = max(len(a), len(b))
    return sum(x == y for x, y in zip(a, b)) / n if n else 1.0


def print_human(result, random_weights, model_name):
    if random_weights:
        print("NOTE: embedded demo model with RANDOM weights (seeded): the text below is noise; "
              "the cache sharing is real. Use --model/--adapter for real weights.")
    print(f"model: {model_name}   prompt: {result['prompt_tokens']} tokens")
    ns = next((r for r in result["runs"] if r["scheme"] == "non_shared"), None)
    for run in result["runs"]:
        st = run["stats"]
        print(f"\n=== scheme {run['scheme']} ===")
        print(f"{'agent':<10} {'catch-up':>8} {'new':>5} {'gen':>4} {'TTFT ms':>8} {'tok/s':>8} {'=NS':>5}  text")
        for i, (t, ts) in enumerate(zip(run["turns"], run["turn_stats"])):
            agree = f"{agreement(t, ns['turns'][i]):.2f}" if ns is not None else "-"
            text = t["text"] if t["text"] is not None else " ".join(map(str, t["token_ids"]))
            text = text.replace("\n", "\\n")
            tps = ts["generated_tokens"] / ts["decode_s"] if ts["decode_s"] > 0 else 0.0
            print(f"{t['agent']:<10} {ts['catch_up_tokens']:>8} {ts['new_tokens']:>5} {ts['generated_tokens']:>4} "
                  f"{1e3 * ts['ttft_s']:>8.1f} {tps:>8.1f} {agree:>5}  {text[:60]!r}")
        print(f"stats: cache {st['cache_bytes'] / 2**20:.2f} MiB, catch-up {st['catch_up_tokens']} tokens, "
              f"TTFT {st['ttft_s'] * 1e3:.1f} ms, {st['tokens_per_s']:.1f} trajectory tokens/s "
              f"({st['trajectory_tokens']} tokens in {st['elapsed_s']:.2f} s, compile included)")


def main(argv=None):
    try:
        args = parse_args(sys.argv[1:] if argv is None else argv)
        from lragent_jax.schemes import SCHEMES, canonical_scheme

        scheme_arg = args.scheme or ("all" if args.model is None else "non_shared")
        if scheme_arg.strip().lower() == "all":
            schemes = list(SCHEMES)
        else:
            try:
                schemes = [canonical_scheme(s) for s in scheme_arg.split(",") if s.strip()]
            except ValueError as e:
                raise UsageError(str(e)) from None
            if not schemes:
                raise UsageError("--scheme is empty")
        if args.max_len is not None and args.max_len < 2:
            raise UsageError(f"--max-len must be >= 2, got {args.max_len}")

        model, lora, tokenizer, turns, prompt, random_weights, model_name = build(args)
        need = len(prompt) + sum(n for _, n in turns)
        max_len = args.max_len or need
        if len(prompt) > max_len:
            raise UsageError(f"prompt of {len(prompt)} tokens is longer than --max-len {max_len}")
        if need > max_len:
            raise UsageError(f"prompt ({len(prompt)}) + turns ({need - len(prompt)}) = {need} tokens exceed "
                             f"--max-len {max_len}")
        from lragent_jax.engine import Engine

        engine = Engine(model, lora)
        runs = []
        for scheme in schemes:
            try:
                runs.append(run_scheme(engine, scheme, args, tokenizer, turns, prompt, max_len, model_name))
            except (ValueError, KeyError) as e:
                raise UsageError(f"scheme {scheme}: {e.args[0] if e.args else e}") from None
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (ValueError, KeyError, FileNotFoundError, NotImplementedError) as e:
        print(f"error: {type(e).__name__}: {e.args[0] if e.args else e}", file=sys.stderr)
        return 2
    result = {"model": model_name, "random_weights": random_weights, "prompt_tokens": len(prompt), "runs": runs}
    if args.json:
        print(json.dumps(result))
    else:
        print_human(result, random_weights, model_name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
