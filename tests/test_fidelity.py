"""lragent_jax.fidelity and scripts/fidelity.py on the tiny random model (float32, CPU).

Invariants: identical adapters -> every similarity 1, KL 0, agreement 1; zero B -> no
adapter output (undefined cosine, handled) and full == base; non_shared vs itself -> KL 0.
"""

import json
import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lragent_jax import fidelity
from lragent_jax.config import LoraConfig, preset
from lragent_jax.engine import Engine
from lragent_jax.lora import random_adapters, stack_adapters
from lragent_jax.model import Llama
from lragent_jax.session import Session

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
AGENTS = ("plan", "action", "reflect")
# Shapes are shared by every test and by the script test's arguments, so programs compile
# once (and the script's subprocess finds them in conftest.py's persistent compile cache).
# Every forward, catch-up included, fits the smallest prefill bucket (16 tokens).
TRAJ = list(range(3, 11))  # 8 tokens
PROMPT = TRAJ
TURNS = [("plan", 3), ("action", 3), ("reflect", 3)]
APPEND = [7]  # after every turn, like a tool output
MAX_LEN = 128


@pytest.fixture(scope="module")
def cfg():
    return preset("tiny")


@pytest.fixture(scope="module")
def model(cfg):
    """A tiny random Llama filled from numpy (JAX's eager RNG would compile per parameter shape)."""
    graphdef, state = nnx.split(nnx.eval_shape(lambda: Llama(cfg, dtype=jnp.float32, rngs=nnx.Rngs(0))))
    rng = np.random.default_rng(0)
    pure = jax.tree_util.tree_map_with_path(
        lambda path, x: np.ones(x.shape, np.float32) if "norm" in jax.tree_util.keystr(path)
        else rng.normal(0, 0.02, x.shape).astype(np.float32), nnx.to_pure_dict(state))
    nnx.replace_by_pure_dict(state, pure)
    return nnx.merge(graphdef, state)


@pytest.fixture(scope="module")
def identical_engine(cfg, model):
    """Three agents with the very same adapter (same A and B): sharing must be exact."""
    rng = np.random.default_rng(3)
    factors = {}
    for p in ("q", "v"):
        d_in, d_out = cfg.projection_dims(p)
        factors[p] = (rng.normal(0, d_in ** -0.5, (cfg.num_layers, d_in, 8)),
                      rng.normal(0, 0.3, (cfg.num_layers, 8, d_out)))
    lcfg = LoraConfig(rank=8, alpha=16.0, target_modules=("q", "v"))
    return Engine(model, stack_adapters(cfg, {n: (lcfg, factors) for n in AGENTS}))


# ---- the cosine definition ---------------------------------------------------------------------
def test_token_cosines_match_numpy_loops():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(3, 5, 6))
    x[1, 2] = 0.0  # a zero vector: no cosine for pairs (0,1) and (1,2) at token 2
    got = fidelity.token_cosines(x)
    assert set(got) == {(0, 1), (0, 2), (1, 2)}
    for (i, j), c in got.items():
        for t in range(5):
            a, b = x[i, t], x[j, t]
            if not (np.linalg.norm(a) and np.linalg.norm(b)):
                assert math.isnan(c[t])
            else:
                assert c[t] == pytest.approx(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)), rel=1e-12)


def test_similarity_per_layer_is_mean_over_pairs_of_mean_over_tokens():
    rng = np.random.default_rng(1)
    L, N, T, H, D, r = 2, 3, 4, 2, 3, 5
    values = {"full": rng.normal(size=(L, N, T, H, D)), "base": rng.normal(size=(L, N, T, H, D)),
              "adapter": rng.normal(size=(L, N, T, H, D)), "lr": rng.normal(size=(L, N, T, r))}
    res = fidelity.similarity_from_values(values, AGENTS, shared_a=True)
    for kind, arr in values.items():
        for layer in range(L):
            flat = arr[layer].reshape(N, T, -1)  # one vector per agent and token, heads x dim flattened
            pair_means = []
            for i in range(N):
                for j in range(i + 1, N):
                    cos = [flat[i, t] @ flat[j, t] / np.linalg.norm(flat[i, t]) / np.linalg.norm(flat[j, t])
                           for t in range(T)]
                    pair_means.append(np.mean(cos))
                    assert res.pairs[kind][f"{AGENTS[i]}|{AGENTS[j]}"][layer] == pytest.approx(np.mean(cos))
            assert res.per_layer[kind][layer] == pytest.approx(np.mean(pair_means), rel=1e-12)
        assert res.average[kind] == pytest.approx(np.mean(res.per_layer[kind]))
    ratio = np.linalg.norm(values["adapter"].reshape(L, N, T, -1), axis=-1) / np.linalg.norm(
        values["base"].reshape(L, N, T, -1), axis=-1)
    np.testing.assert_allclose(res.adapter_norm_ratio, ratio.mean(axis=(1, 2)))


