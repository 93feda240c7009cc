"""Tensor- and data-parallel sharding with jax.sharding: the one front door.

A Mesh has two axes: "data" (independent trajectories: batch rows) and "model" (tensor
parallel: attention heads and MLP columns). One table, `ShardingRules`, maps the logical
axes of every array (weights, LoRA factors, caches) to mesh axes, after
jax-ml/jax-llm-examples llama3; the functions below turn each array's logical axes into its
NamedSharding. The layout is Megatron's:

  wq, wk, wv, w_gate, w_up   column-parallel: output (heads / MLP columns) over model
  wo, w_down                 row-parallel: input over model (XLA all-reduces the output)
  embed                      replicated (a lookup; 1 GB at 8B, 2 GB at 70B in bf16)
  lm_head                    vocab-parallel (output over model) when the vocabulary divides,
                             else replicated; the tied case reads the replicated embed
  LoRA A [.., d_in, r]       sharded like its projection's input (replicated for q/k/v/gate/up,
                             over model for o/down: its [.., r] output is then all-reduced)
  LoRA B [.., r, d_out]      sharded like its projection's output
  K, V, V_base caches        [L, B, T, Hkv, D]: batch over data, KV heads over model
  LR cache                   [L, B, T, r]: batch over data, replicated over model (it is tiny and
                             every head's (P LR) B needs all of it)
  hidden (DroidSpeak)        [B, T, d]: batch over data

Inside a jitted program XLA's SPMD partitioner places the collectives (one all-reduce after
wo and one after w_down per layer). Attention runs under jax.shard_map over batch and heads
(`attend_sharded`), so each device attends its own heads over its own cache shard: no cache
is ever gathered.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import re

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

DATA, MODEL = "data", "model"
MESH_AXES = (DATA, MODEL)


class ShardingError(ValueError):
    """A mesh that does not fit the model, the batch or the visible devices."""


# ---- the mesh ------------------------------------------------------------------------------------
def parse_mesh_spec(spec: str) -> dict:
    """"data=2,model=4" / "model=2" / "data=2" -> {"data": D, "model": M} (a missing axis is 1)."""
    out = {DATA: 1, MODEL: 1}
    text = str(spec).strip()
    if not text:
        raise ShardingError("--mesh is empty; expected e.g. model=2 or data=2,model=4")
    seen = set()
    for part in text.split(","):
        m = re.fullmatch(r"\s*(\w+)\s*=\s*(\d+)\s*", part)
        if m is None:
            raise ShardingError(f"--mesh {spec!r}: {part.strip()!r} is not AXIS=N; expected e.g. "
                                f"model=2 or data=2,model=4")
        axis, n = m.group(1), int(m.group(2))
        if axis not in MESH_AXES:
            raise ShardingError(f"--mesh {spec!r}: unknown axis {axis!r}; allowed: {', '.join(MESH_AXES)}")
        if axis in seen:
            raise ShardingError(f"--mesh {spec!r}: axis {axis!r} given twice")
        if n < 1:
            raise ShardingError(f"--mesh {spec!r}: {axis}={n}; a mesh axis needs at least 1 device")
        seen.add(axis)
        out[axis] = n
    return out


def make_mesh(data: int = 1, model: int = 1, devices=None) -> Mesh:
    """A ("data", "model") Mesh over the first data * model of `devices` (default jax.devices()).

    Auto axes: XLA's SPMD partitioner propagates the shardings of weights and caches through
    each jitted program (the classic jit-over-a-Mesh behaviour).
    """
    for name, n in ((DATA, data), (MODEL, model)):
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
            raise ShardingError(f"mesh {name}={n!r}; expected a positive integer")
    devices = list(jax.devices() if devices is None else devices)
    need = int(data) * int(model)
    if need > len(devices):
        raise ShardingError(f"mesh data={data},model={model} needs {need} devices; {len(devices)} visible "
                            f"({devices[0].platform if devices else 'none'}); on CPU set XLA_FLAGS="
                            f"--xla_force_host_platform_device_count={need} before JAX starts")
    grid = np.asarray(devices[:need], dtype=object).reshape(int(data), int(model))
    return Mesh(grid, MESH_AXES, axis_types=(AxisType.Auto, AxisType.Auto))


def mesh_from_spec(spec: str | None, devices=None) -> Mesh | None:
    """The CLI's --mesh: None (or "data=1,model=1") -> None, the single-device programs."""
    if spec is None:
        return None
    shape = parse_mesh_spec(spec)
    if shape[DATA] * shape[MODEL] == 1:
        return None
    return make_mesh(shape[DATA], shape[MODEL], devices)


def use_mesh(mesh: Mesh | None):
    """Context in which jitted programs are traced and run over `mesh` (nothing for None)."""
    return contextlib.nullcontext() if mesh is None else jax.set_mesh(mesh)


