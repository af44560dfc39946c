"""Units in and out: byte sizes, dtypes, and how numbers are printed. One parser per unit.

* `parse_size`: ``"24GB"``, ``"512MiB"``, ``1_500_000_000`` -> bytes. Decimal units (KB, MB, GB, TB)
  are powers of 1000, binary ones (KiB, MiB, GiB, TiB) powers of 1024, as in accelerate and the SI.
* `parse_dtype`: ``"bf16"``, ``"bfloat16"``, ``"fp16"``, ``"float16"``, ``"fp32"``, ``"float32"`` or a
  torch dtype -> the torch dtype.
* `human_bytes` / `human_count`: ``1.5e9`` -> ``"1.50 GB"``; ``1234567`` -> ``"1.23 M"``.
"""

from __future__ import annotations

import re

import torch

_SIZE_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
               "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
_SIZE = re.compile(r"\s*(-?\d+(?:\.\d+)?)\s*([kmgt]?i?b)?\s*")

DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
          "half": torch.float16, "fp32": torch.float32, "float32": torch.float32, "float": torch.float32}


def parse_size(size: int | float | str, what: str = "size") -> int:
    """Bytes in ``size``: an int/float byte count or a string like ``"24GB"``, ``"1.5GiB"``, ``"500MB"``.

    Args:
        size: the value to read.
        what: named in error messages (a device, an option).

    Raises:
        ValueError: for negative, boolean or unreadable sizes.
    """
    if isinstance(size, bool):
        raise ValueError(f"{what}: size must be bytes or like '24GB', got {size!r}")
    if isinstance(size, (int, float)):
        value = float(size)
    else:
        match = _SIZE.fullmatch(str(size).lower())
        if not match or (match.group(2) or "b") not in _SIZE_UNITS:
            raise ValueError(f"{what}: cannot read size {size!r}; write it like 24GB, 512MiB or 1500000000")
        value = float(match.group(1)) * _SIZE_UNITS[match.group(2) or "b"]
    if value < 0:
        raise ValueError(f"{what}: size must not be negative, got {size!r}")
    return int(value)


def parse_dtype(dtype: torch.dtype | str, what: str = "dtype") -> torch.dtype:
    """A floating torch dtype from its short or long name (or the dtype itself).

    Raises:
        ValueError: for any other name or a non-floating dtype.
    """
    if isinstance(dtype, torch.dtype):
        if not dtype.is_floating_point:
            raise ValueError(f"{what}: expected a floating dtype, got {dtype}")
        return dtype
    if not isinstance(dtype, str) or dtype.lower().removeprefix("torch.") not in DTYPES:
        raise ValueError(f"{what}: unknown dtype {dtype!r}; use bf16, fp16 or fp32 (or bfloat16, float16, float32)")
    return DTYPES[dtype.lower().removeprefix("torch.")]


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"``."""
    return str(dtype).removeprefix("torch.")


def human_count(count: float) -> str:
    """1234567 -> '1.23 M'."""
    for threshold, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if count >= threshold:
            return f"{count / threshold:.2f} {suffix}"
    return f"{count:.0f}"


def human_bytes(size: float) -> str:
    """Decimal units: 1.5e9 -> '1.50 GB'."""
    for threshold, suffix in ((1e12, "TB"), (1e9, "GB"), (1e6, "MB"), (1e3, "KB")):
        if abs(size) >= threshold:
            return f"{size / threshold:.2f} {suffix}"
    return f"{size:.0f} B"
