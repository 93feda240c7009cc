"""Shared pytest fixtures: tiny HF models and PEFT adapters on disk (built once per session)."""

from __future__ import annotations

import os
import sys

import jax
import pytest


from hf_fixtures import AGENTS, MODEL_KINDS, make_adapters, make_model  # noqa: E402

# CPU compile time dominates the suite. Tests build several Engines over same-shaped models,
# whose programs are identical: a persistent compilation cache compiles each program once.
jax.config.update("jax_compilation_cache_dir",
                  os.environ.get("LRAGENT_TEST_JAX_CACHE",
                                 os.path.join(os.path.dirname(os.path.dirname(__file__)), ".pytest_cache", "jax")))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


@pytest.fixture(scope="session")
def hf_case_factory(tmp_path_factory):
    """kind -> {"model": folder, "adapters": {agent: folder}, "shared_adapters": {...}}, cached.

    Each kind gets three q/v rank-8 adapters with independent A and three with a shared A.
    """
    cache: dict = {}

    def get(kind: str) -> dict:
        if kind not in cache:
            root = tmp_path_factory.mktemp(f"hf_{kind}")
            model = make_model(str(root / "model"), kind, seed=MODEL_KINDS.index(kind))
            cache[kind] = {
                "model": model,
                "adapters": make_adapters(model, str(root / "adapters"), AGENTS, seed=100),
                "shared_adapters": make_adapters(model, str(root / "shared"), AGENTS, seed=200, shared_a=True),
            }
        return cache[kind]

    return get


@pytest.fixture(scope="session", params=MODEL_KINDS)
def hf_case(request, hf_case_factory):
    """Each tiny model kind in turn (llama GQA, llama3-rope tied, mistral) with its adapters."""
    return {"kind": request.param, **hf_case_factory(request.param)}


@pytest.fixture(scope="session")
def llama_case(hf_case_factory):
    return {"kind": "llama", **hf_case_factory("llama")}


@pytest.fixture(scope="session")
def varied_model_folder(tmp_path_factory):
    """An HF checkpoint folder of tests/scheme_reference.py's 4-layer model (GQA, Llama-3.1 rope
    scaling), whose greedy outputs vary from token to token (unlike Llama(preset("tiny")), whose
    0.02-std init repeats one token per turn). Load with lragent_jax.loading.load_model."""
    import scheme_reference

    folder = str(tmp_path_factory.mktemp("varied_model") / "model")
    weights = scheme_reference.make_weights(scheme_reference.CONFIG, seed=scheme_reference.WEIGHT_SEED)
    return scheme_reference.write_model(folder, scheme_reference.CONFIG, weights)

