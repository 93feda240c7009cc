"""The text format of a trajectory, gold trajectories by role, and the base model's corpus.

A trajectory is line based (AutoAct style). The loop writes the markers; each agent writes
the rest of its line, up to and including the newline:

    Question: In which year was the director of The Velora Garden born?
    Thought: I need the director of The Velora Garden.                 <- plan
    Action: wiki[The Velora Garden]                                    <- action
    Observation: The Velora Garden is a film released in 1987. ...     <- tool
    Thought: The Velora Garden was directed by Tal Morisca. Next I need the birth year of Tal Morisca.
    Action: wiki[Tal Morisca]
    Observation: Tal Morisca is a director born in the year 1942. ...
    Thought: Tal Morisca is a director born in the year 1942. I have the answer.
    Reflect: The Velora Garden -> Tal Morisca -> 1942. Answer: finish[1942]   <- reflect

Segments are (role, text) with role in ROLES. "marker" segments ("Thought:", "Action:",
"Reflect:") are written by the loop, never by an agent; an agent's segment starts with the
space after its marker and ends with "\n". The plan agent ends its thought with DONE_PHRASE
when it has what it needs; the loop then hands over to reflect.

Tokenize a trajectory segment by segment (tokenizer.encode_segments), as the loop does when
it appends text and the agents generate: the token sequence then matches inference exactly.
"""

from __future__ import annotations

import random

from .tools import execute, make_tools
from .world import Question, World

ROLES = ("question", "marker", "plan", "action", "observation", "reflect")
AGENT_ROLES = ("plan", "action", "reflect")
THOUGHT, ACTION, REFLECT = "Thought:", "Action:", "Reflect:"
QUESTION_PREFIX, OBSERVATION_PREFIX = "Question:", "Observation:"
DONE_PHRASE = "I have the answer."

# What a wiki lookup is for, as the plan agent says it.
_WANTED = {
    "directed_by": "the director", "film_year": "the release year", "book_year": "the publication year",
    "org_founded": "the founding year", "city_founded": "the founding year", "birth_year": "the birth year",
    "born_in": "the birth city", "located_in": "the country", "population": "the population",
    "founded_by": "the founder", "produced_by": "the producer", "written_by": "the author",
    "based_in": "the home city", "capital": "the capital",
}


def question_text(question: str) -> str:
    return f"{QUESTION_PREFIX} {' '.join(str(question).split())}\n"


def observation_text(observation: str) -> str:
    return f"{OBSERVATION_PREFIX} {observation}\n"


def _need(hop) -> str:
    if hop.tool == "calc":
        return f"I need to compute {hop.arg}."
    wanted = " and ".join(_WANTED[f] for f in hop.facts)
    return f"I need {wanted} of {hop.arg}."


def _found(world: World, hop) -> str:
    if hop.tool == "calc":
        return f"The result is {hop.value}."
    entity = world.entities[hop.arg]
    return " ".join(entity.sentence(f) for f in hop.facts)


def gold_segments(world: World, question: Question, tools=None) -> list:
    """The gold trajectory of `question` as [(role, text), ...]; observations come from running
    each gold action through the tools (so they are what the loop will append)."""
    tools = tools if tools is not None else make_tools(world)
    segs = [("question", question_text(question.text)), ("marker", THOUGHT), ("plan", f" {_need(question.hops[0])}\n")]
    for i, hop in enumerate(question.hops):
        line = f" {hop.tool}[{hop.arg}]\n"
        outcome = execute(line, tools)
        if not outcome.ok or outcome.finished:
            raise ValueError(f"gold action {line.strip()!r} of {question.text!r} failed: {outcome.observation}")
        segs += [("marker", ACTION), ("action", line), ("observation", observation_text(outcome.observation))]
        nxt = f"Next {_need(question.hops[i + 1])}" if i + 1 < len(question.hops) else DONE_PHRASE
        segs += [("marker", THOUGHT), ("plan", f" {_found(world, hop)} {nxt}\n")]
    chain = " -> ".join([h.arg for h in question.hops] + [question.answer])
    segs += [("marker", REFLECT), ("reflect", f" {chain}. Answer: finish[{question.answer}]\n")]
    return segs


def render(segments) -> str:
    return "".join(text for _, text in segments)


def gold_episodes(world: World, split: str) -> list:
    """Gold trajectories (segment lists) of every question of a split ("train" / "validation" / "test")."""
    if split not in world.questions:
        raise KeyError(f"unknown split {split!r}; splits: {list(world.questions)}")
    tools = make_tools(world)
    return [gold_segments(world, q, tools) for q in world.questions[split]]


# ---- text for the base model ------------------------------------------------------------------
def browsing_segments(world: World, question: Question, rng: random.Random, tools=None) -> list:
    """A trajectory of the format without the roles' behaviour: after the question, 1-4 lookups
    of entities reached by a random walk from the question's subject (sometimes a subtraction
    of two numbers seen), each with its real observation; no plan, no answer. It teaches the
    format and what tools return, not which call answers a question."""
    tools = tools if tools is not None else make_tools(world)
    segs = [("question", question_text(question.text))]
    current = world.entities[question.subject]
    years = []
    for _ in range(rng.randint(1, 4)):
        if len(years) >= 2 and rng.random() < 0.25:
            a, b = rng.sample(years, 2)
            line = f" calc[{max(a, b)} - {min(a, b)}]\n"
            thought = f" I will compute {max(a, b)} - {min(a, b)}.\n"
        else:
            line = f" wiki[{current.name}]\n"
            thought = f" I will look up {current.name}.\n"
            years += [v for k, v in current.facts.items() if k.endswith("year") or k.endswith("founded")]
        outcome = execute(line, tools)
        segs += [("marker", THOUGHT), ("plan", thought), ("marker", ACTION), ("action", line),
                 ("observation", observation_text(outcome.observation))]
        links = [v for v in current.facts.values() if isinstance(v, str) and v in world.entities]
        if links:
            current = world.entities[rng.choice(links)]
    return segs


def base_corpus(world: World, *, region: str = "train", browsing_per_question: float = 1.0,
                include_gold: bool = False, seed: int = 0) -> list:
    """Documents (str) for pre-training the base model: every paragraph of the region's
    entities (grouped a few per document) and browsing trajectories (see browsing_segments)
    for round(browsing_per_question * #questions) of the region's questions; with include_gold,
    the region's gold trajectories too. Only the train region's text should be used."""
    if region not in world.questions:
        raise KeyError(f"unknown region {region!r}; regions: {list(world.questions)}")
    rng = random.Random(f"{world.seed}/{seed}/base/{region}")
    tools = make_tools(world)
    names = world.corpus_entities(region)
    rng.shuffle(names)
    docs = ["\n".join(world.paragraph(n) for n in names[i : i + 4]) + "\n" for i in range(0, len(names), 4)]
    questions = world.questions[region]
    n = round(browsing_per_question * len(questions))
    docs += [render(browsing_segments(world, questions[i % len(questions)], rng, tools)) for i in range(n)]
    if include_gold:
        docs += [render(s) for s in gold_episodes(world, region)]
    rng.shuffle(docs)
    return docs
