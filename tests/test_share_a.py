"""share_a: stacking is exact (float64 delta weights, per-agent logits), the result passes the
shared-A check, and the SVD compression reports (correctly) a kept fraction monotone in rank.

Adapters differ in rank, scale (alpha/r and rsLoRA alpha/sqrt(r)) and targets, so the folding
of the scales and the union of targets are exercised.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lragent_jax.cache import DenseKV
from lragent_jax.config import LoraConfig, ModelConfig
from lragent_jax.engine import Engine
from lragent_jax.export import adapter_factors
from lragent_jax.lora import SharedAError, stack_adapters
from lragent_jax.model import Llama
from lragent_jax.share_a import share_a

CFG = ModelConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                  num_kv_heads=2, head_dim=16)
# name -> (rank, alpha, rsLoRA, targets); scales 2, 4 (= 8 / sqrt(4)) and 2: powers of two, so
# folding them into B is exact in float32 and the float64 delta weights agree to rounding of the sums.
SPECS = {"plan": (8, 16.0, False, ("q", "v")), "action": (4, 8.0, True, ("q", "v")),
         "reflect": (8, 16.0, False, ("q", "v", "o"))}
TOTAL_RANK = 20


def make_adapters(seed: int = 0):
    rng = np.random.default_rng(seed)
    per = {}
    for name, (r, alpha, rs, targets) in SPECS.items():
        factors = {}
        for proj in targets:
            d_in, d_out = CFG.projection_dims(proj)
            factors[proj] = (rng.normal(0, d_in ** -0.5, (CFG.num_layers, d_in, r)).astype(np.float32),
                             rng.normal(0, 0.1, (CFG.num_layers, r, d_out)).astype(np.float32))
        per[name] = (LoraConfig(rank=r, alpha=alpha, target_modules=targets, use_rslora=rs), factors)
    return stack_adapters(CFG, per), per


def deltas(lora, name) -> dict:
    """float64 delta weights s A B [L, d_in, d_out] of one adapter, per projection it targets."""
    s = lora.configs[lora.adapter_id(name)].scale
    return {p: s * np.einsum("ldr,lro->ldo", a.astype(np.float64), b.astype(np.float64))
            for p, (a, b) in adapter_factors(lora, name).items()}


@pytest.fixture(scope="module")
def adapters():
    return make_adapters()[0]


def test_stack_is_exact_in_float64(adapters):
    stacked, report = share_a(adapters, "stack")
    assert report["rank"] == TOTAL_RANK and all(k == 1.0 for k in report["kept"].values())
    assert all(c == LoraConfig(rank=TOTAL_RANK, alpha=float(TOTAL_RANK), target_modules=("q", "v", "o"))
               for c in stacked.configs)
    for name in SPECS:
        ref, got = deltas(adapters, name), deltas(stacked, name)
        assert set(got) == {"q", "v", "o"}
        for proj in got:
            if proj not in ref:  # an untargeted projection stays exactly zero
                assert not got[proj].any(), (name, proj)
                continue
            # float64 products of identical float32 factors: only the sum order may differ
            np.testing.assert_allclose(got[proj], ref[proj], rtol=0, atol=1e-12 * np.abs(ref[proj]).max())


def test_stack_passes_shared_a_check_where_the_originals_fail(adapters):
    with pytest.raises(SharedAError):
        adapters.require_shared_a("v")
    stacked, _ = share_a(adapters, "stack")
    for proj in ("q", "v", "o"):
        stacked.require_shared_a(proj)
        assert stacked.projections[proj].a.shape == (CFG.num_layers, 1, CFG.projection_dims(proj)[0], TOTAL_RANK)


def test_stack_per_agent_logits_equal_the_unshared_adapters(adapters):
    """non_shared semantics (each agent prefills its own DenseKV): every agent's logits at every
    position, original adapters vs stacked ones. Float32 with different contraction widths (r vs
    20), so rel 1e-5; the agents' logits differ from each other by far more."""
    model = Llama(CFG, dtype=jnp.float32, rngs=nnx.Rngs(0))
    tokens = np.random.default_rng(4).integers(0, 256, 24).tolist()
    stacked, _ = share_a(adapters, "stack")
    out = {}
    for label, lora in (("orig", adapters), ("stacked", stacked)):
        eng = Engine(model, lora, prefill_buckets=(32,))
        ids = eng.adapter_ids(list(SPECS))
        logits, _ = eng.prefill(DenseKV.create(CFG, 3, 32, jnp.float32), [tokens] * 3, np.zeros(3), ids,
                                want_logits="all")
        out[label] = np.stack(logits)
    ref = out["orig"]
    err = np.abs(out["stacked"] - ref).max() / np.abs(ref).max()
    assert err <= 1e-5, err
    assert np.abs(ref[0] - ref[1]).max() > 1e-2 * np.abs(ref).max()