def context_mesh():
    """The mesh a program is being traced under (Engine runs its jits in use_mesh), or None for
    none or a one-device mesh."""
    mesh = jax.sharding.get_abstract_mesh()
    return None if mesh.empty or mesh.size == 1 else mesh


def to_host(x, dtype=None) -> np.ndarray:
    """A jitted output (sampled tokens, counts, logits) as a numpy array on this host.

    On a mesh spanning several processes (jax.distributed) each process holds only its own
    devices' shards and np.asarray raises; process_allgather then collects the whole array on
    every process (a collective: every process reads the same outputs, as SPMD programs do). A
    fully addressable array (one process, any mesh) takes np.asarray alone."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        from jax.experimental import multihost_utils

        x = multihost_utils.process_allgather(x, tiled=True)
    return np.asarray(x, dtype)


# ---- logical axes -> mesh axes -----------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class ShardingRules:
    """Logical axis -> mesh axis name (None: replicated). One table for every array."""

    batch: str | None = DATA
    layers: str | None = None
    seq: str | None = None
    embed: str | None = None
    q_heads: str | None = MODEL
    kv_heads: str | None = MODEL
    head_dim: str | None = None
    ffw: str | None = MODEL
    vocab_in: str | None = None
    vocab_out: str | None = MODEL
    adapters: str | None = None
    lora_rank: str | None = None

    def spec(self, logical) -> PartitionSpec:
        return PartitionSpec(*(None if a is None else getattr(self, a) for a in logical))


# Model weights as the model holds them ([in, out]); the scan Engine's stacked copy has a leading
# layers axis.
WEIGHT_AXES = {
    "embed": ("vocab_in", "embed"),
    "lm_head": ("embed", "vocab_out"),
    "final_norm": ("embed",),
    "attn_norm": ("embed",),
    "mlp_norm": ("embed",),
    "wq": ("embed", "q_heads"),
    "wk": ("embed", "kv_heads"),
    "wv": ("embed", "kv_heads"),
    "wo": ("q_heads", "embed"),
    "w_gate": ("embed", "ffw"),
    "w_up": ("embed", "ffw"),
    "w_down": ("ffw", "embed"),
}
# (input, output) logical axes of each LoRA-able projection
PROJECTION_AXES = {"q": ("embed", "q_heads"), "k": ("embed", "kv_heads"), "v": ("embed", "kv_heads"),
                   "o": ("q_heads", "embed"), "gate": ("embed", "ffw"), "up": ("embed", "ffw"),
                   "down": ("ffw", "embed")}
_KV = ("layers", "batch", "seq", "kv_heads", "head_dim")
_LR = ("layers", "batch", "seq", "lora_rank")
# Cache arrays by their field name in lragent_jax.cache's views (and the schemes' own fields).
CACHE_AXES = {
    "k": _KV, "v": _KV, "v_base": _KV, "own_k": _KV, "own_v": _KV, "suf_k": _KV, "suf_v": _KV,
    "lr": _LR, "suf_lr": _LR,
    "hidden": ("batch", "seq", "embed"),
    "fork": ("batch",),
}


def _divisors_up_to(n: int) -> str:
    return ",".join(str(d) for d in range(1, n + 1) if n % d == 0)


def check_model_fits(config, mesh: Mesh) -> None:
    """ShardingError naming the first model dimension that does not divide over the model axis,
    and the model sizes that divide all of them (heads, KV heads, MLP columns)."""
    m = mesh.shape.get(MODEL, 1)
    dims = (("attention heads", config.num_heads), ("KV heads", config.num_kv_heads),
            ("MLP columns (intermediate_size)", config.intermediate_size))
    fits = math.gcd(*(n for _, n in dims))
    for what, n in dims:
        if n % m:
            raise ShardingError(f"{n} {what} do not divide over model={m}; use model in {{{_divisors_up_to(fits)}}}")


def rules_for(config, mesh: Mesh, rules: ShardingRules | None = None) -> ShardingRules:
    """The rules to run `config` on `mesh`: checks that heads and MLP divide over model; a
    vocabulary that does not divide keeps the LM head replicated."""
    check_model_fits(config, mesh)
    rules = rules or ShardingRules()
    if rules.vocab_out is not None and config.vocab_size % mesh.shape.get(rules.vocab_out, 1):
        rules = dataclasses.replace(rules, vocab_out=None)
    return rules


def _names(path) -> list[str]:
    return [str(getattr(p, "key", getattr(p, "name", ""))) for p in path]


def _sharding(mesh, rules, logical, ndim, what) -> NamedSharding:
    """Leading axes beyond the logical ones (a stacked layers axis) are replicated."""
    if ndim < len(logical):
        raise ShardingError(f"{what}: {ndim} dimensions, expected at least {len(logical)} {logical}")
    return NamedSharding(mesh, rules.spec((None,) * (ndim - len(logical)) + tuple(logical)))


def weight_shardings(tree, mesh: Mesh, rules: ShardingRules):
    """NamedSharding per leaf of a model state / pure dict / stacked-weights dict, by weight name."""
    def one(path, leaf):
        names = [n for n in _names(path) if n in WEIGHT_AXES]
        if not names:
            raise ShardingError(f"no sharding rule for model weight {'/'.join(_names(path))}")
        return _sharding(mesh, rules, WEIGHT_AXES[names[-1]], np.ndim(leaf), names[-1])
    return jax.tree_util.tree_map_with_path(one, tree)


def lora_shardings(lora, mesh: Mesh, rules: ShardingRules):
    """Shardings for a LoraWeights pytree (same structure)."""
    def one(path, leaf):
        names = _names(path)
        proj = next(n for n in names if n in PROJECTION_AXES)
        d_in, d_out = PROJECTION_AXES[proj]
        logical = {"a": ("layers", "adapters", d_in, "lora_rank"), "b": ("layers", "adapters", "lora_rank", d_out),
                   "scale": ("adapters",)}[names[-1]]
        return _sharding(mesh, rules, logical, np.ndim(leaf), f"LoRA {proj}.{names[-1]}")
    return jax.tree_util.tree_map_with_path(one, lora)


def cache_shardings(tree, mesh: Mesh, rules: ShardingRules):
    """Shardings for a cache view (or any pytree of cache fields), by field name. Raises
    ShardingError when the batch does not divide over the data axis."""
    data = mesh.shape.get(rules.batch, 1) if rules.batch else 1

    def one(path, leaf):
        names = [n for n in _names(path) if n in CACHE_AXES]
        if not names:
            raise ShardingError(f"no sharding rule for cache array {'/'.join(_names(path))}")
        logical = CACHE_AXES[names[-1]]
        rows = np.shape(leaf)[logical.index("batch")]
        if rows % data:
            raise ShardingError(f"batch of {rows} rows does not divide over data={data}; use a batch that is a "
                                f"multiple of {data} (or --mesh data=1)")
        return _sharding(mesh, rules, logical, np.ndim(leaf), names[-1])
    return jax.tree_util.tree_map_with_path(one, tree)


def init_sharded(config, mesh: Mesh, *, dtype, seed: int = 0, rules: ShardingRules | None = None,
                 min_matmul_rows: int | None = None):
    """A random-weight Llama (as model.Llama: normal, std 0.02; norms one) with every weight born on
    its devices, so a model bigger than one device (Llama-3.1-70B in bf16) never exists whole. One
    small jitted init per distinct (shape, dtype, sharding), run once per weight with its own key:
    compile time does not grow with depth (one jitted init of the whole 80-layer 70B model was
    still compiling after 4 minutes on an H200). The values differ from Llama(config, rngs=seed)'s."""
    import functools

    import jax.numpy as jnp
    from flax import nnx

    from lragent_jax.model import Llama

    shapes = nnx.eval_shape(lambda: Llama(config, dtype=dtype, rngs=nnx.Rngs(seed), min_matmul_rows=min_matmul_rows))
    graphdef, abstract = nnx.split(shapes)
    shardings = weight_shardings(abstract, mesh, rules_for(config, mesh, rules))

    @functools.cache
    def init(shape, dt, sharding, ones):
        if ones:
            return jax.jit(lambda key: jnp.ones(shape, dt), out_shardings=sharding)
        return jax.jit(lambda key: (0.02 * jax.random.normal(key, shape, jnp.float32)).astype(dt),
                       out_shardings=sharding)

    leaves = jax.tree_util.tree_flatten_with_path(abstract)[0]
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    counter = iter(range(len(leaves)))

    def one(path, leaf, sharding):
        ones = any(n.endswith("norm") for n in _names(path))
        return init(tuple(leaf.shape), jnp.dtype(leaf.dtype), sharding, ones)(keys[next(counter)])

    state = jax.tree_util.tree_map_with_path(one, abstract, shardings)
    return nnx.merge(graphdef, state)


