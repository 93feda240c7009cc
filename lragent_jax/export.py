"""Save a model as an HF folder and adapters as PEFT folders that transformers + peft load.

Model: config.json + model.safetensors (loading.save_hf_model: HF tensor names, [out, in]
layouts). Adapters: one folder per adapter with adapter_config.json and
adapter_model.safetensors keyed as PeftModel.save_pretrained writes them
("base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight", A as [r, d_in], B as
[d_out, r]). lragent_jax.loading.load_model / load_adapters read both back.
"""

from __future__ import annotations

import json
import os
import shutil

import jax
import numpy as np

from .config import HF_MODULE_NAMES, PROJECTIONS
from .loading import save_hf_model
from .lora import LoraWeights
from .model import Llama

__all__ = ["save_model", "save_adapter", "save_adapters", "adapter_factors"]

_BLOCK = {"q": "self_attn", "k": "self_attn", "v": "self_attn", "o": "self_attn",
          "gate": "mlp", "up": "mlp", "down": "mlp"}


def save_model(model: Llama, folder, *, tokenizer=None) -> str:
    """Write `model` as an HF folder (config.json + model.safetensors); returns the folder.

    tokenizer: optional; a tokenizer.json path, a `tokenizers.Tokenizer`, or a transformers
    tokenizer (anything with save_pretrained), written into the same folder."""
    folder = save_hf_model(model, folder)
    if tokenizer is None:
        return folder
    if isinstance(tokenizer, (str, os.PathLike)):
        if not os.path.isfile(tokenizer):
            raise FileNotFoundError(f"tokenizer file {os.fspath(tokenizer)!r} does not exist")
        shutil.copyfile(tokenizer, os.path.join(folder, "tokenizer.json"))
    elif hasattr(tokenizer, "save_pretrained"):
        tokenizer.save_pretrained(folder)
    elif hasattr(tokenizer, "to_str"):  # tokenizers.Tokenizer
        tokenizer.save(os.path.join(folder, "tokenizer.json"))
    else:
        raise TypeError(f"tokenizer must be a tokenizer.json path, a tokenizers.Tokenizer or a transformers "
                        f"tokenizer, got {type(tokenizer).__name__}")
    return folder


def adapter_factors(lora: LoraWeights, name: str) -> dict:
    """One adapter's own factors {proj: (A [L, d_in, r], B [L, r, d_out])} as float32 numpy,
    at its own rank (the zero padding of a stack is dropped), for the projections it targets."""
    i = lora.adapter_id(name)
    r = lora.configs[i].rank
    out = {}
    for proj, p in lora.projections.items():
        if proj not in lora.configs[i].target_modules:
            continue
        a = np.asarray(jax.device_get(p.a[:, 0 if p.shared_a else i]), np.float32)
        b = np.asarray(jax.device_get(p.b[:, i]), np.float32)
        out[proj] = (a[..., :r], b[:, :r])
    return out


def save_adapter(lora: LoraWeights, name: str, folder, *, base_model_name_or_path: str, dtype=np.float32) -> str:
    """Write adapter `name` of `lora` as a PEFT LoRA folder; returns the folder.

    base_model_name_or_path: the base model's folder or hub id (PEFT records it; load_adapters
    checks the shapes against it when it is reachable). dtype: the tensors' numpy dtype."""
    from safetensors.numpy import save_file

    cfg = lora.configs[lora.adapter_id(name)]
    tensors = {}
    for proj, (a, b) in adapter_factors(lora, name).items():
        prefix = f"base_model.model.model.layers.{{}}.{_BLOCK[proj]}.{HF_MODULE_NAMES[proj]}"
        for layer in range(a.shape[0]):
            tensors[prefix.format(layer) + ".lora_A.weight"] = np.ascontiguousarray(a[layer].T, dtype)
            tensors[prefix.format(layer) + ".lora_B.weight"] = np.ascontiguousarray(b[layer].T, dtype)
    targets = [HF_MODULE_NAMES[p] for p in PROJECTIONS if p in cfg.target_modules]
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": os.fspath(base_model_name_or_path),
        "r": cfg.rank,
        "lora_alpha": cfg.alpha,
        "use_rslora": cfg.use_rslora,
        "target_modules": targets,
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_dora": False,
        "inference_mode": True,
        "modules_to_save": None,
        "layers_to_transform": None,
        "rank_pattern": {},
        "alpha_pattern": {},
    }
    folder = os.fspath(folder)
    os.makedirs(folder, exist_ok=True)
    save_file(tensors, os.path.join(folder, "adapter_model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(folder, "adapter_config.json"), "w") as f:
        json.dump(config, f, indent=2)
    return folder


def save_adapters(lora: LoraWeights, folder, *, base_model_name_or_path: str, dtype=np.float32) -> dict:
    """Every adapter of `lora` as a PEFT folder folder/<name>; returns {name: folder}, the
    mapping load_adapters takes."""
    bad = [n for n in lora.names if not n or n in (".", "..") or "/" in n or os.sep in n]
    if bad:
        raise ValueError(f"adapter names {bad} cannot be folder names; rename them (LoraWeights.names)")
    return {name: save_adapter(lora, name, os.path.join(os.fspath(folder), name),
                               base_model_name_or_path=base_model_name_or_path, dtype=dtype)
            for name in lora.names}
