"""Tied input/output embeddings; decide whether a merge keeps or breaks the tie.

When a model ties `lm_head` to the input embedding and the adapter changes one side only, the
trained model behaved as if the two were separate, so both tensors are written and
`tie_word_embeddings` becomes false. A delta is never added twice; PEFT's `ensure_weight_tying`
copy of the embedding's LoRA on the head is applied once (docs/peft-rules.md, "Tied embeddings").
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

from ..adapter.adapter import Adapter, LoraModule
from ..formats.checkpoint import Checkpoint
from .names import NameResolver
from .placement import check_shapes, make_op
from .tensors import LoraOp, TensorPlan

EMBEDDING_SUFFIXES = ("embed_tokens.weight", "wte.weight", "word_embeddings.weight", "tok_embeddings.weight")
HeadOpKind = Literal["replacement", "lora", "tokens"]


def tied_embedding(checkpoint: Checkpoint) -> str | None:
    """The input embedding tensor that `lm_head` is tied to (None when the model has no tie), by TieState's rule:
    tie_word_embeddings true, or not given and no lm_head tensor."""
    embedding = next((n for n in checkpoint.tensor_names() if n.endswith(EMBEDDING_SUFFIXES)), None)
    flag = (checkpoint.config or {}).get("tie_word_embeddings")
    head = any(n == "lm_head.weight" or n.endswith(".lm_head.weight") for n in checkpoint.weight_map)
    return embedding if embedding and (flag is True or (flag is None and not head)) else None


@dataclass
class HeadOps:
    """What the adapter does to an `lm_head` that exists only through the tie (no tensor in the checkpoint)."""

    replacement: str | None = None
    lora: LoraOp | None = None
    tokens: tuple[str, list[int]] | None = None
    kinds: set[HeadOpKind] = field(default_factory=set)


class TieState:
    """Tied input/output embeddings: collects what the adapter changes on each side, then applies the tie rules."""

    def __init__(self, checkpoint: Checkpoint, resolver: NameResolver):
        config = checkpoint.config or {}
        self.embedding = next((n for n in checkpoint.tensor_names() if n.endswith(EMBEDDING_SUFFIXES)), None)
        head = resolver.find("lm_head.weight")
        flag = config.get("tie_word_embeddings")
        self.tied = bool(self.embedding) and (flag is True or (flag is None and head is None))
        self.head_present = head
        self.head_name = head or "lm_head.weight"
        self.checkpoint = checkpoint
        self.head_ops = HeadOps()  # ops on a head that only exists through the tie
        self.embedding_kinds: set[HeadOpKind] = set()
        self.head_kinds: set[HeadOpKind] = set()
        self.untied = False

    def is_missing_head(self, path: str) -> bool:
        return self.tied and self.head_present is None and path.split(".")[-2:] == ["lm_head", "weight"]

    def is_vocabulary(self, name: str) -> bool:
        """Tensors whose rows are the vocabulary (they may grow when the adapter saves a resized copy)."""
        return name.endswith(EMBEDDING_SUFFIXES) or name.endswith("lm_head.weight") or name == self.embedding

    def add_head_replacement(self, key: str) -> None:
        self.head_ops.replacement = key
        self.head_ops.kinds.add("replacement")

    def add_head_lora(self, module: LoraModule, adapter: Adapter) -> None:
        shape = self.checkpoint.info(self.embedding).shape if self.embedding else ()
        self.head_ops.lora = make_op(module, adapter, "linear", shape, False)
        self.head_ops.kinds.add("lora")

    def add_head_tokens(self, tokens: tuple[str, list[int]]) -> None:
        self.head_ops.tokens = tokens
        self.head_ops.kinds.add("tokens")

    def note_target(self, name: str, kind: HeadOpKind) -> None:
        if name == self.embedding:
            self.embedding_kinds.add(kind)
        elif name == self.head_present:
            self.head_kinds.add(kind)

    def resolve(
        self, plan_for: Callable[[str], TensorPlan], adapter: Adapter, notes: list[str], warnings: list[str]
    ) -> list[tuple[str, TensorPlan]]:
        """Apply the tie rules; return tensors to add to the output, each after an anchor tensor."""
        if not self.tied or self.embedding is None:
            return []
        emb = plan_for(self.embedding)
        head_kinds = self.head_kinds | self.head_ops.kinds
        # Only full replacements or token rows on the embedding: the trained model kept the tie.
        if not head_kinds and "lora" not in self.embedding_kinds:
            return []
        lora_head = self.head_ops.lora
        if (
            adapter.config.ensure_weight_tying
            and emb.lora is not None
            and lora_head is not None
            and head_kinds == {"lora"}
            and _mirrors(adapter, emb.lora, lora_head)
        ):
            notes.append(
                f"{self.head_name}: tied to {self.embedding} with ensure_weight_tying; its LoRA copy is applied once "
                "(PEFT's merge_and_unload would add it twice)"
            )
            return []
        self.untied = True
        if self.head_present is not None:
            warnings.append(
                f"the adapter changes one side of tied embeddings ({self.embedding} / {self.head_name}); "
                "both are written and tie_word_embeddings is set to false"
            )
            return []
        warnings.append(
            f"the adapter changes one side of tied embeddings ({self.embedding}); {self.head_name} is written "
            "as its own tensor and tie_word_embeddings is set to false"
        )
        return [(self.embedding, self._head_plan(emb, adapter))]

    def _head_plan(self, emb: TensorPlan, adapter: Adapter) -> TensorPlan:
        """The untied head: what the embedding starts from, with the head's own ops (trainable tokens act on both)."""
        ops = self.head_ops
        head = TensorPlan(self.head_name, self.embedding, dtype=emb.dtype, shape=emb.shape)
        head.replacement = emb.replacement
        if ops.replacement is not None:
            head.replacement = ops.replacement
            head.shape = adapter.shapes[ops.replacement]
        if ops.lora is not None:
            head.lora = ops.lora
            check_shapes(ops.lora, adapter, head.shape, self.head_name)
        head.tokens = ops.tokens if ops.tokens is not None else emb.tokens
        if head.replacement is not None:
            head.source = None
        return head


def _mirrors(adapter: Adapter, emb: LoraOp, head: LoraOp) -> bool:
    """Is the head's LoRA the transposed copy PEFT saves for ensure_weight_tying?"""
    ea, eb = adapter.tensor(emb.module.a_key), adapter.tensor(emb.module.b_key)
    ha, hb = adapter.tensor(head.module.a_key), adapter.tensor(head.module.b_key)
    return ha.shape == eb.T.shape and hb.shape == ea.T.shape and bool((ha == eb.T).all()) and bool((hb == ea.T).all())
