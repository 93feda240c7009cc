"""What the command-line scripts share: one-line usage errors and model + agents loading.

Every script reports bad input as one line on stderr with exit code 2 (never a traceback):
they raise UsageError and catch it in main().
"""

from __future__ import annotations

import argparse

from .config import PARAM_DTYPES

DTYPES = PARAM_DTYPES  # --dtype choices: what load_model accepts
EMBEDDED_NAME = "embedded-tiny-random"


class UsageError(Exception):
    """Bad input: reported as one line on stderr, exit code 2."""


def strict_parser(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """argparse errors raise UsageError instead of printing usage and exiting."""

    def error(message):
        raise UsageError(message)

    parser.error = error
    return parser


def int_list(text: str, what: str) -> list[int]:
    """'1,2,3' -> [1, 2, 3]; anything else is a UsageError naming the flag."""
    try:
        return [int(x) for x in text.split(",") if x.strip() != ""]
    except ValueError:
        raise UsageError(f"{what} must be comma-separated integers, got {text!r}") from None


def positive_int_list(text: str, what: str) -> list[int]:
    """int_list with at least one value, every one >= 1."""
    vals = int_list(text, what)
    if not vals or min(vals) < 1:
        raise UsageError(f"{what} must be comma-separated integers >= 1, got {text!r}")
    return vals


MESH_HELP = ("devices to shard over: data=D (independent trajectories), model=M (tensor parallel: heads and "
             "MLP columns), e.g. model=2 or data=2,model=4; default: one device. Several hosts: call "
             "jax.distributed.initialize() first (README)")


def add_mesh_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--mesh", default=None, metavar="data=D,model=M", help=MESH_HELP)


def parse_mesh(spec, batch: int = 1):
    """--mesh -> a jax.sharding.Mesh, or None (one device). `batch`: the trajectories the script
    runs at once, which the data axis must divide. Bad specs are UsageErrors."""
    if spec is None:
        return None
    from .sharding import ShardingError, mesh_from_spec, parse_mesh_spec

    try:
        data = parse_mesh_spec(spec)["data"]
        if batch % data:
            raise UsageError(f"--mesh {spec}: data={data} splits a batch of trajectories, and this runs {batch}; "
                             f"use model=M alone")
        return mesh_from_spec(spec)
    except ShardingError as e:
        raise UsageError(str(e)) from None


def parse_adapter_specs(specs) -> dict:
    """['plan=./plan', ...] -> {'plan': './plan', ...}."""
    adapters = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise UsageError(f"--adapter expects NAME=PATH, got {spec!r}")
        if name in adapters:
            raise UsageError(f"--adapter {name!r} given twice")
        adapters[name] = path
    return adapters


def load_agents(model_path, adapter_specs, dtype_name=None, seed: int = 0):
    """The model, its agents' adapters and tokenizer: the embedded demo when model_path is None.

    Returns (model, lora or None, tokenizer or None, model name, random_weights).
    """
    import jax.numpy as jnp

    adapters = parse_adapter_specs(adapter_specs)
    if model_path is None:
        if adapters:
            raise UsageError("--adapter needs --model (the embedded demo has its own agents)")
        from . import embedded

        model, lora, tokenizer = embedded.embedded_model(seed, dtype=jnp.dtype(dtype_name or "float32"))
        return model, lora, tokenizer, EMBEDDED_NAME, True
    from . import loading

    dtype = jnp.dtype(dtype_name or "bfloat16")
    model = loading.load_model(model_path, dtype=dtype)
    lora = loading.load_adapters(adapters, model, dtype=dtype) if adapters else None
    return model, lora, loading.load_tokenizer(model_path), model_path, False
