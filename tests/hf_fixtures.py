"""Tiny random HF models and PEFT LoRA adapters written to disk, for loader and parity tests.

No torch: weights are seeded numpy arrays saved with safetensors under the HF tensor names,
config.json comes from transformers' config classes (which need no torch), and adapters are
written by lragent_jax.export.save_adapter (the PEFT layout test_parity_hf / test_export
check against peft itself). Norm weights are randomised too, so a swapped norm cannot hide;
adapters get random non-zero lora_B (PEFT initialises B to zero, which would make every
adapter the base model).

Importable by any test: `from hf_fixtures import make_model, make_adapters, MODEL_KINDS`.
build_hf_model (a transformers model of a fixture) is the one helper that needs torch.
"""

from __future__ import annotations

import json
import os
import tempfile

import numpy as np

AGENTS = ("plan", "action", "reflect")
MODEL_KINDS = ("llama", "llama3_tied", "mistral")

_COMMON = dict(
    vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=512,
    rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2, initializer_range=0.05,
)


def hf_config(kind: str, **overrides):
    """The transformers config of a tiny model kind (see MODEL_KINDS)."""
    from transformers import LlamaConfig, MistralConfig

    if kind == "llama":  # GQA, untied head
        return LlamaConfig(**{**_COMMON, "rope_theta": 10000.0, **overrides})
    if kind == "llama3_tied":  # Llama 3.1 rope scaling (all three frequency bands hit), tied head
        rope = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 16, "rope_theta": 500000.0}
        return LlamaConfig(**{**_COMMON, "rope_scaling": rope, "rope_theta": 500000.0,
                              "tie_word_embeddings": True, **overrides})
    if kind == "mistral":  # sliding window far above any test length
        return MistralConfig(**{**_COMMON, "rope_theta": 1e6, "sliding_window": 4096, **overrides})
    raise ValueError(f"unknown model kind {kind!r}; allowed: {MODEL_KINDS}")


def random_weights(config, seed: int) -> dict[str, np.ndarray]:
    """HF-named float32 weights: N(0, initializer_range) matrices ([out, in], as nn.Linear),
    norms 1 + 0.2 N(0, 1). Drawn in a fixed order from `seed` alone, so two configs that differ
    only in attention settings (e.g. sliding_window) get the same weights."""
    rng = np.random.default_rng(seed)
    c = config
    std, d, f = c.initializer_range, c.hidden_size, c.intermediate_size
    hd = getattr(c, "head_dim", None) or d // c.num_attention_heads
    q, kv = c.num_attention_heads * hd, c.num_key_value_heads * hd
    normal = lambda *shape: (std * rng.standard_normal(shape)).astype(np.float32)
    norm = lambda: (1.0 + 0.2 * rng.standard_normal(d)).astype(np.float32)
    w = {"model.embed_tokens.weight": normal(c.vocab_size, d)}
    for i in range(c.num_hidden_layers):
        p = f"model.layers.{i}."
        w.update({p + "self_attn.q_proj.weight": normal(q, d), p + "self_attn.k_proj.weight": normal(kv, d),
                  p + "self_attn.v_proj.weight": normal(kv, d), p + "self_attn.o_proj.weight": normal(d, q),
                  p + "mlp.gate_proj.weight": normal(f, d), p + "mlp.up_proj.weight": normal(f, d),
                  p + "mlp.down_proj.weight": normal(d, f),
                  p + "input_layernorm.weight": norm(), p + "post_attention_layernorm.weight": norm()})
    w["model.norm.weight"] = norm()
    if not c.tie_word_embeddings:
        w["lm_head.weight"] = normal(c.vocab_size, d)
    return w


def make_model(folder: str, kind: str, *, seed: int = 0, max_shard_size=None, dtype: str = "float32",
               **overrides) -> str:
    """Save a tiny random model of `kind` to `folder` (config.json + safetensors, sharded with an
    index when max_shard_size is given, e.g. "40KB"); dtype "bfloat16" stores the same float32
    draws rounded to bfloat16 (as most hub checkpoints are). Returns the folder."""
    import jax.numpy as jnp
    from huggingface_hub.serialization import split_state_dict_into_shards_factory
    from safetensors.flax import save_file  # the jax writer: numpy's has no bfloat16

    config = hf_config(kind, **overrides)
    config.architectures = ["MistralForCausalLM" if kind == "mistral" else "LlamaForCausalLM"]
    os.makedirs(folder, exist_ok=True)
    config.save_pretrained(folder)
    weights = {k: jnp.asarray(v, dtype) for k, v in random_weights(config, seed).items()}
    split = split_state_dict_into_shards_factory(
        weights, get_storage_size=lambda t: t.nbytes, filename_pattern="model{suffix}.safetensors",
        max_shard_size=max_shard_size or "5GB")
    for file, names in split.filename_to_tensors.items():  # "format": transformers refuses files without it
        save_file({n: weights[n] for n in names}, os.path.join(folder, file), metadata={"format": "pt"})
    if split.is_sharded:
        with open(os.path.join(folder, "model.safetensors.index.json"), "w") as fh:
            json.dump({"metadata": split.metadata, "weight_map": split.tensor_to_filename}, fh, indent=2)
    return folder


