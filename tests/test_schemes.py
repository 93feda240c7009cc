"""Invariants of the five cache schemes (docs/design.md section 2), on a tiny model whose greedy
outputs vary from token to token (tests/scheme_reference.py's weights; asserted in ns_reference),
so token equality carries information. What each scheme computes is checked against an
independent float64 reference in tests/test_scheme_reference.py.

Greedy decoding in float32: 'equal' means token-identical trajectories.
"""

import jax.numpy as jnp
import numpy as np
import pytest

import scheme_reference as ref_lib
from lragent_jax.engine import Engine
from lragent_jax.loading import load_model
from lragent_jax.lora import SharedAError, random_adapters
from lragent_jax.schemes import SCHEMES
from lragent_jax.session import Session

MAX_LEN = 256
PROMPT = list(range(3, 40))
TURNS = [("plan", 7), ("action", 5), ("reflect", 6), ("plan", 4)]


@pytest.fixture(scope="module")
def model(varied_model_folder):
    return load_model(varied_model_folder, dtype=jnp.float32)


@pytest.fixture(scope="module")
def cfg(model):
    return model.config


@pytest.fixture(scope="module")
def engine(cfg, model):
    # Large B so agents disagree and scheme differences are visible.
    return Engine(model, random_adapters(cfg, seed=1, b_std=0.3))


def run(engine, scheme, turns=TURNS, **kw):
    s = Session(engine, scheme, max_len=MAX_LEN, stop_ids=(), **kw)
    s.append(PROMPT)
    for agent, n in turns:
        s.generate(agent, n, greedy=True)
        s.append([11, 12, 13])
    return s


@pytest.fixture(scope="module")
def ns_reference(engine):
    s = run(engine, "non_shared")
    # Every turn's greedy tokens vary (a model that repeats one token would make the token
    # comparisons below nearly vacuous).
    pos = len(PROMPT)
    for agent, n in TURNS:
        turn = s.trajectory[0][pos: pos + n]
        assert len(set(turn)) >= 3, f"{agent}'s turn repeats tokens: {turn}"
        pos += n + 3
    return s.trajectory


def test_multi_agent_schemes_differ_from_non_shared(engine, ns_reference):
    # Guards the other tests: with these adapters, sharing without catch-up changes tokens.
    assert run(engine, "full_shared").trajectory != ns_reference


@pytest.mark.parametrize("scheme", SCHEMES)
def test_single_agent_equals_non_shared(engine, scheme):
    turns = [("plan", 6), ("plan", 5), ("plan", 4)]
    assert run(engine, scheme, turns).trajectory == run(engine, "non_shared", turns).trajectory


@pytest.fixture(scope="module")
def zero_b_engine(cfg, model):
    return Engine(model, random_adapters(cfg, seed=1, b_std=0.0))


@pytest.mark.parametrize("scheme", SCHEMES)
def test_zero_b_equals_non_shared(zero_b_engine, scheme):
    assert run(zero_b_engine, scheme).trajectory == run(zero_b_engine, "non_shared").trajectory


def test_droidspeak_all_layers_critical_equals_non_shared(engine, cfg, ns_reference):
    s = run(engine, "droidspeak", critical_layers=range(cfg.num_layers))
    assert s.trajectory == ns_reference


def test_droidspeak_partial_layers_catches_up(engine, ns_reference):
    # Same catch-up token count as non_shared, but only layers 1..2 re-run; tokens differ.
    s = run(engine, "droidspeak", critical_layers=(1, 2))
    assert [t.catch_up_tokens for t in s.turns] == [t.catch_up_tokens for t in run(engine, "non_shared").turns]
    assert s.trajectory[0][: len(PROMPT) + 7] == ns_reference[0][: len(PROMPT) + 7]  # first turn: nothing shared yet
    assert s.trajectory != ns_reference  # later turns read other agents' K, V outside layers 1..2


def test_catch_up_counts_by_hand(engine):
    # prompt 37. plan: 37 new, generates 7 (the last is not fed back): caches hold 43; +3 appended.
    # action: recomputes the 43 plan's cache holds, 1 + 3 new; generates 5: held 51; +3.
    # reflect: recomputes 51, 4 new; generates 6: held 60; +3.
    # plan: its own cache holds 43, so it recomputes 60 - 43 = 17, 4 new.
    hand = [(0, 37), (43, 4), (51, 4), (17, 4)]
    for scheme in ("non_shared", "base_shared", "droidspeak"):
        assert [(t.catch_up_tokens, t.new_tokens) for t in run(engine, scheme).turns] == hand
    for scheme in ("full_shared", "base_lr_shared"):
        assert [(t.catch_up_tokens, t.new_tokens) for t in run(engine, scheme).turns] == [
            (0, 37), (0, 4), (0, 4), (0, 4)]


def test_cache_bytes_follow_formulas(engine, cfg):
    L, Hkv, D, r, N = cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, 8, 3
    T = MAX_LEN  # already a multiple of the cache alignment
    item = 4  # float32
    kv = 2 * L * T * Hkv * D * item  # one K + one V
    bytes_ = {s: Session(engine, s, max_len=MAX_LEN).cache_bytes for s in SCHEMES}
    assert bytes_["non_shared"] == N * kv
    assert bytes_["full_shared"] == kv
    assert bytes_["base_lr_shared"] == kv + L * T * r * item
    assert bytes_["base_shared"] == kv + N * L * T * r * item
    # relative to non_shared: BS = 1/N + r / (2 Hkv D); BLR = 1/N + r / (2 N Hkv D)
    assert bytes_["base_shared"] / bytes_["non_shared"] == pytest.approx(1 / N + r / (2 * Hkv * D))
    assert bytes_["base_lr_shared"] / bytes_["non_shared"] == pytest.approx(1 / N + r / (2 * N * Hkv * D))
    crit = (0, 2)
    ds = Session(engine, "droidspeak", max_len=MAX_LEN, critical_layers=crit).cache_bytes
    hidden = T * cfg.hidden_size * item
    assert ds == kv + N * kv * len(crit) // L + hidden


