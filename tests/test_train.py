"""lragent_jax.train: the cache-free forward against the Engine, the masked loss against float64
numpy, and that pre-training and (shared-A / independent) LoRA training learn what they should.

Tiny float32 model (2 layers, hidden 64, vocab 256) on CPU; a few dozen steps per run.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lragent_jax import train
from lragent_jax.cache import DenseKV
from lragent_jax.config import LoraConfig, ModelConfig
from lragent_jax.engine import Engine
from lragent_jax.export import adapter_factors
from lragent_jax.lora import SharedAError, random_adapters
from lragent_jax.model import Llama

CFG = ModelConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                  num_kv_heads=2, head_dim=16)
SEQ = 32
ROLES = ("plan", "action")


def tiny_model(seed: int = 0) -> Llama:
    return Llama(CFG, dtype=jnp.float32, rngs=nnx.Rngs(seed))


def confident_model(seed: int = 0) -> Llama:
    """tiny_model with embedding and head scaled up 25x: at the init std 0.02 the head caps every
    logit near +-0.5, so no LoRA on q/v could make a confident prediction (loss floor ~5 nats)."""
    model = tiny_model(seed)
    model.embed.set_value(model.embed[...] * 25)
    model.lm_head.set_value(model.lm_head[...] * 25)
    return model


def role_examples(seed: int = 0, n: int = 8) -> dict:
    """Per role: a random 12-token context, then the role's own 12 tokens (the loss mask), a fixed
    pattern per role that the base model cannot know; the context differs per example."""
    rng = np.random.default_rng(seed)
    patterns = {"plan": np.arange(10, 22), "action": np.arange(200, 176, -2)}
    out = {}
    for role in ROLES:
        exs = []
        for _ in range(n):
            tokens = np.concatenate([rng.integers(0, 256, 12), patterns[role]])
            exs.append((tokens, np.arange(24) >= 12))
        out[role] = exs
    return out


def test_forward_logits_matches_engine_prefill():
    """Every position's logits, per-row adapters (base, three independent adapters), against
    Engine.prefill(want_logits="all") over a DenseKV. Float32 both; the paths differ only in
    summation order (the engine attends over a padded 128-slot cache), so rel 1e-5."""
    model = tiny_model()
    lora = random_adapters(CFG, shared_a=False, b_std=0.2, seed=3)
    tokens = np.random.default_rng(1).integers(0, 256, (4, 20)).astype(np.int32)
    ids = np.array([-1, 0, 1, 2], np.int32)
    fwd = jax.jit(lambda t, lo, i: train.forward_logits(model, t, lo, i))
    ours = np.asarray(fwd(jnp.asarray(tokens), lora, jnp.asarray(ids)))
    engine = Engine(model, lora, prefill_buckets=(32,))
    ref, _ = engine.prefill(DenseKV.create(CFG, 4, 32, jnp.float32), [list(t) for t in tokens], np.zeros(4), ids,
                            want_logits="all")
    ref = np.stack(ref)
    err = np.abs(ours - ref).max() / np.abs(ref).max()
    assert err <= 1e-5, err
    assert np.abs(ref[1] - ref[0]).max() > 1e-2 * np.abs(ref).max()  # adapters are not no-ops


def test_masked_loss_matches_float64_and_ignores_unmasked_tail():
    """masked_loss equals a float64 numpy cross entropy over the masked targets (rel 1e-6,
    float32 log-softmax), and tokens after the last target (a later role's turn, padding) change
    neither the loss nor the LoRA gradient, bitwise (causal attention sees them with weight 0)."""
    model = tiny_model()
    rng = np.random.default_rng(2)
    tokens = rng.integers(0, 256, (2, SEQ)).astype(np.int32)
    mask = np.zeros((2, SEQ), bool)
    mask[:, 10:20] = True
    logits = np.asarray(train.forward_logits(model, jnp.asarray(tokens), None, jnp.array([-1, -1])), np.float64)
    logp = logits - logits.max(-1, keepdims=True)
    logp = logp - np.log(np.exp(logp).sum(-1, keepdims=True))
    nll = -np.take_along_axis(logp[:, :-1], tokens[:, 1:, None], -1)[..., 0]
    ref = (nll * mask[:, 1:]).sum(1)
    total, count = train.masked_loss(jnp.asarray(logits, jnp.float32), jnp.asarray(tokens), jnp.asarray(mask))
    np.testing.assert_allclose(np.asarray(total), ref, rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(count), [10, 10])

    params = train.init_lora_params(CFG, 1, rank=4, targets=("q", "v"), shared_a=False, seed=0)
    params = jax.tree.map(lambda x: x + 0.05 * jax.random.normal(jax.random.key(1), x.shape), params)  # B != 0
    lcfg = LoraConfig(rank=4, alpha=8.0)

    graphdef, state = nnx.split(model)

    @jax.jit
    def grad_fn(params, state, tokens, mask):
        def f(params):
            lora = train.lora_from_params(params, ("plan",), lcfg, shared_a=False)
            logits = train.forward_logits(nnx.merge(graphdef, state), tokens, lora, jnp.zeros((2,), jnp.int32))
            t, c = train.masked_loss(logits, tokens, mask)
            return t.sum() / c.sum()
        return jax.value_and_grad(f)(params)

    def loss_and_grad(params, tokens, mask):  # weights as arguments: no slow constant folding
        return grad_fn(params, state, tokens, mask)

    loss, grad = loss_and_grad(params, jnp.asarray(tokens), jnp.asarray(mask))
    tail = tokens.copy()
    tail[:, 20:] = rng.integers(0, 256, (2, SEQ - 20))
    loss2, grad2 = loss_and_grad(params, jnp.asarray(tail), jnp.asarray(mask))
    assert float(loss) == float(loss2)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), grad, grad2)
    # controls: a changed target, or changed context before the targets, does change the loss
    target = tokens.copy()
    target[:, 15] = (target[:, 15] + 1) % 256
    context = tokens.copy()
    context[:, 3] = (context[:, 3] + 1) % 256
    for changed in (target, context):
        assert float(loss_and_grad(params, jnp.asarray(changed), jnp.asarray(mask))[0]) != float(loss)


def test_pretrain_reduces_loss_on_repeating_data():
    model = tiny_model()
    data = [np.tile(np.arange(1, 9), 4) + k for k in range(4)]  # 4 repeating 32-token sequences
    before = train.eval_loss(model, {"all": data}, seq_len=SEQ)["all"]
    trained, hist = train.pretrain(model, data, steps=30, lr=3e-3, batch_size=4, seq_len=SEQ, progress=False)
    after = train.eval_loss(trained, {"all": data}, seq_len=SEQ)["all"]
    assert len(hist["loss"]) == 30 and np.isfinite(hist["loss"]).all()
    assert after < 0.5 * before, (before, after)
    # the caller's model is untouched
    assert train.eval_loss(model, {"all": data}, seq_len=SEQ)["all"] == pytest.approx(before, rel=1e-6)


def test_step_plan_without_budget_is_the_optax_schedule():
    """No budget: every requested step runs at optax's warmup-cosine rate (what training used)."""
    plan = train._StepPlan(200, 1e-3, None, 0.1, None)
    ref = train._schedule(1e-3, 200, None, 0.1)
    np.testing.assert_allclose([plan.lr(i) for i in range(200)], [float(ref(i)) for i in range(200)], rtol=1e-6)
    assert all(plan.keep_going(i) for i in range(200)) and not plan.keep_going(200) and not plan.cut


def test_step_plan_without_budget_updates_exactly_as_optax_adamw_with_the_schedule():
    """No budget: AdamW at rate 1 scaled by the plan's rate gives, bit for bit, the parameters
    optax.adamw(schedule) (what training used before the time budget) gives, step after step
    (exact: the same float32 operations, so no tolerance)."""
    import optax

    steps, lr = 60, 1e-3
    params = {"w": jax.random.normal(jax.random.key(0), (16, 8)), "norm": jnp.ones((8,))}
    mask = {"w": True, "norm": False}
    old = optax.chain(optax.clip_by_global_norm(1.0),
                      optax.adamw(train._schedule(lr, steps, None, 0.1), b1=0.9, b2=0.95, weight_decay=0.1,
                                  mask=mask))
    new = train._optimizer(0.1, 1.0, decay_mask=mask)
    plan = train._StepPlan(steps, lr, None, 0.1, None)

    @jax.jit
    def old_step(p, state, g):
        u, state = old.update(g, state, p)
        return optax.apply_updates(p, u), state

    @jax.jit
    def new_step(p, state, g, rate):
        u, state = new.update(g, state, p)
        return optax.apply_updates(p, train._scaled(u, rate)), state

    p_old, s_old, p_new, s_new = params, old.init(params), params, new.init(params)
    for i in range(steps):
        g = jax.tree.map(lambda x: jax.random.normal(jax.random.key(i + 1), x.shape), params)
        p_old, s_old = old_step(p_old, s_old, g)
        p_new, s_new = new_step(p_new, s_new, g, plan.lr(i))
        for name in params:
            np.testing.assert_array_equal(p_new[name], p_old[name], err_msg=f"step {i}, {name}")


def _run_plan(plan, now, *, compile_s, step_s) -> int:
    """Drive a _StepPlan on the fake clock `now` (the first step also compiles); steps run."""
    i = 0
    while plan.keep_going(i):
        now[0] += compile_s if i == 0 else step_s
        plan.done(i, jnp.zeros(()))
        i += 1
    return i


def test_step_plan_fits_the_time_budget_and_still_decays():
    """A fake clock: 10 s to compile, then 0.5 s a step, 100 s budget, 1000 steps asked. The plan
    shrinks to what fits (90 s / 0.5 s, less the 3% margin), ends within the budget, and the
    re-planned schedule still decays to lr * min_lr_ratio by its last step."""
    now = [0.0]
    plan = train._StepPlan(1000, 1e-3, None, 0.1, 100.0, clock=lambda: now[0])
    i = _run_plan(plan, now, compile_s=10.0, step_s=0.5)
    assert plan.cut and i == plan.planned and 160 <= i <= 181, i
    assert now[0] <= 100.0
    assert plan.lr(i - 1) == pytest.approx(1e-4, rel=0.01)  # decayed on time, not cut mid-schedule
    assert max(plan.lr(j) for j in range(i)) == pytest.approx(1e-3, rel=1e-3)  # warmup kept: peak reached
    with pytest.raises(ValueError, match="time_budget_s"):
        train._StepPlan(10, 1e-3, None, 0.1, 0.0)


def test_step_plan_cut_below_its_warmup_still_decays():
    """A budget for ~5% of the steps asked (1000 asked, warmup 100; 10 s to compile, 1 s a step,
    60 s): the plan shrinks to ~50 steps, shorter than the warmup. The rate must still come down
    to lr * min_lr_ratio by the last step (optax clamps a warmup longer than the total to the
    last step: the whole run would warm up and end at the peak rate)."""
    now = [0.0]
    plan = train._StepPlan(1000, 1e-3, None, 0.1, 60.0, clock=lambda: now[0])
    i = _run_plan(plan, now, compile_s=10.0, step_s=1.0)
    assert plan.cut and 40 <= i == plan.planned <= 55, i
    assert plan.lr(i - 1) == pytest.approx(1e-4, rel=0.05)  # one step short of the end of the cosine
    assert max(plan.lr(j) for j in range(i)) == pytest.approx(1e-3, rel=1e-3)


@pytest.mark.parametrize("budget", [float("inf"), float("nan"), -1.0])
def test_step_plan_rejects_a_budget_that_is_no_finite_positive_number(budget):
    """inf passed the > 0 check, then crashed at the first check point (int(inf): OverflowError)."""
    with pytest.raises(ValueError, match="time_budget_s"):
        train._StepPlan(100, 1e-3, None, 0.1, budget)


def test_pretrain_stops_within_its_time_budget():
    """Far more steps than fit in the budget: the run stops early (and still learns)."""
    model = tiny_model()
    data = [np.tile(np.arange(1, 9), 4) + k for k in range(4)]
    trained, hist = train.pretrain(model, data, steps=100_000, lr=3e-3, batch_size=4, seq_len=SEQ, progress=False,
                                   time_budget_s=4.0)
    assert 1 <= len(hist["loss"]) < 100_000 and np.isfinite(hist["loss"]).all()


@pytest.fixture(scope="module")
def trained_adapters():
    model = confident_model()
    examples = role_examples()
    kw = dict(steps=25, lr=3e-2, batch_size=4, seq_len=SEQ, seed=0, progress=False)
    shared, h_shared = train.train_adapters(model, examples, shared_a=True, **kw)
    indep, h_indep = train.train_adapters(model, examples, shared_a=False, **kw)
    return {"model": model, "examples": examples, "shared": shared, "indep": indep,
            "history": {"shared": h_shared, "indep": h_indep}}


@pytest.mark.parametrize("flavour", ["shared", "indep"])
def test_train_adapters_reduce_each_roles_masked_loss(trained_adapters, flavour):
    t = trained_adapters
    held_out = role_examples(seed=5)  # new contexts, same role patterns
    base = train.eval_loss(t["model"], held_out, seq_len=SEQ)
    tuned = train.eval_loss(t["model"], held_out, t[flavour], seq_len=SEQ)
    for role in ROLES:
        assert tuned[role] < 0.5 * base[role], (flavour, role, base[role], tuned[role])
    hist = t["history"][flavour]
    assert set(hist) == {"loss", *ROLES} and all(len(v) == 25 for v in hist.values())


def test_shared_a_training_keeps_one_a_and_distinct_bs(trained_adapters):
    shared = trained_adapters["shared"]
    assert shared.names == ROLES
    shared.require_shared_a("v")
    init = train.init_lora_params(CFG, 2, rank=8, targets=("q", "v"), shared_a=True, seed=0)
    plan, action = (adapter_factors(shared, r) for r in ROLES)
    for proj in ("q", "v"):
        assert shared.projections[proj].shared_a and shared.projections[proj].a.shape[1] == 1
        np.testing.assert_array_equal(plan[proj][0], action[proj][0])  # A: bitwise the same
        assert not np.array_equal(plan[proj][0], np.asarray(init[proj]["a"][:, 0]))  # and trained
        assert np.abs(plan[proj][1] - action[proj][1]).max() > 1e-3  # B: per role


def test_independent_adapters_differ_in_a(trained_adapters):
    indep = trained_adapters["indep"]
    plan, action = (adapter_factors(indep, r) for r in ROLES)
    for proj in ("q", "v"):
        assert not indep.projections[proj].shared_a
        assert np.abs(plan[proj][0] - action[proj][0]).max() > 1e-3
    with pytest.raises(SharedAError):
        indep.require_shared_a("v")


def test_bad_input_is_one_clear_error():
    model = tiny_model()
    with pytest.raises(ValueError, match="seq_len=8"):
        train.train_adapters(model, {"plan": [np.arange(20)]}, steps=1, seq_len=8, progress=False)
    with pytest.raises(ValueError, match=r"\[0, 256\)"):
        train.train_adapters(model, {"plan": [np.array([1, 2, 300])]}, steps=1, progress=False)
    with pytest.raises(ValueError, match="loss mask"):
        train.train_adapters(model, {"plan": [(np.arange(5), np.ones(4))]}, steps=1, progress=False)
    with pytest.raises(ValueError, match="named 'loss'"):
        train.train_adapters(model, {"loss": [np.arange(5)]}, steps=1, progress=False)


def test_pretrain_checks_each_batch_of_an_iterator():
    def batches():
        yield np.zeros((3, SEQ), np.int32), np.ones((3, SEQ), bool)  # 3 rows, batch_size says 4

    with pytest.raises(ValueError, match="batch_size=4"):
        train.pretrain(tiny_model(), batches(), steps=1, batch_size=4, progress=False)


def test_plot_losses_writes_png(tmp_path):
    pytest.importorskip("matplotlib")
    path = train.plot_losses({"pretrain": [3.0, 2.0, 1.5], "adapters": {"plan": [2.0, 1.0], "action": [2.5, 1.2]}},
                             tmp_path / "loss.png")
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_pack_sequences_concatenates_with_separators():
    rows = train.pack_sequences([[1, 2, 3], [4, 5], [6, 7, 8, 9]], seq_len=4, sep_id=0)
    np.testing.assert_array_equal(rows, [[1, 2, 3, 0], [4, 5, 0, 6], [7, 8, 9, 0]])
    with pytest.raises(ValueError, match="fewer than seq_len=8"):
        train.pack_sequences([[1, 2]], seq_len=8)


def test_pack_documents_keeps_every_document_whole():
    docs = [np.arange(1, 6), np.arange(10, 13), np.arange(20, 26), np.arange(30, 32), np.arange(40, 51)]
    tokens, mask = train.pack_documents(docs, seq_len=8)
    assert tokens.shape == mask.shape and tokens.shape[1] == 8 and tokens.dtype == np.int32
    # first fit: [1..5 | 10..12], [20..25 | 30 31], then the 11-token document cut into 8 + 3
    np.testing.assert_array_equal(tokens, [[1, 2, 3, 4, 5, 10, 11, 12], [20, 21, 22, 23, 24, 25, 30, 31],
                                           [40, 41, 42, 43, 44, 45, 46, 47], [48, 49, 50, 0, 0, 0, 0, 0]])
    np.testing.assert_array_equal(mask.sum(1), [8, 8, 8, 3])  # padding (and only padding) masked out
    assert not mask[3, 3:].any()
    # every document's tokens appear once, in order, inside one row (unless longer than a row)
    for doc in docs[:4]:
        hits = [r for r in range(len(tokens)) if all(t in tokens[r][mask[r]] for t in doc)]
        assert len(hits) == 1, doc
    # a window of one open row: a short document no longer goes back to an older row with room
    tokens1, _ = train.pack_documents([np.arange(1, 4), np.arange(10, 17), np.arange(20, 22)], seq_len=8,
                                      open_rows=1)
    np.testing.assert_array_equal(tokens1[:, :3], [[1, 2, 3], [10, 11, 12], [20, 21, 0]])
    with pytest.raises(ValueError, match="no tokens"):
        train.pack_documents([], seq_len=8)
    with pytest.raises(ValueError, match="1-D"):
        train.pack_documents([np.zeros((2, 2), np.int32)], seq_len=8)