def build_hf_model(kind: str, seed: int = 0, **overrides):
    """The transformers CausalLM (float32, eager attention) of make_model(kind, seed, **overrides).
    Needs torch (the parity tests' reference)."""
    import torch
    from transformers import AutoModelForCausalLM

    with tempfile.TemporaryDirectory() as tmp:
        folder = make_model(os.path.join(tmp, "model"), kind, seed=seed, **overrides)
        model = AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager", dtype=torch.float32)
    return model.eval()


def make_adapter(base_folder: str, folder: str, *, seed: int, rank: int = 8, alpha: float = 16.0,
                 targets=("q_proj", "v_proj"), use_rslora: bool = False, b_std: float = 0.05,
                 a_from: str | None = None) -> str:
    """Save one PEFT LoRA adapter (A ~ N(0, 1/d_in), B ~ N(0, b_std)) for the model in base_folder.

    targets: HF module names; ones lragent_jax does not support (e.g. embed_tokens) are listed in
    adapter_config.json only, for the tests of that error. a_from: another adapter folder whose
    lora_A tensors are copied (shared A)."""
    from safetensors.numpy import load_file

    from lragent_jax.config import HF_MODULE_NAMES, LoraConfig, ModelConfig
    from lragent_jax.export import save_adapter
    from lragent_jax.lora import stack_adapters

    cfg = ModelConfig.from_pretrained(base_folder)
    short = {hf: p for p, hf in HF_MODULE_NAMES.items()}
    projs = tuple(short[t] for t in targets if t in short)
    shared = load_file(os.path.join(a_from, "adapter_model.safetensors")) if a_from else {}
    rng = np.random.default_rng(seed)
    factors = {}
    for proj in projs:
        d_in, d_out = cfg.projection_dims(proj)
        a = (rng.standard_normal((cfg.num_layers, d_in, rank)) / d_in ** 0.5).astype(np.float32)
        if shared:  # PEFT stores A as [r, d_in]
            block = "mlp" if proj in ("gate", "up", "down") else "self_attn"
            a = np.stack([shared[f"base_model.model.model.layers.{i}.{block}.{HF_MODULE_NAMES[proj]}.lora_A.weight"].T
                          for i in range(cfg.num_layers)])
        factors[proj] = (a, (b_std * rng.standard_normal((cfg.num_layers, rank, d_out))).astype(np.float32))
    lcfg = LoraConfig(rank=rank, alpha=alpha, target_modules=projs, use_rslora=use_rslora)
    lora = stack_adapters(cfg, {"adapter": (lcfg, factors)})
    save_adapter(lora, "adapter", folder, base_model_name_or_path=base_folder)
    unsupported = [t for t in targets if t not in short]
    if unsupported:
        path = os.path.join(folder, "adapter_config.json")
        with open(path) as fh:
            raw = json.load(fh)
        raw["target_modules"] = list(targets)
        with open(path, "w") as fh:
            json.dump(raw, fh, indent=2)
    return folder


def make_adapters(base_folder: str, out_dir: str, names=AGENTS, *, shared_a: bool = False,
                  seed: int = 100, **kwargs) -> dict[str, str]:
    """One adapter per agent name in out_dir/<name>; shared_a copies the first adapter's A."""
    paths = {}
    for i, name in enumerate(names):
        path = os.path.join(out_dir, name)
        first = paths[names[0]] if (shared_a and i > 0) else None
        paths[name] = make_adapter(base_folder, path, seed=seed + i, a_from=first, **kwargs)
    return paths


PARITY_REASON = ('HF parity test: needs torch + peft as the reference; install with pip install -e ".[parity]" '
                 "(on a CPU machine install torch's CPU build first, or pip pulls the multi-GB CUDA one)")


def require_parity():
    """torch, or skip the calling test (module) with PARITY_REASON when torch or peft is missing."""
    import pytest

    torch = pytest.importorskip("torch", reason=PARITY_REASON)
    pytest.importorskip("peft", reason=PARITY_REASON)
    return torch
