#!/usr/bin/env python3
"""Write rslora_tools/plan/layout_rules.json from the installed transformers' own conversion rules.

transformers 5 loads a checkpoint under other names than it stores (conversion_mapping.py: renames, prefix changes,
experts stacked into fused parameters), and PEFT saves adapters under the loaded names. rslora-tools maps an
adapter onto a checkpoint by the same rules, read from this table at run time (plan/layouts.py), so that no
transformers is needed to merge. For every model class of the auto mappings, the model is built on the meta device
from its default config and `get_model_conversion_mapping(model)` gives the transforms transformers applies when it
loads that class, in order, each with its scope (the sub-model it is limited to), and the modules it keeps in float32
when it loads the model in half precision (`fp32`: float16 only, `fp32_strict`: float16 and bfloat16). A class
shared by several model types has an entry for each (transformers looks rules up by class, then model type). A class
whose default config does not build gets the transforms of its class name or model type at the root and its
class's own float32 lists (marked `"built": false`).

    python scripts/generate_layouts.py            # rewrite the table
    python scripts/generate_layouts.py --check    # exit 1 when the table differs from what it would write

The table records the transformers version and a fingerprint of its raw rules (`rules_fingerprint`, which
tests/plan/test_layout_rules.py compares with the installed transformers on every run): a new transformers release
is one run of this script.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import sys
import time
import warnings
from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / "rslora_tools" / "plan" / "layout_rules.json"
# The auto mappings whose classes a LoRA adapter is trained on, first match gives a model type's default class.
MAIN_MAPPINGS = (
    "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES",
    "MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES",
    "MODEL_FOR_MULTIMODAL_LM_MAPPING_NAMES",
    "MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES",
    "MODEL_FOR_MASKED_LM_MAPPING_NAMES",
    "MODEL_MAPPING_NAMES",
)
SIMPLE = (int, float, str, bool, type(None))


def rules_fingerprint() -> str:
    """A digest of transformers' raw conversion rules: every mapping key, transform, pattern and operation."""
    from transformers import conversion_mapping

    raw = conversion_mapping._build_checkpoint_conversion_mapping()
    text = json.dumps(
        {
            "mapping": {
                key: [describe(t, scoped=False) for t in transforms] for key, transforms in sorted(raw.items())
            },
            "aliases": dict(sorted(conversion_mapping._MODEL_TO_CONVERSION_PATTERN.items())),
        },
        sort_keys=True,
    )
    return hashlib.sha256(text.encode()).hexdigest()


def describe(transform, *, scoped: bool = True) -> dict:
    """One transform as plan/layouts.py replays it: its class, compiled pattern, targets, scope and operations."""
    entry = {
        "kind": type(transform).__name__,
        "pattern": transform.compiled_sources.pattern,
        "sources": list(transform.source_patterns),
        "targets": list(transform.target_patterns),
    }
    if scoped:
        entry["scope"] = transform.scope_prefix
        entry["base_prefix"] = transform.base_model_prefix
    if hasattr(transform, "offset"):
        entry["offset"] = transform.offset
    ops = getattr(transform, "operations", None)
    if ops:
        entry["ops"] = [
            {
                "op": type(op).__name__,
                **{
                    k: v
                    for k, v in vars(op).items()
                    if isinstance(v, SIMPLE) or (isinstance(v, list) and all(isinstance(x, str) for x in v))
                },
            }
            for op in ops
        ]
    return entry


def model_classes() -> tuple[dict[str, set[str]], dict[str, str]]:
    """(model type -> its classes in every auto mapping, model type -> its default class)."""
    from transformers.models.auto import modeling_auto

    classes: dict[str, set[str]] = {}
    default: dict[str, str] = {}
    names = [n for n in dir(modeling_auto) if n.startswith("MODEL_") and n.endswith("_MAPPING_NAMES")]
    for name in [*MAIN_MAPPINGS, *sorted(set(names) - set(MAIN_MAPPINGS))]:
        for model_type, found in getattr(modeling_auto, name).items():
            for cls in found if isinstance(found, (list, tuple)) else [found]:
                classes.setdefault(model_type, set()).add(cls)
                if name in MAIN_MAPPINGS:
                    default.setdefault(model_type, cls)
    return classes, default


def class_transforms(model_type: str, class_name: str) -> tuple[list[dict], dict[str, list[str]] | None]:
    """The transforms transformers applies when it loads `class_name`, the tensors it holds in float32 and the order
    of parameters, from the model built from its default config, else from the tests' tiny config, else (`"built":
    false`) the root rules as transformers looks them up."""
    import transformers
    from transformers import AutoConfig
    from transformers.conversion_mapping import get_checkpoint_conversion_mapping

    for make_config in (lambda: AutoConfig.for_model(model_type), lambda: tiny_config(model_type, class_name)):
        try:
            return built_transforms(make_config(), class_name)
        except Exception:  # noqa: BLE001 - the next config, or the root rules below
            continue
    root = get_checkpoint_conversion_mapping(class_name) or get_checkpoint_conversion_mapping(model_type) or []
    legacy = get_checkpoint_conversion_mapping("legacy") or []
    cls = getattr(transformers, class_name)
    keep = {
        "fp32": sorted(getattr(cls, "_keep_in_fp32_modules", None) or ()),
        "fp32_strict": sorted(getattr(cls, "_keep_in_fp32_modules_strict", None) or ()),
    }
    return [describe(t) for t in [*root, *legacy]], {"built": False, **{k: v for k, v in keep.items() if v}}


