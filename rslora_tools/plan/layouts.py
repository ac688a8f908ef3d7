"""Names and expert layouts across transformers versions: how an adapter made for one maps onto a checkpoint in
another.

transformers 5 loads a checkpoint under other names than it stores (its conversion_mapping.py): a multimodal model's
language model is `model.language_model.*` in memory and `model.*` (Qwen2-VL) or `language_model.model.*` (LLaVA
family) on disk; Mixtral's `block_sparse_moe.experts.N.w1/w3/w2` on disk are `mlp.experts.gate_up_proj` (E, 2I, H:
w1 rows, then w3 rows) and `down_proj` (E, H, I) in memory; GraniteMoE's fused `input_linear` is
`experts.gate_up_proj`. `save_pretrained` writes the stored layout back, and PEFT saves adapters under the in-memory
names, so an adapter and the checkpoint it was trained on can name the same weight differently.

The rules are transformers' own, for every model class it ships: layout_rules.json, generated from the installed
transformers by scripts/generate_layouts.py (its version is recorded there and tests/plan/test_layout_rules.py fails
when the installed rules differ). `Layouts.of(config)` picks the rules of the checkpoint's architecture and replays
them as transformers does when it loads (every renaming in order, then at most one converter): `loaded` gives each
stored name its in-memory name and, for a converter that stacks experts, which expert and which part of the fused
parameter the stored tensor is. gpt-oss stores its experts fused, gate and up interleaved, (E, in, out): no
conversion rule says so; `HAND_EXPERTS` does (read from transformers' GptOssExperts, checked by a test).
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

RULES_FILE = Path(__file__).with_name("layout_rules.json")
FUSED = (
    "gate_up_proj",
    "up_proj",
    "down_proj",
)  # the fused expert parameters' names, in the order models register them
_PAIR = re.compile(r"layers\.(\d+)\.(mixer|attn_alpha|mlp_alpha)(?=\.|$)")  # transformers' LayerPairCollapse


@dataclass(frozen=True)
class Transform:
    """One of transformers' weight transforms (WeightRenaming, PrefixChange, WeightConverter, ...), as it renames a key
    when a checkpoint is loaded (core_model_loading.WeightTransform.rename_source_key)."""

    kind: str
    pattern: re.Pattern[str]
    sources: tuple[str, ...]
    targets: tuple[str, ...]
    scope: str | None = None
    base_prefix: str | None = None
    ops: tuple[tuple[str, tuple[int, ...]], ...] = ()  # (operation, its integer arguments: dim, or dim0 and dim1)
    offset: int = 0
    op_args: tuple[tuple[tuple[str, Any], ...], ...] = ()  # every operation's arguments by name

    @classmethod
    def of(cls, entry: dict[str, Any]) -> Transform:
        ops = tuple(
            (op["op"], tuple(v for k, v in sorted(op.items()) if isinstance(v, int) and not isinstance(v, bool)))
            for op in entry.get("ops", ())
        )
        args = tuple(
            tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in op.items() if k != "op"))
            for op in entry.get("ops", ())
        )
        return cls(
            entry["kind"],
            re.compile(entry["pattern"]),
            tuple(entry["sources"]),
            tuple(entry["targets"]),
            entry.get("scope"),
            entry.get("base_prefix"),
            ops,
            entry.get("offset", 0),
            args,
        )

    @property
    def converter(self) -> bool:
        return self.kind == "WeightConverter"

    @property
    def stacks_experts(self) -> bool:
        """Per-expert tensors stacked into one fused parameter (and, with several sources, concatenated along the
        output features): the converters rslora-tools merges across."""
        return self.ops in ((("MergeModulelist", (0,)),), (("MergeModulelist", (0,)), ("Concatenate", (1,))))

    def _scoped(self, key: str) -> tuple[str, str, re.Match[str]] | None:
        prefix = ""
        if self.scope is not None:
            scope = f"{self.scope}." if self.scope else ""
            base = f"{self.base_prefix}." if self.base_prefix else ""
            if key.startswith(base + scope):
                prefix = base + scope
            elif key.startswith(scope):
                prefix = scope
            else:
                return None
            key = key.removeprefix(prefix)
        m = self.pattern.search(key)
        return None if m is None else (prefix, key, m)

    @property
    def splits_rows(self) -> bool:
        """One stored tensor cut along its rows into several in-memory ones: equal chunks (`Chunk`) or the model's
        parameter sizes (`Split`)."""
        cuts = ((("Chunk", (0,)),), (("Split", (0,)),), (("Chunk", (0,)), ("PermuteForRope", ())))
        return self.ops in cuts and len(self.sources) == 1 and len(self.targets) > 1

    def piece_reorder(self, target: int) -> tuple[str, Any, bool] | None:
        """How a cut-out piece is reordered next (Chunk, then PermuteForRope of the pieces it names: q and k)."""
        if len(self.ops) < 2 or self.ops[1][0] != "PermuteForRope":
            return None
        args = dict(self.op_args[1])
        names = args.get("permute_layer_names")
        if names is not None and not any(n in self.targets[target] for n in names):
            return None
        return ("rope", args.get("subconfig_key"), bool(args.get("inverse", False)))

    @property
    def concatenates_rows(self) -> bool:
        """Several stored tensors concatenated along their rows into one in-memory weight (`Concatenate(dim=0)`)."""
        return self.ops == (("Concatenate", (0,)),) and len(self.sources) > 1 and len(self.targets) == 1

    @property
    def permutation(self) -> tuple[str, Any, bool] | None:
        """A stored tensor whose rows (or a 3-D tensor's second dimension) transformers reorders on loading:
        ("interleave", dim, inverse) for `Interleave`, ("rope", subconfig key, inverse) for `PermuteForRope`."""
        if len(self.ops) != 1 or len(self.sources) != 1 or len(self.targets) != 1:
            return None
        name, args = self.ops[0][0], dict(self.op_args[0])
        if name == "Interleave":
            return ("interleave", args.get("dim", 0), bool(args.get("inverse", False)))
        if name == "PermuteForRope" and args.get("permute_layer_names") is None:
            return ("rope", args.get("subconfig_key"), bool(args.get("inverse", False)))
        return None

    @property
    def transposes(self) -> bool:
        """One stored 2-D tensor held transposed in memory (a weight stored (in, out))."""
        return self.ops == (("Transpose", (0, 1)),) and len(self.sources) == len(self.targets) == 1

    def rename(self, key: str, active: set[int], target: int = 0) -> tuple[str, int | None, re.Match[str] | None]:
        """(the renamed key, the index of the source pattern that matched, the match); `active`: the GroupWeightRename
        transforms whose first pattern has been seen (their state across the keys of one load); `target`: which of
        a one-to-many converter's targets to name (transformers names the first, its operation makes the others)."""
        if self.kind == "LayerPairCollapse":
            return self._collapse(key)
        found = self._scoped(key)
        if found is None:
            return key, None, None
        prefix, rest, m = found
        group = next(name for name, value in m.groupdict().items() if value is not None)
        index, start = int(group[1:]), self.pattern.groupindex[group]
        if self.kind == "GroupWeightRename":
            if index == 0:
                active.add(id(self))
            elif id(self) not in active:
                return key, None, None
            replacement = re.sub(r"\\(\d+)", lambda g: m.group(start + int(g.group(1))), self.targets[index])
        elif self.kind == "Inkling2IndexOffsetWeightRename":
            replacement = self.targets[0].replace(r"\1", str(int(m.group(start + 1)) + self.offset))
        else:
            replacement = self.targets[target]
            if r"\1" in replacement:
                replacement = replacement.replace(r"\1", m.group(start + 1))
        return prefix + rest.replace(m.group(0), replacement, 1), index, m

    def _collapse(self, key: str) -> tuple[str, int | None, re.Match[str] | None]:
        m = _PAIR.search(key)
        if m is None:
            return key, None, None
        index, name = int(m[1]), m[2]
        name = {"attn_alpha": "lambda_1", "mlp_alpha": "lambda_2"}.get(name, ("self_attn", "mlp")[index % 2])
        return key[: m.start()] + f"layers.{index // 2}.{name}" + key[m.end() :], 0, m

    def wildcard(self, index: int, m: re.Match[str]) -> str | None:
        """What the `*` of source pattern `index` matched (a converter's expert number)."""
        source = self.sources[index]
        if "*." not in source:
            return None
        found = re.search(source.replace("*.", r"(?P<star>.*)\.", 1), m.group(0))
        return found["star"] if found else None


@dataclass(frozen=True)
class Loaded:
    """A stored tensor name as transformers loads it: its in-memory name; for a converter, which one, which of its
    source patterns matched and what the `*` stood for (the expert)."""

    memory: str
    converter: Transform | None = None
    source: int = 0
    expert: int | None = None
    pieces: tuple[str, ...] = ()  # a one-to-many converter: every in-memory name it makes, in order

    @property
    def expert_part(self) -> bool:
        """A per-expert tensor stacked into a fused parameter (the converters merges go across)."""
        return self.converter is not None and self.converter.stacks_experts and self.expert is not None


@dataclass(frozen=True)
class HandExperts:
    """An expert layout that no conversion rule describes: the family stores its experts fused."""

    per_expert: tuple[tuple[str, tuple[str, ...]], ...]  # fused parameter -> its per-expert modules, in order
    interleaved: bool = False  # gate_up alternates gate and up output features instead of gate rows, then up rows
    in_out: bool = False  # (E, in, out) instead of (E, out, in)


# gpt-oss (transformers 5.25 GptOssExperts: gate_up_proj (E, H, 2I), gate = [..., ::2], up = [..., 1::2])
HAND_EXPERTS = {
    "gpt_oss": HandExperts(
        (("gate_up_proj", ("gate_proj", "up_proj")), ("down_proj", ("down_proj",))), interleaved=True, in_out=True
    )
}


@functools.lru_cache(maxsize=1)
def rules_table() -> dict[str, Any]:
    """layout_rules.json, read once."""
    table: dict[str, Any] = json.loads(RULES_FILE.read_text())
    return table


@functools.lru_cache(maxsize=None)
def _rule_set(index: int) -> tuple[Transform, ...]:
    table = rules_table()
    return tuple(Transform.of(table["transforms"][i]) for i in table["rule_sets"][index])


@dataclass(frozen=True)
class Layouts:
    """The conversion rules of one checkpoint's model class (from its config.json) and its hand expert layout."""

    transforms: tuple[Transform, ...] = ()
    model_class: str | None = None  # the class whose rules these are
    hand: HandExperts | None = None
    fp32: tuple[str, ...] = ()  # modules transformers keeps in float32 when it loads the model in float16
    fp32_strict: tuple[str, ...] = ()  # ... in float16 or bfloat16
    fp32_params: tuple[str, ...] = ()  # parameters the model makes in float32 whatever it loads in (`*`: a number)
    order: tuple[tuple[str, tuple[str, ...]], ...] = ()  # modules with several own parameters: their order
    tied: tuple[tuple[str, str], ...] = ()  # weights transformers ties to another on loading (not stored): -> source

    @classmethod
    def of(cls, config: dict[str, Any] | None) -> Layouts:
        """The rules of the checkpoint's class (its config's `architectures`) for its model type, else those of the
        model type's usual class."""
        config = config or {}
        table = rules_table()
        model_type = config.get("model_type") if isinstance(config.get("model_type"), str) else None
        hand = HAND_EXPERTS.get(model_type) if model_type else None
        found = None
        for name in config.get("architectures") or []:
            by_type = table["architectures"].get(name) if isinstance(name, str) else None
            if by_type:
                found = name, by_type.get(model_type) or next(iter(by_type.values()))
                break
        if found is None and model_type in table["model_types"]:
            name, _ = table["model_types"][model_type]
            found = name, table["architectures"][name][model_type]
        if found is None:
            return cls((), None, hand)
        name, entry = found
        extra = table["extras"][entry["extra"]] if "extra" in entry else {}
        return cls(
            _rule_set(entry["rules"]),
            name,
            hand,
            tuple(extra.get("fp32", ())),
            tuple(extra.get("fp32_strict", ())),
            tuple(extra.get("fp32_params", ())),
            tuple((k, tuple(v)) for k, v in extra.get("order", {}).items()),
            tuple(extra.get("tied", {}).items()),
        )

    def keeps_fp32(self, memory_name: str, dtype: str) -> bool:
        """Whether transformers loads this tensor (in-memory name) in float32 when it loads the model in `dtype`
        (a safetensors dtype): `_keep_in_fp32_modules` for F16, `_keep_in_fp32_modules_strict` for F16 and BF16,
        matched as transformers matches them (a search, `*` for anything)."""
        if dtype not in ("F16", "BF16"):
            return False
        keep = (*self.fp32_strict, *self.fp32) if dtype == "F16" else self.fp32_strict
        return any(re.search(k.replace("*", ".*"), memory_name) for k in keep) or any(
            _numbered(p).fullmatch(memory_name) for p in self.fp32_params
        )

    @property
    def fp32_possible(self) -> bool:
        return bool(self.fp32 or self.fp32_strict or self.fp32_params)

    def tied_to(self, name: str) -> str | None:
        """The weight a tied weight (in-memory naming) is tied to by the model's default config, if it is one."""
        for tied, source in self.tied:
            if _numbered(tied).fullmatch(name):
                return source
        return None

    def parameter_order(self, module: str) -> tuple[str, ...] | None:
        """The order in which the module (in-memory naming) registers its own parameters, where transformers' model
        has several (PEFT nests target_parameters wrappers in that order); None when not known."""
        for pattern, params in self.order:
            if _numbered(pattern).fullmatch(module):
                return params
        return None

    @property
    def renames(self) -> tuple[Transform, ...]:
        return tuple(t for t in self.transforms if not t.converter)

    @property
    def converters(self) -> tuple[Transform, ...]:
        return tuple(t for t in self.transforms if t.converter)

    @property
    def has_experts(self) -> bool:
        """The family's experts are fused in memory (stacked on loading, or stored fused)."""
        return self.hand is not None or any(t.stacks_experts for t in self.converters)

    @property
    def family(self) -> str | None:
        return self.model_class if self.has_experts else None

    def loaded(self, name: str, active: set[int] | None = None) -> Loaded:
        """`name`, a stored tensor name, as transformers loads it (renamings in order, then at most one converter)."""
        active = set() if active is None else active
        for t in self.renames:
            name, _, _ = t.rename(name, active)
        for t in self.converters:
            renamed, index, m = t.rename(name, active)
            if index is not None and m is not None:
                star = t.wildcard(index, m)
                pieces = (
                    tuple(t.rename(name, set(), i)[0] for i in range(len(t.targets))) if len(t.targets) > 1 else ()
                )
                return Loaded(renamed, t, index, int(star) if star is not None and star.isdigit() else None, pieces)
        return Loaded(name)

    def load_all(self, names: Iterable[str]) -> dict[str, Loaded]:
        """The stored names of a checkpoint that transformers loads under another name or through a converter, as
        it loads them: one state for the whole load, in its order where a GroupWeightRename makes order matter.
        Names loaded as stored are left out (a header of 400k tensors stays a header's worth of memory)."""
        if not self.transforms:
            return {}
        active: set[int] = set()
        if any(t.kind == "GroupWeightRename" for t in self.transforms):
            names = sorted(names, key=dot_natural_key)
        found = {}
        for n in names:
            loaded = self.loaded(n, active)
            if loaded.converter is not None or loaded.memory != n:
                found[n] = loaded
        return found

    def in_memory(self, name: str) -> str:
        """A checkpoint name as transformers 5 names the tensor in memory."""
        return self.loaded(name).memory


@functools.lru_cache(maxsize=4096)
def _numbered(pattern: str) -> re.Pattern[str]:
    """A generated name pattern (`model.layers.*.mlp`: `*` a layer or expert number) as a regular expression that
    also takes a leading prefix (an adapter on the base model of a ForCausalLM class, or the reverse)."""
    return re.compile(r"(?:.*\.)?" + re.escape(pattern).replace(r"\*", r"\d+"))


def dot_natural_key(name: str) -> list[tuple[Any, ...]]:
    """transformers' sort of state-dict names (core_model_loading.dot_natural_key): numbers numerically."""
    parts: list[tuple[Any, ...]] = []
    for part in name.split("."):
        if part.isdigit():
            parts.append((0, int(part)))
            continue
        text = part.rstrip("0123456789")
        digits = part[len(text) :]
        parts.append((1, text, int(digits)) if digits else (1, text))
    return parts
