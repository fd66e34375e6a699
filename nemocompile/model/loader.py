"""Loading tri-mode checkpoints from local directories (never a hub, never pickle).

Weights are read tensor by tensor from memory-mapped safetensors into a model
built on the ``meta`` device, so loading holds one copy of the weights (plus
one tensor in flight during a dtype conversion). Every check runs before the
model is returned: a failure leaves nothing half-loaded.
"""

from __future__ import annotations

import json
import math
from importlib import resources
from pathlib import Path
from typing import Iterator

import torch

from nemocompile.model.config import ModelConfig
from nemocompile.errors import CheckpointError
from nemocompile.model.modeling import LoRA, TriModeModel, yarn_inv_freq
from nemocompile.text.tokenizer import Tokenizer

LORA_DIR = "linear_spec_lora"
_PEFT_PREFIX = "base_model.model."

DTYPES = {
    "fp32": torch.float32, "float32": torch.float32,
    "fp16": torch.float16, "float16": torch.float16, "half": torch.float16,
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
}


def embedded_model_dir() -> Path:
    """The tiny tri-mode model shipped inside the package."""
    return Path(str(resources.files("nemocompile") / "assets" / "tiny"))


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype:
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        if dtype in DTYPES.values():
            return dtype
        raise CheckpointError(f"dtype {dtype} is not supported; use fp32, fp16 or bf16")
    try:
        return DTYPES[str(dtype).lower()]
    except KeyError:
        raise CheckpointError(f"unknown dtype {dtype!r}; use one of fp32, fp16, bf16") from None


def load(path: str | Path | None = None, dtype: str | torch.dtype | None = None,
         device: str | torch.device = "cpu", lora: bool = True, *, lazy: bool = False) -> TriModeModel:
    """Load a checkpoint directory (default: the embedded tiny model) as an eval-mode model.

    ``dtype`` defaults to the checkpoint's ``torch_dtype`` (bf16 for published
    checkpoints; fp32 when config.json does not say). ``lora=False`` skips the
    optional drafter adapter, which is always held in fp32 (as PEFT runs it).

    ``lazy=True``: what an export traces without holding the weights. The base
    weights are checked from the safetensors headers only and the model's
    parameters are fake tensors (shape and dtype, no data: it cannot run);
    ``model.weight_source`` reads any one of them from the checkpoint, in
    ``dtype``, when asked. The small drafter adapter and the rotary
    frequencies are real.
    """
    directory = Path(path) if path is not None else embedded_model_dir()
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: not a directory; pass a Hugging Face style checkpoint directory")
    config = ModelConfig.from_file(directory / "config.json")
    torch_dtype = resolve_dtype(dtype if dtype is not None else config.torch_dtype)

    with torch.device("meta"):
        model = TriModeModel(config)
    expected = {name: tuple(p.shape) for name, p in model.named_parameters()}
    if lazy:
        model = _lazy_model(config, directory, expected, torch_dtype)
    else:
        state = {}
        for name, file, tensor in _iter_weights(directory):
            _check_tensor(config, expected, name, file, tuple(tensor.shape), tensor.is_floating_point(), tensor.dtype)
            state[name] = tensor.to(device=device, dtype=torch_dtype)
        _check_complete(directory, expected, state)
        model.load_state_dict(state, assign=True)
    # Buffers are not in the checkpoint: recompute the rotary frequencies off the meta device.
    model.inv_freq = yarn_inv_freq(config.rope, config.head_dim)[0].to(device)

    if lora and (directory / LORA_DIR).is_dir():
        _attach_lora(model, directory / LORA_DIR, device)
    model.tokenizer = Tokenizer(directory) if (directory / "tokenizer.json").is_file() else None
    model.source = str(directory)
    return model.eval().requires_grad_(False)


def _check_tensor(config: ModelConfig, expected: dict, name: str, file: Path, shape: tuple, is_float: bool,
                  dtype) -> None:
    if name not in expected:
        raise CheckpointError(f"{file}: unexpected tensor {name!r}; is this a {config.to_dict()['architectures'][0]} checkpoint?")
    if shape != expected[name]:
        raise CheckpointError(f"{file}: tensor {name!r} has shape {list(shape)}, config.json implies {list(expected[name])}")
    if not is_float:
        raise CheckpointError(f"{file}: tensor {name!r} has non-float dtype {dtype}")


