"""`adapter_config.json`, read once, validated, variants refused.

The fields that matter for merging are checked and typed (docs/peft-rules.md, "Config");
what cannot be merged faithfully (non-LoRA methods, layer replication, unconverted
PiSSA/OLoRA/CorDA/LoftQ/LoRA-GA, aLoRA, ...) is refused with the reason.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import AdapterConfigError, UnsupportedAdapterError
from .scaling import Convention, ModuleScale, backtracking_risk, module_scale
from .tuners import ADALORA, LOHA, LOKR, LORA, TUNERS, Tuner

CONFIG_NAME = "adapter_config.json"

# Initialisations that move part of each target weight into the adapter: the trained adapter is relative to a
# residual base (docs/peft-rules.md, "Initialisation variants"). LoftQ replaces the base with its own quantization.
MUTATING_INITS = ("pissa", "olora", "corda", "lora_ga")
_LOFTQ = "loftq"
_VARIANTS = {
    "alora_invocation_tokens": "aLoRA",
    "use_qalora": "QALoRA",
    "kasa_config": "KaSA",
    "use_bdlora": "BD-LoRA",
    "arrow_config": "Arrow",
}


@dataclass
class AdapterConfig:
    """The fields of a PEFT LoraConfig that matter for merging, validated; `json_dict` is the file as read."""

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
    json_dict: dict[str, Any] = field(repr=False)
    method: str = LORA  # the PEFT tuner (`peft_type`): LoRA, or one of adapter/tuners.py's

    @property
    def is_lora(self) -> bool:
        return self.method == LORA

    @property
    def init_variant(self) -> str | None:
        """ "pissa", "olora", "corda", "lora_ga" or "loftq" when the adapter is relative to a modified base, else
        None."""
        init = self.json_dict.get("init_lora_weights", True)
        if not isinstance(init, str):
            return None
        lowered = init.lower()
        return next((v for v in (*MUTATING_INITS, _LOFTQ) if lowered.startswith(v)), None)

    @property
    def delta_cast_first(self) -> bool:
        """PEFT merges the Linear delta cast to the weight's dtype first (MiCA, `init_lora_weights="mica"`)."""
        return self.json_dict.get("init_lora_weights") == "mica"

    @property
    def convention(self) -> Convention:
        return "rslora" if self.use_rslora else "classic"

    def scale_for(self, module_name: str) -> ModuleScale:
        """PEFT's rank, alpha and scale for a module (the one scale implementation)."""
        if not self.is_lora:
            return tuner_scale(self, module_name)
        return module_scale(
            module_name,
            r=self.r,
            lora_alpha=self.lora_alpha,
            use_rslora=self.use_rslora,
            rank_pattern=self.rank_pattern,
            alpha_pattern=self.alpha_pattern,
        )

    def targets_module(self, module_name: str) -> bool:
        """Whether `target_modules` names this module (PEFT's check: a regular expression matched against the whole
        name, or a list of names the module's name equals or ends with); such a module is a LoRA layer, never a
        `target_parameters` wrapper (PEFT refuses both on one module)."""
        targets = self.json_dict.get("target_modules")
        if isinstance(targets, str):
            try:
                return re.fullmatch(targets, module_name) is not None
            except re.error:
                return False
        if isinstance(targets, list):
            return any(isinstance(t, str) and (module_name == t or module_name.endswith("." + t)) for t in targets)
        return False

    def normalized(self) -> dict[str, Any]:
        """The config as a dict with the scale fields always present (PEFT's defaults filled in)."""
        fields = dict(self.json_dict)
        fields.update(
            r=self.r,
            lora_alpha=self.lora_alpha,
            use_rslora=self.use_rslora,
            rank_pattern=dict(self.rank_pattern),
            alpha_pattern=dict(self.alpha_pattern),
        )
        return fields


def tuner_scale(config: AdapterConfig, module_name: str) -> ModuleScale:
    """A non-LoRA module's rank, alpha and scale as PEFT's tuner sets them.

    LoHa and LoKr: `alpha / r`, with rank_pattern and alpha_pattern matched as LoRA's. AdaLoRA: `lora_alpha` (its
    rank when `lora_alpha <= 0`) divided by `ranknum + 1e-5`, ranknum being `init_r` (the rank before pruning,
    kept when `rank_pattern` resizes a module); the compute reads `alpha` and `r` of this scale to divide as PEFT
    does. VeRA: no scale (its vectors hold it), 1."""
    if config.method in (LOHA.peft_type, LOKR.peft_type):
        return module_scale(
            module_name,
            r=config.r,
            lora_alpha=config.lora_alpha,
            use_rslora=False,
            rank_pattern=config.rank_pattern,
            alpha_pattern=config.alpha_pattern,
        )
    if config.method == ADALORA.peft_type:
        alpha = config.lora_alpha if config.lora_alpha > 0 else float(config.r)
        return ModuleScale(config.r, config.lora_alpha, alpha / (config.r + 1e-5), False, None, None)
    return ModuleScale(config.r, 1.0, 1.0, False, None, None)


