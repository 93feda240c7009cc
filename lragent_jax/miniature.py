"""The shipped miniature: a small trained Llama and its plan / action / reflect LoRA adapters.

scripts/train_miniature.py builds it (world -> tokenizer -> base model -> adapters) and
`--install` copies the result here. Layout of an asset folder:

    base/                       config.json, model.safetensors, tokenizer.json, tokenizer_config.json
    adapters_shared/{plan,action,reflect}/        PEFT folders, one A per projection for all three
    adapters_independent/{plan,action,reflect}/   PEFT folders, each adapter its own A
    train_log.json              hyper-parameters, losses, times, and the world's seed and config
    loss.png

    model, lora, tokenizer, world = load_miniature("shared")
"""

from __future__ import annotations

import dataclasses
import json
import os

import jax.numpy as jnp

__all__ = ["ASSET_DIR", "ENV_VAR", "FLAVOURS", "AGENTS", "MiniatureMissing", "asset_dir", "assets_built",
           "load_miniature", "miniature_world", "read_train_log", "world_record"]

ASSET_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "miniature")
ENV_VAR = "LRAGENT_MINIATURE_DIR"  # another asset folder (e.g. a fresh train_miniature.py --out)
FLAVOURS = ("shared", "independent")
AGENTS = ("plan", "action", "reflect")
REQUIRED = ("base/config.json", "base/model.safetensors", "base/tokenizer.json", "train_log.json")


class MiniatureMissing(FileNotFoundError):
    """The miniature's files are not in the folder (not built yet, or a partial copy)."""


def _missing(folder: str) -> list:
    need = list(REQUIRED) + [f"adapters_{f}/{a}/adapter_model.safetensors" for f in FLAVOURS for a in AGENTS]
    return [n for n in need if not os.path.isfile(os.path.join(folder, n))]


def asset_dir() -> str:
    """The miniature's folder: $LRAGENT_MINIATURE_DIR if set, else the package's assets."""
    return os.environ.get(ENV_VAR) or ASSET_DIR


def assets_built(folder: str | None = None) -> bool:
    """True when `folder` (default: asset_dir()) holds a complete miniature."""
    return not _missing(folder or asset_dir())


def _check(folder: str) -> None:
    missing = _missing(folder)
    if missing:
        raise MiniatureMissing(f"miniature assets not built: {folder} lacks {missing[0]}"
                               + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
                               + "; run scripts/train_miniature.py --install")


def read_train_log(folder: str | None = None) -> dict:
    folder = folder or asset_dir()
    _check(folder)
    with open(os.path.join(folder, "train_log.json")) as f:
        return json.load(f)


def miniature_world(folder: str | None = None):
    """The task world the miniature was trained on, regenerated from its recorded seed and config."""
    from .task.world import WorldConfig, build_world

    world = read_train_log(folder)["world"]
    return build_world(int(world["seed"]), WorldConfig(**world["config"]))


def load_miniature(flavour: str = "shared", dtype=jnp.float32, folder: str | None = None):
    """(model, lora, tokenizer, world) of the miniature.

    flavour: "shared" (shared-A adapters: base_lr_shared serves them as they are) or
      "independent" (each adapter its own A: base_lr_shared needs share_a first).
    folder: an asset folder (default: asset_dir(): $LRAGENT_MINIATURE_DIR, else the package's,
      lragent_jax/assets/miniature). A missing or partial folder raises MiniatureMissing (one line).
    """
    from .loading import load_adapters, load_model, load_tokenizer

    if flavour not in FLAVOURS:
        raise ValueError(f"miniature flavour {flavour!r}; allowed: {FLAVOURS}")
    folder = folder or asset_dir()
    _check(folder)
    base = os.path.join(folder, "base")
    model = load_model(base, dtype=dtype)
    lora = load_adapters({a: os.path.join(folder, f"adapters_{flavour}", a) for a in AGENTS}, model, dtype=dtype)
    return model, lora, load_tokenizer(base), miniature_world(folder)


def world_record(world) -> dict:
    """What train_log.json records so miniature_world can rebuild `world`."""
    return {"seed": world.seed, "config": dataclasses.asdict(world.config)}
