#!/usr/bin/env python3
"""A plan / action / reflect agent loop (ReAct / AutoAct style) on one shared KV cache.

Three LoRA agents take turns on one trajectory held by a Session: the plan agent
writes a thought, the action agent writes an action such as `calc[2+3]` or
`wiki[athens]`, the tool's observation is appended, and at the end the reflect agent
writes a reflection. Tools are plain Python callables registered by name.

With no --model and the trained miniature shipped (lragent_jax/assets/miniature), it runs
the task's full loop (lragent_jax.task.run_episode) on the miniature: a held-out test
question (--question-index, or your own --question about its world) answered with real
wiki / calc tool calls, the answer marked right or wrong. Otherwise, and whenever
--scripted-action is given, it runs the loop below on the embedded demo (a tiny Llama
with RANDOM weights): its actions are noise, so the parser falls back to
--fallback-action and says so. Use
--scripted-action to drive a deterministic path through the tools: the action agent
still reads those tokens with its own adapter (teacher forcing via Session.score), so
the caches are exactly as if it had written them.

  python scripts/agents.py
  python scripts/agents.py --scripted-action "wiki[first modern olympics]" \\
      --scripted-action "calc[2025-1896]" --scripted-action "finish[Athens, 129 years ago]"
  python scripts/agents.py --model meta-llama/Llama-3.1-8B-Instruct --adapter plan=./plan \\
      --adapter action=./action --adapter reflect=./reflect --scheme base_shared --greedy

Exit code 2 with a one-line message on bad input.
"""

from __future__ import annotations

import argparse
import ast
import json
import operator
import os
import re
import sys

QUESTION = "Which city hosted the first modern Olympic Games, and how many years before 2025 was that?"


from lragent_jax.cli import DTYPES, UsageError, add_mesh_flag, load_agents, parse_mesh, strict_parser  # noqa: E402


# ---- tools: name -> callable(str) -> str -------------------------------------------------------
_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
        ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow,
        ast.USub: operator.neg, ast.UAdd: operator.pos}


def calculator(expression: str) -> str:
    """Arithmetic on numbers only (+ - * / // % ** and parentheses); never eval()."""

    def ev(node):
        if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)):
            return node.value
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            left, right = ev(node.left), ev(node.right)
            if isinstance(node.op, ast.Pow) and abs(right) > 100:
                raise ValueError("exponent too large")
            return _OPS[type(node.op)](left, right)
        if isinstance(node, ast.UnaryOp) and type(node.op) in _OPS:
            return _OPS[type(node.op)](ev(node.operand))
        raise ValueError(f"not arithmetic: {ast.dump(node)[:40]}")

    value = ev(ast.parse(expression.strip(), mode="eval").body)
    return str(int(value) if isinstance(value, float) and value.is_integer() else value)


WIKI = {
    "first modern olympics": "The first modern Olympic Games were held in Athens, Greece, in 1896.",
    "athens": "Athens is the capital of Greece. It hosted the Olympic Games in 1896 and 2004.",
    "paris": "Paris is the capital of France. It hosted the Olympic Games in 1900, 1924 and 2024.",
    "lora": "LoRA adapts a frozen weight W with a low-rank update s * A B of rank r.",
}


def wiki(query: str) -> str:
    """A tiny offline encyclopedia: the entry sharing the most words with the query."""
    words = set(re.findall(r"\w+", query.lower()))
    best = max(WIKI, key=lambda k: len(words & set(k.split())))
    return WIKI[best] if words & set(best.split()) else f"No entry for {query!r}. Entries: {', '.join(WIKI)}."


DEFAULT_TOOLS = {"calc": calculator, "wiki": wiki}
ACTION = re.compile(r"([A-Za-z_]\w*)\[([^\]\n]*)\]")


def parse_action(text: str, tools) -> tuple[str, str] | None:
    """The first `name[argument]` in text whose name is a tool or `finish`; None if there is none."""
    for m in ACTION.finditer(text):
        if m.group(1) in tools or m.group(1) == "finish":
            return m.group(1), m.group(2).strip()
    return None


