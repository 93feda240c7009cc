"""How many bytes a scheme's caches and a step's work buffers take, how much memory the device
has, and a check of both.

Computed from the config alone (nothing is allocated), so a --max-len or a batch that cannot fit
is refused with the numbers before an allocation fails deep inside JAX (or XLA spends minutes
trying to rematerialise a program that cannot fit).

Work buffers (activation_bytes) are bounded by the tokens of one call, never by the cache
capacity: the engine caps rows x chunk tokens per prefill call (Engine.max_call_tokens),
computes logits only where they are sampled, and donates the caches to every jitted step
(so a step's output caches reuse its input buffers: no second copy).
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp

from .cache import capacity
from .config import ModelConfig

GiB = 2**30


class CacheMemoryError(ValueError):
    """The caches a Session would allocate do not fit the memory the device has free."""


def cache_parts(scheme: str, config: ModelConfig, *, num_agents: int, max_len: int, dtype, batch: int = 1,
                value_rank: int = 0, num_critical: int = 0) -> list[tuple[str, int]]:
    """(description, bytes) of every cache array `scheme` preallocates (see schemes.py).

    value_rank: the LoRA rank on v_proj (base_shared / base_lr_shared keep LR = X A_v);
    num_critical: droidspeak's number of critical layers (each agent keeps their K and V).
    """
    item = jnp.dtype(dtype).itemsize
    T = capacity(max_len)
    L, H, D = config.num_layers, config.num_kv_heads, config.head_dim
    slots = f"{batch} x {T} slots"  # capacity: max_len rounded up to the kernels' block
    kv = L * batch * T * H * D * item  # one K or one V cache
    kv_desc = f"{L} layers x {slots} x {H} kv heads x {D} dims x {item} B"
    lr = L * batch * T * value_rank * item
    lr_desc = f"{L} layers x {slots} x rank {value_rank} x {item} B"
    if scheme == "non_shared":
        return [(f"{num_agents} agents' K and V ({kv_desc} each)", num_agents * 2 * kv)]
    if scheme == "full_shared":
        return [(f"shared K and V ({kv_desc} each)", 2 * kv)]
    if scheme == "base_lr_shared":
        return [(f"shared K and V_base ({kv_desc} each)", 2 * kv), (f"shared LR ({lr_desc})", lr)]
    if scheme == "base_shared":
        return [(f"shared K and V_base ({kv_desc} each)", 2 * kv),
                (f"{num_agents} agents' LR ({lr_desc} each)", num_agents * lr)]
    if scheme == "droidspeak":
        own = num_critical * batch * T * H * D * item
        hidden = batch * T * config.hidden_size * item
        return [(f"shared K and V ({kv_desc} each)", 2 * kv),
                (f"{num_agents} agents' K and V at {num_critical} critical layers", num_agents * 2 * own),
                (f"hidden states ({slots} x {config.hidden_size} x {item} B)", hidden)]
    raise ValueError(f"unknown scheme {scheme!r}")


def cache_bytes(scheme: str, config: ModelConfig, **kw) -> int:
    """Total bytes of cache_parts (== Session(...).cache_bytes once allocated)."""
    return sum(n for _, n in cache_parts(scheme, config, **kw))


def activation_bytes_per_token(config: ModelConfig, dtype) -> int:
    """Upper bound of the bytes one token of a forward call holds in temporaries at once.

    Counted on paper for model.run_layers (d = hidden, f = intermediate, item = dtype bytes): the
    peak is in the MLP, where the residual x, its norm h and the new residual (3 d item) and the
    float32 norm temporaries (2 d x 4) are live beside the gate and up products in float32 before
    their cast (2 f x 4), their casts and silu(gate) * up (3 f item). The attention block holds less:
    q, k, v and a LoRA delta in float32 and cast ((q_dim + 2 kv_dim) x (4 + item) + q_dim x 4) plus
    the attention output (q_dim item); it is taken if larger. XLA fuses most casts, so the true
    figure is lower: at the 8B shape 144 KiB a token in bfloat16 on an H200 (bound 252 KiB) and 185
    KiB in float32 on CPU (bound 360 KiB), XLA's memory analysis of a prefill call. Not counted:
    attention's own scratch, on chip in the Pallas kernels but float32 copies of a layer's keys and
    values in the XLA reference path (until that path is chunked over keys). tests/test_headroom.py
    checks the bound against compiled programs.
    """
    item = jnp.dtype(dtype).itemsize
    d, f = config.hidden_size, config.intermediate_size
    qd, kvd = config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim
    resident = 3 * d * item + 2 * d * 4
    mlp = 2 * f * 4 + 3 * f * item
    attn = (qd + 2 * kvd) * (4 + item) + qd * 4 + qd * item
    return resident + max(mlp, attn)


# [B, V] float32 arrays the sampler holds at once with top-k / top-p (scaled logits, the sorted
# copy, softmax, cumsum, masks, Gumbel noise): 7.6 measured on CPU (tests/test_headroom.py).
SAMPLER_ARRAYS = 8


def activation_bytes(config: ModelConfig, tokens: int, dtype, *, logits_rows: int = 0, sampled_rows: int = 0) -> int:
    """Upper bound of one forward call's temporaries: `tokens` new tokens over all rows (rows x
    chunk length of a prefill call, rows of a decode step), float32 logits for `logits_rows` of
    them (a prefill call: one per row; want_logits="all": every token; twice V x 4 bytes, the LM
    head's float32 output and its cast), and the sampler's arrays for `sampled_rows` (decode)."""
    V = config.vocab_size
    return (tokens * activation_bytes_per_token(config, dtype) + logits_rows * 2 * V * 4
            + sampled_rows * SAMPLER_ARRAYS * V * 4)


def _host_available_bytes() -> int | None:
    """MemAvailable (free + reclaimable page cache) from /proc/meminfo, else free pages (sysconf)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def available_bytes(device=None) -> tuple[int | None, str]:
    """(free bytes, what was measured) of `device` (default: the first local device).

    Accelerators: bytes_limit - bytes_in_use of the allocator (jax memory_stats()); CPU (no
    stats): the host's available memory. None when neither can be read.
    """
    device = device if device is not None else jax.local_devices()[0]
    try:
        stats = device.memory_stats()
    except Exception:  # some backends raise instead of returning None
        stats = None
    if stats and "bytes_limit" in stats:
        free = int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0))
        return free, f"{device.device_kind} ({device.platform}:{device.id}) has {fmt_bytes(free)} free"
    host = _host_available_bytes()
    return host, (f"the host ({device.platform}) has {fmt_bytes(host)} available" if host is not None
                  else "the free memory is unknown")


