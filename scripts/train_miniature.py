#!/usr/bin/env python3
"""Train the miniature end to end: world -> tokenizer -> base Llama -> plan/action/reflect LoRA adapters.

The recipe, and why. In the paper the base model (Llama-3.1-8B-Instruct) is already a capable
ReAct agent and AutoAct's q/v LoRA adapters only specialise it per role: the adapter term of V is
~5% of the base term, so a cache written by one agent suits another and the sharing schemes lose
little. A base pre-trained only on world text and tool browsing knows no role behaviour; its
adapters must carry all of it (adapter/base ~0.9 on the first miniature) and every sharing
scheme collapsed. So the base here is a generalist of the format, as an instruction-tuned model
is: besides the worlds' paragraphs and browsing trajectories it reads *solved* trajectories,
whole Thought/Action/Observation/Reflect dialogues written as one text by one model (no roles,
no loss masks), of some question templates only (BASE_TEMPLATES: all but HELD_OUT_TEMPLATES,
whose every step occurs in some base template, so they are new compositions, not new skills).
The adapters are then trained as the paper's: each role's loss on its own tokens, on gold
trajectories of all templates and of other questions than the base read, at half the first
recipe's learning rate and steps (Adam moves every B entry by ~lr a step whether or not the
base already predicts the role's tokens, so a long, fast run inflates adapters that need only
correct the base; the value-cache similarity logged at the end checks it). What they add is
measured, not assumed: the validation exact match of the base alone (playing every role) next
to the agents', per template group. `--base-templates none` is the first recipe (no solved
trajectories), `all` a base that has seen every template.

How this reads issue 13's "pre-train on the world's text and generic dialogue of the format (not
on role behaviour)": a solved trajectory is dialogue of the format written by one model, with no
role in it (every token is a target, as in a chat model's pre-training text that holds ReAct
transcripts); role behaviour, one role's own turns learnt apart from the others', is only ever
trained into the adapters; and the base never reads a third of the task's question kinds.

Steps (seeded, deterministic up to float rounding on the device):
  1. build the evaluation world (seed --seed; its validation / test splits) and --train-worlds fresh
     training worlds (other seeds, no name word in common with it: lragent_jax.task.multiworld),
     their base corpus (paragraphs, browsing and solved trajectories) and the adapters' gold
     trajectories; one world would be memorised, many force the model to copy facts from the
     observations;
  2. train a BPE tokenizer on a sample of the training worlds' text;
  3. pre-train a small Llama (float32) on the base corpus, documents packed whole into rows of
     the model's full context (a trajectory cut in two would train its end without its question,
     and positions past the row length would never be trained); its weights are stored in
     bfloat16 when float32 would not fit SIZE_LIMIT_F32 (the default shape: 13.6M parameters),
     and the evaluation below runs on the stored weights, as users load them;
  4. fine-tune q/v LoRA adapters (rank 8, alpha 16) for plan / action / reflect, each loss on its
     own role's tokens, twice: independent adapters and shared-A multi-LoRA;
  5. save into --out: base/ (config.json, model.safetensors, tokenizer files), adapters_shared/,
     adapters_independent/ (PEFT folders), loss.png, train_log.json; --archive packs the folder
     into one .tar.gz (written once here, so the weights survive a later timeout, and again at
     the end with the evaluation in train_log.json);
  6. evaluate: masked validation loss per role (base, both flavours); the exact match on
     --eval-questions validation questions through the agent loop per --eval-schemes entry
     (default: non_shared and base_lr_shared on the shared-A adapters, and the base model alone),
     by template group; the value-cache similarity of the shared-A agents on validation
     trajectories (adapter/base norm, base and LR cosine, as scripts/fidelity.py); --install
     copies the folder to lragent_jax/assets/miniature/.

  python scripts/train_miniature.py --archive $OUT/miniature.tar.gz --time-limit 570   # GPU (<= 9.5 min, H200)
  python scripts/train_miniature.py --install-from miniature.tar.gz   # install that run's result
  python scripts/train_miniature.py --tiny --out /tmp/m               # CPU smoke run (about a minute)

--time-limit SECONDS: the run ends within that long, however fast the device is (but for one
agent-loop question: an entry's first compiles its programs, 10-35 s on the H200, and cannot be
stopped; keep ~30 s between --time-limit and a device's hard limit). Training ends
PRESETS[...]["reserve_s"] seconds before it (the rest saves, archives and evaluates): pre-training
gets PRETRAIN_SHARE of the time left for training, the independent adapters half of what is then
left, the shared-A ones the rest; each loop times its steps and plans fewer when the requested
ones would not fit, its learning-rate schedule re-planned so it still decays (lragent_jax.train's
time_budget_s). The steps done are in train_log.json ("steps_done"). The validation loss and
similarity are skipped, and the agent loop cut short, when too little time is left; the weights
are archived before any of them.

Exit code 2 with a one-line message on bad input.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys
import tarfile
import time


START = time.perf_counter()  # run as a script, --time-limit counts from here (imports included)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_OUT = os.path.join(ROOT, "out", "miniature")  # /out/ is git-ignored
SIZE_LIMIT_F32 = 30 * 2**20  # ship float32 when everything fits in this; else bfloat16 weights
BASE_MODEL_REF = "lragent-jax-miniature"  # what the PEFT configs name as their base

# Model shape and training lengths. "default": one H200 under --time-limit 570. The second
# miniature (hidden 256, 6 layers, 5.8M parameters) took 0.083 s per pre-training step of 32 x 1024
# tokens (compilation included) and 0.15-0.19 s per adapter step; its held-out errors are copying
# errors (names cut short, a distractor's city), so this one is 2.35x larger (hidden 384, 8 layers,
# 6 heads: 13.6M parameters, 25.9 MiB in bfloat16) and pre-trains at most steps_base steps within
# its share of the time (see --time-limit in the module doc). Shipped 2026-12-01 (the third
# miniature, 81.2% EM on 500 test questions): 0.159 s a pre-training step on one H200 (1.9x the
# second's), so --time-limit 570 stopped pre-training at 1546 steps and the adapters at 300; on a
# slower device the same command trains fewer steps: `--steps-base 1546` without --time-limit trains
# as long (its schedule planned from the start, not re-planned at step 50: close, not bit-identical).
# "tiny": CPU in CI.
# pretrain_seq = max_positions: every position the agents reach is trained (rows hold whole documents).
# solved: fraction of the eligible questions (base templates, not an adapter's) whose solved trajectory
# the base reads; browsing: browsing trajectories per question (halved from the first recipe: the
# solved ones teach the format too). reserve_s: under --time-limit, the seconds kept after training
# for saving (~5 s), the first archive (~2 s), the validation loss (~20-30 s) and the first agent-loop
# entry (--eval-seconds 35 s and a question); the entries after it run only if eval_entry_min_s is left.
PRESETS = {
    "default": dict(world="default", train_worlds=24, vocab=2048, hidden=384, layers=8, heads=6, kv_heads=2, head_dim=64,
                    intermediate=960, max_positions=1024, pretrain_seq=1024, steps_base=2000, steps_adapter=300,
                    batch_size=32, adapter_batch=32, lr_base=1e-3, lr_adapter=1e-3, eval_questions=40,
                    val_loss_episodes=256, browsing=0.5, solved=1.0, base_templates="compositional", max_seq=None,
                    turn_tokens=None, max_steps=6, similarity_episodes=4, reserve_s=100.0,
                    eval_entry_min_s=40.0),
    # the second miniature (shipped 2026-11-30, retired: 5.8M parameters, float32, 65.2% EM on 500 test questions)
    "second": dict(world="default", train_worlds=24, vocab=2048, hidden=256, layers=6, heads=4, kv_heads=2, head_dim=64,
                   intermediate=768, max_positions=1024, pretrain_seq=1024, steps_base=2000, steps_adapter=400,
                   batch_size=32, adapter_batch=32, lr_base=1e-3, lr_adapter=1e-3, eval_questions=40,
                   val_loss_episodes=256, browsing=0.5, solved=1.0, base_templates="compositional", max_seq=None,
                   turn_tokens=None, max_steps=6, similarity_episodes=4, reserve_s=100.0, eval_entry_min_s=40.0),
    "tiny": dict(world="small", train_worlds=6, vocab=768, hidden=64, layers=2, heads=4, kv_heads=2, head_dim=16,
                 intermediate=128, max_positions=512, pretrain_seq=256, steps_base=12, steps_adapter=10,
                 batch_size=4, adapter_batch=2, lr_base=3e-3, lr_adapter=1e-2, eval_questions=2,
                 val_loss_episodes=4, browsing=0.5, solved=0.5, base_templates="compositional", max_seq=192,
                 turn_tokens=8, max_steps=1, similarity_episodes=1, reserve_s=20.0,
                 eval_entry_min_s=5.0),
}
# Under --time-limit: pre-training's share of the time left for training (the second miniature's
# split: 167 s pre-training, 136 s for both adapter flavours at 400 steps; these run 300).
PRETRAIN_SHARE = 0.6
# Under --time-limit, the validation loss and the similarity run only with this many seconds left
# (each took about half of it on the second miniature, compilation included); an agent-loop entry
# runs only if the time left is at least the preset's eval_entry_min_s (its first
# question compiles the Session's programs: 10-35 s on the H200, during which nothing can stop it).
VAL_LOSS_MIN_S, SIMILARITY_MIN_S = 40.0, 45.0
# Templates whose trajectories the base never reads (the adapters learn them): each is a new
# composition of steps that base templates contain (e.g. director -> birth city -> country from
# film_director_birth_year, book_author_city_population and org_country), ~28% of the questions.
HELD_OUT_TEMPLATES = ("film_director_birth_country", "film_producer_founder_age", "book_author_birth_city",
                      "org_founder_birth_country")
BASE_TEMPLATE_CHOICES = ("compositional", "all", "none")
# --eval-schemes entries: a scheme on the shared-A adapters, "independent/<scheme>" on the
# independent ones (base_lr_shared there needs share_a, so it is not offered), or "base_model":
# the base alone playing every role (what the adapters add).
EVAL_CHOICES = ("non_shared", "full_shared", "droidspeak", "base_shared", "base_lr_shared",
                "independent/non_shared", "base_model")
DEFAULT_EVAL = "non_shared,base_lr_shared,base_model"


if not sys.stderr.isatty():  # a log file: a tqdm line every 10 s, not every 0.1 s
    os.environ.setdefault("TQDM_MININTERVAL", "10")


_LOG_FILES: list = []  # train() adds <out>/train.log: the archive carries the run's log


def log(msg: str) -> None:
    line = f"[{time.strftime('%H:%M:%S')}] {msg}"
    print(line, flush=True)
    for f in _LOG_FILES:
        f.write(line + "\n")
        f.flush()


def parse_args(argv):
    from lragent_jax.cli import strict_parser

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="tiny model, small world, few steps (CPU, for CI); "
                                                        "the same as --preset tiny")
    p.add_argument("--preset", choices=tuple(PRESETS), default=None,
                   help="model shape and training lengths (default: default; second: the second miniature's "
                        "shape and steps, hidden 256 x 6 layers, for comparison)")
    p.add_argument("--out", default=DEFAULT_OUT, help=f"result folder (default {os.path.relpath(DEFAULT_OUT, ROOT)})")
    p.add_argument("--seed", type=int, default=0, help="world, initialisation and data-order seed")
    p.add_argument("--train-worlds", type=int, default=None,
                   help="fresh training worlds (seeds other than --seed; default 16, tiny 6)")
    p.add_argument("--steps-base", type=int, default=None, help="pre-training steps")
    p.add_argument("--steps-adapter", type=int, default=None, help="LoRA steps per flavour")
    p.add_argument("--batch-size", type=int, default=None, help="pre-training rows per step")
    p.add_argument("--adapter-batch-size", type=int, default=None, help="LoRA rows per role per step")
    p.add_argument("--lr-base", type=float, default=None)
    p.add_argument("--lr-adapter", type=float, default=None)
    p.add_argument("--vocab-size", type=int, default=None, help="BPE vocabulary size")
    p.add_argument("--base-templates", choices=BASE_TEMPLATE_CHOICES, default=None,
                   help="question templates whose solved trajectories the base reads: compositional (default: "
                        "all but HELD_OUT_TEMPLATES), all, none (the first recipe)")
    p.add_argument("--solved", type=float, default=None, metavar="FRACTION",
                   help="fraction of the eligible questions whose solved trajectory the base reads (default 1.0)")
    p.add_argument("--browsing", type=float, default=None, metavar="PER_QUESTION",
                   help="browsing trajectories per training question in the base corpus (default 0.5)")
    p.add_argument("--eval-questions", type=int, default=None,
                   help="validation questions run through the agent loop per --eval-schemes entry (0 = skip)")
    p.add_argument("--eval-schemes", default=DEFAULT_EVAL,
                   help=f"comma-separated, from {', '.join(EVAL_CHOICES)} (default {DEFAULT_EVAL})")
    p.add_argument("--eval-seconds", type=float, default=35.0,
                   help="stop each --eval-schemes entry's agent loop after this long (the questions done count)")
    p.add_argument("--time-limit", type=float, default=None, metavar="SECONDS",
                   help="the whole run stays within this long (e.g. under a device's per-call limit): training "
                        "plans fewer steps if the requested ones would not fit, the evaluation is cut short")
    p.add_argument("--archive", default=None, metavar="PATH.tar.gz", help="also pack the result folder into this file")
    p.add_argument("--install", action="store_true", help="copy the result into lragent_jax/assets/miniature/")
    p.add_argument("--install-from", default=None, metavar="PATH.tar.gz",
                   help="train nothing: unpack this --archive of an earlier run into lragent_jax/assets/miniature/")
    p.add_argument("--no-progress", action="store_true", help="no tqdm bars (progress lines are still printed)")
    return strict_parser(p).parse_args(argv)


def settings(args) -> dict:
    from lragent_jax.cli import UsageError

    if args.tiny and args.preset not in (None, "tiny"):
        raise UsageError(f"--tiny is --preset tiny; got --preset {args.preset} too")
    s = dict(PRESETS[preset_name(args)])
    for flag, key in (("steps_base", "steps_base"), ("steps_adapter", "steps_adapter"), ("batch_size", "batch_size"),
                      ("adapter_batch_size", "adapter_batch"), ("lr_base", "lr_base"), ("lr_adapter", "lr_adapter"),
                      ("vocab_size", "vocab"), ("eval_questions", "eval_questions"),
                      ("train_worlds", "train_worlds"), ("base_templates", "base_templates"), ("solved", "solved"),
                      ("browsing", "browsing")):
        v = getattr(args, flag)
        if v is not None:
            s[key] = v
    for key in ("steps_base", "steps_adapter", "batch_size", "adapter_batch", "train_worlds"):
        if s[key] < 1:
            raise UsageError(f"--{key.replace('_', '-')} must be >= 1, got {s[key]}")
    for key in ("lr_base", "lr_adapter"):
        if not 0 < s[key] < 1:
            raise UsageError(f"--{key.replace('_', '-')} must be in (0, 1), got {s[key]}")
    if s["eval_questions"] < 0:
        raise UsageError(f"--eval-questions must be >= 0, got {s['eval_questions']}")
    if not 0 <= s["solved"] <= 1:
        raise UsageError(f"--solved must be in [0, 1], got {s['solved']}")
    if not 0 <= s["browsing"] <= 4:
        raise UsageError(f"--browsing must be in [0, 4], got {s['browsing']}")
    if not args.eval_seconds > 0:
        raise UsageError(f"--eval-seconds must be > 0, got {args.eval_seconds}")
    if args.time_limit is not None and not 0 < args.time_limit < float("inf"):
        raise UsageError(f"--time-limit must be a finite number of seconds > 0, got {args.time_limit}")
    s["eval_schemes"] = eval_schemes(args.eval_schemes)
    if not 300 <= s["vocab"] <= 65536:
        raise UsageError(f"--vocab-size must be in [300, 65536], got {s['vocab']}")
    if args.archive is not None and not args.archive.endswith((".tar.gz", ".tgz")):
        raise UsageError(f"--archive must end in .tar.gz, got {args.archive!r}")
    if not 0 <= args.seed < 2**31:
        raise UsageError(f"--seed must be in [0, 2**31), got {args.seed}")
    return s


def preset_name(args) -> str:
    return "tiny" if args.tiny else (args.preset or "default")


def eval_schemes(text: str) -> list:
    from lragent_jax.cli import UsageError

    names = [x.strip() for x in text.split(",") if x.strip()]
    bad = [x for x in names if x not in EVAL_CHOICES]
    if not names or bad or len(set(names)) != len(names):
        raise UsageError(f"--eval-schemes must be distinct entries from {', '.join(EVAL_CHOICES)}, got {text!r}")
    return names


# ---- steps ----------------------------------------------------------------------------------------
def base_templates(choice: str, world) -> tuple:
    """The question templates whose solved trajectories the base reads (see the module doc)."""
    templates = sorted({q.template for qs in world.questions.values() for q in qs})
    unknown = [t for t in HELD_OUT_TEMPLATES if t not in templates]
    if unknown:  # the world's templates were renamed: the split would silently hold nothing out
        raise RuntimeError(f"HELD_OUT_TEMPLATES names templates the world does not have: {unknown}")
    if choice == "none":
        return ()
    if choice == "all":
        return tuple(templates)
    return tuple(t for t in templates if t not in HELD_OUT_TEMPLATES)


def build_data(s, seed):
    """The evaluation world (seed `seed`; only its validation / test splits are used) and the
    training data: base corpus (with solved trajectories of the base templates) and the adapters'
    gold trajectories of s["train_worlds"] fresh worlds whose names share no word with the
    evaluation world, so nothing held out can be memorised."""
    from lragent_jax.task import (SMALL_CONFIG, TRAIN_WORLD_CONFIG, WorldConfig, build_training_data, build_world,
                                  gold_episodes, training_world_seeds)

    small = s["world"] == "small"
    world = build_world(seed, SMALL_CONFIG if small else WorldConfig())
    data = build_training_data(training_world_seeds(seed, s["train_worlds"]),
                               SMALL_CONFIG if small else TRAIN_WORLD_CONFIG,
                               reserved_words=world.name_words(), browsing_per_question=s["browsing"],
                               gold_episodes_total=max(s["steps_adapter"] * s["adapter_batch"], 512),
                               shuffle_seed=seed, solved_templates=base_templates(s["base_templates"], world),
                               solved_per_question=s["solved"])
    val_eps = gold_episodes(world, "validation")
    return world, data, val_eps


def tokenizer_texts(corpus, gold, max_chars=4_000_000):
    """A sample of corpus documents and gold trajectories (about max_chars, from every world:
    the inputs are shuffled) to train the BPE on: syllable merges learnt from many worlds'
    names split a new world's names like training ones; the whole corpus would only be slower."""
    from lragent_jax.task import render

    out, n = [], 0
    for i in range(max(len(corpus), len(gold))):
        for text in ((corpus[i] if i < len(corpus) else None), (render(gold[i]) if i < len(gold) else None)):
            if text is not None:
                out.append(text)
                n += len(text)
        if n >= max_chars:
            break
    return out


