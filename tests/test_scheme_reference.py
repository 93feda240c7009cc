"""The five schemes against an independent float64 numpy reference (tests/scheme_reference.py),
over multi-agent trajectories: prompt, plan generates, tool output, action generates, plan again
(catches up on action's tokens), reflect (catches up on everything), then action scores tokens
(teacher forcing) over caches the decode loop wrote.

Tolerance: the engine runs in float32, the reference in float64. Rounding in float32 matmuls
(~sqrt(d) * 6e-8 relative each), softmax and RoPE angles computed in float32 at positions up to
~60 (angle error ~ position * 6e-8) give observed differences below 1e-5 of the largest |logit|;
we allow REL_TOL = 1e-4 of it (10x headroom). A scheme computing the wrong thing (a wrong adapter,
a skipped catch-up, a shifted hidden state, a dropped window) moves the logits by > 1e-2 of it.

Token equality is well posed only if the reference's top-1 / top-2 logit gap at every greedy step
exceeds the tolerance by far; the tests assert that gap (> 2 tolerances: errors within tolerance cannot swap two logits) and that each turn's
tokens vary (>= MIN_DISTINCT distinct tokens), so the checks cannot silently lose their power.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

import scheme_reference as ref_lib
from lragent_jax.engine import Engine
from lragent_jax.loading import load_adapters, load_model
from lragent_jax.session import Session

REL_TOL = 1e-4
MARGIN_OVER_TOL = 2  # an error within tolerance on both logits cannot swap them
MIN_DISTINCT = 3
WEIGHT_SEED, ADAPTER_SEED = ref_lib.WEIGHT_SEED, ref_lib.ADAPTER_SEED  # clear top-1 at every greedy step
MAX_LEN = 128
CRITICAL = (1, 3)  # droidspeak: starts past layer 0 (hidden-state cache) and spans non-critical layer 2
PROMPT = np.random.default_rng(0).integers(3, 256, 20).tolist()
TURNS = (("plan", 8), ("action", 6), ("plan", 5), ("reflect", 6))
TOOL = ([7, 8, 9], [10, 11], [12, 13, 14], [15, 16])
SCORE_AGENT, SCORE_TOKENS = "action", [40, 41, 200, 3, 77]


@pytest.fixture(scope="module")
def case(tmp_path_factory, varied_model_folder):
    """Weights (numpy) on disk, loaded by the library; independent-A adapters for non_shared,
    full_shared, droidspeak, base_shared and shared-A ones for base_lr_shared (which needs them)."""
    root = tmp_path_factory.mktemp("scheme_ref")
    cfg = ref_lib.CONFIG
    weights = ref_lib.make_weights(cfg, seed=WEIGHT_SEED)
    model = load_model(varied_model_folder, dtype=jnp.float32)  # the same weights, on disk
    out = {"config": cfg, "weights": weights, "engines": {}, "adapters": {}}
    for shared_a in (False, True):
        adapters = ref_lib.make_adapters(cfg, seed=ADAPTER_SEED, shared_a=shared_a)
        paths = {n: ref_lib.write_adapter(str(root / f"shared{shared_a}" / n), f) for n, f in adapters.items()}
        lora = load_adapters(paths, model)
        assert lora.projections["v"].shared_a == shared_a
        # One prefill bucket: every chunk compiles to the same program.
        out["engines"][shared_a] = Engine(model, lora, prefill_buckets=(32,))
        out["adapters"][shared_a] = adapters
    return out


def pair(case, scheme, sliding_window=None):
    """(engine Session, reference) for one scheme, with the prompt appended."""
    shared_a = scheme == "base_lr_shared"
    session = Session(case["engines"][shared_a], scheme, max_len=MAX_LEN, stop_ids=(), critical_layers=CRITICAL,
                      attention="xla")
    reference = ref_lib.SchemeReference(case["config"], case["weights"], case["adapters"][shared_a], scheme,
                                        critical_layers=CRITICAL, sliding_window=sliding_window)
    session.append(PROMPT)
    reference.append(PROMPT)
    return session, reference


def check_logits(ours, ref, label):
    err = float(np.abs(np.asarray(ours) - ref).max())
    scale = float(np.abs(ref).max())
    assert err <= REL_TOL * scale, f"{label}: max |logit diff| {err:.3g} > {REL_TOL} * {scale:.3g}"


def top_gap(logits):
    s = np.sort(logits, axis=-1)
    return float((s[:, -1] - s[:, -2]).min())


@pytest.mark.parametrize("scheme", ref_lib.SCHEMES)
def test_generate_matches_reference(case, scheme):
    session, reference = pair(case, scheme)
    for i, (agent, n) in enumerate(TURNS):
        want, ref_logits = reference.turn(agent, n)
        got = session.generate(agent, n, greedy=True)[0]
        label = f"{scheme} turn {i} ({agent})"
        assert len(set(want)) >= MIN_DISTINCT, f"{label}: the test model repeats tokens {want}"
        gap = top_gap(ref_logits)
        assert gap > MARGIN_OVER_TOL * REL_TOL * np.abs(ref_logits).max(), f"{label}: near-tie ({gap:.3g})"
        assert got == want, f"{label}: engine {got} != reference {want}"
        session.append(TOOL[i])
        reference.append(TOOL[i])
    # Teacher forcing over caches the decode loop wrote (action catches up on plan and reflect).
    _, ref_logits = reference.turn(SCORE_AGENT, tokens=SCORE_TOKENS)
    check_logits(session.score(SCORE_AGENT, SCORE_TOKENS)[0], ref_logits, f"{scheme} final score")
    assert session.trajectory[0] == reference.tokens


@pytest.mark.parametrize("scheme", ref_lib.SCHEMES)
def test_score_matches_reference(case, scheme):
    """Every turn teacher-forced with tokens no model chose: the logits at each step are compared,
    so the check does not rest on greedy choices."""
    session, reference = pair(case, scheme)
    rng = np.random.default_rng(1)
    for i, (agent, n) in enumerate(TURNS):
        tokens = rng.integers(3, 256, n).tolist()
        _, ref_logits = reference.turn(agent, tokens=tokens)
        check_logits(session.score(agent, tokens)[0], ref_logits, f"{scheme} turn {i} ({agent})")
        session.append(TOOL[i])
        reference.append(TOOL[i])


def test_schemes_disagree_on_this_trajectory(case):
    """Guards the tests above: on this trajectory every scheme computes something different from
    every other (by far more than the tolerance), so passing one scheme's check with another
    scheme's semantics is impossible."""
    rng = np.random.default_rng(1)
    turns = [(a, rng.integers(3, 256, n).tolist()) for a, n in TURNS]
    logits = {}
    for scheme in ref_lib.SCHEMES:
        shared_a = scheme == "base_lr_shared"
        for adapters_shared in {shared_a, True}:  # base_lr_shared is only defined with shared A
            r = ref_lib.SchemeReference(case["config"], case["weights"], case["adapters"][adapters_shared], scheme,
                                        critical_layers=CRITICAL)
            r.append(PROMPT)
            out = []
            for i, (agent, tokens) in enumerate(turns):
                out.append(r.turn(agent, tokens=tokens)[1])
                r.append(TOOL[i])
            logits[scheme, adapters_shared] = np.concatenate(out)
    keys = list(logits)
    for i, a in enumerate(keys):
        for b in keys[i + 1:]:
            if a[1] != b[1]:
                continue
            diff = np.abs(logits[a] - logits[b]).max() / np.abs(logits[a]).max()
            assert diff > 100 * REL_TOL, f"{a} and {b} agree within {diff:.3g}"


