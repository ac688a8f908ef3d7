"""An adapter = its validated config + its tensors, grouped per module.

Reads `adapter_config.json` and the header of `adapter_model.safetensors`; tensors are read
one at a time when the merge needs them. Knows PEFT's saved key grammar
(peft-semantics §5.1) and refuses what cannot be merged faithfully (§6).
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import AdapterConfigError, InputError, UnsupportedAdapterError
from .safetensors_file import FLOAT_DTYPES, SafetensorsHeader, read_bytes, read_header, read_tensor
from .scaling import ModuleScale, module_scale

if TYPE_CHECKING:
    import torch

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_NAME = "adapter_model.bin"
PEFT_PREFIX = "base_model.model."

# Inits whose saved A/B are relative to a residual base that is not saved (peft-semantics §6.1).
_UNCONVERTED_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga")

# suffix -> (role, is embedding LoRA)
_LORA_SUFFIXES = {
    ".lora_A.weight": "A",
    ".lora_B.weight": "B",
    ".lora_B.bias": "bias",
    ".lora_embedding_A": "embedding_A",
    ".lora_embedding_B": "embedding_B",
    ".lora_magnitude_vector": "magnitude",
    ".lora_magnitude_vector.weight": "magnitude",
    ".token_adapter.trainable_tokens_delta": "tokens",
}


@dataclass
class AdapterConfig:
    """The fields of a PEFT LoraConfig that matter for merging, validated."""

    r: int
    lora_alpha: float
    use_rslora: bool
    rank_pattern: dict[str, int]
    alpha_pattern: dict[str, float]
    fan_in_fan_out: bool
    use_dora: bool
    lora_bias: bool
    bias: str
    modules_to_save: list[str]
    trainable_token_indices: list[int] | dict[str, list[int]] | None
    target_parameters: list[str]
    ensure_weight_tying: bool
    base_model_name_or_path: str | None
    revision: str | None
    raw: dict[str, Any] = field(repr=False)

    @property
    def convention(self) -> str:
        return "rslora" if self.use_rslora else "classic"

    def scale_for(self, module_name: str) -> ModuleScale:
        """PEFT's rank, alpha and scale for a module (the one scale implementation)."""
        return module_scale(
            module_name,
            r=self.r,
            lora_alpha=self.lora_alpha,
            use_rslora=self.use_rslora,
            rank_pattern=self.rank_pattern,
            alpha_pattern=self.alpha_pattern,
        )


def _is_number(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def parse_config(raw: object, where: str = CONFIG_NAME) -> AdapterConfig:
    """Validate a loaded adapter_config.json dict; refuse what cannot be merged."""
    if not isinstance(raw, dict):
        raise AdapterConfigError(f"{where}: expected a JSON object, got {type(raw).__name__}")
    peft_type = raw.get("peft_type")
    if peft_type is None:
        raise AdapterConfigError(f"{where}: missing 'peft_type'; is this a PEFT adapter folder?")
    if peft_type != "LORA":
        raise UnsupportedAdapterError(
            f"{where}: peft_type is {peft_type!r}; rslora-tools merges LoRA adapters only "
            "(other PEFT methods use different formulas: merge those with PEFT itself)"
        )

    def get(name: str, default: Any, check, expected: str) -> Any:
        value = raw.get(name, default)
        if value is None:
            value = default
        if not check(value):
            raise AdapterConfigError(f"{where}: '{name}' must be {expected}, got {value!r}")
        return value

    r = get("r", 8, lambda v: isinstance(v, int) and not isinstance(v, bool) and v > 0, "a positive integer")
    alpha = get("lora_alpha", 8, _is_number, "a number")
    use_rslora = get("use_rslora", False, lambda v: isinstance(v, bool), "true or false")
    rank_pattern = get(
        "rank_pattern", {},
        lambda v: isinstance(v, dict) and all(isinstance(x, int) and not isinstance(x, bool) and x > 0 for x in v.values()),
        "an object mapping module patterns to positive integers",
    )
    alpha_pattern = get(
        "alpha_pattern", {}, lambda v: isinstance(v, dict) and all(_is_number(x) for x in v.values()),
        "an object mapping module patterns to numbers",
    )
    for field_name, pattern in (("rank_pattern", rank_pattern), ("alpha_pattern", alpha_pattern)):
        for key in pattern:
            try:
                re.compile(rf"(.*\.)?({key})$")
            except re.error as e:
                raise AdapterConfigError(
                    f"{where}: {field_name} key {key!r} is not a valid regular expression ({e}); PEFT matches these "
                    "keys as regular expressions"
                ) from e
    boolean = lambda v: isinstance(v, bool)  # noqa: E731
    fan_in_fan_out = get("fan_in_fan_out", False, boolean, "true or false")
    use_dora = get("use_dora", False, boolean, "true or false")
    lora_bias = get("lora_bias", False, boolean, "true or false")
    bias = get("bias", "none", lambda v: v in ("none", "all", "lora_only"), "'none', 'all' or 'lora_only'")
    strings = lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v)  # noqa: E731
    modules_to_save = get("modules_to_save", [], strings, "a list of module names")
    target_parameters = get("target_parameters", [], strings, "a list of parameter names")
    ensure_weight_tying = get("ensure_weight_tying", False, boolean, "true or false")
    tokens = raw.get("trainable_token_indices")
    ints = lambda v: isinstance(v, list) and all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in v)  # noqa: E731
    if tokens is not None and not (ints(tokens) or (isinstance(tokens, dict) and all(ints(v) for v in tokens.values()))):
        raise AdapterConfigError(
            f"{where}: 'trainable_token_indices' must be a list of token ids or an object of such lists, got {tokens!r}"
        )

    _refuse_variants(raw, where)
    return AdapterConfig(
        r=r, lora_alpha=alpha, use_rslora=use_rslora, rank_pattern=dict(rank_pattern),
        alpha_pattern=dict(alpha_pattern), fan_in_fan_out=fan_in_fan_out, use_dora=use_dora,
        lora_bias=lora_bias, bias=bias, modules_to_save=list(modules_to_save),
        trainable_token_indices=tokens, target_parameters=list(target_parameters),
        ensure_weight_tying=ensure_weight_tying,
        base_model_name_or_path=raw.get("base_model_name_or_path") if isinstance(raw.get("base_model_name_or_path"), str) else None,
        revision=raw.get("revision") if isinstance(raw.get("revision"), str) else None,
        raw=raw,
    )


