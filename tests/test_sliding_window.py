"""Mistral sliding-window attention with a window (6) shorter than the sequence (up to ~40 tokens),
against transformers' MistralForCausalLM + PEFT (float32, eager attention): prefill logits at every
position, and multi-agent greedy generation (the decode loop).

Tolerance: float32 on both sides, so only summation order differs (~1e-7 relative typical); we
assert max |diff| <= 1e-5 * max |logit| (as tests/test_parity_hf.py). Without the window the
logits past position 6 move by far more than that (asserted, so the window is really exercised).
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from hf_fixtures import AGENTS, build_hf_model, make_adapters, make_model, require_parity
from lragent_jax.engine import Engine
from lragent_jax.loading import load_adapters, load_model
from lragent_jax.session import Session

torch = require_parity()  # HF transformers + PEFT are the reference
pytestmark = pytest.mark.parity

REL_TOL = 1e-5
WINDOW = 6
MAX_LEN = 64
PROMPT = np.random.default_rng(3).integers(3, 300, 20).tolist()
TURNS = (("plan", 6), ("action", 5), ("reflect", 6))
# A larger init than hf_fixtures' default, so greedy decoding moves from token to token.
OVERRIDES = dict(sliding_window=WINDOW, initializer_range=0.2)


@pytest.fixture(scope="module")
def swa(tmp_path_factory):
    root = tmp_path_factory.mktemp("mistral_swa")
    folder = make_model(str(root / "model"), "mistral", seed=4, **OVERRIDES)
    adapters = make_adapters(folder, str(root / "adapters"), AGENTS, seed=300)
    model = load_model(folder, dtype=jnp.float32)
    assert model.config.sliding_window == WINDOW
    engine = Engine(model, load_adapters(adapters, model), prefill_buckets=(32,))

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager")
    assert base.config.sliding_window == WINDOW
    pm = PeftModel.from_pretrained(base, adapters[AGENTS[0]], adapter_name=AGENTS[0])
    for n in AGENTS[1:]:
        pm.load_adapter(adapters[n], adapter_name=n)
    return {"engine": engine, "pm": pm.eval()}


def hf_logits(pm, tokens, agent):
    pm.set_adapter(agent)
    with torch.no_grad():
        return pm(input_ids=torch.tensor([tokens])).logits[0].numpy()


def test_prefill_logits_match_hf_past_the_window(swa):
    tokens = PROMPT + [5, 6, 7, 8, 9, 10, 11, 12]  # 28 positions, window 6
    for agent in AGENTS:
        s = Session(swa["engine"], "non_shared", max_len=MAX_LEN, stop_ids=(), attention="xla")
        s.append(tokens[:1])
        ours = s.score(agent, tokens[1:])[0]  # row i predicts tokens[i + 1]: position i's logits
        ref = hf_logits(swa["pm"], tokens, agent)[:-1]
        err = np.abs(ours - ref).max()
        assert err <= REL_TOL * np.abs(ref).max(), f"{agent}: max |diff| {err:.3g}"
    # The window changes the logits past it: full causal attention gives different ones.
    full = build_hf_model("mistral", seed=4, **{**OVERRIDES, "sliding_window": None})
    with torch.no_grad():
        no_window = full(input_ids=torch.tensor([tokens])).logits[0].numpy()[:-1]
        swa["pm"].set_adapter(AGENTS[0])
        with swa["pm"].disable_adapter():
            windowed = swa["pm"](input_ids=torch.tensor([tokens])).logits[0].numpy()[:-1]
    np.testing.assert_allclose(windowed[:WINDOW], no_window[:WINDOW], rtol=1e-4, atol=1e-4)  # same weights
    assert np.abs(windowed[WINDOW:] - no_window[WINDOW:]).max() > 1e3 * REL_TOL * np.abs(windowed).max()


def hf_turns(pm, prompt):
    traj, out = list(prompt), []
    for agent, n in TURNS:
        pm.set_adapter(agent)
        x = torch.tensor([traj])
        with torch.no_grad():
            gen = pm.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=n, do_sample=False,
                              eos_token_id=None, pad_token_id=0)
        out.append(gen[0, len(traj):].tolist())
        traj += out[-1]
    return out


def test_multi_agent_greedy_decode_matches_hf(swa):
    ref = hf_turns(swa["pm"], PROMPT)
    s = Session(swa["engine"], "non_shared", max_len=MAX_LEN, stop_ids=(), attention="xla")
    s.append(PROMPT)
    for (agent, n), want in zip(TURNS, ref):
        assert len(set(want)) >= 3, f"the test model repeats tokens: {want}"
        assert s.generate(agent, n, greedy=True)[0] == want, agent
