"""`verify`: recompute what every merged tensor must be and compare it with a merged folder.

This module establishes how the merge was made (the arguments, else what MERGED's rslora_tools.json records),
resolves the inputs (Hub repos included) and loads the adapters; the recompute and the comparison are
execute/recompute.py's (`check_folder`, which `merge --verify` runs too).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..adapter.adapter import Adapter
from ..adapter.load import load_adapter
from ..adapter.relative import relative_to_original
from ..adapter.stacked import stack_adapters
from ..execute.recompute import TensorCheck, VerifyReport, check_folder
from ..formats.checkpoint import Checkpoint
from ..formats.provenance import PROVENANCE_NAME, read_provenance
from ..formats.quant import QuantScheme, trained_on_scheme
from ..hub.resolve import resolve_merge_inputs
from ..reporting import ProgressCallback
from .common import AdapterSpec, adapter_input, adapter_list, check_order, lora_only, with_fields
from .options import VerifyOptions

__all__ = ["TensorCheck", "VerifyOptions", "VerifyReport", "check_merged", "recipe_text", "verify"]


def verify(
    merged: str | os.PathLike[str],
    base: str | os.PathLike[str],
    adapter: AdapterSpec | Sequence[AdapterSpec],
    *,
    options: VerifyOptions | None = None,
    progress: ProgressCallback | None = None,
    **fields: Any,
) -> VerifyReport:
    """Check that MERGED is BASE with ADAPTER merged: recompute every tensor and compare, and check the folder.

    Args:
        merged: the merged model folder to check.
        base: the base model: a folder or a Hub repo.
        adapter: an adapter (folder, Hub repo or loaded `Adapter`), or several (a stacked merge, in its order).
        options: a `VerifyOptions`; keyword arguments are taken as its fields.
        progress: called as `progress(bytes_checked_now, total_bytes)` after each tensor.

    Returns:
        A `VerifyReport`: per tensor exact, within rounding or mismatch, the folder's problems, and the recipe checked.
    """
    options = with_fields(options, VerifyOptions, fields)
    adapters = adapter_list(adapter)
    check_order(
        "verify",
        "MERGED, BASE, ADAPTER...",
        [("MERGED", merged, ("merged",)), ("BASE", base, ("model",)), ("ADAPTER", adapters[0], ("adapter",))],
    )
    base_path, loaded = _inputs(base, adapters, options)
    return check_merged(Path(merged), base_path, loaded, options, progress)


def _inputs(
    base: str | os.PathLike[str], adapters: list[AdapterSpec], options: VerifyOptions
) -> tuple[Path, list[Adapter]]:
    """BASE and the adapters as folders (downloaded when they are Hub repos) and loaded adapters."""
    first = adapters[0]
    base_source, first_source, _ = resolve_merge_inputs(
        os.fspath(base),
        os.fspath(first.path if isinstance(first, Adapter) else first),
        base_revision=options.base_revision,
        adapter_revision=options.adapter_revision,
        token=options.token,
        allow_pickle=options.allow_pickle,
    )
    specs = [first if isinstance(first, Adapter) else first_source.path]
    specs += [adapter_input(a, token=options.token, allow_pickle=options.allow_pickle)[0] for a in adapters[1:]]
    loaded = [a if isinstance(a, Adapter) else load_adapter(a, allow_pickle=options.allow_pickle) for a in specs]
    lora_only(loaded, "verify")
    return base_source.path, loaded


def check_merged(
    merged: Path,
    base: Path | Checkpoint,
    adapters: list[Adapter],
    options: VerifyOptions,
    progress: ProgressCallback | None = None,
) -> VerifyReport:
    """`verify` of local inputs, the adapters loaded: the recipe established, the adapters stacked (and made relative
    to INIT) as the merge had them, then execute/recompute.py's check."""
    recorded = read_provenance(merged) if merged.is_dir() else {}
    recipe = _recipe(
        recorded, adapters, options.weights, options.trained_on, options.initial, options.base_is_residual
    )
    weights = recipe.get("weights", options.weights)
    trained_on = options.trained_on
    base_is_residual = bool(recipe.get("base_is_residual", options.base_is_residual))
    if trained_on is None and "trained_on" in recipe:
        trained_on = recorded_trained_on(merged)
    adapter_obj = (
        stack_adapters(adapters, list(weights) if weights is not None else None)
        if len(adapters) > 1 or weights is not None
        else adapters[0]
    )
    if options.initial is not None:
        init, _ = adapter_input(options.initial, token=options.token, allow_pickle=options.allow_pickle)
        adapter_obj = relative_to_original(
            adapter_obj, init if isinstance(init, Adapter) else load_adapter(init, allow_pickle=options.allow_pickle)
        )
    return check_folder(
        merged,
        base,
        adapter_obj,
        trained_on=trained_on,
        base_is_residual=base_is_residual,
        sample=options.sample,
        recipe=recipe,
        progress=progress,
    )


