"""Refuse adapter weights that hold NaN or Inf (a diverged training run).

Each floating tensor of a safetensors adapter is read in blocks of a few megabytes into one
reused buffer and counted by the C kernel (or torch where it is not built), so the check costs
no more memory than the merge itself, whatever the size of a saved tensor.
"""

from __future__ import annotations

import os

from ..adapter.adapter import Adapter
from ..errors import InputError
from ..formats.safetensors_file import DTYPE_BITS, FLOAT_DTYPES, read_into
from ..reporting import counted
from . import kernel

_BLOCK_BYTES = 4 << 20


def check_finite(adapter: Adapter) -> None:
    """Raise InputError naming the adapter tensors that hold NaN or Inf."""
    bad = []
    fd = os.open(adapter.weights_path, os.O_RDONLY) if adapter.is_safetensors else -1
    try:
        buffer = memoryview(bytearray(_BLOCK_BYTES)) if fd >= 0 else None
        for key, dtype in adapter.dtypes.items():
            if dtype not in FLOAT_DTYPES:
                continue
            count = (
                _count_in_file(adapter, fd, buffer, key, dtype)
                if buffer is not None
                else _count_in_memory(adapter, key)
            )
            if count:
                bad.append(f"{key} ({counted(count, 'value')})")
    finally:
        if fd >= 0:
            os.close(fd)
    if bad:
        raise InputError(
            f"{adapter.weights_path}: NaN or Inf in {counted(len(bad), 'adapter tensor')}: {', '.join(bad[:3])}"
            f"{', ...' if len(bad) > 3 else ''}; the adapter is broken (diverged training?). "
            "Pass [[allow_nonfinite=True]] to merge it anyway"
        )


def _count_in_file(adapter: Adapter, fd: int, buffer: memoryview, key: str, dtype: str) -> int:
    start, nbytes = adapter.tensor_offset(key), adapter.tensor_nbytes(key)
    step = len(buffer) - len(buffer) % (DTYPE_BITS[dtype] // 8)
    count = 0
    for offset in range(0, nbytes, step):
        block = buffer[: min(step, nbytes - offset)]
        read_into(fd, start + offset, block, f"{adapter.weights_path}: tensor {key!r}")
        found = kernel.count_nonfinite(block, dtype)
        count += found if found is not None else _count_with_torch(block, dtype)
    return count


def _count_with_torch(block: memoryview, dtype: str) -> int:
    import torch

    from ..formats.safetensors_file import safetensors_to_torch_dtype

    values = torch.frombuffer(block, dtype=safetensors_to_torch_dtype(dtype))
    return int(values.numel() - torch.isfinite(values).sum())


def _count_in_memory(adapter: Adapter, key: str) -> int:
    """A pickled adapter is in memory already."""
    import torch

    t = adapter.tensor(key)
    return int(t.numel() - torch.isfinite(t).sum())
