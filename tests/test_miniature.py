"""The miniature: scripts/train_miniature.py --tiny end to end on CPU, its folders loading back,
the demos that run on it (generate.py, agents.py), --share-a, and the shipped model's accuracy floor.

The tiny run trains a 2-layer, hidden-64 model for a dozen steps: its agents write noise, so these
tests check the pipeline and the formats, not answers; the accuracy floor is on the shipped weights.
"""

from __future__ import annotations

import filecmp
import importlib.util
import json
import os
import tarfile
import time

import numpy as np
import pytest

from lragent_jax import miniature
from lragent_jax.lora import SharedAError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _script(name):
    spec = importlib.util.spec_from_file_location(f"{name}_script", os.path.join(ROOT, "scripts", f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


train_miniature = _script("train_miniature")
generate = _script("generate")
agents = _script("agents")

SHIPPED = miniature.assets_built(miniature.ASSET_DIR)
# The shipped model's floor under non_shared on the first FLOOR_QUESTIONS held-out test questions.
# The benchmark target (issue 13) is 80% EM; the floor sits below it so that float rounding across
# machines cannot flip the test, yet far above what an untrained model gets (0%).
FLOOR_QUESTIONS, FLOOR_EM = 40, 0.70  # shipped weights of 2026-12-01 (third): 31/40 (0.775) on CPU, float32, greedy
# (14 of the first 20, as on the H200; 81.2% over 500); 40 questions (~45 s on CPU) because 20 swing by
# +-2 questions; the margin of 3 leaves room for other CPUs and JAX versions (rounding flips greedy near-ties)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """One --tiny run: (result folder, archive path, wall seconds)."""
    root = tmp_path_factory.mktemp("miniature")
    out, archive = root / "out", root / "mini.tar.gz"
    t = time.perf_counter()
    rc = train_miniature.main(["--tiny", "--out", str(out), "--archive", str(archive), "--no-progress"])
    assert rc == 0
    return str(out), str(archive), time.perf_counter() - t


def _adapters(out, flavour):
    return {a: os.path.join(out, f"adapters_{flavour}", a) for a in miniature.AGENTS}


def test_tiny_run_trains_and_logs(tiny):
    out, _, wall = tiny
    with open(os.path.join(out, "train_log.json")) as f:
        log = json.load(f)
    base = log["losses"]["base"]
    assert len(base) == log["settings"]["steps_base"]
    assert np.mean(base[-3:]) < base[0] - 0.3, base  # pre-training learns (6.6 nats at init)
    for flavour in ("independent", "shared"):
        hist = log["losses"][f"adapters_{flavour}"]
        assert set(hist) == {"loss", "plan", "action", "reflect"}
        assert all(np.isfinite(hist["loss"]))
    assert set(log["validation_loss"]) == {"base", "independent", "shared"}
    assert log["validation_em_error"] is None and log["validation_em"] is not None
    assert len(log["validation_em_questions"]) == 2
    assert log["world"]["seed"] == 0 and log["weights_dtype"] == "float32"
    assert log["time_limit_s"] is None and log["steps_done"] == {  # no --time-limit: every step asked for
        "base": log["settings"]["steps_base"], "adapters_independent": log["settings"]["steps_adapter"],
        "adapters_shared": log["settings"]["steps_adapter"]}
    assert 0 not in log["training_worlds"]["seeds"] and len(set(log["training_worlds"]["seeds"])) == 6
    assert set(log["training_world_loss"]) == {"independent", "shared"}
    assert os.path.getsize(os.path.join(out, "loss.png")) > 1000
    assert log["total_bytes"] == sum(log["file_bytes"].values()) < 30 * 2**20
    # the recipe: solved trajectories of the base templates only, in whole-document rows
    assert log["data"]["solved_trajectories"] > 0 and set(log["held_out_templates"]) == set(train_miniature.HELD_OUT_TEMPLATES)
    assert not set(log["base_templates"]) & set(log["held_out_templates"]) and len(log["base_templates"]) == 8
    # the end-of-run evaluation: each default entry ran the same questions, split by template group
    by_entry = log["validation_em_by_entry"]
    assert list(by_entry) == ["non_shared", "base_lr_shared", "base_model"] and log["validation_em_entry"] == "non_shared"
    for entry, r in by_entry.items():
        assert r["error"] is None and r["questions"] == 2 and 0.0 <= r["em"] <= 1.0, entry
        assert r["questions_base_templates"] + r["questions_held_out_templates"] == 2
        assert [q["question"] for q in r["rows"]] == [q["question"] for q in log["validation_em_questions"]]
    sim = log["similarity_shared"]
    assert sim["episodes"] == 1 and 0 < sim["adapter_norm_ratio"] < 100
    assert set(sim["cosine"]) == {"full", "base", "adapter", "lr"} and all(-1 <= v <= 1 for v in sim["cosine"].values())
    assert set(log["validation_loss_held_out_templates"]) == {"base", "independent", "shared"}
    with open(os.path.join(out, "train.log")) as f:
        text = f.read()
    assert "validation EM [base_lr_shared]" in text and "adapter/base norm" in text
    print(f"--tiny end to end: {wall:.1f} s wall")


def test_tiny_folders_load(tiny):
    from lragent_jax.loading import load_adapters, load_model, load_tokenizer
    from lragent_jax.task import SMALL_CONFIG, build_world, newline_id

    out, _, _ = tiny
    model = load_model(os.path.join(out, "base"), dtype=np.float32)
    tok = load_tokenizer(os.path.join(out, "base"))
    cfg = model.config
    assert (cfg.vocab_size, cfg.bos_token_id, cfg.eos_token_ids) == (len(tok), 0, (1,))
    assert tok.decode(tok.encode("Action: wiki[Tal Morisca]\n", add_special_tokens=False)) == \
        "Action: wiki[Tal Morisca]\n"
    newline_id(tok)  # one token, the loop's turn stop
    shared = load_adapters(_adapters(out, "shared"), model)
    independent = load_adapters(_adapters(out, "independent"), model)
    for proj in ("q", "v"):
        shared.require_shared_a(proj)  # stored once: load_adapters found A bit-identical
        with pytest.raises(SharedAError, match="--share-a"):
            independent.require_shared_a(proj)
    assert shared.names == independent.names == miniature.AGENTS
    assert {c.rank for c in shared.configs} == {8} and {c.alpha for c in shared.configs} == {16.0}
    # load_miniature rebuilds the same world from the recorded seed and config
    m2, lora2, tok2, world = miniature.load_miniature("independent", folder=out)
    ref = build_world(0, SMALL_CONFIG)
    assert [q.text for q in world.questions["test"]] == [q.text for q in ref.questions["test"]]
    assert lora2.names == miniature.AGENTS and len(tok2) == len(tok)


def _safetensors_dtypes(path) -> set:
    """The tensor dtypes a .safetensors file declares (its JSON header: 8-byte length, then JSON)."""
    with open(path, "rb") as f:
        header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
    return {v["dtype"] for k, v in header.items() if k != "__metadata__"}


@pytest.fixture(scope="module")
def tiny_bf16(tiny, tmp_path_factory):
    """The tiny run's folder with its base stored as the default preset's is (bfloat16, as
    save_weights writes it when float32 would not fit SIZE_LIMIT_F32): (folder, float32 model)."""
    import shutil

    from lragent_jax.loading import load_model

    out, _, _ = tiny
    folder = str(tmp_path_factory.mktemp("bf16") / "miniature")
    shutil.copytree(out, folder)
    model = load_model(os.path.join(out, "base"), dtype=np.float32)
    limit = train_miniature.SIZE_LIMIT_F32
    train_miniature.SIZE_LIMIT_F32 = 0  # every model is over it
    try:
        assert train_miniature.save_weights(model, os.path.join(folder, "base")) == "bfloat16"
    finally:
        train_miniature.SIZE_LIMIT_F32 = limit
    return folder, model


def test_bfloat16_storage_loads_as_float32(tiny, tiny_bf16):
    """A base stored in bfloat16 (the default miniature's: 13.6M parameters would be 52 MiB in
    float32) is half the size, and load_miniature reads it in float32 as the bfloat16-rounded
    weights exactly (bfloat16 -> float32 is exact), with both adapter sets."""
    import jax
    import ml_dtypes
    from flax import nnx

    out, _, _ = tiny
    folder, model = tiny_bf16
    f32, bf16 = (os.path.join(d, "base", "model.safetensors") for d in (out, folder))
    assert _safetensors_dtypes(f32) == {"F32"} and _safetensors_dtypes(bf16) == {"BF16"}
    assert os.path.getsize(bf16) < 0.55 * os.path.getsize(f32)
    for flavour in miniature.FLAVOURS:
        loaded, lora, tok, world = miniature.load_miniature(flavour, folder=folder)
        assert lora.names == miniature.AGENTS and len(tok) == model.config.vocab_size
        got = jax.tree.leaves(nnx.state(loaded, nnx.Param))
        ref = jax.tree.leaves(nnx.state(model, nnx.Param))
        assert len(got) == len(ref)
        for g, r in zip(got, ref):
            assert g.dtype == np.float32
            np.testing.assert_array_equal(np.asarray(g), np.asarray(r).astype(ml_dtypes.bfloat16).astype(np.float32))


@pytest.mark.parity
def test_bfloat16_storage_loads_in_transformers_and_peft(tiny_bf16):
    """transformers + peft read the bfloat16 base (in float32) and the PEFT adapter folders, and
    give our forward's logits on the same stored weights: relative 1e-5 (float32 on both sides,
    different summation orders)."""
    import jax.numpy as jnp
    from hf_fixtures import require_parity

    from lragent_jax.train import forward_logits

    torch = require_parity()
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    folder, _ = tiny_bf16
    model, lora, _, _ = miniature.load_miniature("shared", folder=folder)
    base = AutoModelForCausalLM.from_pretrained(os.path.join(folder, "base"), dtype=torch.float32,
                                                attn_implementation="eager")
    paths = _adapters(folder, "shared")
    pm = PeftModel.from_pretrained(base, paths["plan"], adapter_name="plan")
    for name in ("action", "reflect"):
        pm.load_adapter(paths[name], adapter_name=name)
    pm.eval()
    tokens = np.random.default_rng(3).integers(2, model.config.vocab_size, 24)
    ids = np.array([lora.adapter_id(a) for a in miniature.AGENTS], np.int32)
    ours = np.asarray(forward_logits(model, jnp.asarray(np.stack([tokens] * len(ids)), jnp.int32), lora,
                                     jnp.asarray(ids)))
    with torch.no_grad():
        for agent, got in zip(miniature.AGENTS, ours):
            pm.set_adapter(agent)
            ref = pm(input_ids=torch.tensor(tokens[None], dtype=torch.long)).logits[0].numpy()
            rel = np.abs(got - ref).max() / np.abs(ref).max()
            assert rel <= 1e-5, (agent, rel)


def test_archive_unpacks_to_the_folder(tiny, tmp_path):
    out, archive, _ = tiny
    with tarfile.open(archive) as tar:
        # the "data" filter (no absolute paths, no links out) exists from Python 3.11.4 on
        tar.extractall(tmp_path, **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))
    unpacked = tmp_path / "miniature"
    for rel in ["base/model.safetensors", "base/tokenizer.json", "train_log.json",
                "adapters_shared/plan/adapter_model.safetensors", "adapters_independent/reflect/adapter_config.json"]:
        assert filecmp.cmp(os.path.join(out, rel), unpacked / rel, shallow=False), rel
    assert miniature.assets_built(str(unpacked))


def test_install_copies_a_complete_miniature(tiny, tmp_path, monkeypatch):
    out, _, _ = tiny
    target = tmp_path / "assets" / "miniature"
    monkeypatch.setattr(miniature, "ASSET_DIR", str(target))  # not the package's folder
    assert train_miniature.install(out) == str(target)
    assert miniature.assets_built(str(target)) and not miniature.assets_built(str(tmp_path))


def test_a_failed_repack_keeps_the_previous_archive(tmp_path, monkeypatch):
    """The archive is written twice (before the evaluation, then with it): a second pack that dies
    part-way (an error here; a device's hard time limit on a GPU run) must leave the first intact."""
    folder, archive = tmp_path / "miniature", tmp_path / "mini.tar.gz"
    folder.mkdir()
    (folder / "weights.bin").write_bytes(b"w" * 1000)
    train_miniature.pack(str(folder), str(archive))
    (folder / "train_log.json").write_text("{}")

    def dies(*a, **k):
        raise KeyboardInterrupt("killed while packing")

    monkeypatch.setattr(tarfile.TarFile, "addfile", dies)
    with pytest.raises(KeyboardInterrupt):
        train_miniature.pack(str(folder), str(archive))
    monkeypatch.undo()
    with tarfile.open(archive, "r:gz") as tar:
        assert tar.getnames() == ["miniature", "miniature/weights.bin"]
    assert sorted(os.listdir(tmp_path)) == ["mini.tar.gz", "miniature"]  # no partial file left behind


@pytest.mark.parametrize("data_filter", [True, False])
def test_install_from_refuses_members_outside_the_folder(tmp_path, monkeypatch, capsys, data_filter):
    """A member named miniature/../x (or a link) would land outside the unpacking folder; Python
    before 3.11.4 has no tarfile "data" filter to stop it (requires-python is >=3.11): one line,
    exit 2, nothing written outside."""
    import io

    if not data_filter:
        monkeypatch.delattr(tarfile, "data_filter", raising=False)
    archive = tmp_path / "evil.tar.gz"
    escaped = "escaped_" + str(data_filter)
    with tarfile.open(archive, "w:gz") as tar:
        folder = tarfile.TarInfo("miniature")
        folder.type = tarfile.DIRTYPE
        tar.addfile(folder)
        info = tarfile.TarInfo(f"miniature/../../{escaped}")
        info.size = 3
        tar.addfile(info, io.BytesIO(b"bad"))
    monkeypatch.setattr(miniature, "ASSET_DIR", str(tmp_path / "assets"))
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    assert train_miniature.main(["--install-from", str(archive)]) == 2
    err = capsys.readouterr().err
    assert "--install-from" in err and err.count("\n") == 1, err
    assert not list(tmp_path.rglob(escaped)) and not (tmp_path / "assets").exists()


def test_install_from_an_archive(tiny, tmp_path, monkeypatch, capsys):
    """--install-from unpacks a run's archive into the asset folder (here a temporary one) after
    checking it is complete; anything else is one line, exit code 2, and nothing installed."""
    out, archive, _ = tiny
    target = tmp_path / "assets" / "miniature"
    monkeypatch.setattr(miniature, "ASSET_DIR", str(target))
    assert train_miniature.main(["--install-from", archive]) == 0
    assert miniature.assets_built(str(target))
    assert filecmp.cmp(os.path.join(out, "base/model.safetensors"), target / "base/model.safetensors", shallow=False)
    capsys.readouterr()
    partial = tmp_path / "partial.tar.gz"
    with tarfile.open(partial, "w:gz") as tar:
        tar.add(os.path.join(out, "base"), arcname="miniature/base")
    other = tmp_path / "other.tar.gz"
    with tarfile.open(other, "w:gz") as tar:
        tar.add(os.path.join(out, "base"), arcname="elsewhere")
    for bad, needle in ((partial, "incomplete"), (other, "one miniature/"), (tmp_path / "none.tar.gz", "no such file"),
                        (tmp_path / "assets" / "miniature" / "train_log.json", "cannot read")):
        assert train_miniature.main(["--install-from", str(bad)]) == 2
        err = capsys.readouterr().err
        assert needle in err and err.count("\n") == 1, err
    assert miniature.assets_built(str(target))  # the installed one is untouched


def test_time_limit_bounds_the_whole_run(tmp_path, monkeypatch):
    """--time-limit with far more steps than fit: each training loop plans fewer steps, the
    weights are saved and archived, what no longer fits is skipped, and the run ends in time
    (slack: one agent-loop question, the tiny one's are ~1 s, and process jitter on a shared CPU).
    The weights are stored as the default preset's are (bfloat16) and evaluated as read back."""
    monkeypatch.setattr(train_miniature, "SIZE_LIMIT_F32", 0)
    out, archive, limit = tmp_path / "out", tmp_path / "mini.tar.gz", 45.0
    t = time.perf_counter()
    rc = train_miniature.main(["--tiny", "--out", str(out), "--archive", str(archive), "--no-progress",
                               "--steps-base", "100000", "--steps-adapter", "100000", "--time-limit", str(limit)])
    wall = time.perf_counter() - t
    assert rc == 0 and wall < limit + 5, wall
    with open(out / "train_log.json") as f:
        log = json.load(f)
    assert log["time_limit_s"] == limit and set(log["steps_done"]) == {"base", "adapters_independent",
                                                                       "adapters_shared"}
    assert log["weights_dtype"] == "bfloat16"
    assert _safetensors_dtypes(out / "base" / "model.safetensors") == {"BF16"}
    assert all(1 <= n < 100_000 for n in log["steps_done"].values()), log["steps_done"]
    assert len(log["losses"]["base"]) == log["steps_done"]["base"]
    for key in ("adapters_independent", "adapters_shared"):
        assert len(log["losses"][key]["loss"]) == log["steps_done"][key]
    assert miniature.assets_built(str(out)) and os.path.isfile(archive)


def test_default_preset_ships_within_30_mib():
    """The default shape stored as save_weights stores it (bfloat16 once float32 would not fit),
    with six float32 rank-8 q/v adapters, fits the ~30 MB the package ships (tokenizer, logs and
    the loss plot add ~0.5 MiB)."""
    s = train_miniature.PRESETS["default"]

    class Vocab:  # what model_config reads of a tokenizer
        bos_token_id, eos_token_id = 0, 1

        def __len__(self):
            return s["vocab"]

    cfg = train_miniature.model_config(s, Vocab())
    adapters = 6 * cfg.num_layers * train_miniature.lora_params_per_layer(cfg)
    assert 4 * (cfg.num_params() + adapters) > train_miniature.SIZE_LIMIT_F32  # so it is stored in bfloat16
    assert 2 * cfg.num_params() + 4 * adapters < train_miniature.SIZE_LIMIT_F32 - 2**20


def test_evaluation_entries_skip_when_the_time_limit_is_reached():
    """With no time left before the deadline an entry is recorded as skipped, not run."""
    by_entry = train_miniature.run_evaluations(["non_shared", "base_model"], None, {}, None, None, [], 512,
                                               {"turn_tokens": None, "max_steps": 1}, 30.0,
                                               deadline=time.perf_counter() + 1.0)
    assert list(by_entry) == ["non_shared", "base_model"]
    for r in by_entry.values():
        assert r["em"] is None and r["rows"] == [] and "time-limit" in r["error"]


def test_evaluation_entries_run_when_the_time_left_allows_though_eval_seconds_is_shorter(monkeypatch):
    """Time left (1000 s) above eval_entry_min_s (40 s) and --eval-seconds below it (the defaults:
    35 s and 40 s): every entry runs, each limited to --eval-seconds. (Comparing the entry's limit,
    min(eval_seconds, time left), with eval_entry_min_s skipped them all: the shipped run's log
    shows all three skipped with ~85 s left.)"""
    calls = []

    def em_on_questions(model, lora, tokenizer, world, questions, max_len, time_limit=None, scheme=None,
                        label=None, **kw):
        calls.append((label, time_limit))
        return 1.0, [{"template": "t", "em": 1.0}]

    monkeypatch.setattr(train_miniature, "em_on_questions", em_on_questions)
    s = {"turn_tokens": None, "max_steps": 1, "eval_entry_min_s": 40.0}
    by_entry = train_miniature.run_evaluations(["non_shared", "base_model"], None, {"shared": None}, None, None,
                                               [], 512, s, 35.0, deadline=time.perf_counter() + 1000.0)
    assert [r["error"] for r in by_entry.values()] == [None, None], by_entry
    assert calls == [("non_shared", 35.0), ("base_model", 35.0)]


def test_missing_assets_one_line(tmp_path):
    with pytest.raises(miniature.MiniatureMissing) as e:
        miniature.load_miniature(folder=str(tmp_path))
    msg = str(e.value)
    assert "assets not built" in msg and "\n" not in msg and "train_miniature.py --install" in msg
    with pytest.raises(ValueError, match="flavour"):
        miniature.load_miniature("both", folder=str(tmp_path))


def test_train_miniature_bad_flags(capsys):
    for args, needle in ((["--archive", "x.zip"], "--archive"), (["--steps-base", "0"], "--steps-base"),
                         (["--vocab-size", "10"], "--vocab-size"), (["--eval-schemes", "non_shared,bogus"], "--eval-schemes"),
                         (["--eval-schemes", "non_shared,non_shared"], "--eval-schemes"), (["--solved", "1.5"], "--solved"),
                         (["--base-templates", "some"], "--base-templates"), (["--time-limit", "0"], "--time-limit"),
                         (["--time-limit", "inf"], "--time-limit"),
                         (["--tiny", "--preset", "default"], "--preset"), (["--preset", "huge"], "--preset")):
        assert train_miniature.main(args) == 2
        err = capsys.readouterr().err
        assert needle in err and err.count("\n") == 1, err


def test_generate_share_a_runs_base_lr_shared_on_independent_adapters(tiny, capsys):
    """--share-a stack: base_lr_shared serves independently trained adapters (exact stack, rank 24);
    without it the refusal names --share-a. The other schemes keep the adapters as loaded."""
    out, _, _ = tiny
    common = ["--model", os.path.join(out, "base"), "--dtype", "float32", "--prompt-ids", "0,5,6,7,8",
              "--turn", "plan:3", "--turn", "action:2", "--greedy", "--json"]
    for name, path in _adapters(out, "independent").items():
        common += ["--adapter", f"{name}={path}"]
    assert generate.main(common + ["--scheme", "base_lr_shared"]) == 2
    err = capsys.readouterr().err
    assert "--share-a" in err and err.count("\n") == 1
    assert generate.main(common + ["--scheme", "non_shared,base_lr_shared", "--share-a", "stack"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["errors"] == [] and [r["scheme"] for r in res["runs"]] == ["non_shared", "base_lr_shared"]
    assert res["share_a"]["method"] == "stack" and res["share_a"]["rank"] == 24
    assert all(f == 1.0 for f in res["share_a"]["kept"].values())
    # the first turn has nothing to share yet: base_lr_shared on the stack == non_shared (stack is exact)
    assert res["runs"][0]["turns"][0]["token_ids"] == res["runs"][1]["turns"][0]["token_ids"]
    assert generate.main(common + ["--scheme", "base_lr_shared", "--share-a", "svd:4"]) == 0
    kept = json.loads(capsys.readouterr().out)["share_a"]["kept"]
    assert all(0.0 < f < 1.0 for f in kept.values()), kept
    for bad in ("svd", "svd:0", "stack:3", "pca"):
        assert generate.main(common + ["--share-a", bad]) == 2
        assert "--share-a" in capsys.readouterr().err


def test_generate_default_runs_episodes_on_the_miniature(tiny, monkeypatch, capsys):
    """With a miniature present (here the tiny one, via LRAGENT_MINIATURE_DIR) the no-argument
    default runs the agent loop on held-out test questions per scheme."""
    out, _, _ = tiny
    monkeypatch.setenv(miniature.ENV_VAR, out)
    rc = generate.main(["--json", "--questions", "1", "--scheme", "non_shared,base_lr_shared", "--max-len", "512"])
    res = json.loads(capsys.readouterr().out)
    assert rc == 0 and res["errors"] == [] and res["random_weights"] is False
    world = miniature.miniature_world(out)
    for run in res["runs"]:
        (ep,) = run["episodes"]
        assert ep["question"] == world.questions["test"][0].text and ep["gold"] == world.questions["test"][0].answer
        assert ep["turns"][0]["role"] == "plan" and ep["em"] in (0.0, 1.0) and ep["stats"]["cache_bytes"] > 0
        assert ep["text"].startswith("Question: ")
    rc = generate.main(["--questions", "1", "--scheme", "base_lr_shared", "--share-a", "svd:8", "--max-len", "512"])
    text = capsys.readouterr().out
    assert rc == 0 and "independent adapters" in text and "share_a svd" in text and "kept" in text
    assert "answer" in text and ("RIGHT" in text or "WRONG" in text)


def test_agents_default_runs_the_task_loop_on_the_miniature(tiny, monkeypatch, capsys):
    out, _, _ = tiny
    monkeypatch.setenv(miniature.ENV_VAR, out)
    assert agents.main(["--json", "--scheme", "non_shared", "--max-len", "512", "--max-steps", "1",
                        "--question-index", "1"]) == 0
    res = json.loads(capsys.readouterr().out)
    q = miniature.miniature_world(out).questions["test"][1]
    assert res["random_weights"] is False and res["question"] == q.text and res["gold"] == q.answer
    assert res["trajectory_text"].startswith(f"Question: {q.text}\nThought:")
    assert agents.main(["--question-index", "100000"]) == 2


@pytest.mark.skipif(not SHIPPED, reason="assets not built")
def test_shipped_model_accuracy_floor():
    """The shipped agents (shared-A adapters, non_shared) answer at least FLOOR_EM of the first
    FLOOR_QUESTIONS held-out test questions exactly, through the loop with the real tools."""
    from lragent_jax.engine import Engine
    from lragent_jax.session import Session
    from lragent_jax.task import make_tools, run_episode, score

    model, lora, tok, world = miniature.load_miniature("shared")
    engine, tools = Engine(model, lora), make_tools(world)
    questions = world.questions["test"][:FLOOR_QUESTIONS]
    em = []
    for q in questions:
        session = Session(engine, "non_shared", max_len=model.config.max_position_embeddings, tokenizer=tok)
        em.append(score(run_episode(session, q.text, tools=tools).answer, q.answer)["em"])
    assert np.mean(em) >= FLOOR_EM, f"EM {np.mean(em):.2f} over {len(em)} questions < floor {FLOOR_EM}"


# ---- training data: many worlds, none of the evaluation world's names -------------------------
def test_training_worlds_never_name_a_held_out_entity():
    """Every held-out (validation / test) entity name of the evaluation world is absent from the
    whole training text (corpus and gold trajectories), and the training worlds differ from each
    other (fresh names per world), so no evaluated fact can be memorised."""
    from lragent_jax.task import render

    s = dict(train_miniature.PRESETS["tiny"])
    world, data, val_eps = train_miniature.build_data(s, 0)
    text = "\n".join(data.corpus) + "\n".join(render(g) for g in data.gold)
    held_out = [e.name for r in ("validation", "test") for e in world.region_entities(r)]
    assert held_out and not [n for n in held_out if n in text]
    assert not world.name_words() & data.name_words
    assert len(data.seeds) == s["train_worlds"] and 0 not in data.seeds
    # the worlds are really different: a sample of gold questions names subjects of several worlds
    assert len({render(g).split("\n")[0] for g in data.gold}) == len(data.gold)
    assert val_eps and all(seg[0][1].startswith("Question:") for seg in val_eps)


def test_build_training_data_is_the_same_for_any_worker_count():
    from lragent_jax.task import SMALL_CONFIG, build_training_data

    kw = dict(reserved_words={"abc"}, browsing_per_question=0.2, gold_episodes_total=30)
    one = build_training_data([5, 6], SMALL_CONFIG, workers=1, **kw)
    two = build_training_data([5, 6], SMALL_CONFIG, workers=2, **kw)
    assert one.corpus == two.corpus and one.gold == two.gold and len(one.gold) == 30


def test_reserved_words_keep_a_world_off_another_worlds_names():
    from lragent_jax.task import SMALL_CONFIG, build_world

    a = build_world(1, SMALL_CONFIG)
    b = build_world(2, SMALL_CONFIG, reserved_words=a.name_words())
    assert a.name_words() and not a.name_words() & b.name_words()


def test_encode_episodes_matches_segment_by_segment_encoding(tmp_path):
    from lragent_jax.loading import load_tokenizer
    from lragent_jax.task import SMALL_CONFIG, build_world, encode_episodes, encode_segments, gold_episodes, render
    from lragent_jax.task import train_tokenizer

    world = build_world(4, SMALL_CONFIG)
    eps = gold_episodes(world, "train")[:40]
    tok = load_tokenizer(train_tokenizer([render(e) for e in eps], str(tmp_path / "tok"), vocab_size=400))
    batched = encode_episodes(tok, eps)
    assert len(batched) == len(eps)
    for (ids, roles), segs in zip(batched, eps):
        ref_ids, ref_roles = encode_segments(tok, segs)
        assert ids.dtype == ref_ids.dtype and roles.dtype == ref_roles.dtype
        np.testing.assert_array_equal(ids, ref_ids)
        np.testing.assert_array_equal(roles, ref_roles)


def test_pretrain_rows_packs_documents_with_eos(tmp_path):
    from lragent_jax.loading import load_tokenizer
    from lragent_jax.task import train_tokenizer
    from lragent_jax.train import pack_documents, pack_sequences

    docs = ["alpha beta gamma\n", "delta 1234 epsilon\n", "zeta\n"] * 20
    tok = load_tokenizer(train_tokenizer(docs, str(tmp_path / "tok"), vocab_size=300))
    rows, n_tokens = train_miniature.pretrain_rows(tok, docs, 16)
    ref = pack_sequences(tok(docs, add_special_tokens=True)["input_ids"], 16, sep_id=tok.eos_token_id)
    np.testing.assert_array_equal(np.stack(rows), ref)
    assert n_tokens == sum(len(tok(d)["input_ids"]) for d in docs)
    # whole documents: (tokens, mask) rows, each document BOS ... EOS inside one row
    whole, n_whole = train_miniature.pretrain_rows(tok, docs, 16, whole_documents=True)
    assert n_whole == n_tokens
    encoded = [ids + [tok.eos_token_id] for ids in tok(docs, add_special_tokens=True)["input_ids"]]
    ref_tokens, ref_mask = pack_documents(encoded, 16)
    np.testing.assert_array_equal(np.stack([t for t, _ in whole]), ref_tokens)
    np.testing.assert_array_equal(np.stack([m for _, m in whole]), ref_mask)
    row_text = [tok.decode(t[m]) for t, m in whole]
    assert sum(text.count("</s>") for text in row_text) == len(docs)
    assert all(text.count("<s>") == text.count("</s>") for text in row_text)  # no document split across rows


def test_solved_trajectories_are_of_the_chosen_templates_and_never_a_gold_question():
    """The base corpus's solved trajectories (whole gold dialogues as text) are of the chosen
    templates only, and none is a question whose gold trajectory the adapters train on."""
    from lragent_jax.task import SMALL_CONFIG, build_training_data, build_world, render

    world = build_world(5, SMALL_CONFIG)
    templates = {"film_director_birth_year", "org_country"}
    kw = dict(browsing_per_question=0.0, gold_episodes_total=40, workers=1)
    data = build_training_data([5], SMALL_CONFIG, solved_templates=templates, solved_per_question=1.0, **kw)
    plain = build_training_data([5], SMALL_CONFIG, **kw)
    solved = [d for d in data.corpus if d.startswith("Question:")]
    assert plain.solved == 0 and not [d for d in plain.corpus if d.startswith("Question:")]
    assert data.gold == plain.gold and len(solved) == data.solved > 0
    by_text = {f"Question: {q.text}\n": q for qs in world.questions.values() for q in qs}
    gold_questions = {render(g).split("\n")[0] + "\n" for g in data.gold}
    for doc in solved:
        first = doc.split("\n")[0] + "\n"
        assert by_text[first].template in templates and first not in gold_questions
        assert "\nReflect: " in doc and doc.endswith(f"finish[{by_text[first].answer}]\n")
    # every eligible question (chosen template, not gold) is there at fraction 1.0; half at 0.5
    eligible = sum(1 for r, qs in world.questions.items() for q in qs[-(-40 // 3):] if q.template in templates)
    assert data.solved == eligible
    half = build_training_data([5], SMALL_CONFIG, solved_templates=templates, solved_per_question=0.5, **kw)
    assert abs(half.solved - eligible / 2) <= 3
    with pytest.raises(ValueError, match="solved_per_question"):
        build_training_data([5], SMALL_CONFIG, solved_templates=templates, solved_per_question=1.5, **kw)


def test_held_out_templates_are_compositions_of_base_template_steps():
    """Each held-out template's steps (the facts read at each hop) occur in some base template
    (the first hop may read a new pair of known facts), so the base knows every step and only
    the composition is new."""
    from lragent_jax.task import SMALL_CONFIG, build_world

    world = build_world(0, SMALL_CONFIG)
    base = train_miniature.base_templates("compositional", world)
    held = set(train_miniature.HELD_OUT_TEMPLATES)
    assert held and not held & set(base) and set(base) | held == {q.template for q in world.questions["train"]}
    assert train_miniature.base_templates("none", world) == ()
    assert set(train_miniature.base_templates("all", world)) == set(base) | held
    examples = {}
    for q in world.questions["train"]:
        examples.setdefault(q.template, q)
    steps = lambda q: [(h.tool, h.facts) for h in q.hops]  # noqa: E731
    base_steps = {s for t in base for s in steps(examples[t])}
    for t in held:
        s = steps(examples[t])
        assert set(s[1:]) <= base_steps, t  # the first hop's fact pair may be new (e.g. year + producer)
        assert {f for _, facts in s for f in facts} <= {f for _, facts in base_steps for f in facts}, t
        assert tuple(s) not in {tuple(steps(examples[b])) for b in base}, t  # and the chain itself is new
