"""Training settings that must follow the data: batch size, epochs, the sensor stride, the answer set.

A user's data is small and unlike ours: 2 to 10 classes, 5 to 30 recordings each, 1 to 12 channels,
7 to thousands of steps. Settings that suit 40 BasicMotions recordings of 100 steps would train 10
recordings for too few steps, or give a 1,000-step recording 1,000 LLM tokens. So `train` derives
these from the data (each unless the user set it) and logs each choice with its reason:

* batch size: about 8 steps per epoch, between 2 and 8 examples (``n // 8``);
* epochs: enough to show the model about `TARGET_SAMPLES` examples in all (each epoch draws fresh
  variations of every recording, so repeated epochs are not repeated data), at least 3 and at most 60;
* stride of a sensor encoder (steps averaged into one LLM token): the median recording gives about
  `TARGET_TOKENS` tokens;
* the answer set: when the training answers are a few labels, each repeated, they form a closed set, and
  evaluation scores each label by its likelihood (`hcx_extend.evaluation.score_choices`).
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from hcx_extend.data.examples import Example

# The demo's scale, where 10 epochs of 64 examples (640 seen) reached 100 % validation accuracy.
TARGET_SAMPLES = 640
# BasicMotions' 100 steps in 25 tokens: enough for the LLM's attention to see the motion's rhythm.
TARGET_TOKENS = 25
MAX_CHOICES = 20


@dataclass(frozen=True)
class Derived:
    """A derived setting and why it was chosen (printed in the run's log)."""

    value: object
    reason: str


def derive_batch_size(examples: int) -> Derived:
    size = min(8, max(2, examples // 8))
    return Derived(size, f"{examples} training examples: about 8 steps per epoch (batch between 2 and 8)")


def derive_epochs(examples: int) -> Derived:
    epochs = min(60, max(3, math.ceil(TARGET_SAMPLES / examples)))
    return Derived(epochs, f"{examples} training examples: about {TARGET_SAMPLES} seen in all "
                           f"({epochs} x {examples} = {epochs * examples}; at least 3 epochs, at most 60)")


def derive_stride(lengths: Sequence[int]) -> Derived:
    median = int(np.median(lengths))
    stride = max(1, math.ceil(median / TARGET_TOKENS))
    return Derived(stride, f"median recording {median} steps: {stride} steps per token gives "
                           f"{math.ceil(median / stride)} tokens (target {TARGET_TOKENS})")


def derive_choices(examples: Sequence[Example]) -> Derived:
    """The closed answer set, or None when the answers are free text."""
    counts = Counter(e.answer for e in examples if e.answer is not None)
    if 2 <= len(counts) <= MAX_CHOICES and min(counts.values()) >= 2:
        return Derived(sorted(counts), f"{len(counts)} distinct answers, each at least twice: a closed set, "
                                       "scored by each answer's likelihood")
    return Derived(None, f"{len(counts)} distinct answers: free text, scored by answer loss")