# ---- the loop ----------------------------------------------------------------------------------
def run_loop(session, question, tools=DEFAULT_TOOLS, *, max_steps=3, plan_tokens=24, action_tokens=12,
             reflect_tokens=24, scripted_actions=(), fallback_action="wiki[first modern olympics]",
             greedy=False, log=lambda msg: None):
    """Drive plan -> action -> tool -> ... -> reflect on `session`; returns a dict of what happened."""
    tok = session.tokenizer

    def say(agent, n):  # the agent catches up on the shared trajectory and continues it
        return session.text(session.generate(agent, n, greedy=greedy)[0])

    session.append(f"Question: {question}\n")
    steps, answer = [], None
    for i in range(1, max_steps + 1):
        session.append(f"Thought {i}:")
        thought = say("plan", plan_tokens)
        session.append(f"\nAction {i}:")
        if i <= len(scripted_actions):  # the action agent reads a given action as if it wrote it
            action_text, source = " " + scripted_actions[i - 1], "scripted"
            session.score("action", tok.encode(action_text, add_special_tokens=False))
        else:
            action_text, source = say("action", action_tokens), "model"
        parsed = parse_action(action_text, tools)
        if parsed is None:
            log(f"step {i}: no action in {action_text!r}; falling back to {fallback_action}")
            session.append(f" -> {fallback_action}")
            parsed, source = parse_action(fallback_action, tools), "fallback"
        name, arg = parsed
        step = {"step": i, "thought": thought, "action_text": action_text, "source": source,
                "tool": name, "arg": arg, "observation": None}
        steps.append(step)
        if name == "finish":
            answer = arg
            break
        try:
            step["observation"] = str(tools[name](arg))
        except Exception as e:  # a tool error is an observation too
            step["observation"] = f"error: {type(e).__name__}: {e}"
        session.append(f"\nObservation {i}: {step['observation']}\n")
    session.append("\nReflection:")
    reflection = say("reflect", reflect_tokens)
    return {"question": question, "steps": steps, "answer": answer, "reflection": reflection}


