"""Engine: decode loop == re-prefill, stop ids, batching, and a bounded number of compilations."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lragent_jax.cache import DenseKV, LoRAKV
from lragent_jax.config import preset
from lragent_jax.engine import Engine
from lragent_jax.lora import random_adapters
from lragent_jax.model import Llama
from lragent_jax.sampling import SamplingParams
from lragent_jax.session import Session


@pytest.fixture(scope="module")
def engine():
    cfg = preset("tiny")
    return Engine(Llama(cfg, dtype=jnp.float32, rngs=nnx.Rngs(3)), random_adapters(cfg, seed=4, b_std=0.2))


def greedy_generate(engine, prompt, agent, n, stop_ids=()):
    ids = engine.adapter_ids([agent])
    cache = DenseKV.create(engine.config, 1, 128, jnp.float32)
    logits, cache = engine.prefill(cache, [prompt], np.array([0]), ids)
    p = SamplingParams.make(1, greedy=True)
    first = engine.sample(logits, p, jax.random.key(0))
    toks, counts, _ = engine.decode(cache, first, np.array([len(prompt)]), ids, p, jax.random.key(1),
                                    max_new_tokens=n, stop_ids=stop_ids)
    return np.asarray(toks[0, : int(counts[0])]).tolist()


def test_decode_loop_matches_repeated_prefill(engine):
    prompt = list(range(10, 31))
    toks = greedy_generate(engine, prompt, "action", 9)
    seq = list(prompt)
    for _ in range(9):  # recompute everything from scratch for every token
        cache = DenseKV.create(engine.config, 1, 128, jnp.float32)
        logits, _ = engine.prefill(cache, [seq], np.array([0]), engine.adapter_ids(["action"]))
        seq.append(int(jnp.argmax(logits[0])))
    assert toks == seq[len(prompt):]


def test_stop_id_ends_turn_and_is_included(engine):
    prompt = list(range(10, 31))
    free = greedy_generate(engine, prompt, "plan", 8)
    stop = free[3]
    stopped = greedy_generate(engine, prompt, "plan", 8, stop_ids=(stop,))
    assert stopped == free[: free.index(stop) + 1]


def test_mixed_agents_in_one_batch(engine):
    prompts = [list(range(5, 18)), list(range(40, 49))]
    agents = ["plan", "reflect"]
    ids = engine.adapter_ids(agents)
    cache = DenseKV.create(engine.config, 2, 128, jnp.float32)
    logits, cache = engine.prefill(cache, prompts, np.array([0, 0]), ids)
    p = SamplingParams.make(2, greedy=True)
    first = engine.sample(logits, p, jax.random.key(0))
    toks, counts, _ = engine.decode(cache, first, np.array([len(x) for x in prompts]), ids, p, jax.random.key(1),
                                    max_new_tokens=6)
    for b in range(2):
        assert np.asarray(toks[b]).tolist() == greedy_generate(engine, prompts[b], agents[b], 6)


def test_base_agent_has_no_adapter(engine):
    assert engine.adapter_ids(["base", None, "plan"]).tolist() == [-1, -1, 0]
    with pytest.raises(KeyError, match="unknown agent"):
        engine.adapter_ids(["critic"])


def test_compilations_bounded_over_multi_turn_run():
    """A 12-turn, 3-agent run with varied lengths compiles a fixed handful of programs."""
    cfg = preset("tiny")
    eng = Engine(Llama(cfg, dtype=jnp.float32, rngs=nnx.Rngs(5)), random_adapters(cfg, seed=6))
    s = Session(eng, "base_lr_shared", max_len=512, stop_ids=())
    rng = np.random.default_rng(0)
    s.append(rng.integers(0, 256, 40).tolist())
    agents = ["plan", "action", "reflect"]
    for turn in range(12):
        s.generate(agents[turn % 3], int(rng.integers(3, 12)), greedy=turn % 2 == 0, temperature=0.7,
                   top_k=int(rng.integers(0, 5)))
        s.append(rng.integers(0, 256, int(rng.integers(1, 30))).tolist())
    # forward: prefill buckets 16 and 64 (<= 2); decode: buffers of 8 and 16 (<= 2); one sampler.
    assert eng.trace_counts["forward"] <= 2
    assert eng.trace_counts["decode"] <= 2
    assert eng.trace_counts["sample"] == 1
    before = dict(eng.trace_counts)
    s.generate("plan", 5)  # the same shapes again: nothing new is compiled
    assert dict(eng.trace_counts) == before


def test_long_prompt_and_catch_up_reuse_the_short_prompt_program():
    """Chunks whose logits are not wanted (the first chunks of a prompt longer than the
    largest bucket; want_logits=False) run the same compiled forward as a short prompt,
    and the last chunk's logits are those of a one-pass prefill."""
    cfg = preset("tiny")
    eng = Engine(Llama(cfg, dtype=jnp.float32, rngs=nnx.Rngs(5)), random_adapters(cfg, seed=6),
                 prefill_buckets=(64,))
    ids = eng.adapter_ids(["plan"])
    prompt = list(np.random.default_rng(1).integers(0, 256, 150))
    short, _ = eng.prefill(DenseKV.create(cfg, 1, 256, jnp.float32), [prompt[:40]], np.zeros(1), ids)
    assert eng.trace_counts["forward"] == 1
    chunked, _ = eng.prefill(DenseKV.create(cfg, 1, 256, jnp.float32), [prompt], np.zeros(1), ids)
    none, _ = eng.prefill(DenseKV.create(cfg, 1, 256, jnp.float32), [prompt], np.zeros(1), ids,
                          want_logits=False)
    assert none is None
    assert eng.trace_counts["forward"] == 1  # 3 chunks of 64, logits wanted or not: one program
    whole = Engine(Llama(cfg, dtype=jnp.float32, rngs=nnx.Rngs(5)), random_adapters(cfg, seed=6),
                   prefill_buckets=(256,))
    ref, _ = whole.prefill(DenseKV.create(cfg, 1, 256, jnp.float32), [prompt], np.zeros(1), ids)
    np.testing.assert_allclose(np.asarray(chunked), np.asarray(ref), rtol=1e-4, atol=1e-4)
    assert np.abs(np.asarray(short) - np.asarray(ref)).max() > 1e-3  # the check can fail


