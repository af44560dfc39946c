"""Token compressors: shorten a modality's embedding stream before it reaches the LLM.

A modality opts in with ``compressor: {"type": ..., "chunk_size": ...}``. A compressor module runs
between the projector and the splice on a padded batch ``(items, tokens, hidden)`` with ``lengths``
and returns ``(items, compressed_tokens, hidden)`` with new lengths.

Each type is a `CompressorKind` that owns two facts: how to build the module, and how many tokens
it emits for ``n`` input tokens (`compressed_length`). The processor asks the kind how many
placeholders to write; the model asks it how many embeddings each item keeps. Nobody else computes
either.

Built in: ``none`` (identity), ``avgpool`` (mean of each chunk of ``chunk_size`` tokens, padding
excluded) and ``mambamia`` (the Omni model's learned-query Mamba2 compressor, `compressors.mambamia`).
Register more with `register_compressor`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

from torch import nn

from hcx_extend.compressors.avgpool import AvgPoolCompressor, IdentityCompressor
from hcx_extend.compressors.mambamia import build_mambamia, mambamia_settings


@dataclass(frozen=True)
class CompressorKind:
    """One compressor type.

    Args:
        build: ``build(spec, llm_hidden_size) -> nn.Module`` taking ``(x, lengths)`` and returning
            ``(compressed, new_lengths)``.
        output_length: ``output_length(spec, tokens) -> int``: tokens the module emits for an item of
            ``tokens`` tokens. Must agree with the module's ``new_lengths``.
    """

    build: Callable[[dict[str, Any], int], nn.Module]
    output_length: Callable[[dict[str, Any], int], int]


def check_chunk_size(chunk_size: Any) -> int:
    if not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size < 1:
        raise ValueError(f"compressor: chunk_size must be an integer >= 1, got {chunk_size!r}")
    return chunk_size


def _avgpool_chunk(spec: dict[str, Any]) -> int:
    unknown = set(spec) - {"type", "module", "chunk_size"}
    if unknown:
        raise ValueError(f"avgpool compressor: unknown settings {sorted(unknown)}; known: ['chunk_size']")
    return check_chunk_size(spec.get("chunk_size", 25))


_REGISTRY: dict[str, CompressorKind] = {
    "none": CompressorKind(build=lambda spec, hidden: IdentityCompressor(), output_length=lambda spec, n: n),
    "avgpool": CompressorKind(
        build=lambda spec, hidden: AvgPoolCompressor(_avgpool_chunk(spec)),
        output_length=lambda spec, n: math.ceil(n / _avgpool_chunk(spec)),
    ),
    "mambamia": CompressorKind(
        build=build_mambamia,
        output_length=lambda spec, n: math.ceil(n / check_chunk_size(mambamia_settings(spec)["chunk_size"])),
    ),
}


def register_compressor(name: str, kind: CompressorKind, *, replace: bool = False) -> None:
    """Make ``name`` usable as a modality's ``compressor.type``."""
    if name in _REGISTRY and not replace:
        raise ValueError(f"compressor type {name!r} is already registered; pass replace=True to override it")
    _REGISTRY[name] = kind


def compressor_kind(spec: dict[str, Any]) -> CompressorKind:
    kind = spec.get("type")
    if kind not in _REGISTRY:
        raise ValueError(f"unknown compressor type {kind!r}; registered: {sorted(_REGISTRY)}")
    return _REGISTRY[kind]


def build_compressor(spec: dict[str, Any], hidden_size: int) -> nn.Module:
    """A new compressor for a modality's ``compressor`` dict, working at ``hidden_size`` (the LLM width)."""
    return compressor_kind(spec).build(spec, hidden_size)


def compressed_length(spec: dict[str, Any] | None, tokens: int) -> int:
    """Tokens left of an item of ``tokens`` tokens after the compressor ``spec`` (None: no compressor)."""
    if spec is None:
        return tokens
    return compressor_kind(spec).output_length(spec, tokens)


__all__ = ["CompressorKind", "build_compressor", "check_chunk_size", "compressed_length", "compressor_kind",
           "register_compressor"]
