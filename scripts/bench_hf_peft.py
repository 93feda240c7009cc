#!/usr/bin/env python3
"""Baseline: the paper's 17-step trace with HF transformers + PEFT (torch), as users would run it.

hf_non_shared (default): one DynamicCache per agent and set_adapter per turn. When an agent
takes a turn it feeds every trajectory token it has not processed yet into its own cache (the
same catch-up as lragent_jax's non_shared), then greedy-decodes exactly `gen` tokens with a
manual loop (the last generated token is not fed back, as in lragent_jax).
hf_full_shared (--shared-cache): one DynamicCache for all agents, no catch-up (the full_shared
analogue: the cache holds whichever adapter processed each token).

  python scripts/bench_hf_peft.py --shape tiny --quick                    # CPU smoke run
  python scripts/bench_hf_peft.py --shape llama-3.1-8b --shared-cache     # GPU: Lctx 1024,4096,8192
  python scripts/bench_hf_peft.py --model PATH --adapter plan=P --adapter action=A --adapter reflect=R

--shape builds a RANDOM-weight LlamaForCausalLM from lragent_jax's preset config with random q/v
LoRA adapters (rank 8, alpha 16), bf16 on cuda, float32 on CPU, attn_implementation="sdpa".
Same table / results.json / trace.png conventions as bench_trace.py. Timing starts after a
warm-up pass (a short trace), with torch.cuda.synchronize around timings on GPU; peak memory is
torch.cuda.max_memory_allocated per run (reset before each run). OOM runs are recorded as OOM.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import os
import platform
import statistics
import sys
import time
import warnings

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))
sys.path.insert(0, HERE)

from bench_trace import (  # noqa: E402
    DEFAULT_LCTX, DEFAULT_LCTX_LARGE, PAPER_AT_33K, PAPER_LCTX, QUICK_LCTX, QUICK_SCALE, SHAPES, UsageError, default_out,
    failed_point, log, parse_adapters, parse_int_list, plot, print_ratios, print_table, ratios, write_json,
)

VARIANTS = ("non_shared", "full_shared")
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
                   help="also run hf_full_shared: one DynamicCache for all agents, no catch-up")
    p.add_argument("--variants", default=None,
                   help="comma list of non_shared, full_shared (default non_shared; + full_shared with "
                        "--shared-cache)")
    p.add_argument("--lctx", default=None, help="comma list (default: 64,256 for tiny, 1024,4096,8192 otherwise)")
    p.add_argument("--paper", action="store_true", help="Lctx = the paper's 256,...,16384")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--device", default=None, help="cuda | cpu | cuda:N (default: cuda when available)")
    p.add_argument("--dtype", default=None, choices=("float32", "bfloat16", "float16"),
                   help="default bfloat16 on cuda, float32 on cpu")
    p.add_argument("--threads", type=int, default=0,
                   help="torch CPU threads (0 = torch's default; 1 is far faster on a busy shared CPU)")
    p.add_argument("--prefill-chunk", type=int, default=4096,
                   help="feed catch-up/prefill tokens in chunks of at most this many (0 = all at once)")
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--scale", type=float, default=1.0, help="shrink the fixed steps (smoke tests only)")
    p.add_argument("--quick", action="store_true",
                   help=f"smoke run: Lctx {','.join(map(str, QUICK_LCTX))}, --scale {QUICK_SCALE}")
    p.add_argument("--no-warmup", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--out", default=None, help="output folder (default bench/results/hf-peft-<date>)")

    from lragent_jax.cli import check_model_and_adapters, strict_parser

    args = strict_parser(p).parse_args(argv)
    check_model_and_adapters(args.model, args.adapter)
    for name in ("batch", "repeats"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name} must be >= 1")
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
    if args.variants:
        args.variants_list = list(dict.fromkeys(v.strip() for v in args.variants.split(",") if v.strip()))
        bad = [v for v in args.variants_list if v not in VARIANTS]
        if bad or not args.variants_list:
            raise UsageError(f"--variants: unknown {bad}; allowed: {', '.join(VARIANTS)}")
        if args.shared_cache and "full_shared" not in args.variants_list:
            args.variants_list.append("full_shared")
    else:
        args.variants_list = ["non_shared"] + (["full_shared"] if args.shared_cache else [])
    if args.paper:
        args.lctx_list = list(PAPER_LCTX)
    elif args.lctx:
        args.lctx_list = sorted(parse_int_list(args.lctx, "--lctx"))
    elif args.quick:
        args.lctx_list = list(QUICK_LCTX)
    else:
        args.lctx_list = list(DEFAULT_LCTX.get(args.shape, DEFAULT_LCTX_LARGE))
    args.scale_value = QUICK_SCALE if args.quick and args.scale == 1.0 else args.scale
    return args


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


# ---- the trace ---------------------------------------------------------------------------------
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


def run_hf_trace(model, cfg, device, lctx, *, variant, batch=1, seed=0, scale=1.0, prefill_chunk=4096,
                 progress=True, torch=None):
    from tqdm.auto import tqdm
    from transformers import DynamicCache

    from lragent_jax.trace import random_prefills, trace_agents, trace_steps, trace_total_tokens

    steps = trace_steps(lctx, scale=scale)
    agents = trace_agents(steps)
    per_row = trace_total_tokens(lctx, scale=scale)
    prefills = random_prefills(cfg, steps, batch=batch, seed=seed)
    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    shared = variant == "full_shared"
    owners = ["*"] if shared else list(agents)
    caches = {a: DynamicCache() for a in owners}
    held = {a: 0 for a in owners}
    processed = 0
    traj = torch.empty((batch, 0), dtype=torch.long, device=device)
    rows = []
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    bar = tqdm(total=len(steps), desc=f"hf_{variant} Lctx={lctx}", disable=not progress, leave=False)
    with torch.inference_mode():
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
            chunk = prefill_chunk or T
            logits = None
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
                out = model(input_ids=tok[:, None], past_key_values=cache, use_cache=True)
                tok = out.logits[:, -1].argmax(-1)
                gen.append(tok)
            gen = torch.stack(gen, dim=1)
            gen_host = gen.tolist()
            sync()
            t2 = time.perf_counter()
            assert len(first) == batch and all(len(r) == st.gen for r in gen_host)
            held[owner] = T + st.gen - 1  # the last generated token is not fed back
            processed = held[owner]
            traj = torch.cat([traj, gen], dim=1)
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
    return {
        "scheme": f"hf_{variant}", "label": f"hf_{variant}", "lctx": int(lctx), "scale": float(scale),
        "batch": batch, "tokens_per_row": per_row, "total_tokens": total, "steps": rows,
        "ttft_s": sum(r["ttft_s"] for r in rows), "decode_s": sum(r["decode_s"] for r in rows),
        "end_to_end_s": e2e, "throughput_tok_s": total / e2e if e2e > 0 else float("nan"),
        "catch_up_tokens": sum(r["catch_up_tokens"] for r in rows),
        "new_tokens": sum(r["new_tokens"] for r in rows),
        "generated_tokens": sum(r["gen"] for r in rows) * batch,
        "cache_bytes": int(cache_bytes), "peak_bytes": peak, "peak_is_own": True if peak is not None else None,
    }


def main(argv=None):
    t_start = time.perf_counter()
    try:
        args = parse_args(sys.argv[1:] if argv is None else argv)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    import torch

    from lragent_jax.trace import trace_total_tokens

    if args.threads > 0:
        torch.set_num_threads(args.threads)

    out = args.out or default_out("hf-peft")
    os.makedirs(out, exist_ok=True)
    t0 = time.perf_counter()
    try:
        model, cfg, device, dtype = build(args, torch)
    except (ValueError, KeyError, FileNotFoundError, OSError) as e:
        print(f"error: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or "cpu")
    import peft
    import transformers

    log(f"device: {card} ({device}), torch {torch.__version__}, transformers {transformers.__version__}, "
        f"peft {peft.__version__}; model {args.shape or args.model} ({dtype}) ready in {time.perf_counter() - t0:.1f} s")
    scale = args.scale_value
    if scale != 1.0:
        log(f"NOTE: --scale {scale}: fixed step sizes shrunk; this is not the paper's trace")
    common = dict(batch=args.batch, seed=args.seed, scale=scale, prefill_chunk=args.prefill_chunk,
                  progress=not args.no_progress, torch=torch)
    if not args.no_warmup:
        tw = time.perf_counter()
        for v in args.variants_list:  # CUDA context, cuBLAS handles, SDPA kernels; no JIT to warm in eager torch
            run_hf_trace(model, cfg, device, 16, variant=v, **{**common, "scale": QUICK_SCALE, "seed": args.seed + 1})
        log(f"warm-up {time.perf_counter() - tw:.1f} s (a short trace per variant)")

    results, failed = [], False
    for lctx in args.lctx_list:
        for v in args.variants_list:
            total = trace_total_tokens(lctx, scale=scale)
            label = f"hf_{v}"
            log(f"[{time.perf_counter() - t_start:7.1f}s] {label} Lctx={lctx} ({total} tokens/row) ...")
            base = {"scheme": label, "label": label, "lctx": lctx, "batch": args.batch, "scale": scale,
                    "tokens_per_row": total, "total_tokens": total * args.batch}
            try:
                reps = [run_hf_trace(model, cfg, device, lctx, variant=v, **common) for _ in range(args.repeats)]
                e2e = [r["end_to_end_s"] for r in reps]
                res = dict(sorted(reps, key=lambda r: r["end_to_end_s"])[(len(reps) - 1) // 2])
                res.update(status="ok", repeats_end_to_end_s=e2e, repeats_ttft_s=[r["ttft_s"] for r in reps],
                           end_to_end_s_stdev=statistics.stdev(e2e) if len(e2e) > 1 else 0.0)
                log(f"    {res['throughput_tok_s']:.1f} tok/s, TTFT {res['ttft_s']:.3f} s, e2e {res['end_to_end_s']:.3f} s")
            except Exception as e:  # noqa: BLE001
                res = failed_point(e, base)
                failed |= res["status"] == "ERROR"
            results.append(res)
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()

    results.sort(key=lambda r: (args.variants_list.index(r["label"][3:]), r["lctx"]))
    log("\ncompile/warm-up excluded: " + str(not args.no_warmup)
        + "; throughput = trajectory tokens of all rows / end-to-end time")
    print_table(results, peak_note="peak MiB: torch.cuda.max_memory_allocated per run" if device.type == "cuda"
                else "peak MiB: '-' on CPU")
    rs = ratios(results, ref="hf_non_shared", ours="hf_full_shared")
    if rs:
        print_ratios(rs, ref="hf_non_shared", ours="hf_full_shared")
    payload = {
        "benchmark": "HF transformers + PEFT trace baseline (docs/trace.md)",
        "card": card, "device": str(device), "torch_version": torch.__version__,
        "transformers_version": transformers.__version__, "peft_version": peft.__version__,
        "python": platform.python_version(), "host": platform.node(),
        "date": datetime.datetime.now().isoformat(timespec="seconds"), "args": vars(args),
        "model": args.shape or args.model, "random_weights": args.shape is not None, "dtype": str(dtype),
        "scale": scale, "lctx": args.lctx_list, "ratios": rs,
        "paper_throughput_tok_s_and_ttft_s_at_33k": PAPER_AT_33K, "results": results,
        "wall_s": time.perf_counter() - t_start,
    }
    jpath = os.path.join(out, "results.json")
    write_json(jpath, payload)
    ppath = plot(results, os.path.join(out, "trace.png"),
                 f"HF transformers + PEFT trace: {args.shape or args.model} ({dtype}, batch {args.batch}) on {card}")
    log(f"\nwrote {jpath}" + (f" and {ppath}" if ppath else "") + f" in {time.perf_counter() - t_start:.1f} s")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
