"""An independent float64 numpy reference of the five cache schemes, and the tiny model it runs.

Written from the definitions (docs/design.md section 2), not from the engine: a plain Llama forward
(RMSNorm, rotate-half RoPE with Llama-3 scaling, GQA, SwiGLU, LoRA s (x A) B on q and v) run one
token at a time over explicit per-layer cache arrays. Who computes each layer's K / V / V_base /
LR, with whose hidden states and whose adapter:

  non_shared      agent a: its own K, V from its own hidden states, at every position
  full_shared     the producer of position p (the agent that first processed it) computes K, V
                  (its LoRA inside V); every agent reads them
  droidspeak      K, V as full_shared at every layer; at critical layers C each agent reads its
                  own K, V. A producer computes them in its forward; another agent recomputes
                  them ("catch-up") by running layers min C .. max C from the producer's hidden
                  state at the input of layer min C, reading the shared K, V at non-critical layers
  base_shared     the producer computes K and V_base; each agent a reads
                  V = V_base + s_a LR_a B_a with LR_a = X_a A_a from its own hidden states X_a
                  (a catch-up runs every layer but writes only LR_a)
  base_lr_shared  the producer computes K, V_base and LR = X A (shared A); agent a reads
                  V = V_base + s_a LR B_a

Trajectory conventions (the Session's, see lragent_jax/schemes.py): appended tokens are processed
by the next agent to take a turn; an agent's generated tokens are processed by that agent, all but
the last, which (like appended tokens) the next turn's agent processes.

The weights are numpy arrays in HF layout ([out, in]); `write_model` / `write_adapter` save them as
an HF checkpoint / PEFT adapter folder for lragent_jax.loading, so the engine and this reference
read the same numbers.
"""

from __future__ import annotations

import json
import math
import os

import numpy as np

SCHEMES = ("non_shared", "full_shared", "droidspeak", "base_shared", "base_lr_shared")

