"""Loader round trips and errors: HF safetensors -> Llama, PEFT -> LoraWeights, orbax, tokenizer."""

from __future__ import annotations

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file

from hf_fixtures import AGENTS, hf_config, make_adapter, make_model
from lragent_jax.config import ConfigError
from lragent_jax.loading import (
    AdapterError, WeightsError, load_adapters, load_model, load_tokenizer, resolve_path,
    restore_converted, save_converted, save_hf_model,
)


def _params(model) -> dict:
    return jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model)))


def _hf_expected(folder: str) -> dict:
    """Our per-layer layout computed independently from the HF state dict (transposed)."""
    sd = {}  # every safetensors file as written (no torch: read with safetensors.numpy)
    for file in sorted(f for f in os.listdir(folder) if f.endswith(".safetensors")):
        sd.update(load_file(os.path.join(folder, file)))
    L = sum(1 for k in sd if k.endswith("input_layernorm.weight"))
    names = {"attn_norm": ("input_layernorm.weight", False), "mlp_norm": ("post_attention_layernorm.weight", False),
             "wq": ("self_attn.q_proj.weight", True), "wk": ("self_attn.k_proj.weight", True),
             "wv": ("self_attn.v_proj.weight", True), "wo": ("self_attn.o_proj.weight", True),
             "w_gate": ("mlp.gate_proj.weight", True), "w_up": ("mlp.up_proj.weight", True),
             "w_down": ("mlp.down_proj.weight", True)}
    layer = lambda i: {name: sd[f"model.layers.{i}.{suffix}"].T if t else sd[f"model.layers.{i}.{suffix}"]
                       for name, (suffix, t) in names.items()}
    out = {
        "embed": sd["model.embed_tokens.weight"],
        "final_norm": sd["model.norm.weight"],
        "layers": {i: layer(i) for i in range(L)},
    }
    return out, sd


def _assert_tree_equal(a, b):
    flat_a, flat_b = jax.tree_util.tree_leaves_with_path(a), jax.tree_util.tree_leaves_with_path(b)
    assert [p for p, _ in flat_a] == [p for p, _ in flat_b]
    for (path, x), (_, y) in zip(flat_a, flat_b):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=jax.tree_util.keystr(path))


def _copy(src, dst) -> str:
    shutil.copytree(src, dst)
    return str(dst)


def _rewrite(file: str, edit) -> None:
    """Rewrite a safetensors file through edit(dict) -> dict (numpy, no pickle)."""
    tensors = load_file(file)
    save_file(edit(dict(tensors)), file, metadata={"format": "pt"})


# ---- model --------------------------------------------------------------------------------------
def test_load_model_matches_hf_weights(hf_case):
    model = load_model(hf_case["model"], dtype=jnp.float32)
    expected, sd = _hf_expected(hf_case["model"])
    got = _params(model)
    if hf_case["kind"] == "llama3_tied":
        assert model.lm_head is None and model.config.tie_word_embeddings
    else:
        expected["lm_head"] = sd["lm_head.weight"].T
    _assert_tree_equal(got, expected)
    assert model.config.model_type == ("mistral" if hf_case["kind"] == "mistral" else "llama")


def test_sharded_checkpoint(tmp_path, llama_case):
    folder = make_model(str(tmp_path / "sharded"), "llama", seed=0, max_shard_size="40KB")
    assert os.path.isfile(os.path.join(folder, "model.safetensors.index.json"))
    assert len([f for f in os.listdir(folder) if f.endswith(".safetensors")]) > 2
    assert not os.path.exists(os.path.join(folder, "model.safetensors"))
    _assert_tree_equal(_params(load_model(folder, jnp.float32)), _params(load_model(llama_case["model"], jnp.float32)))


def test_default_dtype_is_bf16_and_bf16_checkpoints_load(tmp_path, llama_case):
    f32 = _params(load_model(llama_case["model"], jnp.float32))
    bf = load_model(llama_case["model"])
    assert bf.dtype == jnp.bfloat16
    _assert_tree_equal(_params(bf), jax.tree.map(lambda x: x.astype(jnp.bfloat16), f32))
    # A checkpoint stored in bfloat16 (as most hub checkpoints are).
    bf16 = make_model(str(tmp_path / "bf16"), "llama", seed=0, dtype="bfloat16")
    _assert_tree_equal(_params(load_model(bf16)), _params(bf))