def test_svd_at_full_rank_equals_stack(adapters):
    stacked, _ = share_a(adapters, "stack")
    full, report = share_a(adapters, "svd", rank=TOTAL_RANK)
    for name in SPECS:
        assert report["kept"][name] == pytest.approx(1.0, abs=1e-9)
        ref, got = deltas(stacked, name), deltas(full, name)
        for proj in ref:  # float32 storage of orthonormal A'' and projected B''
            np.testing.assert_allclose(got[proj], ref[proj], rtol=0, atol=1e-5 * np.abs(ref[proj]).max())
    full.require_shared_a("v")


def test_svd_kept_fraction_is_correct_and_monotone_in_rank(adapters):
    stacked, _ = share_a(adapters, "stack")
    kept = {}
    for rank in (1, 2, 4, 8, 12, 16, 20):
        compressed, report = share_a(adapters, "svd", rank=rank)
        assert compressed.configs[0].rank == rank and compressed.projections["v"].a.shape[-1] == rank
        kept[rank] = report["kept"]
        for name in SPECS:  # the reported fraction is what the factors really keep
            ref, got = deltas(stacked, name), deltas(compressed, name)
            err = sum(((got[p] - ref[p]) ** 2).sum() for p in ref)
            norm = sum((ref[p] ** 2).sum() for p in ref)
            assert 1.0 - err / norm == pytest.approx(report["kept"][name], abs=1e-4), (rank, name)
            assert report["rel_error"][name] == pytest.approx(np.sqrt(err / norm), abs=1e-3)
    for name in SPECS:
        seq = [kept[r][name] for r in sorted(kept)]
        assert all(b >= a - 1e-9 for a, b in zip(seq, seq[1:])), (name, seq)
        assert seq[0] < 0.5 < seq[-1]


def test_bad_arguments_are_clear_errors(adapters):
    with pytest.raises(ValueError, match="allowed"):
        share_a(adapters, "mean")
    with pytest.raises(ValueError, match="rank in 1..20"):
        share_a(adapters, "svd")
    with pytest.raises(ValueError, match="rank in 1..20"):
        share_a(adapters, "svd", rank=21)
    with pytest.raises(ValueError, match="method='svd'"):
        share_a(adapters, "stack", rank=8)


def test_base_lr_shared_serves_stacked_adapters(adapters):
    """base_lr_shared refuses the independent adapters and runs the stacked ones; with one agent
    taking every turn it must equal that agent's plain forward with the original adapters
    (docs/design.md section 2 invariant), so the rank-20 LR cache path is checked end to end. Float32,
    cache vs cache-free attention: rel 1e-5."""
    from lragent_jax.session import Session
    from lragent_jax.train import forward_logits

    model = Llama(CFG, dtype=jnp.float32, rngs=nnx.Rngs(0))
    with pytest.raises(SharedAError):
        Session(Engine(model, adapters, prefill_buckets=(32,)), "base_lr_shared", max_len=64, attention="xla")
    stacked, _ = share_a(adapters, "stack")
    session = Session(Engine(model, stacked, prefill_buckets=(32,)), "base_lr_shared", max_len=64, attention="xla")
    tokens = np.random.default_rng(6).integers(0, 256, 24)
    session.append(tokens[:8].tolist())
    got = session.score("action", tokens[8:].tolist())[0]  # logits predicting tokens[8:]
    ref = np.asarray(forward_logits(model, jnp.asarray(tokens[None], jnp.int32), adapters,
                                    jnp.asarray([adapters.adapter_id("action")], jnp.int32)))[0, 7:23]
    err = np.abs(got - ref).max() / np.abs(ref).max()
    assert err <= 1e-5, err
