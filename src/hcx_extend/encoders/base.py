"""The contract between hcx-extend and one kind of encoder, and the input checks all encoders share.

An encoder module itself (a Qwen2.5-VL tower, a Qwen2-Audio tower, our IMU encoder) is a plain
``nn.Module`` that sits at ``model.<NAME>_model`` so checkpoints keep the HyperCLOVA X key layout.
Everything that differs between encoder kinds lives in a stateless `ModalityEncoder` next to it:

* processor side: `collate` turns raw items into one batch dict and `token_counts` says how many
  embeddings (hence placeholder tokens) each item yields;
* model side: `validate_batch` rejects malformed batches and `encode` runs the module and returns one
  ``(tokens_i, output_size)`` tensor per item;
* memory estimation: `example_batch` builds a batch of a given size whose data tensors live on the
  meta device, so the memory estimator traces the real `encode` (through
  ``OmniForCausalLM.encode_modality``) without a second copy of the kind's facts. Metadata that
  `token_counts`, `validate_batch` and `encode` read as numbers (lengths, grids, frame masks) stays on
  the CPU there; `encode` never reads values of data tensors. A kind that does not implement
  `example_batch` is reported as untraced by the estimator.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import numpy as np
import torch
from torch import nn

from hcx_extend.config import InputContract, ModalityConfig


class ModalityEncoder(ABC):
    """How to build, feed and call one kind of encoder. Subclasses are stateless."""

    #: the `InputContract.kind` this encoder accepts
    kind: str = "sensor"

    @abstractmethod
    def build(self, config: dict[str, Any]) -> nn.Module:
        """A freshly initialised encoder module for ``config`` (the modality's ``encoder`` dict)."""

    @abstractmethod
    def output_size(self, config: dict[str, Any]) -> int:
        """Width of the embeddings `encode` returns (the projector's input size)."""

    @abstractmethod
    def default_contract(self, config: dict[str, Any]) -> InputContract:
        """The `InputContract` implied by the encoder config when the modality does not set one."""

    def resolve_contract(self, modality: ModalityConfig) -> InputContract:
        """Check the encoder settings and return the modality's input contract, filled and checked.

        An unset contract becomes `default_contract`; unset fields of a given one (channels, max_length,
        sample_rate) are taken from it. A contract that disagrees with the encoder (another kind, another
        channel count) is a ValueError naming both, so a bad modality file fails when it is read, not
        deep inside the encoder's first forward.
        """
        default = self.default_contract(modality.encoder)
        given = modality.input
        if given is None:
            return default
        if given.kind != default.kind:
            raise ValueError(f"{modality.name}: input.kind is {given.kind!r} but a {modality.encoder['model_type']!r} "
                             f"encoder takes {default.kind!r} inputs")
        if given.channels is not None and default.channels is not None and given.channels != default.channels:
            raise ValueError(
                f"{modality.name}: input.channels is {given.channels} but the encoder takes {default.channels}; "
                "make input.channels and the encoder's channel setting agree"
            )
        for key in ("channels", "max_length", "sample_rate"):
            if getattr(given, key) is None:
                setattr(given, key, getattr(default, key))
        return given

    @abstractmethod
    def collate(self, items: list[Any], modality: ModalityConfig) -> dict[str, torch.Tensor]:
        """Validate raw items and pack them into the batch dict `encode` takes."""

    @abstractmethod
    def token_counts(self, batch: dict[str, torch.Tensor], modality: ModalityConfig) -> list[int]:
        """How many embeddings each item of ``batch`` yields from the encoder (before any compressor)."""

    @abstractmethod
    def validate_batch(self, batch: dict[str, torch.Tensor], modality: ModalityConfig) -> None:
        """Raise ValueError naming the modality if ``batch`` breaks the contract."""

    @abstractmethod
    def encode(self, module: nn.Module, batch: dict[str, torch.Tensor], modality: ModalityConfig) -> list[torch.Tensor]:
        """Run ``module`` on ``batch``; one ``(tokens_i, output_size)`` tensor per item, in item order."""

    def example_batch(self, modality: ModalityConfig, items: int, size: int | None,
                      device: torch.device | str = "meta") -> dict[str, torch.Tensor]:
        """A batch of ``items`` equal items of ``size``, shaped exactly as `collate` would build it.

        Data tensors (what a real batch carries to the model's device) are created empty on ``device``:
        the meta device when the memory estimator traces `encode`. Metadata read as numbers (lengths,
        grids, frame masks) is on the CPU.

        Args:
            modality: the modality (its input contract already resolved).
            items: items in the batch (>= 1).
            size: each item's size in the unit of the kind: time steps (sensor), side in pixels of a
                square image (image), mel frames (audio; None = the encoder's full window).

        Raises:
            NotImplementedError: this kind cannot build example batches (the estimator then reports
                the encoder as untraced).
            ValueError: a size the modality's contract rejects (longer than ``input.max_length``).
        """
        raise NotImplementedError(
            f"{modality.name}: encoder kind {type(self).__name__} does not implement example_batch, so its memory "
            "cannot be traced; implement ModalityEncoder.example_batch to include it in estimates"
        )


def as_float_tensor(item: Any, modality: ModalityConfig) -> torch.Tensor:
    """A raw item (tensor, NumPy array or nested list) as a floating tensor of the contract's dtype."""
    dtype = getattr(torch, modality.input.dtype)
    if isinstance(item, torch.Tensor):
        tensor = item
    else:
        try:
            tensor = torch.as_tensor(np.asarray(item))
        except (TypeError, ValueError) as error:
            raise ValueError(f"{modality.name}: could not read an item as a numeric array ({error})") from None
    if not (tensor.is_floating_point() or tensor.dtype in (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)):
        raise ValueError(f"{modality.name}: expected a numeric array, got dtype {tensor.dtype}")
    return tensor.to(dtype)


def check_rank(tensor: torch.Tensor, ranks: tuple[int, ...], modality: ModalityConfig, index: int | None = None) -> None:
    if tensor.dim() not in ranks:
        where = f" item {index}" if index is not None else ""
        expected = " or ".join(f"{r}-D" for r in ranks)
        raise ValueError(
            f"{modality.name}:{where} expected a {expected} array laid out {modality.input.layout}, "
            f"got shape {tuple(tensor.shape)}"
        )


def check_channels(got: int, modality: ModalityConfig, shape: tuple[int, ...], index: int | None = None) -> None:
    expected = modality.input.channels
    if expected is not None and got != expected:
        where = f" item {index}" if index is not None else ""
        raise ValueError(
            f"{modality.name}:{where} expected {expected} channels, got {got} (shape {shape}, layout "
            f"{modality.input.layout}); set modalities.{modality.name}.input.channels or fix the input"
        )


def check_length(length: int, modality: ModalityConfig, index: int | None = None, unit: str = "steps") -> None:
    where = f" item {index}" if index is not None else ""
    if length < 1:
        raise ValueError(f"{modality.name}:{where} is empty (0 {unit}); every item needs at least one {unit[:-1]}")
    limit = modality.input.max_length
    if limit is not None and length > limit:
        raise ValueError(
            f"{modality.name}:{where} has {length} {unit}, more than the maximum {limit}; split it into windows "
            f"(hcx_extend.data.sensors.window) or raise modalities.{modality.name}.input.max_length. Nothing is truncated."
        )


def check_items(items: int, modality: ModalityConfig) -> None:
    if not isinstance(items, int) or isinstance(items, bool) or items < 1:
        raise ValueError(f"{modality.name}: an example batch needs at least one item, got {items!r}")


def check_finite(tensor: torch.Tensor, modality: ModalityConfig, what: str = "input") -> None:
    if tensor.device.type == "meta":
        return  # shapes only (memory estimates): there are no values to check
    if tensor.is_floating_point() and not torch.isfinite(tensor).all():
        bad = (~torch.isfinite(tensor)).sum().item()
        raise ValueError(f"{modality.name}: {what} holds {bad} NaN/Inf value(s); clean or impute them first")
