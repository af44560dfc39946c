import os

import numpy as np
import pytest

from hcx_extend.data.basic_motions import CHANNELS, load_basic_motions, parse_activity, stratified_split
from hcx_extend.data.sensors import (
    fit_normalization,
    parse_csv_text,
    read_csv,
    read_npy,
    read_recording,
    read_ts,
    resample,
    window,
    write_csv,
)


def test_csv_round_trip_and_channel_selection(tmp_path):
    values = np.arange(30, dtype=np.float32).reshape(5, 6)
    write_csv(tmp_path / "rec.csv", values, CHANNELS)
    assert np.array_equal(read_csv(tmp_path / "rec.csv"), values)
    picked = read_csv(tmp_path / "rec.csv", ["gyro_z", "acc_x"])
    assert np.array_equal(picked, values[:, [5, 0]])


def test_csv_missing_channels(tmp_path):
    (tmp_path / "rec.csv").write_text("acc_x,acc_y,acc_z\n1,2,3\n")
    with pytest.raises(ValueError, match=r"missing channel\(s\) \['gyro_x', 'gyro_y', 'gyro_z'\]; the header has \['acc_x', 'acc_y', 'acc_z'\]"):
        read_csv(tmp_path / "rec.csv", CHANNELS)


def test_csv_non_numeric_cell(tmp_path):
    (tmp_path / "rec.csv").write_text("a,b\n1,2\n3,oops\n")
    with pytest.raises(ValueError, match=r"line 3, column 'b': 'oops' is not a number"):
        read_csv(tmp_path / "rec.csv")


def test_csv_ragged_row(tmp_path):
    (tmp_path / "rec.csv").write_text("a,b\n1,2\n3\n")
    with pytest.raises(ValueError, match=r"line 3 has 1 cells, the header has 2"):
        read_csv(tmp_path / "rec.csv")


def test_zero_length_recordings(tmp_path):
    (tmp_path / "rec.csv").write_text("a,b\n")
    with pytest.raises(ValueError, match=r"the recording is empty \(0 time steps\)"):
        read_csv(tmp_path / "rec.csv")
    np.save(tmp_path / "rec.npy", np.zeros((0, 6), dtype=np.float32))
    with pytest.raises(ValueError, match=r"the recording is empty"):
        read_npy(tmp_path / "rec.npy")


def test_nan_cells_are_rejected(tmp_path):
    (tmp_path / "rec.csv").write_text("a,b\n1,2\n3,nan\n")
    with pytest.raises(ValueError, match=r"NaN/Inf at time step\(s\) \[1\]"):
        read_csv(tmp_path / "rec.csv")