def test_bin_only_folder_is_refused(tmp_path):
    folder = tmp_path / "binonly"
    folder.mkdir()
    hf_config("llama").save_pretrained(folder)
    (folder / "pytorch_model.bin").write_bytes(b"PK\x03\x04")  # refused by name, never unpickled
    with pytest.raises(WeightsError, match=r"pytorch_model\.bin.*safetensors") as e:
        load_model(folder, jnp.float32)
    assert "save_pretrained" in str(e.value)


def test_missing_wrong_shape_and_extra_tensors(tmp_path, llama_case):
    name = "model.layers.1.mlp.down_proj.weight"
    missing = _copy(llama_case["model"], tmp_path / "missing")
    _rewrite(os.path.join(missing, "model.safetensors"), lambda t: {k: v for k, v in t.items() if k != name})
    with pytest.raises(WeightsError, match=r"missing tensors.*model\.layers\.1\.mlp\.down_proj\.weight"):
        load_model(missing, jnp.float32)

    wrong = _copy(llama_case["model"], tmp_path / "wrong")
    _rewrite(os.path.join(wrong, "model.safetensors"), lambda t: {**t, name: t[name][:, :100].copy()})
    with pytest.raises(WeightsError, match=r"model\.layers\.1\.mlp\.down_proj\.weight.*\(64, 100\).*\(64, 128\)"):
        load_model(wrong, jnp.float32)

    extra = _copy(llama_case["model"], tmp_path / "extra")
    _rewrite(os.path.join(extra, "model.safetensors"),
             lambda t: {**t, "model.layers.2.mlp.up_proj.weight": t["model.layers.1.mlp.up_proj.weight"]})
    with pytest.raises(WeightsError, match=r"unexpected tensor 'model\.layers\.2\.mlp\.up_proj\.weight'.*2 layers"):
        load_model(extra, jnp.float32)


def test_untied_config_without_lm_head(tmp_path, llama_case):
    folder = _copy(llama_case["model"], tmp_path / "nohead")
    _rewrite(os.path.join(folder, "model.safetensors"), lambda t: {k: v for k, v in t.items() if k != "lm_head.weight"})
    with pytest.raises(WeightsError, match=r"lm_head\.weight.*tie_word_embeddings=false"):
        load_model(folder, jnp.float32)


def test_tied_config_with_redundant_lm_head_is_tied(tmp_path, hf_case_factory):
    folder = _copy(hf_case_factory("llama3_tied")["model"], tmp_path / "tied_extra")
    _rewrite(os.path.join(folder, "model.safetensors"),
             lambda t: {**t, "lm_head.weight": t["model.embed_tokens.weight"].copy()})
    assert load_model(folder, jnp.float32).lm_head is None


def test_gpt2_config_is_refused(tmp_path):
    from transformers import GPT2Config

    GPT2Config(n_layer=1, n_embd=32, n_head=2).save_pretrained(tmp_path)
    with pytest.raises(ConfigError, match=r"GPT2LMHeadModel|gpt2"):
        load_model(tmp_path, jnp.float32)


def test_paths_and_hub_ids(tmp_path, monkeypatch, llama_case):
    with pytest.raises(FileNotFoundError, match="no such folder"):
        load_model(str(tmp_path / "nope"))
    calls = []

    def fake_snapshot_download(repo_id, allow_patterns=None, **kw):
        calls.append((repo_id, tuple(allow_patterns)))
        return llama_case["model"]

    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    assert load_model("some-org/tiny-llama", jnp.float32).config.hidden_size == 64
    repo, patterns = calls[0]
    assert repo == "some-org/tiny-llama" and "*.safetensors" in patterns
    assert not any(p.endswith(".bin") or p == "*" for p in patterns)  # never fetch pickle

    def offline(repo_id, **kw):
        raise OSError("offline")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(FileNotFoundError, match=r"'some-org/missing'.*HF hub.*offline"):
        resolve_path("some-org/missing")

    def offline_with_advice(repo_id, **kw):  # huggingface_hub appends a paragraph of advice
        raise OSError("Got: ConnectError: no route\n\nAn error happened while trying to locate the files on the Hub.")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline_with_advice)
    with pytest.raises(FileNotFoundError) as err:
        resolve_path("some-org/missing")
    assert len(str(err.value).splitlines()) == 1 and "ConnectError: no route" in str(err.value)


