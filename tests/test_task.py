"""The agent task: world generator, tools, episode format, tokenizer, and the agent loop (CPU, fast)."""

from __future__ import annotations

import dataclasses
import random
import re
import time

import numpy as np
import pytest

from lragent_jax.loading import load_tokenizer
from lragent_jax.task.episodes import (AGENT_ROLES, DONE_PHRASE, ROLES, base_corpus, gold_episodes, gold_segments,
                                       render)
from lragent_jax.task.loop import EpisodeResult, normalize_answer, run_episode, score
from lragent_jax.task.tokenizer import encode_segments, examples_by_role, newline_id, train_tokenizer
from lragent_jax.task.tools import (MAX_ARG_CHARS, CalcError, Outcome, calc, calc_value, execute, make_tools,
                                    parse_action)
from lragent_jax.task.world import FACT_SENTENCES, REGIONS, SMALL_CONFIG, build_world


@pytest.fixture(scope="module")
def world():
    return build_world(seed=3, config=SMALL_CONFIG)


@pytest.fixture(scope="module")
def tokenizer(world, tmp_path_factory):
    folder = tmp_path_factory.mktemp("task_tok")
    texts = base_corpus(world) + [render(s) for s in gold_episodes(world, "train")]
    train_tokenizer(texts, str(folder), vocab_size=700)
    return load_tokenizer(str(folder))


def _snapshot(w):
    ents = {n: (e.kind, e.region, dict(e.facts)) for n, e in w.entities.items()}
    paras = {n: w.paragraph(n) for n in sorted(w.entities)[:50]}
    qs = {s: [(q.text, q.answer, q.hops) for q in v] for s, v in w.questions.items()}
    return ents, paras, qs


# ---- world ----------------------------------------------------------------------------------
def test_world_is_deterministic_per_seed():
    a, b = build_world(7, SMALL_CONFIG), build_world(7, SMALL_CONFIG)
    assert _snapshot(a) == _snapshot(b)
    c = build_world(8, SMALL_CONFIG)
    assert set(a.entities) != set(c.entities)
    assert [q.text for q in a.questions["test"]] != [q.text for q in c.questions["test"]]


_DIGEST = """
import hashlib
from lragent_jax.task.world import SMALL_CONFIG, build_world
w = build_world(7, SMALL_CONFIG)
h = hashlib.sha256()
for split, qs in sorted(w.questions.items()):
    for q in qs:
        h.update(repr((split, q.text, q.answer, q.hops)).encode())
for n in sorted(w.entities):
    h.update(w.paragraph(n).encode())
print(h.hexdigest())
"""


def test_world_is_the_same_in_another_process():
    # The shipped weights are trained on a regenerated world: no dependence on hash seeds.
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    digests = set()
    for hash_seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": hash_seed, "PYTHONPATH": root, "JAX_PLATFORMS": "cpu"}
        out = subprocess.run([sys.executable, "-c", _DIGEST], env=env, capture_output=True, text=True, check=True)
        digests.add(out.stdout.strip())
    assert len(digests) == 1 and len(digests.pop()) == 64


def test_splits_are_disjoint_and_held_out(world):
    texts = {s: {q.text for q in world.questions[s]} for s in REGIONS}
    for i, s in enumerate(REGIONS):
        assert texts[s], f"split {s} has no questions"
        for t in REGIONS[i + 1:]:
            assert not texts[s] & texts[t]
    # Every entity a held-out question touches (subject, hop arguments, answer) is of its region.
    for split in ("validation", "test"):
        for q in world.questions[split]:
            touched = [q.subject] + [h.arg for h in q.hops if h.tool == "wiki"] + [q.answer]
            assert all(world.entities[n].region == split for n in touched if n in world.entities), q
    # No held-out name appears in the base model's text or the train trajectories.
    train_text = "\n".join(base_corpus(world, include_gold=True))
    held = [n for n, e in world.entities.items() if e.region != "train"]
    assert held and not [n for n in held if n in train_text]
    # The base corpus (without gold) has the format but not the roles' behaviour.
    base = "\n".join(base_corpus(world))
    assert "Action: wiki[" in base and "Observation:" in base
    assert "Reflect:" not in base and "I need" not in base and DONE_PHRASE not in base
    # Hop counts 2..4 all occur.
    assert {q.num_hops for q in world.questions["test"]} == {2, 3, 4}


