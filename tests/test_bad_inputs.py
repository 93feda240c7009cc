"""Bad files and values users can hand in: one line naming the file or value, exit code 2 from
scripts/generate.py, a specific exception (ValueError subclass) from the Python API.

Each case writes a broken copy of the tiny llama folder (tests/hf_fixtures.py) or passes a bad
value, then asserts the message from generate.main() (in-process: no interpreter start per case)
and the exception type from load_model / load_adapters. One subprocess test checks the real exit
code. Also here: --scheme lists (each run printed as it finishes, blocked schemes named up
front, the exit code says whether any failed) and the cache-bytes helper behind --max-len.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from lragent_jax import memory
from lragent_jax.checks import count, finite_number
from lragent_jax.config import ConfigError
from lragent_jax.loading import AdapterError, WeightsError, load_adapters, load_model
from lragent_jax.sampling import SamplingParams

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import generate  # noqa: E402


@pytest.fixture(autouse=True)
def random_default_model(monkeypatch, tmp_path):
    """generate.py's default model is the trained miniature when it ships; these checks are about
    bad input, so they run on the small random demo (LRAGENT_MINIATURE_DIR at an empty folder)."""
    monkeypatch.setenv("LRAGENT_MINIATURE_DIR", str(tmp_path / "no-miniature"))

Q0 = "model.layers.0.self_attn.q_proj.weight"


# ---- how to break a folder ------------------------------------------------------------------------
def _tensors(folder, file):
    path = os.path.join(folder, file)
    return path, load_file(path)


def _save(path, tensors):
    save_file(tensors, path, metadata={"format": "pt"})


def truncate(file):
    def edit(folder):
        path = os.path.join(folder, file)
        data = open(path, "rb").read()
        open(path, "wb").write(data[: len(data) // 2])
    return edit


def garbage(file):
    def edit(folder):
        open(os.path.join(folder, file), "wb").write(b"\x00\x01not a safetensors file" * 10)
    return edit


def write_text(file, text):
    def edit(folder):
        open(os.path.join(folder, file), "w").write(text)
    return edit


def edit_json(file, change):
    def edit(folder):
        path = os.path.join(folder, file)
        d = json.load(open(path))
        change(d)
        open(path, "w").write(json.dumps(d))  # json.dumps writes NaN for float('nan'), as Python's json reads it
    return edit


def set_key(key, value):
    return lambda d: d.__setitem__(key, value)


def del_key(key):
    return lambda d: d.pop(key)


def set_value(file, pick, value, dtype=None):
    """Tensor (first whose name matches pick) [0, 0] = value, optionally the tensor cast to dtype."""
    def edit(folder):
        path, t = _tensors(folder, file)
        name = next(k for k in sorted(t) if pick in k)
        x = t[name].astype(dtype) if dtype else t[name].copy()
        x.flat[0] = value
        t[name] = x
        _save(path, t)
    return edit


MODEL_FILE, ADAPTER_FILE = "model.safetensors", "adapter_model.safetensors"
MODEL_CASES = [  # id, edit, extra argv, error type, needles (all must be in the message)
    ("truncated", truncate(MODEL_FILE), (), WeightsError, ("model.safetensors", "truncated")),
    ("not-safetensors", garbage(MODEL_FILE), (), WeightsError, ("model.safetensors", "not a readable safetensors")),
    ("config-bad-json", write_text("config.json", '{"vocab_size": 300,'), (), ConfigError,
     ("config.json", "invalid JSON")),
    ("config-array", write_text("config.json", "[1, 2]"), (), ConfigError, ("config.json", "JSON object", "array")),
    ("config-binary", garbage("config.json"), (), ConfigError, ("config.json",)),
    ("config-missing-field", edit_json("config.json", del_key("num_hidden_layers")), (), ConfigError,
     ("config.json", "'num_hidden_layers' is missing")),
    ("config-string-int", edit_json("config.json", set_key("hidden_size", "64")), (), ConfigError,
     ("config.json", "'hidden_size' must be an integer", "'64'")),
    ("config-float-int", edit_json("config.json", set_key("num_hidden_layers", 2.5)), (), ConfigError,
     ("config.json", "'num_hidden_layers' must be an integer", "2.5")),
    ("config-nan", edit_json("config.json", set_key("rms_norm_eps", float("nan"))), (), ConfigError,
     ("config.json", "'rms_norm_eps' must be a finite number")),
    ("config-negative", edit_json("config.json", set_key("num_key_value_heads", -2)), (), ConfigError,
     ("config.json", "num_kv_heads must be positive")),
    ("index-not-object", write_text("model.safetensors.index.json", '"x"'), (), WeightsError,
     ("model.safetensors.index.json", "JSON object")),
    ("int8-tensor", set_value(MODEL_FILE, Q0, 1, np.int8), (), WeightsError, (Q0, "dtype I8", "floating-point")),
    ("nan-weight", set_value(MODEL_FILE, Q0, np.nan), (), WeightsError, (Q0, "model.safetensors", "1 NaN/inf")),
    ("inf-weight", set_value(MODEL_FILE, "model.norm.weight", -np.inf), (), WeightsError,
     ("model.norm.weight", "NaN/inf")),
    ("float16-overflow", set_value(MODEL_FILE, Q0, 1e6), ("--dtype", "float16"), WeightsError,
     (Q0, "too large for float16")),
]

ADAPTER_CASES = [
    ("truncated", truncate(ADAPTER_FILE), AdapterError, ("adapter 'plan'", ADAPTER_FILE, "truncated")),
    ("config-bad-json", write_text("adapter_config.json", "{'r': 8}"), AdapterError,
     ("adapter_config.json", "invalid JSON")),
    ("config-string", write_text("adapter_config.json", '"lora"'), AdapterError,
     ("adapter_config.json", "JSON object", "string")),
    ("missing-r", edit_json("adapter_config.json", del_key("r")), AdapterError,
     ("adapter 'plan'", "adapter_config.json", "'r' is missing")),
    ("string-r", edit_json("adapter_config.json", set_key("r", "eight")), AdapterError,
     ("adapter_config.json", "'r' must be an integer", "'eight'")),
    ("float-r", edit_json("adapter_config.json", set_key("r", 8.5)), AdapterError, ("'r' must be an integer", "8.5")),
    ("string-alpha", edit_json("adapter_config.json", set_key("lora_alpha", "16")), AdapterError,
     ("'lora_alpha' must be a finite number",)),
    ("targets-not-names", edit_json("adapter_config.json", set_key("target_modules", [1])), AdapterError,
     ("target_modules", "list of module names")),
    ("nan-A", set_value(ADAPTER_FILE, "lora_A", np.nan), AdapterError, ("adapter 'plan'", "lora_A", "NaN/inf")),
    ("inf-B", set_value(ADAPTER_FILE, "lora_B", np.inf), AdapterError, ("adapter 'plan'", "lora_B", "NaN/inf")),
    ("int32-tensor", set_value(ADAPTER_FILE, "lora_B", 0, np.int32), AdapterError, ("lora_B", "dtype I32")),
]


@pytest.fixture(scope="module")
def prompt_args():
    return ("--prompt-ids", "3,4,5", "--scheme", "ns")


def _main_error(capsys, *args) -> str:
    capsys.readouterr()
    code = generate.main(list(args))
    out, err = capsys.readouterr()
    assert code == 2, (out, err)
    assert err.startswith("error:") and err.count("\n") == 1 and "Traceback" not in err, err
    return err


def _assert_names(message: str, needles):
    for n in needles:
        assert n in message, f"{n!r} not in {message!r}"


@pytest.mark.parametrize("case", MODEL_CASES, ids=[c[0] for c in MODEL_CASES])
def test_bad_model_folder(case, tmp_path, capsys, llama_case, prompt_args):
    _, edit, extra, error, needles = case
    folder = str(tmp_path / "model")
    shutil.copytree(llama_case["model"], folder)
    edit(folder)
    dtype = extra[1] if extra else "float32"
    with pytest.raises(error) as e:
        load_model(folder, dtype=dtype)
    assert "\n" not in str(e.value)
    _assert_names(str(e.value), needles)
    err = _main_error(capsys, "--model", folder, "--dtype", dtype, *prompt_args)
    _assert_names(err, needles)


@pytest.mark.parametrize("case", ADAPTER_CASES, ids=[c[0] for c in ADAPTER_CASES])
def test_bad_adapter_folder(case, tmp_path, capsys, llama_case, prompt_args):
    _, edit, error, needles = case
    folder = str(tmp_path / "plan")
    shutil.copytree(llama_case["adapters"]["plan"], folder)
    edit(folder)
    model = load_model(llama_case["model"], dtype=jnp.float32)
    with pytest.raises(error) as e:
        load_adapters({"plan": folder, "action": llama_case["adapters"]["action"]}, model)
    assert "\n" not in str(e.value)
    _assert_names(str(e.value), needles)
    err = _main_error(capsys, "--model", llama_case["model"], "--adapter", f"plan={folder}", "--dtype", "float32",
                      *prompt_args)
    _assert_names(err, needles)


# ---- bad values ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("args,needles", [
    (("--temperature", "inf"), ("--temperature", "finite", "inf")),
    (("--temperature", "nan"), ("--temperature", "finite")),
    (("--top-p", "nan"), ("--top-p", "finite")),
    (("--top-k", "-1"), ("--top-k", ">= 0")),
    (("--top-k", "3000000000"), ("--top-k", "2147483647")),
    (("--seed", "-1"), ("--seed",)),
    (("--stop-ids", "5,99999"), ("--stop-ids", "99999", "out of range")),
    (("--critical-layers", "1,x"), ("--critical-layers",)),
    (("--critical-layers", "9", "--scheme", "droidspeak"), ("droidspeak", "critical layers", "0..3")),
    (("--max-len", "1000000000", "--scheme", "non_shared"), ("--max-len=1000000000", "non_shared caches need",
                                                              "TiB", "available")),
    (("--max-len", "2.5"), ("--max-len", "invalid int")),
    (("--turn", "plan:2.5"), ("plan:2.5", "integer")),
])
def test_bad_values(capsys, args, needles):
    _assert_names(_main_error(capsys, "--turn", "plan:1", *args), needles)


def test_bad_values_python_api(tmp_path, llama_case):
    with pytest.raises(ConfigError, match=r"dtype='int8' is not supported; allowed: float32, bfloat16, float16"):
        load_model(str(tmp_path / "never-read"), dtype="int8")  # refused before the folder is looked at
    model = load_model(llama_case["model"], dtype=jnp.float32)
    with pytest.raises(ConfigError, match="dtype='int32'"):
        load_adapters(llama_case["adapters"], model, dtype="int32")
    for kw, needle in [(dict(temperature=math.inf), "temperature must be finite"),
                       (dict(temperature=math.nan), "temperature must be finite"),
                       (dict(top_p=math.nan), "top_p must be finite"),
                       (dict(top_k=2.5), "top_k"), (dict(top_k=True), "top_k"), (dict(top_k=2**31), "top_k"),
                       (dict(temperature="1"), "temperature must be a number")]:
        with pytest.raises(ValueError, match=needle):
            SamplingParams.make(1, **kw)
    params = SamplingParams.make(2, temperature=np.float32(0.5), top_k=np.int64(3), top_p=1)
    assert params.top_k.tolist() == [3, 3] and params.temperature.tolist() == [0.5, 0.5]


def test_count_validator():
    """checks.count: what Session.generate / generate_concurrent / __init__ call on counts."""
    assert count(np.int32(3), "n") == 3 and type(count(np.int32(3), "n")) is int
    assert count(0, "n", minimum=0) == 0
    for bad, needle in [(2.5, "got 2.5 (float)"), (2.0, "(float)"), (True, "(bool)"), ("3", "(str)"),
                        (0, "must be an integer >= 1, got 0")]:
        with pytest.raises(ValueError, match=needle.replace("(", r"\(").replace(")", r"\)")):
            count(bad, "n")
    with pytest.raises(ValueError, match="x must be finite"):
        finite_number(float("inf"), "x")
    with pytest.raises(ValueError, match=r"x must be > 0.0"):
        finite_number(0.0, "x", low=0.0, low_open=True)


def test_session_generate_refuses_fractional_count():
    from lragent_jax.embedded import embedded_model
    from lragent_jax.engine import Engine
    from lragent_jax.session import Session

    model, lora, _ = embedded_model(0)
    session = Session(Engine(model, lora), "full_shared", max_len=16)
    session.append([1, 2, 3])

    def no_work(*a, **k):
        raise RuntimeError("generate() started work before validating max_new_tokens")

    session.scheme.prepare = no_work
    with pytest.raises(ValueError, match="max_new_tokens must be an integer"):
        session.generate("plan", 2.5)


# ---- the cache-size helper behind --max-len -------------------------------------------------------
def test_cache_bytes_match_allocated_sessions():
    """memory.cache_bytes (from the config) == what each scheme allocates, at an unaligned max_len."""
    from lragent_jax.config import ModelConfig
    from lragent_jax.engine import Engine
    from lragent_jax.lora import random_adapters
    from lragent_jax.model import Llama
    from lragent_jax.session import Session
    from flax import nnx

    cfg = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=3, num_heads=4,
                      num_kv_heads=2, head_dim=8)
    model = Llama(cfg, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    lora = random_adapters(cfg, ("a", "b"), rank=4, targets=("q", "v"), dtype=jnp.bfloat16)
    engine = Engine(model, lora)
    for scheme in ("non_shared", "full_shared", "droidspeak", "base_shared", "base_lr_shared"):
        crit = (1, 2)
        session = Session(engine, scheme, max_len=200, critical_layers=crit if scheme == "droidspeak" else None)
        expected = memory.cache_bytes(scheme, cfg, num_agents=2, max_len=200, dtype=jnp.bfloat16, value_rank=4,
                                      num_critical=len(crit))
        assert expected == session.cache_bytes, scheme


def test_memory_check_names_need_and_free(monkeypatch):
    from lragent_jax.config import preset

    free, what = memory.available_bytes()
    assert free is not None and free > 0 and "available" in what  # CPU: the host's available memory
    monkeypatch.setattr(memory, "available_bytes", lambda device=None: (1000, "the test device has 1000 B free"))
    need = memory.cache_bytes("full_shared", preset("tiny"), num_agents=3, max_len=128, dtype=jnp.float32)
    with pytest.raises(memory.CacheMemoryError) as e:
        memory.check_cache_fits("full_shared", preset("tiny"), max_len=128, num_agents=3, dtype=jnp.float32)
    assert f"{need} bytes" in str(e.value) and "1000 B free" in str(e.value)
    monkeypatch.setattr(memory, "available_bytes", lambda device=None: (need, "enough"))
    assert memory.check_cache_fits("full_shared", preset("tiny"), max_len=128, num_agents=3,
                                   dtype=jnp.float32) == need


# ---- several schemes: streamed, blocked up front, exit code ----------------------------------------
def _record_run_scheme(monkeypatch, capsys, fail=None):
    """Wrap generate.run_scheme: remember what was printed before each call; `fail` raises."""
    seen, real = [], generate.run_scheme

    def wrapped(engine, scheme, *a, **k):
        out, err = capsys.readouterr()
        seen.append((scheme, out, err))
        if scheme == fail:
            raise RuntimeError("simulated crash")
        return real(engine, scheme, *a, **k)

    monkeypatch.setattr(generate, "run_scheme", wrapped)
    return seen


def test_blocked_scheme_named_up_front_and_others_run(monkeypatch, capsys, llama_case):
    """base_lr_shared with adapters whose A differ: named before any run, full_shared still runs,
    --json holds the run and the error, exit code 1."""
    seen = _record_run_scheme(monkeypatch, capsys)
    argv = ["--model", llama_case["model"], "--dtype", "float32", "--prompt-ids", "3,4,5", "--json",
            "--scheme", "base_lr_shared,full_shared", "--turn", "plan:2", "--turn", "action:1"]
    for name, path in llama_case["adapters"].items():
        argv += ["--adapter", f"{name}={path}"]
    capsys.readouterr()
    code = generate.main(argv)
    out, err = capsys.readouterr()
    assert code == 1
    assert [s for s, _, _ in seen] == ["full_shared"]
    assert "scheme base_lr_shared cannot run" in seen[0][2] and "share A" in seen[0][2]  # before any work
    result = json.loads(out)
    assert [r["scheme"] for r in result["runs"]] == ["full_shared"]
    assert [len(t["token_ids"]) for t in result["runs"][0]["turns"]] == [2, 1]
    assert [e["scheme"] for e in result["errors"]] == ["base_lr_shared"]
    assert "adapters 'plan' and '" in result["errors"][0]["error"] and "differ" in result["errors"][0]["error"]

    # the same with only the blocked scheme: nothing can run -> one line, exit 2
    err = _main_error(capsys, *[a if a != "base_lr_shared,full_shared" else "blr" for a in argv])
    assert "base_lr_shared" in err and "share A" in err


def test_runs_print_as_they_finish_and_a_crash_loses_nothing(monkeypatch, capsys):
    seen = _record_run_scheme(monkeypatch, capsys, fail="full_shared")
    code = generate.main(["--scheme", "non_shared,full_shared,base_lr_shared", "--turn", "plan:1",
                          "--turn", "action:1"])
    out, err = capsys.readouterr()
    assert code == 1
    assert [s for s, _, _ in seen] == ["non_shared", "full_shared", "base_lr_shared"]
    assert "=== scheme non_shared ===" in seen[1][1]  # printed before the next scheme started
    assert "scheme full_shared failed: RuntimeError: simulated crash" in seen[2][2]
    assert "=== scheme base_lr_shared ===" in out and "full_shared ===" not in out


def test_subprocess_exit_code_and_one_line(tmp_path, llama_case):
    folder = str(tmp_path / "model")
    shutil.copytree(llama_case["model"], folder)
    truncate(MODEL_FILE)(folder)
    r = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "generate.py"), "--model", folder,
                        "--prompt-ids", "1,2"], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.count("\n") == 1 and "model.safetensors" in r.stderr and "truncated" in r.stderr, r.stderr
