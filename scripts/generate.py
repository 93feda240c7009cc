#!/usr/bin/env python3
"""Run agents that share one trajectory and one KV cache, under one or more cache schemes.

With no arguments it runs the embedded default under all five schemes. When the trained
miniature is shipped (lragent_jax/assets/miniature, see scripts/train_miniature.py), that
is its plan / action / reflect agents solving a few held-out questions of the task with real
wiki / calc tool calls (lragent_jax.task.run_episode), answers marked right or wrong. Until
then it is a small Llama with RANDOM weights, a byte-level tokenizer and three shared-A LoRA
agents. Point it at real weights with --model and --adapter.

  python scripts/generate.py
  python scripts/generate.py --questions 5 --share-a svd:12   # miniature, independent adapters
  python scripts/generate.py --model meta-llama/Llama-3.1-8B-Instruct \\
      --adapter plan=./plan --adapter action=./action --scheme base_shared \\
      --prompt "Question: ..." --turn plan:32 --turn action:8 --greedy
  python scripts/generate.py --json --prompt-ids 1,2,3 --turn plan:4   # machine-readable
  python scripts/generate.py --model M --adapter plan=P --adapter action=A --adapter reflect=R \
      --scheme base_lr_shared --share-a stack --prompt "..."   # adapters trained independently

Several schemes (a comma list or 'all') run one after another; each is printed as it
finishes. A scheme that cannot run with the given adapters or length is named with the
reason before any runs, and the others still run.

Exit codes: 0 every run succeeded; 1 some schemes failed (the others' results are printed,
and --json's "errors" lists each failed scheme and why); 2 bad input, nothing ran
(one line on stderr naming the file or value).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback

from lragent_jax.cli import (DTYPES, UsageError, add_mesh_flag, int_list, load_agents, parse_mesh,  # noqa: E402
                             strict_parser)
from lragent_jax.sampling import check_sampling  # noqa: E402

SEED_MAX = 2**63 - 1
MINIATURE_NAME = "miniature"
DEMO_QUESTIONS = 3
CLI_SAMPLING_NAMES = {"temperature": "--temperature", "top_k": "--top-k", "top_p": "--top-p"}


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
    p.add_argument("--share-a", default=None, metavar="stack|svd:R",
                   help="base_lr_shared on adapters whose A differ: make them share A first (lragent_jax.share_a); "
                        "stack is exact (rank = sum of ranks), svd:R keeps R directions. With the miniature, "
                        "loads its independently trained adapters")
    p.add_argument("--questions", type=int, default=None,
                   help="miniature demo: held-out test questions per scheme (default 3)")
    add_mesh_flag(p)
    p.add_argument("--json", action="store_true",
                   help="print one JSON object on stdout and nothing else: the completed runs and an 'errors' list")
    return strict_parser(p).parse_args(argv)


def parse_share_a(text):
    """'stack' -> ("stack", None); 'svd:16' -> ("svd", 16); None -> None."""
    if text is None:
        return None
    method, _, rank = text.strip().partition(":")
    if method == "stack" and not rank:
        return "stack", None
    if method == "svd" and rank:
        try:
            r = int(rank)
        except ValueError:
            r = 0
        if r >= 1:
            return "svd", r
    raise UsageError(f"--share-a must be 'stack' or 'svd:R' with R >= 1, got {text!r}")


def apply_share_a(lora, spec):
    """(shared-A adapters for base_lr_shared, share_a's report); spec from parse_share_a."""
    from lragent_jax.share_a import share_a

    if lora is None:
        raise UsageError("--share-a needs adapters (--adapter NAME=PATH, or the miniature)")
    try:
        return share_a(lora, spec[0], spec[1])
    except ValueError as e:
        raise UsageError(f"--share-a: {e}") from None


def print_share_a(report):
    kept = ", ".join(f"{n} {100 * f:.1f}%" for n, f in report["kept"].items())
    print(f"share_a {report['method']}: base_lr_shared runs on one A of rank {report['rank']} "
          f"(adapters' ranks {report['source_ranks']}); kept of each adapter's delta weights: {kept}", flush=True)


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


def check_common(args):
    """Flags both modes read: turn length, sampling, seed."""
    if args.max_new_tokens is None:
        args.max_new_tokens = 32
    if args.max_new_tokens < 1:
        raise UsageError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    try:  # the rule SamplingParams.make applies, named as flags (inf / nan refused too)
        args.temperature, args.top_k, args.top_p = check_sampling(args.temperature, args.top_k, args.top_p,
                                                                  names=CLI_SAMPLING_NAMES)
    except ValueError as e:
        raise UsageError(str(e)) from None
    if not 0 <= args.seed <= SEED_MAX:
        raise UsageError(f"--seed must be in [0, {SEED_MAX}], got {args.seed}")


def miniature_default(args) -> bool:
    """No --model and the trained miniature is there: it is the default model."""
    from lragent_jax.miniature import assets_built

    return args.model is None and not args.adapter and assets_built()


def load(args):
    """(model, lora, tokenizer, name, random_weights): --model, else the miniature, else the random demo.
    The miniature's independently trained adapters with --share-a, its shared-A ones otherwise."""
    if miniature_default(args):
        import jax.numpy as jnp

        from lragent_jax.miniature import load_miniature

        flavour = "independent" if args.share_a is not None else "shared"
        model, lora, tokenizer, _ = load_miniature(flavour, dtype=jnp.dtype(args.dtype or "float32"))
        return model, lora, tokenizer, f"{MINIATURE_NAME} ({flavour} adapters)", False
    return load_agents(args.model, args.adapter, args.dtype, args.seed)


def build(args):
    """Model, adapters, tokenizer, turns and prompt ids from the arguments."""
    from lragent_jax import embedded

    explicit_n = args.max_new_tokens is not None
    check_common(args)
    model, lora, tokenizer, model_name, random_weights = load(args)
    default_turns = list(embedded.TURNS) if random_weights else None
    prompt_text = embedded.PROMPT if random_weights else None
    if miniature_default(args):  # the first held-out question, up to the plan agent's turn
        from lragent_jax.miniature import miniature_world
        from lragent_jax.task.episodes import THOUGHT, question_text

        prompt_text = question_text(miniature_world().questions["test"][0].text) + THOUGHT

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
    # Parsed once here, so every scheme's run sees checked values.
    args.stop_id_list = None
    if args.stop_ids is not None:
        none = args.stop_ids.strip().lower() == "none"
        args.stop_id_list = () if none else tuple(int_list(args.stop_ids, "--stop-ids"))
        V = model.config.vocab_size
        bad = [t for t in args.stop_id_list if not 0 <= t < V]
        if bad:
            raise UsageError(f"--stop-ids: token ids out of range [0, {V}): {bad[:5]}")
    args.critical_list = int_list(args.critical_layers, "--critical-layers") if args.critical_layers else None
    return model, lora, tokenizer, turns, prompt, random_weights, model_name


def run_scheme(engine, scheme, args, tokenizer, turns, prompt, max_len, model_name):
    from lragent_jax.session import Session

    session = Session(engine, scheme, max_len=max_len, tokenizer=tokenizer, attention=args.attention,
                      naive_expansion=args.naive_expansion, critical_layers=args.critical_list,
                      model_name=model_name, stop_ids=args.stop_id_list, seed=args.seed)
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


def print_header(random_weights, model_name, prompt_tokens):
    if random_weights:
        print("NOTE: embedded demo model with RANDOM weights (seeded): the text below is noise; "
              "the cache sharing is real. Use --model/--adapter for real weights.")
    print(f"model: {model_name}   prompt: {prompt_tokens} tokens", flush=True)


def print_run(run, ns):
    """One scheme's turns and stats; ns: the non_shared run if it already ran (the =NS column)."""
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
          f"({st['trajectory_tokens']} tokens in {st['elapsed_s']:.2f} s, compile included)", flush=True)