SWA_WINDOW = 8
SWA_SCHEMES = ("full_shared", "droidspeak", "base_shared", "base_lr_shared")


@pytest.fixture(scope="module")
def swa_case(tmp_path_factory):
    """The same weights as a Mistral checkpoint with an 8-token window (the trajectory reaches ~50)."""
    root = tmp_path_factory.mktemp("scheme_ref_swa")
    cfg = {**ref_lib.CONFIG, "model_type": "mistral", "sliding_window": SWA_WINDOW}
    weights = ref_lib.make_weights(cfg, seed=WEIGHT_SEED)
    model = load_model(ref_lib.write_model(str(root / "model"), cfg, weights), dtype=jnp.float32)
    assert model.config.sliding_window == SWA_WINDOW
    out = {"config": cfg, "weights": weights, "engines": {}, "adapters": {}}
    for shared_a in (False, True):
        adapters = ref_lib.make_adapters(cfg, seed=ADAPTER_SEED, shared_a=shared_a)
        paths = {n: ref_lib.write_adapter(str(root / f"shared{shared_a}" / n), f) for n, f in adapters.items()}
        out["engines"][shared_a] = Engine(model, load_adapters(paths, model), prefill_buckets=(32,))
        out["adapters"][shared_a] = adapters
    return out


@pytest.mark.parametrize("scheme", SWA_SCHEMES)
def test_sliding_window_schemes_match_reference(swa_case, scheme):
    """Teacher-forced logits with a window shorter than the trajectory, for the schemes whose caches
    other agents read (non_shared's window is checked against transformers in test_sliding_window)."""
    session, reference = pair(swa_case, scheme, sliding_window=SWA_WINDOW)
    _, no_window = pair(swa_case, scheme)  # guard: the window changes what this trajectory computes
    rng = np.random.default_rng(2)
    moved = 0.0
    for i, (agent, n) in enumerate(TURNS):
        tokens = rng.integers(3, 256, n).tolist()
        _, ref_logits = reference.turn(agent, tokens=tokens)
        check_logits(session.score(agent, tokens)[0], ref_logits, f"{scheme} window turn {i} ({agent})")
        moved = max(moved, float(np.abs(no_window.turn(agent, tokens=tokens)[1] - ref_logits).max()))
        for r in (session, reference, no_window):
            r.append(TOOL[i])
    assert moved > 100 * REL_TOL * np.abs(ref_logits).max()
