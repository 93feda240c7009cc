"""One of two CPU processes joined by jax.distributed (run by tests/test_multihost.py, slow).

  python tests/multihost_checks.py PROCESS_ID PORT OUT.json

Each process holds one CPU device; the data=2 mesh spans both, so every jitted output of a
batch-2 Session is split between the processes. The process runs the same Session turns on its
own device (mesh None) and over the mesh, and writes both results and a gathered array to JSON.
"""

from __future__ import annotations

import json
import sys

import jax

jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU collectives across processes


def main(process_id: int, port: int, out: str) -> None:
    jax.distributed.initialize(f"localhost:{port}", num_processes=2, process_id=process_id,
                               initialization_timeout=120)
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx
    from jax.sharding import NamedSharding, PartitionSpec

    from lragent_jax import sharding
    from lragent_jax.config import preset
    from lragent_jax.engine import Engine
    from lragent_jax.lora import random_adapters
    from lragent_jax.model import Llama
    from lragent_jax.session import Session

    mesh = sharding.make_mesh(data=2)
    rows = jax.jit(lambda: jnp.arange(8).reshape(4, 2) * 10, out_shardings=NamedSharding(mesh, PartitionSpec("data")))()
    try:
        np.asarray(rows)
        plain_read = "worked"
    except RuntimeError as e:
        plain_read = str(e).splitlines()[0]
    result = dict(processes=jax.process_count(), local_devices=jax.local_device_count(),
                  fully_addressable=rows.is_fully_addressable, plain_read=plain_read,
                  gathered=sharding.to_host(rows).tolist(), runs={})

    cfg = preset("tiny")
    model, lora = Llama(cfg, dtype=jnp.float32, rngs=nnx.Rngs(0)), random_adapters(cfg, seed=1, b_std=0.3)
    for label, m in (("one device", None), ("data=2", mesh)):
        s = Session(Engine(model, lora, mesh=m), "base_lr_shared", batch=2, max_len=128, stop_ids=())
        s.append([list(range(3, 20)), list(range(30, 41))])
        run = {"plan": s.generate("plan", 4, greedy=True), "action": s.generate("action", 3, greedy=True, rows=[1]),
               "branches": s.generate_concurrent({"plan": 3, "reflect": 2}, greedy=True)}
        s.adopt("reflect")
        run["scores"] = [x.tolist() for x in s.score("action", [[5, 6, 7], [8, 9, 10]])]
        result["runs"][label] = run
    with open(out, "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])
