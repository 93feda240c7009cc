"""Jitted prefill (length buckets) and decode loop (lax.while_loop) over any cache view.

The engine owns the model parameters and the stacked adapters; caches are passed in
and returned (donated), so one engine serves every scheme and every agent. Prefill
chunks are padded to a few bucket lengths and decode buffers to powers of two, so a
whole multi-agent trajectory compiles a handful of programs (see `trace_counts`).
"""

from __future__ import annotations

import collections
import functools
import numbers

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct

from . import sharding
from .cache import CacheView
from .lora import LoraWeights
from .memory import activation_bytes, activation_bytes_per_token
from .model import Llama, StepInputs, stacked_layer_weights
from .sampling import SamplingParams, sample

DEFAULT_PREFILL_BUCKETS = (16, 64, 256, 1024)
# Tokens at which a prefill chunk's matmuls take as long as one read of the weights
# (bf16: 2 bytes and 2 FLOPs a weight, so matmul rate / bandwidth): ~200 on H100 and H200
# (600-700 TFLOP/s over 3-3.4 TB/s), ~160 on A100, ~240 on TPU v5e.
DEFAULT_WEIGHT_READ_TOKENS = 200
# Rows x chunk tokens of one prefill call at most: its temporaries grow with this product, not with
# the cache (8B bf16 on an H200: 1.13 GiB at 8 x 1024 tokens, XLA's memory analysis; the bound
# memory.activation_bytes says 2 GiB), and 8192 rows keep the matmuls compute-bound (far above
# DEFAULT_WEIGHT_READ_TOKENS). Batch 8 still prefills in 1024-token chunks, batch 28 in 256.
DEFAULT_MAX_CALL_TOKENS = 8192
CALL_OVERHEAD = 0.25  # a prefill call's launch and host work, in weight reads (~1 ms of ~5 ms at 8B)
LAYER_MODES = ("auto", "scan", "per_layer")
BASE_AGENT = "base"  # agent name of the plain model (adapter id -1) unless an adapter is so named


@functools.lru_cache(maxsize=4096)
def plan_chunks(n: int, buckets: tuple, weight_read_tokens: int) -> tuple:
    """How to prefill n tokens in bucketed calls: ((tokens, bucket), ...), largest first.

    A call costs max(1, bucket / weight_read_tokens) reads of the weights (below that
    many tokens it is bound by reading the weights, above by its padded matmuls) plus
    CALL_OVERHEAD for its launch and host work; the plan minimizes the sum (ties: the
    smaller bucket). So 264 tokens with buckets 16/64/256/1024 run as 256 + 8 (about 2.8)
    rather than padded to 1024 (5.4); with buckets 64/1024 they stay one 1024 call (five
    64-token calls would cost 6.25). Full chunks of the largest bucket come first.
    """
    if n <= 0:
        return ()
    top = buckets[-1]
    full, rest = divmod(n, top)
    cost = lambda b: max(1.0, b / weight_read_tokens) + CALL_OVERHEAD  # noqa: E731
    best = [(0.0, 0)] + [None] * rest  # best[m] = (cost, first bucket) for m tokens
    for m in range(1, rest + 1):
        best[m] = min((cost(b) + best[max(0, m - b)][0], b) for b in buckets)
    sizes, m = [top] * full, rest
    while m > 0:
        sizes.append(best[m][1])
        m -= min(m, best[m][1])
    plan, m = [], n
    for b in sorted(sizes, reverse=True):  # fill the largest buckets first
        plan.append((min(m, b), b))
        m -= min(m, b)
    return tuple(plan)


def _pow2(n: int, minimum: int = 8) -> int:
    return max(minimum, 1 << max(0, int(n) - 1).bit_length())


@struct.dataclass
class DecodeState:
    """Loop state of the jitted sampler."""

    step: jax.Array  # number of tokens produced so far (the first comes from prefill)
    tokens: jax.Array  # [B, buffer] produced tokens (pad -1 after a row stops)
    num_tokens: jax.Array  # [B] tokens produced per row (a stop token included)
    done: jax.Array  # [B]
    cache: object
    key: jax.Array


