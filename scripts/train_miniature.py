#!/usr/bin/env python3
"""Train the miniature end to end: world -> tokenizer -> base Llama -> plan/action/reflect LoRA adapters.

Seeded and deterministic up to float rounding on the device. Steps:
  1. build the evaluation world (seed --seed; its validation / test splits) and --train-worlds fresh
     training worlds (other seeds, no name word in common with it: lragent_jax.task.multiworld),
     their base corpus and gold trajectories; one world would be memorised, many force the model
     to copy facts from the observations;
  2. train a BPE tokenizer on a sample of the training worlds' text;
  3. pre-train a small Llama (float32) on the base corpus: the training worlds' paragraphs and
     browsing trajectories of the format, not the roles' behaviour;
  4. fine-tune q/v LoRA adapters (rank 8, alpha 16) for plan / action / reflect, each loss on its
     own role's tokens, twice: independent adapters and shared-A multi-LoRA;
  5. evaluate: masked validation loss per role (base, both flavours) and the exact match of the
     independent adapters under non_shared on --eval-questions validation questions;
  6. save into --out: base/ (config.json, model.safetensors, tokenizer files), adapters_shared/,
     adapters_independent/ (PEFT folders), loss.png, train_log.json; --archive packs the folder
     into one .tar.gz, --install copies it to lragent_jax/assets/miniature/.

  python scripts/train_miniature.py                       # GPU default (minutes)
  python scripts/train_miniature.py --tiny --out /tmp/m   # CPU smoke run (< 60 s)

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


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_OUT = os.path.join(ROOT, "out", "miniature")  # /out/ is git-ignored
SIZE_LIMIT_F32 = 30 * 2**20  # ship float32 when everything fits in this; else bfloat16 weights
BASE_MODEL_REF = "lragent-jax-miniature"  # what the PEFT configs name as their base

# Model shape and training lengths. "default": one H200 in a few minutes; "tiny": CPU in CI.
PRESETS = {
    "default": dict(world="default", train_worlds=16, vocab=2048, hidden=256, layers=6, heads=4, kv_heads=2, head_dim=64,
                    intermediate=768, max_positions=1024, pretrain_seq=512, steps_base=1200, steps_adapter=800,
                    batch_size=64, adapter_batch=32, lr_base=1e-3, lr_adapter=2e-3, eval_questions=40,
                    val_loss_episodes=256, browsing=1.0, max_seq=None, turn_tokens=None, max_steps=6),
    "tiny": dict(world="small", train_worlds=6, vocab=768, hidden=64, layers=2, heads=4, kv_heads=2, head_dim=16,
                 intermediate=128, max_positions=512, pretrain_seq=128, steps_base=12, steps_adapter=10,
                 batch_size=8, adapter_batch=2, lr_base=3e-3, lr_adapter=1e-2, eval_questions=2,
                 val_loss_episodes=4, browsing=0.5, max_seq=192, turn_tokens=8, max_steps=1),
}


if not sys.stderr.isatty():  # a log file: a tqdm line every 10 s, not every 0.1 s
    os.environ.setdefault("TQDM_MININTERVAL", "10")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def parse_args(argv):
    from lragent_jax.cli import strict_parser

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="tiny model, small world, few steps (CPU, for CI)")
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
    p.add_argument("--eval-questions", type=int, default=None,
                   help="validation questions run through the agent loop (non_shared, 0 = skip)")
    p.add_argument("--eval-seconds", type=float, default=75.0,
                   help="stop the agent-loop evaluation after this long (the questions done count)")
    p.add_argument("--archive", default=None, metavar="PATH.tar.gz", help="also pack the result folder into this file")
    p.add_argument("--install", action="store_true", help="copy the result into lragent_jax/assets/miniature/")
    p.add_argument("--no-progress", action="store_true", help="no tqdm bars (progress lines are still printed)")
    return strict_parser(p).parse_args(argv)


def settings(args) -> dict:
    s = dict(PRESETS["tiny" if args.tiny else "default"])
    for flag, key in (("steps_base", "steps_base"), ("steps_adapter", "steps_adapter"), ("batch_size", "batch_size"),
                      ("adapter_batch_size", "adapter_batch"), ("lr_base", "lr_base"), ("lr_adapter", "lr_adapter"),
                      ("vocab_size", "vocab"), ("eval_questions", "eval_questions"),
                      ("train_worlds", "train_worlds")):
        v = getattr(args, flag)
        if v is not None:
            s[key] = v
    from lragent_jax.cli import UsageError

    for key in ("steps_base", "steps_adapter", "batch_size", "adapter_batch", "train_worlds"):
        if s[key] < 1:
            raise UsageError(f"--{key.replace('_', '-')} must be >= 1, got {s[key]}")
    for key in ("lr_base", "lr_adapter"):
        if not 0 < s[key] < 1:
            raise UsageError(f"--{key.replace('_', '-')} must be in (0, 1), got {s[key]}")
    if s["eval_questions"] < 0:
        raise UsageError(f"--eval-questions must be >= 0, got {s['eval_questions']}")
    if not 300 <= s["vocab"] <= 65536:
        raise UsageError(f"--vocab-size must be in [300, 65536], got {s['vocab']}")
    if args.archive is not None and not args.archive.endswith((".tar.gz", ".tgz")):
        raise UsageError(f"--archive must end in .tar.gz, got {args.archive!r}")
    if not 0 <= args.seed < 2**31:
        raise UsageError(f"--seed must be in [0, 2**31), got {args.seed}")
    return s


# ---- steps ----------------------------------------------------------------------------------------
def build_data(s, seed):
    """The evaluation world (seed `seed`; only its validation / test splits are used) and the
    training data: base corpus and gold trajectories of s["train_worlds"] fresh worlds whose
    names share no word with the evaluation world, so nothing held out can be memorised."""
    from lragent_jax.task import (SMALL_CONFIG, TRAIN_WORLD_CONFIG, WorldConfig, build_training_data, build_world,
                                  gold_episodes, training_world_seeds)

    small = s["world"] == "small"
    world = build_world(seed, SMALL_CONFIG if small else WorldConfig())
    data = build_training_data(training_world_seeds(seed, s["train_worlds"]),
                               SMALL_CONFIG if small else TRAIN_WORLD_CONFIG,
                               reserved_words=world.name_words(), browsing_per_question=s["browsing"],
                               gold_episodes_total=max(s["steps_adapter"] * s["adapter_batch"], 512),
                               shuffle_seed=seed)
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


def pretrain_rows(tokenizer, corpus, seq_len):
    """The corpus as packed rows [N, seq_len]: each document BOS ... EOS, concatenated (one
    batched encode; numpy packing, as lragent_jax.train.pack_sequences but for ~40M tokens)."""
    import numpy as np

    backend = tokenizer.backend_tokenizer  # Rust encode_batch on all cores; BOS added by its post-processor
    encoded = []
    for lo in range(0, len(corpus), 4096):  # chunks: an Encoding (offsets, strings) weighs far more than its ids
        encoded += [e.ids for e in backend.encode_batch(corpus[lo:lo + 4096], add_special_tokens=True)]
    lengths = np.fromiter((len(e) + 1 for e in encoded), np.int64, len(encoded))
    stream = np.fromiter((t for e in encoded for t in (*e, tokenizer.eos_token_id)), np.int32, int(lengths.sum()))
    n = len(stream) // seq_len
    if n == 0:
        raise ValueError(f"pretrain_rows: {len(stream)} tokens are fewer than seq_len={seq_len}")
    return list(stream[: n * seq_len].reshape(n, seq_len)), int(len(stream) - len(encoded))


def _window(ids, mask, n):
    """At most n tokens of (ids, mask), starting n // 2 before the first target."""
    import numpy as np

    first = int(np.argmax(mask)) if mask.any() else 0
    lo = max(0, min(first - n // 2, len(ids) - n))
    return ids[lo:lo + n], mask[lo:lo + n]


def em_on_questions(model, lora, tokenizer, world, questions, max_len, turn_tokens=None, max_steps=6,
                    time_limit=None):
    """Exact match of non_shared agents over questions (the agent loop with the real tools); stops
    after time_limit seconds (the questions done so far count), so a slow device cannot stall the run."""
    from lragent_jax.engine import Engine
    from lragent_jax.session import Session
    from lragent_jax.task import gold_segments, make_tools, run_episode, score

    engine = Engine(model, lora)
    tools = make_tools(world)
    hits, rows, start = 0.0, [], time.perf_counter()
    for i, q in enumerate(questions):
        if time_limit is not None and time.perf_counter() - start > time_limit:
            log(f"  eval time limit {time_limit:.0f} s reached after {i} questions")
            break
        session = Session(engine, "non_shared", max_len=max_len, tokenizer=tokenizer)
        res = run_episode(session, q.text, tools=tools, max_steps=max_steps, max_tokens_per_turn=turn_tokens)
        em = score(res.answer, q.answer)["em"]
        hits += em
        rows.append({"question": q.text, "gold": q.answer, "answer": res.answer, "em": em,
                     "stop_reason": res.stop_reason, "tool_calls": res.tool_calls})
        if i == 0:  # the format the agents write, next to the gold one, to spot a broken loop
            gold = [(r, t) for r, t in gold_segments(world, q, tools) if r in ("plan", "action", "reflect")]
            log("  first episode, gold:  " + " | ".join(f"{r}:{t!r}" for r, t in gold[:3]))
            log("  first episode, agents: " + " | ".join(f"{t['role']}:{t['text']!r}" for t in res.turns[:3]))
        if i < 3 or (i + 1) % 10 == 0 or i + 1 == len(questions):
            log(f"  eval {i + 1}/{len(questions)}: EM so far {hits / (i + 1):.3f}  "
                f"(gold {q.answer!r}, got {res.answer!r}, {res.stop_reason})")
    return hits / max(len(rows), 1), rows


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
    os.makedirs(os.path.dirname(os.path.abspath(archive)), exist_ok=True)
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(folder, arcname="miniature")
    return archive


def install(folder):
    from lragent_jax.miniature import ASSET_DIR

    if os.path.exists(ASSET_DIR):
        shutil.rmtree(ASSET_DIR)
    shutil.copytree(folder, ASSET_DIR)
    return ASSET_DIR


# ---- main -----------------------------------------------------------------------------------------
def train(args) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from lragent_jax.export import save_adapters
    from lragent_jax.loading import load_tokenizer
    from lragent_jax.miniature import world_record
    from lragent_jax.model import Llama
    from lragent_jax.task import SMALL_CONFIG, TRAIN_WORLD_CONFIG, examples_by_role, train_tokenizer
    from lragent_jax.train import eval_loss, plot_losses, pretrain, train_adapters

    s = settings(args)
    out = os.path.abspath(args.out)
    if os.path.exists(out):
        shutil.rmtree(os.path.join(out, "base"), ignore_errors=True)
        for sub in ("adapters_shared", "adapters_independent"):
            shutil.rmtree(os.path.join(out, sub), ignore_errors=True)
    os.makedirs(out, exist_ok=True)
    progress = not args.no_progress
    times, t0 = {}, time.perf_counter()
    log(f"device {jax.devices()[0].device_kind} ({jax.default_backend()}), jax {jax.__version__}, "
        f"preset {'tiny' if args.tiny else 'default'}, seed {args.seed}")

    t = time.perf_counter()
    world, data, val_eps = build_data(s, args.seed)
    corpus, train_eps = data.corpus, data.gold
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
    rows, corpus_tokens = pretrain_rows(tok, corpus, s["pretrain_seq"])
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
    log(f"data: pre-training {corpus_tokens} tokens in {len(rows)} rows of {s['pretrain_seq']}; "
        f"gold train {len(train_eps)} episodes, {gold_tokens} tokens (longest {longest}, rows of {adapter_seq})")
    log(f"pre-training: {s['steps_base']} steps x {s['batch_size']} rows = "
        f"{s['steps_base'] * s['batch_size'] * s['pretrain_seq'] / max(corpus_tokens, 1):.1f} epochs")

    t = time.perf_counter()
    model = Llama(cfg, dtype=jnp.float32, rngs=nnx.Rngs(args.seed))
    model, base_hist = pretrain(model, rows, steps=s["steps_base"], lr=s["lr_base"], batch_size=s["batch_size"],
                                seq_len=s["pretrain_seq"], seed=args.seed, progress=progress)
    times["pretrain_s"] = time.perf_counter() - t
    log(f"pre-training done in {times['pretrain_s']:.1f} s: loss {base_hist['loss'][0]:.3f} -> "
        f"{np.mean(base_hist['loss'][-10:]):.3f}")

    adapters, hists = {}, {}
    epochs = s["steps_adapter"] * s["adapter_batch"] / len(train_eps)
    for flavour, shared in (("independent", False), ("shared", True)):
        log(f"adapters ({flavour}): {s['steps_adapter']} steps x {s['adapter_batch']} rows per role "
            f"= {epochs:.1f} epochs")
        t = time.perf_counter()
        lora, hist = train_adapters(model, train_ex, rank=8, alpha=16.0, targets=("q", "v"), shared_a=shared,
                                    steps=s["steps_adapter"], lr=s["lr_adapter"], batch_size=s["adapter_batch"],
                                    seq_len=adapter_seq, seed=args.seed + 1, progress=progress)
        times[f"adapters_{flavour}_s"] = time.perf_counter() - t
        adapters[flavour], hists[flavour] = lora, hist
        log(f"adapters ({flavour}) done in {times[f'adapters_{flavour}_s']:.1f} s: "
            + ", ".join(f"{r} {hist[r][0]:.3f} -> {np.mean(hist[r][-10:]):.3f}" for r in train_ex))

    # Saved before evaluating: an evaluation failure or a timeout cannot lose the weights.
    t = time.perf_counter()
    weights_dtype = save_weights(model, base_dir)
    for flavour, lora in adapters.items():
        save_adapters(lora, os.path.join(out, f"adapters_{flavour}"), base_model_name_or_path=BASE_MODEL_REF)
    plot_losses({"base": base_hist["loss"], **{f"lora_{k}": {r: h[r] for r in train_ex} for k, h in hists.items()}},
                os.path.join(out, "loss.png"), title="miniature training loss", smooth=5)
    times["save_s"] = time.perf_counter() - t
    log(f"saved weights ({weights_dtype}) and adapters in {times['save_s']:.1f} s")

    t = time.perf_counter()
    val_loss = {"base": eval_loss(model, val_ex, None, seq_len=adapter_seq)}
    for flavour, lora in adapters.items():
        val_loss[flavour] = eval_loss(model, val_ex, lora, seq_len=adapter_seq)
    # The same measure on as many training-world trajectories: validation should track it (a
    # gap means the adapters recall training facts instead of copying them from observations).
    seen_ex = {r: exs[: len(val_ex[r])] for r, exs in train_ex.items()}
    train_loss = {flavour: eval_loss(model, seen_ex, lora, seq_len=adapter_seq) for flavour, lora in adapters.items()}
    times["val_loss_s"] = time.perf_counter() - t
    for k, v in val_loss.items():
        log(f"validation loss ({k}): " + ", ".join(f"{r} {x:.4f} (gold p~{np.exp(-x):.2f})" for r, x in v.items()))
    for k, v in train_loss.items():
        log(f"training-world loss, teacher forced ({k}): " + ", ".join(f"{r} {x:.4f}" for r, x in v.items()))

    em, em_rows, em_error = None, [], None
    if s["eval_questions"]:
        t = time.perf_counter()
        log(f"agent loop on {s['eval_questions']} validation questions (non_shared, independent adapters)")
        try:
            em, em_rows = em_on_questions(model, adapters["independent"], tok, world,
                                          world.questions["validation"][: s["eval_questions"]],
                                          cfg.max_position_embeddings, turn_tokens=s["turn_tokens"],
                                          max_steps=s["max_steps"], time_limit=args.eval_seconds)
            log(f"validation EM {em:.3f} over {len(em_rows)} questions ({time.perf_counter() - t:.1f} s)")
        except Exception as e:  # noqa: BLE001 - the trained weights are saved; report and go on
            em_error = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            log(f"agent-loop evaluation failed: {em_error}")
        times["eval_em_s"] = time.perf_counter() - t

    times["total_s"] = time.perf_counter() - t0
    sizes = folder_bytes(out)
    sizes.pop("train_log.json", None)
    record = {
        "world": world_record(world),
        "training_worlds": {"seeds": data.seeds, "config": dataclasses.asdict(
            SMALL_CONFIG if s["world"] == "small" else TRAIN_WORLD_CONFIG)},
        "preset": "tiny" if args.tiny else "default",
        "settings": s,
        "seed": args.seed,
        "model_config": cfg.to_hf_dict(),
        "num_params": cfg.num_params(),
        "weights_dtype": weights_dtype,
        "lora": {"rank": 8, "alpha": 16.0, "targets": ["q", "v"]},
        "adapter_seq_len": adapter_seq,
        "data": {"pretrain_tokens": corpus_tokens, "pretrain_rows": len(rows), "gold_train_episodes": len(train_eps),
                 "gold_train_tokens": gold_tokens, "adapter_epochs": epochs},
        "losses": {"base": base_hist["loss"], **{f"adapters_{k}": h for k, h in hists.items()}},
        "validation_loss": val_loss,
        "training_world_loss": train_loss,
        "validation_em": em,
        "validation_em_questions": em_rows,
        "validation_em_error": em_error,
        "times_s": times,
        "device_kind": jax.devices()[0].device_kind,
        "backend": jax.default_backend(),
        "jax_version": jax.__version__,
        "file_bytes": sizes,
        "total_bytes": int(sum(sizes.values())),
    }
    with open(os.path.join(out, "train_log.json"), "w") as f:
        json.dump(record, f, indent=1)
    log(f"saved {out}: {record['total_bytes'] / 2**20:.2f} MiB (weights {weights_dtype}); "
        f"model.safetensors {sizes.get('base/model.safetensors', 0) / 2**20:.2f} MiB; total {times['total_s']:.1f} s")
    return {"out": out, "record": record}


def main(argv=None):
    from lragent_jax.cli import UsageError

    try:
        args = parse_args(sys.argv[1:] if argv is None else argv)
        settings(args)  # bad flags fail before any work
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    result = train(args)
    if args.archive:
        log(f"archive: {pack(result['out'], args.archive)} ({os.path.getsize(args.archive) / 2**20:.2f} MiB)")
    if args.install:
        log(f"installed into {install(result['out'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