def model_config(s, tokenizer):
    from lragent_jax.config import ModelConfig

    if tokenizer.bos_token_id != 0 or tokenizer.eos_token_id != 1:
        raise RuntimeError(f"tokenizer special ids changed: bos {tokenizer.bos_token_id}, eos {tokenizer.eos_token_id}")
    return ModelConfig(vocab_size=len(tokenizer), hidden_size=s["hidden"], intermediate_size=s["intermediate"],
                       num_layers=s["layers"], num_heads=s["heads"], num_kv_heads=s["kv_heads"],
                       head_dim=s["head_dim"], rope_theta=10000.0, max_position_embeddings=s["max_positions"],
                       bos_token_id=0, eos_token_ids=(1,))


def pretrain_rows(tokenizer, corpus, seq_len, *, whole_documents=False):
    """The corpus as rows of seq_len tokens, each document BOS ... EOS, and its token count
    (without EOS). Default: the documents concatenated and cut into rows [N, seq_len] (one batched
    encode; numpy packing, as lragent_jax.train.pack_sequences but for ~40M tokens).
    whole_documents: (tokens, loss_mask) rows holding whole documents, padding masked out
    (lragent_jax.train.pack_documents)."""
    import numpy as np

    from lragent_jax.train import pack_documents

    backend = tokenizer.backend_tokenizer  # Rust encode_batch on all cores; BOS added by its post-processor
    encoded = []
    for lo in range(0, len(corpus), 4096):  # chunks: an Encoding (offsets, strings) weighs far more than its ids
        encoded += [e.ids for e in backend.encode_batch(corpus[lo:lo + 4096], add_special_tokens=True)]
    n_tokens = sum(len(e) for e in encoded)
    if whole_documents:
        eos = [tokenizer.eos_token_id]
        tokens, mask = pack_documents((e + eos for e in encoded), seq_len)
        return list(zip(tokens, mask)), n_tokens
    lengths = np.fromiter((len(e) + 1 for e in encoded), np.int64, len(encoded))
    stream = np.fromiter((t for e in encoded for t in (*e, tokenizer.eos_token_id)), np.int32, int(lengths.sum()))
    n = len(stream) // seq_len
    if n == 0:
        raise ValueError(f"pretrain_rows: {len(stream)} tokens are fewer than seq_len={seq_len}")
    return list(stream[: n * seq_len].reshape(n, seq_len)), n_tokens


