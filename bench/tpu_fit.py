#!/usr/bin/env python3
"""What fits a Colab TPU, without a TPU: the sharded decode step and prefill lowered for TPU on CPU,
and per-device bytes of weights and caches from the shardings.

  python -m bench.tpu_fit                                  # Llama-3.1-8B on v2-8 and v5e-8 shapes
  python -m bench.tpu_fit --shape llama-3.1-70b --no-lower

For each TPU shape (AbstractMesh: no devices needed) and mesh layout it lowers (does not compile)
Engine's decode loop and a prefill chunk for the TPU platform with the Mosaic TPU attention kernels
under shard_map, counts the kernels in the lowered program, and computes from the
ShardingRules the bytes one device holds: bf16 weights and LoRA adapters, and each scheme's caches
(as its Scheme allocates them: shapes only) per trajectory token. The longest trajectory a scheme
fits is (HBM * --usable - weights) / cache bytes per token, per device. Lowering checks that the
program partitions and that the kernels take the per-device shapes; whether it compiles and how
fast it runs needs a TPU.
"""

from __future__ import annotations

import argparse
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import AbstractMesh, AxisType

from bench.common import results_dir, run_info, write_json

# TPU shapes: devices JAX sees and HBM per device (v2: 8 GiB per core, 2 cores per chip; v5e: 16 GiB
# per chip).
TPUS = {"v2-8": (8, 8 << 30), "v5e-8": (8, 16 << 30)}
AGENTS = ("plan", "action", "reflect")


class ShapeEngine:
    """What a Scheme asks of an Engine, with caches allocated as shapes only (jax.eval_shape)."""

    def __init__(self, config, lora):
        self.config, self.lora = config, lora

    def allocate(self, make):
        return jax.eval_shape(make)


