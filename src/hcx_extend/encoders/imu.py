"""An encoder for inertial (IMU) and other multichannel sensor streams, built in as type ``imu``.

The extension guide's design (Conv1d over channels -> Transformer encoder -> Linear to the encoder
width; 6 -> 256 -> 1280 by default), with what the guide's version lacks:

* batch-first tensors and a padding mask, so an item gives the same embeddings whether it is run
  alone or batched with longer items;
* attention with separate ``q_proj``/``k_proj``/``v_proj``/``o_proj`` Linear layers, so LoRA recipes
  that target ``q_proj``/``v_proj`` apply (``nn.TransformerEncoder`` fuses them into ``in_proj_weight``);
* optional sinusoidal positions (``positions="sinusoidal"``); off by default like the guide's: the
  convolution already encodes local order and the LLM's own positions order the tokens, and on
  BasicMotions validation splits adding them slowed learning;
* optional temporal pooling: ``stride`` consecutive steps are averaged into one token (padding
  excluded), so long recordings give ``ceil(steps / stride)`` tokens.

Shapes: ``values (batch, time, channels)``, ``lengths (batch,)`` ->
``features (batch, ceil(time / stride), output_size)``, ``out_lengths (batch,)``.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

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
from hcx_extend.pooling import masked_mean_pool

IMU_DEFAULTS: dict[str, Any] = {
    "in_channels": 6,
    "hidden_size": 256,
    "num_layers": 4,
    "num_heads": 8,
    "ffn_size": 1024,
    "dropout": 0.1,
    "output_size": 1280,
    "stride": 1,
    "kernel_size": 3,
    "positions": "none",
    "max_length": 8192,
}


class IMUAttention(nn.Module):
    """Multi-head self-attention with separate q/k/v/o projections and a key padding mask.

    Args:
        hidden_size: model width; must be divisible by ``num_heads``.
        num_heads: attention heads.
        dropout: attention-probability dropout (training only).
    """

    def __init__(self, hidden_size: int, num_heads: int, dropout: float):
        super().__init__()
        if hidden_size % num_heads:
            raise ValueError(f"imu encoder: hidden_size {hidden_size} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.dropout = dropout
        self.q_proj = nn.Linear(hidden_size, hidden_size)
        # No key bias (as in Whisper): softmax ignores a constant added to every key, so its gradient is
        # zero and AdamW would only turn rounding noise into full-size steps.
        self.k_proj = nn.Linear(hidden_size, hidden_size, bias=False)
        self.v_proj = nn.Linear(hidden_size, hidden_size)
        self.o_proj = nn.Linear(hidden_size, hidden_size)

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
        """x ``(batch, time, hidden)``, key_mask ``(batch, time)`` True where valid -> ``(batch, time, hidden)``."""
        batch, time, hidden = x.shape

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.view(batch, time, self.num_heads, hidden // self.num_heads).transpose(1, 2)

        attended = F.scaled_dot_product_attention(
            heads(self.q_proj(x)),
            heads(self.k_proj(x)),
            heads(self.v_proj(x)),
            attn_mask=key_mask[:, None, None, :],
            dropout_p=self.dropout if self.training else 0.0,
        )
        return self.o_proj(attended.transpose(1, 2).reshape(batch, time, hidden))


class IMUEncoderLayer(nn.Module):
    """Pre-norm Transformer layer: ``x + attn(norm1(x))``, then ``x + ffn(norm2(x))`` (GELU feed-forward)."""

    def __init__(self, hidden_size: int, num_heads: int, ffn_size: int, dropout: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size)
        self.self_attn = IMUAttention(hidden_size, num_heads, dropout)
        self.norm2 = nn.LayerNorm(hidden_size)
        self.fc1 = nn.Linear(hidden_size, ffn_size)
        self.fc2 = nn.Linear(ffn_size, hidden_size)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
        x = x + self.dropout(self.self_attn(self.norm1(x), key_mask))
        return x + self.dropout(self.fc2(self.dropout(F.gelu(self.fc1(self.norm2(x))))))


def sinusoidal_positions(length: int, width: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """The Transformer paper's fixed sin/cos position table, ``(length, width)``."""
    position = torch.arange(length, device=device, dtype=torch.float32)[:, None]
    frequency = torch.exp(torch.arange(0, width, 2, device=device, dtype=torch.float32) * (-math.log(10000.0) / width))
    table = torch.zeros(length, width, device=device, dtype=torch.float32)
    table[:, 0::2] = torch.sin(position * frequency)
    table[:, 1::2] = torch.cos(position * frequency[: width // 2])
    return table.to(dtype)


class IMUEncoder(nn.Module):
    """Conv1d -> (masked mean pooling) -> (sinusoidal positions) -> Transformer layers -> LayerNorm -> Linear.

    Args:
        in_channels: sensor channels (6 for accelerometer + gyroscope).
        hidden_size: Transformer width (guide: 256).
        num_layers / num_heads / ffn_size / dropout: Transformer settings (guide: 4 layers, 8 heads).
        output_size: width of the returned embeddings (guide: 1280), the projector's input.
        stride: steps averaged into one token (1 = one token per step).
        kernel_size: temporal kernel of the input convolution (odd).
        positions: "none" (order comes from the convolution and the LLM) or "sinusoidal" (added after pooling).
    """

    def __init__(
        self,
        in_channels: int = 6,
        hidden_size: int = 256,
        num_layers: int = 4,
        num_heads: int = 8,
        ffn_size: int = 1024,
        dropout: float = 0.1,
        output_size: int = 1280,
        stride: int = 1,
        kernel_size: int = 3,
        positions: str = "none",
    ):
        super().__init__()
        if positions not in ("sinusoidal", "none"):
            raise ValueError(f"imu encoder: positions must be 'sinusoidal' or 'none', got {positions!r}")
        self.positions = positions
        if stride < 1:
            raise ValueError(f"imu encoder: stride must be >= 1, got {stride}")
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"imu encoder: kernel_size must be a positive odd number, got {kernel_size}")
        self.stride = stride
        self.input_conv = nn.Conv1d(in_channels, hidden_size, kernel_size, padding=kernel_size // 2)
        self.layers = nn.ModuleList(
            IMUEncoderLayer(hidden_size, num_heads, ffn_size, dropout) for _ in range(num_layers)
        )
        self.norm = nn.LayerNorm(hidden_size)
        self.output_proj = nn.Linear(hidden_size, output_size)

    def output_lengths(self, lengths: torch.Tensor) -> torch.Tensor:
        return torch.div(lengths + self.stride - 1, self.stride, rounding_mode="floor")

    def forward(self, values: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mask = torch.arange(values.shape[1], device=values.device)[None, :] < lengths.to(values.device)[:, None]
        # Zero the padding first: the convolution then sees at an item's end exactly the zeros it would
        # see from its own padding when run alone.
        x = self.input_conv((values * mask[..., None]).transpose(1, 2)).transpose(1, 2)
        if self.stride > 1:
            x, mask = masked_mean_pool(x, mask, self.stride)
        if self.positions == "sinusoidal":
            x = x + sinusoidal_positions(x.shape[1], x.shape[2], x.device, x.dtype)
        for layer in self.layers:
            x = layer(x, mask)
        features = self.output_proj(self.norm(x)) * mask[..., None]
        return features, mask.sum(1)


_POSITIVE_INTS = ("in_channels", "hidden_size", "num_heads", "ffn_size", "output_size", "stride", "kernel_size",
                  "max_length")


def check_imu_settings(settings: dict[str, Any]) -> None:
    """Types and ranges of the IMU encoder's settings, checked before any module is built."""
    for key in _POSITIVE_INTS:
        value = settings[key]
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"imu encoder: {key} must be a positive integer, got {value!r}")
    layers = settings["num_layers"]
    if not isinstance(layers, int) or isinstance(layers, bool) or layers < 0:
        raise ValueError(f"imu encoder: num_layers must be an integer >= 0, got {layers!r}")
    dropout = settings["dropout"]
    if not isinstance(dropout, (int, float)) or isinstance(dropout, bool) or not 0 <= dropout < 1:
        raise ValueError(f"imu encoder: dropout must be a number in [0, 1), got {dropout!r}")
    if settings["positions"] not in ("none", "sinusoidal"):
        raise ValueError(f"imu encoder: positions must be 'none' or 'sinusoidal', got {settings['positions']!r}")
    if settings["kernel_size"] % 2 == 0:
        raise ValueError(f"imu encoder: kernel_size must be odd, got {settings['kernel_size']}")
    if settings["hidden_size"] % settings["num_heads"]:
        raise ValueError(f"imu encoder: hidden_size {settings['hidden_size']} is not divisible by num_heads "
                         f"{settings['num_heads']}")


class IMUModalityEncoder(ModalityEncoder):
    """Items are ``(time, channels)`` arrays; batches are ``{"values": (n, time, channels), "lengths": (n,)}``."""

    kind = "sensor"

    @staticmethod
    def settings(config: dict[str, Any]) -> dict[str, Any]:
        unknown = set(config) - set(IMU_DEFAULTS) - {"model_type"}
        if unknown:
            raise ValueError(f"imu encoder: unknown settings {sorted(unknown)}; known: {sorted(IMU_DEFAULTS)}")
        settings = {**IMU_DEFAULTS, **{k: v for k, v in config.items() if k != "model_type"}}
        check_imu_settings(settings)
        return settings

    def build(self, config: dict[str, Any]) -> nn.Module:
        settings = self.settings(config)
        settings.pop("max_length")
        return IMUEncoder(**settings)

    def output_size(self, config: dict[str, Any]) -> int:
        return int(self.settings(config)["output_size"])

    def default_contract(self, config: dict[str, Any]) -> InputContract:
        settings = self.settings(config)
        return InputContract(kind="sensor", channels=settings["in_channels"], max_length=settings["max_length"])

    def collate(self, items: list[Any], modality: ModalityConfig) -> dict[str, torch.Tensor]:
        tensors = []
        for index, item in enumerate(items):
            tensor = as_float_tensor(item, modality)
            check_rank(tensor, (2,), modality, index)
            check_channels(tensor.shape[1], modality, tuple(tensor.shape), index)
            check_length(tensor.shape[0], modality, index)
            check_finite(tensor, modality)
            if modality.normalization is not None:
                mean = torch.tensor(modality.normalization["mean"], dtype=tensor.dtype)
                std = torch.tensor(modality.normalization["std"], dtype=tensor.dtype)
                if mean.numel() != tensor.shape[1]:
                    raise ValueError(
                        f"{modality.name}: normalization has {mean.numel()} channels, item {index} has {tensor.shape[1]}"
                    )
                tensor = (tensor - mean) / std
            tensors.append(tensor)
        lengths = torch.tensor([t.shape[0] for t in tensors], dtype=torch.long)
        values = torch.nn.utils.rnn.pad_sequence(tensors, batch_first=True)
        return {"values": values, "lengths": lengths}

    def token_counts(self, batch: dict[str, torch.Tensor], modality: ModalityConfig) -> list[int]:
        stride = self.settings(modality.encoder)["stride"]
        return [-(-int(n) // stride) for n in batch["lengths"].tolist()]

    def validate_batch(self, batch: dict[str, torch.Tensor], modality: ModalityConfig) -> None:
        missing = {"values", "lengths"} - set(batch)
        if missing:
            raise ValueError(f"{modality.name}: batch lacks {sorted(missing)}; build it with OmniProcessor")
        values, lengths = batch["values"], batch["lengths"]
        if values.dim() != 3:
            raise ValueError(
                f"{modality.name}: values must be (items, time, channels), got shape {tuple(values.shape)}"
            )
        check_channels(values.shape[2], modality, tuple(values.shape))
        if lengths.shape != (values.shape[0],):
            raise ValueError(
                f"{modality.name}: lengths must be ({values.shape[0]},) for {values.shape[0]} items, got {tuple(lengths.shape)}"
            )
        for index, length in enumerate(lengths.tolist()):
            check_length(int(length), modality, index)
            if length > values.shape[1]:
                raise ValueError(f"{modality.name}: item {index} claims {length} steps but values has {values.shape[1]}")
        check_finite(values, modality)

    def example_batch(self, modality: ModalityConfig, items: int, size: int | None,
                      device: torch.device | str = "meta") -> dict[str, torch.Tensor]:
        """``items`` recordings of ``size`` steps: values ``(items, size, channels)`` on ``device``, lengths on the CPU."""
        check_items(items, modality)
        if size is None:
            raise ValueError(f"{modality.name}: an example sensor batch needs a number of time steps")
        check_length(size, modality)
        values = torch.empty(items, size, modality.input.channels, device=device,
                             dtype=getattr(torch, modality.input.dtype))
        return {"values": values, "lengths": torch.full((items,), size, dtype=torch.long)}

    def encode(self, module: nn.Module, batch: dict[str, torch.Tensor], modality: ModalityConfig) -> list[torch.Tensor]:
        parameter = next(module.parameters())
        features, _ = module(batch["values"].to(parameter.device, parameter.dtype), batch["lengths"])
        # Token counts from the batch's lengths, not from the module's output: they are known on the host
        # without a device sync (and on the meta device, where tensors hold no values).
        return [features[i, :n] for i, n in enumerate(self.token_counts(batch, modality))]