def _recipe(
    recorded: dict[str, Any],
    adapters: list[Adapter],
    weights: Sequence[float] | None,
    trained_on: QuantScheme | None,
    initial: Any,
    base_is_residual: bool,
) -> dict[str, Any]:
    """How the merge was made, as this verification checks it: the arguments given, and what MERGED's
    rslora_tools.json records where an argument was not given ("from" says which; a verdict names it)."""
    taken: dict[str, Any] = {}
    quant = recorded.get("quantization")
    if trained_on is None and isinstance(quant, dict) and quant.get("mode") == "as trained":
        taken["trained_on"] = quant.get("scheme")
    count = len(adapters)
    kept = recorded.get("weights")
    if (
        weights is None
        and isinstance(kept, list)
        and len(kept) == count
        and any(w != 1.0 for w in kept)
        and all(isinstance(w, (int, float)) for w in kept)
    ):
        taken["weights"] = [float(w) for w in kept]
    if not base_is_residual and recorded.get("base_is_residual") is True:
        taken["base_is_residual"] = True
    recipe: dict[str, Any] = {
        "trained_on": trained_on.label if trained_on is not None else None,
        "weights": list(weights or []) or None,
        "initial": str(initial) if initial is not None else None,
        "base_is_residual": base_is_residual,
        **taken,
        "from": f"{PROVENANCE_NAME} of MERGED" if taken else "the arguments",
    }
    if initial is None and isinstance(recorded.get("initial"), dict):
        recipe["note"] = (
            f"MERGED's {PROVENANCE_NAME} says the merge used --initial "
            f"{recorded['initial'].get('spec', '?')}; pass --initial INIT to check that merge"
        )
    return recipe


def recipe_text(recipe: dict[str, Any]) -> str:
    """The recipe as the flags that give it, e.g. "--trained-on nf4 (blocksize 64), --weights 0.7,0.4"."""
    parts = []
    if recipe.get("trained_on"):
        parts.append(f"--trained-on {recipe['trained_on']}")
    if recipe.get("weights"):
        parts.append("--weights " + ",".join(f"{w:g}" for w in recipe["weights"]))
    if recipe.get("initial"):
        parts.append(f"--initial {recipe['initial']}")
    if recipe.get("base_is_residual"):
        parts.append("--base-is-residual")
    return ", ".join(parts) or "a plain merge"


def recorded_trained_on(folder: Path) -> QuantScheme | None:
    """The --trained-on scheme a merge recorded in the folder's rslora_tools.json (None: none recorded)."""
    record = read_provenance(folder) or {}
    quant = record.get("quantization")
    if not isinstance(quant, dict) or quant.get("mode") != "as trained":
        return None
    skip = quant.get("skip_modules")
    return trained_on_scheme(
        str(quant.get("method")),
        double_quant=bool(quant.get("double_quant")),
        blocksize=quant.get("blocksize") if quant.get("method") != "int8" else None,
        skip_modules=list(skip) if isinstance(skip, list) else None,
    )