def _refuse_variants(raw: dict[str, Any], where: str) -> None:
    if raw.get("layer_replication"):
        raise UnsupportedAdapterError(
            f"{where}: 'layer_replication' is set; replicated layers share base weights, so the adapter "
            "cannot be merged into a checkpoint (serve it unmerged with PEFT instead)"
        )
    init = raw.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower().startswith(_UNCONVERTED_INITS):
        raise UnsupportedAdapterError(
            f"{where}: init_lora_weights={init!r}: this adapter is relative to a modified base that was not "
            "saved; convert it to plain LoRA first with PEFT's save_pretrained(..., "
            "path_initial_model_for_weight_conversion=...)"
        )
    variants = {
        "alora_invocation_tokens": "aLoRA",
        "use_qalora": "QALoRA",
        "kasa_config": "KaSA",
        "use_bdlora": "BD-LoRA",
        "arrow_config": "Arrow",
    }
    for key, name in variants.items():
        if raw.get(key):
            raise UnsupportedAdapterError(
                f"{where}: '{key}' is set: {name} adapters are not plain LoRA and cannot be merged by rslora-tools"
            )
    if raw.get("megatron_config"):
        raise UnsupportedAdapterError(
            f"{where}: 'megatron_config' is set: tensor-parallel shards cannot be merged into a full checkpoint"
        )


@dataclass
class LoraModule:
    """The saved tensors of one LoRA-wrapped module (names are adapter keys)."""

    name: str  # module path relative to the wrapped model, PEFT's `.base_layer` wrapper segments removed
    depth: int = 0  # number of nested wrappers (target_parameters on one module)
    a_key: str | None = None
    b_key: str | None = None
    bias_key: str | None = None
    magnitude_key: str | None = None
    embedding: bool = False
    # MultiheadAttention's out_proj: PEFT wraps it inside the MHA layer with the MHA's rank and
    # alpha (patterns match the MHA's name, kept here), and merges its delta twice (see delta.py).
    mha_parent: str | None = None


