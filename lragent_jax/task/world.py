"""A seeded synthetic world (people, cities, countries, organisations, films, books) and
multi-hop questions over it, with their gold chains of tool calls.

    world = build_world(seed=0)
    world.questions["test"][0]      # Question(text, answer, hops, ...)
    world.paragraph("Velora Nights")  # what wiki[Velora Nights] returns

The world is split into three self-contained regions ("train", "validation", "test"):
relations never cross regions, so questions of the held-out regions are about entities
(and facts) that no training text mentions; only the wiki tool knows them. Names are built
from syllables, so a tokenizer splits them into several pieces and cannot memorise them.

Same seed and config -> the same world, paragraphs and questions (a private
random.Random(seed) drives everything; no global state, no hash-order dependence).
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Mapping

REGIONS = ("train", "validation", "test")
KINDS = ("country", "city", "person", "organisation", "film", "book")

# One sentence per fact. The wiki paragraphs and the plan agent's thoughts both use these,
# so a thought quotes the observation's sentence word for word.
FACT_SENTENCES: Mapping[str, str] = {
    "birth_year": "{s} is {occupation} born in the year {v}.",
    "born_in": "{s} was born in the city of {v}.",
    "located_in": "{s} is a city in {v}.",
    "city_founded": "{s} was founded in {v}.",
    "population": "{s} has a population of {v}.",
    "capital": "{s} is a country whose capital is {v}.",
    "org_founded": "{s} is an organisation founded in {v}.",
    "founded_by": "{s} was founded by {v}.",
    "based_in": "{s} is based in {v}.",
    "film_year": "{s} is a film released in {v}.",
    "directed_by": "{s} was directed by {v}.",
    "produced_by": "{s} was produced by {v}.",
    "book_year": "{s} is a book published in {v}.",
    "written_by": "{s} was written by {v}.",
}
# Facts seen from the other end (they belong to the object's paragraph).
REVERSE_SENTENCES: Mapping[str, str] = {
    "directed_by": "{v} directed {s}.",
    "written_by": "{v} wrote {s}.",
    "founded_by": "{v} founded {s}.",
    "produced_by": "{v} produced {s}.",
}
# The intro sentence of each kind (first in its paragraph).
INTRO_FACT = {"person": "birth_year", "city": "located_in", "country": "capital", "organisation": "org_founded",
              "film": "film_year", "book": "book_year"}
PARAGRAPH_SENTENCES = 8  # own facts + distractors; bounds the observation length

_ONSETS = ("b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "dr", "kr", "st", "tr",
           "th", "sh", "gl", "pl", "h")
_VOWELS = ("a", "e", "i", "o", "u", "ai", "ei", "ou", "ia")
_CODAS = ("", "", "", "n", "r", "l", "s", "th", "m")
_WORK_NOUNS = ("Letters", "Garden", "River", "Winter", "Machine", "Voyage", "Harbour", "Silence", "Crown",
               "Mirror", "Orchard", "Lantern", "Tide", "Engine", "Storm", "Bridge")
_ORG_KINDS = ("Institute", "Guild", "Company", "Society", "Foundation", "Studios", "Works", "Trust")
_OCCUPATIONS = ("painter", "engineer", "physician", "architect", "chemist", "sailor")


@dataclasses.dataclass(frozen=True)
class WorldConfig:
    """Entities per region. The held-out regions are smaller than the training one."""

    countries: int = 24
    cities: int = 200
    people: int = 2000
    organisations: int = 280
    films: int = 720
    books: int = 720
    heldout_scale: float = 0.15  # validation and test regions hold this fraction of each count
    heldout_min_countries: int = 6  # so a country answer is not a guess among two or three

    def counts(self, region: str) -> dict:
        keys = ("countries", "cities", "people", "organisations", "films", "books")
        if region == "train":
            return {k: getattr(self, k) for k in keys}
        out = {k: max(2, round(getattr(self, k) * self.heldout_scale)) for k in keys}
        out["countries"] = max(out["countries"], self.heldout_min_countries)
        return out


SMALL_CONFIG = WorldConfig(countries=4, cities=16, people=120, organisations=20, films=40, books=40,
                           heldout_scale=0.5, heldout_min_countries=2)  # for tests


@dataclasses.dataclass
class Entity:
    name: str
    kind: str
    region: str
    facts: dict  # relation -> value (str for names, int for numbers); see FACT_SENTENCES

    def sentence(self, relation: str) -> str:
        return fact_sentence(self, relation)


def fact_sentence(entity: Entity, relation: str) -> str:
    job = entity.facts.get("occupation", "")
    article = "an" if job[:1] in "aeiou" else "a"
    return FACT_SENTENCES[relation].format(s=entity.name, v=entity.facts[relation], occupation=f"{article} {job}")


@dataclasses.dataclass(frozen=True)
class Hop:
    """One gold tool call and what its observation gives.

    tool "wiki": arg is the entity; facts are the relations read from its paragraph (the first
    one names the next entity or the value). tool "calc": arg is the expression; value its result.
    """

    tool: str
    arg: str
    facts: tuple = ()  # relations read from the observation (wiki)
    value: str = ""  # the value this hop contributes (next entity, number, or answer)
    need: str = ""  # what the agent looks for before this call (a relation name, or "calc")


@dataclasses.dataclass(frozen=True)
class Question:
    text: str
    answer: str
    template: str
    region: str
    subject: str
    hops: tuple  # of Hop, in order

    @property
    def num_hops(self) -> int:
        return len(self.hops)


class World:
    """Entities by name, their wiki paragraphs, and the questions of each split."""

    def __init__(self, seed: int, config: WorldConfig, entities: dict, questions: dict):
        self.seed = seed
        self.config = config
        self.entities = entities
        self.questions = questions  # split -> list[Question]
        self._paragraphs: dict = {}
        self._by_region_kind: dict = {}
        for e in entities.values():
            self._by_region_kind.setdefault((e.region, e.kind), []).append(e)
        self._related = _reverse_index(entities)

    def region_entities(self, region: str, kind: str | None = None) -> list:
        if kind is not None:
            return list(self._by_region_kind.get((region, kind), []))
        return [e for e in self.entities.values() if e.region == region]

    def own_sentences(self, name: str) -> list:
        """The entity's facts: its intro, its other facts, then facts that point to it."""
        e = self.entities[name]
        intro = INTRO_FACT[e.kind]
        out = [e.sentence(intro)]
        out += [e.sentence(r) for r in FACT_SENTENCES if r != intro and r in e.facts]
        for rel, other in self._related.get(name, ()):
            if rel in REVERSE_SENTENCES:
                out.append(REVERSE_SENTENCES[rel].format(s=other, v=name))
        return out

    def paragraph(self, name: str) -> str:
        """The entity's intro first, then up to PARAGRAPH_SENTENCES sentences in a fixed shuffled
        order: its own facts and distractors (facts of neighbouring and random same-region
        entities). Deterministic per (seed, name)."""
        if name in self._paragraphs:
            return self._paragraphs[name]
        e = self.entities[name]
        rng = random.Random(f"{self.seed}/paragraph/{name}")
        own = self.own_sentences(name)
        intro, rest = own[0], own[1:]
        # Neighbours: entities this one names, and entities that name it.
        neighbours = [v for r, v in e.facts.items() if isinstance(v, str) and v in self.entities]
        neighbours += [o for _, o in self._related.get(name, ())]
        same_kind = self._by_region_kind[(e.region, e.kind)]
        neighbours += [x.name for x in rng.sample(same_kind, min(3, len(same_kind)))]
        pool = []
        for n in dict.fromkeys(neighbours):  # ordered, deduplicated
            if n == name:
                continue
            other = self.entities[n]
            pool += [other.sentence(r) for r in FACT_SENTENCES if r in other.facts]
        own_set = set(own)
        pool = [s for s in dict.fromkeys(pool) if s not in own_set and not s.startswith(name + " ")]
        room = max(0, PARAGRAPH_SENTENCES - 1 - len(rest))
        body = rest[: PARAGRAPH_SENTENCES - 1] + rng.sample(pool, min(room, len(pool)))
        rng.shuffle(body)
        text = " ".join([intro] + body)
        self._paragraphs[name] = text
        return text

    def corpus_entities(self, region: str = "train") -> list:
        return sorted(e.name for e in self.entities.values() if e.region == region)

    def name_words(self, regions=REGIONS) -> frozenset:
        """The lower-cased syllable words of the entity names of `regions` (not "The", the
        work nouns or organisation kinds): what build_world(reserved_words=...) keeps out."""
        return frozenset(w.lower() for e in self.entities.values() if e.region in regions
                         for w in e.name.split() if w not in _RESERVED)


