"""PiSSA, OLoRA, CorDA and LoRA-GA adapters, made relative to the original base (`--initial`).

These initialisations move part of each target weight into the adapter: training starts from
the residual base W_res = W - s * B0 @ A0 with the adapter (B0, A0). After training (B, A) the
model is W_res + s * B @ A = W + s * (B @ A - B0 @ A0) = W + s * B' @ A', one LoRA of rank 2r
with A' = [A; A0] and B' = [B, -B0] (docs/peft-rules.md, "Initialisation variants"). Given the
adapter saved right after initialisation (INIT), `relative_to_original` builds that adapter,
lazily, with a config whose alphas keep every module's scale bit for bit at its doubled rank
(or, when no alpha does, the scales folded into float32 B factors: the unit-scale form).
Without INIT such adapters are refused (`require_plain`), unless BASE is the residual base.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..errors import MismatchError, UnsupportedAdapterError
from .adapter import Adapter
from .config import parse_config
from .config_rewrite import rank_doubled_config
from .module_scales import module_entries

if TYPE_CHECKING:
    import torch

_NAMES = {"pissa": "PiSSA", "olora": "OLoRA", "corda": "CorDA", "lora_ga": "LoRA-GA", "loftq": "LoftQ"}
# adapter_config.json fields that must agree between INIT and the trained adapter (the rest may change in training)
_SHARED_FIELDS = (
    "r",
    "lora_alpha",
    "use_rslora",
    "rank_pattern",
    "alpha_pattern",
    "target_modules",
    "fan_in_fan_out",
    "use_dora",
    "lora_bias",
    "target_parameters",
    "layers_to_transform",
    "layers_pattern",
    "exclude_modules",
)


def variant_name(adapter: Adapter) -> str | None:
    """ "PiSSA", "OLoRA", ... for an adapter relative to a modified base, else None."""
    variant = adapter.config.init_variant
    return _NAMES[variant] if variant else None


def require_plain(adapter: Adapter, *, base_is_residual: bool = False) -> None:
    """Refuse an adapter that is relative to a modified base (PiSSA, ...), unless BASE is said to be that base."""
    variant = adapter.config.init_variant
    if variant is None or base_is_residual:
        return
    init = adapter.config.json_dict.get("init_lora_weights")
    where = adapter.path / "adapter_config.json"
    if variant == "loftq":
        raise UnsupportedAdapterError(
            f"{where}: init_lora_weights='loftq': LoftQ trains on its own quantization of the base (PEFT's "
            "loftq_utils, not bitsandbytes), which rslora-tools does not reproduce; save that base and merge with "
            "[[base_is_residual=True]]"
        )
    raise UnsupportedAdapterError(
        f"{where}: init_lora_weights={init!r}: this {_NAMES[variant]} adapter is relative to a residual base "
        "(W - s * B0 @ A0), not to BASE; pass [[initial=INIT]] (the adapter saved right after initialisation) to use "
        "it with the original base, or [[base_is_residual=True]] if BASE is that residual base"
    )


def check_initial(trained: Adapter, initial: Adapter) -> None:
    """INIT must be the trained adapter's own start: the same modules, shapes and scale fields."""
    variant = trained.config.init_variant
    if variant is None or variant == "loftq":
        init = trained.config.json_dict.get("init_lora_weights", True)
        what = "LoftQ changes the base itself" if variant == "loftq" else "it is plain LoRA"
        raise UnsupportedAdapterError(
            f"{trained.path}: [[initial]] applies to PiSSA, OLoRA, CorDA and LoRA-GA adapters; this one has "
            f"init_lora_weights={init!r} ({what})"
        )
    if initial.config.init_variant not in (None, variant):
        raise MismatchError(
            f"{initial.path}: INIT was initialised with {_NAMES[str(initial.config.init_variant)]}, "
            f"the trained adapter with {_NAMES[variant]}"
        )
    mine, theirs = trained.config.normalized(), initial.config.normalized()
    for key in _SHARED_FIELDS:
        if _comparable(mine.get(key)) != _comparable(theirs.get(key)):
            raise MismatchError(
                f"{initial.path}: INIT's {key} is {theirs.get(key)!r}, the trained adapter's "
                f"{mine.get(key)!r}; INIT must be this adapter right after initialisation"
            )
    modules = {m.name: m for m in trained.lora_modules}
    others = {m.name: m for m in initial.lora_modules}
    if set(modules) != set(others):
        missing = sorted(set(modules) ^ set(others))
        raise MismatchError(
            f"{initial.path}: INIT and the trained adapter wrap different modules, e.g. {missing[0]!r}"
        )
    for name, m in modules.items():
        o = others[name]
        if (trained.shapes[m.a_key], trained.shapes[m.b_key]) != (initial.shapes[o.a_key], initial.shapes[o.b_key]):
            raise MismatchError(
                f"{initial.path}: module {name!r} has other LoRA shapes in INIT than in the trained adapter"
            )
    if trained.config.target_parameters:
        raise UnsupportedAdapterError(
            f"{trained.path}: [[initial]] with target_parameters (MoE experts) is not supported"
        )