def test_plan_chunks_pads_or_splits_by_weight_reads():
    """A remainder below the largest bucket is padded to one bucket or split over smaller
    ones, whichever costs fewer weight reads (+ a per-call overhead); every token is
    planned once, largest buckets first."""
    from lragent_jax.engine import plan_chunks

    b4 = (16, 64, 256, 1024)
    assert plan_chunks(264, b4, 200) == ((256, 256), (8, 16))  # not padded to 1024
    assert plan_chunks(8, b4, 200) == ((8, 16),)
    assert plan_chunks(900, b4, 200) == ((900, 1024),)
    assert plan_chunks(2056, b4, 200) == ((1024, 1024), (1024, 1024), (8, 16))
    assert plan_chunks(264, (64, 1024), 200) == ((264, 1024),)  # five 64-token calls cost more
    assert plan_chunks(264, b4, 10_000) == ((264, 1024),)  # weight-bound up to 10k tokens: pad
    assert plan_chunks(0, b4, 200) == ()
    for buckets in (b4, (64, 1024), (8, 16), (256,), (3, 5, 7)):
        for n in (1, 7, 63, 65, 264, 300, 777, 1025, 4100):
            plan = plan_chunks(n, buckets, 200)
            assert sum(t for t, _ in plan) == n
            assert all(0 < t <= b and b in buckets for t, b in plan)
            assert [b for _, b in plan] == sorted((b for _, b in plan), reverse=True)


