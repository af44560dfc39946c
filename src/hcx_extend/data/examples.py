"""Examples: a chat plus the modality items it refers to; read from JSONL files or built in code.

A JSONL file holds one example per line::

    {"messages": [{"role": "user", "content": "<imu> What is the person doing?"},
                  {"role": "assistant", "content": "walking"}],
     "inputs": {"imu": ["recordings/walk_01.csv"]}}

Paths are relative to the JSONL file. Sensor files are ``.csv`` (a header row naming the channels),
``.npy`` or ``.ts``; other modalities read ``.npy`` arrays. Requests name files only here, in data
the user controls; the HTTP server never reads files a request names.
"""

from __future__ import annotations

import itertools
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from hcx_extend.config import OmniConfig
from hcx_extend.data.sensors import read_npy, read_recording, resample

# The longest JSONL line read (bytes): a file without line breaks is refused after this much, not read whole.
MAX_JSONL_LINE_BYTES = 16 << 20


@dataclass
class Example:
    """One sample: a chat (ending with the assistant's answer for training) and its modality items."""

    messages: list[dict[str, str]]
    inputs: dict[str, list[Any]] = field(default_factory=dict)

    @property
    def answer(self) -> str | None:
        """The final assistant message, if the chat ends with one."""
        last = self.messages[-1] if self.messages else None
        return last["content"] if last and last.get("role") == "assistant" else None

    @property
    def prompt(self) -> list[dict[str, str]]:
        """The chat without its final assistant answer (what a model is asked)."""
        return self.messages[:-1] if self.answer is not None else list(self.messages)


def gather_inputs(examples: Sequence[Any]) -> dict[str, list[Any]]:
    """The modality items of ``examples`` (anything with ``.inputs``), concatenated per modality in
    example order: the ``inputs`` of one batch for `OmniProcessor`."""
    inputs: dict[str, list[Any]] = {}
    for example in examples:
        for name, items in example.inputs.items():
            inputs.setdefault(name, []).extend(items)
    return inputs


def read_modality_files(config: OmniConfig, files: dict[str, Sequence[str | os.PathLike]],
                        rates: dict[str, float] | None = None) -> dict[str, list[np.ndarray]]:
    """Modality items from files: ``{"imu": ["walk.csv"]}`` -> ``{"imu": [array (time, channels)]}``.

    Sensor files are read with the modality's channel names, refused beyond its ``max_length``
    without being read whole, and resampled from ``rates[name]`` (samples per second) to the
    modality's rate when both are known. Other kinds read ``.npy`` arrays.

    Raises:
        FileNotFoundError: a file does not exist (named).
        ValueError: naming the file and what is wrong; an unknown modality; a rate that is not a finite
            number > 0, given for a modality without files or for one whose contract has no sample_rate.
    """
    rates = rates or {}
    stray = sorted(set(rates) - set(files))
    if stray:
        raise ValueError(f"a sample rate is given for {stray} but no files of {'it' if len(stray) == 1 else 'them'}")
    items: dict[str, list[np.ndarray]] = {}
    for name, paths in files.items():
        modality = config.modality(name)
        rate = rates.get(name)
        if rate is not None and (isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0 < rate < np.inf):
            raise ValueError(f"{name}: the sample rate must be a positive number of samples per second, got {rate!r}")
        contract = modality.input
        if rate is not None and (contract is None or contract.kind != "sensor" or not contract.sample_rate):
            raise ValueError(f"{name}: a sample rate of {rate:g} Hz was given, but the modality does not declare the "
                             "rate it expects (input.sample_rate), so nothing can be resampled; drop the rate or set "
                             f"modalities.{name}.input.sample_rate")
        if isinstance(paths, (str, os.PathLike)):
            raise ValueError(f"{name}: expected a list of files, got one path {str(paths)!r}")
        loaded = []
        for path in paths:
            if contract is not None and contract.kind == "sensor":
                limit = contract.max_length
                if rate and contract.sample_rate and limit:
                    limit = int(np.ceil(limit * rate / contract.sample_rate))  # in the file's own steps
                values = read_recording(path, contract.channel_names, max_length=limit)
                if rate and contract.sample_rate:
                    values = resample(values, rate, contract.sample_rate)
                    if contract.max_length and len(values) > contract.max_length:
                        raise ValueError(f"{path}: {len(values)} time steps at {contract.sample_rate:g} Hz, more than "
                                         f"the maximum of {contract.max_length}; split it into windows")
            else:
                values = read_npy(path)
            loaded.append(values)
        items[name] = loaded
    return items