def _window(ids, mask, n):
    """At most n tokens of (ids, mask), starting n // 2 before the first target."""
    import numpy as np

    first = int(np.argmax(mask)) if mask.any() else 0
    lo = max(0, min(first - n // 2, len(ids) - n))
    return ids[lo:lo + n], mask[lo:lo + n]


def em_on_questions(model, lora, tokenizer, world, questions, max_len, turn_tokens=None, max_steps=6,
                    time_limit=None, scheme="non_shared", label=None):
    """Exact match of the agents (lora's adapters under `scheme`, or with lora None the base
    model playing every role) over questions through the agent loop with the real tools; stops
    after time_limit seconds (the questions done so far count), so a slow device cannot stall the run."""
    from lragent_jax.engine import Engine
    from lragent_jax.session import Session
    from lragent_jax.task import gold_segments, make_tools, run_episode, score

    label = label or scheme
    engine = Engine(model, lora)
    tools = make_tools(world)
    hits, rows, start = 0.0, [], time.perf_counter()
    for i, q in enumerate(questions):
        if time_limit is not None and time.perf_counter() - start > time_limit:
            log(f"  [{label}] eval time limit {time_limit:.0f} s reached after {i} questions")
            break
        session = Session(engine, scheme, max_len=max_len, tokenizer=tokenizer)
        res = run_episode(session, q.text, tools=tools, max_steps=max_steps, max_tokens_per_turn=turn_tokens)
        em = score(res.answer, q.answer)["em"]
        hits += em
        rows.append({"question": q.text, "template": q.template, "gold": q.answer, "answer": res.answer, "em": em,
                     "stop_reason": res.stop_reason, "tool_calls": res.tool_calls})
        if i == 0:  # the format the agents write, next to the gold one, to spot a broken loop
            gold = [(r, t) for r, t in gold_segments(world, q, tools) if r in ("plan", "action", "reflect")]
            log(f"  [{label}] first episode, gold:  " + " | ".join(f"{r}:{t!r}" for r, t in gold[:3]))
            log(f"  [{label}] first episode, agents: " + " | ".join(f"{t['role']}:{t['text']!r}" for t in res.turns[:3]))
        if i < 2 or (i + 1) % 10 == 0 or i + 1 == len(questions):
            log(f"  [{label}] eval {i + 1}/{len(questions)}: EM so far {hits / (i + 1):.3f}  "
                f"(gold {q.answer!r}, got {res.answer!r}, {res.stop_reason})")
    return hits / max(len(rows), 1), rows


def em_summary(rows, held_out) -> dict:
    """EM over the questions done, and split into base templates (the base read solved
    trajectories of them) / held-out templates (`held_out`: it did not)."""
    def mean(xs):
        return float(sum(xs) / len(xs)) if xs else None

    seen = [r["em"] for r in rows if r["template"] not in held_out]
    new = [r["em"] for r in rows if r["template"] in held_out]
    return {"em": mean([r["em"] for r in rows]), "questions": len(rows), "em_base_templates": mean(seen),
            "questions_base_templates": len(seen), "em_held_out_templates": mean(new),
            "questions_held_out_templates": len(new)}


def run_evaluations(entries, model, adapters, tokenizer, world, questions, max_len, s, time_limit, deadline=None,
                    held_out=HELD_OUT_TEMPLATES):
    """{entry: {"em", ..., "rows"}} for each --eval-schemes entry (see EVAL_CHOICES), in order,
    each given at most time_limit seconds and what is left before `deadline` (a
    time.perf_counter() value; the first entries come first: non_shared is the headline); an
    entry that fails, or finds less than s["eval_entry_min_s"] left, is recorded with its error
    and the next one runs."""
    out = {}
    for entry in entries:
        t = time.perf_counter()
        limit = time_limit
        if deadline is not None:
            limit = min(limit, deadline - t)
            # the time left, not the entry's limit (--eval-seconds may be shorter): too short to compile
            if deadline - t < s.get("eval_entry_min_s", 5.0):
                out[entry] = {"em": None, "questions": 0, "seconds": 0.0, "rows": [],
                              "error": "skipped: --time-limit reached"}
                log(f"agent-loop evaluation [{entry}] skipped: --time-limit reached")
                continue
        if entry == "base_model":
            lora, scheme = None, "non_shared"
        elif entry.startswith("independent/"):
            lora, scheme = adapters["independent"], entry.split("/", 1)[1]
        else:
            lora, scheme = adapters["shared"], entry
        try:
            em, rows = em_on_questions(model, lora, tokenizer, world, questions, max_len, turn_tokens=s["turn_tokens"],
                                       max_steps=s["max_steps"], time_limit=limit, scheme=scheme, label=entry)
            out[entry] = {**em_summary(rows, held_out), "seconds": time.perf_counter() - t, "error": None, "rows": rows}
            r = out[entry]
            log(f"validation EM [{entry}]: {em:.3f} over {len(rows)} questions "
                f"(base templates {_fmt(r['em_base_templates'])} of {r['questions_base_templates']}, "
                f"held-out templates {_fmt(r['em_held_out_templates'])} of {r['questions_held_out_templates']}; "
                f"{r['seconds']:.1f} s)")
        except Exception as e:  # noqa: BLE001 - the trained weights are saved; report and go on
            err = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            out[entry] = {"em": None, "questions": 0, "seconds": time.perf_counter() - t, "error": err, "rows": []}
            log(f"agent-loop evaluation [{entry}] failed: {err}")
    return out


def _fmt(x):
    return "-" if x is None else f"{x:.3f}"


def adapter_similarity(model, lora, tokenizer, episodes) -> dict:
    """The paper's Tables 1-2 quantities for `lora` on gold trajectories (lragent_jax.fidelity):
    per kind the mean over episodes of the layer-averaged cosine, and the adapter/base norm ratio
    (mean over layers and episodes). The first recipe's shared-A adapters: 0.93, paper ~0.05."""
    import numpy as np

    from lragent_jax.engine import Engine
    from lragent_jax.fidelity import value_similarity
    from lragent_jax.task import encode_segments

    engine = Engine(model, lora)
    per_kind, ratios = {}, []
    for segs in episodes:
        ids, _ = encode_segments(tokenizer, segs, add_eos=False)
        sim = value_similarity(engine, [int(t) for t in ids])
        for kind, v in sim.average.items():
            per_kind.setdefault(kind, []).append(float(v))
        ratios.append(float(np.nanmean(sim.adapter_norm_ratio)))
    return {"cosine": {k: float(np.mean(v)) for k, v in per_kind.items()},
            "adapter_norm_ratio": float(np.mean(ratios)), "episodes": len(episodes)}


def save_weights(model, folder):
    """The base model as an HF folder: float32 when the whole result (model and six adapters)
    fits SIZE_LIMIT_F32, else bfloat16 (written float32, then re-read as bfloat16 and rewritten)."""
    import jax.numpy as jnp

    from lragent_jax.export import save_model
    from lragent_jax.loading import load_model

    cfg = model.config
    f32_bytes = 4 * (cfg.num_params() + 6 * cfg.num_layers * lora_params_per_layer(cfg))
    save_model(model, folder)
    if f32_bytes <= SIZE_LIMIT_F32:
        return "float32"
    save_model(load_model(folder, dtype=jnp.bfloat16), folder)
    return "bfloat16"


def lora_params_per_layer(cfg, rank: int = 8) -> int:
    """LoRA parameters of one q/v adapter per layer."""
    d_in, d_q = cfg.projection_dims("q")
    _, d_v = cfg.projection_dims("v")
    return rank * (2 * d_in + d_q + d_v)


def folder_bytes(folder) -> dict:
    out = {}
    for dirpath, _, files in os.walk(folder):
        for f in files:
            p = os.path.join(dirpath, f)
            out[os.path.relpath(p, folder)] = os.path.getsize(p)
    return dict(sorted(out.items()))


def pack(folder, archive):
    """Written beside, then renamed over `archive`: a run killed while packing keeps the previous one."""
    os.makedirs(os.path.dirname(os.path.abspath(archive)), exist_ok=True)
    part = archive + ".part"
    try:
        with tarfile.open(part, "w:gz") as tar:
            tar.add(folder, arcname="miniature")
        os.replace(part, archive)
    finally:
        if os.path.exists(part):
            os.remove(part)
    return archive


def install(folder):
    from lragent_jax.miniature import ASSET_DIR

    if os.path.exists(ASSET_DIR):
        shutil.rmtree(ASSET_DIR)
    shutil.copytree(folder, ASSET_DIR)
    return ASSET_DIR


def install_archive(archive):
    """Unpack an --archive (e.g. one a GPU run wrote) and install it, once it is checked complete.
    UsageError (one line) if the file is not such an archive."""
    import tempfile

    from lragent_jax.cli import UsageError
    from lragent_jax.miniature import assets_built

    if not os.path.isfile(archive):
        raise UsageError(f"--install-from: no such file {archive!r}")
    with tempfile.TemporaryDirectory() as tmp:
        try:
            with tarfile.open(archive, "r:gz") as tar:
                names = tar.getnames()
                if not names or any(n != "miniature" and not n.startswith("miniature/") for n in names):
                    raise UsageError(f"--install-from: {archive} does not hold one miniature/ folder")
                # what the "data" filter refuses, for the Pythons without it: paths out, links
                if any(".." in n.split("/") or m.issym() or m.islnk() for n, m in zip(names, tar.getmembers())):
                    raise UsageError(f"--install-from: {archive} has a link or a '..' path (only plain files)")
                # the "data" filter (no absolute paths, no links out) exists from Python 3.11.4 on
                tar.extractall(tmp, **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))
        except (tarfile.TarError, OSError, EOFError) as e:
            raise UsageError(f"--install-from: cannot read {archive}: {e}") from None
        folder = os.path.join(tmp, "miniature")
        if not assets_built(folder):
            raise UsageError(f"--install-from: {archive} holds an incomplete miniature (weights or adapters missing)")
        return install(folder)


# ---- main -----------------------------------------------------------------------------------------
def train(args, start: float) -> dict:
    """The run (module doc); `start`: the time.perf_counter() value --time-limit counts from."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from lragent_jax.export import save_adapters
    from lragent_jax.loading import load_model, load_tokenizer
    from lragent_jax.miniature import world_record
    from lragent_jax.model import Llama
    from lragent_jax.task import SMALL_CONFIG, TRAIN_WORLD_CONFIG, examples_by_role, train_tokenizer
    from lragent_jax.train import plot_losses, pretrain, train_adapters

    s = settings(args)
    out = os.path.abspath(args.out)
    if os.path.exists(out):
        shutil.rmtree(os.path.join(out, "base"), ignore_errors=True)
        for sub in ("adapters_shared", "adapters_independent"):
            shutil.rmtree(os.path.join(out, sub), ignore_errors=True)
    os.makedirs(out, exist_ok=True)
    _LOG_FILES.append(open(os.path.join(out, "train.log"), "w"))
    progress = not args.no_progress
    times, t0 = {}, time.perf_counter()
    # --time-limit: the run's end (eval_deadline keeps 10 s to write the record and the archive)
    # and training's (reserve_s earlier: saving, the first archive and the evaluation).
    eval_deadline = None if args.time_limit is None else start + args.time_limit - 10
    train_end = None if args.time_limit is None else start + args.time_limit - s["reserve_s"]

    def budget(share):
        """Seconds for the next training loop: `share` of what is left before train_end."""
        return None if train_end is None else max(1.0, share * (train_end - time.perf_counter()))

    def time_left():
        return float("inf") if eval_deadline is None else eval_deadline - time.perf_counter()

    log(f"device {jax.devices()[0].device_kind} ({jax.default_backend()}), jax {jax.__version__}, "
        f"preset {preset_name(args)}, seed {args.seed}")

    t = time.perf_counter()
    world, data, val_eps = build_data(s, args.seed)
    corpus, train_eps = data.corpus, data.gold
    base_t = base_templates(s["base_templates"], world)  # the base read their solved trajectories
    held_t = tuple(x for x in base_templates("all", world) if x not in base_t)  # it never read these
    times["world_s"] = time.perf_counter() - t
    log(f"evaluation world {args.seed}: {len(world.entities)} entities, questions "
        f"{({k: len(v) for k, v in world.questions.items()})}; {len(data.seeds)} training worlds: "
        f"corpus {len(corpus)} documents, {len(train_eps)} gold trajectories "
        f"({times['world_s']:.1f} s; no name word shared with the evaluation world)")

    t = time.perf_counter()
    base_dir = os.path.join(out, "base")
    train_tokenizer(tokenizer_texts(corpus, train_eps), base_dir, vocab_size=s["vocab"])
    tok = load_tokenizer(base_dir)
    times["tokenizer_s"] = time.perf_counter() - t
    cfg = model_config(s, tok)
    log(f"tokenizer: {len(tok)} tokens ({times['tokenizer_s']:.1f} s); model {cfg.num_params() / 1e6:.2f}M params")

    t = time.perf_counter()
    rows, corpus_tokens = pretrain_rows(tok, corpus, s["pretrain_seq"], whole_documents=True)
    train_ex = examples_by_role(tok, train_eps)
    val_ex = examples_by_role(tok, val_eps[: s["val_loss_episodes"]])
    if s["max_seq"]:  # tiny: a window of max_seq tokens around each role's first turn, so CPU steps are quick
        train_ex, val_ex = ({r: [_window(ids, m, s["max_seq"]) for ids, m in exs] for r, exs in ex.items()}
                            for ex in (train_ex, val_ex))
    longest = max(len(ids) for ids, _ in train_ex["plan"] + val_ex["plan"])
    adapter_seq = -(-longest // 64) * 64
    if adapter_seq > cfg.max_position_embeddings:
        raise RuntimeError(f"a gold trajectory has {longest} tokens > max positions {cfg.max_position_embeddings}")
    times["encode_s"] = time.perf_counter() - t
    gold_tokens = int(sum(len(ids) for ids, _ in train_ex["plan"]))
    log(f"data: pre-training {corpus_tokens} tokens ({len(corpus)} documents, {data.solved} of them solved "
        f"trajectories of {len(base_t)} templates) in {len(rows)} rows of "
        f"{s['pretrain_seq']}; "
        f"gold train {len(train_eps)} episodes, {gold_tokens} tokens (longest {longest}, rows of {adapter_seq})")
    log(f"pre-training: {s['steps_base']} steps x {s['batch_size']} rows = "
        f"{s['steps_base'] * s['batch_size'] / len(rows):.1f} epochs")

    t = time.perf_counter()
    model = Llama(cfg, dtype=jnp.float32, rngs=nnx.Rngs(args.seed))
    seconds = budget(PRETRAIN_SHARE)
    if seconds is not None:
        log(f"pre-training time budget {seconds:.0f} s (--time-limit {args.time_limit:.0f} s)")
    model, base_hist = pretrain(model, rows, steps=s["steps_base"], lr=s["lr_base"], batch_size=s["batch_size"],
                                seq_len=s["pretrain_seq"], seed=args.seed, progress=progress, time_budget_s=seconds)
    times["pretrain_s"] = time.perf_counter() - t
    steps_done = {"base": len(base_hist["loss"])}
    log(f"pre-training done in {times['pretrain_s']:.1f} s: {_steps(steps_done['base'], s['steps_base'])} "
        f"({times['pretrain_s'] / steps_done['base']:.3f} s a step, compilation included), "
        f"loss {base_hist['loss'][0]:.3f} -> {np.mean(base_hist['loss'][-10:]):.3f}")

    adapters, hists = {}, {}
    epochs = s["steps_adapter"] * s["adapter_batch"] / len(train_eps)
    for k, (flavour, shared) in enumerate((("independent", False), ("shared", True))):
        seconds = budget(1.0 / (2 - k))  # half of what is left, then all of it
        log(f"adapters ({flavour}): {s['steps_adapter']} steps x {s['adapter_batch']} rows per role "
            f"= {epochs:.1f} epochs" + ("" if seconds is None else f" (time budget {seconds:.0f} s)"))
        t = time.perf_counter()
        lora, hist = train_adapters(model, train_ex, rank=8, alpha=16.0, targets=("q", "v"), shared_a=shared,
                                    steps=s["steps_adapter"], lr=s["lr_adapter"], batch_size=s["adapter_batch"],
                                    seq_len=adapter_seq, seed=args.seed + 1, progress=progress,
                                    time_budget_s=seconds)
        times[f"adapters_{flavour}_s"] = time.perf_counter() - t
        adapters[flavour], hists[flavour] = lora, hist
        steps_done[f"adapters_{flavour}"] = len(hist["loss"])
        log(f"adapters ({flavour}) done in {times[f'adapters_{flavour}_s']:.1f} s: "
            f"{_steps(len(hist['loss']), s['steps_adapter'])} "
            f"({times[f'adapters_{flavour}_s'] / len(hist['loss']):.3f} s a step), "
            + ", ".join(f"{r} {hist[r][0]:.3f} -> {np.mean(hist[r][-10:]):.3f}" for r in train_ex))

    # Saved (and archived) before evaluating: an evaluation failure or a timeout cannot lose the weights.
    t = time.perf_counter()
    weights_dtype = save_weights(model, base_dir)
    for flavour, lora in adapters.items():
        save_adapters(lora, os.path.join(out, f"adapters_{flavour}"), base_model_name_or_path=BASE_MODEL_REF)
    plot_losses({"base": base_hist["loss"], **{f"lora_{k}": {r: h[r] for r in train_ex} for k, h in hists.items()}},
                os.path.join(out, "loss.png"), title="miniature training loss", smooth=5)
    if weights_dtype != "float32":  # evaluate what ships: the stored (rounded) weights, read back as users do
        model = load_model(base_dir, dtype=jnp.float32)
    times["save_s"] = time.perf_counter() - t
    log(f"saved weights ({weights_dtype}) and adapters in {times['save_s']:.1f} s")
    record = {
        "world": world_record(world),
        "training_worlds": {"seeds": data.seeds, "config": dataclasses.asdict(
            SMALL_CONFIG if s["world"] == "small" else TRAIN_WORLD_CONFIG)},
        "preset": preset_name(args),
        "settings": s,
        "seed": args.seed,
        "base_templates": list(base_t),
        "held_out_templates": list(held_t),
        "model_config": cfg.to_hf_dict(),
        "num_params": cfg.num_params(),
        "weights_dtype": weights_dtype,
        "steps_done": steps_done,
        "time_limit_s": args.time_limit,
        "lora": {"rank": 8, "alpha": 16.0, "targets": ["q", "v"]},
        "adapter_seq_len": adapter_seq,
        "data": {"pretrain_tokens": corpus_tokens, "pretrain_rows": len(rows), "pretrain_documents": len(corpus),
                 "solved_trajectories": data.solved, "gold_train_episodes": len(train_eps),
                 "gold_train_tokens": gold_tokens, "adapter_epochs": epochs},
        "losses": {"base": base_hist["loss"], **{f"adapters_{k}": h for k, h in hists.items()}},
        "validation_loss": None, "validation_loss_held_out_templates": None, "training_world_loss": None,
        "similarity_shared": None,
        "validation_em": None, "validation_em_questions": [], "validation_em_error": None, "validation_em_entry": None,
        "validation_em_by_entry": {},
        "times_s": times,
        "device_kind": jax.devices()[0].device_kind,
        "backend": jax.default_backend(),
        "jax_version": jax.__version__,
    }
    write_record(out, record)
    if args.archive:  # a first archive: the weights come back even if the evaluation runs out of time
        log(f"archive (before evaluation): {pack(out, args.archive)} ({os.path.getsize(args.archive) / 2**20:.2f} MiB)")

    t = time.perf_counter()
    if time_left() < VAL_LOSS_MIN_S:
        log("validation loss skipped: --time-limit reached")
    else:
        _validation_losses(model, adapters, val_ex, train_ex, world, held_t, base_t, adapter_seq, record)
    times["val_loss_s"] = time.perf_counter() - t

    if s["eval_questions"]:
        t = time.perf_counter()
        questions = world.questions["validation"][: s["eval_questions"]]
        log(f"agent loop on {len(questions)} validation questions per entry: {', '.join(s['eval_schemes'])} "
            f"(held-out templates: {', '.join(record['held_out_templates']) or 'none'})")
        by_entry = run_evaluations(s["eval_schemes"], model, adapters, tok, world, questions,
                                   cfg.max_position_embeddings, s, args.eval_seconds,
                                   deadline=eval_deadline,
                                   held_out=held_t)
        first = by_entry[s["eval_schemes"][0]]
        record.update(validation_em=first["em"], validation_em_questions=first["rows"],
                      validation_em_error=first["error"], validation_em_entry=s["eval_schemes"][0],
                      validation_em_by_entry=by_entry)
        times["eval_em_s"] = time.perf_counter() - t
        ref = by_entry.get("non_shared")
        for entry, r in by_entry.items():
            if ref is not None and entry != "non_shared" and r["em"] is not None and ref["em"] is not None:
                n = min(len(r["rows"]), len(ref["rows"]))  # the questions both ran
                gap = sum(a["em"] - b["em"] for a, b in zip(r["rows"][:n], ref["rows"][:n])) / max(n, 1)
                log(f"  {entry} - non_shared on the same {n} questions: {100 * gap:+.1f} EM points")

    # last: eval_agents.py measures it too (on test trajectories); the loss and EM come first
    t = time.perf_counter()
    if time_left() < SIMILARITY_MIN_S:
        sim = {"error": "skipped: --time-limit reached"}
        log("similarity measurement skipped: --time-limit reached")
    else:
        sim = _similarity(model, adapters["shared"], tok, val_eps[: s["similarity_episodes"]])
    times["similarity_s"] = time.perf_counter() - t
    record["similarity_shared"] = sim

    times["total_s"] = time.perf_counter() - t0
    write_record(out, record)
    if record["total_bytes"] > SIZE_LIMIT_F32:
        log(f"warning: the result is {record['total_bytes'] / 2**20:.2f} MiB, over the {SIZE_LIMIT_F32 / 2**20:.0f} MiB "
            f"the package ships")
    log(f"saved {out}: {record['total_bytes'] / 2**20:.2f} MiB (weights {weights_dtype}); "
        f"model.safetensors {record['file_bytes'].get('base/model.safetensors', 0) / 2**20:.2f} MiB; "
        f"total {times['total_s']:.1f} s")
    return {"out": out, "record": record}


def _steps(done, requested) -> str:
    return f"{done} steps" if done == requested else f"{done} of {requested} steps (--time-limit)"


def _validation_losses(model, adapters, val_ex, train_ex, world, held_t, base_t, seq_len, record) -> None:
    """Masked validation loss per role (base, each adapter flavour), the same on training-world
    trajectories and on the held-out templates' validation trajectories, logged and into `record`."""
    import numpy as np

    from lragent_jax.train import eval_loss

    val_loss = {"base": eval_loss(model, val_ex, None, seq_len=seq_len)}
    for flavour, lora in adapters.items():
        val_loss[flavour] = eval_loss(model, val_ex, lora, seq_len=seq_len)
    # The same measure on as many training-world trajectories: validation should track it (a
    # gap means the adapters recall training facts instead of copying them from observations).
    seen_ex = {r: exs[: len(val_ex[r])] for r, exs in train_ex.items()}
    train_loss = {flavour: eval_loss(model, seen_ex, lora, seq_len=seq_len) for flavour, lora in adapters.items()}
    for k, v in val_loss.items():
        log(f"validation loss ({k}): " + ", ".join(f"{r} {x:.4f} (gold p~{np.exp(-x):.2f})" for r, x in v.items()))
    for k, v in train_loss.items():
        log(f"training-world loss, teacher forced ({k}): " + ", ".join(f"{r} {x:.4f}" for r, x in v.items()))
    record.update(validation_loss=val_loss, training_world_loss=train_loss)
    # The same on the held-out templates' validation trajectories only (the base never read their kind).
    held = [i for i, q in enumerate(world.questions["validation"][: len(val_ex["plan"])]) if q.template in held_t]
    if held and base_t:  # (with no base template, "held out" is every trajectory: the line above)
        held_ex = {r: [exs[i] for i in held] for r, exs in val_ex.items()}
        held_loss = {"base": eval_loss(model, held_ex, None, seq_len=seq_len),
                     **{k: eval_loss(model, held_ex, lora, seq_len=seq_len) for k, lora in adapters.items()}}
        for k, v in held_loss.items():
            log(f"validation loss, held-out templates only ({k}, {len(held)} trajectories): "
                + ", ".join(f"{r} {x:.4f}" for r, x in v.items()))
        record["validation_loss_held_out_templates"] = held_loss


def _similarity(model, lora, tok, episodes) -> dict:
    """adapter_similarity, logged; a failure is recorded, not raised (a measurement, not the product)."""
    try:
        sim = adapter_similarity(model, lora, tok, episodes)
        log(f"shared-A agents on {sim['episodes']} validation trajectories: adapter/base norm "
            f"{sim['adapter_norm_ratio']:.3f} (first recipe 0.93, paper ~0.05); cosine across agents "
            + ", ".join(f"{k} {v:.3f}" for k, v in sim["cosine"].items()) + " (paper: base 0.973, full 0.958)")
    except Exception as e:  # noqa: BLE001
        sim = {"error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"}
        log(f"similarity measurement failed: {sim['error']}")
    return sim


def write_record(out, record) -> None:
    """train_log.json with the folder's file sizes (itself left out)."""
    sizes = folder_bytes(out)
    sizes.pop("train_log.json", None)
    record.update(file_bytes=sizes, total_bytes=int(sum(sizes.values())))
    with open(os.path.join(out, "train_log.json"), "w") as f:
        json.dump(record, f, indent=1)


def main(argv=None):
    from lragent_jax.cli import UsageError

    try:
        args = parse_args(sys.argv[1:] if argv is None else argv)
        settings(args)  # bad flags fail before any work
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.install_from:
        try:
            log(f"installed {args.install_from} into {install_archive(args.install_from)}")
        except UsageError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        return 0
    try:
        # main() called from Python (tests): the limit counts from the call, not from the import
        result = train(args, START if argv is None else time.perf_counter())
    finally:
        while _LOG_FILES:
            _LOG_FILES.pop().close()
    if args.archive:  # again, now with the evaluation in train_log.json
        log(f"archive: {pack(result['out'], args.archive)} ({os.path.getsize(args.archive) / 2**20:.2f} MiB)")
    if args.install:
        log(f"installed into {install(result['out'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
