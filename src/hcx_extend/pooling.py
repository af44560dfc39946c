"""Masked mean pooling over time, shared by the IMU encoder's stride and the ``avgpool`` compressor."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def masked_mean_pool(x: torch.Tensor, mask: torch.Tensor, stride: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Average every ``stride`` consecutive valid steps.

    x ``(batch, time, hidden)``, mask ``(batch, time)`` -> ``(batch, ceil(time / stride), hidden)`` and the
    pooled mask. A window's mean counts only its valid steps, so padding never leaks in.
    """
    batch, time, hidden = x.shape
    pad = (-time) % stride
    x = F.pad(x * mask[..., None], (0, 0, 0, pad))
    mask = F.pad(mask, (0, pad))
    sums = x.view(batch, -1, stride, hidden).sum(2)
    counts = mask.view(batch, -1, stride).sum(2)
    return sums / counts.clamp(min=1)[..., None].to(x.dtype), counts > 0
