"""Writing a llama.cpp GGUF LoRA file that plan/gguf.py planned: every tensor at PEFT's scale, checked to be finite.

Tensors go in llama.cpp's layout (the token embedding transposed, Q/K rows permuted as
convert_hf_to_gguf's LlamaModel does); the file carries `rslora_tools.version`, which marks it
as this tool's (what --overwrite may replace).
"""

from __future__ import annotations

import errno
import math
from pathlib import Path
from typing import Any

from .._version import __version__
from ..adapter.adapter import Adapter
from ..adapter.module_scales import ModuleEntry
from ..adapter.writer import count_nonfinite, nonfinite_error
from ..errors import MismatchError
from ..formats.output import GGUF_MARK
from ..plan.gguf import GgufPlan, gguf_module, head_counts, is_repo_id
from ..reporting import counted


def write_gguf(plan: GgufPlan, adapter: Adapter, path: Path, *, allow_nonfinite: bool = False) -> None:
    """Write the GGUF LoRA file `plan` describes (the caller makes it atomic); NaN or Inf in the alpha or a tensor
    is refused (adapter.writer.nonfinite_error) unless `allow_nonfinite`."""
    gguf = gguf_module()
    if not allow_nonfinite and not math.isfinite(plan.alpha):
        raise nonfinite_error(str(path), f"adapter.lora.alpha would be {plan.alpha}")
    writer = gguf.GGUFWriter(path, plan.architecture)
    writer.add_string(gguf.Keys.General.TYPE, gguf.GGUFType.ADAPTER)
    writer.add_name(plan.name)  # what llama.cpp's convert_lora_to_gguf.py writes as well
    if plan.base_model:
        writer.add_base_model_count(1)
        writer.add_base_model_name(0, plan.base_model)
        if is_repo_id(plan.base_model):
            writer.add_base_model_repo_url(0, f"https://huggingface.co/{plan.base_model}")
    writer.add_tags(list(plan.tags))
    writer.add_string(GGUF_MARK, __version__)  # what --overwrite may replace (formats.output.written_file)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, plan.alpha)
    for e, gguf_name, base_shape in plan.tensors:
        a, b = _lora_pair(adapter, e, base_shape, plan.factors.get(e.module.name, 1.0))
        if plan.permute_qk and gguf_name.endswith(("attn_q.weight", "attn_k.weight")):
            heads, kv = head_counts(plan.config)
            b = permute_rows(b, heads if gguf_name.endswith("attn_q.weight") else kv)
        for suffix, tensor in (("lora_a", a), ("lora_b", b)):
            bad = 0 if allow_nonfinite else count_nonfinite(tensor)
            if bad:
                raise nonfinite_error(
                    f"{gguf_name}.{suffix}",
                    f"{counted(bad, 'NaN or Inf value')} in the tensor computed for module {e.module.name!r}",
                )
            writer.add_tensor(f"{gguf_name}.{suffix}", tensor.numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    expected = writer.fout[0].tell()
    writer.close()
    written = path.stat().st_size
    if written != expected:  # the gguf writer can lose a failed write (a full disk) without an error
        raise OSError(errno.ENOSPC, f"only {written} of {expected} bytes reached the disk (is it full?)", str(path))


def _lora_pair(adapter: Adapter, e: ModuleEntry, base_shape: tuple[int, ...], factor: float) -> tuple[Any, Any]:
    """llama.cpp's lora_a and lora_b for one module (numpy order), float32, the factor in B's side.

    A linear layer's weight is [n_out, n_in] and llama.cpp adds b @ a with a [r, n_in], b [n_out, r]:
    PEFT's A and B as they are. For the token embedding llama.cpp takes rows of a for the input
    tokens and multiplies them by b (ggml ne (r, vocab) and (r, dim)): a = A^T [vocab, r] and
    b = B [dim, r], whose delta a @ b^T is PEFT's (B @ A)^T over the [vocab, dim] table.
    """
    import torch

    a = adapter.tensor(e.module.a_key).to(torch.float32)
    b = adapter.tensor(e.module.b_key).to(torch.float32)
    if factor != 1.0:
        b = b * factor
    if e.module.embedding:  # PEFT: A [r, vocab], B [dim, r]
        a = a.T
        fits = (a.shape[0], b.shape[0]) == tuple(base_shape)
        delta_shape = [a.shape[0], b.shape[0]]
    else:
        fits = (b.shape[0], a.shape[1]) == tuple(base_shape)
        delta_shape = [b.shape[0], a.shape[1]]
    if not fits:
        raise MismatchError(
            f"{adapter.path}: module {e.module.name!r}: LoRA delta {delta_shape} does not fit the base "
            f"weight {list(base_shape)}"
        )
    return a.contiguous(), b.contiguous()


def permute_rows(w: Any, n_head: int) -> Any:
    """convert_hf_to_gguf's LlamaModel.permute on the output rows (rotary halves interleaved)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape).contiguous()
