"""HF safetensors checkpoints and PEFT LoRA adapters -> `Llama` / `LoraWeights`; orbax save/restore.

Safetensors only: pickle (.bin) checkpoints can run arbitrary code when loaded, so they are
refused with a hint to convert. Remote code is never run. Paths may be local folders or HF
hub ids (fetched with huggingface_hub.snapshot_download, weights and configs only).

HF weights are [out, in]; the model keeps [in, out], one weight pytree per layer (see
model.py), so every projection is transposed while it is copied into its layer.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors import safe_open

from .config import (
    HF_MODULE_NAMES, HF_TO_PROJECTION, PROJECTIONS, ConfigError, LoraConfig, ModelConfig, _freeze, check_dtype,
    read_json_object,
)
from .lora import LoraProjection, LoraWeights, stack_adapters
from .model import Llama

__all__ = [
    "WeightsError", "AdapterError", "load_model", "load_tokenizer", "load_adapters",
    "save_converted", "restore_converted", "save_hf_model", "resolve_path",
]

MODEL_PATTERNS = ("config.json", "generation_config.json", "*.safetensors", "model.safetensors.index.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json",
                   "merges.txt", "special_tokens_map.json")
ADAPTER_PATTERNS = ("adapter_config.json", "adapter_model.safetensors", "*/adapter_config.json",
                    "*/adapter_model.safetensors")
PICKLE_FILES = ("pytorch_model.bin", "pytorch_model.bin.index.json", "model.bin", "adapter_model.bin")


class WeightsError(ValueError):
    """A checkpoint whose tensors do not fit the model its config describes."""


class AdapterError(ConfigError):
    """A PEFT adapter that does not fit the loaded model (or is not a supported LoRA)."""


# ---- reading safetensors files safely ---------------------------------------------------------
# Floating-point tensor dtypes (safetensors names) the loader converts; integer or fp8 tensors
# belong to quantized checkpoints, whose values mean nothing without their scales.
FLOAT_TENSOR_DTYPES = ("F16", "BF16", "F32", "F64")
# Bits of a 16-bit float that are all ones exactly for inf and NaN (exponent field).
_EXPONENT_MASK = {"bfloat16": 0x7F80, "float16": 0x7C00}


def _open_safetensors(file: str, error, label: str | None = None):
    """safe_open(file), or `error` naming the file (or `label`) when it is truncated or not safetensors."""
    try:
        return safe_open(file, framework="numpy")
    except Exception as e:  # SafetensorError (not importable by a stable name), OSError
        raise error(f"{label or file}: not a readable safetensors file ({_reason(e)}); is it truncated or "
                    f"corrupt? Re-download or re-save it") from None


def _read_tensor(f, file: str, name: str, error) -> np.ndarray:
    """Tensor `name` of an open file; refuses non-float dtypes; `error` naming file and tensor."""
    try:
        dtype = f.get_slice(name).get_dtype()
    except Exception as e:
        raise error(f"{file}: tensor {name!r} cannot be read ({_reason(e)})") from None
    if dtype not in FLOAT_TENSOR_DTYPES:
        raise error(f"{file}: tensor {name!r} has dtype {dtype}; only floating-point tensors "
                    f"({', '.join(FLOAT_TENSOR_DTYPES)}) are supported (quantized checkpoints are not)")
    try:
        return f.get_tensor(name)
    except Exception as e:
        raise error(f"{file}: tensor {name!r} cannot be read ({_reason(e)}); is the file truncated?") from None


def _reason(e: Exception) -> str:
    return f"{type(e).__name__}: {e}".splitlines()[0]


def _all_finite(t: np.ndarray) -> bool:
    """No NaN or inf in t. 16-bit floats are tested on their exponent bits: about 4x faster than
    np.isfinite on bfloat16 (a pass over each tensor while loading, no temporaries of float32)."""
    mask = _EXPONENT_MASK.get(t.dtype.name)
    if mask is None:
        return bool(np.isfinite(t).all())
    return bool(np.bitwise_and(t.view(np.uint16), 0x7FFF).max(initial=0) < mask)


def _check_finite(t: np.ndarray, source: np.ndarray, file: str, name: str, error) -> None:
    """`error` if the converted tensor t holds NaN/inf: in the file, or from overflowing t's dtype."""
    if _all_finite(t):
        return
    bad = int(np.size(t) - np.count_nonzero(np.isfinite(t.astype(np.float32))))
    if source is not t and _all_finite(source):
        raise error(f"{file}: tensor {name!r} has {bad} values too large for {t.dtype.name} "
                    f"(they become inf); load it in a wider dtype (float32 or bfloat16)")
    raise error(f"{file}: tensor {name!r} has {bad} NaN/inf values (of {np.size(t)}); the weights are corrupt")