def _reverse_index(entities: dict) -> dict:
    rev: dict = {}
    for e in entities.values():
        for rel, v in e.facts.items():
            if rel in REVERSE_SENTENCES and isinstance(v, str):
                rev.setdefault(v, []).append((rel, e.name))
    return rev


# ---- generation -----------------------------------------------------------------------------
class _Names:
    """Syllable words, each used once in the whole world: a word names exactly one entity,
    so no name is a part of another and a sentence's subject is never ambiguous."""

    def __init__(self, rng: random.Random, reserved_words=()):
        self.rng = rng
        self.used: set = {w.lower() for w in reserved_words}  # words another world owns

    def word(self, lo: int, hi: int) -> str:
        r = self.rng
        for _ in range(1000):
            w = "".join(r.choice(_ONSETS) + r.choice(_VOWELS) + r.choice(_CODAS)
                        for _ in range(r.randint(lo, hi))).capitalize()
            if w.lower() not in self.used and w not in _RESERVED:
                self.used.add(w.lower())
                return w
        raise RuntimeError("syllable name space exhausted; use fewer entities")


_RESERVED = frozenset(("The",)) | frozenset(_WORK_NOUNS) | frozenset(_ORG_KINDS)


def _build_region(region: str, counts: dict, rng: random.Random, names: _Names) -> dict:
    ents: dict = {}

    def add(name, kind, **facts):
        ents[name] = Entity(name, kind, region, facts)
        return ents[name]

    countries = [add(names.word(2, 3), "country") for _ in range(counts["countries"])]
    cities = []
    for i in range(counts["cities"]):
        country = countries[i % len(countries)]  # every country gets a city (its capital)
        c = add(names.word(2, 3), "city", located_in=country.name,
                city_founded=rng.randint(800, 1800), population=rng.randint(2_000, 4_000_000))
        cities.append(c)
        country.facts.setdefault("capital", c.name)
    people = []
    for _ in range(counts["people"]):
        name = f"{names.word(1, 2)} {names.word(2, 3)}"
        people.append(add(name, "person", birth_year=rng.randint(1800, 1985), born_in=rng.choice(cities).name,
                          occupation=rng.choice(_OCCUPATIONS)))
    roles: dict = {}

    def pick_person(role: str, lo: int, hi: int):
        """A person with < 3 works of this role whose work year birth + 25..70 lands in [lo, hi]."""
        for _ in range(200):
            p = rng.choice(people)
            year = p.facts["birth_year"] + rng.randint(25, 70)
            if lo <= year <= hi and roles.get((p.name, role), 0) < 3:
                roles[(p.name, role)] = roles.get((p.name, role), 0) + 1
                if not any(k[0] == p.name for k in roles if k != (p.name, role)):
                    p.facts["occupation"] = role
                return p, year
        raise RuntimeError(f"region {region!r}: no person fits a {role} working in {lo}..{hi}; add people")

    orgs = []
    for _ in range(counts["organisations"]):
        founder, year = pick_person("founder", 1830, 2015)
        name = f"{names.word(2, 3)} {rng.choice(_ORG_KINDS)}"
        orgs.append(add(name, "organisation", org_founded=year, founded_by=founder.name,
                        based_in=rng.choice(cities).name))
    for _ in range(counts["films"]):
        director, year = pick_person("director", 1900, 2024)
        producers = [o for o in orgs if o.facts["org_founded"] <= year]
        producer = rng.choice(producers or orgs)
        name = f"The {names.word(2, 3)} {rng.choice(_WORK_NOUNS)}"
        add(name, "film", film_year=year, directed_by=director.name, produced_by=producer.name)
    for _ in range(counts["books"]):
        author, year = pick_person("writer", 1820, 2024)
        name = f"{names.word(2, 3)} {rng.choice(_WORK_NOUNS)}"
        add(name, "book", book_year=year, written_by=author.name)
    return ents


