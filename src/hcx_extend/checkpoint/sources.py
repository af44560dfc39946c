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
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from hcx_extend.config import HCX_IMAGE_TOKEN_ID, HCX_VIDEO_TOKEN_ID, ModalityConfig, OmniConfig
from hcx_extend.layout import (
    hcx_key_from_causal_lm,
    hcx_key_from_vision_v2,
    iter_named,
    iter_safetensors,
    read_config_dict,
    safetensors_keys,
)

OMNI_TYPES = ("hcx_omni", "vlm")
VISION_V2_TYPE = "hyperclovax_vision_v2"


@dataclass
class Source:
    """A model read from disk: its kind, its config, a stream of HCX-layout tensors, its tokenizer.

    Attributes:
        kind: "omni", "vision_v2", "causal_lm" or "gguf".
        config: the `OmniConfig` (modalities of the source, if any).
        tensors: ``(key, tensor)`` pairs in the HCX layout; iterate once.
        tokenizer: the tokenizer found beside the weights, or None.
        path: where it was read from.
    """

    kind: str
    config: OmniConfig
    tensors: Iterable[tuple[str, torch.Tensor]]
    tokenizer: Any = None
    path: Path | None = None


def load_tokenizer(directory: Path, **kwargs) -> Any:
    """The tokenizer saved in ``directory``, or None when there is none (or only an empty one).

    transformers can return a tokenizer with an empty vocabulary for a folder that has no tokenizer
    files; that is treated as no tokenizer, so a placeholder id is never taken from it.
    """
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(directory), **kwargs)
    except (OSError, ValueError, TypeError, KeyError):
        return None
    return tokenizer if len(tokenizer) > 0 else None


def read_source(path: str | os.PathLike) -> Source:
    """Recognise what ``path`` holds and describe it as a `Source` (nothing is downloaded)."""
    path = Path(path)
    if path.is_file() and path.suffix == ".gguf":
        return _read_gguf(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist")
    if not path.is_dir():
        raise ValueError(f"{path} is neither a checkpoint folder nor a .gguf file")
    raw = read_config_dict(path)
    model_type = raw.get("model_type")
    tokenizer = load_tokenizer(path)
    if model_type in (*OMNI_TYPES, VISION_V2_TYPE):
        keys = safetensors_keys(path)
        vision_v2 = model_type == VISION_V2_TYPE or any(
            k.startswith(("model.vision_projector.", "model.projector.")) for k in keys)
        if vision_v2:
            return Source("vision_v2", _config_from_vision_v2(raw, path),
                          iter_named(iter_safetensors(path), hcx_key_from_vision_v2), tokenizer, path)
        return Source("omni", _omni_config(raw, path), iter_safetensors(path), tokenizer, path)
    if not model_type:
        raise ValueError(f"{path}/config.json has no model_type; it is not a checkpoint this package can read")
    try:
        text_config = AutoConfig.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError, TypeError, KeyError) as error:
        raise ValueError(f"{path}/config.json: not a config transformers can read ({error})") from None
    config = OmniConfig(text_config=text_config.to_dict(), modalities={})
    return Source("causal_lm", config, iter_named(iter_safetensors(path), hcx_key_from_causal_lm), tokenizer, path)


def _omni_config(raw: dict[str, Any], path: Path) -> OmniConfig:
    try:
        return OmniConfig(**raw)
    except (TypeError, ValueError) as error:
        raise ValueError(f"{path}/config.json: {error}") from None


def _config_from_vision_v2(raw: dict[str, Any], path: Path) -> OmniConfig:
    """HyperCLOVAXVisionV2: one vision tower shared by image and video, one Linear projector."""
    raw = dict(raw)
    if "vision_config" not in raw or "text_config" not in raw:
        raise ValueError(f"{path}/config.json: a HyperCLOVAXVisionV2 config needs vision_config and text_config")
    vision = dict(raw["vision_config"])
    if vision.get("model_type") in ("qwen2_5_vl", "qwen2_5_vl_visual", None):
        vision["model_type"] = "qwen2_5_vl_vision"
    text = dict(raw["text_config"])
    text.setdefault("model_type", "hyperclovax")
    text["tie_word_embeddings"] = raw.get("tie_word_embeddings", True)
    image_id = raw.get("image_token_id", HCX_IMAGE_TOKEN_ID)
    video_id = raw.get("video_token_id", HCX_VIDEO_TOKEN_ID)
    return OmniConfig(
        text_config=text,
        modalities={
            "image": ModalityConfig("image", encoder=vision, projector={"type": "linear"}, token_id=image_id),
            "video": ModalityConfig("video", encoder=vision, projector={"type": "linear"}, token_id=video_id),
        },
    )


def _read_gguf(path: Path) -> Source:
    try:
        llm = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name)
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    except (OSError, ValueError, KeyError) as error:
        raise ValueError(f"{path}: could not read as a GGUF model ({error})") from None
    state = llm.state_dict()
    if getattr(llm.config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)
    text_config = llm.config.to_dict()
    text_config.pop("quantization_config", None)  # the weights are dequantised now
    config = OmniConfig(text_config=text_config, modalities={})
    return Source("gguf", config, iter_named(list(state.items()), hcx_key_from_causal_lm), tokenizer, path)
