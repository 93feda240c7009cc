"""Training with optax: full-parameter pre-training of the base Llama and (shared-A) multi-LoRA fine-tuning.

Data is generic token data. An *example* is a token sequence (every token after the first is a
target) or a pair (tokens, loss_mask): loss_mask[t] = 1 makes token t a target, predicted from
tokens[:t]; a role's own tokens, say. Examples are right-padded to one fixed `seq_len`, so each
jitted step compiles once; padding is masked out and, the attention being causal, never seen by
the real tokens.

Train a float32 model (optimizer moments and updates in bfloat16 lose too much); cast afterwards.

time_budget_s (pretrain, train_adapters): the run ends within that many seconds however fast the
device is: the loop times its steps and, when the requested steps would not fit, plans fewer,
with the learning-rate schedule recomputed for the new total (so the rate still decays to its end
value) rather than cut off mid-schedule. The steps done are len(history["loss"]).
"""

from __future__ import annotations

import functools
import math
import time
from typing import Iterable, Iterator, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from .config import LoraConfig
from .lora import LoraProjection, LoraWeights
from .forward import forward_logits
from .model import Llama

__all__ = [
    "pretrain", "train_adapters", "eval_loss", "masked_loss", "pack_sequences", "pack_documents", "plot_losses",
    "init_lora_params", "lora_from_params", "forward_logits",
]




