"""What an omni model is made of: the LLM's config plus one `ModalityConfig` per input modality.

Configuration is data. `OmniConfig` is a transformers `PreTrainedConfig` (registered with
`AutoConfig` as model type ``hcx_omni``) holding

* ``text_config``: any causal-LM config (HyperCLOVAX by default);
* ``modalities``: name -> `ModalityConfig`, each saying which encoder to build, which projector maps
  it into the LLM's hidden size, which placeholder token marks its positions in ``input_ids``, and
  what inputs it accepts.

Adding a modality is adding an entry here; no model code changes. Two other spellings of the same
facts are read and mapped onto ``modalities``:

* the HyperCLOVA X Omni hub config (``model_type: "vlm"``, ``vision_config``, ``audio_config``,
  ``mm_projector_type``, ``audio_projector_type``, ``img_start_id``, ``video_start_id``);
* the extension guide's flat fields (``sensor_config``, ``sensor_model_name_or_path``,
  ``sensor_projector_type``, ``sensor_start_id``).
"""

from __future__ import annotations

import copy
import math
import re
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import torch
from huggingface_hub.errors import StrictDataclassError
from transformers import AutoConfig, PreTrainedConfig
from transformers.configuration_utils import SubConfigSpec

# Labels with this value are ignored by the loss (PyTorch's cross_entropy default).
IGNORE_INDEX = -100

# Placeholder token ids of HyperCLOVA X (docs/hcx-omni-facts.md) and the extension guide's proposal for a sensor.
HCX_IMAGE_TOKEN_ID = 128060
HCX_VIDEO_TOKEN_ID = 128061
HCX_SENSOR_TOKEN_ID = 128080

# Module names the HyperCLOVA X checkpoint uses for its built-in modalities; any other modality NAME
# gets `NAME_model` and `NAME_projector`.
_HCX_MODULE_NAMES = {
    "image": ("vision_model", "mm_projector"),
    "video": ("vision_model", "mm_projector"),
    "audio": ("audio_model", "audio_projector"),
}
_HCX_TOKEN_STRINGS = {"image": "<|IMAGE_PAD|>", "video": "<|VIDEO_PAD|>", "audio": "<|AUDIO_PAD|>"}
_HCX_TOKEN_IDS = {"image": HCX_IMAGE_TOKEN_ID, "video": HCX_VIDEO_TOKEN_ID, "sensor": HCX_SENSOR_TOKEN_ID}

_NAME_PATTERN = re.compile(r"[a-z][a-z0-9_]*")


@dataclass
class InputContract:
    """What one item of a modality must look like.

    Layout per ``kind``: ``"sensor"`` items are ``(time, channels)``; ``"audio"`` items are log-mel
    features ``(mel_bins, frames)``; ``"image"`` items are ``(channels, height, width)``.

    Args:
        kind: "sensor", "audio", "image", or the kind of a user-registered encoder.
        channels: channels (sensor), mel bins (audio) or colour channels (image); None = any.
        max_length: longest accepted item along time (sensor steps, audio frames) or, for images,
            the most patches; longer items are rejected, never truncated. None = no limit.
        dtype: floating dtype the item is converted to.
        sample_rate: samples per second the encoder expects (sensor), used for resampling.
        channel_names: names of the channels in order (sensor), used to read CSV files.
    """

    kind: str
    channels: int | None = None
    max_length: int | None = None
    dtype: str = "float32"
    sample_rate: float | None = None
    channel_names: list[str] | None = None

    def __post_init__(self):
        if not isinstance(self.kind, str) or not self.kind:
            raise ValueError(f"input.kind must be a non-empty string (sensor, audio, image), got {self.kind!r}")
        for key in ("channels", "max_length"):
            value = getattr(self, key)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise ValueError(f"input.{key} must be a positive integer or null, got {value!r}")
        if self.sample_rate is not None and (not isinstance(self.sample_rate, (int, float))
                                             or isinstance(self.sample_rate, bool) or not self.sample_rate > 0
                                             or not math.isfinite(self.sample_rate)):
            raise ValueError(f"input.sample_rate must be a positive number (samples per second) or null, "
                             f"got {self.sample_rate!r}")
        if not isinstance(self.dtype, str) or self.dtype not in ("float32", "float16", "bfloat16", "float64"):
            raise ValueError(f"input.dtype must be float32, float16, bfloat16 or float64, got {self.dtype!r}")
        if self.channel_names is not None:
            if not isinstance(self.channel_names, list) or not all(isinstance(n, str) for n in self.channel_names):
                raise ValueError(f"input.channel_names must be a list of strings, got {self.channel_names!r}")
            if self.channels is not None and len(self.channel_names) != self.channels:
                raise ValueError(f"input.channel_names names {len(self.channel_names)} channels but input.channels is "
                                 f"{self.channels}")

    @classmethod
    def from_dict(cls, modality: str, data: dict[str, Any]) -> InputContract:
        """The contract in ``data`` (a config file's ``input`` object).

        Raises:
            ValueError: ``"<modality>: ..."`` for unknown fields, a missing kind, or a field of the wrong type.
        """
        if not isinstance(data, dict):
            raise ValueError(f"{modality}: input must be an object of InputContract fields, got {data!r}")
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"{modality}: unknown input fields {sorted(unknown)}; known: {sorted(known)}")
        if "kind" not in data:
            raise ValueError(f"{modality}: input needs a 'kind' (sensor, audio, image)")
        try:
            return cls(**data)
        except ValueError as error:
            raise ValueError(f"{modality}: {error}") from None

    @property
    def layout(self) -> str:
        return {"sensor": "(time, channels)", "audio": "(mel_bins, frames)", "image": "(channels, height, width)"}.get(
            self.kind, "encoder-defined"
        )