def placed_shapes(tree, shardings):
    """The tree's arrays as ShapeDtypeStructs carrying their shardings (lowered, never allocated)."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def per_device_bytes(tree, shardings) -> int:
    return int(sum(np.prod(s.shard_shape(x.shape)) * jnp.dtype(x.dtype).itemsize
                   for x, s in zip(jax.tree.leaves(tree), jax.tree.leaves(shardings))))


def scheme_cache_bytes(scheme_name, cfg, lora, mesh, rules, batch, tokens, dtype) -> int:
    """Bytes one device holds of the caches `scheme_name` allocates for `tokens` slots."""
    from lragent_jax import sharding
    from lragent_jax.cache import AttnOptions
    from lragent_jax.schemes import make_scheme

    scheme = make_scheme(scheme_name, ShapeEngine(cfg, lora), AGENTS, batch, tokens, dtype, AttnOptions())
    def is_cache(v):  # cache views and arrays (the held counts are numpy, the rest are not arrays)
        leaves = jax.tree.leaves(v)
        return bool(leaves) and all(isinstance(x, (jax.ShapeDtypeStruct, jax.Array)) for x in leaves)

    arrays = {k: v for k, v in vars(scheme).items() if k != "engine" and is_cache(v)}
    return per_device_bytes(arrays, sharding.cache_shardings(arrays, mesh, rules))


def lower_for_tpu(engine, params, lora, cache, batch, mesh, chunk):
    """Lower the decode loop and one prefill chunk for TPU; the count of Mosaic kernel calls in each."""
    from lragent_jax.sampling import SamplingParams

    i = jax.ShapeDtypeStruct((batch,), jnp.int32)
    out = {}
    with jax.sharding.use_abstract_mesh(mesh):
        dec = engine._decode.trace(params, lora, cache, i, i, i, SamplingParams.make(batch, greedy=True),
                                   jax.random.key(0), i, jax.ShapeDtypeStruct((1,), jnp.int32), buffer=32)
        out["decode"] = dec.lower(lowering_platforms=("tpu",)).as_text().count("tpu_custom_call")
        pre = engine._forward.trace(params, lora, cache, jax.ShapeDtypeStruct((batch, chunk), jnp.int32), i, i, i,
                                    jax.ShapeDtypeStruct((), jnp.bool_), layers=(0, engine.config.num_layers),
                                    all_logits=False)
        out["prefill"] = pre.lower(lowering_platforms=("tpu",)).as_text().count("tpu_custom_call")
    return out


def main(argv=None):
    from lragent_jax import sharding
    from lragent_jax.cache import AttnOptions, LoRAKV
    from lragent_jax.config import preset
    from lragent_jax.engine import Engine
    from lragent_jax.lora import random_adapters
    from lragent_jax.model import Llama
    from lragent_jax.schemes import SCHEMES

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", default="llama-3.1-8b")
    p.add_argument("--layouts", default="model=8;data=2,model=4", help="';'-separated meshes of 8 devices")
    p.add_argument("--usable", type=float, default=0.9, help="share of HBM the weights and caches may take")
    p.add_argument("--lower-context", type=int, default=8192, help="cache slots of the lowered programs")
    p.add_argument("--no-lower", action="store_true", help="bytes only")
    p.add_argument("--out", default=None, help="output folder (default results/tpu_fit/<timestamp>/)")
    args = p.parse_args(argv)
    cfg, dtype = preset(args.shape), jnp.dtype("bfloat16")
    abstract = nnx.eval_shape(lambda: Llama(cfg, dtype=dtype, rngs=nnx.Rngs(0), min_matmul_rows=1))
    lora = jax.eval_shape(lambda: random_adapters(cfg, AGENTS, rank=8, dtype=dtype))
    lora = lora.replace(projections={k: v.replace(shared_a=True) for k, v in lora.projections.items()})
    engine = Engine(abstract, lora, layer_mode="per_layer")  # shapes only: traced, never run
    rows = []
    for tpu, (n_dev, hbm) in TPUS.items():
        for layout in args.layouts.split(";"):
            shape = sharding.parse_mesh_spec(layout)
            if shape["data"] * shape["model"] != n_dev:
                continue
            mesh = AbstractMesh((shape["data"], shape["model"]), sharding.MESH_AXES,
                                axis_types=(AxisType.Auto, AxisType.Auto))
            rules = sharding.rules_for(cfg, mesh)
            w_sh = sharding.weight_shardings(engine.params[0], mesh, rules)
            l_sh = sharding.lora_shardings(lora, mesh, rules)
            weights = per_device_bytes(engine.params[0], w_sh) + per_device_bytes(lora, l_sh)
            batch = shape["data"]
            row = dict(tpu=tpu, mesh=layout, batch=batch, hbm_bytes=hbm, weight_bytes_per_device=weights, schemes={})
            T = 8192
            for scheme in SCHEMES:
                per_token = scheme_cache_bytes(scheme, cfg, lora, mesh, rules, batch, T, dtype) / T
                room = args.usable * hbm - weights
                row["schemes"][scheme] = dict(cache_bytes_per_token=per_token,
                                              max_tokens=int(max(0, room) // per_token) if per_token else None)
            if not args.no_lower:
                cache = jax.eval_shape(lambda: LoRAKV.create(cfg, batch, args.lower_context, 8, dtype,
                                                             opts=AttnOptions(impl="mosaic_tpu")))
                row["mosaic_kernels_lowered"] = lower_for_tpu(
                    engine, (placed_shapes(engine.params[0], w_sh), None), placed_shapes(lora, l_sh),
                    placed_shapes(cache, sharding.cache_shardings(cache, mesh, rules)), batch, mesh, 256)
            rows.append(row)
            fits = ", ".join(f"{s} {v['max_tokens'] / 1000:.0f}k" for s, v in row["schemes"].items())
            print(f"{tpu:>6} {layout:>16}: weights {weights / 2**30:.2f} GiB/device of {hbm / 2**30:.0f} GiB; "
                  f"longest trajectory (batch {batch}, 3 agents; the model's context is "
                  f"{cfg.max_position_embeddings // 1000}k): {fits}"
                  + (f"; lowered for TPU: {row['mosaic_kernels_lowered']} Mosaic kernel calls"
                     if "mosaic_kernels_lowered" in row else ""), flush=True)
    out = results_dir("tpu_fit", args.out)
    result = dict(**run_info(), shape=args.shape, jax=jax.__version__, usable=args.usable, rows=rows)
    print(f"wrote {write_json(os.path.join(out, f'tpu_fit-{args.shape}.json'), result)}")
    return rows


if __name__ == "__main__":
    main()
