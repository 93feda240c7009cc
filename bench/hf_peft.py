#!/usr/bin/env python3
"""Baseline: the paper's 17-step trace with HF transformers + PEFT (torch), eager and tuned.

Two ways to run HF, both with set_adapter per turn (--mode, comma list):
  eager  DynamicCache, the model called as is, catch-up/prefill in chunks of --prefill-chunk: how
         most users run HF.
  tuned  how a user who cares about speed runs HF (transformers' own generate recipe with a static
         cache): one StaticCache per cache owner sized to the trajectory, each catch-up as one
         unchunked sdpa forward, and the one-token decode step under torch.compile (inductor,
         mode="reduce-overhead" = CUDA graphs on cuda; static shapes). The compiled step is built
         once and reused across steps, turns and agents: dynamo keeps one graph per active adapter
         (it guards on PEFT's active-adapter name, so set_adapter picks the right graph) and per
         cache shape; CUDA graph trees keep one recording per cache (StaticCache tensors are static
         addresses). Each (variant, Lctx) first replays the trace once on its own caches (this
         compiles); the timed runs reuse them (reset) and must compile nothing: the JSON records
         compile time, graphs compiled, graphs compiled during timing, graph breaks and CUDA-graph
         skips. Default modes: eager,tuned on cuda; eager on CPU (tuned on CPU compiles with
         inductor's C++ backend, no CUDA graphs: about 95 s for the tiny shape's first graph on a
         busy 2-core box; --compile aot_eager traces the same graphs without code generation).

Variants: hf_non_shared (default): one cache per agent; an agent taking a turn feeds every
trajectory token it has not processed yet into its own cache (lragent_jax's non_shared catch-up),
then greedy-decodes exactly `gen` tokens (the last one is not fed back, as in lragent_jax).
hf_full_shared (--shared-cache): one cache for all agents, no catch-up. Rows are labelled
hf_<variant>_<mode>.

--per-token CTX[,CTX]: a micro-benchmark before the trace: ms per one-token decode step at CTX
tokens of context, one q/v adapter active, for eager DynamicCache, StaticCache eager and StaticCache
+ torch.compile (the issue-15 figures). --no-trace runs only that.
--ours PATH: a bench.trace results.json; its rows are printed and plotted beside HF's.

  python -m bench.hf_peft --shape tiny --quick                    # CPU smoke run
  python -m bench.hf_peft --shape tiny --quick --mode eager,tuned --compile aot_eager
  python -m bench.hf_peft --shape llama-3.1-8b --shared-cache     # GPU: Lctx 1024,4096,8192
  python -m bench.hf_peft --shape llama-3.1-8b --per-token 8192 --no-trace
  python -m bench.hf_peft --shape llama-3.1-8b --per-token 8192 --lctx 8192,1024  # GPU: both modes
  python -m bench.hf_peft --from-json OUT/results.json --ours TRACE_OUT/results.json  # side by side
  python -m bench.hf_peft --model PATH --adapter plan=P --adapter action=A --adapter reflect=R

--shape builds a RANDOM-weight LlamaForCausalLM from lragent_jax's preset config with random q/v
LoRA adapters (rank 8, alpha 16), bf16 on cuda, float32 on CPU, attn_implementation="sdpa".
Same table / results.json / trace.png conventions as bench.trace. Eager timing starts after a
warm-up pass (a short trace), tuned after a full replay per point; torch.cuda.synchronize around
timings on GPU; peak memory is torch.cuda.max_memory_allocated per run (reset before each run).
OOM runs are recorded as OOM.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import inspect
import json
import os
import platform
import statistics
import sys
import time
import warnings

from bench.common import (
    UsageError, check_model_and_adapters, command_line, failed_point, log, results_dir, write_json,
)
from bench.trace import (
    DEFAULT_LCTX, DEFAULT_LCTX_LARGE, PAPER_AT_33K, PAPER_LCTX, QUICK_LCTX, QUICK_SCALE, SHAPES, paper_ratios,
    parse_adapters, parse_int_list, plot, print_table, ratios, random_prefills, token_range, trace_agents,
    trace_steps, trace_total_tokens,
)

VARIANTS = ("non_shared", "full_shared")
MODES = ("eager", "tuned")
COMPILE_BACKENDS = ("inductor", "aot_eager", "none")
PER_TOKEN_KINDS = ("eager_dynamic_cache", "static_cache_eager", "static_cache_compiled")
PER_TOKEN_WARMUP = 8  # CUDA graph trees run a function eagerly once, record it, then replay: >= 3 calls
DYNAMO_RECOMPILE_LIMIT = 256  # graphs per (adapter, cache shape); dynamo's default 8 would fall back to eager
# `past_key_values=` is what transformers 4.x-5.17 accept; 5.24 renames it and warns.
warnings.filterwarnings("ignore", category=FutureWarning, module=r"(transformers|torch|peft)(\.|$)")


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    src = p.add_mutually_exclusive_group()
    src.add_argument("--model", help="HF folder or hub id")
    src.add_argument("--shape", choices=SHAPES, help="random weights of a preset shape (default: tiny)")
    p.add_argument("--adapter", action="append", default=[], metavar="NAME=PATH",
                   help="PEFT adapter folder for agent NAME (repeatable; with --model)")
    p.add_argument("--shared-cache", action="store_true",
                   help="also run hf_full_shared: one cache for all agents, no catch-up")
    p.add_argument("--variants", default=None,
                   help="comma list of non_shared, full_shared (default non_shared; + full_shared with "
                        "--shared-cache)")
    p.add_argument("--mode", default=None,
                   help="comma list of eager, tuned (default eager,tuned on cuda, eager on cpu)")
    p.add_argument("--compile", default="inductor", choices=COMPILE_BACKENDS,
                   help="tuned mode's decode step: torch.compile backend (inductor, the default; aot_eager: "
                        "dynamo graphs without code generation, a fast CPU check; none: StaticCache uncompiled)")
    p.add_argument("--per-token", default=None, metavar="CTX[,CTX]",
                   help="also time one decode step at CTX context tokens: eager DynamicCache, StaticCache "
                        "eager, StaticCache + torch.compile")
    p.add_argument("--per-token-steps", type=int, default=32, help="timed decode steps per --per-token point")
    p.add_argument("--no-trace", action="store_true", help="only the --per-token micro-benchmark")
    p.add_argument("--ours", default=None, metavar="RESULTS_JSON",
                   help="a bench.trace results.json to print and plot beside HF's rows")
    p.add_argument("--from-json", default=None, metavar="RESULTS_JSON",
                   help="run nothing: print and plot an earlier results.json of this script again (with --ours: "
                        "side by side); writes to --out (default: that file's folder)")
    p.add_argument("--lctx", default=None, help="comma list, run in this order (default: 64,256 for tiny, "
                                                 "1024,4096,8192 otherwise)")
    p.add_argument("--paper", action="store_true", help="Lctx = the paper's 256,...,16384")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--device", default=None, help="cuda | cpu | cuda:N (default: cuda when available)")
    p.add_argument("--dtype", default=None, choices=("float32", "bfloat16", "float16"),
                   help="default bfloat16 on cuda, float32 on cpu")
    p.add_argument("--threads", type=int, default=0,
                   help="torch CPU threads (0 = torch's default; 1 is far faster on a busy shared CPU)")
    p.add_argument("--prefill-chunk", type=int, default=4096,
                   help="eager mode: feed catch-up/prefill tokens in chunks of at most this many (0 = all at "
                        "once); tuned mode always feeds each catch-up whole")
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--scale", type=float, default=1.0, help="shrink the fixed steps (smoke tests only)")
    p.add_argument("--quick", action="store_true",
                   help=f"smoke run: Lctx {','.join(map(str, QUICK_LCTX))}, --scale {QUICK_SCALE}")
    p.add_argument("--no-warmup", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--out", default=None, help="output folder (default results/hf_peft/<timestamp>/, git-ignored)")

    from lragent_jax.cli import strict_parser

    args = strict_parser(p).parse_args(argv)
    check_model_and_adapters(args.model, args.adapter)
    for name in ("batch", "repeats", "per_token_steps"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 1")
    if args.threads < 0:
        raise UsageError("--threads must be >= 0")
    if args.prefill_chunk < 0:
        raise UsageError("--prefill-chunk must be >= 0")
    if not args.scale > 0:
        raise UsageError("--scale must be > 0")
    if args.paper and (args.lctx or args.quick):
        raise UsageError("--paper sets Lctx; do not combine it with --lctx or --quick")
    if args.model is None and args.shape is None:
        args.shape = "tiny"
    args.variants_list = _choices(args.variants, VARIANTS, "--variants") or ["non_shared"]
    if args.shared_cache and "full_shared" not in args.variants_list:
        args.variants_list.append("full_shared")
    args.modes_list = _choices(args.mode, MODES, "--mode")  # None: decided by the device (resolve_modes)
    args.per_token_list = parse_int_list(args.per_token, "--per-token") if args.per_token else []
    if args.no_trace and not args.per_token_list:
        raise UsageError("--no-trace leaves nothing to run without --per-token")
    if args.from_json and not os.path.isfile(args.from_json):
        raise UsageError(f"--from-json {args.from_json}: no such file (a bench.hf_peft results.json)")
    if args.ours and not os.path.isfile(args.ours):
        raise UsageError(f"--ours {args.ours}: no such file (a bench.trace results.json)")
    if args.paper:
        args.lctx_list = list(PAPER_LCTX)
    elif args.lctx:
        args.lctx_list = list(dict.fromkeys(parse_int_list(args.lctx, "--lctx")))  # run in the order given
    elif args.quick:
        args.lctx_list = list(QUICK_LCTX)
    else:
        args.lctx_list = list(DEFAULT_LCTX.get(args.shape, DEFAULT_LCTX_LARGE))
    if args.no_trace:
        args.lctx_list = []
    args.scale_value = QUICK_SCALE if args.quick and args.scale == 1.0 else args.scale
    return args


def _choices(text, allowed, flag):
    """'a,b' -> ['a', 'b'] (order kept, duplicates dropped); None for no text; a UsageError naming the flag
    for an unknown or empty list."""
    if text is None:
        return None
    names = list(dict.fromkeys(v.strip() for v in text.split(",") if v.strip()))
    bad = [v for v in names if v not in allowed]
    if bad or not names:
        raise UsageError(f"{flag}: unknown {bad or repr(text)}; allowed: {', '.join(allowed)}")
    return names


def resolve_modes(args, device):
    """--mode's default: eager,tuned on cuda; eager on CPU, where CUDA graphs do not exist."""
    if args.modes_list is None:
        args.modes_list = ["eager", "tuned"] if device.type == "cuda" else ["eager"]
    return args.modes_list