def test_default_world_has_500_test_questions():
    w = build_world(0)
    assert len(w.questions["test"]) >= 500
    assert len(w.questions["train"]) > len(w.questions["test"])


def test_names_are_unambiguous(world):
    # Each syllable word names one entity, so no name is contained in another.
    from lragent_jax.task.world import _ORG_KINDS, _WORK_NOUNS

    shared = {"The", *_WORK_NOUNS, *_ORG_KINDS}
    owner = {}
    for n in world.entities:
        for wd in n.split():
            if wd not in shared:
                assert owner.setdefault(wd, n) == n, (wd, owner[wd], n)
    assert len(owner) > len(world.entities)


def _extract(observation: str, subject: str, relation: str) -> str:
    pattern = re.escape(FACT_SENTENCES[relation]).replace(re.escape("{s}"), re.escape(subject))
    pattern = pattern.replace(re.escape("{occupation}"), r"an? \w+").replace(re.escape("{v}"), r"(.+?)")
    found = re.findall(r"(?:^|(?<=\. ))" + pattern + r"(?= |$)", observation)
    assert len(found) == 1, (subject, relation, observation)
    return found[0]


@pytest.mark.parametrize("split", REGIONS)
def test_gold_answers_follow_from_the_tools(world, split):
    """An independent solver that only reads tool observations reaches each gold answer."""
    tools = make_tools(world)
    for q in world.questions[split]:
        assert q.subject in q.text
        arg, values = q.subject, []
        for hop in q.hops:
            if hop.tool == "wiki":
                out = execute(f"wiki[{arg}]", tools)
                assert out.ok, out.observation
                read = [_extract(out.observation, arg, f) for f in hop.facts]
                values.append(read)
                arg = read[-1]  # the entity (or value) the next hop needs
            else:  # calc: the year read first minus the last number read
                out = execute(f"calc[{values[0][0]} - {values[-1][-1]}]", tools)
                assert out.ok, out.observation
                arg = out.observation
        assert arg == q.answer, (q.text, arg, q.answer)
        # The gold trajectory's observations are exactly the tools' outputs, and it ends with the answer.
        segs = gold_segments(world, q, tools)
        actions = [t for r, t in segs if r == "action"]
        observations = [t for r, t in segs if r == "observation"]
        for a, o in zip(actions, observations, strict=True):
            assert o == f"Observation: {execute(a, tools).observation}\n"
        assert segs[-1] == ("reflect", segs[-1][1]) and segs[-1][1].endswith(f"finish[{q.answer}]\n")
        assert DONE_PHRASE in [t for r, t in segs if r == "plan"][-1]


def test_segments_roles_and_lines(world):
    segs = gold_segments(world, world.questions["train"][0])
    assert {r for r, _ in segs} == set(ROLES)
    for role, text in segs:
        if role in AGENT_ROLES:
            assert text.startswith(" ") and text.endswith("\n") and text.count("\n") == 1
        elif role == "marker":
            assert text in ("Thought:", "Action:", "Reflect:")


