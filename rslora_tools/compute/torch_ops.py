"""The value of one merged tensor, computed with torch exactly as PEFT's merge_and_unload does.

Every operation below mirrors PEFT 0.21 op for op (docs/peft-rules.md, "Deltas", "Rounding"
and "DoRA"), because bit-exact results need the same torch ops in the same order and dtypes:
- adapter tensors are upcast to fp32 when saved in half precision (PEFT's autocast_adapter_dtype);
- Linear / Conv1D / ConvNd add the fp32 delta in place: one rounding to the base dtype;
- Embedding, MultiheadAttention and target_parameters cast the delta to the base dtype first;
- MultiheadAttention's out_proj gets its delta twice, as PEFT's merge (and forward) apply it;
- DoRA computes in fp32 and rounds once at the end.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any, TypeVar

import torch
import torch.nn.functional as F

from ..formats.safetensors_file import safetensors_to_torch_dtype
from ..plan.tensors import LoraOp, TensorPlan
from .tuners import apply_tuner

_HALF = {torch.float16, torch.bfloat16}
_UPCAST = _HALF | {getattr(torch, n) for n in ("float8_e4m3fn", "float8_e5m2") if hasattr(torch, n)}
_CONV = {3: F.conv1d, 4: F.conv2d, 5: F.conv3d}

Reader = Callable[[str], torch.Tensor]

_Fn = TypeVar("_Fn", bound=Callable[..., Any])


def one_thread(function: _Fn) -> _Fn:
    """Run `function` with torch on one intra-op thread (this thread's OpenMP and MKL setting, restored after), so
    that the reduction order of its matmuls, convolutions and norms, and so the merged bytes, do not depend on the
    machine's core count or OMP_NUM_THREADS (docs/peft-rules.md, "Rounding"). The executor's workers compute many
    tensors at once; each tensor's ops are single-threaded."""

    @functools.wraps(function)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        threads = torch.get_num_threads()
        if threads == 1:
            return function(*args, **kwargs)
        torch.set_num_threads(1)
        try:
            return function(*args, **kwargs)
        finally:
            torch.set_num_threads(threads)

    return wrapper  # type: ignore[return-value]


def adapter_weight(read: Reader, key: str, device: torch.device) -> torch.Tensor:
    """An adapter tensor as PEFT holds it after loading: half precision upcast to fp32."""
    t = read(key).to(device)
    return t.float() if t.dtype in _UPCAST else t


def lora_delta(op: LoraOp, read: Reader, w_shape: torch.Size, device: torch.device) -> torch.Tensor:
    """PEFT's get_delta_weight for the op's layer kind (fp32, scale included, base weight layout)."""
    a = adapter_weight(read, op.module.a_key, device)
    b = adapter_weight(read, op.module.b_key, device)
    s = op.scale.scale
    if op.kind in ("linear", "param", "mha", "mha_out"):
        delta = b @ a
        return (delta.T if op.transpose else delta) * s
    if op.kind == "embedding":
        return (b @ a).T * s
    if op.kind == "conv":
        if len(w_shape) == 4 and tuple(w_shape[2:4]) == (1, 1):  # PEFT's Conv2d 1x1 shortcut
            return (b.squeeze(3).squeeze(2) @ a.squeeze(3).squeeze(2)).unsqueeze(2).unsqueeze(3) * s
        # The general formula for every other kernel, Conv3d 1x1xk included (PEFT's shortcut crashes there).
        return _CONV[len(w_shape)](a.transpose(0, 1), b).transpose(0, 1) * s
    if op.kind == "experts":
        a3 = a.reshape(op.experts, -1, a.shape[-1])  # expert-major rows: e*r + k
        b3 = b.reshape(b.shape[0], -1, op.experts)  # expert-minor columns: k*E + e
        if op.transpose:  # W[e] is (in, out), as in GPT-OSS
            return torch.einsum("o r e, e r i -> e i o", b3, a3) * s
        return torch.einsum("o r e, e r i -> e o i", b3, a3) * s  # W[e] is (out, in): Mixtral/Qwen-MoE in v5
    raise AssertionError(op.kind)


# Row blocks of at least this many rows and about this many fp32 elements: the delta of a block
# stays in cache, and memory stays small. Every block has the same row count (the last one
# overlaps its predecessor) because a matmul with very few rows may take a different kernel,
# whose rounding differs from PEFT's single big matmul; equal-size blocks of >= 64 rows give
# bit-identical rows (checked by the tests and the benchmark against PEFT).
_MIN_BLOCK_ROWS = 64
_BLOCK_ELEMENTS = 1 << 20


def _add_linear_in_blocks(w: torch.Tensor, op: LoraOp, read: Reader) -> torch.Tensor:
    """W += (B @ A) * s, one row block at a time: the same values as PEFT, in a fused pass."""
    a = adapter_weight(read, op.module.a_key, w.device)
    b = adapter_weight(read, op.module.b_key, w.device)
    s = op.scale.scale
    rows = w.shape[0]
    step = max(_MIN_BLOCK_ROWS, _BLOCK_ELEMENTS // max(1, w.shape[1]))
    if step >= rows:
        w += (b @ a) * s
        return w
    block = torch.empty(step, a.shape[1], dtype=torch.float32, device=w.device)  # reused for every block
    for start in range(0, rows, step):
        stop = min(start + step, rows)
        first = stop - step  # the last block overlaps the previous one to keep its size
        torch.mm(b[first:stop], a, out=block)
        block.mul_(s)
        # fl32(delta + W) then one rounding to W's dtype: the same bits as PEFT's `W += delta`,
        # in two simple passes instead of a mixed-dtype in-place add.
        part = block[start - first :]
        part += w[start:stop]
        w[start:stop].copy_(part)
    return w


def _add_embedding_in_blocks(w: torch.Tensor, op: LoraOp, read: Reader) -> torch.Tensor:
    """W += ((B @ A)^T * s).to(W.dtype), a block of vocabulary rows at a time (never the whole fp32 delta).

    Column blocks of B @ A give the same bits as the full product (checked in the tests), and
    the delta is cast to W's dtype before the add, as PEFT's Embedding merge does.
    """
    a = adapter_weight(read, op.module.a_key, w.device)  # [r, vocab]
    b = adapter_weight(read, op.module.b_key, w.device)  # [dim, r]
    s = op.scale.scale
    rows = w.shape[0]
    step = max(_MIN_BLOCK_ROWS, _BLOCK_ELEMENTS // max(1, w.shape[1]))
    for start in range(0, rows, step):
        stop = min(start + step, rows)
        first = max(0, stop - step)
        block = (b @ a[:, first:stop]).T * s
        w[start:stop] += block[start - first :].to(w.dtype)
    return w


def apply_lora(w: torch.Tensor, op: LoraOp, read: Reader) -> torch.Tensor:
    """Merge one LoRA module into its (writable) weight; returns the merged weight."""
    if not op.module.is_lora:  # another tuner (compute/tuners.py), on its layer's own weight
        factors, rounded = op.module.factors, op.module.factors_in_base_dtype and w.dtype in _HALF

        def factor(role: str) -> torch.Tensor:
            t = adapter_weight(read, factors[role], w.device)
            return t.to(w.dtype).float() if rounded else t

        return apply_tuner(w, op, factor)
    if op.rows is not None:  # the module's weight is these rows of W (then maybe reordered): merged in place
        start, stop = op.rows
        view = w[start:stop]
        merged = apply_lora(view, dataclasses.replace(op, rows=None), read)
        if merged is not view:
            w[start:stop] = merged
        return w
    if op.reorder is not None:  # merged where transformers holds it (reordered), then reordered back: exact moves
        memory = reordered(w, op.reorder)
        merged = apply_lora(memory, dataclasses.replace(op, reorder=None), read)
        w.copy_(reordered(merged, op.reorder, back=True))
        return w
    if op.delta_rows is not None:  # W is these rows of the module's weight: these rows of B
        start, stop = op.delta_rows
        b_key = op.module.b_key

        def rows_of_b(key: str) -> torch.Tensor:
            return read(key)[start:stop] if key == b_key else read(key)

        return apply_lora(w, dataclasses.replace(op, delta_rows=None), rows_of_b)
    if op.part is not None:
        return _apply_expert_part(w, op, read)
    if op.kind == "linear" and not op.dora and not op.transpose and w.dim() == 2 and w.device.type == "cpu":
        return _add_linear_in_blocks(w, op, read)
    if op.kind == "embedding" and not op.dora and w.device.type == "cpu":
        return _add_embedding_in_blocks(w, op, read)
    delta = lora_delta(op, read, w.shape, w.device)
    if op.dora:
        return _apply_dora(w, op, delta, read)
    if op.kind == "mha_out":
        # PEFT's MultiheadAttention.merge adds the out_proj delta (cast to W's dtype), then merges
        # the wrapped out_proj LoRA layer again (fp32 add, one rounding): the delta counts twice.
        # Its forward merges the same way, so this is what the adapter was trained with.
        w = w + delta.to(w.dtype)
        w += delta
        return w
    if op.kind in ("embedding", "mha", "param", "experts"):
        if op.kind in ("param", "experts") and w.dtype not in (torch.float16, torch.bfloat16, torch.float32):
            w += delta  # low-precision parameters: PEFT adds without downcasting the delta first
        else:
            w += delta.to(w.dtype)
        return w
    w += delta  # mixed-dtype in-place add: computed in fp32, rounded once
    return w


def reordered(w: torch.Tensor, how: tuple[str, int, bool], *, back: bool = False) -> torch.Tensor:
    """A stored tensor reordered as transformers reorders it on loading (`back`: its reverse operation, as it saves):
    Interleave (core_model_loading.Interleave) or PermuteForRope with the attention heads given."""
    kind, arg, inverse = how
    inverse = inverse != back
    if kind == "interleave":
        shape = list(w.shape)
        shape[arg : arg + 1] = [2, shape[arg] // 2] if inverse else [shape[arg] // 2, 2]
        return w.reshape(shape).transpose(arg, arg + 1).reshape(w.shape).contiguous()
    half = w.shape[0] // arg // 2
    head = (2, half) if inverse else (half, 2)
    return w.reshape(arg, *head, *w.shape[1:]).transpose(1, 2).reshape(w.shape).contiguous()


def _apply_expert_part(w: torch.Tensor, op: LoraOp, read: Reader) -> torch.Tensor:
    """An expert's share of a fused expert parameter (plan/experts.py), merged as PEFT's ParamWrapper merges the
    fused parameter: the same einsum, restricted to one expert, its delta cast to W's dtype, then added."""
    part = op.part
    assert part is not None
    a = adapter_weight(read, op.module.a_key, w.device)
    b = adapter_weight(read, op.module.b_key, w.device)
    if part.fused_factors:  # expert e's factors out of every expert's (rows e*r + k of A, columns k*E + e of B)
        a3 = a.reshape(part.experts, -1, a.shape[-1])[part.expert : part.expert + 1]
        b3 = b.reshape(b.shape[0], -1, part.experts)[:, :, part.expert : part.expert + 1]
    else:
        a3, b3 = a.unsqueeze(0), b.unsqueeze(2)
    delta = torch.einsum("o r e, e r i -> e o i", b3, a3)[0] * op.scale.scale  # (out, in)
    rows = slice(*part.rows) if part.rows is not None else slice(None)
    if part.fused_factors:  # the whole per-expert weight (out, in): the role's rows of the fused delta
        target, delta = w, delta[rows]
    else:  # the expert's slice of the fused parameter, (out, in) or (in, out)
        target = w[part.expert][:, rows] if part.in_out else w[part.expert][rows]
        delta = delta.T if part.in_out else delta
    target += delta.to(w.dtype) if w.dtype in (torch.float16, torch.bfloat16, torch.float32) else delta
    return w


def _apply_dora(w: torch.Tensor, op: LoraOp, delta: torch.Tensor, read: Reader) -> torch.Tensor:
    assert op.module.magnitude_key is not None
    magnitude = adapter_weight(read, op.module.magnitude_key, w.device)
    orig_dtype = w.dtype
    if op.kind == "conv":
        weight = w + 1 * delta
        norm = weight.norm(p=2, dim=tuple(range(1, weight.dim())), keepdim=True).transpose(1, 0)
        factor = (magnitude / norm).view(*((-1,) + (1,) * (w.dim() - 1)))
        return (factor * (w + delta)).to(orig_dtype)
    if op.kind == "embedding":  # norm per embedding dim, over the vocabulary
        weight = w.T + 1 * delta.T
        norm = torch.linalg.norm(weight, dim=1).to(weight.dtype)
        factor = (magnitude / norm).view(1, -1)
        return (factor * (w + delta)).to(orig_dtype)
    # Linear, or Conv1D when transposed: the norm is per output feature
    return (_linear_dora_factor(op, magnitude, _linear_dora_norm(w, delta, op)) * (w + delta)).to(orig_dtype)


def _t(x: torch.Tensor, transpose: bool) -> torch.Tensor:
    return x.T if transpose else x


def apply_lora_bias(bias: torch.Tensor, op: LoraOp, read: Reader) -> torch.Tensor:
    """lora_bias: b += lora_B.bias * scale (fp32, rounded once), as PEFT's unsafe merge does."""
    assert op.module.bias_key is not None
    lora_b_bias = adapter_weight(read, op.module.bias_key, bias.device)
    bias += lora_b_bias * op.scale.scale
    return bias


def apply_tokens(w: torch.Tensor, key: str, indices: list[int], read: Reader) -> torch.Tensor:
    """Trainable tokens: the saved rows replace rows `indices` (index_copy, as PEFT merges them)."""
    rows = read(key).to(w.device)
    return w.index_copy(0, torch.tensor(indices, device=w.device), rows.to(w.dtype))


@one_thread
def compute(
    plan: TensorPlan,
    base: torch.Tensor | None,
    read: Reader,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """The merged value of one output tensor, from its base value (None when a replacement gives it).

    `read` reads an adapter tensor by key; `base` is writable and may be changed in place.
    """
    if plan.replacement is not None:
        w = read(plan.replacement)
        device = base.device if base is not None else w.device
        w = w.to(device=device, dtype=out_dtype)
    else:
        assert base is not None
        w = base if base.dtype == out_dtype else base.to(out_dtype)
    if plan.stacked:
        return _apply_stacked(w, plan, read)
    if plan.lora is not None:
        w = apply_lora(w, plan.lora, read)
    for op in plan.parts:
        w = apply_lora(w, op, read)
    if plan.bias_of is not None:
        w = apply_lora_bias(w, plan.bias_of, read)
    if plan.tokens is not None:
        w = apply_tokens(w, plan.tokens[0], plan.tokens[1], read)
    return w


def _apply_stacked(w: torch.Tensor, plan: TensorPlan, read: Reader) -> torch.Tensor:
    """Several adapters' ops on one tensor, as PEFT's merge_and_unload(adapter_names=[...]) applies them: one after
    another, each rounded to W's dtype. A DoRA op after others takes its norm from the weight with the earlier ones
    unmerged, and continues from the weight they are merged into again (PEFT's `_unmerged_base_weight`)."""
    merged: list[tuple[LoraOp, torch.Tensor | None]] = []  # (op, its DoRA norm)
    for step in (plan, *plan.stacked):
        if step.lora is not None:
            op = step.lora
            if op.dora and merged:
                base = _unmerge(w.clone(), merged, read)
                w, replayed = base.clone(), []
                for earlier, _ in merged:
                    w, norm = _merge_one(w, earlier, read, norm_from=base)
                    replayed.append((earlier, norm))
                merged = replayed
                w, norm = _merge_one(w, op, read, norm_from=base)
            else:
                w, norm = _merge_one(w, op, read, norm_from=w)
            merged.append((op, norm))
            for part in step.parts:
                w = apply_lora(w, part, read)
        if step.bias_of is not None:
            w = apply_lora_bias(w, step.bias_of, read)
        if step.tokens is not None:
            w = apply_tokens(w, step.tokens[0], step.tokens[1], read)
    return w


def _merge_one(
    w: torch.Tensor, op: LoraOp, read: Reader, norm_from: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One adapter's merge into W; for DoRA (linear) with the norm taken from `norm_from`, returned for an unmerge."""
    if not op.dora or op.kind != "linear":  # a non-linear DoRA op is never merged after another (adapter/stacked.py)
        return apply_lora(w, op, read), None
    delta = lora_delta(op, read, w.shape, w.device)
    norm = _linear_dora_norm(norm_from, delta, op)
    factor = _linear_dora_factor(op, _magnitude(op, read, w.device), norm)
    return (factor * (w + delta)).to(w.dtype), norm


def _unmerge(w: torch.Tensor, merged: list[tuple[LoraOp, torch.Tensor | None]], read: Reader) -> torch.Tensor:
    """PEFT's unmerge, last merged first: W -= delta.to(dtype); DoRA: (W / factor - delta).to(dtype)."""
    for op, norm in reversed(merged):
        delta = lora_delta(op, read, w.shape, w.device)
        if op.dora:
            assert norm is not None
            factor = _linear_dora_factor(op, _magnitude(op, read, w.device), norm)
            w = (w / factor - delta).to(w.dtype)
        else:
            w -= delta.to(w.dtype)
    return w


def _magnitude(op: LoraOp, read: Reader, device: torch.device) -> torch.Tensor:
    assert op.module.magnitude_key is not None
    return adapter_weight(read, op.module.magnitude_key, device)


def _linear_dora_norm(w: torch.Tensor, delta: torch.Tensor, op: LoraOp) -> torch.Tensor:
    """DoRA's weight norm per output feature of W + delta (Linear, or Conv1D when transposed)."""
    weight = _t(w, op.transpose) + 1 * _t(delta, op.transpose)
    return torch.linalg.norm(weight, dim=1).to(weight.dtype)


def _linear_dora_factor(op: LoraOp, magnitude: torch.Tensor, norm: torch.Tensor) -> torch.Tensor:
    return _t((magnitude / norm).view(-1, 1), op.transpose)


def quantized_base(t: TensorPlan, read_base: Reader) -> torch.Tensor:
    """The base value of a weight that comes through quantization, on the CPU, in the dtype dequantization gives:
    a stored quantized weight dequantized, or the base weight quantized and dequantized (`--trained-on`)."""
    from .quantization import dequantize_stored, simulate

    q = t.quant
    assert q is not None and t.source is not None
    if q.stored is not None:
        value = dequantize_stored(q.stored, read_base)
    else:
        w = read_base(t.source)
        value = simulate(w.T.contiguous() if q.transposed else w, q.scheme)
    return value.T.contiguous() if q.transposed else value


def quantization_norms(
    original: torch.Tensor, quantized: torch.Tensor, merged: torch.Tensor
) -> tuple[float, float, float]:
    """(|W|^2, |Wq - W|^2, |merged - Wq|^2) in double: how far quantization moved a weight, against how far the
    merge moved it (for the merge report; the kernel computes the same sums)."""
    w, q, m = original.double(), quantized.double(), merged.double()
    return float((w * w).sum()), float(((q - w) ** 2).sum()), float(((m - q) ** 2).sum())


def quantization_error(t: TensorPlan, read_base: Reader, read_adapter: Reader) -> tuple[float, float, float]:
    """quantization_norms of one weight quantized as in training (`--trained-on`) with a LoRA delta."""
    assert t.quant is not None and t.quant.simulated and t.lora is not None and t.source is not None
    original = read_base(t.source)
    quantized = quantized_base(t, read_base).to(safetensors_to_torch_dtype(t.dtype))
    merged = merged_tensor(t, read_base, read_adapter, quantized.dtype, base=quantized.clone())
    return quantization_norms(original, quantized, merged)


def merged_tensor(
    t: TensorPlan,
    read_base: Reader,
    read_adapter: Reader,
    out_dtype: torch.dtype,
    device: torch.device | str = "cpu",
    base: torch.Tensor | None = None,
) -> torch.Tensor:
    """The merged value of one planned tensor on `device`; `base` when the caller has read the base value already."""
    if base is None and t.quant is not None and t.replacement is None:
        base = quantized_base(t, read_base).to(device)
    elif base is None and t.source is not None:
        base = read_base(t.source).to(device)
    return compute(t, base, read_adapter, out_dtype)


@one_thread
def merged_expert(t: TensorPlan, expert: int, w: torch.Tensor, factors: dict[str, torch.Tensor]) -> torch.Tensor:
    """Expert `expert` of a fused expert tensor merged: `w` (writable, (d1, d2), the merge dtype) plus the deltas PEFT
    adds to that expert (`factors`: the adapter tensors by key, as adapter_weight gives them)."""
    w3 = w.unsqueeze(0)
    for op in t.all_lora:
        a, b = factors[op.module.a_key], factors[op.module.b_key]
        if op.part is not None:
            if op.part.expert != expert:
                continue
            delta = torch.einsum("o r e, e r i -> e o i", b.unsqueeze(2), a.unsqueeze(0))[0] * op.scale.scale
            rows = slice(*op.part.rows) if op.part.rows is not None else slice(None)
            target = w[:, rows] if op.part.in_out else w[rows]
            target += (delta.T if op.part.in_out else delta).to(w.dtype)
            continue
        a3 = a.reshape(op.experts, -1, a.shape[-1])[expert : expert + 1]
        b3 = b.reshape(b.shape[0], -1, op.experts)[:, :, expert : expert + 1]
        equation = "o r e, e r i -> e i o" if op.transpose else "o r e, e r i -> e o i"
        delta = torch.einsum(equation, b3, a3) * op.scale.scale
        if w.dtype in (torch.float16, torch.bfloat16, torch.float32):
            w3 += delta.to(w.dtype)
        else:
            w3 += delta
    return w
