"""A request's messages in, the library's chat and modality items out.

Each ``input_sensor`` part becomes its modality's marker (``<imu>``) at the part's place in the
message text, and its recording joins that modality's item list in order of appearance, which is how
`OmniProcessor` pairs markers with items. So ``[text "Before", sensor, text "after?"]`` is the user
turn ``"Before <imu> after?"`` with one ``imu`` item. Parts are joined with one space where neither
side already has whitespace there (the form `hcx_extend.inference.with_markers` writes and the demo
trains on: ``"<imu> What activity ..."``).

A recording is read the way `hcx_extend.data.examples.read_modality_files` reads a file: CSV columns by
the modality's ``input.channel_names``, refused beyond its ``input.max_length`` (counted in the
upload's own steps when ``sample_rate`` differs), resampled to the modality's rate, then checked by
the modality's encoder (channels, length, NaN/Inf). Every problem is a 400 `APIError` whose message is
the library's own and whose ``param`` points at the part.
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from hcx_extend.data.sensors import parse_csv_text, parse_npy_bytes, resample
from hcx_extend.processor import OmniProcessor
from hcx_extend.serve.protocol import Message, SensorInput, TextPart, invalid_request

Chat = list[dict[str, str]]


@dataclass
class Prompt:
    """A request in the library's terms.

    Attributes:
        chat: ``[{"role", "content"}]`` with markers where the sensor parts were.
        inputs: ``{modality: [recording (time, channels) float32, ...]}`` in order of appearance.
    """

    chat: Chat
    inputs: dict[str, list[np.ndarray]] = field(default_factory=dict)


def read_messages(messages: list[Message], processor: OmniProcessor) -> Prompt:
    """The `Prompt` of ``messages`` (parsed request messages).

    Raises:
        APIError: 400 for a text part holding a marker, an unknown or non-sensor modality, or bad sensor data.
    """
    prompt = Prompt(chat=[])
    for m, message in enumerate(messages):
        pieces = []
        for p, part in enumerate(message.content):
            where = f"messages[{m}].content[{p}]"
            if isinstance(part, TextPart):
                _refuse_markers(part.text, processor, f"{where}.text")
                pieces.append(part.text)
                continue
            name = part.input_sensor.modality
            recording = read_sensor(part.input_sensor, processor, f"{where}.input_sensor")
            prompt.inputs.setdefault(name, []).append(recording)
            pieces.append(processor.config.modality(name).marker)
        role = "system" if message.role == "developer" else message.role
        prompt.chat.append({"role": role, "content": _join(pieces)})
    return prompt


def read_sensor(part: SensorInput, processor: OmniProcessor, param: str) -> np.ndarray:
    """One recording as ``(time, channels)`` float32 at the modality's sample rate, checked by its encoder.

    Args:
        part: the part's ``input_sensor`` object.
        param: where the part is in the request (``messages[0].content[1].input_sensor``), for errors.
    """
    config = processor.config
    try:
        modality = config.modality(part.modality)
    except ValueError as error:
        raise invalid_request(str(error), param=f"{param}.modality", code="unknown_modality") from None
    contract = modality.input
    if contract is None or contract.kind != "sensor":
        sensors = sorted(n for n, m in config.modalities.items() if m.input is not None and m.input.kind == "sensor")
        raise invalid_request(
            f"modality {part.modality!r} takes {contract.kind if contract else 'unknown'} items, not sensor recordings; "
            f"input_sensor parts are for this model's sensor modalities {sensors or '(none)'}",
            param=f"{param}.modality", code="unknown_modality")
    if part.sample_rate is not None and contract.sample_rate is None:
        raise invalid_request(
            f"{part.modality}: the model records no sample rate for this modality, so a recording cannot be "
            "resampled to it; leave out sample_rate and send data at the rate the model was trained on",
            param=f"{param}.sample_rate")
    rate = part.sample_rate if part.sample_rate != contract.sample_rate else None
    limit = contract.max_length
    if rate and limit:
        limit = int(np.ceil(limit * rate / contract.sample_rate))  # in the upload's own steps
    data_param = f"{param}.data"
    try:
        values = _decode(part, contract.channel_names, limit, data_param)
        if rate:
            values = resample(values, rate, contract.sample_rate)
        processor.placeholder_counts(part.modality, [values])  # the encoder's checks: channels, length, NaN/Inf
    except ValueError as error:
        raise invalid_request(str(error), param=data_param, code="invalid_sensor_data") from None
    return values


def _decode(part: SensorInput, channel_names: list[str] | None, limit: int | None, param: str) -> np.ndarray:
    if part.format is None:
        return _array(part.data, limit, param)
    if not isinstance(part.data, str):
        raise invalid_request(f"{param}: with format {part.format!r}, data must be the file's bytes in base64 (a string), "
                              f"got {type(part.data).__name__}", param=param, code="invalid_sensor_data")
    try:
        raw = base64.b64decode(part.data, validate=True)
    except (binascii.Error, ValueError) as error:
        raise invalid_request(f"{param}: not valid base64 ({error}); with format {part.format!r}, data is the file's "
                              "bytes in standard base64", param=param, code="invalid_sensor_data") from None
    source = f"{param} ({part.format})"
    if part.format == "npy":
        return parse_npy_bytes(raw, source, max_length=limit)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise ValueError(f"{source}: not UTF-8 text ({error.reason} at byte {error.start}); save the CSV as UTF-8") from None
    return parse_csv_text(text, source, channel_names, max_length=limit)


def _array(data: Any, limit: int | None, param: str) -> np.ndarray:
    """An inline ``(time, channels)`` array of JSON numbers."""
    try:
        values = np.asarray(data)
    except ValueError as error:  # ragged rows
        raise ValueError(f"{param}: expected a (time, channels) array of numbers with rows of equal length ({error})") from None
    if values.dtype == bool or not np.issubdtype(values.dtype, np.number):
        raise ValueError(f"{param}: expected a (time, channels) array of numbers, got {type(data).__name__} of "
                         f"{values.dtype} values")
    if values.ndim != 2:
        raise ValueError(f"{param}: expected a (time, channels) array (a list of rows), got shape {values.shape}")
    if limit is not None and values.shape[0] > limit:
        raise ValueError(f"{param}: {values.shape[0]} time steps, more than the maximum of {limit}; split it into windows "
                         "(hcx_extend.data.sensors.window) or raise the modality's input.max_length")
    return values.astype(np.float32)


def _refuse_markers(text: str, processor: OmniProcessor, param: str) -> None:
    for modality in processor.config.modalities.values():
        if modality.marker in text:
            raise invalid_request(
                f"{param}: text holds {modality.marker!r}, the {modality.name} marker; send the recording as an "
                "input_sensor part at that place instead (the server puts the marker there)", param=param)


def _join(pieces: list[str]) -> str:
    text = ""
    for piece in pieces:
        if not piece:
            continue
        if text and not text[-1].isspace() and not piece[0].isspace():
            text += " "
        text += piece
    return text