def read_config_file(folder: Path) -> dict[str, Any]:
    """The JSON object in FOLDER/adapter_config.json (not yet validated)."""
    path = folder / CONFIG_NAME
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise AdapterConfigError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(data, dict):
        raise AdapterConfigError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def _is_number(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _is_positive_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x > 0


def _is_index_list(v: object) -> bool:
    return isinstance(v, list) and all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in v)


def _is_string_list(v: object) -> bool:
    return isinstance(v, list) and all(isinstance(x, str) for x in v)


def _is_bool(v: object) -> bool:
    return isinstance(v, bool)


Getter = Callable[[str, Any, Callable[[Any], bool], str], Any]


def _getter(raw: dict[str, Any], where: str) -> Getter:
    """`get(name, default, check, expected)`: a config field (its default when absent or null), checked."""

    def get(name: str, default: Any, check: Callable[[Any], bool], expected: str) -> Any:
        value = raw.get(name, default)
        if value is None:
            value = default
        if not check(value):
            raise AdapterConfigError(f"{where}: '{name}' must be {expected}, got {value!r}")
        return value

    return get


def _patterns(get: Getter, where: str) -> tuple[dict[str, int], dict[str, float]]:
    """rank_pattern and alpha_pattern, checked: positive ranks, finite alphas, keys that are safe regular
    expressions."""
    rank_pattern = get(
        "rank_pattern",
        {},
        lambda v: isinstance(v, dict) and all(_is_positive_int(x) for x in v.values()),
        "an object mapping module patterns to positive integers",
    )
    alpha_pattern = get(
        "alpha_pattern",
        {},
        lambda v: isinstance(v, dict) and all(_is_number(x) for x in v.values()),
        "an object mapping module patterns to numbers",
    )
    _check_pattern_syntax(where, rank_pattern, alpha_pattern)
    return rank_pattern, alpha_pattern


def parse_config(raw: object, where: str = CONFIG_NAME) -> AdapterConfig:
    """Validate a loaded adapter_config.json dict; refuse what cannot be merged."""
    if not isinstance(raw, dict):
        raise AdapterConfigError(f"{where}: expected a JSON object, got {type(raw).__name__}")
    _check_peft_type(raw, where)
    if isinstance(raw["peft_type"], str) and raw["peft_type"] in TUNERS:
        return _parse_tuner_config(raw, where, TUNERS[raw["peft_type"]])

    get = _getter(raw, where)
    r = get("r", 8, _is_positive_int, "a positive integer")
    lora_alpha = get("lora_alpha", 8, _is_number, "a number")
    use_rslora = get("use_rslora", False, _is_bool, "true or false")
    rank_pattern, alpha_pattern = _patterns(get, where)
    flags = {name: get(name, False, _is_bool, "true or false") for name in ("fan_in_fan_out", "use_dora", "lora_bias")}
    bias = get("bias", "none", lambda v: v in ("none", "all", "lora_only"), "'none', 'all' or 'lora_only'")
    modules_to_save = get("modules_to_save", [], _is_string_list, "a list of module names")
    target_parameters = get("target_parameters", [], _is_string_list, "a list of parameter names")
    ensure_weight_tying = get("ensure_weight_tying", False, _is_bool, "true or false")
    tokens = _token_indices(raw, where)
    config = AdapterConfig(
        r=r,
        lora_alpha=lora_alpha,
        use_rslora=use_rslora,
        rank_pattern=dict(rank_pattern),
        alpha_pattern=dict(alpha_pattern),
        bias=bias,
        modules_to_save=list(modules_to_save),
        trainable_token_indices=tokens,
        target_parameters=list(target_parameters),
        ensure_weight_tying=ensure_weight_tying,
        base_model_name_or_path=_string_or_none(raw.get("base_model_name_or_path")),
        revision=_string_or_none(raw.get("revision")),
        json_dict=raw,
        **flags,
    )
    _refuse_variants(raw, where)
    return config


def _check_peft_type(raw: dict[str, Any], where: str) -> None:
    peft_type = raw.get("peft_type")
    if peft_type is None:
        raise AdapterConfigError(f"{where}: missing 'peft_type'; is this a PEFT adapter folder?")
    if peft_type != LORA and not (isinstance(peft_type, str) and peft_type in TUNERS):
        methods = ", ".join(["LORA", *TUNERS])
        raise UnsupportedAdapterError(
            f"{where}: peft_type is {peft_type!r}; rslora-tools merges {methods} adapters "
            "(other PEFT methods use other formulas: merge those with PEFT itself)"
        )