# ---- paths -----------------------------------------------------------------------------------
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def resolve_path(path_or_hub_id, allow_patterns=MODEL_PATTERNS) -> str:
    """A local folder as is; otherwise an HF hub id downloaded (only `allow_patterns`)."""
    path = os.fspath(path_or_hub_id)
    expanded = os.path.expanduser(path)
    if os.path.isdir(expanded):
        return expanded
    if os.path.exists(expanded):
        raise FileNotFoundError(f"{path!r} is a file; expected a folder (or an HF hub id)")
    looks_local = path.startswith(("/", ".", "~")) or os.sep + os.sep in path or path.count("/") > 1
    if looks_local or not _HUB_ID.match(path):
        raise FileNotFoundError(f"no such folder: {path!r} (and it is not an HF hub id 'org/name')")
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(repo_id=path, allow_patterns=list(allow_patterns))
    except Exception as e:  # network, auth, missing repo: say what was tried
        raise FileNotFoundError(
            f"{path!r} is not a local folder and could not be fetched from the HF hub: "
            f"{type(e).__name__}: {_first_line(e)}"
        ) from e


def _first_line(e: BaseException) -> str:
    """The first non-empty line of an exception's text (hub errors append multi-line advice)."""
    return next((ln.strip() for ln in str(e).splitlines() if ln.strip()), "")


# ---- the model -------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class _Target:
    """Where one HF tensor goes: the param at params[path] (layers are ("layers", i, name))."""

    path: tuple
    hf_shape: tuple
    transpose: bool


def _weight_table(cfg: ModelConfig) -> dict[str, _Target]:
    """Every HF tensor name this config needs -> its target in the model's params."""
    d, f, V = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    table = {
        "model.embed_tokens.weight": _Target(("embed",), (V, d), False),
        "model.norm.weight": _Target(("final_norm",), (d,), False),
    }
    if not cfg.tie_word_embeddings:
        table["lm_head.weight"] = _Target(("lm_head",), (V, d), True)
    per_layer = {
        "self_attn.q_proj.weight": ("wq", (cfg.q_dim, d), True),
        "self_attn.k_proj.weight": ("wk", (cfg.kv_dim, d), True),
        "self_attn.v_proj.weight": ("wv", (cfg.kv_dim, d), True),
        "self_attn.o_proj.weight": ("wo", (d, cfg.q_dim), True),
        "mlp.gate_proj.weight": ("w_gate", (f, d), True),
        "mlp.up_proj.weight": ("w_up", (f, d), True),
        "mlp.down_proj.weight": ("w_down", (d, f), True),
        "input_layernorm.weight": ("attn_norm", (d,), False),
        "post_attention_layernorm.weight": ("mlp_norm", (d,), False),
    }
    for i in range(cfg.num_layers):
        for suffix, (name, shape, tr) in per_layer.items():
            table[f"model.layers.{i}.{suffix}"] = _Target(("layers", i, name), shape, tr)
    return table


# Tensors some checkpoints carry that the model recomputes or shares.
_IGNORED = re.compile(r"^model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq$")


def _weight_files(folder: str) -> list[str]:
    """The safetensors files of a checkpoint folder (sharded or not); refuses pickle."""
    index = os.path.join(folder, "model.safetensors.index.json")
    single = os.path.join(folder, "model.safetensors")
    if os.path.isfile(index):
        weight_map = read_json_object(index, WeightsError).get("weight_map") or {}
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise WeightsError(f"{index}: 'weight_map' must be an object of tensor name -> shard file name")
        files = sorted(set(weight_map.values()))
        missing = [s for s in files if not os.path.isfile(os.path.join(folder, s))]
        if missing:
            raise WeightsError(f"{folder}: model.safetensors.index.json lists shards that are missing: {missing}")
        if not files:
            raise WeightsError(f"{folder}: model.safetensors.index.json has an empty weight_map")
        return [os.path.join(folder, s) for s in files]
    if os.path.isfile(single):
        return [single]
    pickles = [p for p in PICKLE_FILES if os.path.isfile(os.path.join(folder, p))]
    if pickles:
        raise WeightsError(
            f"{folder} has only PyTorch pickle weights ({', '.join(pickles)}); this loader reads "
            f"safetensors only, because unpickling can run arbitrary code. Convert once with "
            f"transformers: AutoModelForCausalLM.from_pretrained(folder).save_pretrained(out, "
            f"safe_serialization=True), then load `out`"
        )
    raise WeightsError(f"{folder}: no model.safetensors or model.safetensors.index.json found")


