"""`Workload`: the sizes of one training step or one prefill, as the memory estimator and planner read them."""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Workload:
    """What one training step (or one prefill) processes.

    Args:
        batch: sequences per step.
        seq: LLM tokens per sequence, modality placeholders included.
        image_size: side in pixels of the one image each sequence holds (vision encoders).
        audio_frames: mel frames of the one audio clip per sequence; None = the encoder's full window
            (Qwen2-Audio always runs on its padded 30 s window, so this changes only the token count).
        sensor_steps: time steps of the one sensor recording per sequence.
        label_fraction: share of positions that carry a label (the trainer computes logits only there).
    """

    batch: int = 1
    seq: int = 2048
    image_size: int = 448
    audio_frames: int | None = None
    sensor_steps: int = 100
    label_fraction: float = 1.0

    def __post_init__(self):
        for name in ("batch", "seq", "image_size", "sensor_steps"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"workload: {name} must be a positive integer, got {value!r}")
        if self.audio_frames is not None and (not isinstance(self.audio_frames, int) or self.audio_frames < 1):
            raise ValueError(f"workload: audio_frames must be a positive integer or None, got {self.audio_frames!r}")
        if not 0 < self.label_fraction <= 1:
            raise ValueError(f"workload: label_fraction must be in (0, 1], got {self.label_fraction!r}")

    @property
    def labelled_positions(self) -> int:
        """Positions per sequence whose logits are computed (the last position never has a target)."""
        return max(1, math.floor((self.seq - 1) * self.label_fraction))

    def item_size(self, kind: str) -> int | None:
        """The size of one item of an input kind, in that kind's unit (`ModalityEncoder.example_batch`):
        image side in pixels, audio mel frames (None: the full window), sensor time steps. Kinds that
        users register are given ``sensor_steps``."""
        return {"image": self.image_size, "audio": self.audio_frames}.get(kind, self.sensor_steps)