@dataclass
class ModalityConfig:
    """One input modality: encoder -> projector -> (compressor) -> placeholder positions in the LLM input.

    Args:
        name: lower-case identifier ("image", "audio", "imu", ...). Also the default marker ``<name>``.
        encoder: the encoder's config as a dict with ``model_type``: a transformers type such as
            ``qwen2_5_vl_vision`` or ``qwen2_audio_encoder``, or a type registered with
            `hcx_extend.encoders.register_encoder` (``imu`` is built in).
        projector: ``{"type": "linear" | "mlp" | registered, ...kwargs}``; ``mlp`` is fc1 -> act -> fc2
            with ``activation`` "gelu" (the Omni model's) or "silu" (the extension guide's IMU projector).
        token: placeholder token string in the tokenizer (default ``<|NAME_PAD|>``).
        token_id: placeholder token id (HCX defaults: image 128060, video 128061, sensor 128080).
            None until a tokenizer assigns it (`OmniProcessor.align_tokens`).
        marker: what users write in prompts where an item goes (default ``<name>``).
        encoder_module / projector_module: attribute names under ``model.``; the HCX layout uses
            ``vision_model``/``mm_projector`` for image and video, ``audio_model``/``audio_projector``
            for audio, and ``NAME_model``/``NAME_projector`` otherwise. Modalities naming the same
            module share it (video shares the image tower).
        input: the `InputContract`; None until the model is built, when the encoder kind fills it from
            its settings (`hcx_extend.encoders.ModalityEncoder.resolve_contract`).
        compressor: ``{"type": ..., "chunk_size": ...}`` run between projector and splice, or None.
        normalization: per-channel ``{"mean": [...], "std": [...]}`` fitted on training data, or None.
        pretrained: local path whose weights initialise this modality's encoder on `extend`.
    """

    name: str
    encoder: dict[str, Any]
    projector: dict[str, Any] = field(default_factory=lambda: {"type": "mlp"})
    token: str | None = None
    token_id: int | None = None
    marker: str | None = None
    encoder_module: str | None = None
    projector_module: str | None = None
    input: InputContract | None = None
    compressor: dict[str, Any] | None = None
    normalization: dict[str, list[float]] | None = None
    pretrained: str | None = None

    def __post_init__(self):
        if not isinstance(self.name, str) or not _NAME_PATTERN.fullmatch(self.name):
            raise ValueError(
                f"modality name {self.name!r} is not a lower-case identifier (letters, digits, '_'); "
                "it becomes part of module names such as model.NAME_model"
            )
        if isinstance(self.encoder, PreTrainedConfig):
            self.encoder = self.encoder.to_dict()
        if not isinstance(self.encoder, dict) or not isinstance(self.encoder.get("model_type"), str):
            raise ValueError(
                f"{self.name}: encoder must be a dict with a 'model_type' string (e.g. 'imu', 'qwen2_audio_encoder'), "
                f"got {self.encoder!r}"
            )
        if isinstance(self.projector, str):
            self.projector = {"type": self.projector}
        if not isinstance(self.projector, dict) or not isinstance(self.projector.get("type"), str):
            raise ValueError(f"{self.name}: projector needs a 'type' string (linear, mlp, ...), got {self.projector!r}")
        if self.compressor is not None and (
                not isinstance(self.compressor, dict) or not isinstance(self.compressor.get("type"), str)):
            raise ValueError(f"{self.name}: compressor must be a dict with a 'type' string (none, avgpool, mambamia), "
                             f"got {self.compressor!r}")
        for key in ("token", "marker", "encoder_module", "projector_module", "pretrained"):
            value = getattr(self, key)
            if value is not None and (not isinstance(value, str) or not value):
                raise ValueError(f"{self.name}: {key} must be a non-empty string, got {value!r}")
        if self.token_id is not None and (not isinstance(self.token_id, int) or isinstance(self.token_id, bool)
                                          or self.token_id < 0):
            raise ValueError(f"{self.name}: token_id must be a non-negative integer, got {self.token_id!r}")
        default_encoder_module, default_projector_module = _HCX_MODULE_NAMES.get(
            self.name, (f"{self.name}_model", f"{self.name}_projector")
        )
        self.encoder_module = self.encoder_module or default_encoder_module
        self.projector_module = self.projector_module or default_projector_module
        self.token = self.token or _HCX_TOKEN_STRINGS.get(self.name, f"<|{self.name.upper()}_PAD|>")
        if self.token_id is None:
            self.token_id = _HCX_TOKEN_IDS.get(self.name)
        self.marker = self.marker or f"<{self.name}>"
        if isinstance(self.input, dict):
            self.input = InputContract.from_dict(self.name, self.input)
        elif self.input is not None and not isinstance(self.input, InputContract):
            raise ValueError(f"{self.name}: input must be a dict of InputContract fields, got {self.input!r}")
        if self.normalization is not None:
            self.normalization = check_normalization(self.name, self.normalization)

    @property
    def compressor_module(self) -> str | None:
        """Attribute name of the compressor under ``model.`` (``NAME_compressor``), or None without one."""
        if self.compressor is None:
            return None
        return self.compressor.get("module", f"{self.name}_compressor")

    def to_dict(self) -> dict[str, Any]:
        return copy.deepcopy(asdict(self))

    @classmethod
    def from_dict(cls, name: str, data: dict[str, Any]) -> ModalityConfig:
        """The modality ``name`` described by ``data`` (a config file's entry under ``modalities``).

        Raises:
            ValueError: ``"<name>: ..."`` for anything missing, unknown or of the wrong type.
        """
        if not isinstance(data, dict):
            raise ValueError(f"{name}: a modality must be an object of ModalityConfig fields "
                             f"(encoder, projector, input, ...), got {data!r}")
        known = {f.name for f in fields(cls)}
        unknown = {str(key) for key in data} - known
        if unknown:
            raise ValueError(f"{name}: unknown modality fields {sorted(unknown)}; known: {sorted(known)}")
        if "encoder" not in data:
            raise ValueError(f"{name}: needs an 'encoder' with a 'model_type' (e.g. {{\"model_type\": \"imu\"}})")
        if "name" in data and data["name"] != name:
            raise ValueError(f"{name}: its 'name' field says {data['name']!r}; leave it out or make them agree")
        data = {k: v for k, v in data.items() if k != "name"}
        return cls(name=name, **copy.deepcopy(data))


