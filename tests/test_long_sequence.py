"""The long-sequence task: streams of concatenated BasicMotions recordings, and exact-match scoring."""

import numpy as np
import pytest

from hcx_extend.data.basic_motions import ACTIVITIES, Recordings
from hcx_extend.data.long_sequence import (
    QUESTION,
    edit_distance,
    make_streams,
    parse_activity_list,
    score_answers,
    sequence_chat,
    sequence_splits,
)


@pytest.fixture(scope="module")
def splits():
    return sequence_splits(seed=0, train=60, validation=12, test=40)


def same_recording(a: np.ndarray, b: np.ndarray) -> bool:
    return a.shape == b.shape and np.array_equal(a, b)


def test_a_stream_is_its_recordings_joined_in_the_order_of_its_labels(splits):
    pool = splits.train_pool
    for stream in splits.train:
        assert len(stream.labels) == len(stream.sources) == len(stream.boundaries)
        assert stream.answer == ", ".join(stream.labels)
        expected = np.concatenate([pool.values[i] for i in stream.sources])
        assert np.array_equal(stream.values, expected)
        assert stream.values.dtype == np.float32 and stream.values.shape[1] == 6
        for label, source, start in zip(stream.labels, stream.sources, stream.boundaries):
            assert pool.labels[source] == label
            assert same_recording(stream.values[start:start + 100], pool.values[source])


def test_streams_hold_4_to_16_recordings_400_to_1600_steps_and_no_repeated_neighbours(splits):
    for stream in splits.train + splits.validation + splits.test:
        assert 4 <= len(stream.labels) <= 16
        assert 400 <= len(stream.values) <= 1600 and len(stream.values) == 100 * len(stream.labels)
        assert all(a != b for a, b in zip(stream.labels, stream.labels[1:]))
        assert set(stream.labels) <= set(ACTIVITIES)
    sizes = [len(s.labels) for s in splits.train]
    assert min(sizes) <= 5 and max(sizes) >= 15  # the whole range is drawn, not one length


def test_training_validation_and_test_streams_share_no_recording(splits):
    train_pool, validation_pool, test_pool = splits.train_pool, splits.validation_pool, splits.test_pool
    assert len(train_pool) == 32 and len(validation_pool) == 8 and len(test_pool) == 40
    for held_out in validation_pool.values:
        assert not any(same_recording(held_out, r) for r in train_pool.values)
    for tested in test_pool.values:
        assert not any(same_recording(tested, r) for r in train_pool.values + validation_pool.values)
    # Each set draws only from its own pool.
    for streams, pool in ((splits.train, train_pool), (splits.validation, validation_pool), (splits.test, test_pool)):
        for stream in streams:
            for source, start in zip(stream.sources, stream.boundaries):
                assert same_recording(stream.values[start:start + 100], pool.values[source])


def test_generation_is_seeded():
    pool = Recordings([np.full((100, 6), i, dtype=np.float32) for i in range(8)], list(ACTIVITIES) * 2)
    first, again, other = make_streams(pool, 5, seed=7), make_streams(pool, 5, seed=7), make_streams(pool, 5, seed=8)
    assert [s.labels for s in first] == [s.labels for s in again]
    assert all(np.array_equal(a.values, b.values) for a, b in zip(first, again))
    assert [s.labels for s in first] != [s.labels for s in other]


def test_bad_stream_settings_raise():
    pool = Recordings([np.zeros((100, 6), dtype=np.float32)] * 2, ["walking", "walking"])
    with pytest.raises(ValueError, match="needs two"):
        make_streams(pool, 1, seed=0)
    with pytest.raises(ValueError, match="min_recordings <= max_recordings"):
        make_streams(pool, 1, seed=0, min_recordings=5, max_recordings=4)


def test_the_chat_asks_for_the_list_and_answers_with_it():
    assert sequence_chat() == [{"role": "user", "content": f"<imu> {QUESTION}"}]
    assert sequence_chat("walking, running")[-1] == {"role": "assistant", "content": "walking, running"}


def test_answers_are_parsed_into_activity_lists():
    assert parse_activity_list("walking, running, standing") == ["walking", "running", "standing"]
    assert parse_activity_list(" Walking, running and standing.") == ["walking", "running", "standing"]
    assert parse_activity_list("badminton\nwalking") == ["badminton", "walking"]
    assert parse_activity_list("walking, jumping") == ["walking", "jumping"]  # unknown entries stay, as errors
    assert parse_activity_list("") == []


def test_exact_match_needs_the_whole_list_in_order():
    pool = Recordings([np.zeros((100, 6), dtype=np.float32)] * 4, list(ACTIVITIES))
    streams = make_streams(pool, 4, seed=0, min_recordings=3, max_recordings=3)
    right = [s.answer for s in streams]
    assert score_answers(right, streams) == {"exact_match": 1.0, "activity_error_rate": 0.0}
    wrong = list(right)
    wrong[0] = ", ".join(streams[0].labels[:-1])  # one activity missing: 1 error
    middle = next(a for a in ACTIVITIES if a != streams[1].labels[1])
    wrong[1] = ", ".join([streams[1].labels[0], middle, streams[1].labels[2]])  # one substituted: 1 error
    a, b, c = streams[2].labels
    wrong[2] = ", ".join([b, a, c])  # order matters: two neighbours swapped = 2 substitutions
    scores = score_answers(wrong, streams)
    assert scores["exact_match"] == 0.25
    assert scores["activity_error_rate"] == pytest.approx((1 + 1 + 2) / 12)
    assert score_answers([r.upper() + "." for r in right], streams)["exact_match"] == 1.0
    with pytest.raises(ValueError, match="got 3 answers for 4 streams"):
        score_answers(right[:3], streams)


def test_edit_distance_counts_insertions_deletions_and_substitutions():
    assert edit_distance(["a", "b", "c"], ["a", "b", "c"]) == 0
    assert edit_distance(["a", "c"], ["a", "b", "c"]) == 1
    assert edit_distance(["a", "x", "c", "d"], ["a", "b", "c"]) == 2
    assert edit_distance([], ["a", "b"]) == 2


def test_the_sequence_demo_runs_end_to_end_and_writes_its_run_folder(tmp_path):
    """One short epoch on the real LLM: metrics, plot and a checkpoint that loads back with its compressor."""
    import json

    from hcx_extend.runs import load_model
    from hcx_extend.recipes.sequence import train_and_test

    settings = {"train_streams": 4, "short_streams": 0, "validation_streams": 2, "test_streams": 2, "epochs": 1,
                "batch_size": 4}
    metrics = train_and_test("mambamia", seed=1, settings=settings, run=tmp_path, log=lambda line: None)
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["test_streams"] == 2 and saved["steps"] == 1
    assert 0.0 <= saved["test_exact_match"] <= 1.0 and saved["test_activity_error_rate"] >= 0.0
    # Stride 4 then chunks of 25: one LLM token per 10 s recording.
    steps = saved["sensor_steps_per_stream"]
    assert saved["llm_tokens_per_stream"]["min"] == steps["min"] // 100
    assert saved["llm_tokens_per_stream"]["max"] == steps["max"] // 100
    assert (tmp_path / "loss_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    model, _ = load_model(tmp_path / "checkpoint")
    assert model.config.modality("imu").compressor["type"] == "mambamia"
    assert metrics["test_exact_match"] == saved["test_exact_match"]
