"""Sensor recordings in, clean ``(time, channels)`` float32 arrays out.

Readers for CSV (a header row of channel names), NumPy ``.npy`` and aeon's ``.ts`` files; per-channel
normalisation statistics fitted on training data (stored in the modality config, applied by the
processor); resampling to the modality's rate; windowing of long recordings. Every reader rejects
bad input with a ValueError that names the file and what is wrong: missing channels, non-numeric
cells, empty recordings, NaN/Inf, values beyond float32, pickled objects, not UTF-8; a missing file
is a FileNotFoundError naming it. No other exception type escapes a reader. A recording longer than
``max_length`` steps is refused after reading at most ``max_length + 1`` rows of a CSV (lines are
read one at a time, each at most `MAX_LINE_CHARS` long) or only the header of a ``.npy``.
"""

from __future__ import annotations

import csv
import io
import tokenize
from pathlib import Path
from typing import Sequence

import numpy as np

from hcx_extend.layout import atomic_write_text

# The longest CSV line read (characters): a file without line breaks is refused after this much, not read whole.
MAX_LINE_CHARS = 1 << 20
_FLOAT32_MAX = float(np.finfo(np.float32).max)


def _check_recording(values: np.ndarray, source: str, channels: int | None = None) -> np.ndarray:
    if values.ndim != 2:
        raise ValueError(f"{source}: expected a (time, channels) array, got shape {values.shape}")
    if values.shape[0] == 0:
        raise ValueError(f"{source}: the recording is empty (0 time steps)")
    if values.shape[1] == 0:
        raise ValueError(f"{source}: the recording has no channels (shape {values.shape})")
    if channels is not None and values.shape[1] != channels:
        raise ValueError(f"{source}: expected {channels} channels, got {values.shape[1]} (shape {values.shape})")
    values = values.astype(np.float64, copy=False)
    if not np.isfinite(values).all():
        rows = sorted(set(np.argwhere(~np.isfinite(values))[:, 0].tolist()))
        raise ValueError(f"{source}: NaN/Inf at time step(s) {rows[:5]}{' ...' if len(rows) > 5 else ''}")
    if np.abs(values).max() > _FLOAT32_MAX:
        rows = sorted(set(np.argwhere(np.abs(values) > _FLOAT32_MAX)[:, 0].tolist()))
        raise ValueError(f"{source}: values beyond the float32 range (|x| > 3.4e38) at time step(s) {rows[:5]}"
                         f"{' ...' if len(rows) > 5 else ''}")
    return values.astype(np.float32)


def _check_limits(channel_names: Sequence[str] | None, max_length: int | None, source: str) -> None:
    if channel_names is not None and (isinstance(channel_names, str) or not all(
            isinstance(name, str) for name in channel_names)):
        raise ValueError(f"{source}: channel_names must be a list of column names, got {channel_names!r}")
    if max_length is not None and (not isinstance(max_length, int) or isinstance(max_length, bool) or max_length < 1):
        raise ValueError(f"{source}: max_length must be a positive integer or None, got {max_length!r}")


def _lines(handle, source: Path | str):
    """The lines of a text stream, each read with a bounded buffer (a file without line breaks is not read whole)."""
    while True:
        line = handle.readline(MAX_LINE_CHARS + 1)
        if not line:
            return
        if len(line) > MAX_LINE_CHARS:
            raise ValueError(f"{source}: a line is longer than {MAX_LINE_CHARS:,} characters; is this a CSV file?")
        yield line