def check_normalization(modality: str, normalization: Any) -> dict[str, list[float]]:
    """``{"mean": [...], "std": [...]}`` with finite numbers, equal lengths and positive stds, or a ValueError."""
    if not isinstance(normalization, dict) or set(normalization) != {"mean", "std"}:
        raise ValueError(f"{modality}: normalization must be {{'mean': [...], 'std': [...]}}, got {normalization!r}")
    columns = {}
    for key in ("mean", "std"):
        values = normalization[key]
        if not isinstance(values, (list, tuple)) or not values or not all(
                isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in values):
            raise ValueError(f"{modality}: normalization {key} must be a non-empty list of finite numbers, got {values!r}")
        columns[key] = [float(v) for v in values]
    if len(columns["mean"]) != len(columns["std"]):
        raise ValueError(f"{modality}: normalization mean has {len(columns['mean'])} channels, std "
                         f"{len(columns['std'])}; they must match")
    if any(v <= 0 for v in columns["std"]):
        raise ValueError(f"{modality}: normalization std must be positive, got {columns['std']}")
    return columns


def _modalities_from_flat_fields(kwargs: dict[str, Any]) -> dict[str, ModalityConfig]:
    """Pop the HCX hub / extension-guide flat fields from ``kwargs`` and turn them into modalities."""
    modalities: dict[str, ModalityConfig] = {}
    vision = kwargs.pop("vision_config", None)
    mm_projector_type = kwargs.pop("mm_projector_type", "mlp")
    img_start_id = kwargs.pop("img_start_id", HCX_IMAGE_TOKEN_ID)
    video_start_id = kwargs.pop("video_start_id", HCX_VIDEO_TOKEN_ID)
    if vision is not None:
        vision = _as_dict(vision, "vision_config")
        if vision.get("model_type") in ("qwen2_5_vl", "qwen2_5_vl_visual"):
            vision["model_type"] = "qwen2_5_vl_vision"
        modalities["image"] = ModalityConfig("image", encoder=vision, projector={"type": mm_projector_type},
                                             token_id=img_start_id)
        modalities["video"] = ModalityConfig("video", encoder=vision, projector={"type": mm_projector_type},
                                             token_id=video_start_id)
    audio = kwargs.pop("audio_config", None)
    audio_projector_type = kwargs.pop("audio_projector_type", "mlp")
    audio_start_id = kwargs.pop("audio_start_id", None)
    if audio is not None:
        modalities["audio"] = ModalityConfig("audio", encoder=_as_dict(audio, "audio_config"),
                                             projector={"type": audio_projector_type}, token_id=audio_start_id)
    sensor = kwargs.pop("sensor_config", None)
    sensor_path = kwargs.pop("sensor_model_name_or_path", None)
    sensor_projector_type = kwargs.pop("sensor_projector_type", "mlp")
    sensor_start_id = kwargs.pop("sensor_start_id", HCX_SENSOR_TOKEN_ID)
    if sensor is not None:
        sensor = _as_dict(sensor, "sensor_config")
        sensor.setdefault("model_type", "imu")
        modalities["sensor"] = ModalityConfig("sensor", encoder=sensor, projector={"type": sensor_projector_type},
                                              token_id=sensor_start_id, pretrained=sensor_path)
    return modalities


