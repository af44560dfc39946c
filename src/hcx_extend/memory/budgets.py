"""Memory budgets per device: ``{"cuda:0": "24GB", "cpu": "64GB", "disk": "500GB"}`` -> bytes, fastest first."""

from __future__ import annotations

import re
from typing import Iterable

from hcx_extend.units import parse_size

_DEVICE = re.compile(r"cuda:(\d+)|cpu|disk")


def parse_budgets(budgets: dict[str, int | float | str] | Iterable[str]) -> dict[str, int]:
    """Budgets as ``{device: bytes}``, ordered fastest first (cuda:0, cuda:1, ..., cpu, disk).

    Accepts a dict or ``"DEVICE=SIZE"`` strings; sizes in B/KB/MB/GB/TB (powers of 1000) or
    KiB/MiB/GiB/TiB, or plain byte counts.

    Raises:
        ValueError: unknown devices, repeated devices, bad sizes or no budget at all.
    """
    if not isinstance(budgets, dict):
        pairs = {}
        for entry in budgets:
            device, separator, size = str(entry).partition("=")
            if not separator:
                raise ValueError(f"budget {entry!r} is not DEVICE=SIZE (e.g. cuda:0=24GB, cpu=64GB, disk=500GB)")
            device = device.strip()
            if device in pairs:
                raise ValueError(f"device {device!r} has two budgets; give each device once")
            pairs[device] = size
        budgets = pairs
    parsed = {}
    for device, size in budgets.items():
        device = "cuda:0" if device == "cuda" else device
        if not _DEVICE.fullmatch(device):
            raise ValueError(f"unknown device {device!r} in the budgets; use cuda:N, cpu or disk")
        parsed[device] = parse_size(size, device)
    if not parsed:
        raise ValueError("no budgets given; pass e.g. cuda:0=24GB cpu=64GB disk=500GB")
    return dict(sorted(parsed.items(), key=lambda item: device_rank(item[0])))


def device_rank(device: str) -> tuple[int, int]:
    """Sort key: accelerators by index, then the CPU, then the disk."""
    if device.startswith("cuda:"):
        return 0, int(device.split(":")[1])
    return (1, 0) if device == "cpu" else (2, 0)


def accelerate_device(device: str) -> int | str:
    """Our device names as accelerate's device map writes them: ``cuda:1`` -> 1; cpu/disk unchanged."""
    return int(device.split(":")[1]) if device.startswith("cuda:") else device