class Engine:
    """Runs a Llama with stacked LoRA adapters over caches.

    Args:
      model: a `Llama`. The Engine runs the weights (and min_matmul_rows) the model holds
        when the Engine is built, and never changes the model.
      lora: stacked adapters or None (base model only).
      prefill_buckets: padded chunk lengths; longer inputs are processed in chunks of the
        largest bucket. A remainder is padded to a bucket or split over smaller ones,
        whichever reads the weights fewer times (plan_chunks).
      weight_read_tokens: tokens at which a chunk's matmuls cost one read of the weights
        (matmul rate / bandwidth for bf16; DEFAULT_WEIGHT_READ_TOKENS); plan_chunks' cost model.
      max_call_tokens: rows x chunk tokens of one prefill call at most (call_buckets), which bounds
        its temporaries (work_bytes) whatever the batch; DEFAULT_MAX_CALL_TOKENS.
      layer_mode: how layers run (LAYER_MODES):
        "per_layer" the model's own per-layer weights, layers unrolled (no weight slice is
                    copied per step; the weights are held once): what decode on an
                    accelerator wants. Compile time grows with depth.
        "scan"      lax.fori_loop over a stacked copy of the layer weights this Engine makes:
                    compile time independent of depth, but the layer weights are held twice
                    (the model's and the stacked copy) and XLA may copy each layer's slice
                    per step (costly for decode on GPU).
        "auto"      "scan" on CPU, "per_layer" on GPU/TPU.
      mesh: a jax.sharding.Mesh with axes ("data", "model") (sharding.make_mesh), or None: one
        device, the unsharded programs. With a mesh the weights and adapters are placed with
        sharding.ShardingRules (heads and MLP columns over model), caches are allocated sharded
        (allocate), and every program is traced under the mesh, so XLA's SPMD partitioner splits
        it and attention runs per device under shard_map. Weights already placed with these
        shardings (loading.load_model(mesh=...)) are not copied; weights on one device are
        copied shard by shard to their devices (that device held the whole model first).
      rules: a sharding.ShardingRules to override the default table (mesh only).
    """

    def __init__(self, model: Llama, lora: LoraWeights | None = None, *,
                 prefill_buckets=DEFAULT_PREFILL_BUCKETS, layer_mode: str = "auto",
                 weight_read_tokens: int = DEFAULT_WEIGHT_READ_TOKENS,
                 max_call_tokens: int = DEFAULT_MAX_CALL_TOKENS, mesh=None,
                 rules: sharding.ShardingRules | None = None):
        if layer_mode not in LAYER_MODES:
            raise ValueError(f"layer_mode={layer_mode!r}; allowed: {LAYER_MODES}")
        if layer_mode == "auto":
            layer_mode = "scan" if jax.default_backend() == "cpu" else "per_layer"
        self.layer_mode = layer_mode
        self.config = model.config
        self.dtype = model.dtype
        self.lora = lora
        buckets = tuple(sorted(prefill_buckets))
        if not buckets or any(int(b) != b or b < 1 for b in buckets):
            raise ValueError(f"prefill_buckets must be positive integers, got {prefill_buckets!r}")
        self.prefill_buckets = buckets
        if isinstance(weight_read_tokens, bool) or not isinstance(weight_read_tokens, numbers.Integral) \
                or weight_read_tokens < 1:
            raise ValueError(f"weight_read_tokens must be a positive integer, got {weight_read_tokens!r}")
        self.weight_read_tokens = int(weight_read_tokens)
        if isinstance(max_call_tokens, bool) or not isinstance(max_call_tokens, numbers.Integral) \
                or max_call_tokens < 1:
            raise ValueError(f"max_call_tokens must be a positive integer, got {max_call_tokens!r}")
        self.max_call_tokens = int(max_call_tokens)
        # params: (the model's state for nnx.merge, stacked layer weights or None); one jit
        # argument. The tree.map takes new Variables over the model's arrays (no copy): the
        # Engine keeps the weights it was built with, whatever is later set on the model.
        self.graphdef, state = nnx.split(model)
        state = jax.tree.map(lambda a: a, state)
        stacked = stacked_layer_weights(model) if layer_mode == "scan" else None
        self.mesh = mesh
        self.rules = None
        if mesh is not None:
            self.rules = sharding.rules_for(self.config, mesh, rules)
            state = jax.device_put(state, sharding.weight_shardings(state, mesh, self.rules))
            if stacked is not None:
                stacked = jax.device_put(stacked, sharding.weight_shardings(stacked, mesh, self.rules))
            if lora is not None:
                lora = jax.device_put(lora, sharding.lora_shardings(lora, mesh, self.rules))
            self.lora = lora
        self.params = (state, stacked)
        self.trace_counts: collections.Counter = collections.Counter()
        self._forward = jax.jit(self._forward_impl, static_argnames=("layers", "all_logits"),
                                donate_argnames=("cache",))
        self._decode = jax.jit(self._decode_impl, static_argnames=("buffer",), donate_argnames=("cache",))
        self._sample = jax.jit(self._sample_impl)

    # ---- placement (identity without a mesh) ----------------------------------------------------
    def allocate(self, make):
        """make(): a function returning zero-filled cache arrays (a view or a dict of named fields,
        sharding.CACHE_AXES). With a mesh they are created sharded, never whole on one device."""
        return make() if self.mesh is None else sharding.allocate(make, self.mesh, self.rules)

    def place_cache(self, cache):
        """The cache on this Engine's mesh with the rules' shardings (no copy when it already is:
        caches from allocate; a restored or adopted cache is moved once)."""
        if self.mesh is None:
            return cache
        return jax.device_put(cache, sharding.cache_shardings(cache, self.mesh, self.rules))

    def _constrain_cache(self, cache):
        """Inside a traced program: keep the cache in its sharding (nothing without a mesh)."""
        if self.mesh is None:
            return cache
        return sharding.constrain(cache, sharding.cache_shardings(cache, self.mesh, self.rules))

    @property
    def max_chunk(self) -> int:
        return self.prefill_buckets[-1]

    def call_buckets(self, rows: int, all_logits: bool = False) -> tuple:
        """The chunk lengths a prefill call of `rows` rows may use: rows x length <= max_call_tokens
        (with all_logits the float32 logits of every token count as tokens too). Over budget, the
        largest buckets give way to the largest power of two that fits (one more program)."""
        budget = self.max_call_tokens
        if all_logits:
            per_token = activation_bytes_per_token(self.config, self.dtype)
            budget = budget * per_token // (per_token + activation_bytes(self.config, 0, self.dtype, logits_rows=1))
        cap = max(1, budget // max(1, int(rows)))
        if cap >= self.prefill_buckets[-1]:
            return self.prefill_buckets
        cap = 1 << (cap.bit_length() - 1)
        return tuple(b for b in self.prefill_buckets if b < cap) + (cap,)

    def work_bytes(self, rows: int) -> int:
        """Upper bound of the temporaries of this engine's largest call over `rows` rows: a prefill
        call of call_buckets(rows)[-1] tokens per row (logits at each row's last token) or a decode
        step (memory.activation_bytes). Caches are donated, so they are not counted again."""
        rows = int(rows)
        prefill = activation_bytes(self.config, rows * self.call_buckets(rows)[-1], self.dtype, logits_rows=rows)
        decode = activation_bytes(self.config, rows, self.dtype, logits_rows=rows, sampled_rows=rows)
        return max(prefill, decode)

    def adapter_ids(self, agents) -> np.ndarray:
        """Agent names (None or "base" = plain model) -> adapter ids [B]."""
        out = []
        for a in agents:
            if a is None or (a == BASE_AGENT and (self.lora is None or a not in self.lora.names)):
                out.append(-1)
            elif self.lora is None:
                raise KeyError(f"unknown agent {a!r}: no adapters are loaded")
            else:
                out.append(self.lora.adapter_id(a))
        return np.asarray(out, np.int32)

    # ---- traced bodies ---------------------------------------------------------------------
    def _run(self, params, lora, cache, tokens, start, n_valid, adapter_ids, layers, all_logits, need_logits):
        state, stacked = params
        model = nnx.merge(self.graphdef, state)
        B, S = tokens.shape
        offs = jnp.arange(S, dtype=jnp.int32)[None, :]
        positions = start[:, None] + offs
        valid = offs < n_valid[:, None]
        capacity = _capacity(cache)
        step = StepInputs(
            positions=positions,
            write_positions=jnp.where(valid, positions, capacity),
            kv_lengths=start + n_valid,
            q_offsets=start,
            adapter_ids=adapter_ids,
        )
        lo, hi = layers
        hidden_layer = cache.hidden_layer  # a view caching a layer's input hidden states (DroidSpeak)
        if lo == 0:
            x = model.embed_tokens(tokens)
        elif hidden_layer is not None and lo == hidden_layer:
            x = cache.read_hidden(positions).astype(model.dtype)
        else:
            raise ValueError(f"a forward may start at layer 0 or at a cached hidden state, not {lo}")
        if hidden_layer is not None and lo < hidden_layer < hi:
            x, cache = model.run_layers(x, cache, step, lora, layers=(lo, hidden_layer), stacked=stacked)
            cache = cache.store_hidden(x, step)
            lo = hidden_layer
        x, cache = model.run_layers(x, cache, step, lora, layers=(lo, hi), stacked=stacked)
        if all_logits:
            return model.logits(x), cache
        last = x[jnp.arange(B), jnp.maximum(n_valid - 1, 0)]
        # A traced switch, not a static one: chunks whose logits nobody reads (the first
        # chunks of a long prompt, catch-up) run the same program and skip the LM head.
        if need_logits is True:  # decode: always
            return model.logits(last), cache
        logits = jax.lax.cond(need_logits, model.logits,
                              lambda h: jnp.zeros((B, self.config.vocab_size), jnp.float32), last)
        return logits, cache

    def _forward_impl(self, params, lora, cache, tokens, start, n_valid, adapter_ids, need_logits, *, layers,
                      all_logits):
        self.trace_counts["forward"] += 1
        logits, cache = self._run(params, lora, cache, tokens, start, n_valid, adapter_ids, layers, all_logits,
                                  need_logits)
        return logits, self._constrain_cache(cache)

    def _sample_impl(self, logits, sampling, key):
        self.trace_counts["sample"] += 1
        return sample(logits, sampling, key)

    def _decode_impl(self, params, lora, cache, first_token, start, adapter_ids, sampling, key,
                     max_new_tokens, stop_ids, *, buffer):
        """Generate tokens 2..max_new_tokens[b]; the first came from prefill (not yet cached)."""
        self.trace_counts["decode"] += 1
        B = first_token.shape[0]
        is_stop = lambda t: jnp.any(t[:, None] == stop_ids[None, :], axis=-1)
        state = DecodeState(
            step=jnp.int32(1),
            tokens=jnp.full((B, buffer), -1, jnp.int32).at[:, 0].set(first_token),
            num_tokens=jnp.ones((B,), jnp.int32),
            done=is_stop(first_token) | (max_new_tokens <= 1),
            cache=cache,
            key=key,
        )

        def cond(s: DecodeState):
            return (s.step < jnp.max(max_new_tokens)) & ~jnp.all(s.done)

        def body(s: DecodeState):
            prev = s.tokens[:, s.step - 1]
            active = ~s.done
            logits, cache = self._run(
                params, lora, s.cache, jnp.maximum(prev, 0)[:, None], start + s.step - 1,
                active.astype(jnp.int32), adapter_ids, (0, self.config.num_layers), False, True,
            )
            key, sub = jax.random.split(s.key)
            tok = sample(logits, sampling, sub)
            tok = jnp.where(active, tok, -1)
            return DecodeState(
                step=s.step + 1,
                tokens=s.tokens.at[:, s.step].set(tok),
                num_tokens=s.num_tokens + active.astype(jnp.int32),
                done=s.done | (active & is_stop(tok)) | (s.step + 1 >= max_new_tokens),
                cache=self._constrain_cache(cache),
                key=key,
            )

        s = jax.lax.while_loop(cond, body, state)
        return s.tokens, s.num_tokens, s.cache

    # ---- host-side API -----------------------------------------------------------------------
    def forward(self, cache, tokens: np.ndarray, start: np.ndarray, n_valid: np.ndarray,
                adapter_ids: np.ndarray, *, layers=None, want_logits=True):
        """One padded chunk: tokens [B, S] (S a bucket length), rows start at `start`.

        want_logits: True -> float32 logits [B, V] at each row's last valid token; "all" ->
        [B, S, V]; False -> None (the same compiled program as True: the LM head is skipped
        at run time).
        """
        layers = tuple(layers) if layers is not None else (0, self.config.num_layers)
        all_logits = want_logits == "all"
        with sharding.use_mesh(self.mesh):
            logits, cache = self._forward(self.params, self.lora, self.place_cache(cache),
                                          jnp.asarray(tokens, jnp.int32), jnp.asarray(start, jnp.int32),
                                          jnp.asarray(n_valid, jnp.int32), jnp.asarray(adapter_ids, jnp.int32),
                                          jnp.asarray(bool(want_logits)), layers=layers, all_logits=all_logits)
        return (logits if want_logits else None), cache

    def prefill(self, cache, rows: list, start: np.ndarray, adapter_ids: np.ndarray, *,
                layers=None, want_logits=True):
        """Process each row's token list `rows[b]` from position start[b], in bucketed chunks.

        want_logits: True -> logits [B, V] at each row's last token (meaningless for rows with
        no tokens); "all" -> a list of per-row float32 arrays [len(rows[b]), V] (host memory);
        False -> None. Returns (logits, cache).
        """
        start = np.asarray(start, np.int64).copy()
        remaining = [list(r) for r in rows]
        B = len(rows)
        logits = None
        per_row = [[] for _ in range(B)]
        # Rows x chunk tokens stay within max_call_tokens: the call's temporaries do not grow with B.
        plan = plan_chunks(max(len(r) for r in remaining), self.call_buckets(B, want_logits == "all"),
                           self.weight_read_tokens)
        for take, S in plan:
            tokens = np.zeros((B, S), np.int32)
            n_valid = np.array([min(len(r), take) for r in remaining], np.int32)
            for b, r in enumerate(remaining):
                tokens[b, : n_valid[b]] = r[: n_valid[b]]
            finishing = np.array([0 < len(r) <= take for r in remaining])
            mode = "all" if want_logits == "all" else (bool(want_logits) and bool(finishing.any()))
            out, cache = self.forward(cache, tokens, start, n_valid, adapter_ids, layers=layers, want_logits=mode)
            if mode == "all":
                out = sharding.to_host(out)
                for b in range(B):
                    per_row[b].append(out[b, : n_valid[b]])
            elif out is not None:  # keep each row's logits from the chunk holding its last token
                logits = out if logits is None else jnp.where(finishing[:, None], out, logits)
            start = start + n_valid
            remaining = [r[n:] for r, n in zip(remaining, n_valid)]
        if want_logits == "all":
            V = self.config.vocab_size
            return [np.concatenate(p) if p else np.zeros((0, V), np.float32) for p in per_row], cache
        return logits, cache

    def sample(self, logits, sampling: SamplingParams, key):
        with sharding.use_mesh(self.mesh):
            return self._sample(logits, sampling, key)

    def decode(self, cache, first_token, start, adapter_ids, sampling: SamplingParams, key, *,
               max_new_tokens, stop_ids=()):
        """Continue from `first_token` (at position `start`, not yet cached) to at most
        max_new_tokens tokens in all (an int, or one limit per row). Returns (tokens [B, n] with -1
        padding, counts [B], cache).
        """
        B = np.shape(first_token)[0]
        limits = np.broadcast_to(np.asarray(max_new_tokens, np.int32), (B,))
        max_new_tokens = int(limits.max())
        buffer = _pow2(max_new_tokens, minimum=32)  # one program for every turn of <= 32 tokens
        stops = np.full((_pow2(len(stop_ids), 1),), -2, np.int32)
        stops[: len(stop_ids)] = list(stop_ids)
        with sharding.use_mesh(self.mesh):
            tokens, counts, cache = self._decode(
                self.params, self.lora, self.place_cache(cache), jnp.asarray(first_token, jnp.int32),
                jnp.asarray(start, jnp.int32), jnp.asarray(adapter_ids, jnp.int32), sampling, key,
                jnp.asarray(limits), jnp.asarray(stops), buffer=buffer,
            )
        return tokens[:, :max_new_tokens], counts, cache

    def decode_program(self, cache, batch: int, buffer: int = 32) -> str:
        """Compiled HLO text of the decode loop `decode` runs over `cache` (for inspection: the
        collectives of a sharded step, sharding.collectives). Compiles; runs nothing."""
        from lragent_jax.sampling import SamplingParams

        ids = jnp.zeros((batch,), jnp.int32)
        with sharding.use_mesh(self.mesh):
            lowered = self._decode.lower(self.params, self.lora, self.place_cache(cache), ids,
                                         jnp.ones((batch,), jnp.int32), ids, SamplingParams.make(batch, greedy=True),
                                         jax.random.key(0), jnp.full((batch,), 2, jnp.int32),
                                         jnp.full((1,), -2, jnp.int32), buffer=buffer)
        return lowered.compile().as_text()


def _capacity(cache) -> int:
    """Slots per row of a cache view; a write to this slot (or beyond) is dropped."""
    if not isinstance(cache, CacheView):
        raise TypeError(f"not a cache view (lragent_jax.cache.CacheView): {type(cache).__name__}")
    return cache.capacity
