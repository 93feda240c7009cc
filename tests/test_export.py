"""export: HF model + PEFT adapter folders round-trip through lragent_jax.loading bit for bit, and
transformers + peft (torch, CPU, float32) load them and give our forward's logits.

Parity tolerance as tests/test_parity_hf.py: float32 on both sides, only summation order differs,
so max |diff| <= 1e-5 * max |logit|; the agents' logits differ from each other by far more.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from hf_fixtures import require_parity
from lragent_jax import train
from lragent_jax.config import ModelConfig
from lragent_jax.export import adapter_factors, save_adapters, save_model
from lragent_jax.loading import load_adapters, load_model
from lragent_jax.lora import random_adapters
from lragent_jax.model import Llama
from lragent_jax.share_a import share_a

CFG = ModelConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                  num_kv_heads=2, head_dim=16, bos_token_id=1, eos_token_ids=(2,))
AGENTS = ("plan", "action", "reflect")
REL_TOL = 1e-5


def random_model(seed: int = 0) -> Llama:
    """Random float32 Llama with random norm weights too (so a swapped norm cannot hide)."""
    model = Llama(CFG, dtype=jnp.float32, rngs=nnx.Rngs(seed))
    rng = np.random.default_rng(seed)
    norms = [model.final_norm] + [v for layer in model.layers for v in (layer.attn_norm, layer.mlp_norm)]
    for var in norms:
        var.set_value(jnp.asarray(1.0 + 0.2 * rng.standard_normal(var[...].shape), jnp.float32))
    return model


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    model = random_model()
    indep = random_adapters(CFG, AGENTS, shared_a=False, b_std=0.2, seed=1)
    stacked, _ = share_a(indep, "stack")
    base = save_model(model, root / "model")
    return {"model": model, "folder": base, "loras": {"indep": indep, "stacked": stacked},
            "paths": {k: save_adapters(v, root / k, base_model_name_or_path=base) for k, v in
                      (("indep", indep), ("stacked", stacked))}}


def test_round_trip_through_loading_is_bitwise(exported):
    model = exported["model"]
    loaded = load_model(exported["folder"], dtype=jnp.float32)
    ours, back = nnx.to_pure_dict(nnx.state(model)), nnx.to_pure_dict(nnx.state(loaded))
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), ours, back)
    for kind, lora in exported["loras"].items():
        back = load_adapters(exported["paths"][kind], loaded)
        assert back.names == lora.names and back.configs == lora.configs, kind
        assert {p: back.projections[p].shared_a for p in back.projections} == \
               {p: lora.projections[p].shared_a for p in lora.projections}, kind
        for name in AGENTS:
            got, ref = adapter_factors(back, name), adapter_factors(lora, name)
            assert set(got) == set(ref)
            for p in ref:
                np.testing.assert_array_equal(got[p][0], ref[p][0])
                np.testing.assert_array_equal(got[p][1], ref[p][1])


def _peft(folder: str, paths: dict):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager")
    names = list(paths)
    pm = PeftModel.from_pretrained(base, paths[names[0]], adapter_name=names[0])
    for n in names[1:]:
        pm.load_adapter(paths[n], adapter_name=n)
    return pm.eval()


@pytest.mark.parity
@pytest.mark.parametrize("kind", ["indep", "stacked"])
def test_transformers_and_peft_give_our_logits(exported, kind):
    torch = require_parity()
    model, lora = exported["model"], exported["loras"][kind]
    pm = _peft(exported["folder"], exported["paths"][kind])
    tokens = np.random.default_rng(5).integers(0, 256, 21)
    agents = (None,) + AGENTS
    ids = np.array([-1 if a is None else lora.adapter_id(a) for a in agents], np.int32)
    ours = np.asarray(train.forward_logits(model, jnp.asarray(np.stack([tokens] * len(agents)), jnp.int32), lora,
                                           jnp.asarray(ids)))
    x = torch.tensor(tokens[None], dtype=torch.long)
    refs = []
    with torch.no_grad():
        for agent in agents:
            if agent is None:
                with pm.disable_adapter():
                    refs.append(pm(input_ids=x).logits[0].numpy())
            else:
                pm.set_adapter(agent)
                refs.append(pm(input_ids=x).logits[0].numpy())
    for agent, got, ref in zip(agents, ours, refs):
        rel = np.abs(got - ref).max() / np.abs(ref).max()
        assert rel <= REL_TOL, (kind, agent, rel)
    assert np.abs(refs[1] - refs[0]).max() > 1e3 * REL_TOL * np.abs(refs[0]).max()  # adapters matter


def test_save_model_writes_the_tokenizer(tmp_path):
    from tokenizers import Tokenizer, models

    tok = Tokenizer(models.WordLevel({"<unk>": 0, "hello": 1}, unk_token="<unk>"))
    folder = save_model(random_model(), tmp_path / "m", tokenizer=tok)
    assert Tokenizer.from_file(str(tmp_path / "m" / "tokenizer.json")).token_to_id("hello") == 1
    assert folder == str(tmp_path / "m")
    with pytest.raises(TypeError, match="tokenizer must be"):
        save_model(random_model(), tmp_path / "n", tokenizer=42)
