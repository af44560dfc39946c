"""What a path on disk holds, described in HCX terms: a `Source` with an `OmniConfig` and HCX-layout tensors.

`read_source` recognises four kinds and reads nothing from a hub:

* ``omni``: an HCX-layout omni checkpoint (ours, a merged run, or the Omni hub's ``model_type: "vlm"``);
* ``vision_v2``: a transformers ``HyperCLOVAXVisionV2`` checkpoint, in either key spelling
  (`hcx_extend.layout.hcx_key_from_vision_v2`): one vision tower shared by image and video and one
  Linear projector;
* ``causal_lm``: a plain causal LM folder (``model.*``, ``lm_head.*``), which becomes an omni model with
  no modalities;
* ``gguf``: a ``.gguf`` file (dequantised to float32 by transformers while loading).

Tensors are streamed (`hcx_extend.layout.iter_safetensors`), so describing a source reads no weight.
A `Source` also says which token ids its configs declare special (`Source.special_ids`), so no
placeholder is ever put on a BOS/EOS/PAD/UNK id, whichever tokenizer comes with it.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import torch
from huggingface_hub.errors import StrictDataclassError
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from hcx_extend.checkpoint.modality_file import check_modality
from hcx_extend.config import HCX_IMAGE_TOKEN_ID, HCX_VIDEO_TOKEN_ID, ModalityConfig, OmniConfig
from hcx_extend.layout import (
    CONFIG_FILE,
    hcx_key_from_causal_lm,
    hcx_key_from_vision_v2,
    interrupted_save_hint,
    iter_named,
    iter_safetensors,
    read_config_dict,
    read_json,
    safetensors_keys,
)
from hcx_extend.processor import declared_special_ids

GENERATION_CONFIG_FILE = "generation_config.json"
OMNI_TYPES = ("hcx_omni", "vlm")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
VISION_V2_TYPE = "hyperclovax_vision_v2"


@dataclass
class Source:
    """A model read from disk: its kind, its config, a stream of HCX-layout tensors, its tokenizer.

    Attributes:
        kind: "omni", "vision_v2", "causal_lm" or "gguf".
        config: the `OmniConfig` (modalities of the source, if any).
        tensors: ``(key, tensor)`` pairs in the HCX layout; iterate once.
        tokenizer: the tokenizer found beside the weights, or None (also for a folder without
            tokenizer files, where transformers would make up one; see `load_tokenizer`).
        path: where it was read from.
        special_ids: ``{token id: where it is declared}`` for the BOS/EOS/PAD/UNK ids of config.json
            (top level and text_config) and generation_config.json
            (`hcx_extend.processor.declared_special_ids`).
    """

    kind: str
    config: OmniConfig
    tensors: Iterable[tuple[str, torch.Tensor]]
    tokenizer: Any = None
    path: Path | None = None
    special_ids: dict[int, str] = field(default_factory=dict)


def load_tokenizer(directory: Path, **kwargs) -> Any:
    """The tokenizer saved in ``directory``, or None when there is none (or only a made-up one).

    For a folder without tokenizer files transformers can return a tokenizer that holds no ordinary
    token: an empty one, or (for a HyperCLOVAXVisionV2 config) GPT-2's with ``<|endoftext|>`` alone at
    id 0. That is treated as no tokenizer: it cannot encode text, and a placeholder added to it would
    take id 1, which such a checkpoint declares as BOS.

    Raises:
        ValueError: ``directory`` has tokenizer files that cannot be read (truncated, corrupt), naming them.
    """
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(directory), **kwargs)
    except Exception as error:  # noqa: BLE001 - the tokenizers library raises bare Exceptions for corrupt files
        present = [name for name in TOKENIZER_FILES if (Path(directory) / name).is_file()]
        if present:
            raise ValueError(f"{directory}: its tokenizer ({', '.join(present)}) cannot be read "
                             f"({' '.join(str(error).split())[:300] or type(error).__name__}); the file may be "
                             "truncated or corrupt") from None
        return None
    ordinary_tokens = len(tokenizer) - len(tokenizer.get_added_vocab())
    return tokenizer if ordinary_tokens > 0 else None


def _folder_special_ids(path: Path, raw: dict[str, Any]) -> dict[int, str]:
    """The special ids config.json (top level and text_config) and generation_config.json declare."""
    generation_path = path / GENERATION_CONFIG_FILE
    generation = read_json(generation_path) if generation_path.is_file() else None
    if generation is not None and not isinstance(generation, dict):
        raise ValueError(f"{generation_path}: expected a JSON object, got {type(generation).__name__}")
    return declared_special_ids([(CONFIG_FILE, raw), (f"{CONFIG_FILE} text_config", raw.get("text_config")),
                                 (GENERATION_CONFIG_FILE, generation)])


def read_source(path: str | os.PathLike) -> Source:
    """Recognise what ``path`` holds and describe it as a `Source` (nothing is downloaded).

    Raises:
        FileNotFoundError: ``path`` does not exist, or a folder lacks config.json or weights.
        ValueError: naming the file that is wrong: config.json (its fields checked as `read_omni_config`
            does), a safetensors file or index, tokenizer files, a .gguf file.
    """
    path = Path(path)
    if path.is_file() and path.suffix == ".gguf":
        return _read_gguf(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist{interrupted_save_hint(path)}")
    if not path.is_dir():
        raise ValueError(f"{path} is neither a checkpoint folder nor a .gguf file")
    raw = read_config_dict(path)
    model_type = raw.get("model_type")
    # The config is checked before the tokenizer is read: transformers reads config.json for it too, and
    # would warn about a broken one before the clear error below.
    if model_type in (*OMNI_TYPES, VISION_V2_TYPE):
        keys = safetensors_keys(path)
        vision_v2 = model_type == VISION_V2_TYPE or any(
            k.startswith(("model.vision_projector.", "model.projector.")) for k in keys)
        if vision_v2:
            config = _config_from_vision_v2(raw, path)
            return Source("vision_v2", config, iter_named(iter_safetensors(path), hcx_key_from_vision_v2),
                          load_tokenizer(path), path, _folder_special_ids(path, raw))
        config = _omni_config(raw, path)
        return Source("omni", config, iter_safetensors(path), load_tokenizer(path), path,
                      _folder_special_ids(path, raw))
    if not isinstance(model_type, str) or not model_type:
        raise ValueError(f"{path / CONFIG_FILE} has no model_type; it is not a checkpoint this package can read")
    try:
        text_config = AutoConfig.from_pretrained(str(path), local_files_only=True)
    except (OSError, StrictDataclassError, ValueError, TypeError, KeyError, AttributeError, ArithmeticError) as error:
        raise ValueError(f"{path / CONFIG_FILE}: not a config transformers can read "
                         f"({' '.join(str(error).split())[:300]})") from None
    try:
        config = OmniConfig(text_config=text_config.to_dict(), modalities={})
    except ValueError as error:
        raise ValueError(f"{path / CONFIG_FILE}: {error}") from None
    return Source("causal_lm", config, iter_named(iter_safetensors(path), hcx_key_from_causal_lm),
                  load_tokenizer(path), path, _folder_special_ids(path, raw))


def read_omni_config(directory: str | os.PathLike) -> OmniConfig:
    """The `OmniConfig` in ``directory/config.json``, every modality checked (`check_modality`).

    The one reader of an omni folder's config for everything that builds a model from it: a wrong
    type, a missing field or an encoder setting its constructor rejects fails here, naming the file,
    not deep inside torch.

    Raises:
        FileNotFoundError: no such folder or no config.json in it.
        ValueError: ``"<folder>/config.json: <what is wrong>"``.
    """
    directory = Path(directory)
    return _omni_config(read_config_dict(directory), directory)


def _omni_config(raw: dict[str, Any], path: Path) -> OmniConfig:
    try:
        config = OmniConfig(**raw)
        for modality in config.modalities.values():
            check_modality(modality)
    except ValueError as error:
        raise ValueError(f"{path / CONFIG_FILE}: {error}") from None
    return config


def _config_from_vision_v2(raw: dict[str, Any], path: Path) -> OmniConfig:
    """HyperCLOVAXVisionV2: one vision tower shared by image and video, one Linear projector."""
    raw = dict(raw)
    if not isinstance(raw.get("vision_config"), dict) or not isinstance(raw.get("text_config"), dict):
        raise ValueError(f"{path / CONFIG_FILE}: a HyperCLOVAXVisionV2 config needs vision_config and text_config "
                         "objects")
    vision = dict(raw["vision_config"])
    if vision.get("model_type") in ("qwen2_5_vl", "qwen2_5_vl_visual", None):
        vision["model_type"] = "qwen2_5_vl_vision"
    text = dict(raw["text_config"])
    text.setdefault("model_type", "hyperclovax")
    text["tie_word_embeddings"] = raw.get("tie_word_embeddings", True)
    image_id = raw.get("image_token_id", HCX_IMAGE_TOKEN_ID)
    video_id = raw.get("video_token_id", HCX_VIDEO_TOKEN_ID)
    try:
        config = OmniConfig(
            text_config=text,
            modalities={
                "image": ModalityConfig("image", encoder=vision, projector={"type": "linear"}, token_id=image_id),
                "video": ModalityConfig("video", encoder=vision, projector={"type": "linear"}, token_id=video_id),
            },
        )
        for modality in config.modalities.values():
            check_modality(modality)
    except ValueError as error:
        raise ValueError(f"{path / CONFIG_FILE}: {error}") from None
    return config


# What the gguf reader raises for a file that is not a complete GGUF model (a truncated file fails inside
# struct.unpack or NumPy's buffer views).
_GGUF_ERRORS = (OSError, EOFError, ValueError, KeyError, IndexError, TypeError, RuntimeError, struct.error,
                StrictDataclassError)


def _read_gguf(path: Path) -> Source:
    try:
        llm = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name)
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    except _GGUF_ERRORS as error:
        raise ValueError(f"{path}: could not read as a GGUF model ({' '.join(str(error).split())[:300]}); the file "
                         "may be truncated or corrupt") from None
    state = llm.state_dict()
    if getattr(llm.config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)
    text_config = llm.config.to_dict()
    text_config.pop("quantization_config", None)  # the weights are dequantised now
    config = OmniConfig(text_config=text_config, modalities={})
    special_ids = declared_special_ids([(path.name, text_config),
                                        (f"{path.name} generation config", llm.generation_config.to_dict())])
    return Source("gguf", config, iter_named(list(state.items()), hcx_key_from_causal_lm), tokenizer, path,
                  special_ids)
