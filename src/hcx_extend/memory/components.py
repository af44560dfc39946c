"""The estimate's rows: which component (row) a module or parameter of an `OmniForCausalLM` belongs to.

Every modality module under ``model.`` is its own row (``vision_model``, ``mm_projector``, ...); the
LLM is split into ``language_model.embed_tokens``, ``language_model.layers`` (all decoder layers) and
``language_model.lm_head`` (final norm, rotary tables and head).
"""

from __future__ import annotations

LLM_ROWS = ("language_model.embed_tokens", "language_model.layers", "language_model.lm_head")


def component_of_module(name: str) -> str | None:
    """The row a module (name relative to `OmniForCausalLM`) belongs to; None outside ``model.``.

    ``model.language_model.model.embed_tokens`` -> ``language_model.embed_tokens``;
    ``model.language_model.model.layers.N...`` -> ``language_model.layers``; the final norm and
    ``lm_head`` -> ``language_model.lm_head``; ``model.vision_model...`` -> ``vision_model``.
    """
    parts = name.split(".")
    if len(parts) < 2 or parts[0] != "model":
        return None
    if parts[1] != "language_model":
        return parts[1]
    rest = parts[2:]
    if rest[:1] == ["model"] and len(rest) > 1:
        if rest[1] == "embed_tokens":
            return "language_model.embed_tokens"
        if rest[1] == "layers":
            return "language_model.layers"
    return "language_model.lm_head"  # lm_head, the final norm, rotary tables


def component_of_parameter(name: str) -> str:
    """The row of a parameter: the row of its owning module."""
    return component_of_module(name.rsplit(".", 1)[0]) or name.split(".")[0]


def is_component_root(name: str) -> bool:
    """Modules whose forward starts a row: each modality module, the embeddings, each decoder layer, the
    final norm and the head (hooks on them nest, so marking these is enough)."""
    parts = name.split(".")
    if len(parts) == 2 and parts[0] == "model" and parts[1] != "language_model":
        return True
    return name in ("model.language_model.model.embed_tokens", "model.language_model.model.norm",
                    "model.language_model.lm_head") or (
        len(parts) == 5 and parts[:4] == ["model", "language_model", "model", "layers"])