COLLECTIVE_OPS = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
_HLO_DTYPE_BYTES = {"f32": 4, "bf16": 2, "f16": 2, "s32": 4, "u32": 4, "pred": 1, "s8": 1, "u8": 1, "f64": 8,
                    "s64": 8}


def collectives(hlo: str) -> list[dict]:
    """The collective instructions of a compiled HLO text (Engine.decode_program): op, the first
    result's dtype and shape, bytes of all results (a tuple-shaped all-reduce counts each part), and
    the JAX operation it was made for (op_name metadata). An async pair counts once: an all-reduce
    at its -start (whose shape is its result), the others at their -done (a -start's shape also
    holds the operand, e.g. (shard, gathered) for all-gather-start), named from either half."""
    found, start_names = [], {}
    pattern = re.compile(r"=\s*(.*?)\s(" + "|".join(COLLECTIVE_OPS) + r")(?:-(start|done))?\(")
    for line in hlo.splitlines():
        m = pattern.search(line)
        if not m:
            continue
        op, phase = m.group(2), m.group(3)
        name = re.search(r'op_name="([^"]*)"', line)
        name = name.group(1) if name else ""
        if phase and (phase == "done") == (op == "all-reduce"):  # the half not counted
            if phase == "start":
                start_names[line.split("=", 1)[0].split()[-1].lstrip("%")] = name
            continue
        if phase == "done" and not name:
            operand = re.search(r"([\w.\-]+)\)", line[m.end():])
            name = start_names.get(operand.group(1), "") if operand else ""
        results = re.findall(r"(\w+)\[([\d,]*)\]", m.group(1))
        shapes = [(dt, [int(d) for d in dims.split(",") if d]) for dt, dims in results]
        found.append({"op": op, "dtype": shapes[0][0] if shapes else "",
                      "shape": shapes[0][1] if shapes else [],
                      "bytes": sum(_HLO_DTYPE_BYTES.get(dt, 4) * math.prod(sh) for dt, sh in shapes),
                      "for": name})
    return found


