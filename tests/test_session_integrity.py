"""Session integrity: a failed call leaves the Session as before, under every scheme.

After each failure, the session must continue exactly as a fresh Session with the same history:
same trajectory, counts and valid cache slots (bitwise: same programs on the same inputs), and
the next turns token for token. Greedy, float32, the tiny random model (shapes as in
test_schemes, so the persistent compilation cache is shared).
"""

import signal

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
from lragent_jax.session import Session, SessionBrokenError

MAX_LEN = 256
PROMPT = list(range(3, 40))


@pytest.fixture(scope="module")
def engine():
    cfg = preset("tiny")
    # Shared A (base_lr_shared runs), large B: agents disagree, so a wrong state shows in tokens.
    return Engine(Llama(cfg, dtype=jnp.float32, rngs=nnx.Rngs(0)), random_adapters(cfg, seed=1, b_std=0.3))


def history(engine, scheme):
    """A session with a multi-agent history: the state every failure starts from."""
    s = Session(engine, scheme, max_len=MAX_LEN, stop_ids=())
    s.append(PROMPT)
    s.generate("plan", 4, greedy=True)
    s.append([11, 12, 13])
    return s


def next_turns(s):
    out = [s.generate("action", 3, greedy=True)]
    s.append([21, 22])
    out.append(s.generate("reflect", 3, greedy=True))
    out.append(s.generate("plan", 2, greedy=True))
    return out


def valid_slots(s):
    """{name: host array} of every cache's valid slots (held counts per row), plus the counts."""
    st = s.scheme.state()
    out = {}

    def add(name, cache, held):
        for field, arr in zip(("a", "b", "c"), jax.tree.leaves(cache)):
            axis = 1 if arr.ndim == 3 else 2  # hidden [B, T, d]; K/V/LR [L, B, T, ...]
            a = np.asarray(arr)
            for b, n in enumerate(np.asarray(held)):
                out[f"{name}.{field}[{b}]"] = np.take(np.take(a, b, axis=axis - 1), range(int(n)), axis=axis - 1)

    for k, v in st.items():
        if k.startswith("held"):
            out[k] = {a: np.asarray(x).tolist() for a, x in v.items()} if isinstance(v, dict) else np.asarray(v).tolist()
    if "caches" in st:  # non_shared
        for a, c in st["caches"].items():
            add(f"caches[{a}]", c, st["held"][a])
    if "cache" in st:  # full_shared, base_lr_shared
        add("cache", st["cache"], st["held"])
    if "lr" in st:  # base_shared
        add("k", st["k"], st["held_shared"])
        add("v_base", st["v_base"], st["held_shared"])
        for a, x in st["lr"].items():
            add(f"lr[{a}]", x, st["held_own"][a])
    if "shared" in st:  # droidspeak
        add("shared", st["shared"], st["held_shared"])
        add("hidden", st["hidden"], st["held_shared"])
        for a, c in st["own"].items():
            add(f"own[{a}]", c, st["held_own"][a])
    return out


def assert_same_state(s, ref):
    assert s.trajectory == ref.trajectory
    assert len(s.turns) == len(ref.turns) and s._key_counter == ref._key_counter
    got, want = valid_slots(s), valid_slots(ref)
    assert got.keys() == want.keys()
    for k in want:
        if isinstance(want[k], np.ndarray):
            np.testing.assert_array_equal(got[k], want[k], err_msg=k)
        else:
            assert got[k] == want[k], k


def check_recovers(engine, scheme, s):
    """s (after a failed call) == a fresh session with the same history, now and for the next turns."""
    ref = history(engine, scheme)
    assert_same_state(s, ref)
    assert next_turns(s) == next_turns(ref)
    assert_same_state(s, ref)


# ---- bad input: refused before anything changes (the caches are the very same arrays) ------------
BAD_CALLS = {
    "score_out_of_vocab": (lambda s: s.score("action", [5, 999]), ValueError, "out of range"),
    "score_overflow_by_one": (lambda s: s.score("action", list(range(5, 5 + MAX_LEN - len(s.trajectory[0]) + 1))),
                              ValueError, "exceeds max_len"),
    "score_fractional_id": (lambda s: s.score("action", [5, 6.5]), ValueError, "integers"),
    "generate_fractional_count": (lambda s: s.generate("action", 2.5), ValueError, "max_new_tokens must be an integer"),
    "generate_overflow": (lambda s: s.generate("action", MAX_LEN), ValueError, "exceeds max_len"),
    "generate_unknown_agent": (lambda s: s.generate("critic", 2), KeyError, "unknown agent"),
    "generate_inf_temperature": (lambda s: s.generate("action", 2, temperature=float("inf")), ValueError, "finite"),
    "generate_bad_stop_ids": (lambda s: s.generate("action", 2, stop_ids=[2.0]), ValueError, "integers"),
    "generate_bad_seed": (lambda s: s.generate("action", 2, seed=1.5), ValueError, "seed"),
    "append_out_of_vocab": (lambda s: s.append([[4, 5, -1]]), ValueError, "out of range"),
    "append_overflow": (lambda s: s.append([7] * MAX_LEN), ValueError, "exceeds max_len"),
    "concurrent_fractional_count": (lambda s: s.generate_concurrent({"plan": 2, "action": 2.5}), ValueError,
                                    "max_new_tokens must be an integer"),
    "concurrent_unknown_agent": (lambda s: s.generate_concurrent({"plan": 2, "critic": 2}), KeyError, "unknown agent"),
    "adopt_without_branches": (lambda s: s.adopt("plan"), ValueError, "generate_concurrent"),
}