def test_npy_refuses_pickles_and_reads_arrays(tmp_path):
    np.save(tmp_path / "objects.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match="not a plain numeric .npy file"):
        read_npy(tmp_path / "objects.npy")
    np.save(tmp_path / "rec.npy", np.ones((7, 6)))
    assert read_recording(tmp_path / "rec.npy").shape == (7, 6)
    with pytest.raises(ValueError, match="unsupported file type '.txt'"):
        (tmp_path / "rec.txt").write_text("1")
        read_recording(tmp_path / "rec.txt")


def test_ts_files_from_aeon():
    import aeon

    path = os.path.join(os.path.dirname(aeon.__file__), "datasets", "data", "BasicMotions", "BasicMotions_TEST.ts")
    recordings, labels = read_ts(path)
    reference = load_basic_motions("test")
    assert len(recordings) == 40 and recordings[0].shape == (100, 6)
    assert labels == reference.labels
    assert np.allclose(recordings[7], reference.values[7])


def test_resample_and_window():
    values = np.stack([np.arange(100.0), np.arange(100.0) * 2], axis=1)
    down = resample(values, 100.0, 25.0)
    assert down.shape == (25, 2)
    assert np.allclose(down[:, 0], np.arange(0, 100, 4))  # a linear signal stays linear
    assert resample(values, 10.0, 20.0).shape == (200, 2)
    pieces = window(values, 40, 30)
    assert [p[0, 0] for p in pieces] == [0, 30, 60]
    assert [len(p) for p in window(values, 40)] == [40, 40, 40]  # starts 0, 40 and 60 (end-aligned)
    assert pieces[-1][-1, 0] == 99  # the last window reaches the end: no step dropped
    assert window(values[:10], 40) [0].shape == (10, 2)
    with pytest.raises(ValueError, match="sample rates must be positive"):
        resample(values, 0, 10)


def test_normalization_statistics():
    a, b = np.array([[1.0, 5.0], [3.0, 5.0]]), np.array([[5.0, 5.0]])
    stats = fit_normalization([a, b])
    assert np.allclose(stats["mean"], [3.0, 5.0])
    assert np.allclose(stats["std"], [np.std([1, 3, 5]), 1.0])  # a constant channel gets std 1


def test_basic_motions_split_is_stratified_and_disjoint():
    train = load_basic_motions("train")
    rest, held = stratified_split(train, per_class=2, seed=0)
    assert len(rest) == 32 and len(held) == 8
    assert sorted(held.labels) == sorted(["badminton", "running", "standing", "walking"] * 2)
    ids = {id(v) for v in rest.values} & {id(v) for v in held.values}
    assert not ids


def test_parse_activity():
    assert parse_activity(" Walking.") == "walking"
    assert parse_activity("badminton<|im_end|>") == "badminton"
    assert parse_activity("the person is walking") == "other"


def test_a_byte_order_mark_does_not_hide_the_first_channel(tmp_path):
    # Spreadsheet programs start UTF-8 CSV files with one; it must not become part of the first name.
    (tmp_path / "rec.csv").write_bytes("\ufeffacc_x,acc_y\n1,2\n".encode())
    assert np.array_equal(read_csv(tmp_path / "rec.csv", ["acc_x"]), np.array([[1.0]], dtype=np.float32))
    assert np.array_equal(parse_csv_text("\ufeffacc_x,acc_y\n1,2\n", channel_names=["acc_x"]), [[1.0]])


def test_blank_lines_before_the_header_and_between_rows_are_skipped(tmp_path):
    assert parse_csv_text("\n\na,b\n1,2\n\n3,4\n").tolist() == [[1.0, 2.0], [3.0, 4.0]]


def test_resample_refuses_rates_that_are_not_positive_finite_numbers():
    values = np.zeros((10, 2))
    for bad in (0, -10.0, float("nan"), float("inf"), "10", True):
        with pytest.raises(ValueError, match="sample rates must be positive numbers"):
            resample(values, bad, 10.0)


def test_reader_limits_are_checked():
    with pytest.raises(ValueError, match=r"upload: max_length must be a positive integer or None, got 0"):
        parse_csv_text("a\n1\n", "upload", max_length=0)
    with pytest.raises(ValueError, match=r"upload: channel_names must be a list of column names, got 'a'"):
        parse_csv_text("a\n1\n", "upload", channel_names="a")


def test_write_csv_replaces_a_recording_whole_or_not_at_all(tmp_path, monkeypatch):
    path = tmp_path / "rec.csv"
    write_csv(path, np.arange(12, dtype=np.float32).reshape(2, 6), CHANNELS)
    before = path.read_bytes()

    def disk_full(descriptor):
        raise OSError(28, "No space left on device")

    # The write fails after the new rows went out but before the rename (a full disk, a kill).
    with monkeypatch.context() as patched:
        patched.setattr(os, "fsync", disk_full)
        with pytest.raises(OSError, match="No space left on device"):
            write_csv(path, np.ones((50, 6), dtype=np.float32), CHANNELS)
    assert path.read_bytes() == before
    # A value that cannot be written, met after the header and first row: nothing is written either.
    with pytest.raises(ValueError):
        write_csv(path, np.array([[1.0] * 6, [1.0] * 5 + ["x"]], dtype=object), CHANNELS)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["rec.csv"]  # no temporary file left behind

    renames = []
    replace = os.replace
    monkeypatch.setattr(os, "replace", lambda source, target: renames.append((source, target)) or replace(source, target))
    write_csv(path, np.full((3, 6), 0.5, dtype=np.float32), CHANNELS)
    (source, target), = renames
    assert os.path.dirname(source) == str(tmp_path) and target == path  # a temporary file in the same folder
    assert np.array_equal(read_csv(path), np.full((3, 6), 0.5, dtype=np.float32))