def test_kl_and_token_comparison_helpers():
    rng = np.random.default_rng(2)
    p, q = rng.normal(size=(4, 7)), rng.normal(size=(4, 7))
    assert np.all(fidelity.kl_divergence(p, p) == 0)
    pp = np.exp(p) / np.exp(p).sum(-1, keepdims=True)
    qq = np.exp(q) / np.exp(q).sum(-1, keepdims=True)
    np.testing.assert_allclose(fidelity.kl_divergence(p, q), (pp * np.log(pp / qq)).sum(-1), rtol=1e-10)
    assert fidelity.compare_tokens([1, 2, 3], [1, 2, 3]) == (1.0, None)
    assert fidelity.compare_tokens([1, 9, 3], [1, 2, 3]) == (2 / 3, 1)
    assert fidelity.compare_tokens([1, 2], [1, 2, 3]) == (2 / 3, 2)  # shorter: diverges where it stops


# ---- on the model --------------------------------------------------------------------------------
def test_distinct_adapters_similarity_and_exact_forward(cfg, model):
    engine = Engine(model, random_adapters(cfg, AGENTS, seed=1, b_std=0.3))
    res = fidelity.value_similarity(engine, TRAJ)
    assert res.shared_a and res.has_value_lora and res.num_tokens == len(TRAJ)
    # Layer 0 sees the same embeddings for every agent: its base and (shared-A) LR caches agree.
    assert res.per_layer["base"][0] == pytest.approx(1.0, abs=1e-6)
    assert res.per_layer["lr"][0] == pytest.approx(1.0, abs=1e-6)
    assert res.per_layer["full"][0] < 0.99 and res.per_layer["adapter"][0] < 0.99
    for kind in fidelity.KINDS:
        assert res.per_layer[kind].shape == (cfg.num_layers,)
        assert np.all(np.abs(res.per_layer[kind]) <= 1 + 1e-9)
    # The recording cache's forward is the non_shared forward.
    _, logits = fidelity.record_values(engine, TRAJ)
    for i, agent in enumerate(AGENTS):
        s = Session(engine, "non_shared", max_len=MAX_LEN)
        s.append(TRAJ)
        ref = s.score(agent, [0])[0][0]  # the logits after the whole trajectory (they predict token 0)
        np.testing.assert_allclose(np.asarray(logits[i]), ref, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="at least two"):
        fidelity.value_similarity(engine, TRAJ, agents=["plan"])
    with pytest.raises(KeyError, match="critic"):
        fidelity.value_similarity(engine, TRAJ, agents=["plan", "critic"])


def test_identical_adapters_everything_agrees(identical_engine):
    res = fidelity.value_similarity(identical_engine, TRAJ)
    for kind in fidelity.KINDS:
        np.testing.assert_allclose(res.per_layer[kind], 1.0, atol=1e-6)
        assert not res.undefined[kind].any()
    rep = fidelity.scheme_fidelity(identical_engine, PROMPT, TURNS, ["non_shared", "full_shared", "base_lr_shared"],
                                   appends=APPEND, max_len=MAX_LEN)
    assert [len(t) for t in rep.reference] == [n for _, n in TURNS]
    by = {s.scheme: s for s in rep.schemes}
    assert set(by) == {"non_shared", "full_shared", "base_lr_shared"}
    for s in rep.schemes:
        assert s.token_agreement == 1.0 and s.first_divergence is None
        assert s.tf_top1_agreement == 1.0 and s.positions == sum(n for _, n in TURNS)
        assert s.mean_kl < 1e-9 and s.max_kl < 1e-9
    # non_shared against itself: the very same computation, KL exactly 0.
    assert by["non_shared"].max_kl == 0.0
    json.dumps(rep.to_dict(), allow_nan=False)


