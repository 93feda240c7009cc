"""Sampler: top-k / top-p masks, greedy, temperature, seeded reproducibility."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lragent_jax.sampling import SamplingParams, filter_logits, sample


def test_top_k_keeps_exactly_k_largest():
    logits = jnp.array([[0.1, 3.0, -1.0, 2.0, 0.5], [5.0, 4.0, 3.0, 2.0, 1.0]])
    out = np.asarray(filter_logits(logits, jnp.array([2, 1]), jnp.array([1.0, 1.0])))
    assert np.isfinite(out).tolist() == [[False, True, False, True, False], [True, False, False, False, False]]
    assert out[0, 1] == pytest.approx(3.0)


def test_top_k_zero_is_off():
    logits = jnp.array([[0.1, 3.0, -1.0]])
    out = filter_logits(logits, jnp.array([0]), jnp.array([1.0]))
    assert np.array_equal(np.asarray(out), np.asarray(logits))


def test_top_p_keeps_smallest_prefix_reaching_p():
    probs = np.array([0.5, 0.3, 0.15, 0.05])
    logits = jnp.log(jnp.asarray(probs))[None]
    for p, kept in [(0.4, 1), (0.5, 1), (0.6, 2), (0.8, 2), (0.81, 3), (0.96, 4), (1.0, 4)]:
        out = np.asarray(filter_logits(logits, jnp.array([0]), jnp.array([p])))
        assert np.isfinite(out).sum() == kept, (p, out)


def test_top_p_applies_after_top_k():
    logits = jnp.log(jnp.array([[0.4, 0.3, 0.2, 0.1]]))
    # top_k=2 leaves {0.4, 0.3} renormalised to {0.571, 0.429}; top_p 0.5 then keeps one.
    out = np.asarray(filter_logits(logits, jnp.array([2]), jnp.array([0.5])))
    assert np.isfinite(out).tolist() == [[True, False, False, False]]


def test_greedy_is_argmax_and_ignores_key():
    logits = jax.random.normal(jax.random.key(0), (4, 50))
    p = SamplingParams.make(4, greedy=True, temperature=5.0)
    for seed in range(3):
        assert np.array_equal(sample(logits, p, jax.random.key(seed)), jnp.argmax(logits, -1))


def test_sampling_reproducible_and_seed_dependent():
    logits = jnp.zeros((8, 1000))
    p = SamplingParams.make(8, temperature=1.0)
    a = sample(logits, p, jax.random.key(1))
    b = sample(logits, p, jax.random.key(1))
    c = sample(logits, p, jax.random.key(2))
    assert np.array_equal(a, b) and not np.array_equal(a, c)


def test_samples_stay_inside_top_k():
    logits = jax.random.normal(jax.random.key(3), (1, 100))
    top3 = set(np.argsort(-np.asarray(logits[0]))[:3].tolist())
    p = SamplingParams.make(1, temperature=2.0, top_k=3)
    draws = {int(sample(logits, p, jax.random.key(s))[0]) for s in range(60)}
    assert draws <= top3 and len(draws) > 1


def test_temperature_sharpens():
    logits = jnp.log(jnp.array([[0.6, 0.4]]))
    cold = SamplingParams.make(1, temperature=0.05)
    draws = [int(sample(logits, cold, jax.random.key(s))[0]) for s in range(40)]
    assert draws.count(0) == 40


@pytest.mark.parametrize("kw", [dict(temperature=-1.0), dict(top_k=-2), dict(top_p=0.0), dict(top_p=1.5),
                                dict(top_k=1.5), dict(temperature=float("inf")), dict(temperature=float("nan")),
                                dict(top_p=float("nan")), dict(top_k=True), dict(top_k=2**31)])
def test_bad_parameters_raise(kw):
    with pytest.raises(ValueError):
        SamplingParams.make(1, **kw)