# ---- model -------------------------------------------------------------------------------------
def build(args, torch):
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    from lragent_jax.config import ModelConfig, preset

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    agents = ("plan", "action", "reflect")
    if args.shape:
        cfg = preset(args.shape)
        d = cfg.to_hf_dict()
        hf_cfg = AutoConfig.for_model(d.pop("model_type"), **{k: v for k, v in d.items() if v is not None})
        torch.manual_seed(args.seed)
        with torch.device(device):  # initialise on the device: fast for 8B on a GPU
            base = AutoModelForCausalLM.from_config(hf_cfg, dtype=dtype, attn_implementation="sdpa")
        lcfg = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], lora_dropout=0.0,
                          task_type="CAUSAL_LM")
        model = get_peft_model(base, lcfg, adapter_name=agents[0])
        for a in agents[1:]:
            model.add_adapter(a, lcfg)
        gen = torch.Generator(device="cpu").manual_seed(args.seed + 1)
        with torch.no_grad():  # random A and non-zero B (PEFT initialises B to zero)
            for name, prm in model.named_parameters():
                if ".lora_A." in name:
                    prm.copy_((torch.randn(prm.shape, generator=gen) / prm.shape[1] ** 0.5).to(prm))
                elif ".lora_B." in name:
                    prm.copy_((0.02 * torch.randn(prm.shape, generator=gen)).to(prm))
        model = model.to(device=device, dtype=dtype)
    else:
        adapters = parse_adapters(args.adapter)
        cfg = ModelConfig.from_pretrained(args.model) if os.path.isdir(args.model) else None
        base = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype, attn_implementation="sdpa").to(device)
        if cfg is None:
            cfg = ModelConfig.from_hf_dict(base.config.to_dict())
        names = list(adapters)
        model = PeftModel.from_pretrained(base, adapters[names[0]], adapter_name=names[0])
        for n in names[1:]:
            model.load_adapter(adapters[n], adapter_name=n)
        model = model.to(device)
    model.eval()
    return model, cfg, device, dtype


