"""What every command shares: its options' common part, inputs from folders or the Hub, and publishing its output.

Each command has one frozen options object (`MergeOptions`, `ConvertOptions`, ...) that checks
itself when made (`OptionError`: a usage error); the commands that write an output share
`OutputOptions` (execute/options.py: OUT's handling, the Hub token, the push). Inputs may be local folders, Hub
repos (`org/name`, `org/name@rev`, `hf://...`) or loaded adapters: `adapter_input` and
`base_input` give a local folder and what provenance records of it. `publish` pushes a finished
output when asked; a failure says that OUT is complete on disk (`PushAfterWriteError`).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from ..adapter.adapter import Adapter
from ..adapter.tuners import method_name
from ..errors import (
    InputError,
    OptionError,
    OutputInterrupted,
    PushAfterWriteError,
    RsloraError,
    UnsupportedAdapterError,
)
from ..execute.options import OutputOptions
from ..hub.resolve import InputRole, Source, resolve_input

if TYPE_CHECKING:  # the push code is imported when a command pushes
    from ..hub.push import PushReport

AdapterSpec = str | os.PathLike[str] | Adapter


Options = TypeVar("Options")


def with_fields(options: Options | None, default: type[Options], fields: Mapping[str, Any]) -> Options:
    """`options` (or the defaults) with keyword arguments given as fields, checked as the options check themselves."""
    known = {f.name for f in dataclasses.fields(default)}  # type: ignore[arg-type]
    unknown = sorted(set(fields) - known)
    if unknown:
        raise TypeError(f"unknown option {unknown[0]!r} for {default.__name__}")
    if options is None:
        return default(**fields)
    return dataclasses.replace(options, **fields) if fields else options  # type: ignore[type-var]


def check_order(command: str, order: str, given: Sequence[tuple[str, Any, tuple[str, ...]]]) -> None:
    """Refuse inputs given in the wrong order: (name, spec, the folder kinds it may be) for each positional input;
    when two local folders each hold what the other's place needs (`merge ADAPTER BASE OUT`), say the order."""
    from ..hub.resolve import folder_kind

    kinds = [
        (name, spec, wanted, folder_kind(spec) if isinstance(spec, (str, os.PathLike)) else None)
        for name, spec, wanted in given
    ]
    for i, (name, spec, wanted, kind) in enumerate(kinds):
        if kind is None or kind in wanted:
            continue
        for other, other_spec, other_wanted, other_kind in kinds[i + 1 :]:
            if (
                other_kind is not None
                and other_kind not in other_wanted
                and other_kind in wanted
                and kind in other_wanted
            ):
                raise InputError(
                    f"{name} {spec} holds {_kind_words(kind)} and {other} {other_spec} "
                    f"{_kind_words(other_kind)}: the order is `[[rslora_tools.{command}({order})]]`"
                )


def _kind_words(kind: str) -> str:
    return {"adapter": "an adapter", "merged": "a merged model", "model": "a model"}[kind]


def adapter_list(adapter: AdapterSpec | Sequence[AdapterSpec]) -> list[AdapterSpec]:
    """One adapter argument, or several, as a list (at least one)."""
    if isinstance(adapter, (str, os.PathLike, Adapter)):
        return [adapter]
    adapters = list(adapter)
    if not adapters:
        raise OptionError("no ADAPTER given: pass at least one adapter (a folder, a Hub repo or a loaded Adapter)")
    return adapters


def source_of(spec: AdapterSpec | Source) -> dict[str, Any]:
    """What provenance records of an input: a Hub repo at its commit, or a local folder's spec."""
    if isinstance(spec, Source):
        return spec.to_dict()
    if isinstance(spec, Adapter):
        return {"spec": str(spec.path)}
    return {"spec": str(spec)}


def adapter_input(
    spec: AdapterSpec, *, revision: str | None = None, token: str | None = None, allow_pickle: bool = False
) -> tuple[Path | Adapter, dict[str, Any]]:
    """An adapter argument as something `load_adapter` reads (a local folder, or the adapter given) and its source."""
    if isinstance(spec, Adapter):
        return spec, source_of(spec)
    source = resolve_input(os.fspath(spec), role="adapter", revision=revision, token=token, allow_pickle=allow_pickle)
    return source.path, source.to_dict()


def base_input(
    spec: str | os.PathLike[str],
    *,
    role: InputRole = "base",
    revision: str | None = None,
    token: str | None = None,
    shards: bool = True,
) -> Source:
    """A model argument (BASE, TUNED) as a local folder, its shards downloaded unless `shards` is False."""
    return resolve_input(os.fspath(spec), role=role, revision=revision, token=token, shards=shards)


def publish(out: Path, options: OutputOptions) -> PushReport | None:
    """Push OUT (complete on disk) when the options ask; a failure or Ctrl-C says that OUT is complete."""
    target = options.push_target
    if target is None or options.dry_run:
        return None
    from ..hub.push import push_folder

    try:
        return push_folder(out, target)
    except RsloraError as e:
        raise PushAfterWriteError(e.message, out=str(out), repo_id=target.repo_id) from e
    except KeyboardInterrupt as e:
        raise PushInterrupted(str(out), target.repo_id) from e


class PushInterrupted(OutputInterrupted):
    """Ctrl-C or SIGTERM during the push of a complete output: OUT holds it; the push can be run again."""

    def __init__(self, out: str, repo_id: str):
        super().__init__(out, complete=True)
        self.repo_id = repo_id

    def __str__(self) -> str:
        return f"interrupted during the push to {self.repo_id}; {self.out} is complete on disk"


def check_push(options: OutputOptions, sources: Any) -> None:
    """A push into an input's own repo is refused before any work (hub.push.PushTarget.refuse_inputs)."""
    target = options.push_target
    if target is not None:
        target.refuse_inputs(sources)


def lora_only(adapters: Sequence[Adapter], what: str) -> None:
    """Refuse another tuner's adapter (AdaLoRA, LoHa, ...) where only LoRA is handled yet: only a single merge
    takes those (issue 38)."""
    for a in adapters:
        if not a.config.is_lora:
            raise UnsupportedAdapterError(
                f"{a.path}: a {method_name(a.config.method)} adapter; {what} takes LoRA adapters only so far "
                "(merge takes this one alone)"
            )
