#!/usr/bin/env python3
"""Accuracy of the plan / action / reflect agents under each cache scheme, on held-out questions.

Every question of the split runs end to end through the agent loop (lragent_jax.task.loop
.run_episodes: tools, observations, final answer; greedy) under each configuration:

  non_shared, full_shared, droidspeak,        the shared-A adapters (adapters_shared/)
  base_shared, base_lr_shared
  indep/non_shared                            the independent adapters (adapters_independent/):
                                              the baseline of the two rows below
  indep+stack/base_lr_shared                  independent adapters made shared-A by
  indep+svd<R>/base_lr_shared                 share_a "stack" (exact) and "svd" (rank R)

Reported per configuration: exact match and F1 with 95% bootstrap intervals (percentile, numpy,
seeded; questions resampled with the same indices for every configuration, i.e. paired), the
paired difference to non_shared of the same adapter flavour with its interval, token agreement
with that non_shared run (fraction of generated tokens equal position by position, and where the
first difference falls), mean trajectory length, tool calls, stop reasons, tokens/s and cache
bytes (Session.stats). Then the paper's Tables 1-2 analogues: per layer, the cosine similarity
between agent pairs of the full value cache, the base cache X W_v, the adapter output s (X A) B
and the LR cache X A (lragent_jax.fidelity.value_similarity) on a few gold trajectories of the
split, for each adapter set.

One Engine per adapter set, reused by every question (each scheme compiles once), and one
Session per --batch questions (one question a row, run in lockstep by run_episodes: the rows
waiting for the same agent share one generate call; each row's episode is the one run_episode
gives it alone). Timings are the batch's, shared out evenly over its questions; cache bytes are
per trajectory (the batch's caches / batch). --batch defaults to 128 on a GPU / TPU and to 1 on
CPU, where lockstep rows cost more than they save (DEFAULT_BATCH says why).

  python scripts/eval_agents.py --miniature                       # 500 test questions, every configuration
  python scripts/eval_agents.py --miniature --batch 250 --out DIR  # on one GPU: 2 Sessions per configuration
  python scripts/eval_agents.py --model DIR --adapters DIR [--questions 500] [--svd-ranks 8,16]
  python scripts/eval_agents.py --model DIR --adapters DIR --quick       # CPU smoke run, 4 questions

--model DIR: an HF folder (config.json, model.safetensors, tokenizer.json); --adapters DIR holds
adapters_shared/{plan,action,reflect} and/or adapters_independent/{plan,action,reflect} (PEFT
folders); the configurations of a missing flavour are skipped with a note. The world (questions
and tools) is build_world(--world-seed, --world-config): it must be the one the model was trained
on. Writes results.json, episodes.jsonl (every episode), eval_agents_accuracy.png,
eval_agents_similarity.png and fidelity_snippet.md (for docs/fidelity.md) into --out (default
results/eval_agents/<UTC time> under the current folder, git-ignored in the repository). Exit code 2 with one line on
bad input.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import datetime
import json
import math
import os
import sys
import time


import numpy as np  # noqa: E402

from lragent_jax.cli import DTYPES, UsageError, int_list, positive_int_list, strict_parser  # noqa: E402

FLAVOURS = {"shared": "adapters_shared", "independent": "adapters_independent"}
ROLES = ("plan", "action", "reflect")
KIND_LABELS = {"full": "full V", "base": "base X W_v", "adapter": "adapter s(XA)B", "lr": "LR X A"}
PAPER_SIMILARITY = "paper (Llama-3.1-8B, Table 1-2): full 0.958, base 0.973, adapter 0.054, LR ~0.95 with shared A"
QUICK = dict(questions=4, max_steps=2, turn_tokens="plan=32,action=24,reflect=32", max_len=1024,
             similarity_questions=1, resamples=1000, svd_ranks="8", warmup=0, prefill_buckets="64", batch=2)
DEFAULTS = dict(questions=500, max_steps=6, turn_tokens=None, max_len=2048, similarity_questions=4,
                resamples=10000, svd_ranks="8", warmup=1, prefill_buckets=None, batch=None)
# --batch by backend when not given. An accelerator runs a turn of many rows in about the time of one
# (launch- and bandwidth-bound at these sizes). The CPU is compute-bound, and a lockstep batch pays
# for every row's padding to the longest row and for rows idle in a turn (on the miniature, batch 16
# processed 4.2x the real prefill tokens against 1.6x at batch 1, and ran ~2x fewer questions/s).
DEFAULT_BATCH = {"cpu": 1, "accelerator": 128}


# ---- configurations ---------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Config:
    name: str
    flavour: str  # "shared" | "independent": which adapters were trained
    adapter_set: str  # "shared", "independent", "independent+stack", "independent+svd8"
    scheme: str
    baseline: str  # the non_shared configuration of the same flavour (paired differences, agreement)


def configurations(svd_ranks, rerun_baseline: bool = False) -> list:
    out = [Config(s, "shared", "shared", s, "non_shared")
           for s in ("non_shared", "full_shared", "droidspeak", "base_shared", "base_lr_shared")]
    if rerun_baseline:  # determinism check: must agree with non_shared token for token
        out.insert(1, Config("non_shared#rerun", "shared", "shared", "non_shared", "non_shared"))
    out.append(Config("indep/non_shared", "independent", "independent", "non_shared", "indep/non_shared"))
    out.append(Config("indep+stack/base_lr_shared", "independent", "independent+stack", "base_lr_shared",
                      "indep/non_shared"))
    out += [Config(f"indep+svd{r}/base_lr_shared", "independent", f"independent+svd{r}", "base_lr_shared",
                   "indep/non_shared") for r in svd_ranks]
    return out


# ---- statistics -------------------------------------------------------------------------------
def bootstrap_indices(n: int, resamples: int, seed: int) -> np.ndarray:
    """[resamples, n] question indices drawn with replacement; one matrix for every configuration,
    so intervals of differences are paired."""
    if n < 1 or resamples < 1:
        raise ValueError(f"bootstrap needs n >= 1 and resamples >= 1, got n={n}, resamples={resamples}")
    return np.random.default_rng(seed).integers(0, n, size=(resamples, n))


def bootstrap_interval(values, indices: np.ndarray, confidence: float = 0.95) -> dict:
    """{"mean", "lo", "hi"}: the mean of `values` [n] and the percentile interval of the resampled
    means (np.percentile, linear interpolation) at `confidence`."""
    values = np.asarray(values, np.float64)
    if values.ndim != 1 or indices.ndim != 2 or indices.max(initial=0) >= len(values):
        raise ValueError(f"values [n] and indices [resamples, n] with entries < n expected, got {values.shape} "
                         f"and {indices.shape}")
    means = values[indices].mean(axis=1)
    tail = 100 * (1 - confidence) / 2
    lo, hi = np.percentile(means, [tail, 100 - tail])
    return {"mean": float(values.mean()), "lo": float(lo), "hi": float(hi)}


def paired_difference(a, b, indices: np.ndarray, confidence: float = 0.95) -> dict:
    """Mean of a - b per question with its paired bootstrap interval (same resampled questions)."""
    return bootstrap_interval(np.asarray(a, np.float64) - np.asarray(b, np.float64), indices, confidence)


# ---- inputs -----------------------------------------------------------------------------------
def parse_turn_tokens(text):
    if text is None:
        return None
    out = {}
    for part in text.split(","):
        role, sep, n = part.partition("=")
        role = role.strip()
        if not sep or role not in ROLES:
            raise UsageError(f"--turn-tokens expects ROLE=N,... with ROLE in {', '.join(ROLES)}, got {text!r}")
        try:
            out[role] = int(n)
        except ValueError:
            raise UsageError(f"--turn-tokens {text!r}: {n!r} is not an integer") from None
        if out[role] < 1:
            raise UsageError(f"--turn-tokens {text!r}: token limits must be >= 1")
    return out


def load_inputs(args):
    """({flavour: (model, lora)}, tokenizer, world, model name)."""
    import jax.numpy as jnp

    from lragent_jax.task.world import SMALL_CONFIG, WorldConfig, build_world

    dtype = jnp.dtype(args.dtype)
    if args.miniature:
        if args.model or args.adapters:
            raise UsageError("--miniature loads the shipped miniature: give it without --model / --adapters")
        try:
            from lragent_jax.miniature import load_miniature
        except ImportError as e:
            if e.name not in ("lragent_jax.miniature",):
                raise
            raise UsageError("--miniature needs lragent_jax.miniature (the shipped miniature model), which this "
                             "checkout does not have; use --model DIR --adapters DIR") from None
        flavours = {}
        for flavour in FLAVOURS:
            model, lora, tokenizer, world = load_miniature(flavour=flavour, dtype=dtype)
            flavours[flavour] = (model, lora)
        return flavours, tokenizer, world, "miniature"
    if not args.model or not args.adapters:
        raise UsageError("give --model DIR --adapters DIR (adapters_shared/ and adapters_independent/ inside), "
                         "or --miniature")
    from lragent_jax import loading

    for path, flag in ((args.model, "--model"), (args.adapters, "--adapters")):
        if not os.path.isdir(path):
            raise UsageError(f"{flag} {path!r} is not a folder")
    model = loading.load_model(args.model, dtype=dtype)
    tokenizer = loading.load_tokenizer(args.model)
    if tokenizer is None:
        raise UsageError(f"--model {args.model!r} has no tokenizer.json; the agent loop works on text")
    flavours = {}
    for flavour, sub in FLAVOURS.items():
        folder = os.path.join(args.adapters, sub)
        if not os.path.isdir(folder):
            print(f"note: {folder} does not exist: the {flavour} adapters' configurations are skipped",
                  file=sys.stderr)
            continue
        missing = [r for r in ROLES if not os.path.isdir(os.path.join(folder, r))]
        if missing:
            raise UsageError(f"{folder}: no adapter folder for {', '.join(missing)} (need {', '.join(ROLES)})")
        lora = loading.load_adapters({r: os.path.join(folder, r) for r in ROLES}, model, dtype=dtype)
        flavours[flavour] = (model, lora)
    if not flavours:
        raise UsageError(f"--adapters {args.adapters!r} holds neither {' nor '.join(FLAVOURS.values())}")
    config = SMALL_CONFIG if args.world_config == "small" else WorldConfig()
    return flavours, tokenizer, build_world(args.world_seed, config), os.path.basename(os.path.normpath(args.model))


def adapter_sets(flavours, svd_ranks) -> tuple:
    """({set name: (model, lora)}, {set name: share_a report}) for every set the flavours allow."""
    from lragent_jax.share_a import share_a

    sets, reports = {}, {}
    for flavour, (model, lora) in flavours.items():
        sets[flavour] = (model, lora)
    if "independent" in flavours:
        model, lora = flavours["independent"]
        total = sum(c.rank for c in lora.configs)
        stacked, reports["independent+stack"] = share_a(lora, "stack")
        sets["independent+stack"] = (model, stacked)
        for r in svd_ranks:
            if r > total:
                raise UsageError(f"--svd-ranks {r}: the independent adapters' stack has rank {total}; "
                                 f"choose ranks 1..{total}")
            sets[f"independent+svd{r}"] = (model, None)  # built when first needed (rank R compresses)
            reports[f"independent+svd{r}"] = None
    return sets, reports


def _materialise(sets, reports, name):
    from lragent_jax.share_a import share_a

    model, lora = sets[name]
    if lora is None:  # independent+svd<R>
        rank = int(name.rsplit("svd", 1)[1])
        lora, reports[name] = share_a(sets["independent"][1], "svd", rank)
        sets[name] = (model, lora)
    return sets[name]


# ---- running ----------------------------------------------------------------------------------
def run_batch(engine, config, questions, tools, tokenizer, args, limits, critical, batch) -> list:
    """One record per question: the questions run as the rows of one Session of `batch` rows."""
    from lragent_jax.session import Session
    from lragent_jax.task.loop import run_episodes, score

    session = Session(engine, config.scheme, batch=batch, max_len=args.max_len, tokenizer=tokenizer,
                      attention=args.attention, critical_layers=critical, seed=args.seed)
    t0 = time.perf_counter()
    results = run_episodes(session, [q.text for q in questions], tools=tools, max_steps=args.max_steps,
                           max_tokens_per_turn=limits, greedy=True)
    share = 1 / len(questions)  # the batch's time, shared out evenly
    wall = (time.perf_counter() - t0) * share
    stats = session.stats()
    records = []
    for q, result in zip(questions, results):
        s = score(result.answer, q.answer)
        generated = [int(t) for turn in result.turns for t in turn["ids"]]  # every token an agent generated
        records.append({
            "config": config.name, "question": q.text, "gold": q.answer, "template": q.template,
            "answer": result.answer, "em": s["em"], "f1": s["f1"], "stop_reason": result.stop_reason,
            "tool_calls": result.tool_calls, "trajectory_tokens": result.trajectory_tokens,
            "generated": generated, "wall_s": wall, "batch": batch,
            "stats": {"generated_tokens": len(generated),
                      "catch_up_tokens": sum(t.get("catch_up_tokens", 0) for t in result.turns),
                      "new_tokens": sum(t.get("new_tokens", 0) for t in result.turns),
                      **{k: stats[k] * share for k in ("prefill_s", "decode_s", "elapsed_s")},
                      "cache_bytes": session.cache_bytes // session.batch},
            "text": result.text,
        })
    return records


def run_questions(engine, config, questions, tools, tokenizer, args, batch, on_batch=None) -> list:
    """Records of every question, in order, `batch` at a time (every Session has `batch` rows, the
    last one's spare rows empty, so one set of compiled programs serves them all)."""
    records = []
    for lo in range(0, len(questions), batch):
        records += run_batch(engine, config, questions[lo: lo + batch], tools, tokenizer, args, args.turn_limits,
                             args.critical, batch)
        if on_batch is not None:
            on_batch(records)
    return records


def summarise(config, records, baseline_records, indices, warmup_records) -> dict:
    from lragent_jax.fidelity import compare_tokens

    em = np.array([r["em"] for r in records])
    f1 = np.array([r["f1"] for r in records])
    base_em = np.array([r["em"] for r in baseline_records])
    base_f1 = np.array([r["f1"] for r in baseline_records])
    agreements, firsts = [], []
    for r, b in zip(records, baseline_records):
        agree, first = compare_tokens(r["generated"], b["generated"])
        agreements.append(agree)
        firsts.append(first)
    diverged = [f for f in firsts if f is not None]
    gen = sum(r["stats"]["generated_tokens"] for r in records)
    traj = sum(r["trajectory_tokens"] for r in records)
    elapsed = sum(r["stats"]["elapsed_s"] for r in records)
    return {
        "name": config.name, "flavour": config.flavour, "adapter_set": config.adapter_set, "scheme": config.scheme,
        "baseline": config.baseline, "questions": len(records),
        "em": bootstrap_interval(em, indices), "f1": bootstrap_interval(f1, indices),
        "em_diff": paired_difference(em, base_em, indices), "f1_diff": paired_difference(f1, base_f1, indices),
        "token_agreement": {
            "mean": float(np.mean(agreements)),  # mean over questions of the per-question fraction
            "identical_fraction": float(np.mean([f is None for f in firsts])),
            "first_divergence_median": float(np.median(diverged)) if diverged else None,
            "first_divergence_mean": float(np.mean(diverged)) if diverged else None,
            "per_question": agreements, "first_divergence": firsts,
        },
        "trajectory_tokens_mean": traj / len(records),
        "generated_tokens_mean": gen / len(records),
        "tool_calls_mean": float(np.mean([r["tool_calls"] for r in records])),
        "stop_reasons": dict(collections.Counter(r["stop_reason"] for r in records)),
        "catch_up_tokens_mean": float(np.mean([r["stats"]["catch_up_tokens"] for r in records])),
        "generated_tokens_per_s": gen / elapsed if elapsed > 0 else 0.0,
        "trajectory_tokens_per_s": traj / elapsed if elapsed > 0 else 0.0,
        "session_s_mean": elapsed / len(records),
        "wall_s_mean": float(np.mean([r["wall_s"] for r in records])),
        "warmup_questions": len(warmup_records),
        "warmup_wall_s": float(sum(r["wall_s"] for r in warmup_records)),
        "cache_bytes": int(records[0]["stats"]["cache_bytes"]),
    }


def similarity(engines, tokenizer, world, split, n, progress) -> dict:
    """Per adapter set: token-weighted mean over n gold trajectories of value_similarity's per-layer
    numbers (each is a mean over tokens, so the weighting pools the tokens)."""
    from lragent_jax.fidelity import value_similarity
    from lragent_jax.task.episodes import gold_segments
    from lragent_jax.task.tokenizer import encode_segments
    from lragent_jax.task.tools import make_tools

    tools = make_tools(world)
    trajectories = [encode_segments(tokenizer, gold_segments(world, q, tools), add_eos=False)[0].tolist()
                    for q in world.questions[split][:n]]
    out = {}
    for name, engine in progress(list(engines.items()), desc="similarity"):
        sums, weights, ratio, shared_a = {}, {}, [], True
        for tokens in trajectories:
            sim = value_similarity(engine, tokens)
            shared_a &= sim.shared_a
            for kind, per_layer in sim.per_layer.items():
                ok = ~np.isnan(per_layer)
                sums.setdefault(kind, np.zeros_like(per_layer))
                weights.setdefault(kind, np.zeros_like(per_layer))
                sums[kind][ok] += per_layer[ok] * sim.num_tokens
                weights[kind][ok] += sim.num_tokens
            ratio.append(sim.adapter_norm_ratio * sim.num_tokens)
        with np.errstate(invalid="ignore", divide="ignore"):
            per_layer = {k: np.where(weights[k] > 0, sums[k] / weights[k], np.nan) for k in sums}
        total = sum(len(t) for t in trajectories)
        out[name] = {
            "per_layer": {k: _nan_to_none(v) for k, v in per_layer.items()},
            "average": {k: _nan_to_none(_nanmean(v)) for k, v in per_layer.items()},
            "adapter_norm_ratio": _nan_to_none(np.sum(ratio, axis=0) / total),
            "shared_a": bool(shared_a), "trajectories": len(trajectories), "tokens": total,
        }
    return out


def _nanmean(x):
    x = np.asarray(x, np.float64)
    return float(x[~np.isnan(x)].mean()) if (~np.isnan(x)).any() else float("nan")


def _nan_to_none(x):
    if np.ndim(x) == 0:
        x = float(x)
        return x if math.isfinite(x) else None
    return [_nan_to_none(v) for v in np.asarray(x, np.float64)]


# ---- reporting --------------------------------------------------------------------------------
def _ci(d, signed=False):
    f = (lambda x: f"{100 * x:+.1f}") if signed else (lambda x: f"{100 * x:.1f}")
    return f"{f(d['mean'])} [{f(d['lo'])}, {f(d['hi'])}]"


def table_rows(results) -> list:
    rows = []
    for c in results["configurations"].values():
        ta = c["token_agreement"]
        fd = "-" if ta["first_divergence_median"] is None else f"{ta['first_divergence_median']:.0f}"
        stops = " ".join(f"{k}:{v}" for k, v in sorted(c["stop_reasons"].items()))
        rows.append([c["name"], _ci(c["em"]), _ci(c["em_diff"], signed=True), _ci(c["f1"]),
                     _ci(c["f1_diff"], signed=True), f"{ta['mean']:.3f}", f"{ta['identical_fraction']:.2f}", fd,
                     f"{c['trajectory_tokens_mean']:.0f}", f"{c['tool_calls_mean']:.2f}",
                     f"{c['generated_tokens_per_s']:.0f}", f"{c['cache_bytes'] / 2 ** 20:.2f}", stops])
    return rows


HEADER = ["configuration", "EM % [95% CI]", "ΔEM vs NS", "F1 % [95% CI]", "ΔF1 vs NS", "tok agree", "identical",
          "1st div", "traj tok", "tools", "gen tok/s", "cache MiB", "stop reasons"]


def print_table(results):
    rows = table_rows(results)
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(HEADER)]
    print("  ".join(h.ljust(w) for h, w in zip(HEADER, widths)))
    for r in rows:
        print("  ".join(x.ljust(w) for x, w in zip(r, widths)))
    m = results["meta"]
    print(f"({m['questions']} {m['split']} questions; EM/F1 in %, intervals: 95% paired bootstrap percentile, "
          f"{m['resamples']} resamples; Δ vs the non_shared run of the same adapters; tok agree: generated tokens "
          f"equal to that run's, position by position; 1st div: median first differing token among diverged "
          f"questions; cache: preallocated for max_len={m['max_len']})")
    for name, sim in results["similarity"].items():
        av = sim["average"]
        vals = "  ".join(f"{KIND_LABELS[k]} {_fmt(av.get(k))}" for k in KIND_LABELS)
        print(f"similarity [{name}{'' if sim['shared_a'] else ', A not shared: LR not comparable'}]: {vals}")
    print(PAPER_SIMILARITY)