def masked_loss(logits: jax.Array, tokens: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Per-row (summed next-token cross entropy over targets, number of targets): [B], [B].

    logits [B, S, V] float32; mask[b, t] = 1 makes tokens[b, t] a target (t >= 1)."""
    logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]
    m = mask[:, 1:].astype(jnp.float32)
    return (nll * m).sum(axis=1), m.sum(axis=1)


# ---- data --------------------------------------------------------------------------------------
def _as_example(ex, where: str) -> tuple[np.ndarray, np.ndarray]:
    """A token sequence or a (tokens, loss_mask) pair -> (int32 tokens, bool mask), checked."""
    if isinstance(ex, tuple) and len(ex) == 2:
        tokens, mask = np.asarray(ex[0]), np.asarray(ex[1])
        if tokens.shape != mask.shape:
            raise ValueError(f"{where}: tokens {tokens.shape} and loss mask {mask.shape} differ in shape")
    else:
        tokens = np.asarray(ex)
        mask = np.ones(tokens.shape, bool)
    if tokens.ndim != 1 or tokens.size < 2:
        raise ValueError(f"{where}: an example is a 1-D sequence of at least 2 token ids, got shape {tokens.shape}")
    if not np.issubdtype(tokens.dtype, np.integer):
        raise ValueError(f"{where}: token ids must be integers, got dtype {tokens.dtype}")
    return tokens.astype(np.int32), mask.astype(bool)


def _check_vocab(tokens: np.ndarray, vocab_size: int, where: str) -> None:
    if tokens.size and (tokens.min() < 0 or tokens.max() >= vocab_size):
        raise ValueError(f"{where}: token ids must lie in [0, {vocab_size}), got [{tokens.min()}, {tokens.max()}]")


def _pad_examples(examples: Sequence, seq_len: int, vocab_size: int, where: str, *, split_long: bool):
    """Examples -> tokens [N, seq_len] int32, mask [N, seq_len] bool (padding masked out).

    split_long: cut longer examples into consecutive seq_len pieces (pre-training text); else
    an example longer than seq_len is an error (cutting would drop context or targets)."""
    rows, masks = [], []
    for i, ex in enumerate(examples):
        tokens, mask = _as_example(ex, f"{where} example {i}")
        _check_vocab(tokens, vocab_size, f"{where} example {i}")
        if len(tokens) > seq_len and not split_long:
            raise ValueError(f"{where} example {i} has {len(tokens)} tokens > seq_len={seq_len}; "
                             f"raise seq_len or shorten the example")
        for lo in range(0, len(tokens), seq_len):
            t, m = tokens[lo:lo + seq_len], mask[lo:lo + seq_len].copy()
            if len(t) < 2:
                continue
            m[0] = False  # the first token of a row has nothing to be predicted from
            rows.append(np.pad(t, (0, seq_len - len(t))))
            masks.append(np.pad(m, (0, seq_len - len(m))))
    if not rows:
        raise ValueError(f"{where}: no examples")
    tokens, mask = np.stack(rows), np.stack(masks)
    if not mask.any():
        raise ValueError(f"{where}: every loss mask is empty; nothing to train on")
    return tokens, mask


def _default_seq_len(example_lists: Iterable[Sequence]) -> int:
    longest = max(len(_as_example(ex, "example")[0]) for exs in example_lists for ex in exs)
    return -(-longest // 16) * 16  # a multiple of 16


def pack_sequences(sequences: Iterable[Sequence[int]], seq_len: int, sep_id: int | None = None) -> np.ndarray:
    """Concatenate token sequences (with sep_id between them if given) and cut the stream into
    full rows [N, seq_len] (the remainder is dropped): pre-training text without padding."""
    stream: list[int] = []
    for s in sequences:
        stream.extend(int(t) for t in s)
        if sep_id is not None:
            stream.append(int(sep_id))
    n = len(stream) // seq_len
    if n == 0:
        raise ValueError(f"pack_sequences: {len(stream)} tokens are fewer than seq_len={seq_len}")
    return np.asarray(stream[: n * seq_len], np.int32).reshape(n, seq_len)


def pack_documents(documents: Iterable[Sequence[int]], seq_len: int, *, open_rows: int = 32):
    """Pack documents into rows of seq_len tokens without cutting any: (tokens [N, seq_len] int32,
    loss_mask [N, seq_len] bool), padding (id 0) masked out. A document goes into the first of the
    last `open_rows` rows with room for it, else opens a new row (first fit over a window, so
    packing stays linear); one longer than seq_len is cut into seq_len pieces. For pre-training
    on trajectories: a cut one would train its second half without its question."""
    _check_positive(seq_len=seq_len, open_rows=open_rows)
    rows: list = []  # per row: list of token arrays
    free: list = []  # per row: tokens still free
    for doc in documents:
        doc = np.asarray(doc, np.int32)
        if doc.ndim != 1:
            raise ValueError(f"pack_documents: a document must be a 1-D token sequence, got shape {doc.shape}")
        for lo in range(0, len(doc), seq_len):
            piece = doc[lo:lo + seq_len]
            if len(piece) == 0:
                continue
            for r in range(max(0, len(rows) - open_rows), len(rows)):
                if free[r] >= len(piece):
                    break
            else:
                rows.append([])
                free.append(seq_len)
                r = len(rows) - 1
            rows[r].append(piece)
            free[r] -= len(piece)
    if not rows:
        raise ValueError("pack_documents: no tokens")
    tokens = np.zeros((len(rows), seq_len), np.int32)
    mask = np.zeros((len(rows), seq_len), bool)
    for i, pieces in enumerate(rows):
        n = seq_len - free[i]
        tokens[i, :n] = np.concatenate(pieces)
        mask[i, :n] = True
    return tokens, mask


def _batches(tokens: np.ndarray, mask: np.ndarray, batch_size: int, rng: np.random.Generator) -> Iterator:
    """Endless shuffled epochs of (tokens, mask) batches of exactly batch_size rows."""
    n = len(tokens)
    while True:
        order = rng.permutation(n)
        if n < batch_size:  # fewer examples than a batch: repeat them
            order = np.resize(order, batch_size)
        for lo in range(0, len(order) - batch_size + 1, batch_size):
            idx = order[lo:lo + batch_size]
            yield tokens[idx], mask[idx]


# ---- optimisation helpers ---------------------------------------------------------------------
def _schedule(lr: float, steps: int, warmup_steps: int | None, min_lr_ratio: float):
    warmup = warmup_steps if warmup_steps is not None else max(1, steps // 10)
    warmup = min(warmup, max(steps - 1, 0))
    return optax.warmup_cosine_decay_schedule(0.0, lr, warmup_steps=warmup, decay_steps=max(steps, warmup + 1),
                                              end_value=lr * min_lr_ratio)


def _optimizer(weight_decay: float, clip_norm: float | None, decay_mask=None):
    """AdamW at learning rate 1: each step scales the updates by that step's rate (_StepPlan.lr),
    which is AdamW at that rate exactly (the rate multiplies the whole update, decay included),
    so a time budget can re-plan the schedule mid-run."""
    parts = [optax.clip_by_global_norm(clip_norm)] if clip_norm else []
    parts.append(optax.adamw(1.0, b1=0.9, b2=0.95, weight_decay=weight_decay, mask=decay_mask))
    return optax.chain(*parts)


def _scaled(updates, lr):
    return jax.tree.map(lambda u: (lr * u).astype(u.dtype), updates)


class _StepPlan:
    """How many steps a training loop runs, and each step's learning rate (warmup then cosine
    decay to lr * min_lr_ratio over the planned steps).

    With time_budget_s, the loop reports each step (`done`); at a few synchronised points it
    measures the seconds per step (the first step, compilation, excluded) and, when the steps
    left would overrun the budget, plans fewer (never more) and recomputes the schedule for the
    new total; the warmup keeps its length unless that is over half the new total (then half of
    it). A step that starts past the budget ends the loop."""

    def __init__(self, steps, lr, warmup_steps, min_lr_ratio, time_budget_s, *, margin: float = 0.97,
                 clock=time.perf_counter):
        if time_budget_s is not None and not 0 < time_budget_s < math.inf:
            raise ValueError(f"time_budget_s must be a finite number of seconds > 0, or None; got {time_budget_s!r}")
        self.requested = self.planned = steps
        self.lr_peak, self.min_lr_ratio, self.margin = lr, min_lr_ratio, margin
        self.warmup = warmup_steps if warmup_steps is not None else max(1, steps // 10)
        self.clock = clock
        self.end = None if time_budget_s is None else clock() + time_budget_s
        self.every = min(50, max(5, steps // 40))  # synchronised checks: about 40 a run, at least every 50 steps
        self._first = None  # (steps done, time) after the first (compiling) step
        self._lrs = self._table()

    def _table(self) -> np.ndarray:
        warmup = self.warmup
        if self.cut:  # at most half a re-planned run (a warmup as long as the run would never decay)
            warmup = min(warmup, self.planned // 2)
        sched = _schedule(self.lr_peak, self.planned, warmup, self.min_lr_ratio)
        # jitted, as optax ran it inside the step (eager float32 differs by an ulp at some steps)
        return np.asarray(jax.jit(jax.vmap(sched))(jnp.arange(self.planned, dtype=jnp.int32)), np.float32)

    def lr(self, i: int) -> np.float32:
        return self._lrs[i]

    def keep_going(self, i: int) -> bool:
        """Whether step i (0-based) runs."""
        return i < self.planned and (self.end is None or i == 0 or self.clock() < self.end)

    def done(self, i: int, last) -> None:
        """Step i was dispatched; `last` is one of its outputs (synchronised at check points)."""
        if self.end is None or not (i == 0 or (i + 1) % self.every == 0):
            return
        jax.block_until_ready(last)
        now = self.clock()
        if self._first is None:
            self._first = (i + 1, now)
            return
        per_step = (now - self._first[1]) / (i + 1 - self._first[0])
        fit = i + 1 + int(self.margin * (self.end - now) / per_step)
        if fit < self.planned:
            self.planned = max(i + 1, fit)
            self._lrs = self._table()

    @property
    def cut(self) -> bool:
        return self.planned < self.requested


def _advance(plan: _StepPlan, bar, i: int, loss, log_every: int) -> int:
    """Book step i (time budget, progress bar, loss shown every log_every steps); the next i."""
    plan.done(i, loss)
    bar.total = plan.planned
    bar.update(1)
    i += 1
    if i % log_every == 0 or i == plan.planned:
        bar.set_postfix(loss=f"{float(loss):.4f}")
    return i


def _check_positive(**kw) -> None:
    for name, v in kw.items():
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
            raise ValueError(f"{name} must be a positive integer, got {v!r}")


def _progress(steps: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=steps, desc=desc, disable=not enabled, dynamic_ncols=True)


def _donate() -> tuple:
    """Donating buffers saves memory on accelerators; the CPU backend ignores it with a warning."""
    return (0, 1) if jax.default_backend() != "cpu" else ()


# ---- pre-training -----------------------------------------------------------------------------
def pretrain(
    model: Llama,
    data,
    *,
    steps: int,
    lr: float = 3e-4,
    batch_size: int = 16,
    seq_len: int | None = None,
    seed: int = 0,
    warmup_steps: int | None = None,
    min_lr_ratio: float = 0.1,
    weight_decay: float = 0.1,
    clip_norm: float | None = 1.0,
    progress: bool = True,
    log_every: int = 10,
    time_budget_s: float | None = None,
) -> tuple[Llama, dict]:
    """Full-parameter next-token training of `model` (AdamW, linear warmup then cosine decay).

    data: a sequence of examples (token sequences or (tokens, loss_mask) pairs; longer than
      seq_len: cut into seq_len pieces), or an iterator yielding (tokens [batch_size, seq_len],
      loss_mask [batch_size, seq_len]) batches.
    seq_len: fixed row length (default: the longest example, rounded up to 16).
    weight_decay applies to matrices, not to the norm weights.
    time_budget_s: end within this many seconds (fewer steps, schedule re-planned; module doc).
    Returns (a new trained Llama; `model` keeps its weights, {"loss": [per-step mean loss]}).
    """
    _check_positive(steps=steps, batch_size=batch_size, log_every=log_every)
    plan = _StepPlan(steps, lr, warmup_steps, min_lr_ratio, time_budget_s)  # the budget counts from here
    cfg = model.config
    if isinstance(data, Iterator):
        batches = data
    else:
        examples = list(data)
        seq_len = seq_len or _default_seq_len([examples])
        tokens, mask = _pad_examples(examples, seq_len, cfg.vocab_size, "pretrain data", split_long=True)
        batches = _batches(tokens, mask, batch_size, np.random.default_rng(seed))

    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    params = jax.tree.map(jnp.copy, params)  # the caller's model keeps its arrays (we donate ours)
    decay_mask = jax.tree_util.tree_map_with_path(
        lambda path, _: not any(getattr(k, "key", None) in _NORM_PARAMS for k in path), params)
    opt = _optimizer(weight_decay, clip_norm, decay_mask=decay_mask)
    opt_state = opt.init(params)

    def loss_fn(params, tokens, mask):
        m = nnx.merge(graphdef, params, rest)
        logits = forward_logits(m, tokens, None, jnp.full((tokens.shape[0],), -1, jnp.int32))
        total, count = masked_loss(logits, tokens, mask)
        return total.sum() / jnp.maximum(count.sum(), 1.0)

    def step(params, opt_state, tokens, mask, lr):
        loss, grads = jax.value_and_grad(loss_fn)(params, tokens, mask)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, _scaled(updates, lr)), opt_state, loss

    step = jax.jit(step, donate_argnums=_donate())
    losses = []
    i = 0
    with _progress(steps, "pretrain", progress) as bar:
        while plan.keep_going(i):
            tokens, mask = _check_batch(*next(batches), batch_size, cfg.vocab_size)
            params, opt_state, loss = step(params, opt_state, tokens, mask, plan.lr(i))
            losses.append(loss)
            i = _advance(plan, bar, i, loss, log_every)
    return nnx.merge(graphdef, params, rest), {"loss": [float(x) for x in jax.device_get(losses)]}


_NORM_PARAMS = ("attn_norm", "mlp_norm", "final_norm")  # no weight decay on these


def _check_batch(tokens, mask, batch_size: int, vocab_size: int):
    tokens, mask = np.asarray(tokens), np.asarray(mask)
    if tokens.ndim != 2 or tokens.shape[0] != batch_size or mask.shape != tokens.shape:
        raise ValueError(f"a batch must be (tokens [batch_size={batch_size}, seq_len], loss_mask of the same "
                         f"shape), got {tokens.shape} and {mask.shape}")
    _check_vocab(tokens, vocab_size, "batch")
    return jnp.asarray(tokens, jnp.int32), jnp.asarray(mask, jnp.bool_)


# ---- LoRA adapters ----------------------------------------------------------------------------
def init_lora_params(model_config, num_adapters: int, *, rank: int, targets, shared_a: bool, seed: int) -> dict:
    """Trainable LoRA factors {proj: {"a": [L, Na, d_in, r], "b": [L, N, r, d_out]}} as PEFT
    initialises them: A ~ kaiming_uniform(a=sqrt(5)) = U(-1/sqrt(d_in), 1/sqrt(d_in)), B = 0.
    Na = 1 when shared_a (one A for every adapter)."""
    key = jax.random.key(seed)
    L = model_config.num_layers
    params = {}
    for proj in targets:
        d_in, d_out = model_config.projection_dims(proj)
        key, sub = jax.random.split(key)
        na = 1 if shared_a else num_adapters
        bound = 1.0 / math.sqrt(d_in)
        params[proj] = {
            "a": jax.random.uniform(sub, (L, na, d_in, rank), jnp.float32, -bound, bound),
            "b": jnp.zeros((L, num_adapters, rank, d_out), jnp.float32),
        }
    return params


def lora_from_params(params: dict, names: tuple, lora_config: LoraConfig, *, shared_a: bool) -> LoraWeights:
    """Trainable factors (init_lora_params layout) -> LoraWeights; every adapter has lora_config."""
    scale = jnp.full((len(names),), lora_config.scale, jnp.float32)
    projections = {p: LoraProjection(a=f["a"], b=f["b"], scale=scale, shared_a=shared_a) for p, f in params.items()}
    return LoraWeights(projections=projections, names=tuple(names), configs=(lora_config,) * len(names))


def train_adapters(
    model: Llama,
    examples_by_role: Mapping[str, Sequence],
    *,
    rank: int = 8,
    alpha: float = 16.0,
    targets=("q", "v"),
    shared_a: bool = False,
    use_rslora: bool = False,
    steps: int,
    lr: float = 1e-3,
    batch_size: int = 8,
    seq_len: int | None = None,
    seed: int = 0,
    warmup_steps: int | None = None,
    min_lr_ratio: float = 0.1,
    weight_decay: float = 0.0,
    clip_norm: float | None = None,
    progress: bool = True,
    log_every: int = 10,
    time_budget_s: float | None = None,
) -> tuple[LoraWeights, dict]:
    """LoRA fine-tuning on a frozen base: one adapter per role (agent), named by the role.

    examples_by_role: role -> examples (token sequences, or (tokens, loss_mask) pairs whose mask
      marks the role's own tokens, so the loss covers only those).
    shared_a=False: independent adapters (each its own A and B). shared_a=True: one A per
      projection trained on every role's data and one B per role (shared-A multi-LoRA, as the
      LRAgent paper trains them); the result stores A once, so base_lr_shared accepts it.
    Each step's batch holds batch_size examples of every role (per-row adapter ids); the loss is
      the mean over roles of each role's mean target-token loss, so every role weighs the same.
      Without clip_norm (the default) each independent adapter's AdamW update depends on its own
      role's rows only (AdamW is per element), so independent adapters do not interact.
    Init as PEFT: A uniform (kaiming), B zero, so training starts from the base model.
    time_budget_s: end within this many seconds (fewer steps, schedule re-planned; module doc).
    Returns (LoraWeights float32 [names = roles in order], {"loss": [...], role: [...]} per step).
    """
    _check_positive(steps=steps, batch_size=batch_size, rank=rank, log_every=log_every)
    if not isinstance(shared_a, bool):
        raise ValueError(f"shared_a must be True or False, got {shared_a!r}")
    if not isinstance(examples_by_role, Mapping) or not examples_by_role:
        raise ValueError("examples_by_role must be a non-empty mapping role name -> examples")
    cfg = model.config
    roles = tuple(examples_by_role)
    if "loss" in roles:  # the history's key for the mean over roles
        raise ValueError("a role may not be named 'loss' (train_adapters' history uses that key for the mean)")
    plan = _StepPlan(steps, lr, warmup_steps, min_lr_ratio, time_budget_s)  # the budget counts from here
    lcfg = LoraConfig(rank=rank, alpha=float(alpha), target_modules=tuple(targets), use_rslora=use_rslora)
    seq_len = seq_len or _default_seq_len(examples_by_role.values())
    rng = np.random.default_rng(seed)
    streams = []
    for role in roles:
        tokens, mask = _pad_examples(list(examples_by_role[role]), seq_len, cfg.vocab_size, f"role {role!r}",
                                     split_long=False)
        streams.append(_batches(tokens, mask, batch_size, rng))
    ids = jnp.asarray(np.repeat(np.arange(len(roles)), batch_size), jnp.int32)

    graphdef, base = nnx.split(model)
    params = init_lora_params(cfg, len(roles), rank=rank, targets=lcfg.target_modules, shared_a=shared_a, seed=seed)
    opt = _optimizer(weight_decay, clip_norm)
    opt_state = opt.init(params)

    def loss_fn(params, base, tokens, mask):
        m = nnx.merge(graphdef, base)  # frozen: grads are taken w.r.t. params only
        lora = lora_from_params(params, roles, lcfg, shared_a=shared_a)
        total, count = masked_loss(forward_logits(m, tokens, lora, ids), tokens, mask)
        per_role = (total.reshape(len(roles), -1).sum(1) / jnp.maximum(count.reshape(len(roles), -1).sum(1), 1.0))
        return per_role.mean(), per_role

    def step(params, opt_state, base, tokens, mask, lr):
        (loss, per_role), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, base, tokens, mask)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, _scaled(updates, lr)), opt_state, loss, per_role

    step = jax.jit(step, donate_argnums=_donate())
    losses, per_role_losses = [], []
    i = 0
    with _progress(steps, "adapters (shared A)" if shared_a else "adapters", progress) as bar:
        while plan.keep_going(i):
            parts = [next(s) for s in streams]
            tokens = jnp.asarray(np.concatenate([p[0] for p in parts]), jnp.int32)
            mask = jnp.asarray(np.concatenate([p[1] for p in parts]), jnp.bool_)
            params, opt_state, loss, per_role = step(params, opt_state, base, tokens, mask, plan.lr(i))
            losses.append(loss)
            per_role_losses.append(per_role)
            i = _advance(plan, bar, i, loss, log_every)
    history = {"loss": [float(x) for x in jax.device_get(losses)]}
    per_role_np = np.asarray(jax.device_get(per_role_losses))
    for j, role in enumerate(roles):
        history[role] = per_role_np[:, j].tolist()
    return lora_from_params(params, roles, lcfg, shared_a=shared_a), history


# ---- evaluation -------------------------------------------------------------------------------
@functools.partial(jax.jit, static_argnums=0)
def _eval_sums(graphdef, state, lora, tokens, mask, ids):
    total, count = masked_loss(forward_logits(nnx.merge(graphdef, state), tokens, lora, ids), tokens, mask)
    return total.sum(), count.sum()


def eval_loss(model: Llama, examples_by_role: Mapping[str, Sequence], lora: LoraWeights | None = None, *,
              seq_len: int | None = None, batch_size: int = 16) -> dict:
    """Mean target-token loss per role: role's examples run with the adapter named like the role
    (if `lora` has one), else the base model. Returns {role: loss}."""
    cfg = model.config
    seq_len = seq_len or _default_seq_len(examples_by_role.values())
    graphdef, state = nnx.split(model)
    out = {}
    for role, examples in examples_by_role.items():
        tokens, mask = _pad_examples(list(examples), seq_len, cfg.vocab_size, f"role {role!r}", split_long=False)
        aid = lora.adapter_id(role) if lora is not None and role in lora.names else -1
        total = count = 0.0
        for lo in range(0, len(tokens), batch_size):
            t, m = tokens[lo:lo + batch_size], mask[lo:lo + batch_size]
            pad = batch_size - len(t)  # one shape: the last batch padded with masked-out rows
            t, m = np.pad(t, ((0, pad), (0, 0))), np.pad(m, ((0, pad), (0, 0)))
            ids = jnp.full((batch_size,), aid, jnp.int32)
            s, c = _eval_sums(graphdef, state, lora, jnp.asarray(t), jnp.asarray(m), ids)
            total, count = total + float(s), count + float(c)
        out[role] = total / max(count, 1.0)
    return out


# ---- plotting ---------------------------------------------------------------------------------
def plot_losses(histories: Mapping, path, *, title: str = "training loss", smooth: int = 1) -> str:
    """Loss curves PNG: histories maps a label to per-step losses, or to such a mapping (as
    train_adapters returns; labels become "outer/inner"). smooth: moving-average window."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise ImportError("plot_losses needs matplotlib: pip install matplotlib") from e
    curves = {}
    for label, h in histories.items():
        if isinstance(h, Mapping):
            curves.update({f"{label}/{k}": v for k, v in h.items()})
        else:
            curves[label] = h
    fig, ax = plt.subplots(figsize=(7, 4))
    for label, ys in curves.items():
        ys = np.asarray(ys, np.float64)
        if smooth > 1 and len(ys) >= smooth:
            ys = np.convolve(ys, np.ones(smooth) / smooth, mode="valid")
        ax.plot(np.arange(len(ys)), ys, label=label)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats / target token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return str(path)
