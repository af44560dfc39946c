"""Two places where transformers reads tensor values, replaced while tracing on the meta device.

Meta tensors have shapes but no values. transformers reads values twice on the paths the estimator
traces; each patch gives the answer the real run gives for the traced batch:

* `unpacked_sequences`: the masking code looks for packed sequences in the position ids; the traced
  batch holds one sequence per row, so the answer is "none".
* `labelled_positions`: ``logits_to_keep=<bool mask>`` selects ``hidden[mask]``, whose size depends on
  the mask's values; the selection is replaced by an index with two long tensors of the known count,
  which gives the same output and keeps the same indices for backward.
"""

from __future__ import annotations

import sys
from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn
from transformers import masking_utils


@contextmanager
def unpacked_sequences() -> Iterator[None]:
    """``find_packed_sequence_indices`` answers None (one sequence per row) while active."""
    original = masking_utils.find_packed_sequence_indices
    masking_utils.find_packed_sequence_indices = lambda position_ids: None
    try:
        yield
    finally:
        masking_utils.find_packed_sequence_indices = original


@contextmanager
def labelled_positions(language_model: nn.Module, count: int) -> Iterator[None]:
    """Select ``count`` positions the way ``logits_to_keep=<bool mask>`` does (``hidden[mask]``).

    The language model's module-level ``slice_logits_to_keep`` is swapped for an index by two long
    tensors of ``count`` entries: the same output, and the same saved indices, as ``hidden[mask]``.

    Raises:
        ValueError: the language model's module does not slice logits with ``slice_logits_to_keep``.
    """
    module = sys.modules[type(language_model).__module__]
    original = getattr(module, "slice_logits_to_keep", None)
    if original is None:
        raise ValueError(f"{type(language_model).__name__} does not slice logits with slice_logits_to_keep; "
                         "the estimator cannot trace its logits_to_keep='labels' path")

    def select(hidden: torch.Tensor, keep) -> torch.Tensor:
        rows = torch.empty(count, dtype=torch.long, device=hidden.device)
        columns = torch.empty(count, dtype=torch.long, device=hidden.device)
        return hidden[rows, columns]

    module.slice_logits_to_keep = select
    try:
        yield
    finally:
        module.slice_logits_to_keep = original