def _np_dtype(dtype) -> np.dtype:
    return np.dtype(jnp.dtype(dtype))  # bfloat16 is ml_dtypes.bfloat16, a numpy dtype


def _abstract_model(cfg: ModelConfig, dtype):
    """(graphdef, state) of a Llama without materialising its random weights."""
    abstract = nnx.eval_shape(lambda: Llama(cfg, dtype=dtype, rngs=nnx.Rngs(0)))
    return nnx.split(abstract)


def _set(tree: dict, path: tuple, value) -> None:
    for p in path[:-1]:
        tree = tree[p]
    tree[path[-1]] = value


def _get(tree: dict, path: tuple):
    for p in path:
        tree = tree[p]
    return tree


def _to_device(tree: dict, shardings: dict | None = None) -> dict:
    """Move host buffers to the device one at a time, dropping each host copy as it goes. With
    shardings (a NamedSharding per buffer), each device receives only its own shard."""
    for k, v in list(tree.items()):
        s = None if shardings is None else shardings[k]
        if isinstance(v, dict):
            tree[k] = _to_device(v, s)
        else:
            tree[k] = jnp.asarray(v) if s is None else jax.device_put(v, s)
        del v
    return tree


def _weight_shardings(cfg: ModelConfig, tree, mesh):
    """The Engine's shardings (sharding.ShardingRules) for a model pytree on `mesh`, or None."""
    if mesh is None:
        return None
    from . import sharding

    return sharding.weight_shardings(tree, mesh, sharding.rules_for(cfg, mesh))


def load_model(path_or_hub_id, dtype=jnp.bfloat16, *, mesh=None) -> Llama:
    """Load a Llama / Mistral HF checkpoint (config.json + safetensors) as a `Llama` in `dtype`.

    Raises ConfigError for unsupported model types, an unsupported `dtype` or a bad config.json,
    and WeightsError naming the file and tensor for unreadable files, missing, unexpected,
    duplicated, wrongly shaped, non-float or non-finite (NaN/inf) tensors.

    mesh: a jax.sharding.Mesh (sharding.make_mesh): each weight goes from its host buffer straight
    to its devices with the shardings Engine(mesh=...) uses, so no device ever holds the whole model
    (the host does, one buffer at a time). Raises sharding.ShardingError if the heads do not divide.
    """
    dtype = check_dtype(dtype)
    folder = resolve_path(path_or_hub_id, MODEL_PATTERNS)
    cfg = ModelConfig.from_pretrained(folder)
    files = _weight_files(folder)
    np_dtype = _np_dtype(dtype)
    table = _weight_table(cfg)

    graphdef, state = _abstract_model(cfg, dtype)
    shapes = nnx.to_pure_dict(state)
    # Host buffers in the target dtype, filled tensor by tensor: peak host memory is about
    # one copy of the model, and no random weights are ever drawn.
    buffers = jax.tree.map(lambda s: np.empty(s.shape, np_dtype), shapes)
    seen: dict[str, str] = {}
    for file in files:
        with _open_safetensors(file, WeightsError) as f:
            for name in f.keys():
                if name in seen:
                    raise WeightsError(f"tensor {name!r} appears in both {seen[name]} and {file}")
                seen[name] = file
                if _IGNORED.match(name) or (name == "lm_head.weight" and cfg.tie_word_embeddings):
                    continue  # HF recomputes inv_freq, and ties lm_head to the embedding
                target = table.get(name)
                if target is None:
                    raise WeightsError(
                        f"unexpected tensor {name!r} in {file}: not part of a {cfg.model_type} model "
                        f"with {cfg.num_layers} layers (tie_word_embeddings={cfg.tie_word_embeddings})"
                    )
                shape = tuple(f.get_slice(name).get_shape())
                if shape != target.hf_shape:
                    raise WeightsError(
                        f"tensor {name!r} in {file} has shape {shape}; expected {target.hf_shape} "
                        f"from config.json"
                    )
                source = _read_tensor(f, file, name, WeightsError)
                with np.errstate(over="ignore"):  # overflow to inf is reported by _check_finite
                    t = (source.T if target.transpose else source).astype(np_dtype, copy=False)
                _check_finite(t, source, file, name, WeightsError)
                buf = _get(buffers, target.path)
                buf[...] = t
    missing = [n for n in table if n not in seen]
    if missing:
        hint = ""
        if "lm_head.weight" in missing:
            hint = " (config.json has tie_word_embeddings=false, so lm_head.weight is required)"
        shown = missing[:8] + ([f"... {len(missing) - 8} more"] if len(missing) > 8 else [])
        raise WeightsError(f"{folder}: missing tensors {shown}{hint}")

    nnx.replace_by_pure_dict(state, _to_device(buffers, _weight_shardings(cfg, buffers, mesh)))
    return nnx.merge(graphdef, state)


