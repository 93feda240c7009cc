#!/usr/bin/env python3
"""On-device correctness check (GPU/TPU): compiled Pallas kernels vs the float32 reference,
and end-to-end greedy generation with Pallas attention vs XLA attention, every scheme.

  python scripts/check_device.py            # prints PASS/FAIL lines, exit 1 on any FAIL
  python scripts/check_device.py concurrent # only some of: kernels end_to_end concurrent
  python scripts/check_device.py concurrent --schemes base_lr_shared

CPU CI covers the kernels in interpret mode; this runs the real compiled kernels.
"""

from __future__ import annotations

import sys

import jax
import jax.numpy as jnp
import numpy as np


def kernel_cases():
    # (batch, q_len, heads_q, heads_kv, head_dim, kv_len, rank, dtype)
    yield 1, 1, 32, 8, 128, 4096, 8, jnp.bfloat16
    yield 4, 1, 32, 8, 128, 1000, 16, jnp.bfloat16
    yield 2, 3, 8, 1, 64, 777, 8, jnp.float16
    yield 1, 256, 32, 8, 128, 1024, 8, jnp.bfloat16
    yield 2, 37, 16, 4, 96, 300, 4, jnp.bfloat16
    yield 1, 128, 8, 8, 256, 512, 8, jnp.float32
    yield 1, 64, 12, 4, 80, 200, 64, jnp.bfloat16


def tuning_line() -> str:
    """Which measured tuning table this device's kernels use (pallas_kernels/<backend>/tuning.py)."""
    from pallas_kernels import resolve_backend

    backend = resolve_backend("auto")
    if backend == "xla":
        return f"backend xla (no Pallas kernels on {jax.default_backend()})"
    if backend == "triton":
        from pallas_kernels.triton import tuning
    elif backend == "mosaic_gpu":
        from pallas_kernels.mosaic_gpu import tuning
    else:
        from pallas_kernels.tpu import tuning
    kind = jax.devices()[0].device_kind
    own = kind in tuning.TUNING
    return f"backend {backend}, tuning table {kind!r}" if own else \
        f"backend {backend}, tuning table 'generic' (no entry for {kind!r})"


