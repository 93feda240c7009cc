"""Concurrent agents on one trajectory: Session.generate_concurrent / adopt / discard_branches.

Greedy, float32, tiny random model. For every scheme: each branch equals what that agent
generates alone from the same state; adopting a branch leaves the session exactly as if the
agent had taken a normal turn; dropped branches leave no trace; N = 1 equals generate().
"""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lragent_jax.config import preset
from lragent_jax.engine import Engine
from lragent_jax.lora import random_adapters
from lragent_jax.model import Llama
from lragent_jax.schemes import SCHEMES
from lragent_jax.session import Session

REQUESTS = {"plan": 5, "action": 7, "reflect": 4}


@pytest.fixture(scope="module")
def engine():
    cfg = preset("tiny")
    return Engine(Llama(cfg, dtype=jnp.float32, rngs=nnx.Rngs(11)), random_adapters(cfg, seed=12, b_std=0.3))


def fresh(engine, scheme, batch=1):
    s = Session(engine, scheme, max_len=256, stop_ids=(), batch=batch)
    s.append([list(range(3 + b, 40 + b)) for b in range(batch)])
    s.generate("plan", 6, greedy=True)
    s.append([9, 10, 11])
    return s


def alone(engine, scheme, agent, n, batch=1):
    s = fresh(engine, scheme, batch)
    return s, s.generate(agent, n, greedy=True)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_branches_equal_agents_alone_and_adopt_equals_generate(engine, scheme):
    s = fresh(engine, scheme)
    before = [list(t) for t in s.trajectory]
    branches = s.generate_concurrent(REQUESTS, greedy=True)
    assert s.trajectory == before  # forking does not touch the trajectory
    for agent, n in REQUESTS.items():
        assert branches[agent] == alone(engine, scheme, agent, n)[1], agent
    # the branches differ from each other (the adapters matter), so the test can fail
    assert len({tuple(b[0]) for b in branches.values()}) > 1
    s.adopt("action")
    ref, _ = alone(engine, scheme, "action", 7)
    assert s.trajectory == ref.trajectory
    assert s.generate("reflect", 5, greedy=True) == ref.generate("reflect", 5, greedy=True)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_dropped_branches_leave_no_trace(engine, scheme):
    s = fresh(engine, scheme)
    before = [list(t) for t in s.trajectory]
    s.generate_concurrent({"plan": 6, "action": 6}, greedy=True)
    s.discard_branches()
    assert s.trajectory == before
    untouched = fresh(engine, scheme)
    assert s.generate("reflect", 6, greedy=True) == untouched.generate("reflect", 6, greedy=True)
    assert s.generate("plan", 4, greedy=True) == untouched.generate("plan", 4, greedy=True)


@pytest.mark.parametrize("scheme", ["full_shared", "base_lr_shared", "non_shared"])
def test_single_branch_equals_generate(engine, scheme):
    s = fresh(engine, scheme)
    got = s.generate_concurrent({"reflect": 6}, greedy=True)["reflect"]
    assert got == alone(engine, scheme, "reflect", 6)[1]


def test_batch_of_trajectories_and_per_agent_options(engine):
    s = fresh(engine, "base_lr_shared", batch=2)
    branches = s.generate_concurrent({"plan": {"max_new_tokens": 3}, "action": {"max_new_tokens": 5}}, greedy=True)
    assert [len(r) for r in branches["plan"]] == [3, 3] and [len(r) for r in branches["action"]] == [5, 5]
    assert branches["action"] == alone(engine, "base_lr_shared", "action", 5, batch=2)[1]


def test_errors(engine):
    s = fresh(engine, "full_shared")
    with pytest.raises(KeyError, match="critic"):
        s.generate_concurrent({"critic": 3})
    with pytest.raises(ValueError, match="unknown options"):
        s.generate_concurrent({"plan": {"max_new_tokens": 3, "beam": 2}})
    with pytest.raises(ValueError, match="generate_concurrent"):
        s.adopt("plan")
    s.generate_concurrent({"plan": 3}, greedy=True)
    s.append([5])
    with pytest.raises(ValueError, match="generate_concurrent"):  # append() made the branches stale
        s.adopt("plan")


def test_request_types(engine):
    s = fresh(engine, "base_lr_shared")
    got = s.generate_concurrent({"plan": np.int64(3)}, greedy=True)
    assert len(got["plan"][0]) == 3
    with pytest.raises(ValueError, match="dict"):
        s.generate_concurrent(["plan", "action"])
    with pytest.raises(ValueError, match="expected max_new_tokens"):
        s.generate_concurrent({"plan": "3"})