# ---- questions --------------------------------------------------------------------------------
def _wiki(e: Entity, *facts) -> Hop:
    return Hop("wiki", e.name, tuple(facts), str(e.facts[facts[0]]), need=facts[0])


def _calc(a: int, b: int) -> Hop:
    return Hop("calc", f"{a} - {b}", (), str(a - b), need="calc")


def _questions_for(e: Entity, ents: dict) -> list:
    """(template, text, hops) for every template that applies to entity e."""
    out = []
    get = ents.__getitem__
    if e.kind == "film":
        d = get(e.facts["directed_by"])
        c = get(d.facts["born_in"])
        o = get(e.facts["produced_by"])
        f = get(o.facts["founded_by"])
        out += [
            ("film_director_birth_year", f"In which year was the director of {e.name} born?",
             (_wiki(e, "directed_by"), _wiki(d, "birth_year"))),
            ("film_director_birth_country", f"In which country was the director of {e.name} born?",
             (_wiki(e, "directed_by"), _wiki(d, "born_in"), _wiki(c, "located_in"))),
            ("film_director_age", f"How old was the director of {e.name} when the film was released?",
             (_wiki(e, "film_year", "directed_by"), _wiki(d, "birth_year"),
              _calc(e.facts["film_year"], d.facts["birth_year"]))),
            ("film_producer_founder_birth_year",
             f"In which year was the founder of the organisation that produced {e.name} born?",
             (_wiki(e, "produced_by"), _wiki(o, "founded_by"), _wiki(f, "birth_year"))),
            ("film_producer_founder_age",
             f"How old was the founder of the organisation that produced {e.name} when the film was released?",
             (_wiki(e, "film_year", "produced_by"), _wiki(o, "founded_by"), _wiki(f, "birth_year"),
              _calc(e.facts["film_year"], f.facts["birth_year"]))),
        ]
    elif e.kind == "book":
        a = get(e.facts["written_by"])
        c = get(a.facts["born_in"])
        out += [
            ("book_author_birth_city", f"In which city was the author of {e.name} born?",
             (_wiki(e, "written_by"), _wiki(a, "born_in"))),
            ("book_author_city_population",
             f"What is the population of the city where the author of {e.name} was born?",
             (_wiki(e, "written_by"), _wiki(a, "born_in"), _wiki(c, "population"))),
            ("book_after_city_founding",
             f"How many years after the founding of the birth city of the author of {e.name} was the book published?",
             (_wiki(e, "book_year", "written_by"), _wiki(a, "born_in"), _wiki(c, "city_founded"),
              _calc(e.facts["book_year"], c.facts["city_founded"]))),
        ]
    elif e.kind == "organisation":
        p = get(e.facts["founded_by"])
        bc = get(e.facts["based_in"])
        pc = get(p.facts["born_in"])
        out += [
            ("org_country", f"In which country is {e.name} based?",
             (_wiki(e, "based_in"), _wiki(bc, "located_in"))),
            ("org_founder_age", f"How many years passed between the birth of the founder of {e.name} and its founding?",
             (_wiki(e, "org_founded", "founded_by"), _wiki(p, "birth_year"),
              _calc(e.facts["org_founded"], p.facts["birth_year"]))),
            ("org_founder_birth_country", f"In which country was the founder of {e.name} born?",
             (_wiki(e, "founded_by"), _wiki(p, "born_in"), _wiki(pc, "located_in"))),
        ]
    elif e.kind == "person":
        c = get(e.facts["born_in"])
        out += [
            ("person_birth_city_population", f"What is the population of the city where {e.name} was born?",
             (_wiki(e, "born_in"), _wiki(c, "population"))),
        ]
    return out


def _make_questions(ents: dict, region: str) -> list:
    qs = []
    for e in ents.values():
        if e.region != region:
            continue
        for template, text, hops in _questions_for(e, ents):
            qs.append(Question(text=text, answer=hops[-1].value, template=template, region=region,
                               subject=e.name, hops=hops))
    return qs


def build_world(seed: int = 0, config: WorldConfig | None = None, *, reserved_words=()) -> World:
    """The world of `seed`: three regions, their entities, and one question list per region
    (train questions over the train region, validation and test over their own held-out regions).
    No entity name uses a word of `reserved_words` (e.g. another world's name_words()), so a
    training world can be kept disjoint from an evaluation world."""
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise ValueError(f"world seed must be an int, got {seed!r}")
    config = config or WorldConfig()
    rng = random.Random(seed)
    names = _Names(rng, reserved_words)
    entities: dict = {}
    for region in REGIONS:
        entities.update(_build_region(region, config.counts(region), rng, names))
    questions = {}
    for region in REGIONS:
        qs = _make_questions(entities, region)
        random.Random(f"{seed}/questions/{region}").shuffle(qs)
        questions[region] = qs
    return World(seed, config, entities, questions)