# ---- tools ----------------------------------------------------------------------------------
def _random_expr(rng: random.Random, depth: int):
    """(text, value) of a random + - * / expression with exact divisions."""
    if depth == 0 or rng.random() < 0.3:
        v = rng.randint(0, 999)
        return str(v), v
    op = rng.choice("+-*/")
    lt, lv = _random_expr(rng, depth - 1)
    rt, rv = _random_expr(rng, depth - 1)
    if op == "/":
        if rv == 0:
            rt, rv = "7", 7
        lt, lv = f"({lt}) * ({rt})", lv * rv  # exact by construction
    value = {"+": lv + rv, "-": lv - rv, "*": lv * rv, "/": lv // rv if op == "/" else 0}[op]
    if op == "/":
        value = lv // rv
        assert value * rv == lv
    text = f"({lt}) {op} ({rt})" if rng.random() < 0.5 else f"({lt}){op}({rt})"
    return text, value


def test_calc_matches_python_integers():
    rng = random.Random(0)
    checked = 0
    for _ in range(400):
        text, value = _random_expr(rng, 3)
        if len(text) > MAX_ARG_CHARS:
            assert calc(text).startswith("Error:")
            continue
        assert calc_value(text) == value, text
        assert calc(text) == str(value)
        checked += 1
    assert checked > 100
    # Precedence, left associativity, unary minus, spaces.
    for text, value in [("2+3*4", 14), ("(2+3)*4", 20), ("20-5-3", 12), ("48/4/2", 6), ("-3*-2", 6),
                        ("- (4 - 10)", 6), (" 1987 - 1942 ", 45), ("0", 0), ("007", 7)]:
        assert calc_value(text) == value, text
    for bad in ["7/2", "1/0", "2**3", "1+", "()", "3 4", "abc", "1e5", "0x10", "", "   "]:
        with pytest.raises(CalcError):
            calc_value(bad)
        assert calc(bad).startswith("Error: calc cannot evaluate")


HOSTILE = [
    "", " ", "\n", "\x00", "[]", "]", "[", "wiki", "wiki[", "wiki]", "[wiki]", "wiki[]", "calc[]", "finish",
    "Action:", "Action: ", "wiki[[[[", "calc[" + "(" * 10_000 + "1" + ")" * 10_000 + "]",
    "calc[" + "-" * 10_000 + "1]", "calc[" + "9" * 10_000 + "]", "calc[" + "(" * 15 + "1" + ")" * 15 + "]",
    "calc[" + "(" * 40 + "1" + ")" * 40 + "]", "calc[١+٢]", "calc[²+1]", "calc[1/0]", "calc[3/2]",
    "wiki[Ωμέγα Πόλη]", "wiki[\u202e\u200bX]", "wiki[😀]", "wiki[x]" * 5000, "x" * 10_000_000,
    "eval[__import__('os')]", "calc[__import__('os').system('true')]", "wiki[a\nb]", "finish[a]]]]",
    "wiki[" + "a" * 10_000 + "]", "\ud800", "ＷＩＫＩ[x]", "Wiki[x]", "calc[1]\ncalc[2]", b"bytes", None, 123,
]


def test_hostile_action_lines_are_bounded_and_never_raise(world):
    tools = make_tools(world)
    for line in HOSTILE:
        t0 = time.perf_counter()
        out = execute(line, tools)
        elapsed = time.perf_counter() - t0
        assert isinstance(out, Outcome)
        assert elapsed < 0.25, (repr(line)[:60], elapsed)  # loose: a shared CPU; unbounded work takes seconds
        assert len(out.observation) <= 1200
        assert out.observation.isprintable() or out.observation == "", repr(out.observation)
        if not out.finished:
            assert out.ok is False or out.action is not None
    # A few exact outcomes.
    assert execute("calc[" + "(" * 15 + "1" + ")" * 15 + "]", tools).observation == "1"
    assert "nested more than" in execute("calc[" + "(" * 40 + "1" + ")" * 40 + "]", tools).observation
    assert "longer than" in execute("calc[" + "9" * 100 + "]", tools).observation
    assert execute("finish[a]]]]", tools).ok is False
    assert execute("Action: finish[ 1942 ]", tools).answer == "1942"
    assert execute("calc[1]\ncalc[2]", tools).observation == "1"
    assert parse_action("wiki[x]") == parse_action("  Action: wiki[x]  ")
    assert isinstance(parse_action("teleport[x]"), str)
    # Random garbage over the parser's alphabet.
    rng = random.Random(1)
    alphabet = "[]()+-*/ 0123456789wikicalfnsh:\n\x00éΩ😀"
    for _ in range(2000):
        line = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 300)))
        out = execute(line, tools)
        assert isinstance(out, Outcome) and len(out.observation) <= 1200


def test_tool_exceptions_become_observations():
    def broken(arg):
        raise RuntimeError("boom " * 1000)

    out = execute("oops[1]", {"oops": broken})
    assert out.ok is False and out.observation.startswith("Error: oops failed: RuntimeError")
    assert len(out.observation) < 200