def _import_auto_tokenizer():
    """transformers' AutoTokenizer, imported without its torch-not-found advisory: we need only its
    tokenizers, and the scripts promise one line on stderr for an error."""
    key, prev = "TRANSFORMERS_NO_ADVISORY_WARNINGS", os.environ.get("TRANSFORMERS_NO_ADVISORY_WARNINGS")
    os.environ[key] = "1"
    try:
        from transformers import AutoTokenizer
    finally:
        if prev is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = prev
    return AutoTokenizer


def load_tokenizer(path_or_hub_id):
    """The folder's transformers tokenizer, or None if it has no tokenizer files."""
    folder = resolve_path(path_or_hub_id, MODEL_PATTERNS + TOKENIZER_FILES)
    if not any(os.path.isfile(os.path.join(folder, n)) for n in TOKENIZER_FILES):
        return None
    AutoTokenizer = _import_auto_tokenizer()

    try:
        return AutoTokenizer.from_pretrained(folder, trust_remote_code=False)
    except Exception as e:  # a truncated tokenizer.json raises a bare Exception from tokenizers
        raise ConfigError(f"{folder}: tokenizer files cannot be read ({_reason(e)})") from None


# ---- adapters --------------------------------------------------------------------------------
# PEFT keys: "base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight", optionally with
# the adapter name before ".weight" ("lora_A.default.weight").
_LORA_KEY = re.compile(
    r"^(?:.*\.)?layers\.(?P<layer>\d+)\.(?P<block>self_attn|mlp)\.(?P<module>\w+)"
    r"\.lora_(?P<ab>[AB])(?:\.[\w-]+)?\.weight$"
)
_BLOCK_OF = {"q": "self_attn", "k": "self_attn", "v": "self_attn", "o": "self_attn",
             "gate": "mlp", "up": "mlp", "down": "mlp"}
# Fields of a base config that decide whether an adapter fits.
_BASE_FIELDS = ("model_type", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                "num_kv_heads", "head_dim")


def _adapter_folder(name: str, path) -> str:
    try:
        folder = resolve_path(path, ADAPTER_PATTERNS)
    except FileNotFoundError as e:
        raise AdapterError(f"adapter {name!r}: {e.args[0] if e.args else e}") from None
    if os.path.isfile(os.path.join(folder, "adapter_config.json")):
        return folder
    # PeftModel.save_pretrained puts non-"default" adapters in a subfolder named after them.
    sub = os.path.join(folder, name)
    if os.path.isfile(os.path.join(sub, "adapter_config.json")):
        return sub
    subs = [d for d in sorted(os.listdir(folder)) if os.path.isfile(os.path.join(folder, d, "adapter_config.json"))]
    if len(subs) == 1:
        return os.path.join(folder, subs[0])
    extra = f"; it has adapter subfolders {subs}, name one of them" if subs else ""
    raise AdapterError(f"adapter {name!r}: no adapter_config.json in {folder!r}{extra}")