def test_prefill_split_over_buckets_matches_one_padded_call():
    """264 tokens planned as 256 + 8 (default buckets) give the logits and cache of one
    call padded to 1024; rows of different lengths finish in different chunks."""
    cfg = preset("tiny")
    model = Llama(cfg, dtype=jnp.float32, rngs=nnx.Rngs(5))
    lora = random_adapters(cfg, seed=6, b_std=0.2)
    split = Engine(model, lora)
    padded = Engine(model, lora, prefill_buckets=(1024,))
    ids = split.adapter_ids(["plan", "action"])
    rng = np.random.default_rng(2)
    rows = [rng.integers(0, 256, 264).tolist(), rng.integers(0, 256, 100).tolist()]
    out = {}
    for name, eng in (("split", split), ("padded", padded)):
        before = eng.trace_counts["forward"]
        logits, cache = eng.prefill(DenseKV.create(cfg, 2, 512, jnp.float32), rows, np.zeros(2), ids)
        k = np.asarray(cache.k)
        valid = np.concatenate([k[:, 0, :264], k[:, 1, :100]], axis=1)  # slots past a row's tokens are scratch
        out[name] = (np.asarray(logits), valid, eng.trace_counts["forward"] - before)
    assert out["split"][2] == 2 and out["padded"][2] == 1  # programs compiled: buckets 256 and 16 vs 1024
    np.testing.assert_allclose(out["split"][0], out["padded"][0], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(out["split"][1], out["padded"][1], rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="weight_read_tokens"):
        Engine(model, lora, weight_read_tokens=0)


def _base_shared_turns(engine, prompt):  # a second agent catches up on the first's turn
    s = Session(engine, "base_shared", max_len=128, stop_ids=())
    s.append(prompt)
    return [s.generate(a, 5, greedy=True) for a in ("plan", "action", "plan")]


def test_per_layer_mode_holds_weights_once_and_matches_scan():
    """A per_layer Engine runs the model's own arrays (no copy); a scan Engine stacks its own
    copy; neither changes the model. Both give the same tokens, catch-up included."""
    cfg = preset("tiny")
    model = Llama(cfg, dtype=jnp.float32, rngs=nnx.Rngs(3))
    before = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model)))
    arrays = [leaf for leaf in jax.tree.leaves(nnx.state(model))]
    lora = random_adapters(cfg, seed=4, b_std=0.2, targets=("q", "k", "v", "o", "gate", "up", "down"))
    prompt = list(range(10, 31))
    scan_engine = Engine(model, lora, layer_mode="scan")
    scan = greedy_generate(scan_engine, prompt, "plan", 6)
    per_layer = Engine(model, lora, layer_mode="per_layer")
    state, stacked = per_layer.params
    assert stacked is None and scan_engine.params[1]["wq"].shape == (cfg.num_layers, cfg.hidden_size, cfg.q_dim)
    assert state["layers"][1]["wq"][...] is model.layers[1].wq[...]  # the model's array, not a copy
    assert greedy_generate(per_layer, prompt, "plan", 6) == scan
    assert _base_shared_turns(per_layer, prompt) == _base_shared_turns(scan_engine, prompt)  # q-only catch-up
    # the caller's model is untouched: same arrays, same values
    assert all(a is b for a, b in zip(jax.tree.leaves(nnx.state(model)), arrays))
    jax.tree.map(np.testing.assert_array_equal, nnx.to_pure_dict(nnx.state(model)), before)
    model.layers[0].wq.set_value(jnp.zeros_like(model.layers[0].wq[...]))  # later changes to the model:
    assert greedy_generate(per_layer, prompt, "plan", 6) == scan  # not seen by an Engine built before
    with pytest.raises(ValueError, match="prefill_buckets"):
        Engine(model, lora, prefill_buckets=(0,))
    for retired in ("fast", "unrolled"):
        with pytest.raises(ValueError, match="layer_mode"):
            Engine(model, lora, layer_mode=retired)


def test_every_cache_view_meets_the_protocol_and_others_are_refused(engine):
    from lragent_jax.cache import CacheView, ChunkKV
    from lragent_jax.engine import _capacity

    dense = DenseKV.create(engine.config, 1, 100, jnp.float32)
    lora_kv = LoRAKV.create(engine.config, 1, 100, 8, jnp.float32)
    for view in (dense, lora_kv, lora_kv.replace(write_base=False), ChunkKV(capacity=5)):
        assert isinstance(view, CacheView)
    assert _capacity(dense) == 128 and dense.hidden_layer is None and dense.needs_new_kv
    assert not lora_kv.replace(write_base=False).needs_new_kv
    with pytest.raises(TypeError, match="not a cache view"):
        _capacity({"k": dense.k})