@dataclass
class Adapter:
    """A PEFT LoRA adapter on disk: config, tensor index, modules; tensors read on demand."""

    path: Path
    weights_path: Path
    config: AdapterConfig
    shapes: dict[str, tuple[int, ...]]
    dtypes: dict[str, str]
    modules: dict[tuple[str, int], LoraModule]
    replacements: dict[str, str]  # base parameter path -> adapter key (full tensors that replace base ones)
    token_deltas: dict[str, str]  # module path -> adapter key of trainable_tokens_delta
    _header: SafetensorsHeader | None = field(default=None, repr=False)
    _pickled: dict[str, torch.Tensor] | None = field(default=None, repr=False)

    def tensor(self, key: str) -> torch.Tensor:
        """Read one adapter tensor as saved (dtype unchanged)."""
        if self._pickled is not None:
            return self._pickled[key].clone()
        assert self._header is not None
        with open(self.weights_path, "rb") as f:
            return read_tensor(f, self._header, key)

    @property
    def raw_available(self) -> bool:
        """Whether `raw` can read tensors (a safetensors adapter, not a pickle)."""
        return self._header is not None

    def raw_offset(self, key: str) -> int:
        """Where one tensor's bytes start in the safetensors file."""
        assert self._header is not None
        return self._header.data_start + self._header.tensors[key].begin

    def raw(self, key: str) -> bytearray | None:
        """One tensor's bytes as saved (safetensors adapters only; None for a pickled one)."""
        if self._header is None:
            return None
        info = self._header.tensors[key]
        with open(self.weights_path, "rb") as f:
            return read_bytes(f, self._header.data_start + info.begin, info.nbytes)

    @property
    def lora_modules(self) -> list[LoraModule]:
        return list(self.modules.values())


def find_adapter_folder(path: str | os.PathLike) -> Path:
    """The folder holding adapter_config.json: PATH itself, or its single adapter subfolder."""
    path = Path(path)
    if path.is_file() and path.name in (CONFIG_NAME, WEIGHTS_NAME):
        path = path.parent
    if not path.is_dir():
        raise InputError(f"{path}: adapter folder not found")
    if (path / CONFIG_NAME).is_file():
        return path
    subfolders = sorted(p for p in path.iterdir() if (p / CONFIG_NAME).is_file())
    if len(subfolders) == 1:
        return subfolders[0]
    if subfolders:
        names = ", ".join(p.name for p in subfolders)
        raise InputError(f"{path}: holds several adapters ({names}); pass the one to merge, e.g. {subfolders[0]}")
    raise InputError(f"{path}: no {CONFIG_NAME} here or in a subfolder; is this a PEFT adapter folder?")


def load_adapter(path: str | os.PathLike, *, allow_pickle: bool = False) -> Adapter:
    """Read an adapter folder: config and tensor headers (weights are read later, one tensor at a time).

    Args:
        path: an adapter folder as written by PEFT's `save_pretrained` (or a folder with one adapter subfolder).
        allow_pickle: load `adapter_model.bin` when there is no safetensors file, with
            `torch.load(weights_only=True)`, which never executes code.
    """
    folder = find_adapter_folder(path)
    config_path = folder / CONFIG_NAME
    try:
        raw = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise AdapterConfigError(f"{config_path}: not valid JSON ({e})") from e
    config = parse_config(raw, str(config_path))

    weights = folder / WEIGHTS_NAME
    header = pickled = None
    if weights.is_file():
        header = read_header(weights)
        shapes = {k: v.shape for k, v in header.tensors.items()}
        dtypes = {k: v.dtype for k, v in header.tensors.items()}
    elif (folder / PICKLE_NAME).is_file():
        weights = folder / PICKLE_NAME
        if not allow_pickle:
            raise InputError(
                f"{weights}: the adapter exists only as a pickle; pickles can execute code, so they are refused. "
                "Convert it to safetensors (PEFT: save_pretrained(..., safe_serialization=True)) or pass "
                "--allow-pickle to load it with torch.load(weights_only=True)"
            )
        pickled = _load_pickle(weights)
        from . import safetensors_file

        shapes = {k: tuple(v.shape) for k, v in pickled.items()}
        dtypes = {k: safetensors_file.TORCH_TO_ST.get(v.dtype, str(v.dtype)) for k, v in pickled.items()}
    else:
        raise InputError(f"{folder}: no {WEIGHTS_NAME} next to {CONFIG_NAME}")

    adapter = Adapter(folder, weights, config, shapes, dtypes, {}, {}, {}, header, pickled)
    _group_keys(adapter)
    return adapter


def _load_pickle(path: Path) -> dict[str, torch.Tensor]:
    import torch

    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many kinds here; all mean "not a safe tensor pickle"
        raise InputError(f"{path}: cannot be loaded safely with torch.load(weights_only=True): {e}") from e
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        raise InputError(f"{path}: expected a dict of tensors")
    return state


def strip_peft_prefix(key: str) -> str:
    return key.removeprefix(PEFT_PREFIX)


