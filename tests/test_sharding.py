"""Tensor- and data-parallel sharding (lragent_jax.sharding, Engine(mesh=...)) on 8 CPU devices.

JAX fixes the CPU device count when it starts and this pytest process already started it with one,
so the sharded runs happen in a child process (tests/sharding_checks.py, with
XLA_FLAGS=--xla_force_host_platform_device_count=8) that writes what it measured to JSON; the tests
below check it. Per scheme, a batch of 2 trajectories (turns, concurrent agents, an adopted branch,
teacher-forced scores) on meshes model=2, model=4 and data=2 x model=4 against the unsharded Engine:

  greedy tokens identical, score logits within SHARD_REL_TOL of the largest |logit|.
  SHARD_REL_TOL = 1e-5: both run float32; sharding only reorders sums (wo and w_down sum their
  per-device partial products in an all-reduce, ~sqrt(d) * 6e-8 relative each, through 2 layers
  and the LM head); observed below 1.1e-6 of the largest |logit|. A wrong shard (a head paired
  with another head's KV, a missing all-reduce, a B applied to the wrong rows) moves them by > 1e-2.

The Pallas kernels (Triton, interpret mode) run under shard_map over the heads (model=2) for
base_lr_shared and are held to the XLA path's tolerance of tests/test_pallas_model.py (1e-4: the
kernels' online softmax sums in another order). The compiled decode step over a data=2 x model=4
mesh has no all-gather / all-to-all whose result is cache-sized (has the cache's capacity as a
dimension or as many elements as one device's cache shard); a control program that does gather a
cache shows the check can fail. The heavier sweep (every scheme on model=2 and model=4) is marked slow.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from types import SimpleNamespace

import jax
import numpy as np
import pytest

from lragent_jax import sharding
from lragent_jax.config import preset

HERE = os.path.dirname(os.path.abspath(__file__))
SHARD_REL_TOL = 1e-5
KERNEL_REL_TOL = 1e-4
SCHEMES = ("non_shared", "full_shared", "droidspeak", "base_shared", "base_lr_shared")


def run_checks(tmp_path, full: bool) -> dict:
    out = tmp_path / "sharding.json"
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu",
           "PYTHONPATH": os.pathsep.join([os.path.dirname(HERE), os.environ.get("PYTHONPATH", "")]),
           "LRAGENT_TEST_JAX_CACHE": jax.config.jax_compilation_cache_dir or ""}
    cmd = [sys.executable, os.path.join(HERE, "sharding_checks.py"), str(out)] + (["--full"] if full else [])
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def checks(tmp_path_factory):
    return run_checks(tmp_path_factory.mktemp("sharding"), full=False)


def assert_equal_runs(runs: dict, label: str, rel_tol: float) -> None:
    scheme = label.rsplit("/", 1)[1]
    want, got = runs[f"unsharded/{scheme}"], runs[label]
    assert got["tokens"] == want["tokens"], label
    # the trajectory's turns vary (equal tokens are not a constant), and the agents differ
    assert all(len({t for row in turn for t in row}) >= 3 for turn in (want["tokens"]["plan"],
                                                                       want["tokens"]["action"]))
    assert want["tokens"]["branches"]["plan"] != want["tokens"]["branches"]["reflect"][:3]
    scale = max(np.abs(np.asarray(w)).max() for w in want["logits"])
    err = max(np.abs(np.asarray(g) - np.asarray(w)).max() for g, w in zip(got["logits"], want["logits"]))
    assert err <= rel_tol * scale, f"{label}: max |logit diff| {err:.3g} > {rel_tol} * {scale:.3g}"


@pytest.mark.parametrize("scheme", SCHEMES)
def test_data2_model4_equals_unsharded(checks, scheme):
    assert_equal_runs(checks["runs"], f"data=2,model=4/{scheme}", SHARD_REL_TOL)


@pytest.mark.parametrize("label", ["model=2/base_lr_shared", "model=4/droidspeak"])
def test_model_parallel_equals_unsharded(checks, label):
    assert_equal_runs(checks["runs"], label, SHARD_REL_TOL)


def test_pallas_kernels_under_shard_map(checks):
    assert_equal_runs(checks["runs"], "pallas/model=2/base_lr_shared", KERNEL_REL_TOL)
    heads = {tuple(s)[2] for s in checks["kernel_q_shapes"]}
    # each device's kernel sees half the 8 query heads (4), or with 2 concurrent agents stacked 8;
    # unsharded it would see 8 and 16
    assert heads == {4, 8}, checks["kernel_q_shapes"]


@pytest.mark.parametrize("scheme", ["non_shared", "base_lr_shared"])
def test_decode_step_gathers_no_cache(checks, scheme):
    hlo = checks["hlo"][scheme]
    too_big = [c for c in hlo["collectives"] if hlo["capacity"] in c["shape"]
               or np.prod(c["shape"]) >= hlo["cache_shard_elements"]]
    assert not too_big, too_big
    # Not even token-sized ones for the cache writes: each data shard writes its own rows' new
    # K / V / LR in place (cache.write_slots scatters with rows as a batching dimension under a data
    # axis; with explicit row indices XLA gathered every new token's K / V over data first).
    for_writes = [c for c in hlo["collectives"] if c["for"].endswith("scatter")]
    assert not for_writes, for_writes
    control = checks["hlo"]["control"]
    assert [c for c in control["collectives"] if control["capacity"] in c["shape"]], control


def test_mesh_that_does_not_fit_says_what_would(checks):
    assert checks["errors"]["kv_heads"] == "4 KV heads do not divide over model=8; use model in {1,2,4}"
    assert checks["errors"]["batch"].startswith("batch of 1 rows does not divide over data=2")


def test_parse_mesh_spec():
    assert sharding.parse_mesh_spec("data=2,model=4") == {"data": 2, "model": 4}
    assert sharding.parse_mesh_spec("model=2") == {"data": 1, "model": 2}
    assert sharding.parse_mesh_spec(" data = 2 ") == {"data": 2, "model": 1}
    assert sharding.mesh_from_spec(None) is None and sharding.mesh_from_spec("model=1") is None
    for bad, msg in (("model=two", "is not AXIS=N"), ("tensor=2", "unknown axis 'tensor'"),
                     ("model=2,model=4", "given twice"), ("model=0", "at least 1 device"), ("", "empty")):
        with pytest.raises(sharding.ShardingError, match=msg):
            sharding.parse_mesh_spec(bad)
    with pytest.raises(sharding.ShardingError, match="needs 2 devices; 1 visible"):
        sharding.make_mesh(model=2, devices=jax.devices()[:1])


def test_rules_check_heads_and_keep_an_odd_vocabulary_replicated():
    # rules_for / check_model_fits read only the mesh's axis sizes: a stand-in mesh of any size
    over = lambda model: SimpleNamespace(shape={"data": 1, "model": model})  # noqa: E731
    with pytest.raises(sharding.ShardingError, match=r"^8 KV heads do not divide over model=16; use model in "
                                                     r"\{1,2,4,8\}$"):
        sharding.check_model_fits(preset("llama-3.1-8b"), over(16))
    assert sharding.rules_for(preset("llama-3.1-8b"), over(8)).vocab_out == "model"  # 128256 = 8 * 16032
    assert sharding.rules_for(preset("tiny"), over(2)).vocab_out is None  # 259 tokens: LM head replicated


@pytest.mark.slow
def test_every_scheme_on_every_mesh(tmp_path):
    runs = run_checks(tmp_path, full=True)["runs"]
    for mesh in ("model=2", "model=4", "data=2,model=4"):
        for scheme in SCHEMES:
            assert_equal_runs(runs, f"{mesh}/{scheme}", SHARD_REL_TOL)


@pytest.mark.parametrize("loader", ["load_model", "restore_converted"])
def test_loading_places_each_shard_on_its_devices(checks, loader):
    info = checks["loading"][loader]
    # wq [64, 8 heads * 16] column-parallel: 128 / model=4 columns each; wo row-parallel; embed replicated
    assert info["wq"] == {"spec": "(None, 'model')", "shard": [64, 32]}
    assert info["wo"] == {"spec": "('model', None)", "shard": [32, 64]}
    assert info["embed"] == {"spec": "(None, None)", "shard": [320, 64]}
    if loader == "restore_converted":  # LoRA B [L, N, r, 4 KV heads * 16] sharded with v's output
        assert info["lora_v_b"] == {"spec": "(None, None, None, 'model')", "shard": [2, 3, 8, 16]}
    assert info["engine_keeps_arrays"]


def test_random_weights_are_born_sharded_like_loaded_ones(checks):
    leaves = checks["init_sharded"]
    assert leaves and all(w["shape"] == w["want_shape"] and w["same_sharding"] for w in leaves)
    norms = [w for w in leaves if "norm" in w["path"]]
    assert norms and all(w["min"] == w["max"] == 1.0 for w in norms)
    for w in leaves:  # Llama's random init: normal, std 0.02 (hundreds of entries: within 25%)
        if "norm" not in w["path"]:
            assert 0.015 < w["std"] < 0.025, w


@pytest.mark.parametrize("script", ["generate.py", "agents.py"])
def test_scripts_reject_a_mesh_that_cannot_run_in_one_line(script):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.path.dirname(HERE), os.environ.get("PYTHONPATH", "")])}
    path = os.path.join(os.path.dirname(HERE), "scripts", script)
    for spec, msg in (("model=3", "error: mesh data=1,model=3 needs 3 devices; 1 visible (cpu)"),
                      ("data=2", "error: --mesh data=2: data=2 splits a batch of trajectories, and this runs 1"),
                      ("model=x", "error: --mesh 'model=x': 'model=x' is not AXIS=N")):
        proc = subprocess.run([sys.executable, path, "--mesh", spec], env=env, capture_output=True, text=True,
                              timeout=300)
        assert proc.returncode == 2, proc.stderr
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(msg), proc.stderr


def test_tpu_fit_bytes_per_device_match_the_arithmetic(tmp_path):
    """bench.tpu_fit's per-device bytes (from the shardings over an abstract v2-8 mesh, no lowering)
    against the count by hand for Llama-3.1-8B in bf16 over model=8."""
    from bench import tpu_fit

    row = next(r for r in tpu_fit.main(["--no-lower", "--layouts", "model=8", "--out", str(tmp_path)])
               if r["tpu"] == "v2-8")
    V, d, f, L, H, Hkv, D = 128256, 4096, 14336, 32, 32, 8, 128
    layer = d * H * D + 2 * d * Hkv * D + H * D * d + 3 * d * f  # wq, wk + wv, wo, MLP: all split 8 ways
    lora = L * (2 * d * 8 + 3 * 8 * (H * D + Hkv * D) // 8)  # q and v: shared A whole, 3 agents' B split
    scales = 2 * 3 * 4  # q and v: one float32 scale per agent
    weights = 2 * (V * d + (L * layer + d * V) // 8 + (2 * L + 1) * d) + 2 * lora + scales  # embed, norms whole
    assert row["weight_bytes_per_device"] == weights
    kv_token = L * 2 * (Hkv // 8) * D * 2  # K and V, one KV head per device, bf16
    assert row["schemes"]["full_shared"]["cache_bytes_per_token"] == kv_token
    assert row["schemes"]["non_shared"]["cache_bytes_per_token"] == 3 * kv_token
    assert row["schemes"]["base_lr_shared"]["cache_bytes_per_token"] == kv_token + L * 8 * 2  # + LR [.., r=8]


def test_collectives_report_results_of_async_pairs():
    """sharding.collectives on GPU-style HLO (XLA's own formats): an async all-gather-start's shape
    is (operand, result) and a collective-permute-start's (operand, result, context, context), so
    the op's result is what the -done returns; an all-reduce-start's shape is its result. Each
    pair counts once, with the result's shape and bytes (a cache gathered whole must show its
    capacity in the shape), and the JAX operation named on either half."""
    hlo = "\n".join([
        '  %ag-start = (f32[8,256]{1,0}, f32[16,256]{1,0}) all-gather-start(f32[8,256]{1,0} %p), '
        'replica_groups={{0,1}}, dimensions={0}, metadata={op_name="jit(f)/while/body/gather"}',
        '  %ag-done = f32[16,256]{1,0} all-gather-done((f32[8,256]{1,0}, f32[16,256]{1,0}) %ag-start)',
        '  %cp-start = (bf16[4]{0}, bf16[4]{0}, u32[], u32[]) collective-permute-start(bf16[4]{0} %q), '
        'source_target_pairs={{0,1},{1,0}}',
        '  %cp-done = bf16[4]{0} collective-permute-done(%cp-start), metadata={op_name="jit(f)/ppermute"}',
        '  %ar-start = f32[2,64]{1,0} all-reduce-start(f32[2,64]{1,0} %x), to_apply=%add, '
        'metadata={op_name="jit(f)/dot_general"}',
        '  %ar-done = f32[2,64]{1,0} all-reduce-done(f32[2,64]{1,0} %ar-start)',
        '  ROOT %ar = (f32[3]{0}, bf16[5]{0}) all-reduce(f32[3]{0} %a, bf16[5]{0} %b), to_apply=%add',
    ])
    got = sharding.collectives(hlo)
    assert [(c["op"], c["dtype"], c["shape"], c["bytes"], c["for"]) for c in got] == [
        ("all-gather", "f32", [16, 256], 4 * 16 * 256, "jit(f)/while/body/gather"),
        ("collective-permute", "bf16", [4], 2 * 4, "jit(f)/ppermute"),
        ("all-reduce", "f32", [2, 64], 4 * 2 * 64, "jit(f)/dot_general"),
        ("all-reduce", "f32", [3], 4 * 3 + 2 * 5, ""),
    ]
