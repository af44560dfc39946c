"""The long-sequence task: list the activities of a long IMU stream in order.

A stream is 4 to 16 BasicMotions recordings (10 s, 100 steps each) joined end to end: 40 s to
160 s, 400 to 1600 steps of 6 channels at 10 Hz. Neighbouring recordings always show different
activities, so every recording is one segment and the answer has one entry per recording::

    user:      <imu> List the activities in order.
    assistant: walking, running, standing, badminton

Streams are drawn with a seed from a pool of recordings: training streams from the train split
(minus held-out recordings, which make the validation streams), test streams from the test split,
so no recording is ever shared between training, validation and test. Scoring is exact match of
the whole list, plus the activity error rate (edit distance / reference length, as a word error
rate) as a finer measure.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from hcx_extend.data.basic_motions import Recordings, load_basic_motions, stratified_split

QUESTION = "List the activities in order."
MIN_RECORDINGS, MAX_RECORDINGS = 4, 16


@dataclass
class Stream:
    """One long recording: ``values (time, channels)`` float32, its activities in order and where they came from.

    ``sources[i]`` is the index, in the pool the stream was drawn from, of the recording that fills
    segment ``i``; ``boundaries[i]`` is the step where segment ``i`` starts.
    """

    values: np.ndarray
    labels: list[str]
    sources: list[int]
    boundaries: list[int]

    @property
    def answer(self) -> str:
        return ", ".join(self.labels)


def make_streams(
    pool: Recordings,
    count: int,
    seed: int,
    min_recordings: int = MIN_RECORDINGS,
    max_recordings: int = MAX_RECORDINGS,
) -> list[Stream]:
    """Draw ``count`` streams from ``pool``.

    Each stream takes a number of recordings uniform in ``[min_recordings, max_recordings]``; each
    segment's activity is uniform over the activities other than the previous segment's, and its
    recording uniform over the pool's recordings of that activity (a recording may recur, in
    other streams or, for long streams from a small pool, in the same one).

    Raises:
        ValueError: ``count < 0``, bad bounds, or a pool with fewer than two activities.
    """
    if count < 0:
        raise ValueError(f"count must be >= 0, got {count}")
    if not 1 <= min_recordings <= max_recordings:
        raise ValueError(f"need 1 <= min_recordings <= max_recordings, got {min_recordings} and {max_recordings}")
    by_activity: dict[str, list[int]] = {}
    for index, label in enumerate(pool.labels):
        by_activity.setdefault(label, []).append(index)
    activities = sorted(by_activity)
    if len(activities) < 2:
        raise ValueError(f"the pool holds activities {activities}; neighbouring segments must differ, so it needs two")
    rng = np.random.default_rng(seed)
    streams = []
    for _ in range(count):
        size = int(rng.integers(min_recordings, max_recordings + 1))
        labels: list[str] = []
        sources: list[int] = []
        for _ in range(size):
            choices = [a for a in activities if not labels or a != labels[-1]]
            label = choices[int(rng.integers(len(choices)))]
            labels.append(label)
            sources.append(by_activity[label][int(rng.integers(len(by_activity[label])))])
        parts = [pool.values[i] for i in sources]
        boundaries = np.cumsum([0] + [len(p) for p in parts[:-1]]).tolist()
        streams.append(Stream(np.concatenate(parts).astype(np.float32), labels, sources, boundaries))
    return streams


def sequence_chat(answer: str | None = None, marker: str = "<imu>", question: str = QUESTION) -> list[dict[str, str]]:
    """``"<imu> List the activities in order."``, plus the answer when training."""
    messages = [{"role": "user", "content": f"{marker} {question}"}]
    if answer is not None:
        messages.append({"role": "assistant", "content": answer})
    return messages


def parse_activity_list(text: str) -> list[str]:
    """``"Walking, running and standing."`` -> ``["walking", "running", "standing"]``.

    Entries are separated by commas, "and", "then" or new lines; an entry that is not an activity
    name is kept as written (lower-cased) so it counts as an error rather than vanishing.
    """
    entries = re.split(r",|\n|;|\band\b|\bthen\b", text.lower())
    cleaned = [entry.strip().strip(".!\"' ") for entry in entries]
    return [entry for entry in cleaned if entry]


def edit_distance(a: list[str], b: list[str]) -> int:
    """Levenshtein distance between two lists (insertions, deletions, substitutions each cost 1)."""
    previous = list(range(len(b) + 1))
    for i, item in enumerate(a, start=1):
        current = [i]
        for j, other in enumerate(b, start=1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (item != other)))
        previous = current
    return previous[-1]


def score_answers(answers: list[str], streams: list[Stream]) -> dict[str, float]:
    """``exact_match``: share of answers whose parsed list equals the labels; ``activity_error_rate``:
    total edit distance over total reference length.

    Raises:
        ValueError: a different number of answers and streams.
    """
    if len(answers) != len(streams):
        raise ValueError(f"got {len(answers)} answers for {len(streams)} streams; give one answer per stream")
    if not streams:
        raise ValueError("no streams to score")
    parsed = [parse_activity_list(a) for a in answers]
    exact = sum(p == s.labels for p, s in zip(parsed, streams)) / len(streams)
    errors = sum(edit_distance(p, s.labels) for p, s in zip(parsed, streams))
    return {"exact_match": exact, "activity_error_rate": errors / sum(len(s.labels) for s in streams)}


@dataclass
class SequenceSplits:
    """Streams for training, validation and test, and the recordings they were drawn from.

    ``train_pool`` and ``validation_pool`` partition the BasicMotions train split (``per_class``
    recordings of every activity held out for validation); ``test_pool`` is the test split.
    """

    train: list[Stream]
    validation: list[Stream]
    test: list[Stream]
    train_pool: Recordings
    validation_pool: Recordings
    test_pool: Recordings


def sequence_splits(seed: int, train: int, validation: int, test: int, per_class: int = 2) -> SequenceSplits:
    """Load BasicMotions and draw the three sets of streams (each with its own seed derived from ``seed``)."""
    train_all, test_pool = load_basic_motions("train"), load_basic_motions("test")
    train_pool, validation_pool = stratified_split(train_all, per_class=per_class, seed=seed)
    return SequenceSplits(
        train=make_streams(train_pool, train, seed=seed * 3 + 1),
        validation=make_streams(validation_pool, validation, seed=seed * 3 + 2),
        test=make_streams(test_pool, test, seed=seed * 3 + 3),
        train_pool=train_pool,
        validation_pool=validation_pool,
        test_pool=test_pool,
    )
