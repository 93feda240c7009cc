"""run_episodes: B questions in lockstep on one batched Session give what B run_episode calls give.

On the shipped miniature (trained agents, so the rows really diverge: different numbers of tool
calls, rows that finish early, rows that hit max_steps, and rows that run out of context while
others go on), greedy, float32. The batch-5 and batch-1 programs differ in shape (padding, chunk
plans), so logits may differ in the last float32 bits; the trained model's greedy margins are far
above that, and the test requires the texts, answers, stop reasons, generated tokens and per-row
catch-up counts to be identical (no tolerance).
"""

import pytest

from lragent_jax import miniature
from lragent_jax.task.loop import run_episode, run_episodes

SHIPPED = miniature.assets_built()
QUESTIONS = 5
MAX_LEN = 640  # below the longest of these trajectories: some rows end "context_full"


@pytest.fixture(scope="module")
def setup():
    from lragent_jax.engine import Engine
    from lragent_jax.task import make_tools

    model, lora, tok, world = miniature.load_miniature("shared")
    return Engine(model, lora), tok, make_tools(world), world.questions["test"][:QUESTIONS]


@pytest.mark.skipif(not SHIPPED, reason="assets not built")
@pytest.mark.parametrize("scheme", ["non_shared", "base_lr_shared", "droidspeak"])
def test_batched_episodes_equal_single_ones(setup, scheme):
    from lragent_jax.session import Session

    engine, tok, tools, questions = setup
    session = Session(engine, scheme, batch=QUESTIONS + 1, max_len=MAX_LEN, tokenizer=tok)  # one row left empty
    batched = run_episodes(session, [q.text for q in questions], tools=tools)
    assert session.trajectory[QUESTIONS] == []
    calls = len(session.turns)
    single = []
    for q in questions:
        single.append(run_episode(Session(engine, scheme, max_len=MAX_LEN, tokenizer=tok), q.text, tools=tools))
    for b, (got, want) in enumerate(zip(batched, single)):
        assert (got.text, got.answer, got.stop_reason, got.tool_calls, got.trajectory_tokens) == \
            (want.text, want.answer, want.stop_reason, want.tool_calls, want.trajectory_tokens), (scheme, b)
        assert len(session.trajectory[b]) == got.trajectory_tokens
        keys = ("role", "agent", "text", "ids", "truncated", "catch_up_tokens", "new_tokens")
        assert [{k: t[k] for k in keys} for t in got.turns] == [{k: t[k] for k in keys} for t in want.turns], b
    # the schedules really differ, and rows at the same role shared calls
    assert len({r.stop_reason for r in batched}) >= 2 and len({r.tool_calls for r in batched}) >= 2
    assert "context_full" in {r.stop_reason for r in batched}
    assert calls == _expected_calls(batched) < sum(len(r.turns) for r in single)


def _expected_calls(results) -> int:
    """Rows alternate plan / action in step, so pass k runs every row's k-th plan in one call and
    every k-th action in one call; a row's reflect joins the reflect call at the end of the pass of
    its last plan."""
    count = lambda r, role: sum(t["role"] == role for t in r.turns)  # noqa: E731
    reflect_passes = {count(r, "plan") for r in results if count(r, "reflect")}
    return max(count(r, "plan") for r in results) + max(count(r, "action") for r in results) + len(reflect_passes)


def test_run_episodes_refuses_bad_input(setup):
    from lragent_jax.session import Session

    engine, tok, tools, questions = setup
    session = Session(engine, "non_shared", batch=2, max_len=MAX_LEN, tokenizer=tok)
    with pytest.raises(ValueError, match="3 questions for a Session with batch=2"):
        run_episodes(session, [q.text for q in questions[:3]], tools=tools)
    with pytest.raises(ValueError, match="at least one question"):
        run_episodes(session, [], tools=tools)
    with pytest.raises(ValueError, match="run_episodes runs one question per row"):
        run_episode(session, questions[0].text, tools=tools)
    run_episodes(session, [questions[0].text], tools=tools)
    with pytest.raises(ValueError, match="fresh Session"):
        run_episodes(session, [questions[0].text], tools=tools)