def _base_config(ref: str | None) -> ModelConfig | None:
    """The config of an adapter's base_model_name_or_path if it is available offline, else None."""
    if not ref:
        return None
    path = os.path.join(os.path.expanduser(ref), "config.json")
    if not os.path.isfile(path):
        try:
            from huggingface_hub import try_to_load_from_cache

            cached = try_to_load_from_cache(ref, "config.json")
        except Exception:
            cached = None
        if not isinstance(cached, str):
            return None  # not comparable offline: the tensor shapes are still checked
        path = cached
    return ModelConfig.from_hf_dict(read_json_object(path), source=path)


def _check_base(name: str, ref: str | None, cfg: ModelConfig) -> None:
    try:
        base = _base_config(ref)
    except ConfigError as e:
        raise AdapterError(f"adapter {name!r} was trained for base model {ref!r}, which is not supported: {e}") from e
    if base is None:
        return
    diffs = [f"{k}: adapter base {getattr(base, k)!r} vs model {getattr(cfg, k)!r}"
             for k in _BASE_FIELDS if getattr(base, k) != getattr(cfg, k)]
    if diffs:
        raise AdapterError(f"adapter {name!r} was trained for base model {ref!r}, which does not match the "
                           f"loaded model: {'; '.join(diffs)}")


def _read_adapter(name: str, path, cfg: ModelConfig):
    """One PEFT folder -> (LoraConfig, {proj: (A [L, d_in, r], B [L, r, d_out])}), checked."""
    folder = _adapter_folder(name, path)
    config_path = os.path.join(folder, "adapter_config.json")
    try:
        raw = read_json_object(config_path, AdapterError)
        lcfg = LoraConfig.from_peft_dict(raw, name=name, source=config_path)
    except AdapterError:
        raise
    except ConfigError as e:
        raise AdapterError(str(e)) from None
    base_ref = raw.get("base_model_name_or_path")
    _check_base(name, base_ref if isinstance(base_ref, str) else None, cfg)
    file = os.path.join(folder, "adapter_model.safetensors")
    if not os.path.isfile(file):
        pickles = [p for p in PICKLE_FILES if os.path.isfile(os.path.join(folder, p))]
        how = (f"; it has {pickles}: pickle is refused (it can run code), re-save the adapter with "
               f"save_pretrained(..., safe_serialization=True)") if pickles else ""
        raise AdapterError(f"adapter {name!r}: no adapter_model.safetensors in {folder!r}{how}")

    L, r = cfg.num_layers, lcfg.rank
    a = {p: np.zeros((L, *cfg.projection_dims(p)[:1], r), np.float32) for p in lcfg.target_modules}
    b = {p: np.zeros((L, r, cfg.projection_dims(p)[1]), np.float32) for p in lcfg.target_modules}
    seen: set = set()
    with _open_safetensors(file, AdapterError, f"adapter {name!r}: {file}") as f:
        for key in f.keys():
            m = _LORA_KEY.match(key)
            if m is None:
                raise AdapterError(
                    f"adapter {name!r}: tensor {key!r} is not a LoRA A/B factor of a decoder-layer "
                    f"projection (only {sorted(HF_TO_PROJECTION)} LoRA weights are supported)"
                )
            module = m["module"]
            proj = HF_TO_PROJECTION.get(module)
            if proj is None or m["block"] != _BLOCK_OF[proj]:
                raise AdapterError(f"adapter {name!r}: tensor {key!r} targets an unsupported module "
                                   f"{m['block']}.{module}; allowed: {sorted(HF_TO_PROJECTION)}")
            if proj not in lcfg.target_modules:
                raise AdapterError(f"adapter {name!r}: tensor {key!r} is for {module}, which "
                                   f"adapter_config.json target_modules does not list")
            layer = int(m["layer"])
            if layer >= L:
                raise AdapterError(f"adapter {name!r}: tensor {key!r} is for layer {layer}, but the model "
                                   f"has {L} layers")
            d_in, d_out = cfg.projection_dims(proj)
            expected = (r, d_in) if m["ab"] == "A" else (d_out, r)
            shape = tuple(f.get_slice(key).get_shape())
            if shape != expected:
                raise AdapterError(
                    f"adapter {name!r}: tensor {key!r} has shape {shape}; expected {expected} "
                    f"(lora_{m['ab']} for rank r={r} on a {module} of {d_in} -> {d_out})"
                )
            if (layer, proj, m["ab"]) in seen:
                raise AdapterError(f"adapter {name!r}: tensor {key!r} duplicates another lora_{m['ab']} "
                                   f"of layer {layer} {module}")
            seen.add((layer, proj, m["ab"]))
            where = f"adapter {name!r}: {file}"
            source = _read_tensor(f, where, key, AdapterError)
            _check_finite(source, source, where, key, AdapterError)
            t = source.astype(np.float32).T  # [r, d_in] -> [d_in, r]; [d_out, r] -> [r, d_out]
            (a if m["ab"] == "A" else b)[proj][layer] = t
    missing = [f"layers.{i}.{_BLOCK_OF[p]}.{HF_MODULE_NAMES[p]}.lora_{ab}"
               for p in lcfg.target_modules for i in range(L) for ab in "AB" if (i, p, ab) not in seen]
    if missing:
        shown = missing[:6] + ([f"... {len(missing) - 6} more"] if len(missing) > 6 else [])
        raise AdapterError(f"adapter {name!r}: {file} lacks tensors {shown} (every layer of every "
                           f"target module needs lora_A and lora_B)")
    return lcfg, {p: (a[p], b[p]) for p in lcfg.target_modules}



