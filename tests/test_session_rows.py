"""Session.generate(rows=...): a turn taken by some rows of a batch.

Rows outside the turn must stay exactly as they were: trajectory, held counts and every cache
array of theirs bit for bit (all slots, not only the valid ones: their writes go to the dropped
slot). Rows in the turn must behave as if each ran alone: a batch whose rows take turns on
different schedules gives every row the tokens of a batch-1 session running that row's schedule,
and the same next-turn logits (score()). Tiny random model, float32, greedy; the batch-3 and
batch-1 programs differ in shape, so logits are compared with a tolerance (1e-4 absolute on
logits of order 1-10: float32 rounding of different XLA tilings is ~1e-6 relative), and the
greedy tokens, whose margins on this model are far above that, must be equal.
"""

import jax
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

MAX_LEN = 256
PROMPTS = [list(range(3, 40)), list(range(50, 61)), list(range(70, 95))]
# (kind, argument): appends are one id list per row ([] = nothing for that row); turns name
# the agent, the token count and the rows that take them.
SCHEDULE = [
    ("turn", ("plan", 4, [0, 1, 2])),
    ("append", [[11, 12, 13], [], [14]]),
    ("turn", ("action", 3, [0, 2])),
    ("turn", ("reflect", 5, [1])),
    ("append", [[], [21, 22], [23, 24, 25, 26]]),
    ("turn", ("plan", 3, [1, 2])),
    ("turn", ("action", 4, [0, 1, 2])),
    ("append", [[31], [32], []]),
    ("turn", ("reflect", 2, [0])),
    ("turn", ("plan", 3, [0, 1])),
]
PROBE = [5, 6, 7, 8]


@pytest.fixture(scope="module")
def engine():
    cfg = preset("tiny")
    # Shared A (base_lr_shared runs), large B: agents disagree, so a wrong state shows in tokens.
    return Engine(Llama(cfg, dtype=jnp.float32, rngs=nnx.Rngs(0)), random_adapters(cfg, seed=1, b_std=0.3))


def row_state(s, b):
    """Row b of every held count and every cache array (all slots), as host arrays."""
    out = {}
    for k, v in s.scheme.state().items():
        if s.scheme.is_count(k):
            out[k] = {a: int(x[b]) for a, x in v.items()} if isinstance(v, dict) else int(v[b])
            continue
        for i, arr in enumerate(jax.tree.leaves(v)):
            a = np.asarray(arr)
            axis = 0 if a.ndim == 3 else 1  # hidden [B, T, d]; K / V / LR [L, B, T, ...]
            out[f"{k}.{i}"] = np.take(a, b, axis=axis)
    return out


def run_batched(engine, scheme):
    s = Session(engine, scheme, batch=3, max_len=MAX_LEN, stop_ids=())
    s.append(PROMPTS)
    outs = []
    for kind, arg in SCHEDULE:
        if kind == "append":
            s.append(arg)
            continue
        agent, n, rows = arg
        idle = [b for b in range(3) if b not in rows]
        before = {b: (list(s.trajectory[b]), row_state(s, b)) for b in idle}
        out = s.generate(agent, n, greedy=True, rows=rows)
        for b in idle:  # nothing of an idle row moved
            assert out[b] == [] and s.trajectory[b] == before[b][0], (scheme, agent, b)
            now = row_state(s, b)
            assert now.keys() == before[b][1].keys()
            for k, want in before[b][1].items():
                np.testing.assert_array_equal(now[k], want, err_msg=f"{scheme} {agent} row {b} {k}")
        assert all(len(out[b]) == n for b in rows)  # stop_ids=(): every row in the turn runs to n
        assert s.turns[-1].rows == ([] if len(rows) == 3 else rows)
        assert sum(s.turns[-1].catch_up_by_row) == s.turns[-1].catch_up_tokens
        assert all(s.turns[-1].new_by_row[b] == 0 == s.turns[-1].catch_up_by_row[b] for b in idle)
        outs.append(out)
    return s, outs


def run_alone(engine, scheme, b):
    s = Session(engine, scheme, batch=1, max_len=MAX_LEN, stop_ids=())
    s.append(PROMPTS[b])
    outs = []
    for kind, arg in SCHEDULE:
        if kind == "append":
            if arg[b]:
                s.append(arg[b])
        elif b in arg[2]:
            outs.append(s.generate(arg[0], arg[1], greedy=True)[0])
        else:
            outs.append([])
    return s, outs


@pytest.mark.parametrize("scheme", SCHEMES)
def test_rows_take_turns_as_if_alone(engine, scheme):
    s, outs = run_batched(engine, scheme)
    refs = []
    for b in range(3):
        ref, ref_outs = run_alone(engine, scheme, b)
        refs.append(ref)
        assert [o[b] for o in outs] == ref_outs, (scheme, b)
        assert s.trajectory[b] == ref.trajectory[0]
        # catch-up work per row: what this row's own session did
        took = [t for t in s.turns if not t.rows or b in t.rows]
        assert [t.catch_up_by_row[b] for t in took] == [t.catch_up_tokens for t in ref.turns], (scheme, b)
        assert [t.new_by_row[b] for t in took] == [t.new_tokens for t in ref.turns], (scheme, b)
    # The caches hold the same state: every agent's logits over a probe agree (each score()
    # appends the probe to every row of both, so the histories stay the same).
    for agent in ("plan", "action", "reflect"):
        got = s.score(agent, [PROBE] * 3)
        for b in range(3):
            want = refs[b].score(agent, PROBE)[0]
            np.testing.assert_allclose(got[b], want, atol=1e-4, rtol=0, err_msg=f"{scheme} {agent} row {b}")


def test_rows_argument_is_checked(engine):
    s = Session(engine, "non_shared", batch=3, max_len=MAX_LEN, stop_ids=())
    s.append([PROMPTS[0], PROMPTS[1], []])  # row 2 stays empty: fine while it takes no turn
    assert s.generate("plan", 2, greedy=True, rows=[True, True, False])[2] == []
    assert s.generate("plan", 2, greedy=True, rows=np.array([1]))[0] == []
    for rows, match in (([True, False], "mask of 2 entries"), ([3], "not a row index"), ([0, 0], "repeated"),
                        ([], "selects no row"), ([False] * 3, "selects no row"), ("0", "bool mask"),
                        ([0.5], "not a row index"), ([0, 2], "trajectory is empty")):
        before = [list(t) for t in s.trajectory]
        with pytest.raises(ValueError, match=match):
            s.generate("plan", 2, rows=rows)
        assert s.trajectory == before
