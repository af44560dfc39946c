"""BasicMotions (from the ``aeon`` package): the real IMU data of the demo.

A smartwatch's 3-axis accelerometer and 3-axis gyroscope sampled at 10 Hz while people stood,
walked, ran or played badminton: 40 training and 40 test recordings of 100 steps (10 s), ten per
activity. Shipped inside aeon, so it loads offline.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

ACTIVITIES = ("standing", "walking", "running", "badminton")
CHANNELS = ("acc_x", "acc_y", "acc_z", "gyro_x", "gyro_y", "gyro_z")
SAMPLE_RATE_HZ = 10.0
QUESTION = "What activity is the person doing? Answer with one word: standing, walking, running or badminton."


@dataclass
class Recordings:
    """Recordings ``(time, channels)`` float32 with one activity label each."""

    values: list[np.ndarray]
    labels: list[str]

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, indices) -> "Recordings":
        return Recordings([self.values[i] for i in indices], [self.labels[i] for i in indices])


def load_basic_motions(split: str) -> Recordings:
    """The ``"train"`` or ``"test"`` split."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    from aeon.datasets import load_basic_motions as aeon_load

    X, y = aeon_load(split=split)
    return Recordings([np.ascontiguousarray(x.T, dtype=np.float32) for x in X], [str(label) for label in y])


def stratified_split(recordings: Recordings, per_class: int, seed: int) -> tuple[Recordings, Recordings]:
    """Hold out ``per_class`` recordings of every label (chosen with ``seed``): ``(rest, held_out)``."""
    rng = np.random.default_rng(seed)
    held_out = []
    for label in sorted(set(recordings.labels)):
        members = [i for i, l in enumerate(recordings.labels) if l == label]
        if len(members) <= per_class:
            raise ValueError(f"label {label!r} has {len(members)} recordings; cannot hold out {per_class}")
        held_out.extend(rng.choice(members, size=per_class, replace=False).tolist())
    rest = [i for i in range(len(recordings)) if i not in set(held_out)]
    return recordings.subset(rest), recordings.subset(sorted(held_out))


def activity_chat(answer: str | None = None, marker: str = "<imu>", question: str = QUESTION) -> list[dict[str, str]]:
    """The demo's chat: ``"<imu> "`` + `QUESTION`, plus the answer when training."""
    messages = [{"role": "user", "content": f"{marker} {question}"}]
    if answer is not None:
        messages.append({"role": "assistant", "content": answer})
    return messages


def parse_activity(text: str) -> str:
    """Map a generated answer to an activity: the label it starts with, else ``"other"``."""
    cleaned = text.strip().lower().lstrip("\"' ").rstrip(".!\"' ")
    for activity in ACTIVITIES:
        if cleaned == activity or cleaned.startswith(activity):
            return activity
    return "other"
