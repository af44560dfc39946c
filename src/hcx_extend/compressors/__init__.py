"""Token compressors: shorten a modality's embedding stream before it reaches the LLM.

A modality opts in with ``compressor: {"type": ..., "chunk_size": ...}``. Compressors run between
the projector and the splice on a padded batch ``(items, tokens, hidden)`` with ``lengths`` and
return ``(items, compressed_tokens, hidden)`` with new lengths; `compressed_length` tells the
processor how many placeholder tokens to emit.

Built in: ``none`` (identity), ``avgpool`` (mean of each chunk of ``chunk_size`` tokens, padding
excluded) and ``mambamia`` (the Omni model's learned-query Mamba2 compressor, `compressors.mambamia`).
Register more with `register_compressor`.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch
from torch import nn

from hcx_extend.encoders.imu import masked_mean_pool

CompressorBuilder = Callable[[dict[str, Any], int], nn.Module]


class IdentityCompressor(nn.Module):
    """Leaves the stream as it is: ``compressed_length(n) == n``."""

    def compressed_length(self, length: int) -> int:
        return length

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return x, lengths


class AvgPoolCompressor(nn.Module):
    """Mean over each chunk of ``chunk_size`` tokens: ``(items, T, hidden) -> (items, ceil(T / chunk), hidden)``."""

    def __init__(self, chunk_size: int):
        super().__init__()
        self.chunk_size = check_chunk_size(chunk_size)

    def compressed_length(self, length: int) -> int:
        return math.ceil(length / self.chunk_size)

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mask = torch.arange(x.shape[1], device=x.device)[None, :] < lengths.to(x.device)[:, None]
        pooled, pooled_mask = masked_mean_pool(x, mask, self.chunk_size)
        return pooled, pooled_mask.sum(1)


def check_chunk_size(chunk_size: Any) -> int:
    if not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size < 1:
        raise ValueError(f"compressor: chunk_size must be an integer >= 1, got {chunk_size!r}")
    return chunk_size


def _build_mambamia(spec: dict[str, Any], hidden_size: int) -> nn.Module:
    # Imported on use: mambamia imports check_chunk_size from this module.
    from hcx_extend.compressors.mambamia import build_mambamia

    return build_mambamia(spec, hidden_size)


_REGISTRY: dict[str, CompressorBuilder] = {
    "none": lambda spec, hidden: IdentityCompressor(),
    "avgpool": lambda spec, hidden: AvgPoolCompressor(spec.get("chunk_size", 25)),
    "mambamia": _build_mambamia,
}


def register_compressor(name: str, builder: CompressorBuilder, *, replace: bool = False) -> None:
    if name in _REGISTRY and not replace:
        raise ValueError(f"compressor type {name!r} is already registered; pass replace=True to override it")
    _REGISTRY[name] = builder


def build_compressor(spec: dict[str, Any], hidden_size: int) -> nn.Module:
    """A new compressor for a modality's ``compressor`` dict, working at ``hidden_size`` (the LLM width)."""
    kind = spec.get("type")
    if kind not in _REGISTRY:
        raise ValueError(f"unknown compressor type {kind!r}; registered: {sorted(_REGISTRY)}")
    return _REGISTRY[kind](spec, hidden_size)