def _fmt(x, spec=".3f"):
    return "n/a" if x is None else format(x, spec)


def markdown_snippet(results) -> str:
    m = results["meta"]
    lines = [
        f"<!-- generated by scripts/eval_agents.py on {m['date']} ({m['backend']}, jax {m['jax_version']}); "
        f"copy eval_agents_accuracy.png and eval_agents_similarity.png next to this file -->",
        f"### Accuracy per scheme ({m['model']}, {m['questions']} {m['split']} questions, greedy)",
        "",
        "Exact match and F1 in %, with 95% bootstrap intervals (percentile, "
        f"{m['resamples']} paired resamples of the questions, seed {m['seed']}); Δ: the paired difference to "
        "non_shared on the same adapters (shared-A rows against `non_shared`, `indep` rows against "
        "`indep/non_shared`). Token agreement: generated tokens equal to that non_shared run's, position by "
        "position (mean over questions); identical: fraction of questions with no differing token.",
        "",
        "| configuration | EM | ΔEM | F1 | ΔF1 | token agreement | identical | traj. tokens | tool calls | "
        "gen. tokens/s | cache MiB | stop reasons |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for c in results["configurations"].values():
        ta = c["token_agreement"]
        lines.append(f"| `{c['name']}` | {_ci(c['em'])} | {_ci(c['em_diff'], signed=True)} | {_ci(c['f1'])} | "
                     f"{_ci(c['f1_diff'], signed=True)} | {ta['mean']:.3f} | {ta['identical_fraction']:.2f} | "
                     f"{c['trajectory_tokens_mean']:.0f} | {c['tool_calls_mean']:.2f} | "
                     f"{c['generated_tokens_per_s']:.0f} | {c['cache_bytes'] / 2 ** 20:.2f} | "
                     f"{', '.join(f'{k} {v}' for k, v in sorted(c['stop_reasons'].items()))} |")
    for name, rep in results["share_a"].items():
        if rep:
            kept = ", ".join(f"{a} {100 * f:.1f}%" for a, f in rep["kept"].items())
            lines.append(f"\n`{name}`: share_a {rep['method']} rank {rep['rank']}, delta weights kept: {kept}.")
    lines += ["", "![accuracy per scheme](eval_agents_accuracy.png)", "",
              f"### Value-cache similarity between agents (Tables 1-2 analogue; "
              f"{m['similarity_questions']} gold {m['split']} trajectories)", "",
              "Mean over agent pairs and tokens of the cosine similarity, averaged over layers "
              "(per layer in the figure and results.json).", "",
              "| adapters | A shared | full V | base X W_v | adapter s(XA)B | LR X A "
              "| mean ‖adapter‖ / ‖base‖ |",
              "|---|---|---|---|---|---|---|"]
    for name, sim in results["similarity"].items():
        av = sim["average"]
        lr = _fmt(av.get("lr")) + ("" if sim["shared_a"] else " (not comparable)")
        lines.append(f"| {name} | {'yes' if sim['shared_a'] else 'no'} | {_fmt(av.get('full'))} | "
                     f"{_fmt(av.get('base'))} | {_fmt(av.get('adapter'))} | {lr} | "
                     f"{_fmt(_nanmean([np.nan if x is None else x for x in sim['adapter_norm_ratio']]))} |")
    lines += [f"| {PAPER_SIMILARITY.split(':')[0]} | | 0.958 | 0.973 | 0.054 | ~0.95 (shared A) | |", "",
              "![similarity per layer](eval_agents_similarity.png)", ""]
    return "\n".join(lines)


def plot(results, out_dir) -> list:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("warning: matplotlib is not installed; no PNG written (pip install matplotlib)", file=sys.stderr)
        return []
    written = []
    import matplotlib.ticker

    confs = list(results["configurations"].values())
    x = np.arange(len(confs))
    names = [c["name"] for c in confs]
    fig, (ax, dax) = plt.subplots(1, 2, figsize=(max(9, 2 * len(confs)), 4.2))
    for off, metric, label in ((-0.18, "em", "exact match"), (0.18, "f1", "F1")):
        for axis, key in ((ax, metric), (dax, f"{metric}_diff")):
            mean = np.array([100 * c[key]["mean"] for c in confs])
            err = np.array([[100 * (c[key]["mean"] - c[key]["lo"]) for c in confs],
                            [100 * (c[key]["hi"] - c[key]["mean"]) for c in confs]])
            axis.bar(x + off, mean, 0.36, yerr=err, capsize=3, label=label)
    m = results["meta"]
    ax.set_ylabel("% of questions (95% bootstrap CI)")
    ax.set_title(f"{m['model']}: {m['questions']} {m['split']} questions", fontsize=9)
    ax.set_ylim(0, 105)
    dax.set_ylabel("points vs non_shared, same adapters (paired 95% CI)")
    dax.set_title("paired difference to non_shared", fontsize=9)
    dax.axhline(0, color="gray", lw=0.5)
    for axis in (ax, dax):
        axis.set_xticks(x, names, rotation=30, ha="right", fontsize=8)
        axis.legend(fontsize=8)
    fig.tight_layout()
    path = os.path.join(out_dir, "eval_agents_accuracy.png")
    fig.savefig(path, dpi=120)
    plt.close(fig)
    written.append(path)

    sims = results["similarity"]
    if sims:
        fig, axes = plt.subplots(1, len(sims), figsize=(4.5 * len(sims), 3.6), squeeze=False)
        for ax, (name, sim) in zip(axes[0], sims.items()):
            for kind, label in KIND_LABELS.items():
                ys = [np.nan if y is None else y for y in sim["per_layer"].get(kind, [])]
                ax.plot(range(len(ys)), ys, marker="o", label=label)
            ax.set_title(f"{name} (A {'shared' if sim['shared_a'] else 'not shared'})", fontsize=9)
            ax.set_xlabel("layer")
            ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
            ax.axhline(0, color="gray", lw=0.5)
        axes[0][0].set_ylabel("cosine similarity between agents")
        axes[0][0].legend(fontsize=7)
        fig.tight_layout()
        path = os.path.join(out_dir, "eval_agents_similarity.png")
        fig.savefig(path, dpi=120)
        plt.close(fig)
        written.append(path)
    return written


# ---- command line -----------------------------------------------------------------------------
def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_argument_group("model and adapters")
    src.add_argument("--model", metavar="DIR", help="HF model folder with tokenizer.json")
    src.add_argument("--adapters", metavar="DIR",
                     help="folder holding adapters_shared/{plan,action,reflect} and/or adapters_independent/{...}")
    src.add_argument("--miniature", action="store_true",
                     help="the shipped miniature (lragent_jax.miniature.load_miniature, both flavours and its world)")
    src.add_argument("--world-seed", type=int, default=0, help="build_world seed (not used with --miniature)")
    src.add_argument("--world-config", choices=("default", "small"), default="default",
                     help="WorldConfig() or SMALL_CONFIG (not used with --miniature)")
    src.add_argument("--dtype", default="float32", choices=DTYPES, help="parameter and cache dtype (float32)")
    run = p.add_argument_group("what runs")
    run.add_argument("--split", default="test", choices=("test", "validation", "train"))
    run.add_argument("--questions", type=int, default=None,
                     help=f"the first N questions of the split (default {DEFAULTS['questions']}, quick "
                          f"{QUICK['questions']})")
    run.add_argument("--configs", default=None,
                     help="comma list of configuration names (default all; the non_shared baselines they "
                          "compare with are added)")
    run.add_argument("--svd-ranks", default=None,
                     help=f"ranks of the share_a svd rows, comma list (default {DEFAULTS['svd_ranks']})")
    run.add_argument("--rerun-baseline", action="store_true",
                     help="run non_shared twice (row non_shared#rerun): a determinism check, agreement must be 1")
    run.add_argument("--max-steps", type=int, default=None,
                     help=f"tool calls before reflect must answer (default {DEFAULTS['max_steps']}, quick "
                          f"{QUICK['max_steps']})")
    run.add_argument("--turn-tokens", default=None, metavar="ROLE=N,...",
                     help="token limit per turn, e.g. plan=96,action=48,reflect=96 (default: the loop's "
                          f"DEFAULT_TURN_TOKENS; quick {QUICK['turn_tokens']})")
    run.add_argument("--batch", type=int, default=None,
                     help=f"questions per Session, run in lockstep (default {DEFAULT_BATCH['accelerator']} on a "
                          f"GPU / TPU, {DEFAULT_BATCH['cpu']} on CPU; quick {QUICK['batch']}); the caches hold "
                          "batch x max-len tokens per agent")
    run.add_argument("--max-len", type=int, default=None,
                     help=f"cache capacity per Session (default {DEFAULTS['max_len']}, quick {QUICK['max_len']})")
    run.add_argument("--critical-layers", default=None, help="droidspeak critical layers (default: a third)")
    run.add_argument("--attention", default="auto", choices=("auto", "xla", "pallas"))
    run.add_argument("--prefill-buckets", default=None, metavar="N,...",
                     help="the Engines' prefill chunk lengths (default: the Engine's; quick 64: one compiled "
                          "prefill per scheme)")
    run.add_argument("--warmup", type=int, default=None,
                     help="questions of another split run first per configuration and not counted, so compiles "
                          f"stay out of tokens/s (default {DEFAULTS['warmup']}, quick {QUICK['warmup']})")
    run.add_argument("--similarity-questions", type=int, default=None,
                     help=f"gold trajectories for the similarity tables (default {DEFAULTS['similarity_questions']}, "
                          f"quick {QUICK['similarity_questions']}; 0 skips them)")
    run.add_argument("--resamples", type=int, default=None,
                     help=f"bootstrap resamples (default {DEFAULTS['resamples']}, quick {QUICK['resamples']})")
    run.add_argument("--seed", type=int, default=0, help="bootstrap seed (decoding is greedy)")
    run.add_argument("--quick", action="store_true", help="CPU smoke run: small defaults (see each flag)")
    out = p.add_argument_group("output")
    out.add_argument("--out", metavar="DIR", help="output folder (default results/eval_agents/<UTC time>)")
    out.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = strict_parser(p).parse_args(argv)
    base = QUICK if args.quick else DEFAULTS
    for key, value in base.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    for flag in ("questions", "max_len", "resamples", "batch"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            raise UsageError(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    for flag in ("max_steps", "warmup", "similarity_questions"):
        if getattr(args, flag) < 0:
            raise UsageError(f"--{flag.replace('_', '-')} must be >= 0, got {getattr(args, flag)}")
    args.svd_ranks = positive_int_list(args.svd_ranks, "--svd-ranks") if args.svd_ranks else []
    args.turn_limits = parse_turn_tokens(args.turn_tokens)
    args.buckets = positive_int_list(args.prefill_buckets, "--prefill-buckets") if args.prefill_buckets else None
    args.critical = int_list(args.critical_layers, "--critical-layers") if args.critical_layers else None
    return args


def select_configs(args, available_sets) -> list:
    every = configurations(args.svd_ranks, args.rerun_baseline)
    by_name = {c.name: c for c in every}
    if args.configs:
        wanted = [s.strip() for s in args.configs.split(",") if s.strip()]
        bad = [w for w in wanted if w not in by_name]
        if bad:
            raise UsageError(f"--configs: unknown {', '.join(bad)}; known: {', '.join(by_name)}")
        names = set(wanted) | {by_name[w].baseline for w in wanted}
        every = [c for c in every if c.name in names]
    chosen = []
    for c in every:
        if c.flavour in available_sets:
            chosen.append(c)
        else:
            print(f"note: skipping {c.name}: no {c.flavour} adapters", file=sys.stderr)
    return chosen


def evaluate(args) -> dict:
    import jax

    from lragent_jax.engine import Engine
    from lragent_jax.task.tools import make_tools

    progress = _progress(not args.no_progress)
    flavours, tokenizer, world, model_name = load_inputs(args)
    questions = world.questions[args.split]
    if len(questions) < args.questions:
        raise UsageError(f"split {args.split!r} of this world has {len(questions)} questions; --questions "
                         f"{args.questions} asks for more")
    questions = questions[: args.questions]
    warm_split = "validation" if args.split != "validation" else "train"
    warmup_qs = world.questions[warm_split][: args.warmup]
    configs = select_configs(args, flavours)
    sets, share_reports = adapter_sets(flavours, [r for r in args.svd_ranks
                                                  if any(c.adapter_set == f"independent+svd{r}" for c in configs)])
    engines = {}
    tools = make_tools(world)
    records, summaries = {}, {}
    indices = bootstrap_indices(len(questions), args.resamples, args.seed)
    batch = min(args.batch or DEFAULT_BATCH["cpu" if jax.default_backend() == "cpu" else "accelerator"],
                len(questions))
    started = time.perf_counter()
    for config in configs:
        if config.adapter_set not in engines:
            model, lora = _materialise(sets, share_reports, config.adapter_set)
            engines[config.adapter_set] = Engine(model, lora, **({"prefill_buckets": tuple(args.buckets)}
                                                                 if args.buckets else {}))
        engine = engines[config.adapter_set]
        # the warm-up runs at the same batch, so it compiles the programs the questions use
        warm = run_questions(engine, config, warmup_qs, tools, tokenizer, args, batch)
        bar = progress(None, desc=config.name, total=len(questions))

        def advance(recs):
            bar.update(len(recs) - bar.n)
            bar.set_postfix(em=f"{np.mean([r['em'] for r in recs]):.2f}")

        records[config.name] = run_questions(engine, config, questions, tools, tokenizer, args, batch, advance)
        bar.close()
        recs = records[config.name]
        summaries[config.name] = summarise(config, recs, records[config.baseline], indices, warm)
    for name in list(engines):  # value_similarity needs two or more agents with adapters
        if name.startswith("independent+svd"):
            engines.pop(name)
    sim = similarity(engines, tokenizer, world, args.split, args.similarity_questions,
                     progress) if args.similarity_questions else {}
    meta = {
        "model": model_name, "split": args.split, "questions": len(questions), "world_seed": world.seed,
        "world_config": dataclasses.asdict(world.config), "dtype": args.dtype, "max_len": args.max_len,
        "max_steps": args.max_steps, "turn_tokens": args.turn_limits, "resamples": args.resamples,
        "seed": args.seed, "confidence": 0.95, "similarity_questions": args.similarity_questions,
        "warmup": args.warmup, "prefill_buckets": args.buckets, "critical_layers": args.critical,
        "attention": args.attention,
        "wall_s": time.perf_counter() - started, "backend": jax.default_backend(), "device": str(jax.devices()[0]),
        "jax_version": jax.__version__,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "batch": batch,
        "batching": f"{batch} questions per Session, in lockstep (run_episodes); timings shared out evenly over "
                    "a batch's questions, cache bytes per trajectory",
    }
    return {"meta": meta, "configurations": summaries, "similarity": sim, "share_a": share_reports,
            "_records": records}


def _progress(enabled: bool):
    from tqdm.auto import tqdm

    def bar(items, desc, total=None):
        return tqdm(items, desc=desc, total=total, disable=not enabled, dynamic_ncols=True, leave=True,
                    file=sys.stderr)

    return bar


def write_outputs(results, out_dir) -> list:
    os.makedirs(out_dir, exist_ok=True)
    records = results.pop("_records")
    path = os.path.join(out_dir, "results.json")
    with open(path, "w") as f:
        json.dump(results, f, indent=1)
    written = [path]
    path = os.path.join(out_dir, "episodes.jsonl")
    with open(path, "w") as f:
        for recs in records.values():
            for r in recs:
                f.write(json.dumps(r) + "\n")
    written.append(path)
    path = os.path.join(out_dir, "fidelity_snippet.md")
    with open(path, "w") as f:
        f.write(markdown_snippet(results))
    written.append(path)
    return written + plot(results, out_dir)


def main(argv=None):
    try:
        args = parse_args(sys.argv[1:] if argv is None else argv)
        out_dir = args.out or os.path.join(  # git-ignored, like the benchmarks' results
            "results", "eval_agents", datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ"))
        results = evaluate(args)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (ValueError, KeyError, OSError, NotImplementedError) as e:
        print(f"error: {type(e).__name__}: {e.args[0] if e.args else e}", file=sys.stderr)
        return 2
    written = write_outputs(results, out_dir)
    print_table(results)
    for path in written:
        print(f"wrote {os.path.normpath(path)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
