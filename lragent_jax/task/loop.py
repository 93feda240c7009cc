"""The plan -> action -> observation -> ... -> reflect loop on a Session, and answer scoring.

    session = Session(engine, scheme="base_lr_shared", max_len=2048, tokenizer=tok)
    result = run_episode(session, question.text, tools=make_tools(world))
    result.answer, result.stop_reason, score(result.answer, question.answer)

The loop writes the markers ("Thought:", "Action:", "Reflect:") and the observations; each
agent writes one line (see episodes.py). A turn ends at a newline token, an EOS token, or its
token limit (then the loop ends the line itself, so the format stays intact). The episode ends
when an action is finish[...], or after the reflect turn, which runs when the plan agent says
DONE_PHRASE or when max_steps tool calls have been made.
"""

from __future__ import annotations

import collections
import dataclasses
import re
import string
from collections.abc import Mapping

from .episodes import ACTION, DONE_PHRASE, REFLECT, THOUGHT, observation_text, question_text
from .tokenizer import newline_id
from .tools import MAX_ACTION_CHARS, execute

DEFAULT_TURN_TOKENS = {"plan": 96, "action": 48, "reflect": 96}
_FINISH = re.compile(r"finish\[([^\]\n]{0,200})\]")


class _ContextFull(Exception):
    """The next append or turn would not fit in the session's max_len."""


@dataclasses.dataclass
class EpisodeResult:
    text: str  # the whole trajectory as the agents saw it
    answer: str | None  # finish[...]'s argument, None if no turn wrote one
    # "finish" (reflect answered after the plan was done), "action_finish" (the action agent wrote
    # finish[...]), "max_steps" (reflect answered when the tool budget ran out), "no_answer"
    # (reflect wrote no finish[...]), "context_full" (the trajectory reached session.max_len)
    stop_reason: str
    tool_calls: int
    turns: list  # one dict per agent turn: role, agent, text, tokens, truncated, timings, catch-up
    trajectory_tokens: int


def _role_agents(session, roles: Mapping | None) -> dict:
    agents = tuple(session.agents)
    if roles is not None:
        out = {r: roles.get(r) for r in ("plan", "action", "reflect")}
    elif all(r in agents for r in ("plan", "action", "reflect")):
        out = {r: r for r in ("plan", "action", "reflect")}
    elif len(agents) == 1:  # a plain model plays every role
        out = {r: agents[0] for r in ("plan", "action", "reflect")}
    else:
        raise ValueError(f"the session's agents {list(agents)} are not plan / action / reflect; "
                         "pass roles={'plan': ..., 'action': ..., 'reflect': ...}")
    bad = {r: a for r, a in out.items() if a not in agents}
    if bad:
        raise ValueError(f"roles {bad} name no agent of the session; agents: {list(agents)}")
    return out


def _turn_limits(max_tokens_per_turn) -> dict:
    if isinstance(max_tokens_per_turn, Mapping):
        limits = {**DEFAULT_TURN_TOKENS, **max_tokens_per_turn}
    else:
        limits = {r: max_tokens_per_turn for r in DEFAULT_TURN_TOKENS}
    for r, n in limits.items():
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise ValueError(f"max_tokens_per_turn[{r!r}] must be a positive int, got {n!r}")
    return limits