def load_adapters(adapters: Mapping[str, object], model: Llama, dtype=None) -> LoraWeights:
    """PEFT LoRA folders (or hub ids), by agent name, stacked for `model`.

    Adapters may differ in rank and target modules (zero-padded; exact). A is stored once
    when it is bit-identical across adapters (shared A). dtype defaults to the model's.
    """
    if not isinstance(adapters, Mapping) or not adapters:
        raise AdapterError(f"adapters must be a non-empty mapping agent name -> adapter folder, got {adapters!r}")
    if dtype is not None:
        dtype = check_dtype(dtype)
    cfg = model.config
    loaded = {}
    for name, path in adapters.items():
        if not isinstance(name, str) or not name:
            raise AdapterError(f"adapter names must be non-empty strings, got {name!r}")
        loaded[name] = _read_adapter(name, path, cfg)
    return stack_adapters(cfg, loaded, dtype=dtype if dtype is not None else model.dtype)


# ---- orbax: convert once, restore fast ---------------------------------------------------------
def _with_shardings(target, shardings):
    """ShapeDtypeStructs that carry their sharding (orbax then restores each shard in place)."""
    if shardings is None:
        return target
    return jax.tree.map(lambda t, s: jax.ShapeDtypeStruct(t.shape, t.dtype, sharding=s), target, shardings)


_FORMAT = "lragent_jax.converted.v2"  # v2: one weight pytree per layer (v1 stacked them)


def _config_to_json(cfg: ModelConfig) -> dict:
    d = dataclasses.asdict(cfg)
    d["rope_scaling"] = cfg.rope_scaling_dict or None
    d["eos_token_ids"] = list(cfg.eos_token_ids)
    return d


def _config_from_json(d: dict) -> ModelConfig:
    d = dict(d)
    d["rope_scaling"] = _freeze(d["rope_scaling"]) if d.get("rope_scaling") else None
    d["eos_token_ids"] = tuple(d.get("eos_token_ids") or ())
    return ModelConfig(**d)


def _lora_tree(lora: LoraWeights) -> dict:
    return {p: {"a": lp.a, "b": lp.b, "scale": lp.scale} for p, lp in lora.projections.items()}


def save_converted(directory, model: Llama, lora: LoraWeights | None = None, *, overwrite: bool = False) -> str:
    """Write model (and adapters) as an orbax checkpoint plus JSON metadata; returns the folder.

    Layout: meta.json (format, dtype, ModelConfig, adapter names/configs), params/ and lora/
    (orbax StandardCheckpointer). Restore with `restore_converted`.
    """
    import orbax.checkpoint as ocp

    directory = os.path.abspath(os.fspath(directory))  # orbax wants absolute paths
    if os.path.exists(os.path.join(directory, "meta.json")) and not overwrite:
        raise FileExistsError(f"{directory} already holds a converted checkpoint; pass overwrite=True")
    os.makedirs(directory, exist_ok=True)
    meta = {"format": _FORMAT, "dtype": str(jnp.dtype(model.dtype)), "model_config": _config_to_json(model.config)}
    if lora is not None:
        meta["lora"] = {
            "names": list(lora.names),
            "configs": [dataclasses.asdict(c) for c in lora.configs],
            "shared_a": {p: lp.shared_a for p, lp in lora.projections.items()},
            "dtype": str(next(iter(lora.projections.values())).a.dtype),
            "shapes": {p: {k: list(v.shape) for k, v in t.items()} for p, t in _lora_tree(lora).items()},
        }
    ckpt = ocp.StandardCheckpointer()
    try:
        ckpt.save(os.path.join(directory, "params"), nnx.to_pure_dict(nnx.state(model)), force=overwrite)
        if lora is not None:
            ckpt.save(os.path.join(directory, "lora"), _lora_tree(lora), force=overwrite)
        ckpt.wait_until_finished()
    finally:
        ckpt.close()
    with open(os.path.join(directory, "meta.json"), "w") as f:  # last: marks a complete save
        json.dump(meta, f, indent=2)
    return directory