def parse_schemes(text):
    from lragent_jax.schemes import SCHEMES, canonical_scheme

    if text.strip().lower() == "all":
        return list(SCHEMES)
    try:
        schemes = [canonical_scheme(s) for s in text.split(",") if s.strip()]
    except ValueError as e:
        raise UsageError(str(e)) from None
    if not schemes:
        raise UsageError("--scheme is empty")
    return list(dict.fromkeys(schemes))  # a scheme named twice runs once


def critical_layers_for(args, config, model_name):
    """The droidspeak layer set a Session would use (--critical-layers, else its default)."""
    from lragent_jax.config import preset_name
    from lragent_jax.schemes import DROIDSPEAK_LAYERS, check_critical_layers, default_critical_layers

    if args.critical_list:
        return check_critical_layers(args.critical_list, config.num_layers)
    name = model_name if model_name in DROIDSPEAK_LAYERS else preset_name(config)
    return default_critical_layers(config.num_layers, name)


def scheme_blockers(schemes, model, lora, args, max_len, model_name, blr_lora=None) -> dict:
    """{scheme: why it cannot run} for the requested schemes, found before any work: adapters
    without LoRA on v_proj or without a shared A, a bad droidspeak layer set, caches that do
    not fit the device's free memory."""
    from lragent_jax.lora import SharedAError
    from lragent_jax.memory import CacheMemoryError, check_cache_fits

    config, blocked = model.config, {}
    agents = len(lora.names) if lora is not None else 1
    base_lora = lora
    for scheme in schemes:
        lora = blr_lora if scheme == "base_lr_shared" and blr_lora is not None else base_lora  # --share-a
        try:
            if scheme in ("base_shared", "base_lr_shared"):
                if lora is None or "v" not in lora:
                    have = "no adapters are loaded" if lora is None else \
                        f"the adapters target {sorted(lora.projections)}"
                    raise ValueError(f"needs adapters with LoRA on v_proj; {have}")
                if scheme == "base_lr_shared":
                    lora.require_shared_a("v")
            critical = critical_layers_for(args, config, model_name) if scheme == "droidspeak" else ()
            check_cache_fits(scheme, config, max_len=max_len, what="--max-len", num_agents=agents,
                             dtype=model.dtype, value_rank=lora.value_rank() if lora is not None else 0,
                             num_critical=len(critical))
        except (SharedAError, CacheMemoryError, ValueError) as e:
            blocked[scheme] = str(e)
    return blocked


