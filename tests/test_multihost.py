"""Several processes (jax.distributed): every device->host read goes through sharding.to_host.

On a mesh spanning several processes a jitted output is not fully addressable (each process holds
its own devices' shards) and np.asarray on it raises. sharding.to_host gathers such an array with
process_allgather and takes np.asarray alone otherwise. Here:

  - to_host on fully addressable arrays (and numpy / lists) equals np.asarray and never calls
    process_allgather (the one-device path stays as fast);
  - a Session's turns (generate with some rows, generate_concurrent + adopt, score) read every
    jitted output through to_host: reading a jax array's value anywhere else fails the test, as it
    would on several processes;
  - (slow) two CPU processes joined by jax.distributed.initialize (gloo collectives; one device
    each, tests/multihost_checks.py) run a batch-2 Session over the data=2 mesh spanning both:
    each gathers the whole array and gets its one-device run's greedy tokens and score logits.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax._src import array as jax_array
from jax.experimental import multihost_utils

from lragent_jax import sharding
from lragent_jax.config import preset
from lragent_jax.engine import Engine
from lragent_jax.lora import random_adapters
from lragent_jax.model import Llama
from lragent_jax.session import Session

HERE = os.path.dirname(os.path.abspath(__file__))


def test_to_host_of_addressable_arrays_is_np_asarray(monkeypatch):
    def no_gather(*a, **k):
        raise AssertionError("process_allgather called on a fully addressable array")

    monkeypatch.setattr(multihost_utils, "process_allgather", no_gather)
    x = jnp.arange(12, dtype=jnp.int32).reshape(3, 4) * 3
    got = sharding.to_host(x)
    assert isinstance(got, np.ndarray) and got.dtype == np.int32
    np.testing.assert_array_equal(got, np.arange(12).reshape(3, 4) * 3)
    assert sharding.to_host(x, np.int64).dtype == np.int64
    logits = jax.random.normal(jax.random.key(0), (2, 5))
    np.testing.assert_array_equal(sharding.to_host(logits), np.asarray(logits))
    for host in (np.array([1.5, 2.5]), [4, 5, 6]):  # not jax arrays: np.asarray as before
        np.testing.assert_array_equal(sharding.to_host(host), np.asarray(host))


_METADATA = {"shape", "ndim", "size", "result_type"}  # read no values


class _CheckedNumpy:
    """numpy for lragent_jax.{engine,schemes,session}: a call given a jax array raises (on CPU
    np.asarray reads a jax array through the buffer protocol, past any Python hook)."""

    def __getattr__(self, name):
        f = getattr(np, name)
        if not callable(f) or isinstance(f, type) or name in _METADATA:
            return f

        def checked(*args, **kwargs):
            for leaf in jax.tree.leaves((args, kwargs)):
                if isinstance(leaf, jax.Array):
                    raise AssertionError(f"np.{name} of a {leaf.shape} {leaf.dtype} jax array outside "
                                         f"sharding.to_host")
            return f(*args, **kwargs)
        return checked


@pytest.fixture
def reads_only_through_to_host(monkeypatch):
    """Reading a jax array's value outside sharding.to_host raises (as np.asarray does on an array
    spanning several processes): numpy calls in the engine, schemes and session modules, and
    the array's own reads (tolist, int, __array__); returns the list of to_host calls on jax arrays."""
    from lragent_jax import engine as engine_module, schemes as schemes_module, session as session_module

    inside = threading.local()
    calls = []
    real_to_host, real_value = sharding.to_host, jax_array.ArrayImpl._value

    def counted(x, dtype=None):
        if isinstance(x, jax.Array):
            calls.append(tuple(x.shape))
        inside.on = True
        try:
            return real_to_host(x, dtype)
        finally:
            inside.on = False

    def guarded(self):
        if not getattr(inside, "on", False):
            raise AssertionError(f"device->host read of a {self.shape} {self.dtype} array outside sharding.to_host")
        return real_value.fget(self)

    monkeypatch.setattr(sharding, "to_host", counted)
    monkeypatch.setattr(jax_array.ArrayImpl, "_value", property(guarded))
    for module in (engine_module, schemes_module, session_module):
        monkeypatch.setattr(module, "np", _CheckedNumpy())
    return calls