def test_load_tokenizer(tmp_path, llama_case):
    assert load_tokenizer(llama_case["model"]) is None
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({"[UNK]": 0, "hello": 1, "world": 2}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    folder = _copy(llama_case["model"], tmp_path / "with_tok")
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]").save_pretrained(folder)
    loaded = load_tokenizer(folder)
    assert loaded("hello world there")["input_ids"] == [1, 2, 0]


def test_save_hf_model_round_trip(tmp_path, hf_case):
    model = load_model(hf_case["model"], jnp.float32)
    out = save_hf_model(model, tmp_path / "out")
    _assert_tree_equal(_params(load_model(out, jnp.float32)), _params(model))
    _, ref = _hf_expected(hf_case["model"])  # the HF tensors, names and [out, in] layouts as written
    _, back = _hf_expected(str(out))
    assert ref.keys() == back.keys()
    for k in ref:
        np.testing.assert_array_equal(back[k], ref[k])


# ---- adapters -----------------------------------------------------------------------------------
def _peft_factors(folder: str) -> dict:
    return load_file(os.path.join(folder, "adapter_model.safetensors"))


def test_load_adapters_values_and_shared_a(llama_case):
    model = load_model(llama_case["model"], jnp.float32)
    lora = load_adapters(llama_case["adapters"], model)
    assert lora.names == AGENTS and set(lora.projections) == {"q", "v"}
    assert lora.projections["q"].a.dtype == jnp.float32
    for p, module, d_out in (("q", "q_proj", 64), ("v", "v_proj", 32)):
        lp = lora.projections[p]
        assert not lp.shared_a and lp.a.shape == (2, 3, 64, 8) and lp.b.shape == (2, 3, 8, d_out)
        np.testing.assert_array_equal(np.asarray(lp.scale), [2.0, 2.0, 2.0])  # alpha 16 / r 8
        for i, agent in enumerate(AGENTS):
            t = _peft_factors(llama_case["adapters"][agent])
            for layer in range(2):
                pre = f"base_model.model.model.layers.{layer}.self_attn.{module}"
                np.testing.assert_array_equal(np.asarray(lp.a[layer, i]), t[f"{pre}.lora_A.weight"].T)
                np.testing.assert_array_equal(np.asarray(lp.b[layer, i]), t[f"{pre}.lora_B.weight"].T)
    shared = load_adapters(llama_case["shared_adapters"], model, dtype=jnp.bfloat16)
    assert shared.projections["v"].shared_a and shared.projections["v"].a.shape == (2, 1, 64, 8)
    assert shared.projections["v"].b.dtype == jnp.bfloat16
    shared.require_shared_a("v")


def test_default_adapter_key_variant_and_subfolder(tmp_path, llama_case):
    model = load_model(llama_case["model"], jnp.float32)
    folder = _copy(llama_case["adapters"]["plan"], tmp_path / "variant")
    _rewrite(os.path.join(folder, "adapter_model.safetensors"),
             lambda t: {k.replace(".lora_A.", ".lora_A.default.").replace(".lora_B.", ".lora_B.default."): v
                        for k, v in t.items()})
    ref = load_adapters({"plan": llama_case["adapters"]["plan"]}, model)
    _assert_tree_equal(load_adapters({"plan": folder}, model), ref)
    # PeftModel.save_pretrained stores a non-default adapter in <folder>/<name>/.
    nested = tmp_path / "nested"
    shutil.copytree(llama_case["adapters"]["plan"], nested / "plan")
    _assert_tree_equal(load_adapters({"plan": str(nested)}, model), ref)