def _as_dict(config: dict | PreTrainedConfig, key: str) -> dict[str, Any]:
    if isinstance(config, PreTrainedConfig):
        return config.to_dict()
    if not isinstance(config, dict):
        raise ValueError(f"{key} must be an object of encoder settings, got {config!r}")
    return dict(config)


def _text_config(text_config: Any) -> PreTrainedConfig:
    """``text_config`` (a dict, a config or None) as the LLM's transformers config, or a ValueError naming the field."""
    if text_config is not None and not isinstance(text_config, (dict, PreTrainedConfig)):
        raise ValueError(f"text_config must be an object of the LLM's config fields, got {text_config!r}")
    if isinstance(text_config, dict):
        for key in _TEXT_CONFIG_SIZES:
            value = text_config.get(key)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise ValueError(f"text_config: {key} must be an integer >= 1, got {value!r}")
    try:
        config, _ = OmniConfig.sub_configs_defaults["text_config"].create_subconfig("text_config", text_config)
    except _CONFIG_ERRORS as error:
        raise ValueError(f"text_config: {_short(error)}") from None
    return config


def _short(error: BaseException, limit: int = 400) -> str:
    """An error's message on one line, cut at ``limit`` characters (transformers lists every model type)."""
    text = " ".join(str(error).split())
    return text if len(text) <= limit else text[:limit] + " ..."


# Sizes of the LLM that must be integers >= 1 when its config has them; transformers checks their types
# but not their signs, and a zero or negative width fails later as a division by zero or a complex number.
_TEXT_CONFIG_SIZES = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                      "num_key_value_heads", "max_position_embeddings", "head_dim")

# What transformers raises for config fields it cannot use: its strict-dataclass checks (not a ValueError),
# arithmetic on nonsense sizes, attribute lookups on values of the wrong type.
_CONFIG_ERRORS = (StrictDataclassError, TypeError, ValueError, KeyError, AttributeError, ArithmeticError)


