"""The Qwen2.5-VL vision tower (``model.vision_model`` of HyperCLOVA X) as a modality encoder.

The tower is transformers' own ``qwen2_5_vl_vision`` model. Its input is not an image tensor but a
flat list of patches: each image is resized so both sides are multiples of ``patch_size *
spatial_merge_size``, normalised with the CLIP mean/std, repeated ``temporal_patch_size`` times in
time, and cut into ``(grid_t * grid_h * grid_w, channels * temporal_patch * patch * patch)`` rows,
ordered so that every ``spatial_merge_size x spatial_merge_size`` block of patches is contiguous
(the order the tower's patch merger expects). It returns one embedding per merged block:
``grid_t * grid_h * grid_w / spatial_merge_size**2`` tokens per item.

Items: an image ``(channels, height, width)`` or a video ``(frames, channels, height, width)``,
values in [0, 1].

The tower's index tables (rotary positions, window order, window and image boundaries) are data, not
activations: `encode` computes them from ``grid_thw`` where the grid is (the model's device in a
forward pass, the CPU when the memory estimator traces on the meta device) with transformers' own
helpers and passes them in, so the tower never reads values of device tensors.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModel
from transformers.vision_utils import get_vision_cu_seqlens, get_vision_position_ids, get_vision_window_index

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

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
DEFAULTS = {"patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2, "in_channels": 3}
# Sizes that must be integers >= 1; the heads must divide hidden_size.
POSITIVE = ("depth", "hidden_size", "intermediate_size", "num_heads", "out_hidden_size", "patch_size",
            "spatial_merge_size", "temporal_patch_size", "window_size", "in_channels")


def vision_config(config: dict[str, Any], owner: str = "qwen2_5_vl_vision encoder"):
    """transformers' ``Qwen2_5_VLVisionConfig`` for ``config``; bad settings raise a ValueError naming ``owner``."""
    return encoder_config(config, owner, POSITIVE, divides=("num_heads", "hidden_size"))


def _setting(config: dict[str, Any], key: str) -> int:
    return int(config.get(key, DEFAULTS[key]))


def patchify(frames: torch.Tensor, patch: int, merge: int, temporal: int) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """Cut ``(frames, channels, height, width)`` into the tower's patch rows.

    Height and width must already be multiples of ``patch * merge``; the frame count is padded to a
    multiple of ``temporal`` by repeating the last frame.

    Returns:
        patches ``(grid_t * grid_h * grid_w, channels * temporal * patch * patch)`` and ``(grid_t, grid_h, grid_w)``.
    """
    if frames.shape[0] % temporal:
        repeat = temporal - frames.shape[0] % temporal
        frames = torch.cat([frames, frames[-1:].expand(repeat, -1, -1, -1)])
    t, c, h, w = frames.shape
    grid_t, grid_h, grid_w = t // temporal, h // patch, w // patch
    x = frames.reshape(grid_t, temporal, c, grid_h // merge, merge, patch, grid_w // merge, merge, patch)
    # -> (grid_t, h_blocks, w_blocks, merge_h, merge_w, channels, temporal, patch, patch)
    x = x.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)
    return x.reshape(grid_t * grid_h * grid_w, c * temporal * patch * patch), (grid_t, grid_h, grid_w)