def test_adapter_wrong_shape_names_adapter_and_tensor(tmp_path, llama_case):
    model = load_model(llama_case["model"], jnp.float32)
    folder = _copy(llama_case["adapters"]["action"], tmp_path / "bad")
    key = "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"
    _rewrite(os.path.join(folder, "adapter_model.safetensors"), lambda t: {**t, key: t[key][:16].copy()})
    with pytest.raises(AdapterError, match=r"adapter 'action'.*layers\.1\.self_attn\.v_proj\.lora_B\.weight.*\(16, 8\).*\(32, 8\)"):
        load_adapters({"plan": llama_case["adapters"]["plan"], "action": folder}, model)


def test_adapter_rank_mismatch_with_config(tmp_path, llama_case):
    model = load_model(llama_case["model"], jnp.float32)
    folder = _copy(llama_case["adapters"]["plan"], tmp_path / "rank")
    cfg_path = os.path.join(folder, "adapter_config.json")
    cfg = json.load(open(cfg_path))
    cfg["r"] = 4
    json.dump(cfg, open(cfg_path, "w"))
    with pytest.raises(AdapterError, match=r"adapter 'plan'.*lora_A\.weight.*\(8, 64\).*\(4, 64\)"):
        load_adapters({"plan": folder}, model)


def test_adapter_missing_layer(tmp_path, llama_case):
    model = load_model(llama_case["model"], jnp.float32)
    folder = _copy(llama_case["adapters"]["reflect"], tmp_path / "nolayer")
    _rewrite(os.path.join(folder, "adapter_model.safetensors"),
             lambda t: {k: v for k, v in t.items() if ".layers.1.self_attn.q_proj" not in k})
    with pytest.raises(AdapterError, match=r"adapter 'reflect'.*layers\.1\.self_attn\.q_proj\.lora_A"):
        load_adapters({"reflect": folder}, model)


def test_adapter_unsupported_target_module(tmp_path, llama_case):
    model = load_model(llama_case["model"], jnp.float32)
    folder = make_adapter(llama_case["model"], str(tmp_path / "embed"), seed=1, targets=("embed_tokens", "q_proj"))
    with pytest.raises(AdapterError, match=r"adapter 'emb'.*embed_tokens.*not supported.*q_proj"):
        load_adapters({"emb": folder}, model)


def test_adapter_for_other_base_shape(tmp_path, llama_case):
    model = load_model(llama_case["model"], jnp.float32)
    other = make_model(str(tmp_path / "other_base"), "llama", seed=3, hidden_size=32, intermediate_size=96)
    folder = make_adapter(other, str(tmp_path / "other_adapter"), seed=1)
    # The base config is on disk: the mismatch is named from it.
    with pytest.raises(AdapterError, match=r"adapter 'plan'.*does not match.*hidden_size: adapter base 32 vs model 64"):
        load_adapters({"plan": folder}, model)
    # Base not available offline: the tensor shapes catch it.
    cfg_path = os.path.join(folder, "adapter_config.json")
    cfg = json.load(open(cfg_path))
    cfg["base_model_name_or_path"] = str(tmp_path / "gone")
    json.dump(cfg, open(cfg_path, "w"))
    with pytest.raises(AdapterError, match=r"adapter 'plan'.*layers\.0\.self_attn\.q_proj\.lora_A\.weight.*\(8, 32\).*\(8, 64\)"):
        load_adapters({"plan": folder}, model)


def test_adapter_for_deeper_base(tmp_path, llama_case):
    model = load_model(llama_case["model"], jnp.float32)
    deeper = make_model(str(tmp_path / "deeper"), "llama", seed=3, num_hidden_layers=3)
    folder = make_adapter(deeper, str(tmp_path / "deeper_adapter"), seed=1)
    with pytest.raises(AdapterError, match=r"num_layers: adapter base 3 vs model 2"):
        load_adapters({"plan": folder}, model)
    cfg_path = os.path.join(folder, "adapter_config.json")
    cfg = json.load(open(cfg_path))
    cfg["base_model_name_or_path"] = "some-org/not-cached-anywhere"
    json.dump(cfg, open(cfg_path, "w"))
    with pytest.raises(AdapterError, match=r"adapter 'plan'.*layers\.2\..*layer 2.*2 layers"):
        load_adapters({"plan": folder}, model)