# ---- the decode step, eager and tuned ------------------------------------------------------------
def cache_kwarg(hf_model) -> str:
    """The forward argument that takes the KV cache: transformers 5.24 renames past_key_values to cache
    (5.17 knows only past_key_values); the compiled step passes the current name, so no deprecation shim
    runs inside the graph."""
    return "cache" if "cache" in inspect.signature(type(hf_model).forward).parameters else "past_key_values"


def eager_decode(model, tok, cache):
    """Eager mode's one-token step: the PEFT model called as users call it."""
    return model(input_ids=tok[:, None], past_key_values=cache, use_cache=True).logits[:, -1].argmax(-1)


def dynamo_counts(torch) -> dict:
    """Running totals: graphs dynamo compiled, graph breaks, CUDA graph skips (inductor falling back to
    plain kernel launches)."""
    from torch._dynamo.utils import counters

    return {"graphs": int(counters["stats"]["unique_graphs"]),
            "graph_breaks": int(sum(counters["graph_break"].values())),
            "cudagraph_skips": int(counters["inductor"]["cudagraph_skips"])}


def counts_since(torch, before: dict) -> dict:
    now = dynamo_counts(torch)
    return {k: now[k] - before[k] for k in now}


class DecodeStep:
    """Tuned mode's one-token decode step on a StaticCache: tok [B] -> next greedy token [B].

    One torch.compile'd function for the whole run, as transformers' generate compiles its model once
    (get_compiled_call): backend inductor, mode "reduce-overhead" (CUDA graphs) on cuda, dynamic=False
    (the cache length is a static shape). Dynamo guards on PEFT's active-adapter name, so set_adapter
    switches to (or compiles once) that adapter's graph: the compiled step never runs a stale adapter.
    The StaticCache tensors are marked static addresses by transformers when the eager prefill
    allocates them, so CUDA graph trees record each cache once and replay it with in-place updates.
    """

    def __init__(self, model, torch, *, backend="inductor", cudagraphs=True):
        self.torch = torch
        hf = model.get_base_model()
        kw = cache_kwarg(hf)
        self.hf, self.kw = hf, kw

        def step(input_ids, cache):
            return hf(input_ids=input_ids, use_cache=True, **{kw: cache}).logits[:, -1].argmax(-1)

        self.eager_step = step
        self.backend = backend
        self.cudagraphs = backend == "inductor" and cudagraphs
        if backend == "none":
            self.fn = step
        else:
            # More graphs than dynamo's default limit (adapters x cache shapes); hitting it would silently
            # run eager, so make that an error instead.
            torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit,
                                                        DYNAMO_RECOMPILE_LIMIT)
            if hasattr(torch._dynamo.config, "fail_on_recompile_limit_hit"):
                torch._dynamo.config.fail_on_recompile_limit_hit = True
            opts = {"mode": "reduce-overhead"} if self.cudagraphs else {}
            self.fn = torch.compile(step, backend=backend, dynamic=False, **opts)
        self.compile_s = 0.0  # wall time of the calls that compiled a new graph

    def uncompiled(self, tok, cache):
        """The same step without torch.compile (the StaticCache eager figure)."""
        return self.eager_step(tok[:, None], cache)

    def prefill(self, ids, cache):
        """One unchunked sdpa forward over `ids` (eager: its shape changes every turn); the last position's logits."""
        return self.hf(input_ids=ids, use_cache=True, logits_to_keep=1, **{self.kw: cache}).logits[:, -1]

    def __call__(self, tok, cache):
        torch = self.torch
        if self.cudagraphs:
            # Each call starts a new CUDA-graph generation: the previous output (cloned below) is not reused.
            torch.compiler.cudagraph_mark_step_begin()
        graphs = dynamo_counts(torch)["graphs"] if self.backend != "none" else 0
        t0 = time.perf_counter()
        out = self.fn(tok[:, None], cache)
        if self.backend != "none" and dynamo_counts(torch)["graphs"] != graphs:
            self.compile_s += time.perf_counter() - t0
        # A CUDA graph's output lives in its memory pool and is overwritten by the next replay.
        return out.clone() if self.cudagraphs else out


def new_static_caches(model, owners, max_len):
    """One StaticCache per owner; tensors are allocated on the first (eager) prefill."""
    from transformers import StaticCache

    cfg = model.get_base_model().config
    return {o: StaticCache(config=cfg, max_cache_len=max_len) for o in owners}