def _check_complete(directory: Path, expected: dict, found) -> None:
    missing = sorted(set(expected) - set(found))
    if missing:
        more = f" (and {len(missing) - 3} more)" if len(missing) > 3 else ""
        raise CheckpointError(f"{directory}: missing tensors {missing[:3]}{more}")


class CheckpointWeights:
    """Reads one base weight at a time from the checkpoint's safetensors files, in ``dtype``."""

    def __init__(self, files: dict[str, Path], dtype: torch.dtype):
        self.files, self.dtype = files, dtype  # parameter name -> the file holding it

    def read(self, name: str) -> torch.Tensor:
        from safetensors import safe_open

        with safe_open(str(self.files[name]), framework="pt") as handle:
            return handle.get_tensor(name).to(self.dtype)

    def identity(self, name: str) -> tuple:
        """What tells this weight from any other without reading it."""
        return ("checkpoint", str(self.files[name]), name, str(self.dtype))


def _lazy_model(config: ModelConfig, directory: Path, expected: dict, dtype: torch.dtype) -> TriModeModel:
    from safetensors import SafetensorError, safe_open
    from torch._subclasses.fake_tensor import FakeTensorMode

    files = {}
    for f in _weight_files(directory):
        try:
            with safe_open(str(f), framework="pt") as handle:
                for name in handle.keys():
                    part = handle.get_slice(name)
                    stored = part.get_dtype()
                    _check_tensor(config, expected, name, f, tuple(part.get_shape()), stored in _FLOAT_DTYPES, stored)
                    files[name] = f
        except SafetensorError as e:
            raise CheckpointError(f"{f}: not a readable safetensors file ({e})") from None
    _check_complete(directory, expected, files)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # parameters are born in dtype (a fake module cannot be converted)
    try:
        with FakeTensorMode(allow_non_fake_inputs=True):  # real inputs and the real adapter mix with fake weights
            model = TriModeModel(config)
    finally:
        torch.set_default_dtype(default)
    model.weight_source = CheckpointWeights(files, dtype)
    return model


_FLOAT_DTYPES = ("F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2")


def _iter_weights(directory: Path) -> Iterator[tuple[str, Path, torch.Tensor]]:
    from safetensors import SafetensorError, safe_open

    for f in _weight_files(directory):
        try:
            with safe_open(str(f), framework="pt") as handle:
                for name in handle.keys():
                    yield name, f, handle.get_tensor(name)
        except SafetensorError as e:
            raise CheckpointError(f"{f}: not a readable safetensors file ({e})") from None


_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}


def weight_shapes(directory: str | Path, filename: str | None = None) -> dict[str, tuple[tuple[int, ...], int]]:
    """Every stored tensor's shape and bytes per element, from the safetensors headers
    only (no weight is read): ``filename`` in ``directory``, else the checkpoint's weights."""
    from safetensors import SafetensorError, safe_open

    directory = Path(directory)
    out = {}
    for f in [directory / filename] if filename else _weight_files(directory):
        try:
            with safe_open(str(f), framework="pt") as handle:
                for name in handle.keys():
                    part = handle.get_slice(name)
                    out[name] = (tuple(part.get_shape()), _DTYPE_BYTES.get(part.get_dtype(), 4))
        except SafetensorError as e:
            raise CheckpointError(f"{f}: not a readable safetensors file ({e})") from None
    return out


def _weight_files(directory: Path) -> list[Path]:
    """The checkpoint's safetensors files: model.safetensors or the index's shards."""
    single, index = directory / "model.safetensors", directory / "model.safetensors.index.json"
    if single.is_file():
        files = [single]
    elif index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index}: expected a JSON object with a 'weight_map' ({e})") from None
        files = [directory / f for f in dict.fromkeys(weight_map.values())]
        for f in files:
            if not f.is_file():
                raise CheckpointError(f"{index}: lists shard {f.name!r}, which is missing from {directory}")
    else:
        for pattern in ("*.bin", "*.pt", "*.pth"):
            if any(directory.glob(pattern)):
                raise CheckpointError(
                    f"{directory}: only pickle weights ({pattern}) found; nemocompile never unpickles: "
                    "convert them to model.safetensors"
                )
        raise CheckpointError(f"{directory}: no model.safetensors or model.safetensors.index.json")
    return files