def test_adapter_for_unsupported_base_type(tmp_path, llama_case):
    from transformers import GPT2Config

    model = load_model(llama_case["model"], jnp.float32)
    GPT2Config(n_layer=1, n_embd=32, n_head=2).save_pretrained(tmp_path / "gpt2")
    folder = _copy(llama_case["adapters"]["plan"], tmp_path / "for_gpt2")
    cfg_path = os.path.join(folder, "adapter_config.json")
    cfg = json.load(open(cfg_path))
    cfg["base_model_name_or_path"] = str(tmp_path / "gpt2")
    json.dump(cfg, open(cfg_path, "w"))
    with pytest.raises(AdapterError, match=r"adapter 'plan'.*gpt2.*not supported"):
        load_adapters({"plan": folder}, model)


def test_adapter_pickle_only_and_bad_arguments(tmp_path, llama_case):
    model = load_model(llama_case["model"], jnp.float32)
    folder = _copy(llama_case["adapters"]["plan"], tmp_path / "pickled")
    os.rename(os.path.join(folder, "adapter_model.safetensors"), os.path.join(folder, "adapter_model.bin"))
    with pytest.raises(AdapterError, match=r"adapter 'plan'.*no adapter_model\.safetensors.*pickle"):
        load_adapters({"plan": folder}, model)
    with pytest.raises(AdapterError, match="non-empty mapping"):
        load_adapters([llama_case["adapters"]["plan"]], model)
    (tmp_path / "empty").mkdir()
    with pytest.raises(AdapterError, match=r"adapter 'x'.*no adapter_config\.json"):
        load_adapters({"x": str(tmp_path / "empty")}, model)


def test_rslora_scale_and_mixed_ranks_targets(tmp_path, llama_case):
    model = load_model(llama_case["model"], jnp.float32)
    rs = make_adapter(llama_case["model"], str(tmp_path / "rs"), seed=5, rank=4, alpha=8.0, use_rslora=True,
                      targets=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"))
    lora = load_adapters({"plan": llama_case["adapters"]["plan"], "critic": rs}, model)
    assert lora.configs[1].use_rslora and lora.configs[1].scale == pytest.approx(8.0 / 2.0)
    assert set(lora.projections) == {"q", "k", "v", "o", "gate", "up", "down"}
    q, k = lora.projections["q"], lora.projections["k"]
    np.testing.assert_allclose(np.asarray(q.scale), [2.0, 4.0])
    np.testing.assert_allclose(np.asarray(k.scale), [0.0, 4.0])  # plan does not target k_proj
    assert q.a.shape == (2, 2, 64, 8)  # padded to the largest rank
    np.testing.assert_array_equal(np.asarray(q.a[:, 1, :, 4:]), 0.0)


# ---- orbax --------------------------------------------------------------------------------------
def test_orbax_save_restore(tmp_path, hf_case):
    model = load_model(hf_case["model"], jnp.float32)
    lora = load_adapters(hf_case["shared_adapters"], model)
    from lragent_jax.engine import Engine

    Engine(model, lora, layer_mode="per_layer")  # building an Engine leaves the model as it was
    out = save_converted(tmp_path / "conv", model, lora)
    m2, l2 = restore_converted(out)
    assert m2.config == model.config and m2.dtype == model.dtype
    assert (m2.lm_head is None) == (model.lm_head is None)
    _assert_tree_equal(_params(m2), _params(model))
    assert l2.names == lora.names and l2.configs == lora.configs
    assert {p: v.shared_a for p, v in l2.projections.items()} == {p: v.shared_a for p, v in lora.projections.items()}
    _assert_tree_equal(l2, lora)
    mb, lb = restore_converted(out, dtype=jnp.bfloat16)
    assert mb.dtype == jnp.bfloat16 and lb.projections["q"].a.dtype == jnp.bfloat16
    assert lb.projections["q"].scale.dtype == jnp.float32
    _assert_tree_equal(_params(mb), jax.tree.map(lambda x: x.astype(jnp.bfloat16), _params(model)))
    with pytest.raises(FileExistsError, match="overwrite=True"):
        save_converted(out, model)
    save_converted(out, model, overwrite=True)
    m3, l3 = restore_converted(out)
    assert l3 is None
    _assert_tree_equal(_params(m3), _params(model))
