"""The order and the disk bound of a streamed merge (`merge --stream`, execute/hub_stream.py).

A streamed merge writes one output shard at a time. Each output shard reads some base shards
(`needs`: the base tensors its tensors start from, quantized parts included); a base shard is
fetched when the output shard being written or the next one needs it, and released after the
last output shard that reads it. At most two output shards are on disk: the one being written
and the one being uploaded. So the disk a run needs at any moment is what `disk_bound` adds up,
the largest over the run, whatever the size of the whole model.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..formats.checkpoint import Checkpoint
from ..formats.safetensors_file import HeaderLayout
from .tensors import Plan, TensorPlan

OUTPUT_METADATA = {"format": "pt"}  # what the executor writes into each output shard's header
FETCH_AHEAD = 1  # base shards are fetched for the output shard being written and this many after it
OUTPUTS_ON_DISK = 2  # output shards on disk at once: one being written, one being uploaded


@dataclass
class StreamSchedule:
    """Output shards in the order they are written, the base shards each reads, and the sizes of both."""

    outputs: list[str]
    needs: dict[str, list[str]]  # output shard -> base shards it reads, in fetch order
    out_bytes: dict[str, int]  # output shard -> its file size
    base_bytes: dict[str, int]  # base shard -> its file size
    done: set[str] = field(default_factory=set)  # output shards already on the Hub (skipped)

    @property
    def todo(self) -> list[str]:
        return [name for name in self.outputs if name not in self.done]

    def fetch_order(self) -> list[tuple[int, str]]:
        """(position in `todo` of the first output shard that needs it, base shard), in fetch order."""
        order: dict[str, int] = {}
        for i, name in enumerate(self.todo):
            for shard in self.needs[name]:
                order.setdefault(shard, i)
        return [(i, shard) for shard, i in order.items()]

    def last_use(self) -> dict[str, int]:
        """Base shard -> position in `todo` of the last output shard that reads it."""
        last: dict[str, int] = {}
        for i, name in enumerate(self.todo):
            for shard in self.needs[name]:
                last[shard] = i
        return last

    def disk_bound(self, counted: set[str]) -> int:
        """Peak bytes on disk: the base shards in `counted` (those a run stores itself) alive at each step, plus
        the output shard being written and the one before it (being uploaded)."""
        todo, last = self.todo, self.last_use()
        first = {shard: i for i, shard in self.fetch_order()}
        peak = 0
        for i, name in enumerate(todo):
            alive = [s for s in first if s in counted and first[s] <= i + FETCH_AHEAD and last[s] >= i]
            outputs = todo[max(0, i - OUTPUTS_ON_DISK + 1) : i + 1]
            peak = max(peak, sum(self.base_bytes[s] for s in alive) + sum(self.out_bytes[o] for o in outputs))
        return peak

    @property
    def total_out(self) -> int:
        return sum(self.out_bytes.values())

    @property
    def total_base(self) -> int:
        return sum(self.base_bytes.values())


def base_reads(t: TensorPlan) -> list[str]:
    """The base tensors producing `t` reads: its source and a quantized weight's parts, stacked plans included (a
    kept NVFP4 weight: every member's of its fused group, whose global scale it is quantized with)."""
    names: list[str] = []
    for each in (t, *t.stacked):
        if each.quant is not None and each.quant.keep is not None and each.quant.keep.fused is not None:
            for member in each.quant.keep.fused.members:
                assert member.quant is not None and member.quant.stored is not None
                names.extend(member.quant.stored.parts.values())
        elif each.quant is not None and each.quant.stored is not None:  # (the source names the dequantized weight)
            names.extend(each.quant.stored.parts.values())
        elif each.source is not None:
            names.append(each.source)
    return names


def schedule(plan: Plan, checkpoint: Checkpoint) -> StreamSchedule:
    """The streamed order of a planned merge: every output shard with the base shards it reads."""
    needs: dict[str, list[str]] = {}
    out_bytes: dict[str, int] = {}
    for name, tensors in plan.shards:
        shards: dict[str, None] = {}
        for t in tensors:
            for read in base_reads(t):
                shards[checkpoint.weight_map[read]] = None
        needs[name] = list(shards)
        layout = HeaderLayout([(t.name, t.dtype, t.shape) for t in tensors], OUTPUT_METADATA)
        out_bytes[name] = layout.data_start + layout.data_size
    base_bytes = {
        shard: h.data_start + sum(t.nbytes for t in h.tensors.values()) for shard, h in checkpoint.headers.items()
    }
    return StreamSchedule([name for name, _ in plan.shards], needs, out_bytes, base_bytes)