def cache_nbytes(cache) -> int:
    total = 0
    layers = getattr(cache, "layers", None)
    if layers is not None:
        for layer in layers:
            for name in ("keys", "values"):
                t = getattr(layer, name, None)
                if t is not None and hasattr(t, "numel"):
                    total += t.numel() * t.element_size()
        return total
    for ts in (getattr(cache, "key_cache", []), getattr(cache, "value_cache", [])):
        total += sum(t.numel() * t.element_size() for t in ts)
    return total


# ---- the trace ---------------------------------------------------------------------------------
def run_hf_trace(model, cfg, device, lctx, *, variant, mode="eager", batch=1, seed=0, scale=1.0, prefill_chunk=4096,
                 progress=True, torch=None, caches=None, decode_step=None, return_tokens=False):
    """One replay of the trace. eager: fresh DynamicCaches, chunked prefill, eager_decode. tuned: `caches`
    (owner -> StaticCache from new_static_caches; reset here) and `decode_step` (a DecodeStep), each
    catch-up one unchunked forward. return_tokens adds "tokens": per step, the [batch][gen] greedy tokens."""
    from tqdm.auto import tqdm
    from transformers import DynamicCache

    if mode not in MODES:
        raise ValueError(f"mode {mode!r}: expected one of {MODES}")
    tuned = mode == "tuned"
    if tuned and (caches is None or decode_step is None):
        raise ValueError("mode 'tuned' needs caches (new_static_caches) and decode_step (DecodeStep)")
    steps = trace_steps(lctx, scale=scale)
    agents = trace_agents(steps)
    per_row = trace_total_tokens(lctx, scale=scale)
    prefills = random_prefills(cfg, steps, batch=batch, seed=seed)
    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    shared = variant == "full_shared"
    owners = ["*"] if shared else list(agents)
    if tuned:
        if sorted(caches) != sorted(owners):
            raise ValueError(f"caches are for {sorted(caches)}; hf_{variant} needs {sorted(owners)}")
        for c in caches.values():
            c.reset()  # in place: the same addresses, so the recorded CUDA graphs stay valid
    else:
        caches = {a: DynamicCache() for a in owners}
    held = {a: 0 for a in owners}
    processed = 0
    traj = torch.empty((batch, 0), dtype=torch.long, device=device)
    rows, tokens = [], []
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    bar = tqdm(total=len(steps), desc=f"hf_{variant}_{mode} Lctx={lctx}", disable=not progress, leave=False)
    # Tuned runs under no_grad like transformers' generate (inference tensors are a needless risk for
    # compiled graphs that update the cache in place); eager under inference_mode as before.
    with torch.no_grad() if tuned else torch.inference_mode():
        sync()
        t_start = time.perf_counter()
        for st, toks in zip(steps, prefills):
            traj = torch.cat([traj, torch.tensor(toks, dtype=torch.long, device=device)], dim=1)
            owner = "*" if shared else st.agent
            cache = caches[owner]
            T = traj.shape[1]
            t0 = time.perf_counter()
            model.set_adapter(st.agent)
            catch_up = processed - held[owner]
            new = T - max(processed, held[owner])
            pos = held[owner]
            if tuned:
                logits = decode_step.prefill(traj[:, pos:T], cache)
            else:
                chunk = prefill_chunk or T
                while pos < T:
                    end = min(T, pos + chunk)
                    out = model(input_ids=traj[:, pos:end], past_key_values=cache, use_cache=True, logits_to_keep=1)
                    logits = out.logits[:, -1]
                    pos = end
            tok = logits.argmax(-1)
            first = tok.tolist()  # device -> host: the first token is known
            sync()
            t1 = time.perf_counter()
            gen = [tok]
            for _ in range(st.gen - 1):
                tok = decode_step(tok, cache) if tuned else eager_decode(model, tok, cache)
                gen.append(tok)
            gen = torch.stack(gen, dim=1)
            gen_host = gen.tolist()
            sync()
            t2 = time.perf_counter()
            assert len(first) == batch and all(len(r) == st.gen for r in gen_host)
            held[owner] = T + st.gen - 1  # the last generated token is not fed back
            processed = held[owner]
            traj = torch.cat([traj, gen], dim=1)
            if return_tokens:
                tokens.append(gen_host)
            rows.append({"step": st.step, "agent": st.agent, "prefill": st.prefill, "gen": st.gen,
                         "catch_up_tokens": catch_up * batch, "new_tokens": new * batch,
                         "prefill_s": t1 - t0, "ttft_s": t1 - t0, "decode_s": t2 - t1})
            bar.update(1)
        sync()
        e2e = time.perf_counter() - t_start
    bar.close()
    if traj.shape[1] != per_row:
        raise RuntimeError(f"trajectory has {traj.shape[1]} tokens; expected {per_row}")
    cache_bytes = sum(cache_nbytes(c) for c in caches.values())
    peak = int(torch.cuda.max_memory_allocated(device)) if cuda else None
    del caches, traj
    total = per_row * batch
    decode_s = sum(r["decode_s"] for r in rows)
    decode_steps = sum(r["gen"] - 1 for r in rows)  # one-token forwards per row (the first token is prefill's)
    res = {
        "scheme": f"hf_{variant}", "label": f"hf_{variant}_{mode}", "variant": variant, "mode": mode,
        "lctx": int(lctx), "scale": float(scale),
        "batch": batch, "tokens_per_row": per_row, "total_tokens": total, "steps": rows,
        "ttft_s": sum(r["ttft_s"] for r in rows), "decode_s": decode_s,
        "decode_ms_per_token": 1e3 * decode_s / decode_steps if decode_steps else None,
        "end_to_end_s": e2e, "throughput_tok_s": total / e2e if e2e > 0 else float("nan"),
        "catch_up_tokens": sum(r["catch_up_tokens"] for r in rows),
        "new_tokens": sum(r["new_tokens"] for r in rows),
        "generated_tokens": sum(r["gen"] for r in rows) * batch,
        "cache_bytes": int(cache_bytes), "peak_bytes": peak, "peak_is_own": True if peak is not None else None,
    }
    if return_tokens:
        res["tokens"] = tokens
    return res


