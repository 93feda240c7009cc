"""Tiny random HF models and PEFT LoRA adapters written to disk, for loader and parity tests.

Nothing is downloaded: models are built from configs with random weights (norm weights
randomised too, so a swapped norm cannot hide) and saved as safetensors. Adapters get random
non-zero lora_B (PEFT initialises B to zero, which would make every adapter the base model).

Importable by any test: `from hf_fixtures import make_model, make_adapters, MODEL_KINDS`.
"""

from __future__ import annotations

import os

import torch

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


def build_hf_model(kind: str, seed: int = 0, **overrides):
    """A random transformers CausalLM (float32, eager attention) of a tiny kind."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(hf_config(kind, **overrides), attn_implementation="eager",
                                             dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
    return model.eval()


def make_model(folder: str, kind: str, *, seed: int = 0, max_shard_size=None, **overrides) -> str:
    """Save a tiny random model of `kind` to `folder` (safetensors); returns the folder."""
    model = build_hf_model(kind, seed, **overrides)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(folder, safe_serialization=True, **kwargs)
    return folder


def make_adapter(base_folder: str, folder: str, *, seed: int, rank: int = 8, alpha: float = 16.0,
                 targets=("q_proj", "v_proj"), use_rslora: bool = False, b_std: float = 0.05,
                 a_from: str | None = None) -> str:
    """Save one PEFT LoRA adapter (random A and non-zero random B) for the model in base_folder.

    a_from: another adapter folder whose lora_A tensors are copied (shared A).
    """
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_folder, dtype=torch.float32)
    cfg = LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(targets), lora_dropout=0.0,
                     use_rslora=use_rslora, task_type="CAUSAL_LM")
    peft_model = get_peft_model(base, cfg)
    shared = load_file(os.path.join(a_from, "adapter_model.safetensors")) if a_from else {}
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if ".lora_A." in name:
                key = name.replace(".default", "")
                if shared:
                    p.copy_(shared[key])
                else:
                    p.copy_(torch.randn(p.shape, generator=gen) / p.shape[1] ** 0.5)
            elif ".lora_B." in name:
                p.copy_(b_std * torch.randn(p.shape, generator=gen))
    peft_model.save_pretrained(folder, safe_serialization=True)
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
