"""A modality described in a JSON file (``hcx-extend extend --modality-file FILE``, ``train --modality-file FILE``).

The file holds one `ModalityConfig` as a JSON object::

    {"name": "vowel", "encoder": {"model_type": "imu", "in_channels": 12, "stride": 2},
     "projector": {"type": "mlp", "activation": "silu"},
     "input": {"kind": "sensor", "channels": 12, "max_length": 64, "sample_rate": 100}}

Everything is checked when the file is read: field names and types, the encoder's settings (the
encoder is built on the meta device, so a setting only its constructor rejects is caught here too),
the projector and compressor types, and that the input contract agrees with the encoder (channels,
kind). Every error names the file.
"""

from __future__ import annotations

import os
from pathlib import Path

from accelerate import init_empty_weights
from huggingface_hub.errors import StrictDataclassError

from hcx_extend.compressors import compressed_length
from hcx_extend.config import ModalityConfig
from hcx_extend.encoders import get_encoder
from hcx_extend.layout import read_json
from hcx_extend.projectors import check_projector

# What an encoder kind's code may raise for settings it cannot use. Built-in kinds raise ValueError; a
# user-registered kind, or a setting only a torch constructor looks at, may raise any of the others.
_SETTING_ERRORS = (ValueError, TypeError, KeyError, IndexError, AttributeError, ArithmeticError, RuntimeError,
                   StrictDataclassError)


def check_modality(modality: ModalityConfig) -> ModalityConfig:
    """Check a modality's encoder, projector and compressor settings; nothing is allocated.

    Fills the modality's input contract from its encoder (as building the model would) and builds
    the encoder with its parameters on the meta device, so settings that only its constructor reads
    are checked too.

    Raises:
        ValueError: ``"<modality>: <the first setting that is wrong>"``.
    """
    try:
        encoder = get_encoder(modality.encoder["model_type"])
        modality.input = encoder.resolve_contract(modality)
        encoder.output_size(modality.encoder)
        with init_empty_weights(include_buffers=False):
            encoder.build(modality.encoder)
        check_projector(modality.projector)
        if modality.compressor is not None:
            compressed_length(modality.compressor, 1)
    except _SETTING_ERRORS as error:
        message = " ".join(str(error).split()) or type(error).__name__
        prefix = "" if message.startswith(f"{modality.name}:") else f"{modality.name}: "
        raise ValueError(f"{prefix}{message}") from None
    return modality


def read_modality_file(path: str | os.PathLike) -> ModalityConfig:
    """The checked `ModalityConfig` in a JSON file (format in the module docstring).

    Raises:
        FileNotFoundError: no such file.
        ValueError: ``"<path>: <what is wrong>"`` (not JSON, not UTF-8, a folder, a field missing, of the
            wrong type or disagreeing with the encoder).
    """
    path = Path(path)
    data = read_json(path)
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object describing one modality, got {type(data).__name__}")
    if not isinstance(data.get("name"), str):
        raise ValueError(f"{path}: needs a 'name' (a lower-case identifier such as \"imu\")")
    try:
        return check_modality(ModalityConfig.from_dict(data["name"], data))
    except ValueError as error:
        raise ValueError(f"{path}: {error}") from None