def constrain(tree, shardings):
    """with_sharding_constraint leaf by leaf (inside a traced program)."""
    return jax.tree.map(jax.lax.with_sharding_constraint, tree, shardings)


def allocate(make, mesh: Mesh, rules: ShardingRules):
    """Run `make` (a function returning zero-filled cache arrays) as one jitted program whose
    outputs are born sharded: no device ever holds the whole cache."""
    shapes = jax.eval_shape(make)
    return jax.jit(make, out_shardings=cache_shardings(shapes, mesh, rules))()


# ---- attention under shard_map -------------------------------------------------------------------
def attend_sharded(fn, mesh, q, k, v, lr, lora_b, lora_scale, kv_lengths, q_offsets, layer, *,
                   return_lse: bool, rules: ShardingRules | None = None, **static):
    """fn(q, k, v, lr, lora_b, lora_scale=, kv_lengths=, q_offsets=, layer=, **static) under
    jax.shard_map: batch rows over data, query and KV heads over model, so each device runs the
    kernel (Pallas or XLA) on its own heads and cache shard. q [B, S, Hq, D]; k, v [L, B, T, Hkv, D];
    lr [L, B, T, r] (replicated over model); lora_b [B, H, r, D]; lora_scale [B] / [B, Hq] / a
    Python float; kv_lengths, q_offsets [B]; layer an int or a traced scalar.

    The query heads of one KV head are contiguous (GQA), so splitting both head axes into equal
    blocks keeps each device's query heads with their KV heads."""
    rules = rules or ShardingRules()
    b, h = rules.batch, rules.kv_heads
    if rules.q_heads != h:
        raise ShardingError("attention under shard_map needs q_heads and kv_heads on the same mesh axis")
    arrays = {"q": (q, PartitionSpec(b, None, h, None)),
              "k": (k, PartitionSpec(None, b, None, h, None)),
              "v": (v, PartitionSpec(None, b, None, h, None)),
              "kv_lengths": (kv_lengths, PartitionSpec(b)),
              "q_offsets": (q_offsets, PartitionSpec(b))}
    if lr is not None:
        arrays["lr"] = (lr, PartitionSpec(None, b, None, None))
    if lora_b is not None:
        arrays["lora_b"] = (lora_b, PartitionSpec(b, h, None, None))
    if isinstance(lora_scale, jax.Array) and np.ndim(lora_scale) > 0:
        arrays["lora_scale"] = (lora_scale, PartitionSpec(b, h) if np.ndim(lora_scale) == 2 else PartitionSpec(b))
    if isinstance(layer, jax.Array):
        arrays["layer"] = (layer, PartitionSpec())
    names = tuple(arrays)

    def local(*xs):
        a = dict(zip(names, xs))
        return fn(a["q"], a["k"], a["v"], a.get("lr"), a.get("lora_b"),
                  lora_scale=a.get("lora_scale", lora_scale), kv_lengths=a["kv_lengths"],
                  q_offsets=a["q_offsets"], layer=a.get("layer", layer), return_lse=return_lse, **static)

    out_spec = PartitionSpec(b, None, h, None)
    out_specs = (out_spec, PartitionSpec(b, None, h)) if return_lse else out_spec
    return jax.shard_map(local, mesh=mesh, in_specs=tuple(arrays[n][1] for n in names), out_specs=out_specs,
                         check_vma=False)(*(arrays[n][0] for n in names))