def _failure(e: BaseException) -> str:
    """One line for a scheme that failed while running."""
    text = (str(e.args[0]) if e.args else str(e)).strip().splitlines()
    first = text[0] if text else type(e).__name__
    if "RESOURCE_EXHAUSTED" in first or isinstance(e, MemoryError):
        return f"out of device memory: {first}"
    return first if isinstance(e, (ValueError, KeyError)) else f"{type(e).__name__}: {first}"


def make_engines(model, lora, blr_lora=None, mesh=None):
    """scheme -> Engine: base_lr_shared on the --share-a adapters when given, the rest on the loaded ones;
    sharded over `mesh` (--mesh) when given."""
    from lragent_jax.engine import Engine

    engine = Engine(model, lora, mesh=mesh)
    blr = Engine(model, blr_lora, mesh=mesh) if blr_lora is not None else engine
    return lambda scheme: blr if scheme == "base_lr_shared" else engine


# ---- the miniature demo: agents solving held-out questions ----------------------------------------
def run_episodes(engine, scheme, args, tokenizer, world, questions, max_len, model_name, on_episode):
    """Every question through the agent loop under one scheme; on_episode(record) as each ends."""
    import time

    from lragent_jax.session import Session
    from lragent_jax.task import make_tools, run_episode, score

    tools = make_tools(world)
    sampling = {} if args.greedy_episodes else dict(temperature=args.temperature, top_k=args.top_k,
                                                     top_p=args.top_p, seed=args.seed)
    episodes = []
    for q in questions:
        session = Session(engine, scheme, max_len=max_len, tokenizer=tokenizer, attention=args.attention,
                          naive_expansion=args.naive_expansion, critical_layers=args.critical_list,
                          model_name=model_name, seed=args.seed)
        t = time.perf_counter()
        res = run_episode(session, q.text, tools=tools, max_tokens_per_turn=args.episode_turn_tokens,
                          greedy=args.greedy_episodes, stop_ids=args.stop_id_list, **sampling)
        wall = time.perf_counter() - t
        sc = score(res.answer, q.answer)
        episodes.append({"question": q.text, "gold": q.answer, "answer": res.answer, "em": sc["em"], "f1": sc["f1"],
                         "stop_reason": res.stop_reason, "tool_calls": res.tool_calls,
                         "trajectory_tokens": res.trajectory_tokens, "turns": res.turns, "text": res.text,
                         "wall_s": wall, "stats": session.stats()})
        on_episode(episodes[-1])
    acc = sum(e["em"] for e in episodes) / len(episodes)
    return {"scheme": session.scheme_name, "accuracy": acc, "episodes": episodes}


