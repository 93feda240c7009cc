#!/usr/bin/env python3
"""Decode-step and prefill speed of the engine against its floors, on random weights.

Floors measured in the same run: device copy bandwidth (read + write) and the bf16
matmul rate. The decode floor at batch B is (weight bytes + cache bytes read) /
bandwidth; the prefill floor is FLOPs / matmul rate.

  python -m bench.step --shape llama-3.1-8b --context 4096 --variants scan,per_layer
  python -m bench.step --shape tiny --quick          # CPU smoke run
  python -m bench.step --shape llama-3.1-8b --mesh model=2   # tensor parallel over 2 devices

With --mesh data=D,model=M the weights are born sharded (sharding.init_sharded), the engine and
its caches run over the mesh, and the floors are per device: the bytes one device reads (its
shards; the embedding and the LR cache are whole on every device) over one device's bandwidth,
and the FLOPs over D * M devices' matmul rate. bench.sharded compares meshes in one run.

Prints a table; writes JSON (+ PNG when matplotlib is there) to --out.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from bench.common import (
    UsageError, copy_bandwidth, matmul_rate, median_time, positive_int_list, results_dir, run_info, write_json,
)


def gemv_bandwidth(d, f, dtype, reps=20, n=8, rows=1, min_rows=1):
    """Weight bytes / time of `rows`-row projections (the model's _matmul, padded to
    min_rows), the decode step's building block (n different [d, f] matrices per call,
    so launch overhead and L2 do not flatter it)."""
    from lragent_jax.model import _matmul

    # separate arrays, not slices of one: a slice might be copied and flatter nothing
    w = [jax.random.normal(jax.random.key(2 + i), (d, f), dtype) for i in range(n)]
    x = jax.random.normal(jax.random.key(1), (rows, 1, d), dtype)

    @jax.jit
    def g(x, w):
        ys = [_matmul(x, w[i], min_rows, out_dtype=jnp.float32) for i in range(n)]
        return sum(y[..., :8] for y in ys)

    return n * d * f * jnp.dtype(dtype).itemsize / median_time(g, x, w, reps=reps)


def prefill_time(engine, new_cache, prompt, ids):
    """Seconds of a prefill of `prompt` (rows of token lists) into a fresh cache from
    new_cache(): the first pass compiles, the second is timed."""
    for _ in range(2):
        cache = new_cache()
        t = time.perf_counter()
        logits, cache = engine.prefill(cache, prompt, np.zeros(len(prompt)), ids)
        jax.block_until_ready(logits)
        dt = time.perf_counter() - t
        del cache
    return dt


def decode_step_time(engine, new_cache, prompt, ids, n, around=contextlib.nullcontext):
    """Seconds per step of an n-token greedy decode after `prompt` (n - 1 forward steps; the
    first token comes from the prefill). The first run compiles; the second is timed inside
    `around()` (e.g. a profiler range), after its prefill has finished."""
    from lragent_jax.sampling import SamplingParams

    B, ctx = len(prompt), len(prompt[0])
    sp = SamplingParams.make(B, greedy=True)

    def run(timed):
        logits, cache = engine.prefill(new_cache(), prompt, np.zeros(B), ids)
        first = engine.sample(logits, sp, jax.random.key(0))
        jax.block_until_ready((first, cache))  # else the timed decode includes this prefill
        with around() if timed else contextlib.nullcontext():
            t = time.perf_counter()
            toks, _, cache = engine.decode(cache, first, np.full(B, ctx), ids, sp, jax.random.key(1),
                                           max_new_tokens=n)
            jax.block_until_ready(toks)
            return time.perf_counter() - t

    run(False)
    return run(True) / (n - 1)


def random_prompt(cfg, batch, length):
    return [np.random.default_rng(b).integers(0, cfg.vocab_size, length).tolist() for b in range(batch)]


def tree_bytes(tree):
    """Bytes one device holds of a pytree: a sharded array counts its shard, others in full."""
    return int(sum(np.prod(x.sharding.shard_shape(x.shape) if isinstance(x, jax.Array) else x.shape) * x.dtype.itemsize
                   for x in jax.tree_util.tree_leaves(tree)))


def main(argv=None):
    from lragent_jax import sharding
    from lragent_jax.cache import LoRAKV, AttnOptions
    from lragent_jax.cli import add_mesh_flag, parse_mesh
    from lragent_jax.config import ConfigError, preset
    from lragent_jax.engine import LAYER_MODES, Engine
    from lragent_jax.lora import random_adapters
    from lragent_jax.model import Llama

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", default="tiny")
    p.add_argument("--context", type=int, default=4096, help="tokens in the cache before decoding")
    p.add_argument("--batch", default="1", help="comma list of batch sizes")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--variants", default="auto", help="comma list of engine layer modes: auto, scan, per_layer")
    p.add_argument("--attention", default="auto", choices=("auto", "xla", "pallas", "triton", "mosaic_gpu"),
                   help="attention kernel: auto / pallas = the platform's Pallas kernel; triton or mosaic_gpu "
                        "(Hopper prefill) by name on a GPU")
    p.add_argument("--dtype", default=None)
    p.add_argument("--gemv", default="1:1,1:2,2:2,8:8",
                   help="comma list of rows:padded_rows for the projection microbenchmark")
    p.add_argument("--gemv-only", action="store_true", help="only the floors and the projection microbenchmark")
    p.add_argument("--min-matmul-rows", default=None,
                   help="comma list of Llama(min_matmul_rows=) values to compare (default: the model's default)")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", default=None, help="output folder (default results/step/<timestamp>/)")
    add_mesh_flag(p)
    args = p.parse_args(argv)

    try:
        batches = positive_int_list(args.batch, "--batch")
        pads = [None] if args.min_matmul_rows is None else positive_int_list(args.min_matmul_rows,
                                                                             "--min-matmul-rows")
        if set(args.variants.split(",")) - set(LAYER_MODES):
            raise UsageError(f"--variants: choose from {', '.join(LAYER_MODES)}, got {args.variants!r}")
        gemv_specs = []
        for item in args.gemv.split(","):
            parts = item.split(":")
            if len(parts) != 2 or not all(x.isdigit() and int(x) >= 1 for x in parts):
                raise UsageError(f"--gemv items are rows:padded_rows with rows >= 1, got {item!r}")
            gemv_specs.append((int(parts[0]), int(parts[1])))
        cfg = preset(args.shape)
        if args.context < 1 or args.new_tokens < 2:
            raise UsageError("--context must be >= 1 and --new-tokens >= 2 (the step time divides by new tokens - 1)")
        if args.mesh is not None:  # before JAX starts NCCL: NVLink multicast is broken on the 2-H200 host
            os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
        mesh = None
        for B in batches:  # the data axis must divide every batch
            mesh = parse_mesh(args.mesh, batch=B)
        if mesh is not None:
            sharding.check_model_fits(cfg, mesh)
    except (UsageError, ConfigError, sharding.ShardingError) as e:
        p.error(str(e))
    data, model_par = (1, 1) if mesh is None else (mesh.shape["data"], mesh.shape["model"])

    dtype = jnp.dtype(args.dtype or ("float32" if args.shape == "tiny" else "bfloat16"))
    if args.quick:
        args.context, args.new_tokens = min(args.context, 256), min(args.new_tokens, 16)
    dev = jax.devices()[0]
    print(f"device {dev.device_kind} ({jax.default_backend()}), jax {jax.__version__}"
          + ("" if mesh is None else f", mesh {args.mesh} over {data * model_par} devices"), flush=True)
    bw = copy_bandwidth(256 << 20 if args.quick else 2 << 30)
    mm = matmul_rate(1024 if args.quick else 8192)
    print(f"floors: copy {bw / 1e9:.0f} GB/s, bf16 matmul {mm / 1e12:.1f} TFLOP/s", flush=True)
    gemv = {}
    for rows, min_rows in gemv_specs:
        gv = gemv_bandwidth(cfg.hidden_size, cfg.intermediate_size, dtype, rows=rows, min_rows=min_rows)
        gemv[f"rows{rows}_min{min_rows}"] = gv / 1e9
        print(f"  [{rows},{cfg.hidden_size}]x[{cfg.hidden_size},{cfg.intermediate_size}] product"
              f"{' padded to ' + str(min_rows) + ' rows' if min_rows > rows else ''}: "
              f"weights read at {gv / 1e9:.0f} GB/s", flush=True)
    if args.gemv_only:
        return dict(card=dev.device_kind, jax=jax.__version__, copy_GBps=bw / 1e9, gemv_GBps=gemv)

    t = time.perf_counter()
    def make():
        return Llama(cfg, dtype=dtype, rngs=nnx.Rngs(0))

    model = make() if mesh is None else sharding.init_sharded(cfg, mesh, dtype=dtype)  # 70B never whole on one device
    lora = random_adapters(cfg, rank=8, dtype=dtype)
    weight_bytes = tree_bytes(nnx.state(model))  # per device
    params = sum(x.size for x in jax.tree_util.tree_leaves(nnx.state(model)))  # all devices
    # A decode step reads every weight but the embedding table (one row gathered per
    # token) unless the LM head is that table.
    read_bytes = weight_bytes - (0 if model.lm_head is None else tree_bytes(model.embed[...]))
    print(f"model {args.shape}: {weight_bytes / 1e9:.2f} GB weights{'' if mesh is None else ' per device'}, "
          f"built in {time.perf_counter() - t:.0f} s", flush=True)
    rows = []
    default_pad = model.min_matmul_rows
    for variant, pad in [(v, pd) for v in args.variants.split(",") for pd in pads]:
        model.min_matmul_rows = default_pad if pad is None else pad
        engine = Engine(model, lora, layer_mode=variant, mesh=mesh)
        for B in batches:
            ctx, n = args.context, args.new_tokens
            ids = np.zeros((B,), np.int32)
            prompt = random_prompt(cfg, B, ctx)

            def new_cache(B=B):  # born sharded over the mesh
                return engine.allocate(lambda: LoRAKV.create(cfg, B, ctx + n + 1, 8, dtype,
                                                             opts=AttnOptions(impl=args.attention)))

            prefill_s = prefill_time(engine, new_cache, prompt, ids)
            step_s = decode_step_time(engine, new_cache, prompt, ids, n)
            L, Hkv, D = cfg.num_layers, cfg.num_kv_heads, cfg.head_dim
            # per device: its rows (B / data), its KV heads (Hkv / model), the whole LR cache (rank 8)
            cache_read = B // data * L * (ctx + n // 2) * (2 * Hkv // model_par * D + 8) * dtype.itemsize
            decode_floor = (read_bytes + cache_read) / bw
            tokens = B * ctx
            flops = 2 * params * tokens + 2 * L * cfg.num_heads * D * B * ctx * ctx
            prefill_floor = flops / (mm * data * model_par)
            row = dict(mesh=args.mesh or "data=1,model=1", variant=engine.layer_mode,
                       min_matmul_rows=model.min_matmul_rows, batch=B, context=ctx, step_ms=1e3 * step_s,
                       decode_floor_ms=1e3 * decode_floor, decode_vs_floor=step_s / decode_floor,
                       prefill_s=prefill_s, prefill_floor_s=prefill_floor, prefill_vs_floor=prefill_s / prefill_floor,
                       prefill_tflops=flops / prefill_s / 1e12)
            rows.append(row)
            print(f"{variant:>9} pad{model.min_matmul_rows} B={B:<3} ctx={ctx:<6} decode {row['step_ms']:8.2f} ms/step "
                  f"(floor {row['decode_floor_ms']:.2f}, x{row['decode_vs_floor']:.2f})  prefill {prefill_s:7.3f} s "
                  f"(floor {prefill_floor:.3f}, x{row['prefill_vs_floor']:.2f}, {row['prefill_tflops']:.0f} TFLOP/s)",
                  flush=True)
    result = dict(**run_info(), jax=jax.__version__, shape=args.shape, dtype=str(dtype), mesh=args.mesh,
                  attention=args.attention, copy_GBps=bw / 1e9, matmul_TFLOPs=mm / 1e12,
                  weight_bytes=weight_bytes, weight_bytes_read_per_step=read_bytes, gemv_GBps=gemv, rows=rows)
    out = results_dir("step", args.out)
    print(f"wrote {write_json(os.path.join(out, f'step-{args.shape}.json'), result)}")
    return result


if __name__ == "__main__":
    main()
