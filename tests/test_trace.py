"""The paper's efficiency trace (docs/trace.md): step table, totals, the runner's counts,
and smoke runs of `python -m bench.trace` on the tiny shape (bench.hf_peft: test_bench_hf_peft.py).

Timings are never asserted (benchmarks are scripts); counts and files are.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax.numpy as jnp
import pytest
from flax import nnx

from lragent_jax.config import preset
from lragent_jax.engine import Engine
from lragent_jax.lora import random_adapters
from lragent_jax.model import Llama
from bench import trace as bench_trace
from bench.trace import (
    PAPER_LCTX, expected_catch_up, random_prefills, run_trace, token_range, trace_steps, trace_total_tokens,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# docs/trace.md, row by row: (steps, agent, prefill, gen); "L" = Lctx.
DESIGN_TABLE = [
    ((1,), "plan", 512, 32),
    ((2,), "plan", 8, 8),
    ((3,), "action", 8, 8),
    ((4, 7, 10, 13), "plan", "L", 32),
    ((5, 8, 11, 14), "plan", 8, 8),
    ((6, 9, 12, 15), "action", 8, 8),
    ((16,), "reflect", 32, 32),
    ((17,), "reflect", 8, 8),
]

# Scale 1/8, Lctx 16: fixed sizes 512 -> 64, 32 -> 4, 8 -> 1. Counted by hand:
# T = trajectory length before the step's generation; an agent holds T + gen - 1 tokens after
# its turn (its last token is never fed back); non_shared catches up on (tokens some cache
# holds) - (tokens its own cache holds).
#   1 plan    T=64   catch 0        held plan 67      6 action T=95   catch 93-71 = 22
#   2 plan    T=69   catch 0        held plan 69      7 plan   T=112  catch 95-93 = 2
#   3 action  T=71   catch 69       held action 71    ... steps 8-15 repeat 0, 22, 2, 0, 22, ...
#   4 plan    T=88   catch 71-69=2  held plan 91     16 reflect T=172 catch 167 (all but action's last)
#   5 plan    T=93   catch 0        held plan 93     17 reflect T=177 catch 0; final length 178
SMALL = dict(lctx=16, scale=0.125)
SMALL_TOTAL = 178
SMALL_NS_CATCH_UP = [0, 0, 69, 2, 0, 22, 2, 0, 22, 2, 0, 22, 2, 0, 22, 167, 0]


def test_step_table_matches_design():
    for lctx in (256, 1000):
        steps = trace_steps(lctx)
        assert [s.step for s in steps] == list(range(1, 18))
        by_step = {s.step: s for s in steps}
        for numbers, agent, prefill, gen in DESIGN_TABLE:
            for k in numbers:
                s = by_step[k]
                assert (s.agent, s.prefill, s.gen) == (agent, lctx if prefill == "L" else prefill, gen), k


@pytest.mark.parametrize("lctx", PAPER_LCTX + (1, 100, 3000))
def test_total_tokens(lctx):
    assert trace_total_tokens(lctx) == 912 + 4 * lctx
    assert sum(s.prefill + s.gen for s in trace_steps(lctx)) == 912 + 4 * lctx


def test_paper_lengths():
    # docs/trace.md: 1.9k ... 66.4k; 33.7k at Lctx 8192.
    assert [round(trace_total_tokens(l) / 1000, 1) for l in (256, 8192, 16384)] == [1.9, 33.7, 66.4]


def test_scaled_trace_and_bad_args():
    assert trace_total_tokens(**SMALL) == SMALL_TOTAL
    assert [s.gen for s in trace_steps(16, scale=0.125)][:3] == [4, 1, 1]
    for bad in (0, -3, 2.5):
        with pytest.raises(ValueError, match="lctx"):
            trace_steps(bad)
    with pytest.raises(ValueError, match="scale"):
        trace_steps(16, scale=0)


def test_expected_catch_up_hand_count():
    steps = trace_steps(**SMALL)
    assert expected_catch_up("non_shared", steps) == sum(SMALL_NS_CATCH_UP) == 332
    assert expected_catch_up("base_shared", steps) == expected_catch_up("droidspeak", steps) == 332
    assert expected_catch_up("full_shared", steps) == expected_catch_up("blr", steps) == 0
    assert expected_catch_up("ns", steps, batch=3) == 3 * 332
    # Paper scale, by hand: action at step 3 catches up on plan's 512+32+8+8-1 = 559 tokens; plan
    # at steps 4, 7, 10, 13 on action's last 8+8 = 16; action at 6, 9, 12, 15 on Lctx+32+8+8 = Lctx+48;
    # reflect at 16 on everything but action's unfed last token: 832+4*Lctx-1. Sum 1646 + 8*Lctx.
    for lctx in (256, 8192):
        assert expected_catch_up("ns", trace_steps(lctx)) == 1646 + 8 * lctx


def test_random_prefills_avoid_special_ids():
    for name in ("tiny", "llama-3.1-8b", "ministral-8b"):
        cfg = preset(name)
        low, high = token_range(cfg)
        special = {cfg.bos_token_id, *cfg.eos_token_ids}
        assert not any(low <= t < high for t in special), name
        toks = random_prefills(cfg, trace_steps(64), batch=2, seed=3)
        flat = [t for step in toks for row in step for t in row]
        assert min(flat) >= low and max(flat) < high and not special & set(flat)
        assert toks[3][0] != toks[3][1]  # rows are independent trajectories
        assert toks == random_prefills(cfg, trace_steps(64), batch=2, seed=3)


@pytest.fixture(scope="module")
def engine():
    cfg = preset("tiny")
    return Engine(Llama(cfg, dtype=jnp.float32, rngs=nnx.Rngs(0)), random_adapters(cfg, seed=1),
                  prefill_buckets=(64,))


@pytest.mark.parametrize("scheme", ["non_shared", "full_shared"])
def test_run_trace_counts(engine, scheme):
    r = run_trace(engine, scheme, SMALL["lctx"], scale=SMALL["scale"], progress=False, seed=0)
    assert r["tokens_per_row"] == r["total_tokens"] == r["max_len"] == SMALL_TOTAL
    assert len(r["steps"]) == 17
    want = SMALL_NS_CATCH_UP if scheme == "non_shared" else [0] * 17
    assert [s["catch_up_tokens"] for s in r["steps"]] == want
    assert r["catch_up_tokens"] == sum(want)
    assert r["generated_tokens"] == sum(s.gen for s in trace_steps(**SMALL))
    # tokens first processed at a turn's start: the appended ones + the previous turn's unfed last token
    assert r["new_tokens"] == sum(s.prefill for s in trace_steps(**SMALL)) + 16
    assert r["compiles_during_timing"] == 0 and r["compile_excluded"]
    assert r["ttft_s"] > 0 and r["end_to_end_s"] >= r["ttft_s"]
    assert r["throughput_tok_s"] == pytest.approx(SMALL_TOTAL / r["end_to_end_s"])
    assert r["cache_bytes"] > 0
    json.dumps(r)  # JSON-ready


def test_run_trace_needs_the_agents():
    cfg = preset("tiny")
    eng = Engine(Llama(cfg, dtype=jnp.float32, rngs=nnx.Rngs(0)), random_adapters(cfg, ("plan", "act")))
    with pytest.raises(ValueError, match="missing"):
        run_trace(eng, "full_shared", 16, scale=0.125, progress=False)


def test_bench_trace_records_oom_and_goes_on(tmp_path, monkeypatch, capsys):
    calls = []

    def fake_point(engine, scheme, naive, lctx, batch, args, scale, critical, model_name):
        calls.append((scheme, lctx, batch))
        if scheme == "non_shared" and lctx == 32:
            raise RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 123 bytes.")
        return {"scheme": scheme, "label": scheme, "lctx": lctx, "tokens_per_row": trace_total_tokens(lctx, scale=scale),
                "total_tokens": 1, "throughput_tok_s": 10.0 if scheme == "non_shared" else 25.0,
                "ttft_s": 4.0 if scheme == "non_shared" else 1.0, "end_to_end_s": 1.0, "cache_bytes": 2**20,
                "peak_bytes": None, "catch_up_tokens": 0, "warmup_s": 0.0, "compiles_during_timing": 0}

    monkeypatch.setattr(bench_trace, "run_point", fake_point)
    rc = bench_trace.main(["--shape", "tiny", "--quick", "--schemes", "ns,blr", "--no-progress",
                           "--batch", "1,2", "--out", str(tmp_path)])
    assert rc == 0
    assert len(calls) == 8 and {c[2] for c in calls} == {1, 2}
    data = json.loads((tmp_path / "results.json").read_text())
    status = {(r["label"], r["lctx"], r["batch"]): r["status"] for r in data["results"]}
    assert status[("non_shared", 32, 2)] == "OOM" and status[("non_shared", 16, 2)] == "ok"
    assert data["ratios"] == [{"lctx": 16, "batch": b, "tokens_per_row": SMALL_TOTAL, "ttft_ratio": 4.0,
                               "throughput_ratio": 2.5} for b in (1, 2)]
    assert (tmp_path / "trace_batch.png").stat().st_size > 1000   # throughput against batch
    assert bench_trace.main(["--shape", "tiny", "--quick", "--batch", "1,0"]) == 2
    out = capsys.readouterr().out
    assert "OOM" in out and "4.23x" in out and "2.46x" in out


# Timings are not asserted, so the subprocesses compile with cheap XLA CPU optimisation (halves them).
FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"


def _run_script(args, tmp_path, timeout=600, out=None):
    """`python -m bench.trace ARGS` with cwd tmp_path (the package found through PYTHONPATH, as an
    installed one would be); without `out` the results go to the default folder under the cwd."""
    env = {**os.environ, "XLA_FLAGS": (os.environ.get("XLA_FLAGS", "") + " " + FAST_COMPILE).strip(),
           "PYTHONPATH": os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p)}
    proc = subprocess.run([sys.executable, "-m", "bench.trace", *args, "--no-progress",
                           *(["--out", str(out)] if out else [])], cwd=tmp_path,
                          capture_output=True, text=True, timeout=timeout, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    if out is None:  # exactly one results/trace/<timestamp>/ folder
        (out,) = (tmp_path / "results" / "trace").iterdir()
    data = json.loads((out / "results.json").read_text())
    assert (out / "trace.png").stat().st_size > 1000
    return data, proc.stdout


def test_bench_trace_script_quick(tmp_path):
    # One scheme keeps this fast (compiling is most of it); all schemes: test_bench_trace_script_all.
    # No --out: the default folder is results/trace/<timestamp>/ under the cwd.
    data, stdout = _run_script(["--shape", "tiny", "--quick", "--schemes", "full_shared"], tmp_path)
    assert data["card"] and data["jax_version"] and data["date"] and data["args"]["shape"] == "tiny"
    assert data["command"].split()[1:5] == ["-m", "bench.trace", "--shape", "tiny"]
    assert data["compile_excluded"] and data["scale"] == 0.125
    rows = {(r["label"], r["lctx"]): r for r in data["results"]}
    assert set(rows) == {("full_shared", 16), ("full_shared", 32)}
    assert all(r["status"] == "ok" and r["compiles_during_timing"] == 0 for r in rows.values())
    assert rows[("full_shared", 16)]["tokens_per_row"] == SMALL_TOTAL
    assert rows[("full_shared", 32)]["tokens_per_row"] == trace_total_tokens(32, scale=0.125)
    assert "tput tok/s" in stdout and "compile time excluded: True" in stdout


@pytest.mark.slow
def test_bench_trace_script_all(tmp_path):
    data, stdout = _run_script(["--shape", "tiny", "--quick", "--naive-expansion"], tmp_path, out=tmp_path / "out")
    labels = {r["label"] for r in data["results"]}
    assert labels == {"non_shared", "full_shared", "droidspeak", "base_shared", "base_lr_shared",
                      "base_shared+naive", "base_lr_shared+naive"}
    assert all(r["status"] == "ok" and r["compiles_during_timing"] == 0 for r in data["results"])
    ns = {r["lctx"]: r for r in data["results"] if r["label"] == "non_shared"}
    assert ns[16]["catch_up_tokens"] == 332
    assert data["ratios"] and "paper 4.23x" in stdout


def test_default_results_folder_is_git_ignored():
    """A benchmark run from the repository root writes under results/, which git ignores, so
    `python -m bench.trace --quick` there leaves no untracked files."""
    if not os.path.isdir(os.path.join(ROOT, ".git")) and not os.path.isfile(os.path.join(ROOT, ".git")):
        pytest.skip("not a git checkout")
    probe = os.path.join("results", "trace", "20260101-000000", "results.json")
    proc = subprocess.run(["git", "check-ignore", "-q", probe], cwd=ROOT)
    assert proc.returncode == 0, f"{probe} is not git-ignored: add /results/ to .gitignore"
