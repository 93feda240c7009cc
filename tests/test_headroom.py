"""Memory headroom: a step's temporaries are bounded by the tokens of one call, not by the caches.

Structural checks on compiled programs (XLA's memory analysis of the CPU executables; nothing
is allocated: inputs are abstract) at the Llama-3.1-8B width with 2 layers:
  * every jitted step donates its caches: the output caches alias the input buffers (no copy);
  * a prefill chunk's and a decode loop's temporaries do not change with the cache capacity and
    stay under memory.activation_bytes (the bound Session's fit check adds to the caches);
  * a prefill call of B rows uses chunks of at most max_call_tokens / B tokens;
  * a batch whose caches + work buffers exceed the free memory is refused in one line before
    anything is compiled.

Attention is replaced by a stand-in that reads the cache (so the cache writes stay ordered before
it): the XLA reference attention's own scratch is attention.py's business and grows with the
capacity until it is chunked over keys. float32 caches: XLA's CPU backend computes a bfloat16
scatter in float32 (a float32 copy of the whole cache array, a CPU artefact), so bfloat16 would
measure the backend, not this library.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lragent_jax import attention, memory
from lragent_jax.cache import DenseKV, LoRAKV, copy_suffix
from lragent_jax.config import preset
from lragent_jax.engine import Engine
from lragent_jax.lora import random_adapters
from lragent_jax.model import Llama
from lragent_jax.sampling import SamplingParams
from lragent_jax.session import Session

F32 = jnp.float32
WIDE = dataclasses.replace(preset("llama-3.1-8b"), num_layers=2)  # 8B width, 2 layers


def _attend_stub(q, k_cache, v_cache, *, layer, lr_cache=None, **_):
    """q back, plus 0 x one element of the layer's caches: attention with no scratch of its own."""
    read = k_cache[layer, :, 0, 0, 0].sum() + v_cache[layer, :, 0, 0, 0].sum()
    if lr_cache is not None:
        read = read + lr_cache[layer, :, 0, 0].sum()
    return q + 0 * read.astype(q.dtype)


@pytest.fixture(scope="module")
def wide_engine():
    """An Engine over abstract 8B-width weights (nothing allocated), per-layer as on GPU."""
    model = nnx.eval_shape(lambda: Llama(WIDE, dtype=F32, rngs=nnx.Rngs(0)))
    lora = jax.eval_shape(lambda: random_adapters(WIDE, ("a", "b", "c"), rank=8, dtype=F32))
    return Engine(model, lora, layer_mode="per_layer")


def _i32(*shape):
    return jax.ShapeDtypeStruct(shape, jnp.int32)


