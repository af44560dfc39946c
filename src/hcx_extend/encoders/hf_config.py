"""transformers configs for the encoder kinds that are transformers models (Qwen2.5-VL vision, Qwen2-Audio).

A modality's ``encoder`` dict is passed to ``AutoConfig.for_model``. transformers checks field types
itself (a strict dataclass), but its error is not a ValueError and does not say which modality is
wrong, and sizes that are integers but nonsensical (0, -3, heads that do not divide the width) pass
it and fail much later inside a module constructor. `encoder_config` turns all of these into one
ValueError naming the modality (or the encoder type) and the setting.
"""

from __future__ import annotations

import re
from typing import Any

from huggingface_hub.errors import StrictDataclassError
from transformers import AutoConfig, PreTrainedConfig


def encoder_config(settings: dict[str, Any], owner: str, positive: tuple[str, ...] = (),
                   divides: tuple[str, str] | None = None) -> PreTrainedConfig:
    """``AutoConfig.for_model(**settings)``, with every settings error a ValueError naming ``owner``.

    Args:
        settings: the modality's ``encoder`` dict (``model_type`` plus transformers config fields).
        owner: who the settings belong to, for messages: the modality's name or ``"<type> encoder"``.
        positive: fields that must be integers >= 1 (after transformers' defaults are applied).
        divides: ``(heads, width)``: the ``heads`` field must divide the ``width`` field.

    Raises:
        ValueError: a field of the wrong type, a size below 1, or heads that do not divide the width.
    """
    try:
        config = AutoConfig.for_model(**settings)
    except (StrictDataclassError, TypeError, ValueError) as error:
        match = re.search(r"field '(\w+)'", str(error))
        if match and match.group(1) in settings:
            name = match.group(1)
            raise ValueError(f"{owner}: encoder setting {name}={settings[name]!r} is invalid "
                             f"({str(error).splitlines()[-1].strip()}); fix encoder.{name}") from None
        raise ValueError(f"{owner}: invalid encoder settings ({error})") from None
    for name in positive:
        value = getattr(config, name)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{owner}: encoder setting {name} must be an integer >= 1, got {value!r}; "
                             f"fix encoder.{name}")
    if divides is not None:
        heads, width = (getattr(config, name) for name in divides)
        if width % heads:
            raise ValueError(f"{owner}: encoder setting {divides[1]}={width} is not divisible by {divides[0]}={heads}; "
                             f"choose encoder.{divides[1]} and encoder.{divides[0]} so that it is")
    return config
