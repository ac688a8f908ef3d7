"""An adapter = its validated config + its tensors, grouped per module.

Reads `adapter_config.json` and the header of `adapter_model.safetensors`; tensors are read
one at a time when a command needs them. Knows PEFT's saved key grammar (docs/peft-rules.md,
"Saved keys"): each key is a LoRA factor of a module, a full tensor that replaces a base
tensor (modules_to_save, saved embeddings, trained biases), or trainable-token rows.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import AdapterConfigError, InputError, UnsupportedAdapterError
from ..formats.safetensors_file import SafetensorsHeader, read_bytes, read_tensor
from .config import CONFIG_NAME, AdapterConfig
from .tuners import ADALORA, LORA, TUNERS, Tuner, delta_size, saved_rank

if TYPE_CHECKING:
    import torch

WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_NAME = "adapter_model.bin"
PEFT_PREFIX = "base_model.model."

# saved key suffix -> role
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
class LoraModule:
    """The saved tensors of one LoRA-wrapped module (names are adapter keys)."""

    name: str  # module path relative to the wrapped model, PEFT's `.base_layer` wrapper segments removed
    depth: int = 0  # number of nested wrappers (target_parameters on one module)
    a_key: str = ""
    b_key: str = ""
    bias_key: str | None = None
    magnitude_key: str | None = None
    embedding: bool = False
    # MultiheadAttention's out_proj: PEFT wraps it inside the MHA layer with the MHA's rank and
    # alpha (patterns match the MHA's name, kept here), and merges its delta twice (see compute/torch_ops.py).
    mha_parent: str | None = None
    # the PEFT tuner that saved it (adapter/tuners.py): "LORA", or e.g. "LOHA", whose tensors are `factors`
    method: str = LORA
    factors: dict[str, str] = field(default_factory=dict)  # a non-LoRA tuner's factor role -> adapter key
    # PEFT loads the factors into parameters of the base weight's dtype before upcasting them (AdaLoRA's modules
    # resized by rank_pattern): in half precision they are rounded to it first (docs/peft-rules.md)
    factors_in_base_dtype: bool = False

    @property
    def keys(self) -> list[str]:
        """Every adapter key of this module."""
        return [k for k in (self.a_key, self.b_key, self.bias_key, self.magnitude_key, *self.factors.values()) if k]

    @property
    def is_lora(self) -> bool:
        """Saved by PEFT's LoRA (A and B factors), not by another tuner."""
        return self.method == LORA


@dataclass
class Adapter:
    """A PEFT LoRA adapter on disk: config, tensor index, modules; tensors read on demand."""

    path: Path
    weights_path: Path
    config: AdapterConfig
    shapes: dict[str, tuple[int, ...]]
    dtypes: dict[str, str]
    modules: dict[tuple[str, int], LoraModule] = field(default_factory=dict)
    replacements: dict[str, str] = field(default_factory=dict)  # base parameter path -> adapter key
    token_deltas: dict[str, str] = field(default_factory=dict)  # module path -> adapter key of trainable_tokens_delta
    training_only: list[str] = field(default_factory=list)  # keys a variant saves for training only (not merged)
    shared: dict[str, str] = field(default_factory=dict)  # adapter-wide tensors of a tuner (VeRA's): role -> key
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
    def source_format(self) -> str:
        """The format of the files read: "peft", or "mlx-lm" for an mlx-lm adapter read as PEFT's (adapter.mlx)."""
        return "peft"

    @property
    def on_disk(self) -> bool:
        """Whether config and tensors are exactly the files in `path` (a derived adapter, e.g. --initial's, is not)."""
        return True

    @property
    def single_file(self) -> bool:
        """Whether every key is a tensor of `weights_path` (copied by offset); a stacked adapter reads several."""
        return True

    @property
    def sources(self) -> list[Adapter]:
        """The adapters on disk this one reads (itself; a derived adapter's inputs)."""
        return [self]

    @property
    def parts(self) -> list[Adapter]:
        """The adapters merged one after another (itself; a stacked adapter's parts, adapter.adapter.stacked)."""
        return [self]

    @property
    def weights(self) -> list[float]:
        """Each part's weight, its delta multiplied (PEFT's set_scale); 1 for a single adapter."""
        return [1.0]

    @property
    def stacked(self) -> bool:
        """Merged as parts with weights (adapter.stacked.StackedAdapter: several adapters, or one with a weight)."""
        return False

    @property
    def relative_form(self) -> str | None:
        """For an adapter made relative to the original base (adapter.adapter.relative, `--initial`), which form was
        built."""
        return None

    @property
    def trained_adapter(self) -> Adapter:
        """The trained adapter this one stands for (itself; a relative adapter's trained one)."""
        return self

    @property
    def is_safetensors(self) -> bool:
        """Whether the weights are a safetensors file, whose tensors can be read and copied as bytes."""
        return self._header is not None

    def tensor_offset(self, key: str) -> int:
        """Where one tensor's bytes start in the safetensors file."""
        assert self._header is not None
        return self._header.data_start + self._header.tensors[key].begin

    def tensor_nbytes(self, key: str) -> int:
        assert self._header is not None
        return self._header.tensors[key].nbytes

    def tensor_bytes(self, key: str) -> bytearray:
        """One tensor's bytes as saved (safetensors adapters only)."""
        with open(self.weights_path, "rb") as f:
            return read_bytes(f, self.tensor_offset(key), self.tensor_nbytes(key))

    @property
    def lora_modules(self) -> list[LoraModule]:
        return list(self.modules.values())


