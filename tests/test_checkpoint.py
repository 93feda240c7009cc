"""Session checkpoints: save / restore continue token for token; writes are atomic; a checkpoint
refuses an engine with a different model, adapters or scheme. Tiny random model, float32."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx

from lragent_jax.checkpoint import CheckpointError
from lragent_jax.config import preset
from lragent_jax.engine import Engine
from lragent_jax.lora import random_adapters
from lragent_jax.model import Llama
from lragent_jax.schemes import SCHEMES
from lragent_jax.session import Session

MAX_LEN = 256


@pytest.fixture(scope="module")
def cfg():
    return preset("tiny")


@pytest.fixture(scope="module")
def model(cfg):
    return Llama(cfg, dtype=jnp.float32, rngs=nnx.Rngs(0))


@pytest.fixture(scope="module")
def engine(cfg, model):
    return Engine(model, random_adapters(cfg, seed=1, b_std=0.3))


def history(engine, scheme, **kw):
    s = Session(engine, scheme, max_len=MAX_LEN, stop_ids=(), seed=7, **kw)
    s.append(list(range(3, 40)))
    s.generate("plan", 4)  # sampled: the RNG position matters
    s.append([11, 12, 13])
    s.generate("action", 3, temperature=0.8, top_k=20)
    return s


def next_turns(s):
    out = [s.generate("reflect", 4, temperature=0.9)]
    s.append([21, 22])
    out.append(s.generate("plan", 3))
    out.append(s.generate("action", 3, greedy=True))
    return out


@pytest.mark.parametrize("scheme", SCHEMES)
def test_restored_session_continues_token_identically(engine, scheme, tmp_path):
    s = history(engine, scheme)
    s.save(tmp_path / "ckpt")
    r = Session.restore(tmp_path / "ckpt", engine)
    assert r.scheme_name == s.scheme_name and r.trajectory == s.trajectory and r.turns == s.turns
    before, after = s.scheme.state(), r.scheme.state()
    assert before.keys() == after.keys()
    for k in before:  # every cache array and count, whole (not only the valid slots)
        for x, y in zip(jax.tree.leaves(before[k]), jax.tree.leaves(after[k]), strict=True):
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=k)
    assert next_turns(r) == next_turns(s)
    # Saving over an existing checkpoint replaces it.
    s.save(tmp_path / "ckpt")
    assert Session.restore(tmp_path / "ckpt", engine).trajectory == s.trajectory


def _interrupt_finalize(monkeypatch):
    """Make orbax fail after every item is written, just before it renames the temp folder."""
    from orbax.checkpoint._src.path import atomicity

    async def interrupted(self, *a, **k):
        raise KeyboardInterrupt("simulated interruption before finalize")

    monkeypatch.setattr(atomicity.AtomicRenameTemporaryPath, "finalize", interrupted)


def test_interrupted_save_is_never_visible(engine, tmp_path, monkeypatch):
    s = history(engine, "full_shared")
    target = tmp_path / "ckpt"
    with monkeypatch.context() as m:
        _interrupt_finalize(m)
        with pytest.raises(KeyboardInterrupt):
            s.save(target)
    assert not target.exists()
    assert os.listdir(tmp_path) == []  # no temp folder left behind either

    s.save(target)  # a complete checkpoint, then an interrupted save over it
    saved = [list(t) for t in s.trajectory]
    s.generate("plan", 3)
    with monkeypatch.context() as m:
        _interrupt_finalize(m)
        with pytest.raises(KeyboardInterrupt):
            s.save(target)
    assert os.listdir(tmp_path) == ["ckpt"]
    assert Session.restore(target, engine).trajectory == saved


def test_interrupted_swap_keeps_the_previous_checkpoint(engine, tmp_path, monkeypatch):
    """An interruption after the new checkpoint is complete but before it is moved in."""
    import lragent_jax.checkpoint as ck

    s = history(engine, "non_shared")
    target = tmp_path / "ckpt"
    s.save(target)
    saved = [list(t) for t in s.trajectory]
    s.generate("plan", 2)
    real_rename = os.rename

    def rename(src, dst):
        if str(src) == str(target):
            raise KeyboardInterrupt("simulated interruption before the swap")
        return real_rename(src, dst)

    monkeypatch.setattr(ck.os, "rename", rename)
    with pytest.raises(KeyboardInterrupt):
        s.save(target)
    monkeypatch.undo()
    assert Session.restore(target, engine).trajectory == saved


def _one_line_error(path, engine, match, **kw):
    with pytest.raises(CheckpointError, match=match) as info:
        Session.restore(path, engine, **kw)
    assert "\n" not in str(info.value) and str(path) in str(info.value)


def test_restore_refuses_a_different_model_adapters_or_scheme(cfg, model, engine, tmp_path):
    path = tmp_path / "ckpt"
    history(engine, "base_shared").save(path)
    other_model = Engine(Llama(cfg, dtype=jnp.float32, rngs=nnx.Rngs(99)), random_adapters(cfg, seed=1, b_std=0.3))
    _one_line_error(path, other_model, "model weights of fingerprint")
    other_adapters = Engine(model, random_adapters(cfg, seed=2, b_std=0.3))
    _one_line_error(path, other_adapters, "adapter 'plan' of fingerprint")
    bigger = preset("tiny")
    import dataclasses

    wider = Engine(Llama(dataclasses.replace(bigger, num_layers=bigger.num_layers + 1), dtype=jnp.float32,
                         rngs=nnx.Rngs(0)), None)
    _one_line_error(path, wider, "num_layers")
    _one_line_error(path, engine, "scheme base_shared but restore asked for full_shared", scheme="full_shared")
    assert Session.restore(path, engine, scheme="bs").scheme_name == "base_shared"


def test_restore_refuses_what_is_not_a_checkpoint(engine, tmp_path):
    _one_line_error(tmp_path, engine, "not a session checkpoint")
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(CheckpointError, match="is not a session checkpoint; refusing to overwrite"):
        history(engine, "full_shared").save(tmp_path)
    assert (tmp_path / "notes.txt").read_text() == "mine"
