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

from nemocompile.errors import CheckpointError

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
    # queries *= 1 + beta*log(1 + floor(pos / original_max)); a config without the field has
    # no query scaling (as SGLang and Megatron read it); the published configs write 0.1
    llama_4_scaling_beta: float = 0.0
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
    eos_token_id: int = 11  # the first EOS id (what single-id callers use)
    # every EOS id when config.json / generation_config.json name several (any of them stops);
    # empty = just eos_token_id
    eos_token_ids: tuple[int, ...] = ()
    dlm_paradigm: str = "bidirectional"
    rope: RopeConfig = field(default_factory=RopeConfig)
    # the dtype the weights are stored in ("bfloat16" for published checkpoints); load() uses it
    # when no dtype is asked for. None = not stated (load in fp32)
    torch_dtype: str | None = None

    # ---- derived -----------------------------------------------------------
    @property
    def eos_ids(self) -> tuple[int, ...]:
        """Every id that ends generation (at least ``eos_token_id``)."""
        return self.eos_token_ids or (self.eos_token_id,)

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
        # written only when they say something, so the hash of a plain config is unchanged
        if len(self.eos_ids) > 1:
            out["eos_token_ids"] = list(self.eos_ids)
        else:
            del out["eos_token_ids"]
        if self.torch_dtype is None:
            del out["torch_dtype"]
        out["architectures"] = [ARCHITECTURE]
        out["rope_parameters"] = dataclasses.asdict(self.rope)
        return out

    def hash(self) -> str:
        """A stable hash of the architecture (the manifest records it); the storage dtype is
        not part of it."""
        arch = {k: v for k, v in self.to_dict().items() if k != "torch_dtype"}
        blob = json.dumps(arch, sort_keys=True).encode()
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
        known = {f.name: f for f in dataclasses.fields(cls) if f.name not in ("rope", "eos_token_ids")}
        kwargs: dict[str, Any] = {}
        for name, value in raw.items():
            if name in ("eos_token_id", "eos_token_ids"):
                ids = _eos_ids(name, value, source)
                kwargs["eos_token_id"] = ids[0]
                if len(ids) > 1:
                    kwargs["eos_token_ids"] = ids
            elif name == "dtype" and "torch_dtype" not in raw:  # transformers >= 5 writes "dtype"
                kwargs["torch_dtype"] = _coerce(name, value, "str", source)
            elif name in known:
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
                elif key not in _IGNORED_KEYS and key != "max_position_embeddings":  # transformers copies it here
                    warnings.warn(f"{source}: ignoring unknown field rope_parameters.{name}", stacklevel=2)
        if "rope_theta" in raw and "rope_theta" not in rope_kwargs:
            rope_kwargs["rope_theta"] = _coerce("rope_theta", raw["rope_theta"], "float", source)
        config = cls(**kwargs, rope=RopeConfig(**rope_kwargs))
        config.validate(source)
        return config

    @classmethod
    def from_file(cls, path: str | Path) -> "ModelConfig":
        """Parse ``config.json``; a ``generation_config.json`` beside it adds its EOS ids."""
        path = Path(path)
        try:
            raw = json.loads(path.read_text())
        except FileNotFoundError:
            raise CheckpointError(f"{path}: missing; a checkpoint directory needs a config.json") from None
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{path}: not valid JSON ({e})") from None
        config = cls.from_dict(raw, source=str(path))
        gen_path = path.parent / "generation_config.json"
        if gen_path.is_file():
            try:
                gen = json.loads(gen_path.read_text())
            except json.JSONDecodeError as e:
                raise CheckpointError(f"{gen_path}: not valid JSON ({e})") from None
            if not isinstance(gen, dict):
                raise CheckpointError(f"{gen_path}: expected a JSON object, got {type(gen).__name__}")
            if gen.get("eos_token_id") is not None:
                extra = _eos_ids("eos_token_id", gen["eos_token_id"], str(gen_path))
                ids = tuple(dict.fromkeys(config.eos_ids + extra))
                config = dataclasses.replace(config, eos_token_ids=ids if len(ids) > 1 else ())
                config.validate(str(gen_path))
        return config

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
        for name, value in [("mask_token_id", self.mask_token_id)] + [("eos_token_id", i) for i in self.eos_ids]:
            if not 0 <= value < self.vocab_size:
                raise bad(name, f"({value}) must be a token id below vocab_size ({self.vocab_size})")
        if self.eos_token_ids and self.eos_token_ids[0] != self.eos_token_id:
            raise bad("eos_token_ids", f"must start with eos_token_id ({self.eos_token_id})")
        if self.hidden_act != "silu":
            raise bad("hidden_act", f"is {self.hidden_act!r}; only 'silu' is supported")
        if self.dlm_paradigm != "bidirectional":
            raise bad("dlm_paradigm", f"is {self.dlm_paradigm!r}; only 'bidirectional' is supported")
        if self.rope.rope_type not in ("yarn", "default"):
            raise bad("rope_parameters.rope_type", f"is {self.rope.rope_type!r}; expected 'yarn' or 'default'")
        if self.rms_norm_eps <= 0 or not math.isfinite(self.rms_norm_eps):
            raise bad("rms_norm_eps", "must be a positive number")
        if not self.rope.factor > 0:
            raise bad("rope_parameters.factor", f"must be positive, got {self.rope.factor}")
        if self.torch_dtype is not None and self.torch_dtype not in STORAGE_DTYPES:
            raise bad("torch_dtype", f"is {self.torch_dtype!r}; expected one of {', '.join(STORAGE_DTYPES)}")
        if self.rope.original_max_position_embeddings <= 0:
            raise bad("rope_parameters.original_max_position_embeddings", "must be positive")


# torch_dtype values the loader maps to a torch dtype
STORAGE_DTYPES = ("float32", "float16", "bfloat16")

# Fields real checkpoints carry that matter only to transformers or to training (spec 1):
# accepted silently. (attention_bias / mlp_bias true would bring bias tensors, which the
# loader rejects by name.)
_IGNORED_KEYS = {
    "architectures", "model_type", "transformers_version", "bos_token_id", "pad_token_id", "auto_map",
    "use_cache", "attention_dropout", "attention_bias", "mlp_bias", "initializer_range", "sliding_window",
    "rope_scaling", "rope_parameters", "rope_theta", "_name_or_path", "attn_implementation",
    "_attn_implementation", "ar_loss_weight", "dlm_loss_weight", "dp_varying_mask_ratio", "dtype",
}


def _eos_ids(name: str, value: Any, source: str) -> tuple[int, ...]:
    """``eos_token_id`` as real files write it: one id or a non-empty list of ids."""
    values = value if isinstance(value, list) else [value]
    if not values:
        raise CheckpointError(f"{source}: field {name!r} is an empty list; give at least one EOS id")
    return tuple(dict.fromkeys(_coerce(name, v, "int", source) for v in values))


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
