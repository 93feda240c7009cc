"""Training text from many freshly generated worlds, disjoint from an evaluation world.

One world is small enough for a model to memorise its facts; it then never learns to read the
facts from the wiki observations, and fails on a held-out region whose names are new. Training
on many worlds (a new seed per world, each with its own names and facts) makes memorising
useless: the only way to predict a fact is to copy it from the context.

    worlds = training_world_seeds(eval_seed=0, count=24)
    data = build_training_data(worlds, TRAIN_WORLD_CONFIG, reserved_words=eval_world.name_words(),
                               browsing_per_question=1.0, gold_episodes_total=25_600,
                               solved_templates={"film_director_birth_year", ...}, solved_per_question=1.0)
    data.corpus, data.gold  # base-model documents (str), gold trajectories (segment lists)

The corpus can hold *solved* trajectories: whole gold trajectories rendered as one text, of
questions of chosen templates that are not among the adapters' gold questions (solved_templates).
A base model pre-trained on them is a generalist of the format (like an instruction-tuned model
that already does ReAct); the role adapters then only specialise it (see scripts/train_miniature.py).

Worlds are built in parallel worker processes (one world per task); the result is the same for
any worker count (each world's text depends only on its seed).
"""

from __future__ import annotations

import dataclasses
import multiprocessing
import os
import random
from concurrent.futures import ProcessPoolExecutor

from .episodes import base_corpus, gold_episodes, gold_segments, render
from .tools import make_tools
from .world import REGIONS, WorldConfig, build_world

# One training world: every region is training text (held-out regions of a training world are
# just more fresh entities), ~1.8k entities, ~3.7k questions, ~1.4M corpus tokens at browsing 1.0.
TRAIN_WORLD_CONFIG = WorldConfig(countries=6, cities=40, people=300, organisations=40, films=100, books=100,
                                 heldout_scale=1.0, heldout_min_countries=6)
_SEED_STRIDE = 1_000_003  # training seeds of eval seed s: s * stride + 1, + 2, ... (never s itself)


def training_world_seeds(eval_seed: int, count: int) -> list:
    """`count` world seeds for training, all different from eval_seed and from each other."""
    if count < 1:
        raise ValueError(f"training world count must be >= 1, got {count}")
    seeds = [eval_seed * _SEED_STRIDE + 1 + k for k in range(count)]
    assert eval_seed not in seeds
    return seeds


@dataclasses.dataclass
class TrainingData:
    seeds: list  # the training worlds' seeds, in order
    corpus: list  # base-model documents (str) of all worlds, shuffled
    gold: list  # gold trajectories (segment lists) of all worlds, shuffled
    name_words: frozenset  # every name word the training worlds use
    solved: int = 0  # how many of the corpus documents are solved trajectories


def _one_world(job):
    seed, config, reserved, browsing, gold_count, regions, solved_templates, solved_fraction = job
    world = build_world(seed, config, reserved_words=reserved)
    corpus = []
    for region in regions:
        corpus += base_corpus(world, region=region, browsing_per_question=browsing, seed=seed)
    per_region = -(-gold_count // len(regions))  # split evenly so every region's templates appear
    solved = []
    if solved_templates and solved_fraction > 0:
        tools = make_tools(world)
        for region in regions:
            # never a question whose gold trajectory an adapter trains on (those are the first per_region)
            rest = [q for q in world.questions[region][per_region:] if q.template in solved_templates]
            solved += [render(gold_segments(world, q, tools)) for q in rest[: round(solved_fraction * len(rest))]]
    corpus += solved
    gold = []
    for region in regions:
        if per_region:
            world.questions[region] = world.questions[region][:per_region]  # gold_episodes runs a whole split
            gold += gold_episodes(world, region)
    return corpus, gold, world.name_words(regions), len(solved)


def build_training_data(seeds, config: WorldConfig = TRAIN_WORLD_CONFIG, *, reserved_words=(),
                        browsing_per_question: float = 1.0, gold_episodes_total: int = 0,
                        regions=REGIONS, workers: int | None = None, shuffle_seed: int = 0,
                        solved_templates=(), solved_per_question: float = 0.0) -> TrainingData:
    """Base corpus and gold trajectories of the worlds `seeds` (all `regions` of each), about
    gold_episodes_total gold trajectories spread evenly over the worlds. No name word of
    reserved_words appears in any training world (raises if one did).

    solved_templates / solved_per_question: the corpus also holds the rendered gold trajectory
    of that fraction of each region's questions of those templates, never one of the gold
    questions (the adapters' data), so the base model and the adapters see different questions."""
    seeds = list(seeds)
    reserved = frozenset(w.lower() for w in reserved_words)
    solved_templates = frozenset(solved_templates)
    if not 0.0 <= solved_per_question <= 1.0:
        raise ValueError(f"solved_per_question must be in [0, 1], got {solved_per_question}")
    per_world = -(-gold_episodes_total // len(seeds)) if gold_episodes_total else 0
    jobs = [(s, config, reserved, browsing_per_question, per_world, tuple(regions), solved_templates,
             float(solved_per_question)) for s in seeds]
    workers = min(len(jobs), workers or os.cpu_count() or 1)
    if workers > 1:
        # spawn, not fork: the caller may have started JAX's threads already
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            results = list(pool.map(_one_world, jobs))
    else:
        results = [_one_world(j) for j in jobs]
    corpus = [d for c, _, _, _ in results for d in c]
    gold = [g for _, gs, _, _ in results for g in gs]
    words = frozenset().union(*(w for _, _, w, _ in results))
    clash = words & reserved
    if clash:
        raise RuntimeError(f"training worlds use {len(clash)} reserved name words, e.g. {sorted(clash)[:3]}")
    # one generator each: the gold order does not depend on how many corpus documents there are
    random.Random(f"multiworld/{shuffle_seed}").shuffle(corpus)
    random.Random(f"multiworld/{shuffle_seed}/gold").shuffle(gold)
    return TrainingData(seeds, corpus, gold, words, solved=sum(n for *_, n in results))
