"""The plan -> action -> observation -> ... -> reflect loop on a Session, and answer scoring.

    session = Session(engine, scheme="base_lr_shared", max_len=2048, tokenizer=tok)
    result = run_episode(session, question.text, tools=make_tools(world))
    result.answer, result.stop_reason, score(result.answer, question.answer)

    session = Session(engine, scheme="base_lr_shared", batch=32, max_len=2048, tokenizer=tok)
    results = run_episodes(session, [q.text for q in questions[:32]], tools=make_tools(world))

The loop writes the markers ("Thought:", "Action:", "Reflect:") and the observations; each
agent writes one line (see episodes.py). A turn ends at a newline token, an EOS token, or its
token limit (then the loop ends the line itself, so the format stays intact). The episode ends
when an action is finish[...], or after the reflect turn, which runs when the plan agent says
DONE_PHRASE or when max_steps tool calls have been made. run_episodes runs one question per row of
a batched Session in lockstep: the rows waiting for the same agent share one generate call.
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
    # one dict per agent turn: role, agent, text (its line), tokens, ids (the generated token ids),
    # truncated, this row's catch_up_tokens / new_tokens, and the timings of the generate call it
    # shared with `rows` rows (prefill_s, ttft_s, decode_s)
    turns: list
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
    if getattr(session, "batch", 1) != 1:
        raise ValueError(f"run_episode runs one trajectory; got a Session with batch={session.batch} "
                         "(run_episodes runs one question per row)")
    return run_episodes(session, [question], tools=tools, max_steps=max_steps, max_tokens_per_turn=max_tokens_per_turn,
                        greedy=greedy, roles=roles, stop_ids=stop_ids, **sampling)[0]


def run_episodes(session, questions, *, tools, max_steps: int = 6, max_tokens_per_turn=None, greedy: bool = True,
                 roles: Mapping | None = None, stop_ids=None, **sampling) -> list:
    """Run questions[b] on row b of `session` in lockstep; returns one EpisodeResult per question.

    Each row follows run_episode's loop on its own (plan -> action -> observation -> ... ->
    reflect); rows waiting for the same role share one Session.generate call (rows= the rows
    waiting), so a batch of B questions costs about as many calls as one question. Rows past
    len(questions) stay empty and take no turn. The session must be fresh (empty trajectory) with
    a tokenizer and batch >= len(questions); the other arguments are run_episode's.
    """
    questions = list(questions)
    if session.tokenizer is None:
        raise ValueError("run_episode(s) needs a Session with a tokenizer")
    if not questions:
        raise ValueError("run_episodes needs at least one question")
    if len(questions) > session.batch:
        raise ValueError(f"{len(questions)} questions for a Session with batch={session.batch}; one question a row")
    if any(session.trajectory):
        raise ValueError("run_episode(s) needs a fresh Session (its trajectory is not empty)")
    if not isinstance(max_steps, int) or max_steps < 0:
        raise ValueError(f"max_steps must be an int >= 0, got {max_steps!r}")
    agents = _role_agents(session, roles)
    limits = _turn_limits(DEFAULT_TURN_TOKENS if max_tokens_per_turn is None else max_tokens_per_turn)
    tok = session.tokenizer
    nl = newline_id(tok)
    stops = tuple(stop_ids) if stop_ids is not None else (nl,) + tuple(session.stop_ids)
    episodes = [_Episode(b, q, session, tok, nl, limits, agents, max_steps, tools) for b, q in enumerate(questions)]
    for e in episodes:
        e.advance(None)
    while any(e.waiting for e in episodes):
        for role in ROLE_ORDER:  # plan then action: rows stay in step (every row alternates the two)
            group = [e for e in episodes if e.waiting == role]
            if not group:
                continue
            _flush(session, episodes)
            mask = [False] * session.batch
            for e in group:
                mask[e.row] = True
            before = len(session.turns)
            out = session.generate(agents[role], limits[role], greedy=greedy, stop_ids=stops,
                                   rows=None if all(mask) else mask, **sampling)
            stats = session.turns[-1] if len(session.turns) > before else None
            for e in group:
                e.advance((out[e.row], stats, len(group)))
    _flush(session, episodes)
    return [e.result() for e in episodes]


ROLE_ORDER = ("plan", "action", "reflect")


def _flush(session, episodes) -> None:
    """Append every row's pending context in one call (appends are host-side bookkeeping)."""
    if any(e.pending for e in episodes):
        rows = [[] for _ in range(session.batch)]
        for e in episodes:
            rows[e.row], e.pending = e.pending, []
        session.append(rows)


