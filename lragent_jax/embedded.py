"""The embedded default: a small random-weight Llama, a byte tokenizer, three shared-A agents.

Used by `python scripts/generate.py` with no arguments, by tests and by docs. The
weights are random (seeded): the text it writes is noise, the machinery is real.
"""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from .config import ModelConfig, preset
from .lora import LoraWeights, random_adapters
from .model import Llama
from .tokenizer import ByteTokenizer

AGENTS = ("plan", "action", "reflect")
PROMPT = "Question: which city hosted the first modern Olympic Games? Think, act, reflect.\n"
TURNS = (("plan", 24), ("action", 16), ("reflect", 16))


def embedded_config() -> ModelConfig:
    return preset("tiny")


def embedded_model(seed: int = 0, dtype=jnp.float32) -> tuple[Llama, LoraWeights, ByteTokenizer]:
    cfg = embedded_config()
    model = Llama(cfg, dtype=dtype, rngs=nnx.Rngs(seed))
    # Larger B than a freshly trained adapter so the agents visibly differ.
    lora = random_adapters(cfg, AGENTS, rank=8, alpha=16.0, targets=("q", "v"), shared_a=True,
                           seed=seed + 1, b_std=0.2, dtype=dtype)
    return model, lora, ByteTokenizer()
