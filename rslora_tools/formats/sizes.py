"""Byte sizes as people write them ("5GB", "2GiB") and as the tool prints them.

Decimal units, like transformers' `max_shard_size` and the Hub: 5GB is 5e9 bytes; binary units
need the "i" (2GiB = 2 * 2**30 bytes).
"""

from __future__ import annotations

import re

_UNITS = {
    "": 1,
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
    "TIB": 2**40,
}


def parse_size(text: str | int) -> int:
    """Parse an HF-style size: decimal units ("5GB" = 5e9 bytes), binary with "GiB", or plain bytes."""
    if isinstance(text, bool) or (isinstance(text, int) and text <= 0):
        raise ValueError(f"invalid size {text!r}; it must be a positive number of bytes")
    if isinstance(text, int):
        return text
    if not isinstance(text, str):
        raise ValueError(f"invalid size {text!r}; use a number of bytes or a size like 500MB, 5GB, 2GiB")
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B?)\s*", text.upper())
    if not m or m.group(2) not in _UNITS:
        raise ValueError(f"invalid size {text!r}; use a number of bytes or a size like 500MB, 5GB, 2GiB")
    value = int(float(m.group(1)) * _UNITS[m.group(2)])
    if value <= 0:
        raise ValueError(f"invalid size {text!r}; it must be positive")
    return value


def human_size(n: float) -> str:
    """1234567 -> '1.2 MB' (decimal units, like the Hub and transformers)."""
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n} B"
