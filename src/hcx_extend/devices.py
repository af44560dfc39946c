"""Where tensors go: naming a device, and moving nested batches to it."""

from __future__ import annotations

from typing import Any

import torch


def resolve_device(device: torch.device | str) -> torch.device:
    """``"auto"`` -> the first CUDA device if there is one, else the CPU; other names as torch reads them.

    Raises:
        ValueError: an unknown device name, or a CUDA device on a machine without one.
    """
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"unknown device {device!r}; use cpu, cuda, cuda:N or auto") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} asked for, but this machine has no CUDA device; use cpu or auto")
    return resolved


def move_to_device(value: Any, device: torch.device) -> Any:
    """``value`` with every tensor inside it (nested dicts, lists, tuples) on ``device``."""
    if isinstance(value, torch.Tensor):
        return value.to(device, non_blocking=True)
    if isinstance(value, dict):
        return {key: move_to_device(item, device) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(move_to_device(item, device) for item in value)
    return value
