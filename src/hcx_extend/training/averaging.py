"""An exponential moving average of the trained weights (Polyak averaging), kept in float32.

After every optimiser step ``average <- d * average + (1 - d) * weights`` with
``d = min(decay, (1 + step) / (10 + step))``: early steps, whose weights are far from the final ones,
are forgotten quickly, later ones are averaged over about ``1 / (1 - decay)`` steps. On a few dozen
recordings one step's noise can move an answer across the decision boundary; the average does not
follow single steps. The trainer evaluates, keeps and returns the average; checkpoints store it next
to the weights under `PREFIX`, so a resumed run continues the same average.
"""

from __future__ import annotations

from typing import Iterable

import torch

PREFIX = "ema::"


class WeightAverage:
    """The running average of named parameters.

    Args:
        named: ``(name, parameter)`` pairs to average; the average starts at their current values.
        decay: the largest decay per step, in [0, 1).
    """

    def __init__(self, named: Iterable[tuple[str, torch.Tensor]], decay: float):
        self.decay = decay
        self.tensors = {name: p.detach().float().clone() for name, p in named}

    def update(self, named: Iterable[tuple[str, torch.Tensor]], step: int) -> None:
        """Fold in the weights after optimiser step ``step`` (counted from 0)."""
        decay = min(self.decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for name, parameter in named:
                self.tensors[name].lerp_(parameter.detach().float(), 1 - decay)

    def to_checkpoint(self) -> dict[str, torch.Tensor]:
        return {PREFIX + name: t.to("cpu").contiguous() for name, t in self.tensors.items()}

    def from_checkpoint(self, averaged: dict[str, torch.Tensor]) -> None:
        self.tensors = {name: averaged[name].float() for name in self.tensors}


def split_checkpoint(tensors: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """``(weights, averaged)``: a checkpoint's tensors with the averaged ones taken out (prefix removed)."""
    averaged = {name[len(PREFIX):]: t for name, t in tensors.items() if name.startswith(PREFIX)}
    return {name: t for name, t in tensors.items() if not name.startswith(PREFIX)}, averaged