def _attach_lora(model: TriModeModel, lora_dir: Path, device) -> None:
    from safetensors.torch import load_file

    cfg_path, weights_path = lora_dir / "adapter_config.json", lora_dir / "adapter_model.safetensors"
    try:
        cfg = json.loads(cfg_path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{cfg_path}: missing; a {LORA_DIR}/ adapter needs adapter_config.json") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{cfg_path}: not valid JSON ({e})") from None
    for key in ("r", "lora_alpha"):
        if not isinstance(cfg.get(key), (int, float)) or cfg[key] <= 0:
            raise CheckpointError(f"{cfg_path}: field {key!r} must be a positive number")
    targets = cfg.get("target_modules", ["o_proj"])
    targets = [targets] if isinstance(targets, str) else list(targets)
    if targets != ["o_proj"]:
        raise CheckpointError(f"{cfg_path}: target_modules {targets} unsupported; the drafter adapts o_proj only")
    r, alpha = int(cfg["r"]), float(cfg["lora_alpha"])
    scale = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
    if not weights_path.is_file():
        raise CheckpointError(f"{weights_path}: missing; the adapter's weights must be safetensors")
    tensors = load_file(str(weights_path))
    cfgm = model.config
    in_f, out_f = cfgm.num_attention_heads * cfgm.head_dim, cfgm.hidden_size
    adapters = []
    for i in range(cfgm.num_hidden_layers):
        base = f"{_PEFT_PREFIX}encoder.layers.{i}.self_attn.o_proj"
        a, b = tensors.pop(f"{base}.lora_A.weight", None), tensors.pop(f"{base}.lora_B.weight", None)
        if a is None or b is None:
            raise CheckpointError(f"{weights_path}: missing {base}.lora_A/lora_B.weight")
        if tuple(a.shape) != (r, in_f) or tuple(b.shape) != (out_f, r):
            raise CheckpointError(
                f"{weights_path}: layer {i} adapter shapes {list(a.shape)}, {list(b.shape)}; "
                f"expected [{r}, {in_f}] and [{out_f}, {r}]"
            )
        with torch.device("meta"):
            lora = LoRA(in_f, out_f, r, scale)
        # fp32 whatever the model's dtype: PEFT upcasts bf16/fp16 adapters and adds the delta in fp32
        lora.load_state_dict({"lora_A.weight": a.to(device, torch.float32),
                              "lora_B.weight": b.to(device, torch.float32)}, assign=True)
        adapters.append(lora)
    if tensors:
        raise CheckpointError(f"{weights_path}: unexpected tensors {sorted(tensors)[:3]}")
    for layer, lora in zip(model.encoder.layers, adapters):
        layer.self_attn.o_lora = lora


def save(model: TriModeModel, directory: str | Path, dtype: torch.dtype | None = None) -> None:
    """Write ``model`` in the checkpoint layout (config.json, model.safetensors, an fp32 adapter);
    ``dtype`` converts the base weights (and is recorded as the config's torch_dtype)."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = {**model.config.to_dict(), "torch_dtype": str(dtype or model.dtype).removeprefix("torch.")}
    (directory / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    cast = (lambda t: t.to(dtype)) if dtype is not None else (lambda t: t)
    state = {k: cast(v).contiguous() for k, v in model.state_dict().items() if ".o_lora." not in k}
    save_file(state, str(directory / "model.safetensors"))
    if model.has_lora:
        lora_dir = directory / LORA_DIR
        lora_dir.mkdir(exist_ok=True)
        first = model.encoder.layers[0].self_attn.o_lora
        r = first.lora_A.weight.shape[0]
        tensors = {}
        for i, layer in enumerate(model.encoder.layers):
            base = f"{_PEFT_PREFIX}encoder.layers.{i}.self_attn.o_proj"
            tensors[f"{base}.lora_A.weight"] = layer.self_attn.o_lora.lora_A.weight.float().contiguous()
            tensors[f"{base}.lora_B.weight"] = layer.self_attn.o_lora.lora_B.weight.float().contiguous()
        save_file(tensors, str(lora_dir / "adapter_model.safetensors"))
        (lora_dir / "adapter_config.json").write_text(json.dumps({
            "peft_type": "LORA", "r": r, "lora_alpha": first.scale * r, "target_modules": ["o_proj"],
            "lora_dropout": 0.0, "bias": "none", "base_model_name_or_path": str(directory),
        }, indent=2) + "\n")
