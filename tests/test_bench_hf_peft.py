"""bench.hf_peft: the HF transformers + PEFT trace baseline, eager and tuned, on the tiny shape (CPU).

Timings are never asserted (benchmarks are scripts); counts, tokens and files are. The tuned mode's
correctness check: its greedy tokens equal the eager mode's at every step of the trace, exactly (float32
on CPU; eager runs DynamicCache with chunked prefill, tuned a StaticCache with one unchunked forward and
the decode step under torch.compile, so an adapter left stale inside a compiled graph would show).
torch.compile on CPU: backend "aot_eager" (dynamo graphs, guards and AOT tracing without code
generation; about 6 s a graph here) in the default run, inductor's C++ backend (about 95 s for the first
graph on a busy 2-core box) only under -m slow. CUDA graphs need a GPU: the coordinator's H200 run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from hf_fixtures import require_parity  # noqa: E402

torch = require_parity()  # the HF + PEFT baseline itself
pytestmark = pytest.mark.parity

from bench import hf_peft as bench_hf_peft  # noqa: E402
from bench.common import UsageError  # noqa: E402
from bench.trace import trace_steps, trace_total_tokens  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Scale 1/8, Lctx 16 (hand-counted in tests/test_trace.py): 178 tokens; non_shared catch-up per step.
SMALL = dict(lctx=16, scale=0.125)
SMALL_TOTAL = 178
SMALL_NS_CATCH_UP = [0, 0, 69, 2, 0, 22, 2, 0, 22, 2, 0, 22, 2, 0, 22, 167, 0]
# Scale 1/4: every agent decodes (action's gen 8 -> 2; at 1/8 it is 1, all from prefill).
EVERY_AGENT_DECODES = dict(lctx=16, scale=0.25)
AGENTS = ("plan", "action", "reflect")


@pytest.fixture(scope="module")
def tiny():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a busy shared CPU makes multi-threaded torch crawl
    args = bench_hf_peft.parse_args(["--shape", "tiny", "--device", "cpu"])
    model, cfg, device, _ = bench_hf_peft.build(args, torch)
    with torch.no_grad():  # B ~ N(0, 1), not 0.02: the adapter decides the tiny model's greedy tokens, so a
        for name, prm in model.named_parameters():  # decode step left on the wrong adapter changes them
            if ".lora_B." in name:
                prm.mul_(50.0)
    yield model, cfg, device
    torch.set_num_threads(threads)


def _trace(tiny, variant, mode="eager", step=None, caches=None, **shape):
    model, cfg, device = tiny
    shape = shape or SMALL
    if mode == "tuned" and caches is None:
        owners = ["*"] if variant == "full_shared" else list(AGENTS)
        caches = bench_hf_peft.new_static_caches(model, owners, trace_total_tokens(**shape))
    return bench_hf_peft.run_hf_trace(model, cfg, device, shape["lctx"], variant=variant, mode=mode,
                                      scale=shape["scale"], progress=False, torch=torch, caches=caches,
                                      decode_step=step, return_tokens=True)


def test_parse_args_modes_and_bad_input(tmp_path):
    args = bench_hf_peft.parse_args(["--quick", "--shared-cache"])
    assert args.variants_list == ["non_shared", "full_shared"] and args.modes_list is None
    assert bench_hf_peft.resolve_modes(args, torch.device("cpu")) == ["eager"]
    args = bench_hf_peft.parse_args(["--quick"])
    assert bench_hf_peft.resolve_modes(args, torch.device("cuda")) == ["eager", "tuned"]
    args = bench_hf_peft.parse_args(["--mode", "tuned,eager,tuned", "--per-token", "64,8", "--no-trace"])
    assert args.modes_list == ["tuned", "eager"] and args.per_token_list == [64, 8] and args.lctx_list == []
    assert bench_hf_peft.parse_args(["--lctx", "8192,1024,8192"]).lctx_list == [8192, 1024]  # order kept
    assert bench_hf_peft.resolve_modes(args, torch.device("cpu")) == ["tuned", "eager"]  # explicit wins
    for bad, match in ((["--mode", "fast"], "--mode: unknown"), (["--mode", ","], "--mode"),
                       (["--no-trace"], "--per-token"), (["--per-token", "0"], "--per-token"),
                       (["--per-token-steps", "0"], "--per-token-steps"),
                       (["--ours", str(tmp_path / "none.json")], "none.json")):
        with pytest.raises(UsageError, match=match):
            bench_hf_peft.parse_args(bad)
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(UsageError, match="bad.json.*not a bench.trace"):
        bench_hf_peft.load_ours(str(tmp_path / "bad.json"), 1)
    assert bench_hf_peft.main(["--mode", "slow"]) == 2


def test_hf_peft_trace_counts(tiny):
    for variant, want in (("non_shared", SMALL_NS_CATCH_UP), ("full_shared", [0] * 17)):
        for mode, step in (("eager", None), ("tuned", bench_hf_peft.DecodeStep(tiny[0], torch, backend="none"))):
            r = _trace(tiny, variant, mode, step)
            assert r["label"] == f"hf_{variant}_{mode}" and r["tokens_per_row"] == SMALL_TOTAL
            assert [s["catch_up_tokens"] for s in r["steps"]] == want
            assert r["new_tokens"] == sum(s.prefill for s in trace_steps(**SMALL)) + 16
            assert r["cache_bytes"] > 0
            assert [len(t[0]) for t in r["tokens"]] == [s.gen for s in trace_steps(**SMALL)]
    # tuned caches hold the whole trajectory from the start: per owner, layers x (K, V) x capacity
    model, cfg, device = tiny
    cap = _trace(tiny, "full_shared", "tuned", bench_hf_peft.DecodeStep(model, torch, backend="none"))["cache_bytes"]
    assert cap == cfg.num_layers * 2 * cfg.num_kv_heads * SMALL_TOTAL * cfg.head_dim * 4  # float32


def test_tuned_static_cache_tokens_equal_eager(tiny):
    """The StaticCache path without compile (the part of tuned mode CI can afford uncompiled)."""
    step = bench_hf_peft.DecodeStep(tiny[0], torch, backend="none")
    for variant in bench_hf_peft.VARIANTS:
        eager = _trace(tiny, variant, **EVERY_AGENT_DECODES)
        tuned = _trace(tiny, variant, "tuned", step, **EVERY_AGENT_DECODES)
        assert tuned["tokens"] == eager["tokens"], variant
        assert tuned["catch_up_tokens"] == eager["catch_up_tokens"]


def test_tuned_compiled_tokens_equal_eager_and_no_recompiles(tiny):
    """The compiled step (aot_eager: dynamo's graphs and guards, no code generation) reused across steps,
    turns, agents and replays: one graph per adapter that decodes, none compiled on the second replay or
    for full_shared's other cache, no graph breaks, and eager's tokens at every step."""
    model = tiny[0]
    step = bench_hf_peft.DecodeStep(model, torch, backend="aot_eager", cudagraphs=False)
    caches = bench_hf_peft.new_static_caches(model, list(AGENTS), trace_total_tokens(**EVERY_AGENT_DECODES))
    before = bench_hf_peft.dynamo_counts(torch)
    eager = _trace(tiny, "non_shared", **EVERY_AGENT_DECODES)
    first = _trace(tiny, "non_shared", "tuned", step, caches, **EVERY_AGENT_DECODES)
    compiled = bench_hf_peft.counts_since(torch, before)
    assert compiled["graphs"] == 3 and compiled["graph_breaks"] == 0 and step.compile_s > 0
    second = _trace(tiny, "non_shared", "tuned", step, caches, **EVERY_AGENT_DECODES)  # caches reset in place
    shared = _trace(tiny, "full_shared", "tuned", step, **EVERY_AGENT_DECODES)
    assert bench_hf_peft.counts_since(torch, before)["graphs"] == 3
    assert first["tokens"] == second["tokens"] == eager["tokens"]
    assert shared["tokens"] == _trace(tiny, "full_shared", **EVERY_AGENT_DECODES)["tokens"]


def test_compiled_step_follows_set_adapter(tiny):
    """Switching adapters between calls of one compiled step: each adapter's tokens equal the uncompiled
    step's, and the adapters' tokens differ (so a stale adapter in the graph would fail this)."""
    model, cfg, device = tiny
    step = bench_hf_peft.DecodeStep(model, torch, backend="aot_eager", cudagraphs=False)
    prompt = torch.arange(3, 43).remainder(250)[None]
    got = {}
    with torch.no_grad():
        for agent in ("plan", "reflect", "action", "plan"):
            model.set_adapter(agent)
            runs = []
            for fn in (step, step.uncompiled):
                cache = bench_hf_peft.new_static_caches(model, ["*"], 64)["*"]
                tok = step.prefill(prompt, cache).argmax(-1)
                toks = [tok]
                for _ in range(8):
                    tok = fn(tok, cache)
                    toks.append(tok)
                runs.append(torch.cat(toks).tolist())
            assert runs[0] == runs[1], agent
            got.setdefault(agent, runs[0])
            assert got[agent] == runs[0]
    assert len({tuple(v) for v in got.values()}) == 3


@pytest.mark.slow
def test_tuned_inductor_cpu_tokens_equal_eager(tiny):
    """Inductor (C++ on CPU, no CUDA graphs): minutes here, so not in CI."""
    step = bench_hf_peft.DecodeStep(tiny[0], torch, backend="inductor", cudagraphs=False)
    for variant in bench_hf_peft.VARIANTS:
        assert (_trace(tiny, variant, "tuned", step, **EVERY_AGENT_DECODES)["tokens"]
                == _trace(tiny, variant, **EVERY_AGENT_DECODES)["tokens"]), variant


def _run_script(args, tmp_path, timeout=600):
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "bench.hf_peft", "--shape", "tiny",
                           "--threads", "1", "--no-progress", "--out", str(out), *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads((out / "results.json").read_text()), proc.stdout, out


def test_script_quick_eager(tmp_path):
    data, stdout, out = _run_script(["--quick", "--shared-cache"], tmp_path)  # CPU default: eager only
    assert data["modes"] == ["eager"] and data["compile_backend"] is None and data["complete"] is True
    assert data["torch_version"] and data["transformers_version"] and data["peft_version"] and data["card"]
    rows = {(r["label"], r["lctx"]): r for r in data["results"]}
    assert set(rows) == {(f"hf_{v}_eager", l) for v in ("non_shared", "full_shared") for l in (16, 32)}
    assert all(r["status"] == "ok" and r["compiles_during_timing"] == 0 for r in rows.values())
    assert rows[("hf_non_shared_eager", 16)]["catch_up_tokens"] == sum(SMALL_NS_CATCH_UP)
    assert [r["lctx"] for r in data["ratios"]["eager"]] == [16, 32]
    assert (out / "trace.png").stat().st_size > 1000
    assert "hf_full_shared_eager" in stdout and "ratios, eager" in stdout


def test_script_tuned_per_token_and_ours(tmp_path):
    ours = {"card": "test", "results": [
        {"label": "non_shared", "lctx": 16, "batch": 1, "status": "ok", "tokens_per_row": SMALL_TOTAL,
         "throughput_tok_s": 1000.0, "ttft_s": 0.1, "end_to_end_s": 0.05, "decode_s": 0.02,
         "generated_tokens": 37, "steps": [{}] * 17},
        {"label": "non_shared", "lctx": 4096, "batch": 1, "status": "ok", "tokens_per_row": 17296,
         "throughput_tok_s": 1.0, "ttft_s": 1.0, "end_to_end_s": 1.0, "decode_s": 0.5, "generated_tokens": 280}]}
    (tmp_path / "ours.json").write_text(json.dumps(ours))
    data, stdout, out = _run_script(["--quick", "--lctx", "16", "--mode", "eager,tuned", "--compile", "aot_eager",
                                     "--per-token", "32", "--per-token-steps", "4", "--ours",
                                     str(tmp_path / "ours.json")], tmp_path)
    assert data["modes"] == ["eager", "tuned"] and data["compile_backend"] == "aot_eager"
    assert data["cudagraphs"] is False
    pt = {r["kind"]: r for r in data["per_token"]}
    assert set(pt) == set(bench_hf_peft.PER_TOKEN_KINDS) and all(r["status"] == "ok" for r in pt.values())
    n = bench_hf_peft.PER_TOKEN_WARMUP + 4 + 1
    assert all(r["same_tokens_as_eager"] == n == len(r["tokens"]) for r in pt.values())  # float32: all equal
    comp = pt["static_cache_compiled"]
    assert comp["graphs_compiled_warmup"] == 1 and comp["compiles_during_timing"] == 0 and comp["compile_s"] > 0
    rows = {r["label"]: r for r in data["results"]}
    assert set(rows) == {"hf_non_shared_eager", "hf_non_shared_tuned"}
    tuned = rows["hf_non_shared_tuned"]
    assert tuned["status"] == "ok" and tuned["compile_backend"] == "aot_eager" and tuned["compile_excluded"]
    # action decodes nothing at scale 1/8: graphs for plan and reflect, all in the warm-up replay
    assert tuned["graphs_compiled_warmup"] == 2 and tuned["compiles_during_timing"] == 0
    assert tuned["graph_breaks"] == 0 and tuned["warmup_s"] >= tuned["compile_s"] > 0
    assert tuned["catch_up_tokens"] == rows["hf_non_shared_eager"]["catch_up_tokens"] == sum(SMALL_NS_CATCH_UP)
    assert [r["variant"] for r in data["tuned_vs_eager"]] == ["non_shared"]
    sbs = {r["label"]: r for r in data["side_by_side"]}
    assert set(sbs) == {"ours_non_shared", "hf_non_shared_eager", "hf_non_shared_tuned"}  # Lctx 4096 not run
    assert sbs["ours_non_shared"]["end_to_end_speedup_vs_hf_non_shared_tuned"] == pytest.approx(
        tuned["end_to_end_s"] / 0.05)
    assert data["ours"]["rows"][0]["decode_ms_per_token"] == pytest.approx(1e3 * 0.02 / (37 - 17))
    assert "side by side" in stdout and "tuned vs eager" in stdout and "static_cache_compiled" in stdout
    assert (out / "trace.png").stat().st_size > 1000


def test_from_json_side_by_side_without_running(tmp_path):
    """--from-json re-reports an earlier run (here a hand-made one) beside --ours, without torch work."""
    row = {"status": "ok", "lctx": 16, "batch": 1, "tokens_per_row": SMALL_TOTAL, "catch_up_tokens": 332,
           "cache_bytes": 2**20, "peak_bytes": None, "decode_ms_per_token": 5.0}
    hf = {"device": "cpu", "card": "test", "model": "tiny", "dtype": "float32", "args": {"batch": 1},
          "modes": ["eager", "tuned"], "per_token": [], "results": [
              row | {"label": "hf_non_shared_tuned", "variant": "non_shared", "mode": "tuned", "ttft_s": 0.5,
                     "end_to_end_s": 1.0, "throughput_tok_s": 178.0},
              row | {"label": "hf_non_shared_eager", "variant": "non_shared", "mode": "eager", "ttft_s": 1.0,
                     "end_to_end_s": 4.0, "throughput_tok_s": 44.5}]}
    ours = {"results": [{"label": "non_shared", "lctx": 16, "batch": 1, "status": "ok", "tokens_per_row": SMALL_TOTAL,
                         "throughput_tok_s": 356.0, "ttft_s": 0.1, "end_to_end_s": 0.5, "decode_s": 0.1,
                         "generated_tokens": 37}]}
    (tmp_path / "hf.json").write_text(json.dumps(hf))
    (tmp_path / "ours.json").write_text(json.dumps(ours))
    out = tmp_path / "again"
    assert bench_hf_peft.main(["--from-json", str(tmp_path / "hf.json"), "--ours", str(tmp_path / "ours.json"),
                               "--out", str(out)]) == 0
    data = json.loads((out / "results.json").read_text())
    assert [r["label"] for r in data["results"]] == ["hf_non_shared_eager", "hf_non_shared_tuned"]  # eager first
    sbs = {r["label"]: r for r in data["side_by_side"]}
    assert sbs["ours_non_shared"]["end_to_end_speedup_vs_hf_non_shared_eager"] == pytest.approx(8.0)
    assert sbs["ours_non_shared"]["end_to_end_speedup_vs_hf_non_shared_tuned"] == pytest.approx(2.0)
    assert data["tuned_vs_eager"][0]["end_to_end_speedup"] == pytest.approx(4.0)
    assert (out / "trace.png").stat().st_size > 1000
    old = {**hf, "results": [{k: v for k, v in r.items() if k != "mode"} for r in hf["results"]]}
    (tmp_path / "old.json").write_text(json.dumps(old))
    assert bench_hf_peft.main(["--from-json", str(tmp_path / "old.json"), "--out", str(out)]) == 2