def read_csv(path: str | Path, channel_names: Sequence[str] | None = None,
             max_length: int | None = None) -> np.ndarray:
    """Read a CSV whose first row names the channels; returns ``(time, channels)`` float32.

    Rows are read one at a time: a file longer than ``max_length`` steps is refused as soon as the
    limit is passed, without reading the rest.

    Args:
        channel_names: columns to return, in this order (extra columns are ignored). None = all columns.
        max_length: the most time steps accepted (None = no limit).

    Raises:
        FileNotFoundError: no such file.
        ValueError: naming the file (and line and column) for anything malformed, a folder, or a file
            that cannot be read.
    """
    path = Path(path)
    _check_limits(channel_names, max_length, str(path))
    try:
        # utf-8-sig: spreadsheet programs start UTF-8 CSVs with a byte-order mark.
        with path.open(newline="", encoding="utf-8-sig") as handle:
            return _parse_csv(csv.reader(_lines(handle, path)), path, channel_names, max_length)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} does not exist") from None
    except IsADirectoryError:
        raise ValueError(f"{path} is a folder, not a CSV file") from None
    except UnicodeDecodeError as error:
        raise ValueError(f"{path}: not UTF-8 text ({error.reason} at byte {error.start}); save the CSV as UTF-8") from None
    except csv.Error as error:
        raise ValueError(f"{path}: malformed CSV ({error})") from None
    except OSError as error:
        raise ValueError(f"{path}: cannot be read ({error.strerror or error})") from None


def parse_csv_text(text: str, source: str = "csv", channel_names: Sequence[str] | None = None,
                   max_length: int | None = None) -> np.ndarray:
    """`read_csv` on text already in memory (an upload); ``source`` names it in error messages.

    Raises:
        ValueError: ``"<source>: ..."`` for anything malformed (the same checks as `read_csv`).
    """
    if not isinstance(text, str):
        raise ValueError(f"{source}: expected the CSV as text, got {type(text).__name__}")
    _check_limits(channel_names, max_length, source)
    try:
        stream = io.StringIO(text.removeprefix("\ufeff"), newline="")
        return _parse_csv(csv.reader(_lines(stream, source)), source, channel_names, max_length)
    except csv.Error as error:
        raise ValueError(f"{source}: malformed CSV ({error})") from None


def parse_npy_bytes(data: bytes, source: str = "npy", max_length: int | None = None) -> np.ndarray:
    """`read_npy` on bytes already in memory (an upload); pickled objects are refused.

    Raises:
        ValueError: ``"<source>: ..."``: not a plain numeric ``.npy`` (pickles included), not ``(time,
            channels)``, longer than ``max_length``, NaN/Inf or beyond float32.
    """
    _check_limits(None, max_length, source)
    try:
        values = np.load(io.BytesIO(data), allow_pickle=False)
    except _NPY_ERRORS as error:
        raise ValueError(f"{source}: not a plain numeric .npy file ({error})") from None
    return _check_npy(values, source, max_length)


# What np.load raises for bytes that are not a complete plain .npy (a pickle, a truncated header, a
# header whose shape or dtype does not parse, an .npz archive).
_NPY_ERRORS = (ValueError, OSError, EOFError, TypeError, SyntaxError, tokenize.TokenError, MemoryError, OverflowError,
               KeyError, IndexError, RecursionError)


