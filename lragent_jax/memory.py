"""How many bytes a scheme's caches take, how much memory the device has, and a check of both.

Computed from the config alone (nothing is allocated), so a --max-len that cannot fit is refused
with the two numbers before a terabyte allocation fails deep inside JAX.
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
                     **kw) -> int:
    """The caches' bytes, or CacheMemoryError saying how much they need and how much there is.

    Only the caches are counted (the weights are already resident and so not free); the
    prefill and decode work buffers are small next to them at lengths that could not fit.
    """
    parts = cache_parts(scheme, config, max_len=max_len, **kw)
    need = sum(n for _, n in parts)
    free, measured = available_bytes(device)
    if free is not None and need > free:
        detail = "; ".join(f"{desc} = {fmt_bytes(n)}" for desc, n in parts)
        raise CacheMemoryError(f"{what}={max_len}: the {scheme} caches need {fmt_bytes(need)} ({need} bytes: "
                               f"{detail}) but {measured}; lower {what}")
    return need