def _nbytes(tree) -> int:
    return sum(x.size * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def _view(kind, batch, max_len):
    if kind == "dense":
        return jax.eval_shape(lambda: DenseKV.create(WIDE, batch, max_len, F32))
    return jax.eval_shape(lambda: LoRAKV.create(WIDE, batch, max_len, 8, F32))


def _prefill_memory(forward, engine, view, batch, chunk, all_logits=False):
    """XLA's memory analysis of one prefill call of `chunk` tokens per row over abstract inputs."""
    return forward.lower(engine.params, engine.lora, view, _i32(batch, chunk), _i32(batch), _i32(batch),
                         _i32(batch), jax.ShapeDtypeStruct((), jnp.bool_), layers=(0, WIDE.num_layers),
                         all_logits=all_logits).compile().memory_analysis()


def _decode_memory(engine, view, batch):
    sampling = SamplingParams.make(batch, temperature=0.7, top_k=5)  # the sampler's sort included
    return engine._decode.lower(engine.params, engine.lora, view, _i32(batch), _i32(batch), _i32(batch), sampling,
                                jax.random.key(0), _i32(batch), _i32(1), buffer=32).compile().memory_analysis()


@pytest.mark.parametrize("kind", ["dense", "lora"])
def test_prefill_chunk_aliases_caches_and_its_temporaries_ignore_capacity(monkeypatch, wide_engine, kind):
    monkeypatch.setattr(attention, "attend", _attend_stub)
    B, S = 2, 256
    temps = {}
    for max_len in (2048, 8192):
        view = _view(kind, B, max_len)
        m = _prefill_memory(wide_engine._forward, wide_engine, view, B, S)
        assert m.alias_size_in_bytes == _nbytes(view), "the output caches must reuse the donated input buffers"
        temps[max_len] = m.temp_size_in_bytes
    # 4x the cache capacity (+96 MiB of caches per array) moves the temporaries by less than 1 MiB.
    assert abs(temps[8192] - temps[2048]) < 2**20, temps
    bound = memory.activation_bytes(WIDE, B * S, F32, logits_rows=B)
    assert temps[2048] <= bound, (temps[2048], bound)
    assert temps[2048] >= bound / 4, "the bound is meant to be near the truth, not only above it"


def test_a_program_that_copies_the_cache_is_caught(monkeypatch, wide_engine):
    """The same prefill jitted without donating the cache: its output caches are new buffers
    (nothing aliased), which is the second cache copy the test above rules out."""
    monkeypatch.setattr(attention, "attend", _attend_stub)
    undonated = jax.jit(wide_engine._forward_impl, static_argnames=("layers", "all_logits"))
    view = _view("dense", 2, 2048)
    m = _prefill_memory(undonated, wide_engine, view, 2, 256)
    assert m.alias_size_in_bytes == 0 and m.output_size_in_bytes >= _nbytes(view)


def test_logits_of_every_token_only_when_asked(monkeypatch, wide_engine):
    """want_logits=True keeps [B, V] logits; "all" returns [B, S, V] float32 (the output)."""
    monkeypatch.setattr(attention, "attend", _attend_stub)
    B, S = 1, 256
    view = _view("dense", B, 2048)
    last = _prefill_memory(wide_engine._forward, wide_engine, view, B, S)
    every = _prefill_memory(wide_engine._forward, wide_engine, view, B, S, all_logits=True)
    row_logits = B * WIDE.vocab_size * 4
    assert last.output_size_in_bytes - _nbytes(view) <= row_logits + 2**10
    assert every.output_size_in_bytes - _nbytes(view) >= S * row_logits
    total = every.temp_size_in_bytes + every.output_size_in_bytes - _nbytes(view)
    assert total <= memory.activation_bytes(WIDE, B * S, F32, logits_rows=B * S)


def test_decode_loop_aliases_caches_and_its_temporaries_ignore_capacity(monkeypatch, wide_engine):
    monkeypatch.setattr(attention, "attend", _attend_stub)
    B = 4
    temps = {}
    for max_len in (2048, 8192):
        view = _view("lora", B, max_len)
        m = _decode_memory(wide_engine, view, B)
        assert m.alias_size_in_bytes == _nbytes(view)
        temps[max_len] = m.temp_size_in_bytes
    assert abs(temps[8192] - temps[2048]) < 2**20, temps
    assert temps[2048] <= memory.activation_bytes(WIDE, B, F32, logits_rows=B, sampled_rows=B), temps


def test_scheme_level_copy_donates_the_shared_cache():
    """copy_suffix (full_shared / base_lr_shared adopt) writes into the donated shared cache."""
    dst = jax.ShapeDtypeStruct((2, 3, 4096, 8, 128), F32)
    src = jax.ShapeDtypeStruct((2, 6, 256, 8, 128), F32)
    m = copy_suffix.lower(dst, src, _i32(3), _i32(3), _i32(3)).compile().memory_analysis()
    assert m.alias_size_in_bytes == _nbytes(dst)
    assert m.temp_size_in_bytes < _nbytes(src)  # at most the selected suffix rows, never a cache copy


def _tiny_engine(**kw):
    cfg = preset("tiny")
    return Engine(Llama(cfg, dtype=F32, rngs=nnx.Rngs(5)), random_adapters(cfg, seed=6, b_std=0.2), **kw)


def test_prefill_calls_hold_at_most_max_call_tokens():
    """B rows x chunk <= max_call_tokens (the largest buckets give way to a power of two that fits),
    and the capped chunks give the logits of uncapped ones (float32, different key blocking only:
    1e-4 as in test_engine's chunking test)."""
    capped = _tiny_engine(prefill_buckets=(16, 64), max_call_tokens=128)
    assert capped.call_buckets(1) == (16, 64)
    assert capped.call_buckets(2) == (16, 64)
    assert capped.call_buckets(4) == (16, 32)
    assert capped.call_buckets(16) == (8,)
    assert capped.call_buckets(2, all_logits=True) == (16, 32)  # [B, S, V] float32 logits count too
    shapes = []
    real = capped.forward
    capped.forward = lambda cache, tokens, *a, **k: (shapes.append(np.shape(tokens)), real(cache, tokens, *a, **k))[1]
    free = _tiny_engine(prefill_buckets=(16, 64))
    cfg = capped.config
    rng = np.random.default_rng(0)
    rows = [rng.integers(0, 256, n).tolist() for n in (70, 45, 90, 3)]
    ids = capped.adapter_ids(["plan", "action", "reflect", "plan"])
    out = {}
    for name, eng in (("capped", capped), ("free", free)):
        out[name], _ = eng.prefill(DenseKV.create(cfg, 4, 128, F32), rows, np.zeros(4), ids)
    assert shapes and all(b * s <= 128 for b, s in shapes), shapes
    np.testing.assert_allclose(np.asarray(out["capped"]), np.asarray(out["free"]), rtol=1e-4, atol=1e-4)


def test_session_refuses_a_batch_that_does_not_fit_in_one_line_before_compiling(monkeypatch):
    eng = _tiny_engine()
    cfg = eng.config
    kw = dict(num_agents=3, max_len=512, dtype=F32, batch=6, value_rank=8)
    caches = memory.cache_bytes("base_lr_shared", cfg, **kw)
    work = eng.work_bytes(6)
    assert work > 0
    monkeypatch.setattr(memory, "available_bytes", lambda device=None: (caches + work - 1, "the test GPU has X free"))
    with pytest.raises(memory.CacheMemoryError) as e:
        Session(eng, "base_lr_shared", batch=6, max_len=512)
    msg = str(e.value)
    assert "\n" not in msg
    for part in ("base_lr_shared", "batch=6", "max_len=512", f"{caches} bytes", memory.fmt_bytes(caches + work),
                 "the test GPU has X free", "lower max_len or batch"):
        assert part in msg, (part, msg)
    assert sum(eng.trace_counts.values()) == 0  # refused before any program was traced
    monkeypatch.setattr(memory, "available_bytes", lambda device=None: (caches + work, "enough"))
    assert Session(eng, "base_lr_shared", batch=6, max_len=512).cache_bytes == caches
