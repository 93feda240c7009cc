#!/usr/bin/env python3
"""Sharded against unsharded in one run: decode step (and optionally the paper's trace) per mesh.

Every mesh runs the same random-weight model (one copy built once, placed per mesh by
Engine(mesh=...)), so the rows compare like with like:

  python -m bench.sharded --shape llama-3.1-8b --context 8192 --mesh model=1 --mesh model=2
  python -m bench.sharded --shape llama-3.1-8b --context 8192 --trace-lctx 8192       # + the trace
  python -m bench.sharded --shape llama-3.1-70b --context 8192 --mesh model=2        # weights born sharded
  XLA_FLAGS=--xla_force_host_platform_device_count=2 python -m bench.sharded --shape tiny --quick

Per mesh and batch: the decode step time (n - 1 greedy steps after a prefill of --context tokens
into a base_lr_shared-style cache, as bench.step), the step's ratio to the first mesh's, weights
and cache bytes per device (from the shardings), and the collectives XLA placed in the compiled
decode loop (count and bytes per kind, one loop iteration = one step) beside the count on paper:
tensor parallel over M devices all-reduces the [rows, hidden] output of wo and of w_down in each
layer (2 L all-reduces of rows * hidden * dtype bytes; rows = the batch padded to
min_matmul_rows), plus the LM head's vocab-parallel logits. The collectives are counted as
instructions of the compiled program: with layer_mode scan (the CPU default) the layer loop's body
holds one layer's, so multiply by the layers; per_layer (the GPU default) lists every layer's.

NCCL's NVLink multicast (NVLS) is off unless NCCL_NVLS_ENABLE is set: it is broken on the
two-H200 host. XLA's GPU latency-hiding scheduler is XLA's to choose; try
XLA_FLAGS=--xla_gpu_enable_latency_hiding_scheduler=true to compare. Writes JSON to --out.
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("NCCL_NVLS_ENABLE", "0")  # before JAX starts NCCL

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from bench.common import UsageError, positive_int_list, results_dir, run_info, write_json  # noqa: E402
from bench.step import decode_step_time, random_prompt  # noqa: E402

def collectives(hlo: str) -> dict:
    """{op: {"count", "bytes"}} over the collective instructions of a compiled HLO text."""
    from lragent_jax import sharding

    out = {}
    for c in sharding.collectives(hlo):
        kind = out.setdefault(c["op"], {"count": 0, "bytes": 0})
        kind["count"] += 1
        kind["bytes"] += c["bytes"]
    return out


def bytes_per_device(tree) -> int:
    """Bytes the first device holds of a pytree of (possibly sharded) arrays."""
    total = 0
    for x in jax.tree.leaves(tree):
        shape = x.sharding.shard_shape(x.shape) if hasattr(x, "sharding") else x.shape
        total += int(np.prod(shape)) * x.dtype.itemsize
    return total


def paper_all_reduces(cfg, batch: int, min_rows: int, model: int, dtype) -> dict:
    """Megatron tensor parallel: two all-reduces per layer of the [rows, hidden] activations."""
    if model == 1:
        return {"count": 0, "bytes": 0}
    rows = max(batch, min_rows)
    return {"count": 2 * cfg.num_layers, "bytes": 2 * cfg.num_layers * rows * cfg.hidden_size * dtype.itemsize}


def main(argv=None):
    from lragent_jax import sharding
    from lragent_jax.cache import AttnOptions, LoRAKV
    from lragent_jax.config import ConfigError, preset
    from lragent_jax.engine import LAYER_MODES, Engine
    from lragent_jax.lora import random_adapters
    from lragent_jax.model import Llama

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", default="tiny")
    p.add_argument("--mesh", action="append", default=None, metavar="data=D,model=M",
                   help="repeatable; default: --mesh model=1 --mesh model=2")
    p.add_argument("--context", type=int, default=8192, help="tokens in the cache before decoding")
    p.add_argument("--batch", default="1", help="comma list of batch sizes (rows over data when data > 1)")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--layer-mode", default="auto", choices=LAYER_MODES)
    p.add_argument("--attention", default="auto", choices=("auto", "xla", "pallas"))
    p.add_argument("--dtype", default=None)
    p.add_argument("--trace-lctx", default=None, help="comma list: also time the paper's trace at these Lctx")
    p.add_argument("--trace-schemes", default="full_shared,base_lr_shared")
    p.add_argument("--quick", action="store_true", help="small context and few tokens (CPU smoke run)")
    p.add_argument("--out", default=None, help="output folder (default results/sharded/<timestamp>/)")
    args = p.parse_args(argv)
    specs = args.mesh or ["model=1", "model=2"]
    try:
        batches = positive_int_list(args.batch, "--batch")
        lctxs = positive_int_list(args.trace_lctx, "--trace-lctx") if args.trace_lctx else []
        cfg = preset(args.shape)
        meshes = [(s, sharding.mesh_from_spec(s)) for s in specs]
        for s, mesh in meshes:
            data = 1 if mesh is None else mesh.shape["data"]
            if mesh is not None:
                sharding.check_model_fits(cfg, mesh)
            if any(b % data for b in batches):
                raise UsageError(f"--mesh {s}: every --batch must be a multiple of data={data}")
        if args.context < 1 or args.new_tokens < 2:
            raise UsageError("--context must be >= 1 and --new-tokens >= 2")
    except (UsageError, ConfigError, sharding.ShardingError) as e:
        p.error(str(e))
    if args.quick:
        args.context, args.new_tokens = min(args.context, 256), min(args.new_tokens, 16)
        lctxs = [min(x, 32) for x in lctxs]
    dtype = jnp.dtype(args.dtype or ("float32" if args.shape == "tiny" else "bfloat16"))
    dev = jax.devices()[0]
    print(f"{len(jax.devices())} x {dev.device_kind} ({jax.default_backend()}), jax {jax.__version__}, "
          f"NCCL_NVLS_ENABLE={os.environ.get('NCCL_NVLS_ENABLE')}", flush=True)

    def make():
        return Llama(cfg, dtype=dtype, rngs=nnx.Rngs(0))

    # with no single-device row, the weights are born sharded on the first mesh (a 70B model never
    # exists whole on one device); the other meshes reshard them
    model = make() if any(m is None for _, m in meshes) else sharding.init_sharded(cfg, meshes[0][1], dtype=dtype)
    lora = random_adapters(cfg, rank=8, dtype=dtype)
    rows, traces = [], []
    for spec, mesh in meshes:
        engine = Engine(model, lora, mesh=mesh, layer_mode=args.layer_mode)
        M = 1 if mesh is None else mesh.shape["model"]
        weights = bytes_per_device((engine.params, engine.lora))
        for B in batches:
            ctx, n = args.context, args.new_tokens
            ids = np.zeros((B,), np.int32)

            def new_cache(B=B):
                return engine.allocate(lambda: LoRAKV.create(cfg, B, ctx + n + 1, 8, dtype,
                                                             opts=AttnOptions(impl=args.attention)))

            step_s = decode_step_time(engine, new_cache, random_prompt(cfg, B, ctx), ids, n)
            cache = new_cache()
            row = dict(mesh=spec, batch=B, context=ctx, step_ms=1e3 * step_s, weight_bytes_per_device=weights,
                       cache_bytes_per_device=bytes_per_device(cache),
                       collectives=collectives(engine.decode_program(cache, B)),
                       paper_all_reduce=paper_all_reduces(cfg, B, model.min_matmul_rows, M, dtype))
            del cache
            base = next((r for r in rows if r["batch"] == B), row)
            row["step_vs_first_mesh"] = row["step_ms"] / base["step_ms"]
            rows.append(row)
            coll = ", ".join(f"{k} x{v['count']} ({v['bytes'] / 1024:.0f} KiB)" for k, v in row["collectives"].items())
            print(f"{spec:>16} B={B:<3} ctx={ctx:<6} decode {row['step_ms']:8.3f} ms/step "
                  f"(x{row['step_vs_first_mesh']:.2f} of {meshes[0][0]})  weights/device "
                  f"{weights / 2**30:.2f} GiB  cache/device {row['cache_bytes_per_device'] / 2**30:.3f} GiB  "
                  f"[{coll or 'no collectives'}; on paper: all-reduce x{row['paper_all_reduce']['count']} "
                  f"({row['paper_all_reduce']['bytes'] / 1024:.0f} KiB)]", flush=True)
        if lctxs:
            from bench.trace import run_trace

            for lctx in lctxs:
                for scheme in args.trace_schemes.split(","):
                    r = run_trace(engine, scheme, lctx, attention=args.attention, progress=False,
                                  scale=0.125 if args.quick else 1.0)
                    r["mesh"] = spec
                    traces.append(r)
                    print(f"{spec:>16} trace Lctx={lctx:<6} {scheme:>15}: {r['throughput_tok_s']:9.1f} tok/s, "
                          f"TTFT {r['ttft_s']:.3f} s, end-to-end {r['end_to_end_s']:.2f} s", flush=True)
        del engine
    for spec, _ in meshes:  # the trace's headline ratio per mesh (the target: as on one device, within 2%)
        for lctx in lctxs:
            got = {t["scheme"]: t["throughput_tok_s"] for t in traces if t["mesh"] == spec and t["lctx"] == lctx}
            if {"full_shared", "base_lr_shared"} <= set(got):
                print(f"{spec:>16} Lctx={lctx}: base_lr_shared / full_shared throughput "
                      f"{got['base_lr_shared'] / got['full_shared']:.3f}", flush=True)
    result = dict(**run_info(), jax=jax.__version__, shape=args.shape, dtype=str(dtype), attention=args.attention,
                  layer_mode=args.layer_mode, nccl_nvls_enable=os.environ.get("NCCL_NVLS_ENABLE"),
                  xla_flags=os.environ.get("XLA_FLAGS", ""), rows=rows, traces=traces)
    out = results_dir("sharded", args.out)
    print(f"wrote {write_json(os.path.join(out, f'sharded-{args.shape}.json'), result)}")
    return result


if __name__ == "__main__":
    main()