@pytest.mark.parametrize("scheme", SCHEMES)
def test_bad_input_changes_nothing(engine, scheme):
    for name, (call, error, match) in BAD_CALLS.items():
        s = history(engine, scheme)
        before = s.scheme.state()
        with pytest.raises(error, match=match):
            call(s)
        after = s.scheme.state()
        for k in before:  # the very same cache arrays: nothing ran
            for x, y in zip(jax.tree.leaves(before[k]), jax.tree.leaves(after[k])):
                assert x is y or np.array_equal(x, y), (name, k)
        if name in ("score_out_of_vocab", "score_overflow_by_one"):  # the reported bugs: check the next turns too
            check_recovers(engine, scheme, s)
        else:
            assert_same_state(s, history(engine, scheme))


def test_session_init_validates_before_allocating(engine):
    with pytest.raises(ValueError, match="batch must be an integer"):
        Session(engine, "full_shared", batch=1.5, max_len=MAX_LEN)
    with pytest.raises(ValueError, match="max_len must be an integer"):
        Session(engine, "full_shared", max_len=256.0)
    with pytest.raises(ValueError, match="cache_dtype='int8' is not supported"):
        Session(engine, "full_shared", max_len=MAX_LEN, cache_dtype="int8")
    with pytest.raises(ValueError, match="max_len=1000000000: the full_shared caches need"):
        Session(engine, "full_shared", max_len=10**9)


# ---- failures inside a turn, after some steps ran ----------------------------------------------
@pytest.mark.parametrize("scheme", SCHEMES)
def test_failure_in_decode_rolls_back_the_turn(engine, scheme, monkeypatch):
    """The catch-up and prefill ran (their caches were donated), then decode fails (e.g. out of
    memory at dispatch): the turn is rolled back and the session continues as a fresh one."""
    s = history(engine, scheme)

    def fail(*a, **k):
        raise RuntimeError("RESOURCE_EXHAUSTED: simulated out of memory")

    monkeypatch.setattr(s.engine, "decode", fail)
    s.append([31, 32])
    with pytest.raises(RuntimeError, match="RESOURCE_EXHAUSTED"):
        s.generate("action", 3, greedy=True)
    monkeypatch.undo()
    ref = history(engine, scheme)  # the appended context stays (append succeeded), the turn is gone
    ref.append([31, 32])
    assert_same_state(s, ref)
    assert s.generate("action", 3, greedy=True) == ref.generate("action", 3, greedy=True)
    assert next_turns(s) == next_turns(ref)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_ctrl_c_inside_a_turn_rolls_it_back(engine, scheme, monkeypatch):
    """A real SIGINT during the host-side prefill loop is held until the turn ends; the turn is
    then rolled back and KeyboardInterrupt raised."""
    s = history(engine, scheme)
    real_forward = s.engine.forward
    calls = []

    def forward_then_ctrl_c(*a, **k):
        calls.append(1)
        if len(calls) == 1:
            signal.raise_signal(signal.SIGINT)
        return real_forward(*a, **k)

    monkeypatch.setattr(s.engine, "forward", forward_then_ctrl_c)
    with pytest.raises(KeyboardInterrupt, match="rolled back"):
        s.generate("action", 3, greedy=True)
    monkeypatch.undo()
    assert calls, "the turn never reached the prefill loop"
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    check_recovers(engine, scheme, s)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_keyboard_interrupt_in_concurrent_branches_rolls_back(engine, scheme, monkeypatch):
    s = history(engine, scheme)
    real_decode = s.engine.decode
    calls = []

    def decode_then_interrupt(*a, **k):
        calls.append(1)
        if len(calls) == 1 and scheme not in ("full_shared", "base_lr_shared"):
            return real_decode(*a, **k)  # the sequential schemes: stop at the second agent's branch
        raise KeyboardInterrupt  # before the step: what the first branch's steps consumed is rolled back

    monkeypatch.setattr(s.engine, "decode", decode_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        s.generate_concurrent({"plan": 3, "action": 3})
    monkeypatch.undo()
    assert s._pending is None
    check_recovers(engine, scheme, s)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_failure_after_donation_marks_session_broken(engine, scheme, monkeypatch, tmp_path):
    """A jitted step consumed the caches and its output is lost (a failure inside the step):
    every later call says so in one line, and a checkpoint restores the session."""
    s = history(engine, scheme)
    s.save(tmp_path / "ckpt")
    real_forward = s.engine.forward

    def forward_output_lost(*a, **k):
        real_forward(*a, **k)  # donates the cache it was given
        raise RuntimeError("INTERNAL: simulated failure inside the step")

    monkeypatch.setattr(s.engine, "forward", forward_output_lost)
    with pytest.raises(RuntimeError, match="simulated"):
        s.generate("action", 3, greedy=True)
    monkeypatch.undo()
    for call in (lambda: s.generate("action", 3), lambda: s.append([5]), lambda: s.score("plan", [5]),
                 lambda: s.generate_concurrent({"plan": 2}), lambda: s.adopt("plan"), s.discard_branches,
                 lambda: s.save(tmp_path / "other")):
        with pytest.raises(SessionBrokenError) as info:
            call()
        msg = str(info.value)
        assert "\n" not in msg and "Session.restore(path, engine)" in msg and "simulated failure" in msg
    restored = Session.restore(tmp_path / "ckpt", engine)
    check_recovers(engine, scheme, restored)