def _parse_csv(reader, path: Path | str, channel_names: Sequence[str] | None, max_length: int | None) -> np.ndarray:
    header_row = next(reader, None)
    while header_row is not None and not any(cell.strip() for cell in header_row):
        header_row = next(reader, None)  # blank lines before the header
    if header_row is None:
        raise ValueError(f"{path}: empty file; expected a header row of channel names")
    header = [name.strip() for name in header_row]
    if all(_is_number(name) for name in header):
        raise ValueError(f"{path}: the first row holds numbers {header[:6]}, not channel names; add a header row "
                         "naming the channels (e.g. acc_x,acc_y,acc_z,gyro_x,gyro_y,gyro_z)")
    if channel_names is not None:
        missing = [name for name in channel_names if name not in header]
        if missing:
            raise ValueError(f"{path}: missing channel(s) {missing}; the header has {header}")
        twice = sorted({name for name in channel_names if header.count(name) > 1})
        if twice:
            raise ValueError(f"{path}: the header names channel(s) {twice} more than once; which column is meant?")
        columns = [header.index(name) for name in channel_names]
    else:
        columns = list(range(len(header)))
    data = []
    for line, row in enumerate(reader, start=2):
        if not any(cell.strip() for cell in row):
            continue
        if len(row) != len(header):
            raise ValueError(f"{path}: line {line} has {len(row)} cells, the header has {len(header)}")
        if max_length is not None and len(data) >= max_length:
            raise ValueError(f"{path}: longer than the maximum of {max_length} time steps (line {line}); split it "
                             "into windows (hcx_extend.data.sensors.window) or raise the modality's input.max_length")
        values = []
        for column in columns:
            cell = row[column].strip()
            try:
                values.append(float(cell))
            except ValueError:
                raise ValueError(f"{path}: line {line}, column {header[column]!r}: {cell!r} is not a number") from None
        data.append(values)
    return _check_recording(np.asarray(data, dtype=np.float64).reshape(len(data), len(columns)), str(path))


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def write_csv(path: str | Path, values: np.ndarray, channel_names: Sequence[str]) -> None:
    """Write ``(time, channels)`` with a header row (the format `read_csv` reads).

    Atomic (`hcx_extend.layout.atomic_write_text`: a temporary file beside ``path``, then a rename), so
    a reader, or a run killed while writing, sees the old recording or the new one, never part of one.
    """
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(channel_names)
    writer.writerows([f"{v:.6g}" for v in row] for row in np.asarray(values))
    atomic_write_text(path, text.getvalue())


def read_npy(path: str | Path, max_length: int | None = None) -> np.ndarray:
    """Read a ``(time, channels)`` array from ``.npy`` (pickled objects are refused).

    The header is read first: an array longer than ``max_length`` steps is refused before its data is.

    Raises:
        FileNotFoundError: no such file.
        ValueError: naming the file (see `parse_npy_bytes`), or a folder.
    """
    _check_limits(None, max_length, str(path))
    if Path(path).is_dir():
        raise ValueError(f"{path} is a folder, not a .npy file")
    try:
        values = np.load(path, allow_pickle=False, mmap_mode="r")
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} does not exist") from None
    except _NPY_ERRORS as error:
        raise ValueError(f"{path}: not a plain numeric .npy file ({' '.join(str(error).split())[:300]})") from None
    return _check_npy(values, str(path), max_length)


def _check_npy(values: np.ndarray, source: str, max_length: int | None) -> np.ndarray:
    if not isinstance(values, np.ndarray):
        if hasattr(values, "close"):
            values.close()  # an .npz archive holds its file open
        raise ValueError(f"{source}: expected one array, got {type(values).__name__}")
    if not np.issubdtype(values.dtype, np.number) or np.issubdtype(values.dtype, np.complexfloating):
        raise ValueError(f"{source}: expected real numbers, got dtype {values.dtype}")
    if max_length is not None and values.ndim >= 1 and values.shape[0] > max_length:
        raise ValueError(f"{source}: {values.shape[0]} time steps, more than the maximum of {max_length}; split it "
                         "into windows (hcx_extend.data.sensors.window) or raise the modality's input.max_length")
    return _check_recording(np.array(values), source)


def read_ts(path: str | Path) -> tuple[list[np.ndarray], list[str] | None]:
    """Read an aeon/sktime ``.ts`` file: a list of ``(time, channels)`` recordings and their labels.

    Raises:
        FileNotFoundError: no such file.
        ValueError: naming the file (and case) for anything malformed.
    """
    from aeon.datasets import load_from_ts_file

    if not Path(path).exists():
        raise FileNotFoundError(f"{path} does not exist")
    try:
        loaded = load_from_ts_file(str(path))
    except Exception as error:  # noqa: BLE001 - aeon raises several types for malformed files
        raise ValueError(f"{path}: could not read as a .ts file ({error})") from None
    X, y = loaded if isinstance(loaded, tuple) else (loaded, None)
    try:
        cases = [np.asarray(x, dtype=np.float64).T for x in X]
    except (TypeError, ValueError) as error:
        raise ValueError(f"{path}: could not read as a .ts file ({error})") from None
    recordings = [_check_recording(x, f"{path} case {i}") for i, x in enumerate(cases)]
    return recordings, (None if y is None else [str(label) for label in y])


