"""The extension guide's IMU encoder exactly as written, registered as ``imu_guide``: a baseline.

``(batch, time, channels)`` -> ``Conv1d(channels, 256, 3, padding=1)`` over time ->
``nn.TransformerEncoder(nn.TransformerEncoderLayer(d_model=256, nhead=8), num_layers=4)`` with
PyTorch's defaults (``batch_first=False``, feed-forward 2048, dropout 0.1, ReLU, post-norm) and no
positional encoding -> ``Linear(256, 1280)``; one token per time step.

It has no padding mask: in a batch of different lengths, padding leaks into every item's attention.
Use it only to reproduce the guide's numbers (benchmarks/imu_time_to_accuracy.py); use ``imu``
otherwise. Its attention is one fused ``in_proj_weight``, so LoRA on ``q_proj``/``v_proj`` finds nothing.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from hcx_extend.config import InputContract
from hcx_extend.encoders.imu import IMUModalityEncoder

GUIDE_DEFAULTS: dict[str, Any] = {"in_channels": 6, "hidden_size": 256, "num_heads": 8, "num_layers": 4,
                                  "output_size": 1280, "max_length": 8192}


class GuideIMUEncoder(nn.Module):
    def __init__(self, in_channels: int = 6, hidden_size: int = 256, num_heads: int = 8, num_layers: int = 4,
                 output_size: int = 1280):
        super().__init__()
        self.conv1d = nn.Conv1d(in_channels, hidden_size, kernel_size=3, padding=1)
        self.transformer = nn.TransformerEncoder(nn.TransformerEncoderLayer(d_model=hidden_size, nhead=num_heads),
                                                 num_layers=num_layers, enable_nested_tensor=False)
        self.output_proj = nn.Linear(hidden_size, output_size)

    def forward(self, values: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.conv1d(values.transpose(1, 2))  # (batch, hidden, time)
        x = self.transformer(x.permute(2, 0, 1))  # (time, batch, hidden): the guide's batch_first=False
        return self.output_proj(x.transpose(0, 1)), lengths


class GuideIMUModalityEncoder(IMUModalityEncoder):
    """Same items and batches as ``imu``; no stride, so one token per step."""

    @staticmethod
    def settings(config: dict[str, Any]) -> dict[str, Any]:
        unknown = set(config) - set(GUIDE_DEFAULTS) - {"model_type"}
        if unknown:
            raise ValueError(f"imu_guide encoder: unknown settings {sorted(unknown)}; known: {sorted(GUIDE_DEFAULTS)}")
        settings = {**GUIDE_DEFAULTS, **{k: v for k, v in config.items() if k != "model_type"}, "stride": 1}
        for key in GUIDE_DEFAULTS:
            value = settings[key]
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"imu_guide encoder: {key} must be a positive integer, got {value!r}")
        if settings["hidden_size"] % settings["num_heads"]:
            raise ValueError(f"imu_guide encoder: hidden_size {settings['hidden_size']} is not divisible by num_heads "
                             f"{settings['num_heads']}")
        return settings

    def build(self, config: dict[str, Any]) -> nn.Module:
        settings = self.settings(config)
        return GuideIMUEncoder(settings["in_channels"], settings["hidden_size"], settings["num_heads"],
                               settings["num_layers"], settings["output_size"])

    def default_contract(self, config: dict[str, Any]) -> InputContract:
        settings = self.settings(config)
        return InputContract(kind="sensor", channels=settings["in_channels"], max_length=settings["max_length"])