def _group_keys(adapter: Adapter) -> None:
    """Sort adapter keys into LoRA modules, full-tensor replacements and trainable tokens."""
    loose: list[tuple[str, str]] = []
    for key in adapter.shapes:
        path = strip_peft_prefix(key)
        for suffix, role in _LORA_SUFFIXES.items():
            if path.endswith(suffix):
                _add_role(adapter, path[: -len(suffix)], role, key)
                break
        else:
            loose.append((path, key))
    wrapped = {m.name for m in adapter.modules.values()} | set(adapter.token_deltas)
    # modules_to_save: `M.modules_to_save.<p>` is the trained copy and wins over a plain `M.<p>` saved
    # beside it; `M.original_module.<p>` is the untrained original and is not merged.
    trained_copies: set[str] = set()
    for path, key in loose:
        parts = path.split(".")
        if "original_module" in parts:
            continue
        if "modules_to_save" in parts:
            parts.remove("modules_to_save")
            target = _unwrap(".".join(parts), wrapped)
            adapter.replacements[target] = key
            trained_copies.add(target)
            continue
        target = _unwrap(path, wrapped)
        if target not in trained_copies:
            adapter.replacements[target] = key
    for module in adapter.modules.values():
        _check_module(adapter, module)


def _unwrap(path: str, wrapped: set[str]) -> str:
    """Remove PEFT's `.base_layer` wrapper segments that follow a wrapped module (as PEFT does structurally)."""
    parts = path.split(".")
    out: list[str] = []
    for part in parts:
        if part == "base_layer" and ".".join(out) in wrapped:
            continue
        out.append(part)
    return ".".join(out)


def _module_name_and_depth(path: str) -> tuple[str, int]:
    depth = 0
    while path.endswith(".base_layer"):
        path = path[: -len(".base_layer")]
        depth += 1
    return path, depth


def _add_role(adapter: Adapter, path: str, role: str, key: str) -> None:
    if role == "tokens":
        adapter.token_deltas[path] = key
        return
    name, depth = _module_name_and_depth(path)
    mha_parent = None
    if ".base_layer." in name:  # MultiheadAttention out_proj: M.base_layer.out_proj
        mha_parent = name.split(".base_layer.", 1)[0]
        name = name.replace(".base_layer.", ".")
    module = adapter.modules.setdefault((name, depth), LoraModule(name=name, depth=depth, mha_parent=mha_parent))
    if role in ("A", "embedding_A"):
        module.a_key = key
    elif role in ("B", "embedding_B"):
        module.b_key = key
    elif role == "bias":
        module.bias_key = key
    elif role == "magnitude":
        module.magnitude_key = key
    if role.startswith("embedding"):
        module.embedding = True


def _check_module(adapter: Adapter, module: LoraModule) -> None:
    where = adapter.weights_path
    if module.a_key is None or module.b_key is None:
        have = module.a_key or module.b_key or module.magnitude_key or module.bias_key
        raise InputError(f"{where}: module {module.name!r} has {have!r} but not both LoRA A and B tensors")
    a, b = adapter.shapes[module.a_key], adapter.shapes[module.b_key]
    if len(a) < 2 or len(b) < 2 or len(a) != len(b):
        raise InputError(
            f"{where}: module {module.name!r}: impossible LoRA shapes A{list(a)} and B{list(b)}"
        )
    if module.bias_key is not None and adapter.shapes[module.bias_key] != (b[0],):
        raise InputError(
            f"{where}: module {module.name!r}: lora_B.bias has shape {list(adapter.shapes[module.bias_key])}, "
            f"expected [{b[0]}]"
        )
    if module.magnitude_key is not None and not adapter.config.use_dora:
        raise AdapterConfigError(
            f"{where}: module {module.name!r} has a DoRA magnitude vector but the config says use_dora=false"
        )
    if adapter.config.use_dora and module.magnitude_key is None and module.depth == 0:
        raise InputError(f"{where}: use_dora is true but module {module.name!r} has no lora_magnitude_vector")


def check_finite(adapter: Adapter) -> None:
    """Refuse adapter weights holding NaN or Inf (a diverged training run); reads each tensor once."""
    from . import kernel

    bad = []
    for key, dtype in adapter.dtypes.items():
        if dtype not in FLOAT_DTYPES:
            continue
        raw = adapter.raw(key)
        count = kernel.count_nonfinite(raw, dtype) if raw is not None else None
        if count is None:  # no compiled kernel, or a pickled adapter
            import torch

            t = adapter.tensor(key)
            count = int(t.numel() - torch.isfinite(t).sum())
        if count:
            bad.append(f"{key} ({count} values)")
    if bad:
        raise InputError(
            f"{adapter.weights_path}: NaN or Inf in {len(bad)} adapter tensor(s): {', '.join(bad[:3])}"
            f"{', ...' if len(bad) > 3 else ''}; the adapter is broken (diverged training?). "
            "Pass --allow-nonfinite to merge it anyway"
        )