def _comparable(value: Any) -> Any:
    """Lists compared as sets: PEFT saves target_modules from a set, in an order that changes from run to run."""
    return sorted(map(str, value)) if isinstance(value, list) else value


@dataclass
class RelativeAdapter(Adapter):
    """The trained adapter as one LoRA of rank 2r relative to the original base: A' = [A; A0], B' = [B, -B0] (fp32),
    read lazily; every other tensor (modules_to_save, biases, tokens) is the trained adapter's."""

    trained: Adapter | None = None
    initial: Adapter | None = None
    form: str = ""  # which form was built, for reports
    _parts: dict[str, tuple[str, str, int, float]] = field(
        default_factory=dict, repr=False
    )  # key -> (own, init, dim, factor)

    @property
    def on_disk(self) -> bool:
        return False

    @property
    def sources(self) -> list[Adapter]:
        assert self.trained is not None and self.initial is not None
        return [self.trained, self.initial]

    @property
    def relative_form(self) -> str | None:
        return self.form

    @property
    def trained_adapter(self) -> Adapter:
        return self.trained if self.trained is not None else self

    def tensor(self, key: str) -> torch.Tensor:
        assert self.trained is not None and self.initial is not None
        if key not in self._parts:
            return self.trained.tensor(key)
        import torch

        own, init, dim, factor = self._parts[key]
        first, second = self.trained.tensor(own).float(), self.initial.tensor(init).float()
        if dim == 1:
            second = -second
        combined = torch.cat([first, second], dim=dim)
        return combined * factor if factor != 1.0 else combined

    def tensor_bytes(self, key: str) -> bytearray:
        if key not in self._parts:
            assert self.trained is not None
            return self.trained.tensor_bytes(key)
        from ..formats.safetensors_file import tensor_bytes

        value = self.tensor(key).contiguous()  # alive while its bytes are copied
        return bytearray(tensor_bytes(value))


def relative_to_original(trained: Adapter, initial: Adapter) -> RelativeAdapter:
    """The trained PiSSA/OLoRA/CorDA/LoRA-GA adapter as a plain LoRA relative to the original base (see the module)."""
    check_initial(trained, initial)
    entries = module_entries(trained)
    factors: dict[str, float] = {}
    try:
        config = rank_doubled_config(trained, entries)
        form = "rank 2r, alphas that keep every module's scale exactly"
    except UnsupportedAdapterError:
        config = rank_doubled_config(trained, entries, unit=True)
        factors = {e.module.b_key: e.scale.scale for e in entries}
        form = "rank 2r, unit-scale form (no alpha keeps some module's scale exactly at rank 2r: scales folded into B)"
    parsed = parse_config(_without_variant(config), str(trained.path / "adapter_config.json"))
    shapes, dtypes = dict(trained.shapes), dict(trained.dtypes)
    parts: dict[str, tuple[str, str, int, float]] = {}
    init_modules = {m.name: m for m in initial.lora_modules}
    for m in trained.lora_modules:
        o = init_modules[m.name]
        a, b = trained.shapes[m.a_key], trained.shapes[m.b_key]
        shapes[m.a_key] = (2 * a[0], *a[1:])
        shapes[m.b_key] = (b[0], 2 * b[1], *b[2:])
        dtypes[m.a_key] = dtypes[m.b_key] = "F32"
        parts[m.a_key] = (m.a_key, o.a_key, 0, 1.0)
        parts[m.b_key] = (m.b_key, o.b_key, 1, factors.get(m.b_key, 1.0))
    return RelativeAdapter(
        trained.path,
        trained.weights_path,
        parsed,
        shapes,
        dtypes,
        dict(trained.modules),
        dict(trained.replacements),
        dict(trained.token_deltas),
        _header=trained._header,
        _pickled=trained._pickled,
        trained=trained,
        initial=initial,
        form=form,
        _parts=parts,
    )


def _without_variant(config: dict[str, Any]) -> dict[str, Any]:
    return dict(config, init_lora_weights=True)