# The test model: 4 layers, GQA (4 query heads over 2 KV heads), Llama-3.1 rope scaling whose
# original length (16) is short enough that the low-, medium- and high-frequency bands are all hit.
CONFIG = dict(
    vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
    num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-5, rope_theta=10000.0,
    rope_scaling={"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 16},
    max_position_embeddings=1024, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
)
AGENTS = ("plan", "action", "reflect")
RANK, ALPHA = 8, 16.0
# Seeds of make_weights / make_adapters whose greedy steps on tests/test_scheme_reference.py's
# trajectories all have a top-1 / top-2 logit gap >= 0.02 (a scan of seeds 0-3 found gaps down to 1e-4).
WEIGHT_SEED, ADAPTER_SEED = 3, 5


def make_weights(config: dict, seed: int) -> dict:
    """HF-named float32 weights. Scales keep activations O(1) at every layer (projections
    N(0, 1/d_in), unit embeddings, norms near 1), so the logits depend on the context strongly
    enough that greedy decoding moves from token to token (a 0.02-std init gives one token)."""
    rng = np.random.default_rng(seed)
    d, f, V = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    H, Hkv, D = config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"]

    def lin(out, inp, gain=1.0):
        return (gain * rng.standard_normal((out, inp)) / math.sqrt(inp)).astype(np.float32)

    def norm(n):
        return (1.0 + 0.2 * rng.standard_normal(n)).astype(np.float32)

    w = {"model.embed_tokens.weight": rng.standard_normal((V, d)).astype(np.float32),
         "model.norm.weight": norm(d), "lm_head.weight": lin(V, d, 3.0)}
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        w.update({
            p + "self_attn.q_proj.weight": lin(H * D, d, 2.0), p + "self_attn.k_proj.weight": lin(Hkv * D, d, 2.0),
            p + "self_attn.v_proj.weight": lin(Hkv * D, d), p + "self_attn.o_proj.weight": lin(d, H * D),
            p + "mlp.gate_proj.weight": lin(f, d), p + "mlp.up_proj.weight": lin(f, d),
            p + "mlp.down_proj.weight": lin(d, f), p + "input_layernorm.weight": norm(d),
            p + "post_attention_layernorm.weight": norm(d),
        })
    return w


def make_adapters(config: dict, names=AGENTS, *, seed: int, shared_a: bool, b_std: float = 0.15) -> dict:
    """name -> {"q"/"v": (A [L, r, d_in], B [L, d_out, r]) in PEFT layout}; shared_a: one A for all."""
    rng = np.random.default_rng(seed)
    L, d = config["num_hidden_layers"], config["hidden_size"]
    out_dim = {"q": config["num_attention_heads"] * config["head_dim"],
               "v": config["num_key_value_heads"] * config["head_dim"]}
    first_a = {}
    adapters = {}
    for n in names:
        factors = {}
        for proj in ("q", "v"):
            a = (rng.standard_normal((L, RANK, d)) / math.sqrt(d)).astype(np.float32)
            if shared_a:
                a = first_a.setdefault(proj, a)
            b = (b_std * rng.standard_normal((L, out_dim[proj], RANK))).astype(np.float32)
            factors[proj] = (a, b)
        adapters[n] = factors
    return adapters


def write_model(folder: str, config: dict, weights: dict) -> str:
    from safetensors.numpy import save_file

    os.makedirs(folder, exist_ok=True)
    hf = {"architectures": ["MistralForCausalLM" if config.get("model_type") == "mistral" else "LlamaForCausalLM"],
          "model_type": "llama", "hidden_act": "silu", **config}
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(hf, f)
    save_file(weights, os.path.join(folder, "model.safetensors"))
    return folder


def write_adapter(folder: str, factors: dict) -> str:
    from safetensors.numpy import save_file

    os.makedirs(folder, exist_ok=True)
    module = {"q": "q_proj", "v": "v_proj"}
    cfg = {"peft_type": "LORA", "r": RANK, "lora_alpha": ALPHA, "target_modules": [module[p] for p in factors],
           "bias": "none", "task_type": "CAUSAL_LM"}
    with open(os.path.join(folder, "adapter_config.json"), "w") as f:
        json.dump(cfg, f)
    tensors = {}
    for proj, (a, b) in factors.items():
        for i in range(a.shape[0]):
            key = f"base_model.model.model.layers.{i}.self_attn.{module[proj]}"
            tensors[f"{key}.lora_A.weight"] = np.ascontiguousarray(a[i])
            tensors[f"{key}.lora_B.weight"] = np.ascontiguousarray(b[i])
    save_file(tensors, os.path.join(folder, "adapter_model.safetensors"))
    return folder


# ---- the float64 forward pieces -----------------------------------------------------------------
def rope_inv_freq(config: dict) -> np.ndarray:
    """Inverse frequencies with Llama-3 scaling (Meta's / transformers' formula), float64."""
    D = config["head_dim"]
    inv = 1.0 / config["rope_theta"] ** (np.arange(0, D, 2, dtype=np.float64) / D)
    rs = config.get("rope_scaling")
    if not rs:
        return inv
    factor, lo, hi = rs["factor"], rs["low_freq_factor"], rs["high_freq_factor"]
    old = rs["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv
    out = np.empty_like(inv)
    for i, (f_i, w_i) in enumerate(zip(inv, wavelen)):
        if w_i < old / hi:  # high frequency: unchanged
            out[i] = f_i
        elif w_i > old / lo:  # low frequency: divided by the factor
            out[i] = f_i / factor
        else:  # in between: interpolate
            smooth = (old / w_i - lo) / (hi - lo)
            out[i] = (1 - smooth) * f_i / factor + smooth * f_i
    return out


def rms_norm(x, w, eps):
    return x / np.sqrt(np.mean(x * x) + eps) * w


def rope(x, pos, inv):
    """x [H, D] at position pos, rotate-half convention."""
    ang = pos * inv
    cos, sin = np.concatenate([np.cos(ang)] * 2), np.concatenate([np.sin(ang)] * 2)
    half = x.shape[-1] // 2
    rot = np.concatenate([-x[:, half:], x[:, :half]], axis=-1)
    return x * cos + rot * sin


class SchemeReference:
    """One trajectory under one scheme, token by token, in float64.

    turn(agent, n) decodes greedily; turn(agent, tokens=...) teacher-forces. Both return
    (tokens, logits [n, V]): the logits the agent assigned before each of its tokens.
    """

    def __init__(self, config: dict, weights: dict, adapters: dict, scheme: str, *, critical_layers=None,
                 sliding_window=None):
        assert scheme in SCHEMES, scheme
        self.cfg, self.scheme = config, scheme
        f64 = lambda a: np.asarray(a, np.float64)  # noqa: E731
        self.w = {k: f64(v) for k, v in weights.items()}
        self.lora = {n: {p: (f64(a), f64(b)) for p, (a, b) in fac.items()} for n, fac in adapters.items()}
        self.scale = ALPHA / RANK
        self.L, self.H = config["num_hidden_layers"], config["num_attention_heads"]
        self.Hkv, self.D = config["num_key_value_heads"], config["head_dim"]
        self.eps = config["rms_norm_eps"]
        self.inv = rope_inv_freq(config)
        self.window = sliding_window
        self.crit = tuple(sorted(critical_layers or ()))
        self.tokens: list[int] = []
        self.processed = 0  # positions some agent has processed (the shared caches hold them)
        self.done = {a: 0 for a in adapters}  # positions each agent's own caches hold
        # Caches: name -> {layer: {position: array}} (dicts: what is absent was never computed).
        new = lambda: {l: {} for l in range(self.L)}  # noqa: E731
        self.shared = {"k": new(), "v": new(), "lr": new()}
        self.own = {a: {"k": new(), "v": new(), "lr": new()} for a in adapters}
        self.hidden = {}  # droidspeak: the producer's input to layer min C, by position

    # one projection with the agent's LoRA on q / v: h W^T + s (h A^T) B^T
    def _proj(self, name, layer, h, agent):
        y = h @ self.w[f"model.layers.{layer}.{name}.weight"].T
        proj = {"self_attn.q_proj": "q", "self_attn.v_proj": "v"}.get(name)
        if proj is not None and agent is not None:
            a, b = self.lora[agent][proj]
            y = y + self.scale * (h @ a[layer].T) @ b[layer].T
        return y

    def _lr(self, layer, h, agent):
        return h @ self.lora[agent]["v"][0][layer].T  # X A_v, unscaled

    def _values(self, layer, agent, p):
        """The value vectors [p+1, Hkv, D] agent `agent` reads at `layer` for keys 0..p."""
        s, o = self.shared, self.own[agent]
        if self.scheme == "non_shared":
            return np.stack([o["v"][layer][j] for j in range(p + 1)]), np.stack([o["k"][layer][j] for j in range(p + 1)])
        if self.scheme in ("full_shared",) or (self.scheme == "droidspeak" and layer not in self.crit):
            return np.stack([s["v"][layer][j] for j in range(p + 1)]), np.stack([s["k"][layer][j] for j in range(p + 1)])
        if self.scheme == "droidspeak":
            return np.stack([o["v"][layer][j] for j in range(p + 1)]), np.stack([o["k"][layer][j] for j in range(p + 1)])
        lr_src = s["lr"] if self.scheme == "base_lr_shared" else o["lr"]
        b = self.lora[agent]["v"][1][layer]  # [Hkv*D, r]
        vals = [s["v"][layer][j] + self.scale * (lr_src[layer][j] @ b.T).reshape(self.Hkv, self.D)
                for j in range(p + 1)]
        return np.stack(vals), np.stack([s["k"][layer][j] for j in range(p + 1)])

    def _attend(self, q, keys, values, p):
        """q [H, D] at position p over keys/values [p+1, Hkv, D] (causal, optional window)."""
        G = self.H // self.Hkv
        visible = np.arange(p + 1)
        if self.window is not None:
            visible = visible[visible > p - self.window]
        out = np.empty((self.H, self.D))
        for h in range(self.H):
            kv = h // G  # GQA: consecutive query heads share a KV head
            scores = keys[visible, kv] @ q[h] / math.sqrt(self.D)
            e = np.exp(scores - scores.max())
            out[h] = (e / e.sum()) @ values[visible, kv]
        return out

    def _layer(self, layer, x, p, agent, produce: bool):
        """One decoder layer for the token at position p; writes what the scheme stores."""
        pre = f"model.layers.{layer}."
        h = rms_norm(x, self.w[pre + "input_layernorm.weight"], self.eps)
        q = rope(self._proj("self_attn.q_proj", layer, h, agent).reshape(self.H, self.D), p, self.inv)
        k = rope((h @ self.w[pre + "self_attn.k_proj.weight"].T).reshape(self.Hkv, self.D), p, self.inv)
        v_base = (h @ self.w[pre + "self_attn.v_proj.weight"].T).reshape(self.Hkv, self.D)
        v_full = self._proj("self_attn.v_proj", layer, h, agent).reshape(self.Hkv, self.D)
        s, o = self.shared, self.own[agent]
        if self.scheme == "non_shared":
            o["k"][layer][p], o["v"][layer][p] = k, v_full
        elif self.scheme == "full_shared":
            assert produce
            s["k"][layer][p], s["v"][layer][p] = k, v_full
        elif self.scheme == "base_lr_shared":
            assert produce
            s["k"][layer][p], s["v"][layer][p], s["lr"][layer][p] = k, v_base, self._lr(layer, h, agent)
        elif self.scheme == "base_shared":
            if produce:  # a catch-up reads the producer's K and V_base
                s["k"][layer][p], s["v"][layer][p] = k, v_base
            o["lr"][layer][p] = self._lr(layer, h, agent)
        else:  # droidspeak
            if produce:
                s["k"][layer][p], s["v"][layer][p] = k, v_full
            if layer in self.crit:
                o["k"][layer][p], o["v"][layer][p] = k, v_full
        values, keys = self._values(layer, agent, p)
        attn = self._attend(q, keys, values, p).reshape(-1)
        x = x + attn @ self.w[pre + "self_attn.o_proj.weight"].T
        h = rms_norm(x, self.w[pre + "post_attention_layernorm.weight"], self.eps)
        gate = h @ self.w[pre + "mlp.gate_proj.weight"].T
        up = h @ self.w[pre + "mlp.up_proj.weight"].T
        return x + (gate / (1 + np.exp(-gate)) * up) @ self.w[pre + "mlp.down_proj.weight"].T

    def _produce(self, agent, p):
        """The first processing of position p (agent is its producer); returns the logits."""
        x = self.w["model.embed_tokens.weight"][self.tokens[p]]
        for layer in range(self.L):
            if self.scheme == "droidspeak" and layer == self.crit[0]:
                self.hidden[p] = x
            x = self._layer(layer, x, p, agent, produce=True)
        x = rms_norm(x, self.w["model.norm.weight"], self.eps)
        return x @ self.w["lm_head.weight"].T

    def _catch_up(self, agent, p):
        """Agent recomputes its own cache part at position p, which another agent produced."""
        if self.scheme == "non_shared":
            self._produce(agent, p)
        elif self.scheme == "base_shared":
            x = self.w["model.embed_tokens.weight"][self.tokens[p]]
            for layer in range(self.L):
                x = self._layer(layer, x, p, agent, produce=False)
        elif self.scheme == "droidspeak":
            x = self.hidden[p]
            for layer in range(self.crit[0], self.crit[-1] + 1):
                x = self._layer(layer, x, p, agent, produce=False)

    def _process(self, agent, p):
        """Position p is the next one no agent has processed."""
        assert p == self.processed
        logits = self._produce(agent, p)
        self.processed += 1
        self.done[agent] = self.processed
        return logits

    def append(self, tokens) -> None:
        self.tokens.extend(int(t) for t in tokens)

    def turn(self, agent, n: int | None = None, *, tokens=None):
        """The agent catches up, processes the unprocessed tokens, then generates n tokens
        greedily (or takes `tokens`); the last one stays unprocessed."""
        if self.scheme in ("non_shared", "base_shared", "droidspeak"):
            for p in range(self.done[agent], self.processed):
                self._catch_up(agent, p)
            self.done[agent] = self.processed
        logits = None
        for p in range(self.processed, len(self.tokens)):
            logits = self._process(agent, p)
        n = len(tokens) if tokens is not None else n
        out, all_logits = [], []
        for i in range(n):
            all_logits.append(logits)
            t = int(tokens[i]) if tokens is not None else int(np.argmax(logits))
            out.append(t)
            self.tokens.append(t)
            if i < n - 1:
                logits = self._process(agent, len(self.tokens) - 1)
        return out, np.stack(all_logits)