def test_wiki_lookup(world):
    wiki = make_tools(world)["wiki"]
    name = world.questions["test"][0].subject
    assert wiki(name) == world.paragraph(name)
    assert wiki("  " + name.upper().replace(" ", "   ") + " ") == world.paragraph(name)
    assert wiki(name + "x").startswith("Error: no wiki entry")
    para = world.paragraph(name)
    assert para.startswith(name + " is ") and para.count(". ") >= 3 and len(para) <= 1200


# ---- tokenizer ------------------------------------------------------------------------------
def test_tokenizer_round_trip_via_load_tokenizer(world, tokenizer):
    assert len(tokenizer) == 700
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (0, 1, 2)
    nl = newline_id(tokenizer)
    for q in world.questions["test"][:20]:
        segs = gold_segments(world, q)
        text = render(segs)
        ids, roles = encode_segments(tokenizer, segs)
        # Segment-wise encoding == whole-text encoding (what the loop builds == what a trainer sees).
        assert tokenizer.encode(text) == ids[:-1].tolist()
        assert ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.eos_token_id
        assert tokenizer.decode(ids, skip_special_tokens=True) == text
        assert len(ids) == len(roles) and roles[0] == roles[-1] == -1
        # Each agent turn ends with the newline token, the turn's stop.
        for role in AGENT_ROLES:
            mask = roles == ROLES.index(role)
            assert mask.any()
            ends = np.flatnonzero(mask & ~np.roll(mask, -1))
            assert (ids[ends] == nl).all()
    # One example per role, each masking exactly that role's tokens.
    eps = gold_episodes(world, "train")[:5]
    by_role = examples_by_role(tokenizer, eps)
    assert set(by_role) == set(AGENT_ROLES) and all(len(v) == 5 for v in by_role.values())
    for role, examples in by_role.items():
        for (ids, mask), segs in zip(examples, eps):
            own = "".join(t for r, t in segs if r == role)
            assert tokenizer.decode(ids[mask]) == own
    # Held-out names split into several tokens; digits one token each.
    name = world.questions["test"][0].subject
    assert len(tokenizer.encode(" " + name, add_special_tokens=False)) >= 3
    assert len(tokenizer.encode(" 1942", add_special_tokens=False)) == 5


# ---- the loop -------------------------------------------------------------------------------
@dataclasses.dataclass
class _Turn:
    agent: str
    catch_up_tokens: int = 0
    new_tokens: int = 0
    prefill_s: float = 0.0
    ttft_s: float = 0.0
    decode_s: float = 0.0


class ScriptedSession:
    """The Session surface run_episode uses; each agent replays canned lines (one per turn)."""

    def __init__(self, tokenizer, script: dict, *, max_len: int = 4096, agents=("plan", "action", "reflect")):
        self.tokenizer = tokenizer
        self.script = {a: list(v) for a, v in script.items()}
        self.agents = tuple(agents)
        self.batch = 1
        self.max_len = max_len
        self.stop_ids = (tokenizer.eos_token_id,)
        self.trajectory = [[]]
        self.turns = []
        self.calls = []

    def append(self, rows):
        (ids,) = rows  # one id list per row: the loop tokenizes each piece itself
        assert len(self.trajectory[0]) + len(ids) <= self.max_len
        self.trajectory[0] += ids

    def generate(self, agent, max_new_tokens=32, *, greedy=False, stop_ids=None, **kw):
        assert agent in self.agents
        self.calls.append((agent, max_new_tokens, greedy, tuple(stop_ids)))
        ids = self.tokenizer.encode(self.script[agent].pop(0), add_special_tokens=False)
        out = []
        for t in ids[:max_new_tokens]:
            out.append(t)
            if t in stop_ids:
                break
        self.trajectory[0] += out
        self.turns.append(_Turn(agent))
        return [out]


def _gold_script(segs):
    script = {r: [] for r in AGENT_ROLES}
    for role, text in segs:
        if role in AGENT_ROLES:
            script[role].append(text)
    return script


