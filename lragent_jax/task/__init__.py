"""The agent task the miniature model is trained and evaluated on: multi-hop questions over a
synthetic world, answered with wiki / calc tools by plan, action and reflect agents.

world.py (entities, questions, splits) -> tools.py (wiki, calc, action parser) -> episodes.py
(trajectory text, gold trajectories by role, base corpus) -> tokenizer.py (BPE, encoding by
segment) -> loop.py (run_episode / run_episodes on a Session, scoring).
"""

from .episodes import AGENT_ROLES, ROLES, base_corpus, gold_episodes, gold_segments, render
from .loop import EpisodeResult, run_episode, run_episodes, score
from .multiworld import TRAIN_WORLD_CONFIG, TrainingData, build_training_data, training_world_seeds
from .tokenizer import encode_episodes, encode_segments, examples_by_role, newline_id, train_tokenizer
from .tools import calc, execute, make_tools, parse_action
from .world import SMALL_CONFIG, Question, World, WorldConfig, build_world

__all__ = [
    "AGENT_ROLES", "ROLES", "base_corpus", "gold_episodes", "gold_segments", "render", "EpisodeResult",
    "run_episode", "run_episodes", "score", "TRAIN_WORLD_CONFIG", "TrainingData", "build_training_data",
    "training_world_seeds", "encode_episodes", "encode_segments", "examples_by_role", "newline_id", "train_tokenizer", "calc",
    "execute", "make_tools", "parse_action", "SMALL_CONFIG", "Question", "World", "WorldConfig", "build_world",
]