def read_jsonl(path: str | os.PathLike, config: OmniConfig) -> list[Example]:
    """The examples of a JSONL file (format in the module docstring).

    The file is streamed: each line is checked (and its item files read) before the next is read, so
    the first bad line stops reading, and no line longer than `MAX_JSONL_LINE_BYTES` is held whole.

    Raises:
        FileNotFoundError: no such file, or a missing item file (named with the line that refers to it).
        ValueError: naming the file and line (``"<path>:<line>: ..."``) for malformed lines, text that is
            not UTF-8, overlong lines, unknown modalities or bad items; naming the file when it is a
            folder, unreadable or holds no example.
    """
    path = Path(path)
    try:
        handle = path.open("rb")
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} does not exist") from None
    except IsADirectoryError:
        raise ValueError(f"{path} is a folder, not a JSONL file") from None
    except OSError as error:
        raise ValueError(f"{path}: cannot be read ({error.strerror or error})") from None
    examples = []
    with handle:
        for number, line in _numbered_lines(handle, path):
            example = _parse_jsonl_line(line, f"{path}:{number}", path.parent, config)
            if example is not None:
                examples.append(example)
    if not examples:
        raise ValueError(f"{path} holds no examples")
    return examples


def _numbered_lines(handle, path: Path) -> Iterator[tuple[int, str]]:
    """``(number, text)`` for the lines of an open binary file, decoded one at a time (a UTF-8 BOM on
    the first is dropped)."""
    for number in itertools.count(1):
        try:
            raw = handle.readline(MAX_JSONL_LINE_BYTES + 1)
        except OSError as error:
            raise ValueError(f"{path}:{number}: cannot be read ({error.strerror or error})") from None
        if not raw:
            return
        if len(raw) > MAX_JSONL_LINE_BYTES and not raw.endswith(b"\n"):
            raise ValueError(f"{path}:{number}: longer than {MAX_JSONL_LINE_BYTES} bytes; one example per line, "
                             "naming its item files")
        try:
            yield number, raw.decode("utf-8-sig" if number == 1 else "utf-8")
        except UnicodeDecodeError as error:
            raise ValueError(f"{path}:{number}: not UTF-8 text ({error.reason} at byte {error.start} of the "
                             "line)") from None


def _parse_jsonl_line(line: str, where: str, folder: Path, config: OmniConfig) -> Example | None:
    """One line's example (None for a blank line); item paths are relative to ``folder``."""
    if not line.strip():
        return None
    try:
        record = json.loads(line)
    except (json.JSONDecodeError, RecursionError) as error:
        raise ValueError(f"{where}: not JSON ({error})") from None
    if not isinstance(record, dict) or not isinstance(record.get("messages"), list) or not record["messages"]:
        raise ValueError(f"{where}: needs 'messages' (a non-empty list of {{'role', 'content'}}) and optionally "
                         "'inputs'")
    for message in record["messages"]:
        if (not isinstance(message, dict) or not isinstance(message.get("role"), str)
                or not isinstance(message.get("content"), str)):
            raise ValueError(f"{where}: every message needs a string 'role' and a string 'content', got {message!r}")
    files = record.get("inputs", {})
    if not isinstance(files, dict) or not all(
            isinstance(v, list) and all(isinstance(f, str) for f in v) for v in files.values()):
        raise ValueError(f"{where}: 'inputs' must map modality names to lists of file names, got {files!r}")
    try:
        inputs = read_modality_files(config, {name: [folder / f for f in names] for name, names in files.items()})
    except (ValueError, FileNotFoundError) as error:
        raise type(error)(f"{where}: {error}") from None
    return Example(record["messages"], inputs)