def run_point(model, cfg, device, lctx, variant, mode, args, decode_step, torch):
    """Median of --repeats replays. Tuned: caches sized to the trajectory, a first replay that compiles
    (timed apart as warmup_s / compile_s), then the timed replays on the same caches."""
    common = dict(variant=variant, mode=mode, batch=args.batch, seed=args.seed, scale=args.scale_value,
                  prefill_chunk=args.prefill_chunk, progress=not args.no_progress, torch=torch)
    extra = {"compile_backend": None, "warmup_s": None, "compile_s": None, "graphs_compiled_warmup": 0,
             "compiles_during_timing": 0, "graph_breaks": 0, "cudagraph_skips": 0}
    if mode == "tuned":
        owners = ["*"] if variant == "full_shared" else ["plan", "action", "reflect"]
        common["caches"] = new_static_caches(model, owners, trace_total_tokens(lctx, scale=args.scale_value))
        common["decode_step"] = decode_step
        extra["compile_backend"] = decode_step.backend
        extra["cudagraphs"] = decode_step.cudagraphs
        if not args.no_warmup:
            before, c0, tw = dynamo_counts(torch), decode_step.compile_s, time.perf_counter()
            run_hf_trace(model, cfg, device, lctx, **common)
            done = counts_since(torch, before)
            extra.update(warmup_s=time.perf_counter() - tw, compile_s=decode_step.compile_s - c0,
                         graphs_compiled_warmup=done["graphs"], graph_breaks=done["graph_breaks"],
                         cudagraph_skips=done["cudagraph_skips"])
    before = dynamo_counts(torch)
    reps = [run_hf_trace(model, cfg, device, lctx, **common) for _ in range(args.repeats)]
    done = counts_since(torch, before)
    extra["compiles_during_timing"] = done["graphs"]
    extra["graph_breaks"] += done["graph_breaks"]
    extra["cudagraph_skips"] += done["cudagraph_skips"]
    e2e = [r["end_to_end_s"] for r in reps]
    res = dict(sorted(reps, key=lambda r: r["end_to_end_s"])[(len(reps) - 1) // 2])
    res.update(extra, status="ok", repeats_end_to_end_s=e2e, repeats_ttft_s=[r["ttft_s"] for r in reps],
               end_to_end_s_stdev=statistics.stdev(e2e) if len(e2e) > 1 else 0.0,
               compile_excluded=not args.no_warmup or mode == "eager")
    return res


# ---- one decode step at a fixed context (--per-token) --------------------------------------------
def per_token_point(model, cfg, device, ctx, kind, *, steps, batch, seed, decode_step, torch):
    """ms per one-token decode step after `ctx` context tokens, first adapter active. kind: eager
    DynamicCache (eager mode's step), StaticCache eager (the tuned step uncompiled) or StaticCache +
    the compiled step. The context is prefilled in one forward; PER_TOKEN_WARMUP untimed steps
    (compiling and recording CUDA graphs for the compiled kind) come before the `steps` timed ones."""
    from transformers import DynamicCache, StaticCache

    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    adapter = next(iter(model.peft_config))
    model.set_adapter(adapter)
    low, high = token_range(cfg)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    ids = torch.randint(low, high, (batch, ctx), generator=gen).to(device)
    static = kind != "eager_dynamic_cache"
    hf = model.get_base_model()
    cache = (StaticCache(config=hf.config, max_cache_len=ctx + PER_TOKEN_WARMUP + steps) if static
             else DynamicCache())
    if kind == "static_cache_compiled":
        step = decode_step
    elif kind == "static_cache_eager":
        step = decode_step.uncompiled
    else:
        step = lambda tok, c: eager_decode(model, tok, c)  # noqa: E731
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    with torch.no_grad() if static else torch.inference_mode():
        tok = decode_step.prefill(ids, cache).argmax(-1)
        before, c0 = dynamo_counts(torch), decode_step.compile_s
        sync()
        toks = [tok]
        tw = time.perf_counter()
        for _ in range(PER_TOKEN_WARMUP):
            tok = step(tok, cache)
            toks.append(tok)
        sync()
        warm = time.perf_counter() - tw
        compiled = counts_since(torch, before)
        before = dynamo_counts(torch)
        t0 = time.perf_counter()
        for _ in range(steps):
            tok = step(tok, cache)
            toks.append(tok)
        sync()
        elapsed = time.perf_counter() - t0
        timing = counts_since(torch, before)
        tokens = torch.stack(toks, dim=1)[0].tolist()
    peak = int(torch.cuda.max_memory_allocated(device)) if cuda else None
    res = {"kind": kind, "context": ctx, "batch": batch, "adapter": adapter, "steps": steps,
           "ms_per_token": 1e3 * elapsed / steps, "warmup_steps": PER_TOKEN_WARMUP, "warmup_s": warm,
           "cache_bytes": cache_nbytes(cache), "peak_bytes": peak, "status": "ok", "tokens": tokens}
    if kind == "static_cache_compiled":
        res.update(compile_backend=decode_step.backend, cudagraphs=decode_step.cudagraphs,
                   compile_s=decode_step.compile_s - c0, graphs_compiled_warmup=compiled["graphs"],
                   compiles_during_timing=timing["graphs"],
                   graph_breaks=compiled["graph_breaks"] + timing["graph_breaks"],
                   cudagraph_skips=compiled["cudagraph_skips"] + timing["cudagraph_skips"])
    return res


def run_per_token(model, cfg, device, args, decode_step, torch):
    kinds = [k for k in PER_TOKEN_KINDS if k != "static_cache_compiled" or decode_step.backend != "none"]
    out = []
    for ctx in args.per_token_list:
        for kind in kinds:
            log(f"per-token: {kind} at {ctx} context tokens ...")
            base = {"kind": kind, "context": ctx, "batch": args.batch, "steps": args.per_token_steps}
            try:
                r = per_token_point(model, cfg, device, ctx, kind, steps=args.per_token_steps, batch=args.batch,
                                    seed=args.seed, decode_step=decode_step, torch=torch)
                log(f"    {r['ms_per_token']:.2f} ms/token" + (
                    f" (compile {r['compile_s']:.1f} s, {r['graphs_compiled_warmup']} graph(s), "
                    f"{r['compiles_during_timing']} during timing)" if "compile_s" in r else ""))
            except Exception as e:  # noqa: BLE001
                r = failed_point(e, {**base, "label": kind, "lctx": ctx, "tokens_per_row": ctx})
            out.append(r)
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
        ref = next((r for r in out if r["context"] == ctx and r["kind"] == kinds[0] and r["status"] == "ok"), None)
        for r in out:
            if ref and r["context"] == ctx and r["status"] == "ok":
                # Greedy tokens (row 0) that match eager DynamicCache's before the first difference: all of
                # them in float32; in bf16 a static cache's masked attention may round differently.
                r["same_tokens_as_eager"] = next((i for i, (a, b) in enumerate(zip(r["tokens"], ref["tokens"]))
                                                  if a != b), len(r["tokens"]))
    return out


def print_per_token(rows):
    log(f"\n{'decode step (1 token)':<24} {'context':>8} {'batch':>5} {'ms/token':>9} {'compile s':>10} "
        f"{'recompiles':>10} {'same tokens':>11}")
    for r in rows:
        if r.get("status") != "ok":
            log(f"{r['kind']:<24} {r['context']:>8} {r['batch']:>5} {r['status']:>9}")
            continue
        comp = f"{r['compile_s']:.1f}" if r.get("compile_s") is not None else "-"
        rec = str(r["compiles_during_timing"]) if "compiles_during_timing" in r else "-"
        same = f"{r['same_tokens_as_eager']}/{len(r['tokens'])}" if "same_tokens_as_eager" in r else "-"
        log(f"{r['kind']:<24} {r['context']:>8} {r['batch']:>5} {r['ms_per_token']:>9.2f} {comp:>10} {rec:>10} "
            f"{same:>11}")


# ---- reporting -----------------------------------------------------------------------------------
def mode_ratios(results, modes):
    """Per mode: full_shared against non_shared (TTFT non_shared/full_shared, throughput full/non)."""
    return {m: ratios(results, ref=f"hf_non_shared_{m}", ours=f"hf_full_shared_{m}") for m in modes}


def print_mode_ratios(by_mode):
    p_ttft, p_tput = paper_ratios("full_shared")
    for m, rs in by_mode.items():
        if not rs:
            continue
        log(f"\nratios, {m} (paper, Llama-3.1-8B on an A6000 at 33.7k tokens, full_shared vs non_shared: "
            f"TTFT {p_ttft:.2f}x, throughput {p_tput:.2f}x)")
        for r in rs:
            log(f"  Lctx {r['lctx']:>6} batch {r['batch']} ({r['tokens_per_row']} tokens): TTFT "
                f"non_shared/full_shared = {r['ttft_ratio']:.2f}x, throughput full_shared/non_shared = "
                f"{r['throughput_ratio']:.2f}x")


def tuned_vs_eager(results):
    """Per (variant, Lctx, batch) where both modes ran: how much faster tuned HF is than eager HF."""
    by = {(r["label"], r["lctx"], r["batch"]): r for r in results if r.get("status") == "ok"}
    out = []
    for v in VARIANTS:
        for lctx, batch in sorted({(r["lctx"], r["batch"]) for r in results}):
            e, t = by.get((f"hf_{v}_eager", lctx, batch)), by.get((f"hf_{v}_tuned", lctx, batch))
            if e and t:
                out.append({"variant": v, "lctx": lctx, "batch": batch, "tokens_per_row": e["tokens_per_row"],
                            "end_to_end_speedup": e["end_to_end_s"] / t["end_to_end_s"],
                            "ttft_speedup": e["ttft_s"] / t["ttft_s"],
                            "decode_ms_per_token_eager": e["decode_ms_per_token"],
                            "decode_ms_per_token_tuned": t["decode_ms_per_token"]})
    if out:
        log(f"\n{'tuned vs eager':<14} {'Lctx':>6} {'batch':>5} {'e2e x':>7} {'TTFT x':>7} "
            f"{'eager ms/tok':>12} {'tuned ms/tok':>12}")
        for r in out:
            log(f"{r['variant']:<14} {r['lctx']:>6} {r['batch']:>5} {r['end_to_end_speedup']:>7.2f} "
                f"{r['ttft_speedup']:>7.2f} {r['decode_ms_per_token_eager']:>12.2f} "
                f"{r['decode_ms_per_token_tuned']:>12.2f}")
    return out


def load_ours(path, batch):
    """The ok rows of a bench.trace results.json at `batch`, labelled ours_<scheme>, with
    decode_ms_per_token computed as for HF rows (decode time / one-token forwards per row)."""
    try:
        with open(path) as f:
            data = json.load(f)
        rows = data["results"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UsageError(f"--ours {path}: not a bench.trace results.json ({type(e).__name__}: {e})") from e
    out = []
    for r in rows:
        if r.get("status") != "ok" or r.get("batch", 1) != batch:
            continue
        n_steps = len(r.get("steps", []))
        r = {k: v for k, v in r.items() if k != "steps"} | {"label": f"ours_{r['label']}", "steps_count": n_steps}
        forwards = r.get("generated_tokens", 0) / r.get("batch", 1) - r["steps_count"]
        r["decode_ms_per_token"] = 1e3 * r["decode_s"] / forwards if forwards > 0 and "decode_s" in r else None
        out.append(r)
    return {"path": path, "card": data.get("card"), "jax_version": data.get("jax_version"), "date": data.get("date"),
            "model": data.get("model"), "rows": out}


def side_by_side(ours_rows, results):
    """The paper's trace, ours against HF eager and tuned at each Lctx: one table, and per our row the
    end-to-end speed-up over hf_non_shared_eager and hf_non_shared_tuned (what a HF + PEFT user runs)."""
    hf = {(r["label"], r["lctx"], r["batch"]): r for r in results if r.get("status") == "ok"}
    rows, out = [], []
    for lctx in sorted({r["lctx"] for r in results} & {r["lctx"] for r in ours_rows}):
        rows += [r for r in ours_rows if r["lctx"] == lctx] + [r for r in results if r["lctx"] == lctx]
    if not rows:
        log("\n(--ours: no Lctx in common with this run)")
        return out
    log(f"\n{'side by side':<24} {'Lctx':>6} {'tokens':>7} {'tput tok/s':>11} {'TTFT s':>8} {'e2e s':>8} "
        f"{'ms/tok':>7} {'vs HF eager':>11} {'vs HF tuned':>11}")
    for r in rows:
        if r.get("status") != "ok":
            log(f"{r['label']:<24} {r['lctx']:>6} {r['tokens_per_row']:>7} {r.get('status', '?'):>11}")
            continue
        speed = {}
        for m in MODES:
            ref = hf.get((f"hf_non_shared_{m}", r["lctx"], r.get("batch", 1)))
            speed[m] = ref["end_to_end_s"] / r["end_to_end_s"] if ref else None
        ms = r.get("decode_ms_per_token")
        log(f"{r['label']:<24} {r['lctx']:>6} {r['tokens_per_row']:>7} {r['throughput_tok_s']:>11.1f} "
            f"{r['ttft_s']:>8.3f} {r['end_to_end_s']:>8.3f} {'-' if ms is None else format(ms, '.2f'):>7} "
            + " ".join(f"{'-' if speed[m] is None else format(speed[m], '.2f') + 'x':>11}" for m in MODES))
        out.append({"label": r["label"], "lctx": r["lctx"], "batch": r.get("batch", 1),
                    "end_to_end_speedup_vs_hf_non_shared_eager": speed["eager"],
                    "end_to_end_speedup_vs_hf_non_shared_tuned": speed["tuned"]})
    log("vs HF <mode>: hf_non_shared_<mode> end-to-end time / the row's (same Lctx and batch)")
    return out


def finish(payload, ours, out, t_start, *, compile_excluded):
    """Print the tables (per-token, trace, ratios, tuned vs eager, side by side with --ours) and write
    results.json and trace.png to `out`."""
    results, per_token, modes = payload["results"], payload["per_token"], payload["modes"]
    results.sort(key=lambda r: (MODES.index(r["mode"]), VARIANTS.index(r["variant"]), r["lctx"]))
    if per_token:
        print_per_token(per_token)
    by_mode, vs = {}, []
    if results:
        log(f"\ncompile/warm-up excluded: {compile_excluded}; throughput = trajectory tokens of all rows / "
            "end-to-end time")
        cuda = payload["device"].startswith("cuda")
        print_table(results, peak_note="peak MiB: torch.cuda.max_memory_allocated per run" if cuda
                    else "peak MiB: '-' on CPU")
        by_mode = mode_ratios(results, modes)
        print_mode_ratios(by_mode)
        vs = tuned_vs_eager(results)
    sbs = side_by_side(ours["rows"], results) if ours and results else []
    payload.update(ratios=by_mode, tuned_vs_eager=vs, ours=ours, side_by_side=sbs,
                   wall_s=time.perf_counter() - t_start)
    os.makedirs(out, exist_ok=True)
    jpath = os.path.join(out, "results.json")
    write_json(jpath, payload)
    ppath = None
    if results:
        args = payload["args"]
        ppath = plot(results + (ours["rows"] if ours else []), os.path.join(out, "trace.png"),
                     f"HF transformers + PEFT trace ({', '.join(modes)}): {payload['model']} "
                     f"({payload['dtype']}, batch {args['batch']}) on {payload['card']}" + (" vs ours" if ours else ""))
    log(f"\nwrote {jpath}" + (f" and {ppath}" if ppath else "") + f" in {time.perf_counter() - t_start:.1f} s")


def report_only(args, ours, t_start):
    """--from-json: the tables and plot again from an earlier results.json of this script, no model run
    (with --ours: side by side with a bench.trace run made apart)."""
    try:
        with open(args.from_json) as f:
            payload = json.load(f)
        missing = [k for k in ("results", "per_token", "modes", "device", "args") if k not in payload]
        missing += [f"results[{i}].{k}" for i, r in enumerate(payload.get("results", []))
                    for k in ("mode", "variant") if k not in r]  # rows of the eager-only version lack these
        if missing:
            raise KeyError(", ".join(missing[:4]))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise UsageError(f"--from-json {args.from_json}: not a bench.hf_peft results.json "
                         f"({type(e).__name__}: {e})") from e
    if not payload.get("complete", True):
        log(f"NOTE: {args.from_json} is from a run that did not finish (complete: false)")
    finish(payload, ours, args.out or os.path.dirname(os.path.abspath(args.from_json)), t_start,
           compile_excluded=not payload["args"].get("no_warmup", False))
    return 0


def main(argv=None):
    t_start = time.perf_counter()
    try:
        args = parse_args(sys.argv[1:] if argv is None else argv)
        ours = load_ours(args.ours, args.batch) if args.ours else None
        if args.from_json:
            return report_only(args, ours, t_start)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    import torch

    if args.threads > 0:
        torch.set_num_threads(args.threads)

    out = results_dir("hf_peft", args.out)
    t0 = time.perf_counter()
    try:
        model, cfg, device, dtype = build(args, torch)
    except (ValueError, KeyError, FileNotFoundError, OSError) as e:
        print(f"error: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
    cuda = device.type == "cuda"
    modes = resolve_modes(args, device)
    card = torch.cuda.get_device_name(device) if cuda else (platform.processor() or "cpu")
    import peft
    import transformers

    log(f"device: {card} ({device}), torch {torch.__version__}, transformers {transformers.__version__}, "
        f"peft {peft.__version__}; model {args.shape or args.model} ({dtype}) ready in "
        f"{time.perf_counter() - t0:.1f} s")
    decode_step = None
    if "tuned" in modes or args.per_token_list:
        decode_step = DecodeStep(model, torch, backend=args.compile, cudagraphs=cuda)
        log(f"tuned decode step: torch.compile backend {args.compile}"
            + (", mode reduce-overhead (CUDA graphs)" if decode_step.cudagraphs else ", no CUDA graphs")
            + ("" if cuda or args.compile != "inductor" else
               "; NOTE: inductor on CPU compiles C++ (minutes for the first graph on a small machine)"))
    scale = args.scale_value
    if scale != 1.0:
        log(f"NOTE: --scale {scale}: fixed step sizes shrunk; this is not the paper's trace")

    meta = {
        "benchmark": "HF transformers + PEFT trace baseline, eager and tuned (docs/trace.md)",
        "card": card, "device": str(device), "torch_version": torch.__version__,
        "transformers_version": transformers.__version__, "peft_version": peft.__version__,
        "python": platform.python_version(), "host": platform.node(),
        "date": datetime.datetime.now().isoformat(timespec="seconds"), "command": command_line(), "args": vars(args),
        "model": args.shape or args.model, "random_weights": args.shape is not None, "dtype": str(dtype),
        "modes": modes, "compile_backend": args.compile if decode_step else None,
        "cudagraphs": decode_step.cudagraphs if decode_step else None,
        "scale": scale, "lctx": args.lctx_list, "paper_throughput_tok_s_and_ttft_s_at_33k": PAPER_AT_33K,
    }
    jpath = os.path.join(out, "results.json")

    def save_partial():  # after every point: a run cut short by a time limit keeps what finished
        write_json(jpath, meta | {"complete": False, "per_token": per_token, "results": results,
                                  "wall_s": time.perf_counter() - t_start})

    results = []
    per_token = run_per_token(model, cfg, device, args, decode_step, torch) if args.per_token_list else []
    save_partial()
    if args.lctx_list and "eager" in modes and not args.no_warmup:
        tw = time.perf_counter()
        for v in args.variants_list:  # CUDA context, cuBLAS handles, SDPA kernels; no JIT to warm in eager torch
            run_hf_trace(model, cfg, device, 16, variant=v, batch=args.batch, seed=args.seed + 1, scale=QUICK_SCALE,
                         prefill_chunk=args.prefill_chunk, progress=not args.no_progress, torch=torch)
        log(f"eager warm-up {time.perf_counter() - tw:.1f} s (a short trace per variant)")

    failed = any(r["status"] == "ERROR" for r in per_token)
    for lctx in args.lctx_list:
        for v in args.variants_list:
            for mode in modes:
                total = trace_total_tokens(lctx, scale=scale)
                label = f"hf_{v}_{mode}"
                log(f"[{time.perf_counter() - t_start:7.1f}s] {label} Lctx={lctx} ({total} tokens/row) ...")
                base = {"scheme": f"hf_{v}", "label": label, "variant": v, "mode": mode, "lctx": lctx,
                        "batch": args.batch, "scale": scale, "tokens_per_row": total,
                        "total_tokens": total * args.batch}
                try:
                    res = run_point(model, cfg, device, lctx, v, mode, args, decode_step, torch)
                    log(f"    {res['throughput_tok_s']:.1f} tok/s, TTFT {res['ttft_s']:.3f} s, e2e "
                        f"{res['end_to_end_s']:.3f} s, decode {res['decode_ms_per_token']:.2f} ms/token"
                        + (f"; warm-up {res['warmup_s']:.1f} s (compile {res['compile_s']:.1f} s, "
                           f"{res['graphs_compiled_warmup']} graph(s)), {res['compiles_during_timing']} compiled "
                           f"during timing" if mode == "tuned" and res["warmup_s"] is not None else ""))
                except Exception as e:  # noqa: BLE001
                    res = failed_point(e, base)
                    failed |= res["status"] == "ERROR"
                gc.collect()
                if cuda:
                    torch.cuda.empty_cache()
                    res["allocated_after_bytes"] = int(torch.cuda.memory_allocated(device))  # leaks show here
                results.append(res)
                save_partial()

    payload = meta | {"complete": True, "per_token": per_token, "results": results,
                      "compile_s_total": decode_step.compile_s if decode_step else 0.0}
    finish(payload, ours, out, t_start, compile_excluded=not args.no_warmup)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
