"""Session checkpoints with orbax: save a Session to a folder, restore it on an Engine.

A checkpoint is an orbax composite checkpoint (one folder) with two items:
  caches/   the scheme's cache arrays (orbax StandardSave: a tensorstore array per leaf), by
            scheme attribute (e.g. caches/<agent>/k for non_shared, cache/k for full_shared)
  session/  JSON: format and version, scheme and its options (batch, max_len, cache dtype,
            attention, critical layers), the trajectory, turn records, held counts per cache,
            stop ids, the sampler's seed and RNG position (turn k draws from
            fold_in(key(seed), k), so seed + counter is the whole RNG state), and the identities
            of the model (config, dtype, fingerprint) and of each adapter (name, rank, alpha,
            targets, fingerprint).
A fingerprint is a sha256 over every tensor's shape, dtype and 16 values at fixed, evenly spaced
positions: cheap (a gather per tensor), exact on any backend, and different for a different
model or adapter (a single edited weight off those positions is not detected).

Atomic: orbax writes to a temporary folder and renames it when complete. Over an existing
checkpoint, the new one is written beside it, then swapped in; an interrupted save leaves the
target absent or holding the previous checkpoint, never a partial one.
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import json
import os
import shutil
import uuid

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from .schemes import Scheme

FORMAT = "lragent-session"
VERSION = 1
_SAMPLES = 16  # values per tensor in a fingerprint


class CheckpointError(ValueError):
    """A checkpoint folder that cannot be read, or that does not match the Engine it is restored on."""


# ---- identities ------------------------------------------------------------------------------
def _digest(leaves) -> str:
    """sha256 (16 hex digits) of each array's shape, dtype and _SAMPLES values at fixed positions."""
    picks = []
    for a in leaves:
        a = jnp.asarray(a)
        flat = np.unique(np.linspace(0, a.size - 1, min(a.size, _SAMPLES)).astype(np.int64)) if a.size \
            else np.zeros((0,), np.int64)
        # A gather at multi-dimensional indices: no flattened copy of a large weight.
        vals = a[np.unravel_index(flat, a.shape)] if a.ndim else a.reshape(1)[:1]
        picks.append((a.shape, a.dtype, vals))
    h = hashlib.sha256()
    for (shape, dtype, vals), host in zip(picks, jax.device_get([p[2] for p in picks])):
        h.update(f"{tuple(shape)}|{np.dtype(dtype).name}|".encode())
        h.update(np.ascontiguousarray(host).tobytes())
    return h.hexdigest()[:16]


def model_identity(engine) -> dict:
    cfg = engine.config
    config = dataclasses.asdict(cfg) if dataclasses.is_dataclass(cfg) else dict(vars(cfg))
    state, _ = engine.params
    return {"config": json.loads(json.dumps(config, default=str)), "dtype": jnp.dtype(engine.dtype).name,
            "fingerprint": _digest(jax.tree.leaves(state))}


def adapter_identities(engine) -> list[dict]:
    lora = engine.lora
    if lora is None:
        return []
    out = []
    for i, name in enumerate(lora.names):
        leaves = []
        for proj in sorted(lora.projections):
            p = lora.projections[proj]
            leaves += [p.a[:, 0 if p.shared_a else i], p.b[:, i], p.scale[i]]
        c = lora.configs[i] if i < len(lora.configs) else None
        out.append({"name": name, "rank": getattr(c, "rank", None), "alpha": getattr(c, "alpha", None),
                    "targets": list(getattr(c, "target_modules", ())), "fingerprint": _digest(leaves)})
    return out


def _session_options(session: "Session") -> dict:
    o = session.attn_options
    return {"scheme": session.scheme_name, "batch": session.batch, "max_len": session.max_len,
            "cache_dtype": jnp.dtype(session.scheme.dtype).name, "attention": o.impl,
            "naive_expansion": o.naive_expansion, "critical_layers": None if session.critical_layers is None else list(session.critical_layers)}


# ---- save ------------------------------------------------------------------------------------
def _split_state(scheme: Scheme) -> tuple[dict, dict]:
    """(held counts as JSON lists, cache pytrees) of the scheme's state."""
    counts, caches = {}, {}
    for k, v in scheme.state().items():
        if Scheme.is_count(k):
            counts[k] = {a: np.asarray(x).tolist() for a, x in v.items()} if isinstance(v, dict) \
                else np.asarray(v).tolist()
        else:
            caches[k] = v
    return counts, caches


def session_metadata(session: "Session") -> dict:
    counts, _ = _split_state(session.scheme)
    return {
        "format": FORMAT, "version": VERSION, **_session_options(session),
        "agents": list(session.agents), "stop_ids": list(session.stop_ids),
        "seed": session._seed, "key_counter": session._key_counter,
        "trajectory": [list(t) for t in session.trajectory],
        "turns": [dataclasses.asdict(t) for t in session.turns],
        "counts": counts,
        "model": model_identity(session.engine), "adapters": adapter_identities(session.engine),
    }


def _write(path: str, caches: dict, meta: dict) -> None:
    """One orbax composite checkpoint at `path` (orbax finalizes it by renaming a temp folder)."""
    with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckptr:
        ckptr.save(path, args=ocp.args.Composite(caches=ocp.args.StandardSave(caches),
                                                 session=ocp.args.JsonSave(meta)))