def test_run_episode_follows_the_gold_trajectory(world, tokenizer):
    tools = make_tools(world)
    results = []
    for q in world.questions["test"][:12]:
        segs = gold_segments(world, q, tools)
        session = ScriptedSession(tokenizer, _gold_script(segs))
        res = run_episode(session, q.text, tools=tools, max_steps=6)
        assert isinstance(res, EpisodeResult)
        # Same tokens as the segment-wise encoding a trainer uses (minus EOS), same text.
        assert session.trajectory[0] == encode_segments(tokenizer, segs)[0][:-1].tolist()
        assert res.text == render(segs) and res.trajectory_tokens == len(session.trajectory[0])
        assert res.answer == q.answer and res.stop_reason == "finish" and res.tool_calls == q.num_hops
        assert [t["role"] for t in res.turns] == ["plan", "action"] * q.num_hops + ["plan", "reflect"]
        assert not any(t["truncated"] for t in res.turns)
        nl = newline_id(tokenizer)
        assert all(c[2] is True and nl in c[3] for c in session.calls)
        results.append(score(res.answer, q.answer))
    assert all(r == {"em": 1.0, "f1": 1.0} for r in results)


def test_run_episode_wrong_answer_budget_and_truncation(world, tokenizer):
    tools = make_tools(world)
    q = next(q for q in world.questions["test"] if q.num_hops == 2)
    segs = gold_segments(world, q, tools)
    script = _gold_script(segs)
    script["reflect"] = [" done. Answer: finish[Nowhere " + q.answer + "]\n"]
    res = run_episode(ScriptedSession(tokenizer, script), q.text, tools=tools)
    assert res.answer == "Nowhere " + q.answer
    assert score(res.answer, q.answer) == {"em": 0.0, "f1": pytest.approx(2 / 3)}

    # The plan never says it is done: reflect answers after max_steps tool calls.
    stuck = {"plan": [" I need more.\n"] * 10, "action": [f" wiki[{q.subject}]\n"] * 10,
             "reflect": [" Answer: finish[1]\n"]}
    session = ScriptedSession(tokenizer, stuck)
    res = run_episode(session, q.text, tools=tools, max_steps=3)
    assert (res.stop_reason, res.tool_calls, res.answer) == ("max_steps", 3, "1")
    assert [t["role"] for t in res.turns] == ["plan", "action"] * 3 + ["plan", "reflect"]

    # A turn cut at its token limit: the loop ends the line; a garbage action becomes an error observation.
    script = {"plan": [" x" * 50 + "\n", " " + DONE_PHRASE + "\n"],
              "action": [" ]]][[[" * 20 + "\n"], "reflect": [" Answer: finish[ 1942 ]\n"]}
    session = ScriptedSession(tokenizer, script)
    res = run_episode(session, q.text, tools=tools, max_tokens_per_turn={"plan": 8, "action": 4})
    assert res.turns[0]["truncated"] and res.turns[0]["tokens"] == 8
    assert "Observation: Error: cannot parse action" in res.text
    assert res.answer == "1942" and res.stop_reason == "finish"
    assert all(line.split(":")[0] in ("Question", "Thought", "Action", "Observation", "Reflect")
               for line in res.text.splitlines())

    # The action agent may finish directly; a full context stops the episode cleanly.
    res = run_episode(ScriptedSession(tokenizer, {"plan": [" go.\n"], "action": [" finish[Kurz]\n"], "reflect": []}),
                      q.text, tools=tools)
    assert (res.answer, res.stop_reason) == ("Kurz", "action_finish")
    res = run_episode(ScriptedSession(tokenizer, _gold_script(segs), max_len=150), q.text, tools=tools)
    assert res.stop_reason == "context_full" and res.answer is None and res.trajectory_tokens <= 150

    # One-agent sessions play every role; a fresh session is required.
    session = ScriptedSession(tokenizer, {"base": [t for r, t in segs if r in AGENT_ROLES]}, agents=("base",))
    assert run_episode(session, q.text, tools=tools).answer == q.answer
    with pytest.raises(ValueError, match="fresh Session"):
        run_episode(session, q.text, tools=tools)


def test_score():
    assert score("1942", "1942") == {"em": 1.0, "f1": 1.0}
    assert score(" The  Kurzour. ", "kurzour") == {"em": 1.0, "f1": 1.0}
    assert score(None, "1942") == {"em": 0.0, "f1": 0.0}
    assert score("1943", "1942") == {"em": 0.0, "f1": 0.0}
    assert score("Siton Heiszair", "Siton Heiszair Junior")["f1"] == pytest.approx(0.8)
    assert normalize_answer("x" * 10_000) == "x" * 1000