def test_forward_logits_matches_engine_prefill_and_pads():
    """model.forward_logits (cache-free, for training) gives the engine's all-position prefill
    logits (float32 on both sides, same ops: 1e-5); a right-padded row's valid positions
    equal the unpadded row's."""
    from lragent_jax.forward import forward_logits

    cfg = preset("tiny")
    model = Llama(cfg, dtype=jnp.float32, rngs=nnx.Rngs(3))
    lora = random_adapters(cfg, seed=4, b_std=0.2, targets=("q", "k", "v", "o", "gate", "up", "down"))
    eng = Engine(model, lora)
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 256, (3, 20)).astype(np.int32)
    ids = eng.adapter_ids(["plan", "base", "reflect"])
    ref, _ = eng.prefill(DenseKV.create(cfg, 3, 64, jnp.float32), [list(t) for t in tokens], np.zeros(3), ids,
                         want_logits="all")
    out = jax.jit(lambda lo, t, i: forward_logits(model, t, lo, i))(lora, tokens, ids)
    assert out.shape == (3, 20, cfg.vocab_size) and out.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(out), np.stack(ref), rtol=1e-5, atol=1e-5)
    padded = forward_logits(model, tokens, lora, ids, lengths=jnp.array([20, 12, 20]))
    alone = forward_logits(model, tokens[1:2, :12], lora, ids[1:2])
    np.testing.assert_allclose(np.asarray(padded[1, :12]), np.asarray(alone[0]), rtol=1e-5, atol=1e-5)
    base = forward_logits(model, tokens[1:2], None)  # no adapters == row 1's adapter id -1
    np.testing.assert_allclose(np.asarray(base[0]), np.asarray(out[1]), rtol=1e-5, atol=1e-5)


def test_forward_logits_gradient_matches_finite_differences():
    """jax.grad of a loss over forward_logits w.r.t. the LoRA arrays, projected on two random
    directions, against central differences (float32: eps=3e-3 keeps truncation ~1e-5 and
    rounding ~1e-4 relative; rtol 1e-2)."""
    from lragent_jax.forward import forward_logits

    cfg = preset("tiny")
    model = Llama(cfg, dtype=jnp.float32, rngs=nnx.Rngs(3))
    lora = random_adapters(cfg, seed=4, b_std=0.2, targets=("q", "v", "down"))
    tokens = np.random.default_rng(0).integers(0, 256, (2, 12)).astype(np.int32)
    ids = jnp.array([0, 1])
    w = jnp.asarray(np.random.default_rng(1).normal(size=(2, 12, cfg.vocab_size)), jnp.float32)
    loss = jax.jit(lambda lo: jnp.sum(jax.nn.log_softmax(forward_logits(model, tokens, lo, ids)) * w))
    grad = jax.jit(jax.grad(loss))(lora)
    for name, p in grad.projections.items():
        assert float(jnp.abs(p.a).max()) > 0 and float(jnp.abs(p.b).max()) > 0, name
    eps = 3e-3
    for seed in (2, 3):
        rng = np.random.default_rng(seed)
        u = jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape) * float(jnp.std(x)), x.dtype), lora)
        along = sum(float(jnp.vdot(g, d)) for g, d in zip(jax.tree.leaves(grad), jax.tree.leaves(u)))
        plus = loss(jax.tree.map(lambda a, d: a + eps * d, lora, u))
        minus = loss(jax.tree.map(lambda a, d: a - eps * d, lora, u))
        np.testing.assert_allclose(float(plus - minus) / (2 * eps), along, rtol=1e-2)


def test_min_matmul_rows_padding_changes_nothing_but_speed():
    """Padding one-row weight products (the GPU default) gives the same decode as no padding;
    bad values are refused."""
    cfg = preset("tiny")
    lora = random_adapters(cfg, seed=4, b_std=0.2)
    out = {}
    for rows in (1, 2, 8):
        model = Llama(cfg, dtype=jnp.float32, rngs=nnx.Rngs(3), min_matmul_rows=rows)
        assert model.min_matmul_rows == rows
        out[rows] = greedy_generate(Engine(model, lora), list(range(10, 31)), "plan", 6)
    assert out[1] == out[2] == out[8]
    for bad in (0, 1.5, "2"):
        with pytest.raises(ValueError, match="min_matmul_rows"):
            Llama(cfg, dtype=jnp.float32, rngs=nnx.Rngs(3), min_matmul_rows=bad)


def test_matmul_padding_is_exact_on_one_row():
    from lragent_jax.model import _matmul

    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(1, 1, 24)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(24, 40)), jnp.float32)
    ref = np.asarray(x, np.float64)[0] @ np.asarray(w, np.float64)
    for rows in (1, 2, 16):
        y = _matmul(x, w, rows)
        assert y.shape == (1, 1, 40)
        np.testing.assert_allclose(np.asarray(y)[0], ref, rtol=1e-5, atol=1e-5)
    y3 = _matmul(jnp.ones((3, 2, 24)), w, 2)  # six rows >= 2: no padding
    assert y3.shape == (3, 2, 40)