def check_kernels() -> bool:
    from pallas_kernels import flash_lora_attention, naive_lora_attention

    ok = True
    rng = np.random.default_rng(0)
    for B, S, Hq, Hkv, D, T, r, dt in kernel_cases():
        ks = jax.random.split(jax.random.key(int(rng.integers(1 << 30))), 5)
        q = jax.random.normal(ks[0], (B, S, Hq, D), dt)
        k = jax.random.normal(ks[1], (B, T, Hkv, D), dt)
        v = jax.random.normal(ks[2], (B, T, Hkv, D), dt)
        lr = jax.random.normal(ks[3], (B, T, r), dt)
        b = (0.3 * jax.random.normal(ks[4], (B, Hkv, r, D))).astype(dt)
        lens = jnp.asarray(rng.integers(max(S, T // 2), T + 1, B), jnp.int32)
        offs = lens - S
        scale = jnp.asarray(rng.uniform(0.5, 2.0, B), jnp.float32)
        for with_lr in (True, False):
            args = (q, k, v, lr if with_lr else None, b if with_lr else None)
            kw = dict(lora_scale=scale if with_lr else 1.0, kv_lengths=lens, q_offsets=offs)
            ref = flash_lora_attention(*[None if a is None else a.astype(jnp.float32) for a in args],
                                       backend="xla", **kw)
            # the fused kernel, and (with LoRA) the naive expansion the model's ablation runs
            paths = [("fused", flash_lora_attention)] + ([("naive", naive_lora_attention)] if with_lr else [])
            for path, fn in paths:
                out = fn(*args, **kw)
                err = float(jnp.linalg.norm(out.astype(jnp.float32) - ref) / jnp.linalg.norm(ref))
                tol = 1e-4 if dt == jnp.float32 else 2e-2
                good = bool(np.isfinite(err)) and err < tol
                ok &= good
                print(f"{'PASS' if good else 'FAIL'} kernel {path} B={B} S={S} Hq={Hq} Hkv={Hkv} D={D} T={T} "
                      f"r={r} {jnp.dtype(dt).name} lora={with_lr}: rel err {err:.2e} (tol {tol:g})", flush=True)
    return ok


def check_end_to_end() -> bool:
    from lragent_jax.embedded import embedded_model
    from lragent_jax.engine import Engine
    from lragent_jax.schemes import SCHEMES
    from lragent_jax.session import Session

    model, lora, _ = embedded_model(dtype=jnp.float32)
    engine = Engine(model, lora)
    ok = True
    for scheme in SCHEMES:
        trajs = {}
        for attention in ("xla", "pallas"):
            s = Session(engine, scheme, max_len=512, attention=attention, stop_ids=())
            s.append(list(range(3, 120)))
            for agent, n in (("plan", 12), ("action", 8), ("reflect", 10)):
                s.generate(agent, n, greedy=True)
                s.append([10, 11, 12])
            trajs[attention] = s.trajectory[0]
        same = sum(a == b for a, b in zip(trajs["xla"], trajs["pallas"])) / len(trajs["xla"])
        good = same == 1.0
        ok &= good
        print(f"{'PASS' if good else 'FAIL'} end-to-end {scheme}: pallas vs xla token agreement {same:.3f}",
              flush=True)
    return ok


def check_concurrent(schemes=("full_shared", "base_lr_shared")) -> bool:
    """generate_concurrent (agents stacked as query heads + LSE merge) with Pallas vs XLA attention."""
    from lragent_jax.embedded import embedded_model
    from lragent_jax.engine import Engine
    from lragent_jax.session import Session

    model, lora, _ = embedded_model(dtype=jnp.float32)
    engine = Engine(model, lora)
    ok = True
    for scheme in schemes:
        got = {}
        for attention in ("xla", "pallas"):
            s = Session(engine, scheme, max_len=512, attention=attention, stop_ids=())
            s.append(list(range(3, 150)))
            s.generate("plan", 8, greedy=True)
            got[attention] = s.generate_concurrent({"plan": 10, "action": 12, "reflect": 9}, greedy=True)
        good = got["xla"] == got["pallas"]
        ok &= good
        print(f"{'PASS' if good else 'FAIL'} concurrent {scheme}: pallas vs xla branches identical", flush=True)
    return ok


if __name__ == "__main__":
    import argparse

    import functools

    from lragent_jax.schemes import canonical_scheme

    CHECKS = {"kernels": check_kernels, "end_to_end": check_end_to_end, "concurrent": check_concurrent}
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("checks", nargs="*", help="any of: " + " ".join(CHECKS) + " (default: all)")
    ap.add_argument("--schemes", default="full_shared,base_lr_shared", help="schemes for the concurrent check")
    args = ap.parse_args()
    unknown = sorted(set(args.checks) - set(CHECKS))
    if unknown:
        ap.error(f"unknown checks {unknown}; choose from " + " ".join(CHECKS))
    try:
        schemes = tuple(canonical_scheme(s) for s in args.schemes.split(","))
    except ValueError as e:
        ap.error(str(e))
    CHECKS["concurrent"] = functools.partial(check_concurrent, schemes)
    # XLA's float32 GPU matmuls default to TF32; the comparison wants true float32 on both sides.
    jax.config.update("jax_default_matmul_precision", "highest")
    print(f"device {jax.devices()[0].device_kind}, jax {jax.__version__}; {tuning_line()}", flush=True)
    ok = True
    for name, fn in CHECKS.items():
        if not args.checks or name in args.checks:
            ok &= fn()
    print("ALL PASS" if ok else "SOME FAILED", flush=True)
    sys.exit(0 if ok else 1)
