"""What every benchmark shares: argument helpers, timers, measured floors and result files.

Imports no JAX at module level: bench.hf_peft runs with torch alone and bench.floors
reads results anywhere. Results go to `results/<benchmark>/<timestamp>/` under the
current directory (git-ignored at the repository root) unless --out names a folder.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import sys
import time
import traceback

from lragent_jax.cli import UsageError, positive_int_list  # noqa: F401  (re-exported for the benchmarks)

RESULTS_ROOT = "results"  # relative to the cwd; /results/ is in .gitignore


# ---- command line ------------------------------------------------------------------------------
def check_model_and_adapters(model, adapters, hint: str = "") -> None:
    """A real --model comes with the trace's three agents' adapters, and adapters only with a
    real model (hint: what replaces them without one)."""
    if adapters and not model:
        raise UsageError("--adapter needs --model" + (f" ({hint})" if hint else ""))
    if model and not adapters:
        raise UsageError("--model needs --adapter plan=... --adapter action=... --adapter reflect=...")


def parse_lens(text: str) -> list[int]:
    """'4k,16k,300' -> [4096, 16384, 300] (k = 1024); an argparse type: bad input is one line."""
    import argparse

    out = []
    try:
        for tok in text.split(","):
            tok = tok.strip().lower()
            if tok:
                out.append(int(float(tok[:-1]) * 1024) if tok.endswith("k") else int(tok))
    except ValueError:
        out = []
    if not out or min(out) < 1:
        raise argparse.ArgumentTypeError(f"expected positive lengths like 16k,32k, got {text!r}")
    return out


def log(*a):
    print(*a, flush=True)


# ---- failures ----------------------------------------------------------------------------------
def is_oom(exc: BaseException) -> bool:
    text = f"{type(exc).__name__}: {exc}".lower()
    return any(s in text for s in ("resource_exhausted", "resource exhausted", "outofmemory", "out of memory"))


def failed_point(exc: BaseException, base: dict) -> dict:
    """The result row of a point that raised: OOM (the sweep goes on) or ERROR (logged with
    its traceback; the benchmark's exit code becomes 1)."""
    if is_oom(exc):
        res = {**base, "status": "OOM", "error": str(exc).splitlines()[0][:300]}
        log(f"    OOM: {res['error'][:160]}")
    else:
        res = {**base, "status": "ERROR", "error": f"{type(exc).__name__}: {exc}"[:1000]}
        log(f"    ERROR: {res['error'][:300]}")
        traceback.print_exc()
        sys.stderr.flush()
    return res


# ---- timers and floors (JAX imported on use) ---------------------------------------------------
def median_time(f, *args, reps=10):
    """Median wall time of f(*args), each run synchronized, after one warm-up call (compile excluded)."""
    import jax
    import numpy as np

    jax.block_until_ready(f(*args))
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        jax.block_until_ready(f(*args))
        ts.append(time.perf_counter() - t)
    return float(np.median(ts))


def copy_bandwidth(nbytes=2 << 30, reps=10):
    """Bytes read + written per second by a large on-device copy (the decode floor's bandwidth)."""
    import jax
    import jax.numpy as jnp

    x = jnp.ones((nbytes // 4,), jnp.float32)
    return 2 * nbytes / median_time(jax.jit(lambda a: a + 1.0), x, reps=reps)


def matmul_rate(n=8192, reps=10, dtype=None):
    """FLOP/s of one n x n x n matmul (bf16 by default; the prefill floor's rate)."""
    import jax
    import jax.numpy as jnp

    dtype = dtype or jnp.bfloat16
    a = jax.random.normal(jax.random.key(0), (n, n), dtype)
    b = jax.random.normal(jax.random.key(1), (n, n), dtype)
    return 2 * n**3 / median_time(jax.jit(lambda a, b: a @ b), a, b, reps=reps)


# ---- result files --------------------------------------------------------------------------------
def results_dir(benchmark: str, out: str | None = None) -> str:
    """--out, or a fresh results/<benchmark>/<timestamp>/ under the cwd; created."""
    path = out or os.path.join(RESULTS_ROOT, benchmark, datetime.datetime.now().strftime("%Y%m%d-%H%M%S"))
    os.makedirs(path, exist_ok=True)
    return path


def run_info() -> dict:
    """Card, JAX version, date and command line: what every results JSON records."""
    import jax

    dev = jax.devices()[0]
    return {"card": getattr(dev, "device_kind", str(dev)), "backend": jax.default_backend(),
            "jax_version": jax.__version__, "python": platform.python_version(), "host": platform.node(),
            "date": datetime.datetime.now().isoformat(timespec="seconds"), "command": command_line()}


def command_line() -> str:
    """How this process was started, as `python -m bench.X ARGS` (no JAX needed)."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    what = ["-m", spec.name] if spec is not None else [sys.argv[0] if sys.argv else "?"]
    return " ".join([os.path.basename(sys.executable), *what, *sys.argv[1:]])


def write_json(path, payload):
    with open(path, "w") as f:
        json.dump(payload, f, indent=1, default=str)
    return path


def save_plot(fig, axes, path, title):
    """Grid, legend, title, tight layout; writes the PNG and closes the figure."""
    import matplotlib.pyplot as plt

    for ax in axes:
        ax.minorticks_off()
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