def print_episode(ep, index, world):
    from lragent_jax.task import execute, make_tools

    tools = make_tools(world)
    print(f"\nQ{index}: {ep['question']}")
    for t in ep["turns"]:
        line = f"  {t['role']:<8}: {t['text'].strip()[:100]}"
        if t["role"] == "action":
            outcome = execute(t["text"], tools)
            if not outcome.finished:
                line += f"\n  {'tool':<8}: {outcome.observation[:90]}..."
        print(line)
    mark = "RIGHT" if ep["em"] else "WRONG"
    st = ep["stats"]
    print(f"  answer {ep['answer']!r} (gold {ep['gold']!r}): {mark}   {ep['tool_calls']} tool calls, "
          f"{ep['trajectory_tokens']} tokens, {ep['wall_s']:.2f} s (TTFT {1e3 * st['ttft_s']:.0f} ms), "
          f"cache {st['cache_bytes'] / 2**20:.2f} MiB, {ep['stop_reason']}", flush=True)


def episode_demo(args, schemes):
    """The default with the miniature shipped: --questions held-out test questions per scheme."""
    import jax.numpy as jnp

    from lragent_jax.miniature import load_miniature

    check_common(args)
    args.stop_id_list = None
    if args.stop_ids is not None:
        none = args.stop_ids.strip().lower() == "none"
        args.stop_id_list = () if none else tuple(int_list(args.stop_ids, "--stop-ids"))
    args.critical_list = int_list(args.critical_layers, "--critical-layers") if args.critical_layers else None
    # Greedy unless a sampling flag was changed from its default.
    args.greedy_episodes = args.greedy or (args.temperature, args.top_k, args.top_p) == (1.0, 0, 1.0)
    args.episode_turn_tokens = args.max_new_tokens if args.max_new_tokens != 32 else None
    flavour = "independent" if args.share_a_spec else "shared"
    try:
        model, lora, tokenizer, world = load_miniature(flavour, dtype=jnp.dtype(args.dtype or "float32"))
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    model_name = f"{MINIATURE_NAME} ({flavour} adapters)"
    try:
        blr_lora, share_report = apply_share_a(lora, args.share_a_spec) if args.share_a_spec else (None, None)
        max_len = args.max_len or model.config.max_position_embeddings
        blocked = scheme_blockers(schemes, model, lora, args, max_len, model_name, blr_lora)
        if len(blocked) == len(schemes):
            raise UsageError("; ".join(f"scheme {s}: {why}" for s, why in blocked.items()))
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    questions = world.questions["test"][: args.questions or DEMO_QUESTIONS]
    longest = max(len(tokenizer.encode(q.text)) for q in questions)
    if longest > max_len:
        print(f"error: a question of {longest} tokens is longer than --max-len {max_len}", file=sys.stderr)
        return 2
    errors = [{"scheme": s, "error": why} for s, why in blocked.items()]
    for err in errors:
        print(f"error: scheme {err['scheme']} cannot run: {err['error']}", file=sys.stderr, flush=True)
    if not args.json:
        print(f"model: {model_name}, trained (scripts/train_miniature.py); {len(questions)} held-out test "
              f"question{'s' if len(questions) != 1 else ''} per scheme, tools wiki[...] and calc[...]", flush=True)
        if share_report is not None:
            print_share_a(share_report)
    engines = make_engines(model, lora, blr_lora, args.mesh_obj)
    runs = []
    for scheme in schemes:
        if scheme in blocked:
            continue
        if not args.json:
            print(f"\n=== scheme {scheme} ===", flush=True)
        counter = iter(range(1, len(questions) + 1))
        show = (lambda ep: None) if args.json else (lambda ep: print_episode(ep, next(counter), world))
        try:
            run = run_episodes(engines(scheme), scheme, args, tokenizer, world, questions, max_len, model_name, show)
        except KeyboardInterrupt:
            raise
        except Exception as e:
            if not isinstance(e, (ValueError, KeyError)) and "RESOURCE_EXHAUSTED" not in str(e):
                traceback.print_exc()
            errors.append({"scheme": scheme, "error": _failure(e)})
            print(f"error: scheme {scheme} failed: {errors[-1]['error']}", file=sys.stderr, flush=True)
            continue
        runs.append(run)
        if not args.json:
            right = sum(int(e["em"]) for e in run["episodes"])
            print(f"scheme {run['scheme']}: {right}/{len(run['episodes'])} right "
                  f"({sum(e['wall_s'] for e in run['episodes']):.1f} s, compile included)", flush=True)
    if args.json:
        out = {"model": model_name, "random_weights": False, "questions": len(questions), "runs": runs,
               "errors": errors}
        if share_report is not None:
            out["share_a"] = share_report
        print(json.dumps(out))
    if errors and not args.json:
        print(f"error: {len(errors)} of {len(schemes)} schemes did not complete: "
              f"{', '.join(e['scheme'] for e in errors)}", file=sys.stderr)
    return 0 if not errors else (1 if runs else 2)


