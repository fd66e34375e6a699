"""Model configuration: the `config.json` of a tri-mode checkpoint, validated.

Every field is documented with its meaning; defaults are the published 8B
model's values (see shared/spec/tri-mode-model.md section 1). Settings are
never inferred from file names.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import CheckpointError

ARCHITECTURE = "NemotronLabsDiffusionModel"


@dataclass(frozen=True)
class RopeConfig:
    """Rotary embedding with YaRN scaling and the "llama 4" query scaling."""

    rope_type: str = "yarn"  # "yarn" or "default" (plain RoPE)
    rope_theta: float = 1e6
    factor: float = 16.0  # YaRN context extension factor
    original_max_position_embeddings: int = 16384
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float = 1.0
    mscale_all_dim: float = 1.0
    llama_4_scaling_beta: float = 0.1  # queries *= 1 + beta*log(1 + floor(pos / original_max))
    truncate: bool = True  # YaRN correction range rounded outward (transformers' default)


@dataclass(frozen=True)
class ModelConfig:
    """The network's hyper-parameters and the decode-relevant token ids."""

    vocab_size: int = 131072
    hidden_size: int = 4096
    intermediate_size: int = 14336
    num_hidden_layers: int = 34
    num_attention_heads: int = 32
    num_key_value_heads: int = 8
    head_dim: int = 128
    rms_norm_eps: float = 1e-5
    hidden_act: str = "silu"
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 262144
    block_size: int = 32  # default block / draft length
    mask_token_id: int = 100  # the [MASK] token of diffusion
    eos_token_id: int = 11
    dlm_paradigm: str = "bidirectional"
    rope: RopeConfig = field(default_factory=RopeConfig)

    # ---- derived -----------------------------------------------------------
    @property
    def kv_groups(self) -> int:
        return self.num_attention_heads // self.num_key_value_heads

    def num_parameters(self) -> int:
        h, i, v, d = self.hidden_size, self.intermediate_size, self.vocab_size, self.head_dim
        attn = h * d * (self.num_attention_heads * 2 + self.num_key_value_heads * 2)
        per_layer = attn + 3 * h * i + 2 * h
        head = 0 if self.tie_word_embeddings else v * h
        return v * h + self.num_hidden_layers * per_layer + h + head

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "rope"}
        out["architectures"] = [ARCHITECTURE]
        out["rope_parameters"] = dataclasses.asdict(self.rope)
        return out

    def hash(self) -> str:
        """A stable hash of the architecture (the manifest records it)."""
        blob = json.dumps(self.to_dict(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    # ---- parsing -----------------------------------------------------------
    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = "config.json") -> "ModelConfig":
        if not isinstance(raw, dict):
            raise CheckpointError(f"{source}: expected a JSON object, got {type(raw).__name__}")
        archs = raw.get("architectures")
        if archs is not None and ARCHITECTURE not in archs:
            raise CheckpointError(
                f"{source}: unsupported architecture {archs!r}; nemocompile loads {ARCHITECTURE!r} checkpoints"
            )
        known = {f.name: f for f in dataclasses.fields(cls) if f.name != "rope"}
        kwargs: dict[str, Any] = {}
        for name, value in raw.items():
            if name in known:
                kwargs[name] = _coerce(name, value, known[name].type, source)
            elif name not in _IGNORED_KEYS:
                warnings.warn(f"{source}: ignoring unknown field {name!r}", stacklevel=2)
        rope_raw = raw.get("rope_parameters", raw.get("rope_scaling"))
        rope_kwargs: dict[str, Any] = {}
        if rope_raw is not None:
            if not isinstance(rope_raw, dict):
                raise CheckpointError(f"{source}: field 'rope_parameters' must be an object")
            rope_fields = {f.name: f for f in dataclasses.fields(RopeConfig)}
            for name, value in rope_raw.items():
                key = "rope_type" if name == "type" else name
                if key in rope_fields:
                    rope_kwargs[key] = _coerce(f"rope_parameters.{key}", value, rope_fields[key].type, source)
                elif key not in _IGNORED_KEYS:
                    warnings.warn(f"{source}: ignoring unknown field rope_parameters.{name}", stacklevel=2)
        if "rope_theta" in raw and "rope_theta" not in rope_kwargs:
            rope_kwargs["rope_theta"] = _coerce("rope_theta", raw["rope_theta"], "float", source)
        config = cls(**kwargs, rope=RopeConfig(**rope_kwargs))
        config.validate(source)
        return config

    @classmethod
    def from_file(cls, path: str | Path) -> "ModelConfig":
        path = Path(path)
        try:
            raw = json.loads(path.read_text())
        except FileNotFoundError:
            raise CheckpointError(f"{path}: missing; a checkpoint directory needs a config.json") from None
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{path}: not valid JSON ({e})") from None
        return cls.from_dict(raw, source=str(path))

    def validate(self, source: str = "config.json") -> None:
        def bad(name: str, why: str) -> CheckpointError:
            return CheckpointError(f"{source}: field {name!r} {why}")

        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "head_dim", "max_position_embeddings",
                     "block_size"):
            if getattr(self, name) <= 0:
                raise bad(name, f"must be positive, got {getattr(self, name)}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise bad("num_key_value_heads", f"({self.num_key_value_heads}) must divide num_attention_heads "
                      f"({self.num_attention_heads})")
        if self.head_dim % 2:
            raise bad("head_dim", f"must be even for rotary embeddings, got {self.head_dim}")
        for name in ("mask_token_id", "eos_token_id"):
            if not 0 <= getattr(self, name) < self.vocab_size:
                raise bad(name, f"({getattr(self, name)}) must be a token id below vocab_size ({self.vocab_size})")
        if self.hidden_act != "silu":
            raise bad("hidden_act", f"is {self.hidden_act!r}; only 'silu' is supported")
        if self.dlm_paradigm != "bidirectional":
            raise bad("dlm_paradigm", f"is {self.dlm_paradigm!r}; only 'bidirectional' is supported")
        if self.rope.rope_type not in ("yarn", "default"):
            raise bad("rope_parameters.rope_type", f"is {self.rope.rope_type!r}; expected 'yarn' or 'default'")
        if self.rms_norm_eps <= 0 or not math.isfinite(self.rms_norm_eps):
            raise bad("rms_norm_eps", "must be a positive number")
        if self.rope.original_max_position_embeddings <= 0:
            raise bad("rope_parameters.original_max_position_embeddings", "must be positive")


# Standard Hugging Face bookkeeping fields that carry no architecture meaning.
_IGNORED_KEYS = {
    "architectures", "model_type", "torch_dtype", "dtype", "transformers_version", "bos_token_id",
    "pad_token_id", "auto_map", "use_cache", "attention_dropout", "attention_bias", "initializer_range",
    "sliding_window", "rope_scaling", "rope_parameters", "rope_theta", "_name_or_path",
}


def _coerce(name: str, value: Any, type_name: Any, source: str) -> Any:
    type_name = type_name if isinstance(type_name, str) else getattr(type_name, "__name__", str(type_name))
    try:
        if type_name == "int":
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise TypeError
            return int(value)
        if type_name == "float":
            if isinstance(value, bool):
                raise TypeError
            return float(value)
        if type_name == "bool":
            if not isinstance(value, bool):
                raise TypeError
            return value
        if type_name == "str":
            if not isinstance(value, str):
                raise TypeError
            return value
    except (TypeError, ValueError):
        raise CheckpointError(f"{source}: field {name!r} must be {type_name}, got {value!r}") from None
    return value