@pytest.fixture(scope="module")
def engine():
    cfg = preset("tiny")
    return Engine(Llama(cfg, dtype=jnp.float32, rngs=nnx.Rngs(0)), random_adapters(cfg, seed=1, b_std=0.3))


# non_shared: the generic concurrent path (one branch after another); base_lr_shared: all branches
# in one decode loop over the shared prefix
@pytest.mark.parametrize("scheme", ["non_shared", "base_lr_shared"])
def test_session_reads_outputs_through_to_host(engine, scheme, reads_only_through_to_host):
    calls = reads_only_through_to_host
    s = Session(engine, scheme, batch=2, max_len=128, stop_ids=())
    s.append([list(range(3, 20)), list(range(30, 41))])
    out = s.generate("plan", 4, greedy=True)
    assert [len(r) for r in out] == [4, 4]
    assert len(calls) >= 3  # the first token, the tokens, the counts
    out = s.generate("action", 3, greedy=True, rows=[1])
    assert out[0] == [] and len(out[1]) == 3
    n = len(calls)
    branches = s.generate_concurrent({"plan": 3, "reflect": 2}, greedy=True)
    assert [len(r) for r in branches["reflect"]] == [2, 2]
    assert len(calls) >= n + 2  # each branch's tokens and counts
    s.adopt("reflect")
    n = len(calls)
    scores = s.score("action", [[5, 6, 7], [8, 9, 10]])
    assert [x.shape for x in scores] == [(3, engine.config.vocab_size)] * 2
    assert len(calls) >= n + 2  # the first logits and the teacher-forced ones


def test_the_guard_catches_a_read_outside_to_host(reads_only_through_to_host):
    """Control: the fixture above does fail a plain np.asarray of a jitted output."""
    from lragent_jax import session as session_module

    out = jnp.arange(3) + 1
    with pytest.raises(AssertionError, match="outside sharding.to_host"):
        session_module.np.asarray(out)
    with pytest.raises(AssertionError, match="outside sharding.to_host"):
        out.tolist()
    np.testing.assert_array_equal(sharding.to_host(out), [1, 2, 3])
    assert reads_only_through_to_host == [(3,)]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


@pytest.mark.slow  # two processes compile the Session's programs twice each: ~100 s on 2 busy cores
def test_two_processes_run_a_session_over_a_mesh_spanning_both(tmp_path):
    """Greedy tokens over the data=2 mesh spanning both processes equal each process's one-device
    run, and score logits agree within 1e-5 of the largest |logit| (float32; the rows are split,
    not the sums: observed 3e-7). Before to_host, generate() raised in np.asarray."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "",
           "PYTHONPATH": os.pathsep.join([os.path.dirname(HERE), os.environ.get("PYTHONPATH", "")])}
    port = _free_port()
    outs = [tmp_path / f"process{i}.json" for i in range(2)]
    procs = [subprocess.Popen([sys.executable, os.path.join(HERE, "multihost_checks.py"), str(i), str(port),
                               str(outs[i])], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i in range(2)]
    logs = [p.communicate(timeout=600)[0] for p in procs]
    for p, log in zip(procs, logs):
        assert p.returncode == 0, log[-4000:]
    for out in outs:
        got = json.loads(out.read_text())
        assert got["processes"] == 2 and got["local_devices"] == 1 and not got["fully_addressable"]
        assert got["plain_read"] != "worked"  # np.asarray alone cannot read it: to_host is needed
        assert got["gathered"] == [[0, 10], [20, 30], [40, 50], [60, 70]]
        one, two = got["runs"]["one device"], got["runs"]["data=2"]
        for key in ("plan", "action", "branches"):
            assert two[key] == one[key], key
        assert len({t for row in one["plan"] for t in row}) >= 2  # tokens vary: equality is not trivial
        scale = max(np.abs(np.asarray(x)).max() for x in one["scores"])
        err = max(np.abs(np.asarray(a) - np.asarray(b)).max() for a, b in zip(two["scores"], one["scores"]))
        assert err <= 1e-5 * scale, (err, scale)