def run_episode(session, question: str, *, tools, max_steps: int = 6, max_tokens_per_turn=None,
                greedy: bool = True, roles: Mapping | None = None, stop_ids=None, **sampling) -> EpisodeResult:
    """Run one question through the agents of `session` (batch 1, empty trajectory, tokenizer set).

    Args:
      tools: name -> callable(str) -> str (tools.make_tools(world)); finish[...] is built in.
      max_steps: most tool calls before reflect is made to answer.
      max_tokens_per_turn: an int for every role or {role: int} (default DEFAULT_TURN_TOKENS).
      roles: {"plan": agent, "action": agent, "reflect": agent} (default: agents of those names,
        or the only agent of a one-agent session).
      stop_ids: turn stop tokens (default: the newline token and the model's EOS ids).
      sampling: temperature / top_k / top_p / seed passed to Session.generate when greedy=False.
    """
    if session.tokenizer is None:
        raise ValueError("run_episode needs a Session with a tokenizer")
    if session.batch != 1:
        raise ValueError(f"run_episode runs one trajectory; got a Session with batch={session.batch}")
    if any(session.trajectory):
        raise ValueError("run_episode needs a fresh Session (its trajectory is not empty)")
    if not isinstance(max_steps, int) or max_steps < 0:
        raise ValueError(f"max_steps must be an int >= 0, got {max_steps!r}")
    agents = _role_agents(session, roles)
    limits = _turn_limits(DEFAULT_TURN_TOKENS if max_tokens_per_turn is None else max_tokens_per_turn)
    tok = session.tokenizer
    nl = newline_id(tok)
    stops = tuple(stop_ids) if stop_ids is not None else (nl,) + tuple(session.stop_ids)
    pieces: list = []
    turns: list = []

    def append(text: str) -> None:
        n = len(tok.encode(text, add_special_tokens=not session.trajectory[0]))
        if len(session.trajectory[0]) + n > session.max_len:
            raise _ContextFull
        session.append(text)
        pieces.append(text)

    def turn(role: str) -> str:
        # room for the turn and the newline the loop may add after it
        if len(session.trajectory[0]) + limits[role] + 1 > session.max_len:
            raise _ContextFull
        before = len(session.turns)
        ids = session.generate(agents[role], limits[role], greedy=greedy, stop_ids=stops, **sampling)[0]
        text = tok.decode(ids, skip_special_tokens=True)
        truncated = not ids or ids[-1] != nl
        pieces.append(text)
        if truncated:  # cut at the limit or at EOS: end the line so the format continues
            append("\n")
        line = text.split("\n", 1)[0]
        stats = session.turns[-1] if len(session.turns) > before else None
        turns.append({
            "role": role, "agent": agents[role], "text": line, "tokens": len(ids), "truncated": truncated,
            **({k: getattr(stats, k) for k in ("catch_up_tokens", "new_tokens", "prefill_s", "ttft_s", "decode_s")}
               if stats is not None else {}),
        })
        return line

    answer, reason, calls, thought = None, "no_answer", 0, ""
    try:
        append(question_text(question))
        while True:
            append(THOUGHT)
            thought = turn("plan")
            if DONE_PHRASE in thought or calls >= max_steps:
                break
            append(ACTION)
            outcome = execute(turn("action")[:MAX_ACTION_CHARS], tools)
            if outcome.finished:
                answer, reason = outcome.answer, "action_finish"
                break
            calls += 1
            append(observation_text(outcome.observation))
        if reason != "action_finish":
            append(REFLECT)
            found = _FINISH.findall(turn("reflect"))
            if found:
                answer = found[-1].strip()
                reason = "finish" if DONE_PHRASE in thought else "max_steps"
    except _ContextFull:
        reason = "context_full"
    return EpisodeResult(text="".join(pieces), answer=answer, stop_reason=reason, tool_calls=calls, turns=turns,
                         trajectory_tokens=len(session.trajectory[0]))


# ---- scoring ----------------------------------------------------------------------------------
def normalize_answer(text) -> str:
    """Lower case, punctuation and articles dropped, spaces collapsed (SQuAD style)."""
    if text is None:
        return ""
    text = str(text)[:1000].lower()
    text = "".join(ch for ch in text if ch not in string.punctuation)
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def score(pred, gold) -> dict:
    """{"em": 0/1, "f1": token F1} of a predicted answer (None = no answer) against the gold one."""
    p, g = normalize_answer(pred).split(), normalize_answer(gold).split()
    em = float(p == g)
    common = sum((collections.Counter(p) & collections.Counter(g)).values())
    if not p or not g or common == 0:
        return {"em": em, "f1": em}
    precision, recall = common / len(p), common / len(g)
    return {"em": em, "f1": 2 * precision * recall / (precision + recall)}