# ---- command line --------------------------------------------------------------------------------
def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="HF hub id or local folder; default: the shipped trained miniature (lragent_jax/assets/miniature)")
    p.add_argument("--adapter", action="append", default=[], metavar="NAME=PATH",
                   help="PEFT LoRA adapter per agent; needs plan, action and reflect")
    p.add_argument("--scheme", default="base_lr_shared",
                   help="cache scheme: non_shared, full_shared, droidspeak, base_shared, base_lr_shared")
    p.add_argument("--question", default=None, help="the question (default: the miniature's test question "
                   "--question-index, or the Olympics question on the random demo)")
    p.add_argument("--question-index", type=int, default=0, help="miniature: which held-out test question")
    p.add_argument("--max-steps", type=int, default=3)
    p.add_argument("--plan-tokens", type=int, default=24)
    p.add_argument("--action-tokens", type=int, default=12)
    p.add_argument("--reflect-tokens", type=int, default=24)
    p.add_argument("--scripted-action", action="append", default=[], metavar="ACTION",
                   help="use ACTION (e.g. 'calc[2+3]') instead of generating at the next step; repeatable")
    p.add_argument("--fallback-action", default="wiki[first modern olympics]",
                   help="the action taken when none parses from the action agent's text")
    p.add_argument("--greedy", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-len", type=int, default=2048, help="cache capacity in tokens")
    p.add_argument("--dtype", default=None, choices=DTYPES)
    add_mesh_flag(p)
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout and nothing else")
    return strict_parser(p).parse_args(argv)


def make_session(args):
    from lragent_jax.engine import Engine
    from lragent_jax.session import Session

    model, lora, tokenizer, name, random_weights = load_agents(args.model, args.adapter, args.dtype, args.seed)
    if tokenizer is None:
        raise UsageError(f"{args.model!r} has no tokenizer files; the agent loop works on text")
    missing = [a for a in ("plan", "action", "reflect") if lora is None or a not in lora.names]
    if missing:
        raise UsageError(f"agents {missing} have no adapter; give --adapter plan=... action=... reflect=...")
    session = Session(Engine(model, lora, mesh=args.mesh_obj), args.scheme, max_len=args.max_len,
                      tokenizer=tokenizer, model_name=name, seed=args.seed)
    return session, name, random_weights


def use_miniature(args) -> bool:
    """No --model, no scripted actions, and the trained miniature is there."""
    from lragent_jax.miniature import assets_built

    return args.model is None and not args.adapter and not args.scripted_action and assets_built()


def run_miniature(args) -> int:
    """The task's loop (run_episode) on the miniature's shared-A agents, one question."""
    import jax.numpy as jnp

    from lragent_jax.engine import Engine
    from lragent_jax.miniature import load_miniature
    from lragent_jax.session import Session
    from lragent_jax.task import make_tools, run_episode, score

    model, lora, tok, world = load_miniature("shared", dtype=jnp.dtype(args.dtype or "float32"))
    test = world.questions["test"]
    if not 0 <= args.question_index < len(test):
        raise UsageError(f"--question-index must be in [0, {len(test)}), got {args.question_index}")
    q = test[args.question_index]
    question, gold = (q.text, q.answer) if args.question is None else (args.question, None)
    session = Session(Engine(model, lora, mesh=args.mesh_obj), args.scheme,
                      max_len=min(args.max_len, model.config.max_position_embeddings),
                      tokenizer=tok, model_name="miniature", seed=args.seed)
    # greedy: the trained agents are read greedily (the demo is deterministic)
    res = run_episode(session, question, tools=make_tools(world), max_steps=args.max_steps, greedy=True)
    em = score(res.answer, gold)["em"] if gold is not None else None
    result = {"model": "miniature", "random_weights": False, "scheme": session.scheme_name, "question": question,
              "gold": gold, "answer": res.answer, "em": em, "stop_reason": res.stop_reason,
              "tool_calls": res.tool_calls, "turns": res.turns, "trajectory_text": res.text, "stats": session.stats()}
    if args.json:
        print(json.dumps(result))
        return 0
    print(res.text, end="")
    verdict = "" if gold is None else f" (gold {gold!r}: {'RIGHT' if em else 'WRONG'})"
    st = result["stats"]
    print(f"-- answer: {res.answer!r}{verdict}, {res.stop_reason}\nscheme {st['scheme']}: {st['trajectory_tokens']} "
          f"trajectory tokens, {st['turns']} turns, {res.tool_calls} tool calls, catch-up {st['catch_up_tokens']} "
          f"tokens, cache {st['cache_bytes'] / 2**20:.2f} MiB")
    return 0


def main(argv=None):
    try:
        args = parse_args(sys.argv[1:] if argv is None else argv)
        args.mesh_obj = parse_mesh(args.mesh)
        for flag in ("max_steps", "plan_tokens", "action_tokens", "reflect_tokens"):
            if getattr(args, flag) < 1:
                raise UsageError(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
        if parse_action(args.fallback_action, DEFAULT_TOOLS) is None:
            raise UsageError(f"--fallback-action {args.fallback_action!r} is not tool[arg] with a tool in "
                             f"{sorted(DEFAULT_TOOLS)} or finish")
        if use_miniature(args):
            return run_miniature(args)
        args.question = QUESTION if args.question is None else args.question
        log = (lambda msg: print(f"note: {msg}", file=sys.stderr)) if args.json else (lambda msg: print(f"note: {msg}"))
        session, name, random_weights = make_session(args)
        if random_weights and not args.json:
            print("NOTE: embedded demo model with RANDOM weights: thoughts and actions are noise "
                  "(use --scripted-action, or --model/--adapter for real agents).")
        result = run_loop(session, args.question, max_steps=args.max_steps, plan_tokens=args.plan_tokens,
                          action_tokens=args.action_tokens, reflect_tokens=args.reflect_tokens,
                          scripted_actions=args.scripted_action, fallback_action=args.fallback_action,
                          greedy=args.greedy, log=log)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (ValueError, KeyError, OSError, NotImplementedError) as e:
        print(f"error: {type(e).__name__}: {e.args[0] if e.args else e}", file=sys.stderr)
        return 2
    result.update(model=name, random_weights=random_weights, scheme=session.scheme_name,
                  trajectory_text=session.text(session.trajectory[0]), stats=session.stats())
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"Question: {result['question']}")
    for s in result["steps"]:
        print(f"-- step {s['step']}\n  plan   : {s['thought']!r}\n  action : {s['action_text']!r} ({s['source']})")
        print(f"  finish : {s['arg']!r}" if s["tool"] == "finish" else
              f"  tool   : {s['tool']}[{s['arg']}] -> {s['observation']!r}")
    print(f"-- reflect: {result['reflection']!r}\nanswer: {result['answer']}")
    st = result["stats"]
    print(f"scheme {st['scheme']}: {st['trajectory_tokens']} trajectory tokens, {st['turns']} turns, "
          f"catch-up {st['catch_up_tokens']} tokens, cache {st['cache_bytes'] / 2**20:.2f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