def test_base_lr_shared_refuses_unshared_a(cfg, model):
    engine = Engine(model, random_adapters(cfg, shared_a=False, seed=2))
    with pytest.raises(SharedAError) as e:
        Session(engine, "base_lr_shared", max_len=MAX_LEN)
    msg = str(e.value)
    assert "'plan'" in msg and "layer" in msg and "max |A" in msg
    Session(engine, "base_shared", max_len=MAX_LEN)  # independent A is fine for base_shared


@pytest.mark.parametrize("scheme", ["base_shared", "base_lr_shared"])
def test_naive_expansion_matches_reordered(engine, scheme):
    a = run(engine, scheme)
    b = run(engine, scheme, naive_expansion=True)
    assert a.trajectory == b.trajectory


def test_batch_of_trajectories_matches_single_rows(engine):
    rows = [list(range(5, 25)), list(range(40, 47))]
    s = Session(engine, "base_lr_shared", batch=2, max_len=MAX_LEN, stop_ids=())
    s.append(rows)
    s.generate("plan", 5, greedy=True)
    s.generate("action", 4, greedy=True)
    for b, row in enumerate(rows):
        one = Session(engine, "base_lr_shared", max_len=MAX_LEN, stop_ids=())
        one.append(row)
        one.generate("plan", 5, greedy=True)
        one.generate("action", 4, greedy=True)
        assert one.trajectory[0] == s.trajectory[b]


def test_session_errors(engine):
    s = Session(engine, "non_shared", max_len=MAX_LEN)
    with pytest.raises(ValueError, match="empty"):
        s.generate("plan", 3)
    s.append([1, 2, 3])
    with pytest.raises(KeyError, match="unknown agent 'critic'"):
        s.generate("critic", 3)
    with pytest.raises(ValueError, match="exceeds max_len"):
        s.generate("plan", MAX_LEN)
    with pytest.raises(ValueError, match="out of range"):
        s.append([10**6])
    with pytest.raises(ValueError, match="unknown scheme"):
        Session(engine, "half_shared")
    with pytest.raises(ValueError, match="needs a tokenizer"):
        s.append("text")


def test_droidspeak_layer_sets():
    from lragent_jax.schemes import DROIDSPEAK_LAYERS, check_critical_layers, default_critical_layers

    assert default_critical_layers(32) == DROIDSPEAK_LAYERS["llama-3.1-8b"]
    assert default_critical_layers(36) == DROIDSPEAK_LAYERS["ministral-8b"]
    assert default_critical_layers(4) == (0,)  # a third of 4 layers, at least one
    assert default_critical_layers(12) == (0, 4, 7, 11)
    for bad in ([], [1.5], [4], [-1]):
        with pytest.raises(ValueError, match="critical layers"):
            check_critical_layers(bad, 4)


def test_droidspeak_cache_dtype_differs_from_model(varied_model_folder, tmp_path):
    """bfloat16 model, float16 caches: the catch-up starts from the hidden state cached in float16.
    Compared with the float64 reference (tests/scheme_reference.py): bf16 weights and activations
    (8-bit mantissa) through 4 layers with gains up to 3 put the logits within ~0.1 of the largest
    |logit| (observed 0.105); we allow 0.3. non_shared or full_shared semantics, or a garbled hidden
    state, are > 0.9 away on this trajectory."""
    from lragent_jax.loading import load_adapters

    from test_scheme_reference import CRITICAL, PROMPT as REF_PROMPT, TOOL, TURNS as REF_TURNS

    adapters = ref_lib.make_adapters(ref_lib.CONFIG, seed=ref_lib.ADAPTER_SEED, shared_a=False)
    paths = {n: ref_lib.write_adapter(str(tmp_path / n), f) for n, f in adapters.items()}
    model = load_model(varied_model_folder, dtype=jnp.bfloat16)
    eng = Engine(model, load_adapters(paths, model), prefill_buckets=(32,))
    s = Session(eng, "droidspeak", max_len=MAX_LEN, critical_layers=CRITICAL, cache_dtype=jnp.float16, stop_ids=())
    weights = ref_lib.make_weights(ref_lib.CONFIG, seed=ref_lib.WEIGHT_SEED)  # varied_model_folder's
    ref = ref_lib.SchemeReference(ref_lib.CONFIG, weights, adapters, "droidspeak", critical_layers=CRITICAL)
    s.append(REF_PROMPT)
    ref.append(REF_PROMPT)
    rng = np.random.default_rng(1)
    for i, (agent, n) in enumerate(REF_TURNS):
        tokens = rng.integers(3, 256, n).tolist()
        want = ref.turn(agent, tokens=tokens)[1]
        err = np.abs(s.score(agent, tokens)[0] - want).max()
        assert err < 0.3 * np.abs(want).max(), f"turn {i} ({agent}): max |diff| {err:.3g}"
        s.append(TOOL[i])
        ref.append(TOOL[i])