def fmt_bytes(n: int | None) -> str:
    if n is None:
        return "?"
    for unit, size in (("TiB", 2**40), ("GiB", GiB), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"


def check_cache_fits(scheme: str, config: ModelConfig, *, max_len: int, device=None, what: str = "max_len",
                     work_bytes: int = 0, work: str = "work buffers", free: int | None = None, **kw) -> int:
    """The caches' bytes, or CacheMemoryError (one line) saying what does not fit, how much it
    needs and how much there is.

    The caches and `work_bytes` (the largest step's temporaries, activation_bytes; `work` says what
    they are) must fit the free memory together; the weights are already resident and so not free.
    free: the bytes to fit in (a plan for another budget); default: measured (available_bytes).
    """
    parts = cache_parts(scheme, config, max_len=max_len, **kw)
    need = sum(n for _, n in parts)
    free, measured = available_bytes(device) if free is None else (int(free), f"the budget is {fmt_bytes(free)}")
    if free is not None and need + work_bytes > free:
        batch = kw.get("batch", 1)
        detail = "; ".join(f"{desc} = {fmt_bytes(n)}" for desc, n in parts)
        plus = f" + {fmt_bytes(work_bytes)} of {work} = {fmt_bytes(need + work_bytes)}" if work_bytes else ""
        lower = f"lower {what}" + (" or batch" if batch > 1 else "")
        raise CacheMemoryError(f"{what}={max_len}: the {scheme} caches need {fmt_bytes(need)} for batch={batch} "
                               f"({need} bytes: {detail}){plus} but {measured}; {lower}")
    return need