def restore_converted(directory, dtype=None, *, mesh=None) -> tuple[Llama, LoraWeights | None]:
    """(model, lora or None) from `save_converted`; dtype casts both (default: as saved). mesh: orbax
    reads each device's shard of every array straight onto it (Engine(mesh=...)'s shardings)."""
    import orbax.checkpoint as ocp

    directory = os.path.abspath(os.fspath(directory))
    meta_path = os.path.join(directory, "meta.json")
    if not os.path.isfile(meta_path):
        raise FileNotFoundError(f"{directory} is not a converted checkpoint (no meta.json); see save_converted")
    with open(meta_path) as f:
        meta = json.load(f)
    if meta.get("format") != _FORMAT:
        raise ConfigError(f"{directory}: format {meta.get('format')!r} is not supported; expected {_FORMAT!r}")
    cfg = _config_from_json(meta["model_config"])
    model_dtype = jnp.dtype(dtype if dtype is not None else meta["dtype"])
    graphdef, state = _abstract_model(cfg, model_dtype)
    target = nnx.to_pure_dict(state)  # ShapeDtypeStructs: orbax restores (and casts) into these
    target = _with_shardings(target, _weight_shardings(cfg, target, mesh))
    ckpt = ocp.StandardCheckpointer()
    try:
        params = ckpt.restore(os.path.join(directory, "params"), target)
        lora = None
        if "lora" in meta:
            lm = meta["lora"]
            lora_dtype = jnp.dtype(dtype if dtype is not None else lm["dtype"])
            lora_target = {
                p: {k: jax.ShapeDtypeStruct(tuple(shape), jnp.float32 if k == "scale" else lora_dtype)
                    for k, shape in parts.items()}
                for p, parts in lm["shapes"].items()
            }
            if mesh is not None:
                from . import sharding

                lora_target = _with_shardings(lora_target, sharding.lora_shardings(
                    lora_target, mesh, sharding.rules_for(cfg, mesh)))
            trees = ckpt.restore(os.path.join(directory, "lora"), lora_target)
            lora = LoraWeights(
                projections={p: LoraProjection(a=t["a"], b=t["b"], scale=t["scale"], shared_a=bool(lm["shared_a"][p]))
                             for p, t in sorted(trees.items(), key=lambda kv: PROJECTIONS.index(kv[0]))},
                names=tuple(lm["names"]),
                configs=tuple(LoraConfig(**{**c, "target_modules": tuple(c["target_modules"])}) for c in lm["configs"]),
            )
    finally:
        ckpt.close()
    nnx.replace_by_pure_dict(state, params)
    return nnx.merge(graphdef, state), lora


# ---- back to HF ------------------------------------------------------------------------------
def save_hf_model(model: Llama, folder) -> str:
    """Write `model` as an HF folder (config.json + model.safetensors) that load_model and
    transformers read. Adapters are not written (use PEFT for that)."""
    from safetensors.numpy import save_file

    cfg = model.config
    folder = os.fspath(folder)
    os.makedirs(folder, exist_ok=True)
    params = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model)))
    tensors = {}
    for name, t in _weight_table(cfg).items():
        value = _get(params, t.path)
        tensors[name] = np.ascontiguousarray(value.T if t.transpose else value)
    save_file(tensors, os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})
    hf = cfg.to_hf_dict()
    hf["dtype"] = str(jnp.dtype(model.dtype))
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(hf, f, indent=2)
    return folder