def find_adapter_folder(path: str | os.PathLike[str]) -> Path:
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
    raise InputError(f"{path}: no {CONFIG_NAME} here or in a subfolder; is this a PEFT or mlx-lm adapter folder?")


# What VeLoRA and MonteCLoRA save beside plain LoRA factors for training only: VeLoRA's activation-compression
# projection, MonteCLoRA's sampler; PEFT's merge is B @ A for both (peft 0.21.2 tuners/lora/variants.py,
# VeloraLinearVariant / MontecloraLinearVariant.merge_unsafe), so these are not merged (docs/peft-rules.md).
TRAINING_ONLY_SUFFIXES = (".lora_velora_embed",)
TRAINING_ONLY_PARTS = (".lora_monteclora_sampler.",)


def strip_peft_prefix(key: str) -> str:
    return key.removeprefix(PEFT_PREFIX)


def group_keys(adapter: Adapter) -> None:
    """Sort adapter keys into LoRA modules, full-tensor replacements and trainable tokens."""
    loose: list[tuple[str, str]] = []
    tuner = TUNERS.get(adapter.config.method)
    for key in adapter.shapes:
        path = strip_peft_prefix(key)
        if path.endswith(TRAINING_ONLY_SUFFIXES) or any(part in path for part in TRAINING_ONLY_PARTS):
            adapter.training_only.append(key)
            continue
        if tuner is not None:
            if not _add_factor(adapter, tuner, path, key):
                loose.append((path, key))
            continue
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
        if not module.is_lora:
            module.factors.update(adapter.shared)  # VeRA's shared projections are factors of every module
            module.factors_in_base_dtype = module.name in resized_modules(adapter.config)


def _add_factor(adapter: Adapter, tuner: Tuner, path: str, key: str) -> bool:
    """Add a key of a non-LoRA tuner: one of its adapter-wide tensors, or a factor of a module (False: neither)."""
    if tuner.shared and key in tuner.shared:
        adapter.shared[tuner.shared[key]] = key
        return True
    suffix = next((s for s in tuner.factors if path.endswith(s)), None)
    if suffix is None:
        return False
    name = path[: -len(suffix)]
    module = adapter.modules.setdefault((name, 0), LoraModule(name=name, method=tuner.peft_type))
    module.factors[tuner.factors[suffix]] = key
    return True


def _unwrap(path: str, wrapped: set[str]) -> str:
    """Remove PEFT's `.base_layer` wrapper segments that follow a wrapped module (as PEFT does structurally)."""
    out: list[str] = []
    for part in path.split("."):
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
    if not module.is_lora:
        _check_tuner_module(adapter, module)
        return
    if not module.a_key or not module.b_key:
        have = module.a_key or module.b_key or module.magnitude_key or module.bias_key
        raise InputError(f"{where}: module {module.name!r} has {have!r} but not both LoRA A and B tensors")
    a, b = adapter.shapes[module.a_key], adapter.shapes[module.b_key]
    if len(a) < 2 or len(b) < 2 or len(a) != len(b):
        raise InputError(f"{where}: module {module.name!r}: impossible LoRA shapes A{list(a)} and B{list(b)}")
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


def resized_modules(config: AdapterConfig) -> set[str]:
    """The modules AdaLoRA's loading resizes: each key of its saved rank_pattern (a rank mask) names
    `<module>.lora_E` (peft 0.21.2 AdaLoraModel.resize_modules_by_rank_pattern, whose new parameters take the base
    layer's dtype)."""
    pattern = config.json_dict.get("rank_pattern") if config.method == ADALORA.peft_type else None
    return {key.rsplit(".", 1)[0] for key in pattern} if isinstance(pattern, dict) else set()


def _check_tuner_module(adapter: Adapter, module: LoraModule) -> None:
    """A non-LoRA module has exactly the factors PEFT's tuner creates, of consistent shapes."""
    tuner = TUNERS[module.method]
    where = f"{adapter.weights_path}: module {module.name!r}"
    if tuner.form_of(set(module.factors)) is None:
        have = ", ".join(sorted(module.factors))
        raise InputError(f"{where}: {tuner.name} factors {have} are not a set PEFT saves for one module")
    if tuner.shared and set(tuner.shared.values()) - set(adapter.shared):
        raise UnsupportedAdapterError(
            f"{adapter.weights_path}: the {tuner.name} adapter was saved without its shared projections "
            "vera_A and vera_B (save_projection=false); rslora-tools merges VeRA adapters that save them"
        )
    try:
        delta_size(module.method, module.factors, adapter.shapes)
        saved_rank(module.method, module.factors, adapter.shapes)
    except (IndexError, KeyError) as e:
        raise InputError(f"{where}: impossible {tuner.name} factor shapes ({e})") from e