def _parse_tuner_config(raw: dict[str, Any], where: str, tuner: Tuner) -> AdapterConfig:
    """The config of a non-LoRA tuner: its rank and alpha fields as `r` and `lora_alpha`, its patterns (LoHa,
    LoKr), the fields shared with LoRA; what none of these tuners merges (DoRA, layer replication) refused."""

    get = _getter(raw, where)
    r = get(tuner.rank_field, 8, _is_positive_int, "a positive integer")
    alpha = get(tuner.alpha_field, 8, _is_number, "a number") if tuner.alpha_field else 1.0
    # LyCORIS tuners match patterns as LoRA does; AdaLoRA's rank_pattern holds its rank masks, VeRA has none
    rank_pattern, alpha_pattern = _patterns(get, where) if tuner.alpha_field == "alpha" else ({}, {})
    for name in ("use_dora", "layer_replication", "use_rslora"):
        if raw.get(name):
            raise UnsupportedAdapterError(
                f"{where}: '{name}' is set on a {tuner.name} adapter, which PEFT does not merge"
            )
    if tuner is ADALORA:
        _refuse_variants(raw, where)
    return AdapterConfig(
        r=r,
        lora_alpha=alpha,
        use_rslora=False,
        rank_pattern=dict(rank_pattern),
        alpha_pattern=dict(alpha_pattern),
        fan_in_fan_out=get("fan_in_fan_out", False, _is_bool, "true or false"),
        use_dora=False,
        lora_bias=False,
        bias=get("bias", "none", lambda v: v in ("none", "all", "lora_only"), "'none', 'all' or 'lora_only'"),
        modules_to_save=list(get("modules_to_save", [], _is_string_list, "a list of module names")),
        trainable_token_indices=None,
        target_parameters=[],
        ensure_weight_tying=False,
        base_model_name_or_path=_string_or_none(raw.get("base_model_name_or_path")),
        revision=_string_or_none(raw.get("revision")),
        json_dict=raw,
        method=tuner.peft_type,
    )


def _token_indices(raw: dict[str, Any], where: str) -> Any:
    """`trainable_token_indices`: None, a list of token ids, or an object of such lists."""
    tokens = raw.get("trainable_token_indices")
    if tokens is not None and not (
        _is_index_list(tokens) or (isinstance(tokens, dict) and all(_is_index_list(v) for v in tokens.values()))
    ):
        raise AdapterConfigError(
            f"{where}: 'trainable_token_indices' must be a list of token ids or an object of such lists, got "
            f"{tokens!r}"
        )
    return tokens


def _string_or_none(value: object) -> str | None:
    return value if isinstance(value, str) else None


def _check_pattern_syntax(where: str, rank_pattern: dict[str, Any], alpha_pattern: dict[str, Any]) -> None:
    for field_name, pattern in (("rank_pattern", rank_pattern), ("alpha_pattern", alpha_pattern)):
        for key in pattern:
            try:
                re.compile(rf"(.*\.)?({key})$")
            except re.error as e:
                raise AdapterConfigError(
                    f"{where}: {field_name} key {key!r} is not a valid regular expression ({e}); PEFT matches these "
                    "keys as regular expressions"
                ) from e
            risk = backtracking_risk(key)
            if risk:
                raise AdapterConfigError(
                    f"{where}: {field_name} key {key!r} has {risk}, which can make regular-expression matching take "
                    "exponential time (PEFT would hang on it too); use module names, or one level of repetition"
                )


def _refuse_variants(raw: dict[str, Any], where: str) -> None:
    if raw.get("layer_replication"):
        raise UnsupportedAdapterError(
            f"{where}: 'layer_replication' is set; replicated layers share base weights, so the adapter "
            "cannot be merged into a checkpoint (serve it unmerged with PEFT instead)"
        )
    init = raw.get("init_lora_weights", True)
    if not isinstance(init, (bool, str)):
        raise AdapterConfigError(f"{where}: init_lora_weights must be true, false or a string, not {init!r}")
    for key, name in _VARIANTS.items():
        if raw.get(key):
            raise UnsupportedAdapterError(
                f"{where}: '{key}' is set: {name} adapters are not plain LoRA and cannot be merged by rslora-tools"
            )
    if raw.get("megatron_config"):
        raise UnsupportedAdapterError(
            f"{where}: 'megatron_config' is set: tensor-parallel shards cannot be merged into a full checkpoint"
        )
