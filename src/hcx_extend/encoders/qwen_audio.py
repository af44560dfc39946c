"""The Qwen2-Audio encoder (``model.audio_model`` of HyperCLOVA X) as a modality encoder.

transformers' ``qwen2_audio_encoder`` takes Whisper log-mel features padded to exactly
``2 * max_source_positions`` frames (30 s at 100 frames/s for the real model) and halves the time
axis twice (a stride-2 convolution, then average pooling): an item of ``n`` valid frames yields
``((n - 1) // 2 + 1 - 2) // 2 + 1`` embeddings, i.e. 25 per second of audio. Padding is masked out
of the attention so an item's embeddings do not depend on what it is batched with.

Items: log-mel features ``(mel_bins, frames)``; compute them with transformers'
``WhisperFeatureExtractor`` (16 kHz audio, hop 160).

The attention mask is built from ``feature_attention_mask`` on the device that mask is on (the model's
device in a forward pass, the CPU when the memory estimator traces on the meta device) and then moved
to the encoder's device.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers import AutoModel
from transformers.masking_utils import create_bidirectional_mask

from hcx_extend.config import InputContract, ModalityConfig
from hcx_extend.encoders.base import (
    ModalityEncoder,
    as_float_tensor,
    check_channels,
    check_finite,
    check_items,
    check_length,
    check_rank,
)
from hcx_extend.encoders.hf_config import encoder_config

# Sizes that must be integers >= 1; the attention heads must divide d_model.
POSITIVE = ("num_mel_bins", "encoder_layers", "encoder_attention_heads", "encoder_ffn_dim", "d_model",
            "max_source_positions")


def audio_token_count(frames: int) -> int:
    """Embeddings the Qwen2-Audio encoder yields for ``frames`` valid mel frames."""
    after_conv = (frames - 1) // 2 + 1
    return (after_conv - 2) // 2 + 1


def audio_config(config: dict[str, Any], owner: str = "qwen2_audio_encoder encoder"):
    """transformers' ``Qwen2AudioEncoderConfig`` for ``config``; bad settings raise a ValueError naming ``owner``."""
    return encoder_config(config, owner, POSITIVE, divides=("encoder_attention_heads", "d_model"))


class QwenAudioEncoder(ModalityEncoder):
    kind = "audio"

    def build(self, config: dict[str, Any]) -> nn.Module:
        return AutoModel.from_config(audio_config(config))

    def output_size(self, config: dict[str, Any]) -> int:
        return int(audio_config(config).d_model)

    def resolve_contract(self, modality: ModalityConfig) -> InputContract:
        audio_config(modality.encoder, modality.name)  # settings errors name the modality
        return super().resolve_contract(modality)

    def default_contract(self, config: dict[str, Any]) -> InputContract:
        resolved = audio_config(config)
        return InputContract(
            kind="audio", channels=resolved.num_mel_bins, max_length=2 * resolved.max_source_positions, sample_rate=100.0
        )

    def collate(self, items: list[Any], modality: ModalityConfig) -> dict[str, torch.Tensor]:
        padded_length = modality.input.max_length
        features, mask = [], []
        for index, item in enumerate(items):
            mel = as_float_tensor(item, modality)
            check_rank(mel, (2,), modality, index)
            check_channels(mel.shape[0], modality, tuple(mel.shape), index)
            check_length(mel.shape[1], modality, index, unit="frames")
            check_finite(mel, modality)
            length = mel.shape[1]
            features.append(torch.nn.functional.pad(mel, (0, padded_length - length)))
            mask.append(torch.arange(padded_length) < length)
        return {"input_features": torch.stack(features), "feature_attention_mask": torch.stack(mask).long()}

    def token_counts(self, batch: dict[str, torch.Tensor], modality: ModalityConfig) -> list[int]:
        return [audio_token_count(int(n)) for n in batch["feature_attention_mask"].sum(-1).tolist()]

    def validate_batch(self, batch: dict[str, torch.Tensor], modality: ModalityConfig) -> None:
        missing = {"input_features", "feature_attention_mask"} - set(batch)
        if missing:
            raise ValueError(f"{modality.name}: batch lacks {sorted(missing)}; build it with OmniProcessor")
        features, mask = batch["input_features"], batch["feature_attention_mask"]
        if features.dim() != 3:
            raise ValueError(
                f"{modality.name}: input_features must be (items, mel_bins, frames), got shape {tuple(features.shape)}"
            )
        check_channels(features.shape[1], modality, tuple(features.shape))
        if features.shape[2] != modality.input.max_length or mask.shape != (features.shape[0], features.shape[2]):
            raise ValueError(
                f"{modality.name}: input_features must be padded to {modality.input.max_length} frames with a matching "
                f"(items, frames) feature_attention_mask; got {tuple(features.shape)} and {tuple(mask.shape)}"
            )
        for index, length in enumerate(mask.sum(-1).tolist()):
            check_length(int(length), modality, index, unit="frames")
        check_finite(features, modality)

    def example_batch(self, modality: ModalityConfig, items: int, size: int | None,
                      device: torch.device | str = "meta") -> dict[str, torch.Tensor]:
        """``items`` clips of ``size`` valid mel frames (None: the whole window), padded to the window as `collate` pads.

        input_features ``(items, mel_bins, window)`` on ``device``; feature_attention_mask ``(items, window)`` on the CPU.
        """
        check_items(items, modality)
        window = modality.input.max_length
        frames = window if size is None else size
        check_length(frames, modality, unit="frames")
        features = torch.empty(items, modality.input.channels, window, device=device,
                               dtype=getattr(torch, modality.input.dtype))
        mask = (torch.arange(window) < frames).long().expand(items, window).contiguous()
        return {"input_features": features, "feature_attention_mask": mask}

    def encode(self, module: nn.Module, batch: dict[str, torch.Tensor], modality: ModalityConfig) -> list[torch.Tensor]:
        parameter = next(module.parameters())
        features = batch["input_features"].to(parameter.device, parameter.dtype)
        frame_mask = batch["feature_attention_mask"]
        # Attention runs after the stride-2 convolution: mask positions beyond each item's conv length.
        conv_lengths = (frame_mask.sum(-1) - 1) // 2 + 1
        positions = features.shape[-1] // 2
        mask_2d = (torch.arange(positions, device=frame_mask.device)[None, :] < conv_lengths[:, None]).long()
        attention_mask = create_bidirectional_mask(
            config=module.config,
            inputs_embeds=torch.zeros(features.shape[0], positions, 1, dtype=parameter.dtype, device=frame_mask.device),
            attention_mask=mask_2d,
        )
        if attention_mask is not None:
            attention_mask = attention_mask.to(parameter.device)
        hidden = module(features, attention_mask=attention_mask).last_hidden_state
        return [hidden[i, :count] for i, count in enumerate(self.token_counts(batch, modality))]
