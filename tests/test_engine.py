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


def test_per_layer_mode_holds_weights_once_and_matches_scan():
    from lragent_jax.engine import ensure_stacked

    cfg = preset("tiny")
    model = Llama(cfg, dtype=jnp.float32, rngs=nnx.Rngs(3))
    lora = random_adapters(cfg, seed=4, b_std=0.2)
    scan = greedy_generate(Engine(model, lora, layer_mode="scan"), list(range(10, 31)), "plan", 6)
    per_layer = Engine(model, lora, layer_mode="per_layer")
    assert model.layers.wq[...].size == 0  # the stacked copy was released
    assert greedy_generate(per_layer, list(range(10, 31)), "plan", 6) == scan
    ensure_stacked(model)
    assert model.layers.wq[...].shape == (cfg.num_layers, cfg.hidden_size, cfg.q_dim)
    assert greedy_generate(Engine(model, lora, layer_mode="unrolled"), list(range(10, 31)), "plan", 6) == scan
    with pytest.raises(ValueError, match="prefill_buckets"):
        Engine(model, lora, prefill_buckets=(0,))
    with pytest.raises(ValueError, match="layer_mode"):
        Engine(model, lora, layer_mode="fast")


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


def test_triton_skinny_matmul_impl_generates_the_same_tokens():
    """Llama(matmul_impl="triton"): decode-step weight products through the Pallas skinny
    kernel (interpret mode on CPU) give the XLA path's greedy tokens."""
    cfg = preset("tiny")
    lora = random_adapters(cfg, seed=4, b_std=0.2)
    out = {}
    for impl in ("xla", "triton"):
        model = Llama(cfg, dtype=jnp.float32, rngs=nnx.Rngs(3), matmul_impl=impl)
        out[impl] = greedy_generate(Engine(model, lora, layer_mode="scan"), list(range(10, 31)), "plan", 4)
    assert out["xla"] == out["triton"]
    with pytest.raises(ValueError, match="matmul_impl"):
        Llama(cfg, dtype=jnp.float32, rngs=nnx.Rngs(3), matmul_impl="cublas")


def test_fused_projections_match_and_unfuse_exactly():
    """Engine(fuse_projections=True) holds q|k|v and gate|up as one matrix per layer: the
    same logits as unfused (LoRA on every projection), and ensure_stacked restores the
    original weights bit for bit; a stacked layer mode refuses the knob."""
    from lragent_jax.engine import ensure_stacked

    cfg = preset("tiny")
    model = Llama(cfg, dtype=jnp.float32, rngs=nnx.Rngs(3))
    wq0, wup0 = np.asarray(model.layers.wq[...]), np.asarray(model.layers.w_up[...])
    lora = random_adapters(cfg, seed=4, b_std=0.2, targets=("q", "k", "v", "o", "gate", "up", "down"))
    prompt = list(range(10, 31))
    ids = np.zeros(1, np.int32)

    def _base_shared_turns(engine):  # a second agent catches up on the first's turn
        s = Session(engine, "base_shared", max_len=128, stop_ids=())
        s.append(prompt)
        return [s.generate(a, 5, greedy=True) for a in ("plan", "action", "plan")]

    base_shared_ref = _base_shared_turns(Engine(model, lora, layer_mode="scan"))

    def logits(engine):
        out, _ = engine.prefill(LoRAKV.create(cfg, 1, 64, 8, jnp.float32), [prompt], np.zeros(1), ids)
        return np.asarray(out)

    plain = Engine(model, lora, layer_mode="per_layer")
    ref, ref_tokens = logits(plain), greedy_generate(plain, prompt, "plan", 6)
    assert not plain.fuse_projections
    with pytest.warns(UserWarning, match="Engines built earlier over it share them"):
        fused = Engine(model, lora, layer_mode="per_layer", fuse_projections=True)
    assert fused.fuse_projections and plain.fuse_projections  # one shared form
    lw = fused.layer_weights[0]
    assert set(lw) >= {"wqkv", "w_gate_up"} and not {"wq", "wk", "wv", "w_gate", "w_up"} & set(lw)
    assert lw["wqkv"].shape == (cfg.hidden_size, cfg.q_dim + 2 * cfg.num_kv_heads * cfg.head_dim)
    np.testing.assert_allclose(logits(fused), ref, rtol=1e-5, atol=1e-5)
    assert greedy_generate(fused, prompt, "plan", 6) == ref_tokens
    assert _base_shared_turns(fused) == base_shared_ref   # catch-up: q-only product
    ensure_stacked(model)
    np.testing.assert_array_equal(np.asarray(model.layers.wq[...]), wq0)
    np.testing.assert_array_equal(np.asarray(model.layers.w_up[...]), wup0)
    with pytest.raises(ValueError, match="fuse_projections needs layer_mode='per_layer'"):
        Engine(model, lora, layer_mode="scan", fuse_projections=True)