def read_recording(path: str | Path, channel_names: Sequence[str] | None = None,
                   max_length: int | None = None) -> np.ndarray:
    """One recording from ``.csv`` or ``.npy`` (``.ts`` files hold several: use `read_ts`).

    Args:
        channel_names: CSV columns to read, in order (None = all).
        max_length: refuse recordings longer than this many steps, before reading them whole.

    Raises:
        FileNotFoundError: no such file.
        ValueError: naming the file: an unsupported suffix, a folder, or what the reader refused.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist")
    if not path.is_file():
        raise ValueError(f"{path} is not a file")
    suffix = path.suffix.lower()
    if suffix == ".csv":
        return read_csv(path, channel_names, max_length)
    if suffix == ".npy":
        return read_npy(path, max_length)
    if suffix == ".ts":
        recordings, _ = read_ts(path)
        if len(recordings) != 1:
            raise ValueError(f"{path}: holds {len(recordings)} recordings; pass one, or read them with read_ts")
        if max_length is not None and len(recordings[0]) > max_length:
            raise ValueError(f"{path}: {len(recordings[0])} time steps, more than the maximum of {max_length}")
        return recordings[0]
    raise ValueError(f"{path}: unsupported file type {suffix!r}; use .csv (header row), .npy or .ts")


def fit_normalization(recordings: Sequence[np.ndarray]) -> dict[str, list[float]]:
    """Per-channel mean and standard deviation over every time step of ``recordings``.

    Channels that never vary get std 1 so normalising them cannot divide by zero.
    """
    if not recordings:
        raise ValueError("fit_normalization needs at least one recording")
    stacked = np.concatenate([np.asarray(r, dtype=np.float64) for r in recordings])
    std = stacked.std(axis=0)
    std[std < 1e-8] = 1.0
    return {"mean": stacked.mean(axis=0).tolist(), "std": std.tolist()}


def resample(values: np.ndarray, from_rate: float, to_rate: float) -> np.ndarray:
    """Linear interpolation along time from ``from_rate`` to ``to_rate`` samples per second."""
    if not all(isinstance(r, (int, float)) and not isinstance(r, bool) and 0 < r < float("inf")
               for r in (from_rate, to_rate)):
        raise ValueError(f"sample rates must be positive numbers, got {from_rate!r} -> {to_rate!r}")
    values = np.asarray(values)
    if from_rate == to_rate:
        return values.astype(np.float32)
    length = max(1, round(values.shape[0] * to_rate / from_rate))
    source_times = np.arange(values.shape[0]) / from_rate
    target_times = np.arange(length) / to_rate
    return np.stack([np.interp(target_times, source_times, values[:, c]) for c in range(values.shape[1])], axis=1).astype(
        np.float32
    )


def window(values: np.ndarray, length: int, hop: int | None = None) -> list[np.ndarray]:
    """Cut a long recording into windows of ``length`` steps every ``hop`` steps (default: no overlap).

    The last window is aligned to the end of the recording so no step is dropped; a recording no
    longer than ``length`` comes back whole.
    """
    if length < 1 or (hop is not None and hop < 1):
        raise ValueError(f"window length and hop must be >= 1, got {length} and {hop}")
    hop = hop or length
    total = values.shape[0]
    if total <= length:
        return [values]
    starts = list(range(0, total - length + 1, hop))
    if starts[-1] + length < total:
        starts.append(total - length)
    return [values[s:s + length] for s in starts]
