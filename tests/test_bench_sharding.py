"""CI smoke of the sharding benchmarks (and bench.step --mesh), each in a child process with 8 CPU devices
(XLA_FLAGS=--xla_force_host_platform_device_count=8: this pytest process already started JAX with one).

bench.sharded: tiny shape, batch 2, model=1 against model=2, per_layer (the GPU default: the
compiled program lists every layer's collectives). Per-device weight bytes are checked against the
count by hand (embedding, LM head of an odd vocabulary, norms, LoRA A and scales whole; the layers'
projections and LoRA B split over model), cache bytes against K / V_base split over model and the
LR cache whole, and the collectives XLA placed against the count on paper (2 all-reduces of
[rows, hidden] per layer).

bench.tpu_fit: Llama-3.1-8B (shapes only: nothing is allocated) on the v2-8 and v5e-8 abstract
meshes, decode and prefill lowered for TPU at 256 cache slots: one Mosaic kernel call per layer in
each, and the longest trajectory equal to (HBM share - weights) // cache bytes per token.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_bench(module: str, args: list, out) -> dict:
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu",
           "PYTHONPATH": os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]),
           "JAX_COMPILATION_CACHE_DIR": jax.config.jax_compilation_cache_dir or "",
           "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}
    proc = subprocess.run([sys.executable, "-m", module, *args, "--out", str(out)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    (path,) = out.glob("*.json")
    return json.loads(path.read_text())


def test_sharded_smoke(tmp_path):
    got = run_bench("bench.sharded", ["--shape", "tiny", "--quick", "--mesh", "model=1", "--mesh", "model=2",
                                      "--batch", "2", "--context", "32", "--new-tokens", "4",
                                      "--layer-mode", "per_layer"], tmp_path)
    for key in ("card", "jax_version", "date", "shape", "dtype", "layer_mode", "nccl_nvls_enable", "rows", "traces"):
        assert key in got, key
    assert got["nccl_nvls_enable"] == "0" and got["layer_mode"] == "per_layer"
    one, two = got["rows"]
    assert (one["mesh"], two["mesh"]) == ("model=1", "model=2")
    assert one["step_vs_first_mesh"] == 1.0 and one["step_ms"] > 0 and two["step_ms"] > 0
    assert abs(two["step_vs_first_mesh"] - two["step_ms"] / one["step_ms"]) < 1e-9

    # tiny: vocab 259 (odd: the LM head stays replicated), hidden 128, MLP 256, 4 layers, 4 heads,
    # 2 KV heads of 32; float32; random_adapters: q and v, rank 8, 3 agents, one shared A
    V, d, f, L, H, Hkv, D, r, N, b = 259, 128, 256, 4, 4, 2, 32, 8, 3, 4
    whole = 2 * V * d + (2 * L + 1) * d + 2 * L * d * r + 2 * N  # embed, lm_head, norms, LoRA A, scales
    split = L * (d * H * D + 2 * d * Hkv * D + H * D * d + 3 * d * f) + L * N * r * (H * D + Hkv * D)  # + LoRA B
    assert one["weight_bytes_per_device"] == b * (whole + split)
    assert two["weight_bytes_per_device"] == b * (whole + split // 2)
    # LoRAKV: K and V_base [L, B, T, Hkv, D] split over model, LR [L, B, T, r] whole
    slots = one["cache_bytes_per_device"] // (b * L * 2 * (2 * Hkv * D + r))
    assert slots >= 32 + 4 and one["cache_bytes_per_device"] == b * L * 2 * slots * (2 * Hkv * D + r)
    assert two["cache_bytes_per_device"] == b * L * 2 * slots * (2 * Hkv // 2 * D + r)

    # no collectives on one device; over model=2 exactly the paper's: 2 per layer of [rows, hidden]
    assert one["collectives"] == {} and one["paper_all_reduce"] == {"count": 0, "bytes": 0}
    paper = two["paper_all_reduce"]
    assert paper["count"] == 2 * L and paper["bytes"] % (2 * L * d * b) == 0
    assert two["collectives"] == {"all-reduce": paper}


def test_tpu_fit_smoke(tmp_path):
    got = run_bench("bench.tpu_fit", ["--lower-context", "256", "--layouts", "model=8;data=2,model=4"], tmp_path)
    for key in ("card", "jax_version", "date", "shape", "usable", "rows"):
        assert key in got, key
    assert got["shape"] == "llama-3.1-8b"
    rows = {(r["tpu"], r["mesh"]): r for r in got["rows"]}
    assert set(rows) == {(t, m) for t in ("v2-8", "v5e-8") for m in ("model=8", "data=2,model=4")}
    L, Hkv, D = 32, 8, 128
    for (tpu, mesh), row in rows.items():
        assert row["mosaic_kernels_lowered"] == {"decode": L, "prefill": L}, (tpu, mesh)
        assert row["batch"] == (2 if mesh.startswith("data=2") else 1)
        assert row["hbm_bytes"] == (8 if tpu == "v2-8" else 16) << 30
        # one trajectory per device on either layout: model=8 holds 1 KV head, model=4 holds 2
        kv_token = L * 2 * (Hkv // (8 if mesh == "model=8" else 4)) * D * 2
        assert row["schemes"]["full_shared"]["cache_bytes_per_token"] == kv_token
        for scheme, s in row["schemes"].items():
            room = got["usable"] * row["hbm_bytes"] - row["weight_bytes_per_device"]
            assert s["max_tokens"] == int(max(0, room) // s["cache_bytes_per_token"]), (tpu, mesh, scheme)
    # the same weights on both TPUs; model=8 splits the layers 8 ways, data=2,model=4 only 4
    for mesh in ("model=8", "data=2,model=4"):
        assert rows["v2-8", mesh]["weight_bytes_per_device"] == rows["v5e-8", mesh]["weight_bytes_per_device"]
    v2 = {mesh: rows["v2-8", mesh]["weight_bytes_per_device"] for mesh in ("model=8", "data=2,model=4")}
    assert v2["model=8"] < v2["data=2,model=4"]


def test_step_with_a_mesh(tmp_path):
    """bench.step --mesh data=2,model=2: the weights are born sharded and the floors are per device."""
    got = run_bench("bench.step", ["--shape", "tiny", "--quick", "--context", "32", "--new-tokens", "4", "--batch", "2",
                                   "--gemv", "1:1", "--mesh", "data=2,model=2"], tmp_path)
    assert got["mesh"] == "data=2,model=2"
    (row,) = got["rows"]
    assert row["mesh"] == "data=2,model=2" and row["batch"] == 2 and row["step_ms"] > 0 and row["prefill_s"] > 0
    V, d, f, L, H, Hkv, D, b = 259, 128, 256, 4, 4, 2, 32, 4  # tiny, float32 (see test_sharded_smoke)
    whole = 2 * V * d + (2 * L + 1) * d  # embed, lm_head (odd vocabulary: replicated), norms
    split = L * (d * H * D + 2 * d * Hkv * D + H * D * d + 3 * d * f)
    assert got["weight_bytes"] == b * (whole + split // 2)
    assert got["weight_bytes_read_per_step"] == got["weight_bytes"] - b * V * d  # one embedding row per token
    # one row and one KV head per device, the LR cache (rank 8) whole; 4 new tokens: 2 on average
    cache_read = 1 * L * (32 + 2) * (2 * 1 * D + 8) * b
    floor_ms = 1e3 * (got["weight_bytes_read_per_step"] + cache_read) / (got["copy_GBps"] * 1e9)
    assert abs(row["decode_floor_ms"] - floor_ms) <= 1e-9 * floor_ms
    # FLOPs count every weight once (not one device's shards), split over the 4 devices' matmul rate
    flops = 2 * (whole + 2 * (split // 2)) * 2 * 32 + 2 * L * H * D * 2 * 32 * 32
    assert abs(row["prefill_floor_s"] - flops / (4 * got["matmul_TFLOPs"] * 1e12)) <= 1e-9 * row["prefill_floor_s"]


def test_decode_flags_runs_each_setting_in_its_own_process(tmp_path):
    """bench.decode_flags: each setting's child gets its variables (XLA flags appended to the
    caller's CPU device count, NVLS off) and reports its rows; the table's ratios are the rows'."""
    from bench.decode_flags import SETTINGS, child_env

    env = child_env("cb_all")
    assert env["NCCL_NVLS_ENABLE"] == "0" and SETTINGS["cb_all"]["XLA_FLAGS"] in env["XLA_FLAGS"]
    run_bench("bench.decode_flags", ["--shape", "tiny", "--quick", "--mesh", "model=1", "--mesh", "model=2",
                                     "--settings", "default,nccl_ll", "--context", "32"], tmp_path)
    got = json.loads((tmp_path / "decode_flags.json").read_text())
    assert got["failures"] == {} and (tmp_path / "decode_flags.png").exists()
    rows = {(r["setting"], r["mesh"]): r for r in got["rows"]}
    assert set(rows) == {(s, m) for s in ("default", "nccl_ll") for m in ("model=1", "model=2")}
    assert rows[("nccl_ll", "model=2")]["env"] == {"NCCL_PROTO": "LL"}
    for (s, m), r in rows.items():
        assert r["vs_first_setting"] == r["step_ms"] / rows[("default", m)]["step_ms"]
        assert r["vs_first_mesh_first_setting"] == r["step_ms"] / rows[("default", "model=1")]["step_ms"]
    assert rows[("default", "model=2")]["collectives"]["all-reduce"]["count"] > 0


def test_decode_flags_rejects_an_unknown_setting(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "bench.decode_flags", "--settings", "default,fast"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "--settings: unknown ['fast']" in proc.stderr
