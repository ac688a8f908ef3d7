"""Adapter module paths mapped to the checkpoint's tensor names: as named, up to a leading prefix, or by the rules
transformers loads the checkpoint with (plan/layouts.py), experts stacked into fused parameters included.

PEFT names an adapter's modules as the model holds them in memory; the checkpoint stores them as `save_pretrained`
writes them. `NameResolver` keeps the checkpoint's in-memory view (each stored name as transformers loads it, built
once, when a name is not found as stored) and answers: which stored tensor a path names (`find`), which parameters
a module holds itself (`own_parameters`, what PEFT matches `target_parameters` against), and which stored per-expert
tensors a fused expert parameter is stacked from (`stacked`).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

from ..errors import MismatchError
from ..formats.checkpoint import Checkpoint
from .layouts import Layouts, Loaded


@dataclass(frozen=True)
class Piece:
    """An in-memory tensor that transformers cuts out of a stored one along its rows (a Chunk or Split converter)."""

    stored: str
    index: int
    names: tuple[str, ...]  # the in-memory names of every piece of the stored tensor, in order
    equal: bool  # torch.chunk's equal pieces (Chunk); else the model's parameter sizes (Split)
    reorder: tuple[str, Any, bool] | None = None  # the piece then reordered (PermuteForRope of q and k)


@dataclass(frozen=True)
class StackedPart:
    """A stored per-expert tensor and its place in the fused parameter transformers stacks it into."""

    stored: str
    expert: int
    part: int  # which source of the converter (0: gate, 1: up; 0 for down_proj)
    parts: int


class _Index:
    """Names looked up as named or up to a leading prefix (`_find_as_named`), with their prefixes computed once."""

    def __init__(self, names: Collection[str]):
        self.names = names
        self.prefixes = _prefixes(names)

    def find(self, path: str) -> str | None:
        return _find_as_named(path, self.names, self.prefixes)


class _MemoryView:
    """The checkpoint as transformers holds it: in-memory name -> stored name (renamed tensors), fused expert
    parameter -> its stored per-expert parts, and the names other converters make (not merged into)."""

    def __init__(self, names: Collection[str], layouts: Layouts):
        self.renamed: dict[str, str] = {}
        self.memory_of: dict[str, str] = {}  # stored -> its in-memory name (the first a converter makes), if renamed
        self.stacked: dict[str, list[StackedPart]] = defaultdict(list)
        self.converted: dict[str, Loaded] = {}
        self.pieces: dict[str, Piece] = {}
        self.transposed: dict[str, str] = {}  # in-memory name -> the stored tensor it is the transpose of
        self.reordered: dict[str, tuple[str, tuple[str, Any, bool]]] = {}  # -> (stored, how its rows are reordered)
        self.concatenated: dict[str, list[tuple[int, str]]] = defaultdict(list)  # -> (source index, stored) parts
        for stored, loaded in layouts.load_all(names).items():
            self.memory_of[stored] = loaded.memory
            converter = loaded.converter
            if converter is None:
                if loaded.memory != stored:
                    self.renamed[loaded.memory] = stored
            elif converter.transposes:
                self.transposed[loaded.memory] = stored
            elif converter.permutation is not None:
                self.reordered[loaded.memory] = (stored, converter.permutation)
            elif converter.concatenates_rows:
                self.concatenated[loaded.memory].append((loaded.source, stored))
            elif loaded.pieces and converter.splits_rows:
                equal = converter.ops[0][0] == "Chunk"
                for i, piece in enumerate(loaded.pieces):
                    self.pieces[piece] = Piece(stored, i, loaded.pieces, equal, converter.piece_reorder(i))
            elif loaded.expert_part:
                assert loaded.expert is not None
                self.stacked[loaded.memory].append(
                    StackedPart(stored, loaded.expert, loaded.source, len(converter.sources))
                )
            else:
                for memory in loaded.pieces or (loaded.memory,):
                    self.converted[memory] = loaded
        for parts in self.stacked.values():
            parts.sort(key=lambda p: (p.expert, p.part))
        self.renamed_index, self.stacked_index = _Index(self.renamed), _Index(self.stacked)
        self.converted_index = _Index(self.converted)
        self.pieces_index = _Index(self.pieces)
        self.transposed_index = _Index(self.transposed)
        self.reordered_index, self.concatenated_index = _Index(self.reordered), _Index(self.concatenated)


class NameResolver:
    """Map module paths from the adapter to tensor names in the checkpoint: as named, up to a leading prefix, or in
    the checkpoint's other naming of the same architecture (plan/layouts.py)."""

    def __init__(self, checkpoint: Checkpoint, extra: list[str] | None = None, layouts: Layouts | None = None):
        self.checkpoint = checkpoint
        self.names = set(checkpoint.weight_map) | set(extra or ())  # extra: weights a quantized checkpoint packs
        self.stored = _Index(self.names)
        self.layouts = layouts if layouts is not None else Layouts.of(checkpoint.config)
        self.renamed: dict[str, str] = {}  # adapter path -> the tensor found under the other naming
        self._view: _MemoryView | None = None
        self._children: dict[str, set[str]] | None = None
        self._children_index: _Index | None = None

    @property
    def view(self) -> _MemoryView:
        if self._view is None:
            self._view = _MemoryView(self.names, self.layouts)
        return self._view

    def find(self, path: str, *, record: bool = True) -> str | None:
        """The checkpoint tensor `path` names; `record`: remember a rename, for the merge's note."""
        found = self.stored.find(path)
        if found is not None or not self.layouts.transforms:
            return found
        candidates = set()
        in_view = self.view.renamed_index.find(path)
        if in_view is not None:
            candidates.add(self.view.renamed[in_view])
        loaded = self.layouts.loaded(path)  # `path` in the stored naming, the checkpoint in the in-memory one
        if loaded.converter is None and loaded.memory != path:
            other = self.stored.find(loaded.memory)
            if other is not None:
                candidates.add(other)
        if len(candidates) > 1:
            raise MismatchError(
                f"adapter module path {path!r} matches several base tensors ({', '.join(sorted(candidates))}) "
                "under the architecture's renames"
            )
        if candidates and record:
            self.renamed[path] = next(iter(candidates))
        return candidates.pop() if candidates else None

    def in_memory(self, stored: str) -> str:
        """A stored tensor's in-memory name, as transformers loads the whole checkpoint (a GroupWeightRename's state
        comes from the checkpoint's other names)."""
        if not self.layouts.transforms:
            return stored
        return self.view.memory_of.get(stored, stored)

    def shape(self, name: str) -> tuple[int, ...]:
        """A stored tensor's shape (from its header)."""
        return self.checkpoint.info(name).shape

    def stacked(self, path: str) -> list[StackedPart]:
        """The stored per-expert tensors the fused expert parameter `path` (in-memory naming) is stacked from."""
        if not self.layouts.converters:
            return []
        found = self.view.stacked_index.find(path)
        return self.view.stacked[found] if found is not None else []

    def piece(self, path: str) -> Piece | None:
        """The stored tensor the in-memory tensor `path` is cut out of, if transformers cuts it (Chunk, Split)."""
        if not self.layouts.converters:
            return None
        found = self.view.pieces_index.find(path)
        return self.view.pieces[found] if found is not None else None

    def transposed(self, path: str) -> str | None:
        """The stored tensor whose transpose the in-memory 2-D tensor `path` is, if transformers transposes it."""
        if not self.layouts.converters:
            return None
        found = self.view.transposed_index.find(path)
        return self.view.transposed[found] if found is not None else None

    def reordered(self, path: str) -> tuple[str, tuple[str, Any, bool]] | None:
        """(the stored tensor, how transformers reorders it) for an in-memory tensor made by reordering one (an
        interleaved gate/up, q/k weights permuted for RoPE), if `path` is one."""
        if not self.layouts.converters:
            return None
        found = self.view.reordered_index.find(path)
        return self.view.reordered[found] if found is not None else None

    def concatenated(self, path: str) -> list[str]:
        """The stored tensors, in order, that transformers concatenates along their rows into the in-memory weight
        `path` (a gate_up_proj Linear stored as gate_proj and up_proj); empty if it is not one."""
        if not self.layouts.converters:
            return []
        found = self.view.concatenated_index.find(path)
        return [s for _, s in sorted(self.view.concatenated[found])] if found is not None else []

    def converted(self, path: str) -> Loaded | None:
        """How the in-memory tensor `path` is made by a converter rslora-tools does not merge across, if it is."""
        if not self.layouts.converters:
            return None
        found = self.view.converted_index.find(path)
        return self.view.converted[found] if found is not None else None

    def parameter_order(self, module: str) -> tuple[str, ...] | None:
        """The order the module (in-memory naming) registers its own parameters in transformers' model, if known."""
        return self.layouts.parameter_order(module)

    def own_parameters(self, module: str) -> set[str] | None:
        """The names of the parameters `module` holds itself, as the model holds it in memory (PEFT's
        `named_parameters(recurse=False)`); None when no tensor of the checkpoint is under that module."""
        if self._children is None:
            children: dict[str, set[str]] = defaultdict(set)
            names = set(self.names)
            if self.layouts.transforms:
                view = self.view
                names = (
                    names - set(view.renamed.values()) | set(view.renamed) | set(view.stacked) | set(view.converted)
                )
                names = names - {p.stored for parts in view.stacked.values() for p in parts} | set(view.pieces)
                names = names - {p.stored for p in view.pieces.values()} - set(view.transposed.values())
                names = (
                    names
                    - {s for s, _ in view.reordered.values()}
                    - {s for parts in view.concatenated.values() for _, s in parts}
                )
                names |= set(view.transposed) | set(view.reordered) | set(view.concatenated)
            for name in names:
                parent, _, leaf = name.rpartition(".")
                children[parent].add(leaf)
            self._children = dict(children)
            self._children_index = _Index(self._children)
        assert self._children_index is not None
        found = self._children_index.find(module)
        return self._children[found] if found is not None else None


def _prefixes(names: Collection[str]) -> list[str]:
    return sorted({n.split(".", 1)[0] for n in names if "." in n})


def _find_as_named(path: str, names: Collection[str], prefixes: list[str]) -> str | None:
    """`path` among `names`: as it is, without its first part, or under one leading prefix (an adapter trained on
    `LlamaModel` against a `LlamaForCausalLM` checkpoint, and the reverse)."""
    if path in names:
        return path
    candidates = set()
    if "." in path and path.split(".", 1)[1] in names:
        candidates.add(path.split(".", 1)[1])
    for prefix in prefixes:
        if f"{prefix}.{path}" in names:
            candidates.add(f"{prefix}.{path}")
    if len(candidates) > 1:
        raise MismatchError(
            f"adapter module path {path!r} matches several base tensors ({', '.join(sorted(candidates))}); "
            "the prefix mapping is ambiguous"
        )
    return candidates.pop() if candidates else None