class _Episode:
    """One row's run of the loop, as a generator that stops at each turn it needs (its role).

    Appends are queued (pending) and written before the next generate call; the lengths that
    decide "context_full" count them, so the row ends exactly where run on its own it would.
    """

    def __init__(self, row, question, session, tok, nl, limits, agents, max_steps, tools):
        self.row, self.session, self.tok, self.nl = row, session, tok, nl
        self.limits, self.agents, self.max_steps, self.tools = limits, agents, max_steps, tools
        self.pending: list = []
        self.pieces: list = []
        self.turns: list = []
        self.waiting: str | None = None
        self.outcome = (None, "no_answer", 0)
        self._steps = self._run(question)

    def _length(self) -> int:
        return len(self.session.trajectory[self.row]) + len(self.pending)

    def advance(self, sent) -> None:
        try:
            self.waiting = self._steps.send(sent)
        except StopIteration:
            self.waiting = None

    def _append(self, text: str) -> None:
        ids = self.tok.encode(text, add_special_tokens=self._length() == 0)
        if self._length() + len(ids) > self.session.max_len:
            raise _ContextFull
        self.pending.extend(ids)
        self.pieces.append(text)

    def _turn(self, role: str):
        # room for the turn and the newline the loop may add after it
        if self._length() + self.limits[role] + 1 > self.session.max_len:
            raise _ContextFull
        ids, stats, rows = yield role
        text = self.tok.decode(ids, skip_special_tokens=True)
        truncated = not ids or ids[-1] != self.nl
        self.pieces.append(text)
        if truncated:  # cut at the limit or at EOS: end the line so the format continues
            self._append("\n")
        line = text.split("\n", 1)[0]
        record = {"role": role, "agent": self.agents[role], "text": line, "tokens": len(ids), "ids": list(ids),
                  "truncated": truncated}
        if stats is not None:  # timings are the shared call's (`rows` rows took it); counts this row's
            for k in ("catch_up", "new"):  # a stand-in session's stats may hold totals only (batch 1)
                by_row = getattr(stats, f"{k}_by_row", None)
                record[f"{k}_tokens"] = by_row[self.row] if by_row else getattr(stats, f"{k}_tokens")
            record.update({k: getattr(stats, k) for k in ("prefill_s", "ttft_s", "decode_s")}, rows=rows)
        self.turns.append(record)
        return line

    def _run(self, question):
        answer, reason, calls, thought = None, "no_answer", 0, ""
        try:
            self._append(question_text(question))
            while True:
                self._append(THOUGHT)
                thought = yield from self._turn("plan")
                if DONE_PHRASE in thought or calls >= self.max_steps:
                    break
                self._append(ACTION)
                outcome = execute((yield from self._turn("action"))[:MAX_ACTION_CHARS], self.tools)
                if outcome.finished:
                    answer, reason = outcome.answer, "action_finish"
                    break
                calls += 1
                self._append(observation_text(outcome.observation))
            if reason != "action_finish":
                self._append(REFLECT)
                found = _FINISH.findall((yield from self._turn("reflect")))
                if found:
                    answer = found[-1].strip()
                    reason = "finish" if DONE_PHRASE in thought else "max_steps"
        except _ContextFull:
            reason = "context_full"
        self.outcome = (answer, reason, calls)

    def result(self) -> EpisodeResult:
        answer, reason, calls = self.outcome
        return EpisodeResult(text="".join(self.pieces), answer=answer, stop_reason=reason, tool_calls=calls,
                             turns=self.turns, trajectory_tokens=len(self.session.trajectory[self.row]))


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
