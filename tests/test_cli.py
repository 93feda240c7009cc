"""scripts/generate.py: the JSON contract, HF + PEFT token parity, and one-line errors (exit 2)."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "scripts", "generate.py")

import generate  # noqa: E402


def run_cli(*args, timeout=600, env=None):
    return subprocess.run([sys.executable, SCRIPT, *args], capture_output=True, text=True, timeout=timeout,
                          cwd=ROOT, env=None if env is None else {**os.environ, **env})


def test_random_demo_json_contract(tmp_path):
    """Without the trained miniature (pointed at an empty folder) the random-weight demo runs."""
    r = run_cli("--json", "--scheme", "non_shared,base_lr_shared", "--turn", "plan:3", "--turn", "reflect:2",
                env={"LRAGENT_MINIATURE_DIR": str(tmp_path)})
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)  # stdout holds the JSON object and nothing else
    assert out["random_weights"] is True
    assert out["errors"] == []  # every requested scheme ran
    assert [run["scheme"] for run in out["runs"]] == ["non_shared", "base_lr_shared"]
    for run in out["runs"]:
        assert [t["agent"] for t in run["turns"]] == ["plan", "reflect"]
        assert [len(t["token_ids"]) for t in run["turns"]] == [3, 2] or run["turns"][0]["token_ids"][-1] == 257
        assert all(isinstance(t["text"], str) for t in run["turns"])
        assert {"cache_bytes", "catch_up_tokens", "ttft_s", "tokens_per_s"} <= set(run["stats"])
    # the first turn has nothing to share yet: identical under both schemes
    assert out["runs"][0]["turns"][0]["token_ids"] == out["runs"][1]["turns"][0]["token_ids"]


@pytest.mark.parity
def test_greedy_turns_match_hf_peft(hf_case_factory):
    """--json greedy multi-turn generation == HF + PEFT generate with the matching adapter."""
    from hf_fixtures import require_parity

    require_parity()
    import numpy as np
    from test_parity_hf import TURNS, hf_turns, peft_model

    case = hf_case_factory("llama")
    prompt = np.random.default_rng(21).integers(3, 300, 12).tolist()
    expected = hf_turns(peft_model(case["model"], case["adapters"]), prompt)
    args = ["--json", "--model", case["model"], "--dtype", "float32", "--greedy", "--stop-ids", "none",
            "--scheme", "non_shared", "--prompt-ids", ",".join(map(str, prompt))]
    for name, path in case["adapters"].items():
        args += ["--adapter", f"{name}={path}"]
    for agent, n in TURNS:
        args += ["--turn", f"{agent}:{n}"]
    r = run_cli(*args)
    assert r.returncode == 0, r.stderr
    run = json.loads(r.stdout)["runs"][0]
    assert [t["token_ids"] for t in run["turns"]] == expected
    assert all(t["text"] is None for t in run["turns"])  # the tiny model folder has no tokenizer


def _main_error(capsys, *args):
    code = generate.main(list(args))
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("error:") and err.count("\n") == 1 and "Traceback" not in err, err
    return err


@pytest.mark.parametrize("args,needle", [
    (("--turn", "critic:3"), "unknown agent 'critic'"),
    (("--turn", "plan:x"), "N must be an integer"),
    (("--temperature", "-1"), "--temperature"),
    (("--temperature", "inf"), "--temperature must be finite"),
    (("--top-p", "1.5"), "--top-p"),
    (("--top-k", "-3"), "--top-k"),
    (("--max-new-tokens", "0"), "--max-new-tokens"),
    (("--dtype", "int8"), "--dtype"),
    (("--scheme", "half_shared"), "unknown scheme"),
    (("--prompt-ids", "1,x"), "--prompt-ids"),
    (("--prompt-ids", "1,99999"), "out of range"),
    (("--max-len", "10"), "longer than --max-len"),
    (("--max-len", "100", "--turn", "plan:90"), "exceed --max-len"),
    (("--adapter", "plan=./x"), "needs --model"),
    (("--adapter", "plan"), "NAME=PATH"),
    (("--nonsense",), "unrecognized arguments"),
    (("--share-a", "pca"), "--share-a must be 'stack' or 'svd:R'"),
    (("--share-a", "svd:0"), "--share-a"),
    (("--questions", "0"), "--questions"),
])
def test_bad_input_is_one_line_exit_2(capsys, args, needle):
    assert needle in _main_error(capsys, *args)


def test_model_without_tokenizer(capsys, hf_case_factory):
    case = hf_case_factory("llama")
    capsys.readouterr()  # drop what building the fixture printed
    err = _main_error(capsys, "--model", case["model"], "--prompt", "hello", "--dtype", "float32")
    assert "no tokenizer" in err and "--prompt-ids" in err
    err = _main_error(capsys, "--model", case["model"], "--adapter", "plan=/nonexistent/folder",
                      "--prompt-ids", "1,2")
    assert "plan" in err


def test_subprocess_error_has_no_traceback():
    r = run_cli("--turn", "critic:2")
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.strip().count("\n") == 0 and "critic" in r.stderr