def main(argv=None):
    try:
        args = parse_args(sys.argv[1:] if argv is None else argv)
        args.share_a_spec = parse_share_a(args.share_a)
        args.mesh_obj = parse_mesh(args.mesh)
        schemes = parse_schemes(args.scheme or ("all" if args.model is None else "non_shared"))
        if args.max_len is not None and args.max_len < 2:
            raise UsageError(f"--max-len must be >= 2, got {args.max_len}")
        if args.questions is not None and args.questions < 1:
            raise UsageError(f"--questions must be >= 1, got {args.questions}")
        if miniature_default(args) and args.prompt is None and args.prompt_ids is None and not args.turn:
            return episode_demo(args, schemes)
        if args.questions is not None:
            raise UsageError("--questions is for the miniature demo (no --model, --prompt, --prompt-ids or --turn)")

        model, lora, tokenizer, turns, prompt, random_weights, model_name = build(args)
        blr_lora, share_report = apply_share_a(lora, args.share_a_spec) if args.share_a_spec else (None, None)
        need = len(prompt) + sum(n for _, n in turns)
        max_len = args.max_len or need
        if len(prompt) > max_len:
            raise UsageError(f"prompt of {len(prompt)} tokens is longer than --max-len {max_len}")
        if need > max_len:
            raise UsageError(f"prompt ({len(prompt)}) + turns ({need - len(prompt)}) = {need} tokens exceed "
                             f"--max-len {max_len}")
        blocked = scheme_blockers(schemes, model, lora, args, max_len, model_name, blr_lora)
        if len(blocked) == len(schemes):  # nothing can run: bad input, one line
            raise UsageError("; ".join(f"scheme {s}: {why}" for s, why in blocked.items()))
        engines = make_engines(model, lora, blr_lora, args.mesh_obj)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (ValueError, KeyError, FileNotFoundError, NotImplementedError) as e:
        print(f"error: {type(e).__name__}: {e.args[0] if e.args else e}", file=sys.stderr)
        return 2

    # Up front, before any work: the schemes that cannot run, and why.
    errors = [{"scheme": s, "error": why} for s, why in blocked.items()]
    for err in errors:
        print(f"error: scheme {err['scheme']} cannot run: {err['error']}", file=sys.stderr, flush=True)
    if not args.json:
        print_header(random_weights, model_name, len(prompt))
        if share_report is not None:
            print_share_a(share_report)
    runs, ns = [], None
    for scheme in schemes:
        if scheme in blocked:
            continue
        try:
            run = run_scheme(engines(scheme), scheme, args, tokenizer, turns, prompt, max_len, model_name)
        except KeyboardInterrupt:
            raise
        except Exception as e:  # one scheme failing must not lose the runs that finished
            if not isinstance(e, (ValueError, KeyError)) and "RESOURCE_EXHAUSTED" not in str(e):
                traceback.print_exc()  # not bad input: a bug to report, keep its traceback
            errors.append({"scheme": scheme, "error": _failure(e)})
            print(f"error: scheme {scheme} failed: {errors[-1]['error']}", file=sys.stderr, flush=True)
            continue
        runs.append(run)
        ns = run if scheme == "non_shared" else ns
        if not args.json:
            print_run(run, ns)
    if args.json:
        out = {"model": model_name, "random_weights": random_weights, "prompt_tokens": len(prompt),
               "runs": runs, "errors": errors}
        if share_report is not None:
            out["share_a"] = share_report
        print(json.dumps(out))
    if not errors:
        return 0
    if not args.json:  # the up-front lines may have scrolled away
        print(f"error: {len(errors)} of {len(schemes)} schemes did not complete: "
              f"{', '.join(e['scheme'] for e in errors)}", file=sys.stderr)
    return 1 if runs else 2


if __name__ == "__main__":
    sys.exit(main())
