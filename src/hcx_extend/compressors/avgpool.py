"""The ``avgpool`` compressor: the mean of each chunk of ``chunk_size`` tokens, padding excluded."""

from __future__ import annotations

import torch
from torch import nn

from hcx_extend.pooling import masked_mean_pool


class AvgPoolCompressor(nn.Module):
    """``(items, T, hidden)`` with lengths -> ``(items, ceil(T / chunk_size), hidden)`` and new lengths.

    Args:
        chunk_size: tokens averaged into one (a positive integer; checked by the registry).
    """

    def __init__(self, chunk_size: int):
        super().__init__()
        self.chunk_size = chunk_size

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mask = torch.arange(x.shape[1], device=x.device)[None, :] < lengths.to(x.device)[:, None]
        pooled, pooled_mask = masked_mean_pool(x, mask, self.chunk_size)
        return pooled, pooled_mask.sum(1)


class IdentityCompressor(nn.Module):
    """The ``none`` compressor: leaves the stream as it is."""

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return x, lengths