class QwenVisionEncoder(ModalityEncoder):
    kind = "image"

    def build(self, config: dict[str, Any]) -> nn.Module:
        return AutoModel.from_config(vision_config(config))

    def output_size(self, config: dict[str, Any]) -> int:
        return int(vision_config(config).out_hidden_size)

    def resolve_contract(self, modality: ModalityConfig) -> InputContract:
        vision_config(modality.encoder, modality.name)  # settings errors name the modality
        return super().resolve_contract(modality)

    def default_contract(self, config: dict[str, Any]) -> InputContract:
        return InputContract(kind="image", channels=vision_config(config).in_channels, max_length=16384)

    def collate(self, items: list[Any], modality: ModalityConfig) -> dict[str, torch.Tensor]:
        config = modality.encoder
        patch, merge = _setting(config, "patch_size"), _setting(config, "spatial_merge_size")
        temporal = _setting(config, "temporal_patch_size")
        side = patch * merge
        mean = torch.tensor(CLIP_MEAN[: modality.input.channels or 3]).view(1, -1, 1, 1)
        std = torch.tensor(CLIP_STD[: modality.input.channels or 3]).view(1, -1, 1, 1)
        rows, grids = [], []
        for index, item in enumerate(items):
            frames = as_float_tensor(item, modality)
            check_rank(frames, (3, 4), modality, index)
            frames = frames.unsqueeze(0) if frames.dim() == 3 else frames
            check_channels(frames.shape[1], modality, tuple(frames.shape), index)
            check_finite(frames, modality)
            if frames.shape[-1] < 1 or frames.shape[-2] < 1 or frames.shape[0] < 1:
                raise ValueError(f"{modality.name}: item {index} is empty (shape {tuple(frames.shape)})")
            height = max(side, round(frames.shape[-2] / side) * side)
            width = max(side, round(frames.shape[-1] / side) * side)
            if (height, width) != tuple(frames.shape[-2:]):
                frames = F.interpolate(frames, size=(height, width), mode="bilinear", align_corners=False)
            patches, grid = patchify((frames - mean.to(frames.dtype)) / std.to(frames.dtype), patch, merge, temporal)
            check_length(patches.shape[0], modality, index, unit="patches")
            rows.append(patches)
            grids.append(grid)
        return {"pixel_values": torch.cat(rows), "grid_thw": torch.tensor(grids, dtype=torch.long)}

    def token_counts(self, batch: dict[str, torch.Tensor], modality: ModalityConfig) -> list[int]:
        merge = _setting(modality.encoder, "spatial_merge_size")
        return [int(t * h * w) // (merge * merge) for t, h, w in batch["grid_thw"].tolist()]

    def validate_batch(self, batch: dict[str, torch.Tensor], modality: ModalityConfig) -> None:
        missing = {"pixel_values", "grid_thw"} - set(batch)
        if missing:
            raise ValueError(f"{modality.name}: batch lacks {sorted(missing)}; build it with OmniProcessor")
        config = modality.encoder
        row = _setting(config, "in_channels") * _setting(config, "temporal_patch_size") * _setting(config, "patch_size") ** 2
        pixels, grid = batch["pixel_values"], batch["grid_thw"]
        if pixels.dim() != 2 or pixels.shape[1] != row:
            raise ValueError(
                f"{modality.name}: pixel_values must be (patches, {row}), got shape {tuple(pixels.shape)}"
            )
        if grid.dim() != 2 or grid.shape[1] != 3:
            raise ValueError(f"{modality.name}: grid_thw must be (items, 3), got shape {tuple(grid.shape)}")
        patches_per_item = grid.prod(-1)
        if int(patches_per_item.sum()) != pixels.shape[0]:
            raise ValueError(
                f"{modality.name}: grid_thw describes {int(patches_per_item.sum())} patches but pixel_values has "
                f"{pixels.shape[0]}"
            )
        for index, count in enumerate(patches_per_item.tolist()):
            check_length(int(count), modality, index, unit="patches")
        check_finite(pixels, modality)

    def example_batch(self, modality: ModalityConfig, items: int, size: int | None,
                      device: torch.device | str = "meta") -> dict[str, torch.Tensor]:
        """``items`` square images of ``size`` pixels a side, resized as `collate` resizes them.

        pixel_values ``(patches, row)`` on ``device``; grid_thw ``(items, 3)`` on the CPU.
        """
        check_items(items, modality)
        if size is None or size < 1:
            raise ValueError(f"{modality.name}: an example image batch needs a side in pixels >= 1, got {size!r}")
        config = modality.encoder
        patch, merge, temporal = (_setting(config, k) for k in ("patch_size", "spatial_merge_size", "temporal_patch_size"))
        grid_side = max(patch * merge, round(size / (patch * merge)) * patch * merge) // patch
        check_length(grid_side * grid_side, modality, unit="patches")
        grid = torch.tensor([[1, grid_side, grid_side]] * items, dtype=torch.long)
        row = _setting(config, "in_channels") * temporal * patch * patch
        pixels = torch.empty(items * grid_side * grid_side, row, device=device, dtype=getattr(torch, modality.input.dtype))
        return {"pixel_values": pixels, "grid_thw": grid}

    def encode(self, module: nn.Module, batch: dict[str, torch.Tensor], modality: ModalityConfig) -> list[torch.Tensor]:
        parameter = next(module.parameters())
        pixels = batch["pixel_values"].to(parameter.device, parameter.dtype)
        grid = batch["grid_thw"]
        config = module.config
        window_index, cu_window_seqlens = get_vision_window_index(grid, config.spatial_merge_size, config.window_size,
                                                                  config.patch_size)
        output = module(
            pixels,
            grid_thw=grid,
            position_ids=get_vision_position_ids(grid, config.spatial_merge_size).to(parameter.device),
            cu_seqlens=get_vision_cu_seqlens(grid),
            window_index=window_index.to(parameter.device),
            cu_window_seqlens=cu_window_seqlens,
        )
        return list(torch.split(output.pooler_output, self.token_counts(batch, modality)))


def image_token_count(height: int, width: int, config: dict[str, Any], frames: int = 1) -> int:
    """Tokens the tower gives an image/video of this size (after the processor's resizing)."""
    patch, merge = _setting(config, "patch_size"), _setting(config, "spatial_merge_size")
    side = patch * merge
    grid_h = max(side, round(height / side) * side) // patch
    grid_w = max(side, round(width / side) * side) // patch
    grid_t = math.ceil(frames / _setting(config, "temporal_patch_size"))
    return grid_t * grid_h * grid_w // (merge * merge)
