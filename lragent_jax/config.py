"""Model and LoRA configurations, read from HF config.json / PEFT adapter_config.json.

Frozen dataclasses so they can be static arguments of jitted functions.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any, Mapping

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM")
SUPPORTED_MODEL_TYPES = ("llama", "mistral")
SUPPORTED_ROPE_TYPES = ("default", "llama3", "linear")

# Projection names as the model calls them, and the PEFT/HF module names they map to.
PROJECTIONS = ("q", "k", "v", "o", "gate", "up", "down")
HF_MODULE_NAMES = {
    "q": "q_proj",
    "k": "k_proj",
    "v": "v_proj",
    "o": "o_proj",
    "gate": "gate_proj",
    "up": "up_proj",
    "down": "down_proj",
}
HF_TO_PROJECTION = {v: k for k, v in HF_MODULE_NAMES.items()}


# Parameter / cache dtypes the model and kernels run in.
PARAM_DTYPES = ("float32", "bfloat16", "float16")


class ConfigError(ValueError):
    """A model or adapter configuration that this library cannot run."""


def check_dtype(dtype, what: str = "dtype"):
    """`dtype` as a jnp dtype if it is one of PARAM_DTYPES, else ConfigError naming the allowed ones.

    Checked up front: an int8 model would load and then fail (or compute nonsense) much later.
    """
    import jax.numpy as jnp

    try:
        dt = jnp.dtype(dtype)
    except TypeError:
        dt = None
    if dt is None or dt.name not in PARAM_DTYPES:
        raise ConfigError(f"{what}={dtype!r} is not supported; allowed: {', '.join(PARAM_DTYPES)}")
    return dt


def read_json_object(path: str, error=None) -> dict:
    """The JSON object in `path`, or `error` (a ConfigError subclass) naming the file and what is wrong."""
    error = error or ConfigError
    try:
        with open(path, encoding="utf-8") as f:
            value = json.load(f)
    except json.JSONDecodeError as e:
        raise error(f"{path}: invalid JSON ({e.msg} at line {e.lineno} column {e.colno})") from None
    except UnicodeDecodeError:
        raise error(f"{path}: not a UTF-8 text file (is it a JSON file?)") from None
    except OSError as e:
        raise error(f"{path}: cannot be read ({e.strerror or e})") from None
    if not isinstance(value, dict):
        raise error(f"{path}: expected a JSON object {{...}}, got a JSON {_json_kind(value)}")
    return value


def _json_kind(value) -> str:
    return {list: "array", str: "string", bool: "boolean", int: "number", float: "number",
            type(None): "null"}.get(type(value), type(value).__name__)


_REQUIRED = object()
_ROPE_NUMBERS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


def _field(d: Mapping[str, Any], key: str, kind: str, source: str, default=_REQUIRED):
    """d[key] checked against `kind` ("int", "float", "bool", "str"); None counts as absent.

    Strict: an int field refuses 8.5 and "8" (int() would truncate or parse them silently).
    """
    value = d.get(key)
    if value is None:
        if default is _REQUIRED:
            raise ConfigError(f"{source}: required field {key!r} is missing")
        return default
    ok = {
        "int": lambda v: isinstance(v, int) and not isinstance(v, bool),
        "float": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v),
        "bool": lambda v: isinstance(v, bool),
        "str": lambda v: isinstance(v, str),
    }[kind](value)
    if not ok:
        want = {"int": "an integer", "float": "a finite number", "bool": "true or false", "str": "a string"}[kind]
        raise ConfigError(f"{source}: field {key!r} must be {want}, got {value!r}")
    return float(value) if kind == "float" else value


def _int_list(d: Mapping[str, Any], key: str, source: str) -> tuple[int, ...]:
    """An int, a list of ints, or absent -> tuple of ints (e.g. eos_token_id)."""
    value = d.get(key)
    values = [] if value is None else (value if isinstance(value, list) else [value])
    if any(isinstance(v, bool) or not isinstance(v, int) for v in values):
        raise ConfigError(f"{source}: field {key!r} must be an integer or a list of integers, got {value!r}")
    return tuple(values)


def _dict_field(d: Mapping[str, Any], key: str, source: str) -> dict | None:
    value = d.get(key)
    if value is not None and not isinstance(value, dict):
        raise ConfigError(f"{source}: field {key!r} must be a JSON object or null, got {value!r}")
    return value or None


def _freeze(value: Any) -> Any:
    """dict -> sorted tuple of pairs, recursively, so configs stay hashable."""
    if isinstance(value, Mapping):
        return tuple(sorted((k, _freeze(v)) for k, v in value.items()))
    if isinstance(value, list):
        return tuple(_freeze(v) for v in value)
    return value


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Shape and numerics of a Llama-family decoder (Llama 2/3/3.1/3.2, Mistral)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    # Frozen form of HF's rope_scaling dict, e.g. (("factor", 8.0), ("rope_type", "llama3"), ...).
    rope_scaling: tuple | None = None
    max_position_embeddings: int = 8192
    tie_word_embeddings: bool = False
    model_type: str = "llama"
    sliding_window: int | None = None
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()

    def __post_init__(self):
        if self.model_type not in SUPPORTED_MODEL_TYPES:
            raise ConfigError(
                f"model_type={self.model_type!r} is not supported; allowed: {SUPPORTED_MODEL_TYPES}"
            )
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers",
                     "num_heads", "num_kv_heads", "head_dim"):
            if int(getattr(self, name)) <= 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(
                f"num_heads={self.num_heads} must be a multiple of num_kv_heads={self.num_kv_heads}"
            )
        rope_type = self.rope_type
        if rope_type not in SUPPORTED_ROPE_TYPES:
            raise ConfigError(
                f"rope_scaling type {rope_type!r} is not supported; allowed: {SUPPORTED_ROPE_TYPES}"
            )
        needed = {"linear": ("factor",), "llama3": ("factor", "low_freq_factor", "high_freq_factor",
                                                    "original_max_position_embeddings")}.get(rope_type, ())
        missing = [k for k in needed if k not in self.rope_scaling_dict]
        if missing:
            raise ConfigError(f"rope_scaling of type {rope_type!r} is missing {missing}")

    # ---- derived sizes -------------------------------------------------------------
    @property
    def q_dim(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def rope_scaling_dict(self) -> dict:
        return dict(self.rope_scaling or ())

    @property
    def rope_type(self) -> str:
        d = self.rope_scaling_dict
        return d.get("rope_type", d.get("type", "default")) if d else "default"

    def projection_dims(self, proj: str) -> tuple[int, int]:
        """(d_in, d_out) of a projection by its short name."""
        d, f = self.hidden_size, self.intermediate_size
        dims = {
            "q": (d, self.q_dim),
            "k": (d, self.kv_dim),
            "v": (d, self.kv_dim),
            "o": (self.q_dim, d),
            "gate": (d, f),
            "up": (d, f),
            "down": (f, d),
        }
        if proj not in dims:
            raise ConfigError(f"unknown projection {proj!r}; allowed: {PROJECTIONS}")
        return dims[proj]

    def num_params(self) -> int:
        d, f, L = self.hidden_size, self.intermediate_size, self.num_layers
        per_layer = d * (self.q_dim + 2 * self.kv_dim) + self.q_dim * d + 3 * d * f + 2 * d
        head = 0 if self.tie_word_embeddings else d * self.vocab_size
        return self.vocab_size * d + L * per_layer + d + head

    # ---- HF interop ----------------------------------------------------------------
    @classmethod
    def from_hf_dict(cls, d: Mapping[str, Any], source: str = "config.json") -> "ModelConfig":
        """From a transformers config dict; ConfigError names `source` and the bad field."""
        if not isinstance(d, Mapping):
            raise ConfigError(f"{source}: expected a JSON object, got {type(d).__name__}")
        archs = d.get("architectures") or []
        if not isinstance(archs, list) or not all(isinstance(a, str) for a in archs):
            raise ConfigError(f"{source}: field 'architectures' must be a list of strings, got {archs!r}")
        model_type = d.get("model_type")
        if archs and not any(a in SUPPORTED_ARCHITECTURES for a in archs):
            raise ConfigError(
                f"{source}: architectures={archs} are not supported; allowed: {SUPPORTED_ARCHITECTURES}"
            )
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ConfigError(
                f"{source}: model_type={model_type!r} is not supported; allowed: {SUPPORTED_MODEL_TYPES}"
            )
        if d.get("attention_bias") or d.get("mlp_bias"):
            raise ConfigError(f"{source}: attention_bias / mlp_bias = true is not supported")
        act = d.get("hidden_act", "silu")
        if act != "silu":
            raise ConfigError(f"{source}: hidden_act={act!r} is not supported; allowed: ('silu',)")
        num_heads = _field(d, "num_attention_heads", "int", source)
        hidden = _field(d, "hidden_size", "int", source)
        head_dim = _field(d, "head_dim", "int", source, default=None)
        if head_dim is None:
            if num_heads <= 0 or hidden % num_heads:
                raise ConfigError(f"{source}: no head_dim, and hidden_size={hidden} is not a multiple of "
                                  f"num_attention_heads={num_heads}")
            head_dim = hidden // num_heads
        eos_ids = _int_list(d, "eos_token_id", source)
        rope_scaling = _dict_field(d, "rope_scaling", source)
        # transformers >= 5 may fold rope settings into "rope_parameters".
        rope_params = _dict_field(d, "rope_parameters", source)
        rope_theta = _field(d, "rope_theta", "float", source, default=None)
        if rope_params:
            rope_theta = _field(rope_params, "rope_theta", "float", f"{source} rope_parameters",
                                default=rope_theta)
            if rope_params.get("rope_type", "default") != "default" and not rope_scaling:
                rope_scaling = {k: v for k, v in rope_params.items() if k != "rope_theta"}
        if rope_scaling and rope_scaling.get("rope_type", rope_scaling.get("type")) == "default":
            rope_scaling = None
        for k in _ROPE_NUMBERS:  # the rope settings this library reads (other types are refused below)
            v = (rope_scaling or {}).get(k)
            if v is not None and not (isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)):
                raise ConfigError(f"{source}: rope_scaling[{k!r}] must be a finite number, got {v!r}")
        sliding_window = _field(d, "sliding_window", "int", source, default=None) if model_type == "mistral" else None
        bos = _field(d, "bos_token_id", "int", source, default=None)
        eps = _field(d, "rms_norm_eps", "float", source, default=1e-5)
        if rope_theta is not None and rope_theta <= 0:
            raise ConfigError(f"{source}: rope_theta must be > 0, got {rope_theta}")
        if eps <= 0:
            raise ConfigError(f"{source}: rms_norm_eps must be > 0, got {eps}")
        try:
            return cls(
                vocab_size=_field(d, "vocab_size", "int", source),
                hidden_size=hidden,
                intermediate_size=_field(d, "intermediate_size", "int", source),
                num_layers=_field(d, "num_hidden_layers", "int", source),
                num_heads=num_heads,
                num_kv_heads=_field(d, "num_key_value_heads", "int", source, default=num_heads),
                head_dim=head_dim,
                rms_norm_eps=eps,
                rope_theta=rope_theta if rope_theta is not None else 10000.0,
                rope_scaling=_freeze(rope_scaling) if rope_scaling else None,
                max_position_embeddings=_field(d, "max_position_embeddings", "int", source, default=8192),
                tie_word_embeddings=_field(d, "tie_word_embeddings", "bool", source, default=False),
                model_type=model_type,
                sliding_window=sliding_window,
                bos_token_id=bos,
                eos_token_ids=eos_ids,
            )
        except ConfigError as e:  # a range check of __post_init__: say which file
            if str(e).startswith(source):
                raise
            raise ConfigError(f"{source}: {e}") from None

    @classmethod
    def from_pretrained(cls, folder: str) -> "ModelConfig":
        path = os.path.join(folder, "config.json")
        if not os.path.isfile(path):
            raise ConfigError(f"no config.json in {folder!r}")
        return cls.from_hf_dict(read_json_object(path), source=path)

    def to_hf_dict(self) -> dict:
        """A transformers-compatible config dict (used to build parity models and to save)."""
        arch = "MistralForCausalLM" if self.model_type == "mistral" else "LlamaForCausalLM"
        d = {
            "architectures": [arch],
            "model_type": self.model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": self.rope_scaling_dict or None,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "hidden_act": "silu",
            "attention_bias": False,
            "mlp_bias": False,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": list(self.eos_token_ids) if self.eos_token_ids else None,
        }
        if self.model_type == "mistral":
            d["sliding_window"] = self.sliding_window
        return d


# Random-weight shapes users can run without downloading anything (python -m bench.trace --shape).
_LLAMA31_ROPE = {
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
    "rope_type": "llama3",
}
PRESETS: dict[str, ModelConfig] = {
    "tiny": ModelConfig(
        vocab_size=259, hidden_size=128, intermediate_size=256, num_layers=4, num_heads=4,
        num_kv_heads=2, head_dim=32, rope_theta=10000.0, max_position_embeddings=4096,
        bos_token_id=256, eos_token_ids=(257,),
    ),
    "llama-3.2-1b": ModelConfig(
        vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_layers=16,
        num_heads=32, num_kv_heads=8, head_dim=64, rope_theta=500000.0,
        rope_scaling=_freeze({**_LLAMA31_ROPE, "factor": 32.0}), max_position_embeddings=131072,
        tie_word_embeddings=True, bos_token_id=128000, eos_token_ids=(128001, 128008, 128009),
    ),
    "llama-3.1-8b": ModelConfig(
        vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_layers=32,
        num_heads=32, num_kv_heads=8, head_dim=128, rope_theta=500000.0,
        rope_scaling=_freeze(_LLAMA31_ROPE), max_position_embeddings=131072,
        bos_token_id=128000, eos_token_ids=(128001, 128008, 128009),
    ),
    "llama-3.1-70b": ModelConfig(  # too big for one device in bf16: shard it (sharding.init_sharded)
        vocab_size=128256, hidden_size=8192, intermediate_size=28672, num_layers=80,
        num_heads=64, num_kv_heads=8, head_dim=128, rope_theta=500000.0,
        rope_scaling=_freeze(_LLAMA31_ROPE), max_position_embeddings=131072,
        bos_token_id=128000, eos_token_ids=(128001, 128008, 128009),
    ),
    "ministral-8b": ModelConfig(
        vocab_size=131072, hidden_size=4096, intermediate_size=12288, num_layers=36,
        num_heads=32, num_kv_heads=8, head_dim=128, rope_theta=100000000.0,
        max_position_embeddings=32768, model_type="mistral", bos_token_id=1, eos_token_ids=(2,),
    ),
}


def preset_name(config: ModelConfig) -> str | None:
    """The preset whose shape this config has (e.g. a loaded Llama-3.1-8B), or None."""
    fields = ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads",
              "head_dim", "model_type")
    for name, p in PRESETS.items():
        if all(getattr(p, f) == getattr(config, f) for f in fields):
            return name
    return None


def preset(name: str) -> ModelConfig:
    if name not in PRESETS:
        raise ConfigError(f"unknown shape {name!r}; allowed: {sorted(PRESETS)}")
    return PRESETS[name]


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """One PEFT LoRA adapter's hyper-parameters."""

    rank: int
    alpha: float
    target_modules: tuple[str, ...] = ("q", "v")  # short projection names
    use_rslora: bool = False

    def __post_init__(self):
        if self.rank <= 0:
            raise ConfigError(f"LoRA rank must be positive, got {self.rank}")
        bad = [t for t in self.target_modules if t not in PROJECTIONS]
        if bad:
            raise ConfigError(f"unknown LoRA target modules {bad}; allowed: {PROJECTIONS}")

    @property
    def scale(self) -> float:
        """PEFT's scaling: alpha / r, or alpha / sqrt(r) with rsLoRA."""
        return self.alpha / (self.rank**0.5 if self.use_rslora else self.rank)

    @classmethod
    def from_peft_dict(cls, d: Mapping[str, Any], *, name: str = "adapter",
                       source: str = "adapter_config.json") -> "LoraConfig":
        """From a PEFT adapter_config dict; ConfigError names the adapter, `source` and the bad field."""
        where = f"adapter {name!r} ({source})"
        if not isinstance(d, Mapping):
            raise ConfigError(f"{where}: expected a JSON object, got {type(d).__name__}")
        if d.get("peft_type", "LORA") != "LORA":
            raise ConfigError(f"{where}: peft_type={d.get('peft_type')!r}; only LORA is supported")
        for key, ok in (("use_dora", False), ("fan_in_fan_out", False)):
            if bool(d.get(key, False)) != ok:
                raise ConfigError(f"{where}: {key}={d.get(key)!r} is not supported")
        if d.get("bias", "none") != "none":
            raise ConfigError(f"{where}: bias={d.get('bias')!r} is not supported; allowed: 'none'")
        for key in ("rank_pattern", "alpha_pattern"):
            if d.get(key):
                raise ConfigError(f"{where}: {key} is not supported (got {d.get(key)})")
        for key in ("layers_to_transform", "modules_to_save"):
            if d.get(key):
                raise ConfigError(f"{where}: {key}={d.get(key)!r} is not supported")
        targets = d.get("target_modules") or []
        if isinstance(targets, str):
            raise ConfigError(
                f"{where}: target_modules given as a regex ({targets!r}) is not supported; "
                f"use a list of module names from {sorted(HF_TO_PROJECTION)}"
            )
        if not isinstance(targets, list) or not all(isinstance(t, str) for t in targets):
            raise ConfigError(f"{where}: field 'target_modules' must be a list of module names, got {targets!r}")
        if not targets:
            raise ConfigError(f"{where}: target_modules is empty or missing; "
                              f"list the LoRA modules, e.g. [\"q_proj\", \"v_proj\"]")
        short = []
        for t in targets:
            t = t.split(".")[-1]
            if t not in HF_TO_PROJECTION:
                raise ConfigError(
                    f"{where}: target module {t!r} is not supported; allowed: {sorted(HF_TO_PROJECTION)}"
                )
            short.append(HF_TO_PROJECTION[t])
        order = {p: i for i, p in enumerate(PROJECTIONS)}
        rank = _field(d, "r", "int", where)
        if rank <= 0:
            raise ConfigError(f"{where}: field 'r' (the LoRA rank) must be positive, got {rank}")
        return cls(
            rank=rank,
            alpha=_field(d, "lora_alpha", "float", where, default=float(rank)),
            target_modules=tuple(sorted(set(short), key=order.get)),
            use_rslora=_field(d, "use_rslora", "bool", where, default=False),
        )
