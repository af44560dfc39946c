"""Label-preserving variations of sensor recordings: a random contiguous crop (the activity is the same
over the whole window), every channel scaled by a factor drawn around 1, and Gaussian noise relative
to each channel's spread. Recordings stay ``(time, channels)`` float32.

Two ways to use them:

* `example_variations`: a fresh variation of every training example in every epoch (the trainer's
  ``vary`` hook draws it with a generator seeded by seed, epoch and example, so a resumed run sees the
  same ones). What the demo and ``train`` do.
* `augment_recordings`: the originals followed by ``copies`` variations of each, drawn once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from hcx_extend.data.examples import Example


@dataclass(frozen=True)
class Augmentation:
    """How to vary a recording.

    Args:
        copies: variations made of each recording by `augment_recordings` (0 = none).
        crop: the smallest fraction of the steps a crop keeps, in (0, 1]; each crop keeps a fraction
            drawn uniformly from ``[crop, 1]`` (1 = no cropping).
        scale: channels are multiplied by a factor uniform in ``[1 - scale, 1 + scale]``.
        noise: Gaussian noise with this fraction of each channel's standard deviation.
    """

    copies: int = 0
    crop: float = 1.0
    scale: float = 0.0
    noise: float = 0.0

    def __post_init__(self):
        if not isinstance(self.copies, int) or self.copies < 0:
            raise ValueError(f"augmentation copies must be an integer >= 0, got {self.copies!r}")
        if not 0 < self.crop <= 1:
            raise ValueError(f"augmentation crop must be in (0, 1], got {self.crop!r}")
        if not 0 <= self.scale < 1 or self.noise < 0:
            raise ValueError(f"augmentation scale must be in [0, 1) and noise >= 0, got {self.scale!r}, {self.noise!r}")


# The variation drawn for every training recording in every epoch by the demo and ``train``: a crop keeping
# 80-100 % of the steps, channels scaled by up to 10 %, noise at 5 % of each channel's spread.
EPOCH_VARIATIONS = Augmentation(crop=0.8, scale=0.1, noise=0.05)


def vary(values: np.ndarray, augmentation: Augmentation, rng: np.random.Generator) -> np.ndarray:
    """One variation of a ``(time, channels)`` recording."""
    steps, channels = values.shape
    length = max(1, round(steps * rng.uniform(augmentation.crop, 1.0)))
    start = int(rng.integers(0, steps - length + 1))
    out = values[start:start + length].astype(np.float64)
    if augmentation.scale:
        out = out * rng.uniform(1 - augmentation.scale, 1 + augmentation.scale, size=(1, channels))
    if augmentation.noise:
        out = out + rng.normal(size=out.shape) * augmentation.noise * values.std(axis=0, keepdims=True)
    return out.astype(np.float32)


def augment_recordings(values: Sequence[np.ndarray], labels: Sequence[str], augmentation: Augmentation,
                       seed: int) -> tuple[list[np.ndarray], list[str]]:
    """The recordings and labels followed by ``augmentation.copies`` variations of each, drawn with ``seed``."""
    rng = np.random.default_rng(seed)
    out_values, out_labels = list(values), list(labels)
    for _ in range(augmentation.copies):
        for recording, label in zip(values, labels):
            out_values.append(vary(recording, augmentation, rng))
            out_labels.append(label)
    return out_values, out_labels


def example_variations(augmentation: Augmentation, modalities: Sequence[str]):
    """The trainer's ``vary`` hook: an `Example` with each 2-D item of ``modalities`` replaced by a variation."""
    names = set(modalities)

    def draw(example: Example, rng: np.random.Generator) -> Example:
        inputs = {name: [vary(np.asarray(item), augmentation, rng) if name in names and np.ndim(item) == 2 else item
                         for item in items]
                  for name, items in example.inputs.items()}
        return Example(example.messages, inputs)

    return draw