class OmniConfig(PreTrainedConfig):
    """Config of an `OmniForCausalLM`: ``text_config`` (the LLM) plus ``modalities``.

    ``modalities`` accepts `ModalityConfig` objects or plain dicts (as read from config.json) and
    always holds `ModalityConfig` objects afterwards. The Omni hub's and the extension guide's flat
    fields (see the module docstring) are accepted as keyword arguments and mapped onto it.

    Raises:
        ValueError: for any field of the wrong type or value, naming the field (``text_config: ...``,
            ``<modality>: ...``); never a TypeError or transformers' own validation error.
    """

    model_type = "hcx_omni"
    sub_configs_defaults = {"text_config": SubConfigSpec(config_class=AutoConfig, model_type="hyperclovax")}

    text_config: dict | PreTrainedConfig | None = None
    modalities: dict | None = None

    def __post_init__(self, **kwargs):
        kwargs.pop("model_type", None)  # "vlm" in the Omni hub config; ours is fixed
        flat_modalities = _modalities_from_flat_fields(kwargs)
        self.text_config = _text_config(self.text_config)
        for key, value in (("dtype", self.dtype), ("torch_dtype", kwargs.get("torch_dtype"))):
            if value is not None and not isinstance(value, torch.dtype) and not (
                    isinstance(value, str) and isinstance(getattr(torch, value, None), torch.dtype)):
                raise ValueError(f"{key} must name a torch dtype (float32, bfloat16, ...) or be null, got {value!r}")
        try:
            super().__post_init__(**kwargs)
        except _CONFIG_ERRORS as error:
            raise ValueError(f"config: {_short(error)}") from None
        if self.modalities is not None and not isinstance(self.modalities, dict):
            raise ValueError(f"modalities must be an object mapping names to modality configs, got {self.modalities!r}")
        modalities = {}
        for name, entry in (self.modalities or {}).items():
            modalities[name] = entry if isinstance(entry, ModalityConfig) else ModalityConfig.from_dict(name, entry)
        for name, entry in flat_modalities.items():
            if name in modalities:
                raise ValueError(f"modality {name!r} is given both in 'modalities' and as flat HCX/guide fields")
            modalities[name] = entry
        self.modalities = modalities
        self.validate_modalities()

    def validate_modalities(self) -> None:
        """Check that modalities sharing a module agree on its config and that token ids are distinct."""
        owner_of_module: dict[str, ModalityConfig] = {}
        owner_of_token: dict[int, str] = {}
        for modality in self.modalities.values():
            for module, spec in ((modality.encoder_module, modality.encoder), (modality.projector_module, modality.projector)):
                previous = owner_of_module.get(module)
                if previous is not None:
                    previous_spec = previous.encoder if module == previous.encoder_module else previous.projector
                    if previous_spec != spec:
                        raise ValueError(
                            f"{modality.name} and {previous.name} share module model.{module} but configure it "
                            "differently; give one of them its own encoder_module/projector_module"
                        )
                owner_of_module[module] = modality
            if modality.token_id is not None:
                if modality.token_id in owner_of_token:
                    raise ValueError(
                        f"{modality.name}: placeholder id {modality.token_id} is already used by "
                        f"{owner_of_token[modality.token_id]}"
                    )
                owner_of_token[modality.token_id] = modality.name

    def add_modality(self, modality: ModalityConfig | dict[str, Any], name: str | None = None) -> ModalityConfig:
        """Add a modality (object or dict) and re-validate; returns the stored `ModalityConfig`."""
        if isinstance(modality, dict):
            if name is None and not isinstance(modality.get("name"), str):
                raise ValueError(f"a modality dict needs a 'name'; got keys {sorted(map(str, modality))}")
            modality = ModalityConfig.from_dict(name or modality["name"], modality)
        if modality.name in self.modalities:
            raise ValueError(f"modality {modality.name!r} already exists; remove it first or pick another name")
        self.modalities[modality.name] = modality
        try:
            self.validate_modalities()
        except ValueError:
            del self.modalities[modality.name]
            raise
        return modality

    def modality(self, name: str) -> ModalityConfig:
        """The `ModalityConfig` called ``name``; a ValueError lists the known ones otherwise."""
        if name not in self.modalities:
            raise ValueError(f"unknown modality {name!r}; this model has {sorted(self.modalities) or 'none'}")
        return self.modalities[name]

    def to_dict(self) -> dict[str, Any]:
        output = super().to_dict()
        output["modalities"] = {name: m.to_dict() for name, m in self.modalities.items()}
        return output

    def to_diff_dict(self) -> dict[str, Any]:
        output = super().to_diff_dict()
        output["modalities"] = {name: m.to_dict() for name, m in self.modalities.items()}
        return output


AutoConfig.register("hcx_omni", OmniConfig)