def test_zero_b_no_adapter_output(cfg, model):
    engine = Engine(model, random_adapters(cfg, AGENTS, seed=1, b_std=0.0))
    res = fidelity.value_similarity(engine, TRAJ)
    n_pairs = 3
    assert np.all(np.isnan(res.per_layer["adapter"]))  # s (X A) 0 = 0: cosine undefined, not an error
    assert np.all(res.undefined["adapter"] == n_pairs * len(TRAJ))
    assert math.isnan(res.average["adapter"])
    np.testing.assert_array_equal(res.per_layer["full"], res.per_layer["base"])  # V = X W_v exactly
    np.testing.assert_array_equal(res.adapter_norm_ratio, 0.0)
    d = res.to_dict()
    assert d["average"]["adapter"] is None and d["per_layer"]["adapter"] == [None] * cfg.num_layers
    json.dumps(d, allow_nan=False)


@pytest.mark.slow
def test_all_schemes_distinct_adapters(cfg, model):
    engine = Engine(model, random_adapters(cfg, AGENTS, seed=1, b_std=0.3))
    rep = fidelity.scheme_fidelity(engine, PROMPT, TURNS, appends=APPEND, max_len=MAX_LEN)
    assert [s.scheme for s in rep.schemes] == ["full_shared", "droidspeak", "base_shared", "base_lr_shared"]
    for s in rep.schemes:
        assert s.turns[0]["mean_kl"] < 1e-9  # the first turn shares nothing yet
        assert s.mean_kl > 0


# ---- the script ----------------------------------------------------------------------------------
def _script(*args):
    # Unoptimised XLA code compiles about twice as fast; these tests check the output, not speed.
    # The subprocess shares the persistent compilation cache conftest.py sets up.
    env = dict(os.environ)
    if jax.config.jax_compilation_cache_dir:
        env.update(JAX_COMPILATION_CACHE_DIR=jax.config.jax_compilation_cache_dir,
                   JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
    return subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "fidelity.py"), *args],
                          capture_output=True, text=True, timeout=600, cwd=ROOT, env=env)


def test_script_json_on_embedded_model():
    p = _script("--json", "--random-tokens", str(len(TRAJ)), "--max-len", str(MAX_LEN),
                "--turn", "plan:3", "--turn", "action:3", "--append-ids", "7", "--schemes", "full_shared")
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout)  # stdout is exactly one JSON object
    assert out["random_weights"] is True and out["model"] == "embedded-tiny-random"
    sim = out["similarity"]
    for key in ("agents", "num_tokens", "num_layers", "shared_a", "per_layer", "average", "pairs", "undefined",
                "adapter_norm_ratio", "definition"):
        assert key in sim
    assert sim["num_tokens"] == len(TRAJ) and sim["shared_a"] is True
    assert set(sim["per_layer"]) == {"full", "base", "adapter", "lr"}
    assert all(len(v) == sim["num_layers"] for v in sim["per_layer"].values())
    sf = out["scheme_fidelity"]
    assert sf["turns"] == [["plan", 3], ["action", 3]]
    (fs,) = sf["schemes"]
    for key in ("scheme", "token_agreement", "first_divergence", "mean_kl", "max_kl", "tf_top1_agreement",
                "positions", "turns"):
        assert key in fs
    assert fs["scheme"] == "full_shared" and fs["positions"] == 6


@pytest.mark.parametrize("args,needle", [
    (["--schemes", "half_shared"], "unknown scheme"),
    (["--max-len", "1"], "--max-len"),
])
def test_script_bad_input_one_line_exit_2(args, needle):
    p = _script(*args)
    assert p.returncode == 2
    assert needle in p.stderr and "Traceback" not in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1 and p.stdout == ""