def save_session(session: "Session", path) -> None:
    path = os.path.abspath(os.fspath(path))
    if os.path.exists(path) and not _is_checkpoint(path):
        raise CheckpointError(f"{path}: exists and is not a session checkpoint; refusing to overwrite it")
    _, caches = _split_state(session.scheme)
    meta = session_metadata(session)
    # Write beside the target (orbax itself writes a temp folder and renames it to `fresh` when
    # complete), then move it in: the target is never a partial checkpoint.
    tag = uuid.uuid4().hex[:8]
    fresh, old = f"{path}.new-{tag}", f"{path}.old-{tag}"
    try:
        _write(fresh, caches, meta)
    except BaseException:
        for leftover in [fresh, *glob.glob(glob.escape(fresh) + ".orbax-checkpoint-tmp*")]:
            shutil.rmtree(leftover, ignore_errors=True)
        raise
    if os.path.exists(path):
        os.rename(path, old)
    os.rename(fresh, path)
    shutil.rmtree(old, ignore_errors=True)


def _is_checkpoint(path: str) -> bool:
    return os.path.isdir(os.path.join(path, "session")) and os.path.isdir(os.path.join(path, "caches"))


# ---- restore ---------------------------------------------------------------------------------
def read_metadata(path) -> dict:
    path = os.path.abspath(os.fspath(path))
    if not _is_checkpoint(path):
        raise CheckpointError(f"{path}: not a session checkpoint (no session/ and caches/ items)")
    with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckptr:
        meta = ckptr.restore(path, args=ocp.args.Composite(session=ocp.args.JsonRestore()))["session"]
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a session checkpoint (format {meta.get('format') if isinstance(meta, dict) else meta!r})")
    if meta.get("version") != VERSION:
        raise CheckpointError(f"{path}: checkpoint version {meta.get('version')} is not supported (this library "
                              f"reads version {VERSION})")
    return meta


def _check_identity(path: str, meta: dict, engine, scheme: str | None) -> None:
    def differ(what, saved, now):
        raise CheckpointError(f"{path}: the checkpoint was saved with {what} {saved} but {now}")

    if scheme is not None:
        from .schemes import canonical_scheme

        if canonical_scheme(scheme) != meta["scheme"]:
            differ("scheme", meta["scheme"], f"restore asked for {canonical_scheme(scheme)}")
    model = model_identity(engine)
    saved_model = meta["model"]
    if saved_model["config"] != model["config"]:
        keys = sorted(k for k in set(saved_model["config"]) | set(model["config"])
                      if saved_model["config"].get(k) != model["config"].get(k))
        k = keys[0]
        differ(f"a different model config: {k} =", saved_model["config"].get(k), f"the engine's is {model['config'].get(k)}")
    if saved_model["dtype"] != model["dtype"]:
        differ("model dtype", saved_model["dtype"], f"the engine's is {model['dtype']}")
    if saved_model["fingerprint"] != model["fingerprint"]:
        differ("model weights of fingerprint", saved_model["fingerprint"],
               f"the engine's weights have {model['fingerprint']} (a different model)")
    saved_ad, now_ad = meta["adapters"], adapter_identities(engine)
    saved_names, now_names = [a["name"] for a in saved_ad], [a["name"] for a in now_ad]
    if saved_names != now_names:
        differ("adapters", saved_names, f"the engine has {now_names}")
    for s, n in zip(saved_ad, now_ad):
        for field in ("rank", "alpha", "targets", "fingerprint"):
            if s[field] != n[field]:
                differ(f"adapter {s['name']!r} of {field}", s[field], f"the engine's has {n[field]}")


def restore_session(path, engine, *, session_cls, turn_cls, scheme: str | None = None, tokenizer=None):
    path = os.path.abspath(os.fspath(path))
    meta = read_metadata(path)
    _check_identity(path, meta, engine, scheme)
    session = session_cls(engine, meta["scheme"], batch=meta["batch"], max_len=meta["max_len"], tokenizer=tokenizer,
                      attention=meta["attention"], naive_expansion=meta["naive_expansion"],
                      critical_layers=meta["critical_layers"], cache_dtype=meta["cache_dtype"],
                      stop_ids=meta["stop_ids"], seed=meta["seed"])
    # Restore into the shapes the fresh Session allocated; drop its zero arrays first (one copy in memory).
    _, fresh = _split_state(session.scheme)
    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), fresh)
    session.scheme.set_state({k: None for k in fresh})
    del fresh
    with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckptr:
        caches = ckptr.restore(path, args=ocp.args.Composite(caches=ocp.args.StandardRestore(abstract)))["caches"]
    counts = {k: ({a: np.asarray(x, np.int64) for a, x in v.items()} if isinstance(v, dict)
                  else np.asarray(v, np.int64)) for k, v in meta["counts"].items()}
    session.scheme.set_state({**counts, **caches})
    session.trajectory = [list(map(int, t)) for t in meta["trajectory"]]
    session.turns = [turn_cls(**t) for t in meta["turns"]]
    session._key_counter = int(meta["key_counter"])
    return session
