"""Encoder kinds by ``model_type``: the built-in ones and those users register.

``get_encoder("imu")`` returns the `ModalityEncoder` that builds, feeds and calls IMU encoders. To add
an encoder kind, subclass `ModalityEncoder` and call ``register_encoder("my_type", MyEncoder())``;
a modality whose ``encoder.model_type`` is ``"my_type"`` then works without model code changes.
"""

from __future__ import annotations

from hcx_extend.encoders.base import ModalityEncoder
from hcx_extend.encoders.imu import IMUModalityEncoder
from hcx_extend.encoders.imu_guide import GuideIMUModalityEncoder
from hcx_extend.encoders.qwen_audio import QwenAudioEncoder
from hcx_extend.encoders.qwen_vision import QwenVisionEncoder

_REGISTRY: dict[str, ModalityEncoder] = {}


def register_encoder(model_type: str, encoder: ModalityEncoder, *, replace: bool = False) -> None:
    """Make ``model_type`` usable as a modality's ``encoder.model_type``."""
    if model_type in _REGISTRY and not replace:
        raise ValueError(f"encoder type {model_type!r} is already registered; pass replace=True to override it")
    _REGISTRY[model_type] = encoder


def get_encoder(model_type: str) -> ModalityEncoder:
    if model_type not in _REGISTRY:
        raise ValueError(
            f"unknown encoder type {model_type!r}; registered: {sorted(_REGISTRY)}. "
            "Register new kinds with hcx_extend.encoders.register_encoder"
        )
    return _REGISTRY[model_type]


def registered_encoders() -> list[str]:
    return sorted(_REGISTRY)


register_encoder("imu", IMUModalityEncoder())
register_encoder("imu_guide", GuideIMUModalityEncoder())
register_encoder("qwen2_5_vl_vision", QwenVisionEncoder())
register_encoder("qwen2_audio_encoder", QwenAudioEncoder())

__all__ = ["ModalityEncoder", "get_encoder", "register_encoder", "registered_encoders"]
