"""The sharded runs behind tests/test_sharding.py, in a process of its own.

JAX fixes its CPU device count when it starts, and the pytest process has started JAX with one
device; this script runs with XLA_FLAGS=--xla_force_host_platform_device_count=8 (test_sharding.py
starts it) and writes what it measured to a JSON file, which the tests then check:

  python tests/sharding_checks.py OUT.json

For each mesh it runs the same multi-agent trajectory (2 trajectories in a batch: prompt, plan
generates, a tool output, action generates, plan and reflect decode concurrently, reflect's branch
is adopted, action scores tokens) on an unsharded Engine and on Engines over meshes, and records
greedy tokens and score logits; it also records the collectives of the compiled decode step and
the errors a mesh that does not fit raises.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.dirname(HERE)]  # tests/ (scheme_reference) and this checkout's packages

DEVICES = 8
# A model whose heads divide over model=2 and 4 (8 query heads, 4 KV heads: GQA), MLP columns and
# vocabulary over 8. Weights scaled as in scheme_reference (greedy tokens vary from step to step).
CONFIG = dict(
    vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=8,
    num_key_value_heads=4, head_dim=16, rms_norm_eps=1e-5, rope_theta=10000.0, max_position_embeddings=1024,
    tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
)
MAX_LEN = 256  # cache capacity 256: a dimension no weight or activation has (the HLO check looks for it)
CRITICAL = (1,)  # droidspeak: its catch-up starts from the cached hidden state at layer 1
PROMPTS = [np.random.default_rng(b).integers(3, 320, 18 + 3 * b).tolist() for b in range(2)]
TOOL = [[7, 8, 9], [10, 11]]
SCORE = ("action", [[40, 41, 200, 3], [5, 6, 7, 8]])
MESHES = {"model=2": (1, 2), "model=4": (1, 4), "data=2,model=4": (2, 4)}
# Schemes per mesh (every one runs the whole trajectory, concurrent agents included). The 2-D mesh
# runs all five; by default (CI time) each 1-D mesh runs one, --full runs all five on each.
QUICK = {"model=2": ("base_lr_shared",), "model=4": ("droidspeak",)}


def trajectory(engine, scheme, attention="xla"):
    """Greedy tokens of every turn and branch, and teacher-forced score logits, batch of 2."""
    from lragent_jax.session import Session

    s = Session(engine, scheme, batch=2, max_len=MAX_LEN, stop_ids=(), critical_layers=CRITICAL,
                attention=attention)
    s.append(PROMPTS)
    out = {"plan": s.generate("plan", 5, greedy=True)}
    s.append(TOOL)
    out["action"] = s.generate("action", 4, greedy=True)
    out["branches"] = s.generate_concurrent({"plan": 3, "reflect": 4}, greedy=True)
    s.adopt("reflect")
    out["after_adopt"] = s.generate("plan", 3, greedy=True)
    logits = s.score(*SCORE)
    return out, [np.asarray(x).tolist() for x in logits], s


def collectives(hlo: str) -> list[dict]:
    """Every all-gather / all-to-all / collective-permute of a compiled HLO text (all-reduces are the
    tensor-parallel matmuls' own)."""
    from lragent_jax import sharding

    return [c for c in sharding.collectives(hlo) if c["op"] in ("all-gather", "all-to-all", "collective-permute")]


def main(out_path: str, full: bool):
    import jax
    import jax.numpy as jnp

    import scheme_reference as ref_lib
    from lragent_jax import sharding
    from lragent_jax.engine import Engine
    from lragent_jax.loading import load_adapters, load_model
    from lragent_jax.schemes import SCHEMES
    from lragent_jax.session import Session

    assert jax.device_count() == DEVICES, f"expected {DEVICES} CPU devices, got {jax.device_count()}"
    if os.environ.get("LRAGENT_TEST_JAX_CACHE"):  # the suite's persistent compilation cache (conftest.py)
        jax.config.update("jax_compilation_cache_dir", os.environ["LRAGENT_TEST_JAX_CACHE"])
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    root = tempfile.mkdtemp(prefix="sharding_checks_")
    folder = ref_lib.write_model(os.path.join(root, "model"), CONFIG, ref_lib.make_weights(CONFIG, seed=3))
    adapters = ref_lib.make_adapters(CONFIG, seed=5, shared_a=True)  # shared A: base_lr_shared runs too
    paths = {n: ref_lib.write_adapter(os.path.join(root, n), f) for n, f in adapters.items()}
    model = load_model(folder, dtype=jnp.float32)
    lora = load_adapters(paths, model)
    result = {"runs": {}, "seconds": {}, "hlo": {}, "errors": {}, "loading": {}}

    # loading straight onto a mesh: load_model from the HF folder, restore_converted from orbax
    from flax import nnx

    from lragent_jax.loading import restore_converted, save_converted

    mesh24 = sharding.make_mesh(2, 4)
    placed = load_model(folder, dtype=jnp.float32, mesh=mesh24)
    save_converted(os.path.join(root, "converted"), model, lora)
    restored, restored_lora = restore_converted(os.path.join(root, "converted"), mesh=mesh24)
    for label, m, lw in (("load_model", placed, None), ("restore_converted", restored, restored_lora)):
        layer = m.layers[0]
        info = {name: {"spec": str(tuple(w.sharding.spec)), "shard": list(w.sharding.shard_shape(w.shape))}
                for name, w in (("wq", layer.wq[...]), ("wo", layer.wo[...]), ("embed", m.embed[...]))}
        if lw is not None:
            b = lw.projections["v"].b
            info["lora_v_b"] = {"spec": str(tuple(b.sharding.spec)), "shard": list(b.sharding.shard_shape(b.shape))}
        # the Engine keeps already-placed weights as they are (no copy)
        engine = Engine(m, lw or lora, mesh=mesh24, layer_mode="per_layer")
        info["engine_keeps_arrays"] = all(a is b for a, b in zip(jax.tree.leaves(nnx.state(m)),
                                                                 jax.tree.leaves(engine.params[0])))
        result["loading"][label] = info

    # random weights born sharded (the benchmarks' 70B path): one small init per weight
    born = sharding.init_sharded(placed.config, mesh24, dtype=jnp.float32, seed=1)
    want = sharding.weight_shardings(nnx.state(placed), mesh24, sharding.rules_for(placed.config, mesh24, None))
    result["init_sharded"] = [
        {"path": jax.tree_util.keystr(p), "shape": list(x.shape), "want_shape": list(w.shape),
         "same_sharding": x.sharding == ws, "std": float(jnp.std(x)), "min": float(jnp.min(x)),
         "max": float(jnp.max(x))}
        for (p, x), w, ws in zip(jax.tree_util.tree_flatten_with_path(nnx.state(born))[0],
                                 jax.tree.leaves(nnx.state(placed)), jax.tree.leaves(want))]

    sessions = {}

    def record(label, engine, schemes, **kw):
        for scheme in schemes:
            t = time.perf_counter()
            tokens, logits, sessions[f"{label}/{scheme}"] = trajectory(engine, scheme, **kw)
            result["runs"][f"{label}/{scheme}"] = {"tokens": tokens, "logits": logits}
            result["seconds"][f"{label}/{scheme}"] = round(time.perf_counter() - t, 1)

    buckets = dict(prefill_buckets=(16,))
    record("unsharded", Engine(model, lora, **buckets), SCHEMES)
    for label, (data, m) in MESHES.items():
        mesh = sharding.make_mesh(data, m)
        two_d = label == "data=2,model=4"
        engine = Engine(placed if two_d else model, lora, mesh=mesh, **buckets)  # 2-D: the weights loaded on it
        record(label, engine, SCHEMES if two_d or full else QUICK[label])
        if two_d:
            for scheme in ("non_shared", "base_lr_shared"):
                s = sessions[f"{label}/{scheme}"]
                if scheme == "base_lr_shared":  # a checkpoint restores onto the mesh and continues alike
                    s.save(os.path.join(root, "session"))
                    restored = Session.restore(os.path.join(root, "session"), engine)
                    k = restored.scheme.cache.k
                    result["restore"] = {"k_spec": str(tuple(k.sharding.spec)),
                                         "same": restored.generate("plan", 4, greedy=True)
                                         == s.generate("plan", 4, greedy=True)}
                view = s.scheme._view("plan", True)
                per_device = [int(np.prod(x.sharding.shard_shape(x.shape)))
                              for x in jax.tree.leaves(view) if x.ndim >= 4]
                result["hlo"][scheme] = {"collectives": collectives(engine.decode_program(view, 2)),
                                         "capacity": int(view.capacity), "cache_shard_elements": min(per_device)}
            # the detector's control: a program that does gather a cache must be caught
            k = view.k

            def gather(x):
                return jax.lax.with_sharding_constraint(x, jax.sharding.NamedSharding(mesh, jax.P()))

            result["hlo"]["control"] = {"collectives": collectives(jax.jit(gather).lower(k).compile().as_text()),
                                        "capacity": int(view.capacity),
                                        "cache_shard_elements": int(np.prod(k.sharding.shard_shape(k.shape)))}

    # the Pallas kernels (Triton, interpret mode) under shard_map: patch the entry as
    # tests/test_pallas_model.py does, and count the traced calls
    import importlib

    fla = importlib.import_module("pallas_kernels.flash_lora_attention")
    attention_mod = importlib.import_module("lragent_jax.attention")
    original, calls = fla.flash_lora_attention, []

    def kernel(*args, **kw):
        calls.append(list(args[0].shape))  # q as the kernel sees it: one device's heads
        return original(*args, **{**kw, "backend": "triton", "interpret": True})

    attention_mod.flash_lora_attention = kernel
    try:
        record("pallas/model=2", Engine(model, lora, mesh=sharding.make_mesh(1, 2), **buckets), ("base_lr_shared",),
               attention="pallas")
        result["kernel_q_shapes"] = sorted({tuple(c) for c in calls})
    finally:
        attention_mod.flash_lora_attention = original

    # meshes that do not fit
    def error(fn):
        try:
            fn()
        except sharding.ShardingError as e:
            return str(e)
        return None

    result["errors"]["kv_heads"] = error(lambda: Engine(model, lora, mesh=sharding.make_mesh(1, 8)))
    result["errors"]["batch"] = error(lambda: Session(Engine(model, lora, mesh=sharding.make_mesh(2, 1)),
                                                      "full_shared", batch=1, max_len=64))
    with open(out_path, "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main(sys.argv[1], full="--full" in sys.argv[2:])