def tiny_config(model_type: str, class_name: str):
    """The shrunk config the tests build tiny models from (tests/tiny_models.py), for a class whose default config
    does not build."""
    sys.path.insert(0, str(OUT.parents[2] / "tests"))
    from tiny_models import Row
    from tiny_models import tiny_config as shrunk

    return shrunk(Row(model_type, class_name, ""))


def built_transforms(config, class_name: str) -> tuple[list[dict], dict[str, list[str]]]:
    """The transforms and float32 lists of `class_name` built on the meta device from `config`."""
    import torch
    import transformers
    from transformers.conversion_mapping import get_model_conversion_mapping

    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # as from_pretrained(dtype=bfloat16) builds the model
    try:
        with torch.device("meta"):
            model = getattr(transformers, class_name)(config)
    finally:
        torch.set_default_dtype(default)
    keep = {
        "fp32": sorted(model._keep_in_fp32_modules or ()),  # kept in float32 when loaded in float16
        "fp32_strict": sorted(model._keep_in_fp32_modules_strict or ()),  # ... in float16 or bfloat16
        # parameters and buffers the model makes in float32 whatever it is loaded in (a checkpoint's values are
        # cast to them)
        "fp32_params": sorted(
            {numbered(n) for n, p in [*model.named_parameters(), *model.named_buffers()] if p.dtype == torch.float32}
        ),
        "order": parameter_order(model),
        # weights tied to another (not stored: transformers ties them on loading): tied name -> its source
        "tied": {numbered(k): numbered(v) for k, v in sorted(model.get_expanded_tied_weights_keys().items())},
    }
    return [describe(t) for t in get_model_conversion_mapping(model)], {k: v for k, v in keep.items() if v}


def numbered(name: str) -> str:
    """A module path with its layer and expert numbers as `*` (`model.layers.*.mlp`)."""
    return re.sub(r"(?<=\.)\d+(?=\.|$)|^\d+(?=\.)", "*", name)


def parameter_order(model) -> dict[str, list[str]]:
    """The modules that hold several parameters of their own other than a weight and its bias, with the order they
    register them (PEFT wraps a module's target_parameters in that order: the first is the innermost)."""
    order = {}
    for name, module in model.named_modules():
        own = [n for n, _ in module.named_parameters(recurse=False)]
        if len(own) > 1 and not set(own) <= {"weight", "bias"}:
            order.setdefault(numbered(name), own)
    return order


def build() -> dict:
    import transformers

    classes, default = model_classes()
    transforms_seen: dict[str, int] = {}  # each distinct transform once; a rule set lists their indices
    rule_sets: list[list[int]] = []
    extras_seen: dict[str, int] = {}  # each distinct set of float32 lists and parameter orders once
    index: dict[str, int] = {}
    architectures: dict[str, dict[str, dict]] = {}  # class -> model type -> its rule set and float32 modules
    started = time.time()
    for n, model_type in enumerate(sorted(classes)):
        for class_name in sorted(classes[model_type]):
            if not hasattr(transformers, class_name):
                continue
            transforms, extra = class_transforms(model_type, class_name)
            ids = [transforms_seen.setdefault(json.dumps(t, sort_keys=True), len(transforms_seen)) for t in transforms]
            key = json.dumps(ids)
            if key not in index:
                index[key] = len(rule_sets)
                rule_sets.append(ids)
            entry: dict = {"rules": index[key]}
            if extra:
                entry["extra"] = extras_seen.setdefault(json.dumps(extra, sort_keys=True), len(extras_seen))
            architectures.setdefault(class_name, {})[model_type] = entry
        if sys.stderr.isatty():
            print(f"\r{n + 1}/{len(classes)} model types, {time.time() - started:.0f} s", end="", file=sys.stderr)
    print(
        f"{len(classes)} model types, {len(architectures)} classes in {time.time() - started:.0f} s", file=sys.stderr
    )
    return {
        "generated_by": "scripts/generate_layouts.py",
        "transformers": transformers.__version__,
        "rules_fingerprint": rules_fingerprint(),
        "model_types": {
            t: [c, architectures[c][t]["rules"]] for t, c in sorted(default.items()) if t in architectures.get(c, {})
        },
        "architectures": {c: dict(sorted(v.items())) for c, v in sorted(architectures.items())},
        "rule_sets": rule_sets,
        "transforms": [json.loads(t) for t in transforms_seen],
        "extras": [json.loads(e) for e in extras_seen],
    }


def render(table: dict) -> str:
    """One rule set and one transform per line, so that a regeneration's diff shows what changed."""
    lists = ("rule_sets", "transforms", "extras")
    head = {k: v for k, v in table.items() if k not in lists}
    lines = json.dumps(head, indent=1, sort_keys=False)[:-2]
    body = ",\n".join(
        f" {json.dumps(name)}: [\n" + ",\n".join("  " + json.dumps(x, sort_keys=True) for x in table[name]) + "\n ]"
        for name in lists
    )
    return f"{lines},\n{body}\n}}\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="compare with the checked-in table instead of writing")
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    import logging

    logging.disable(logging.WARNING)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    text = render(build())
    if args.check:
        same = OUT.read_text() == text
        print(
            "layout_rules.json is up to date"
            if same
            else "layout_rules.json differs from the installed transformers: run scripts/generate_layouts.py"
        )
        return 0 if same else 1
    OUT.write_text(text)
    print(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
