"""Describe a model: components, parameter counts and placeholder tokens (``hcx-extend info``)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import init_empty_weights
from torch import nn

from hcx_extend.checkpoint import extend, read_omni_config, read_source
from hcx_extend.layout import read_config_dict
from hcx_extend.model import OMNI_MODEL_TYPES, OmniForCausalLM
from hcx_extend.presets import PRESETS, build_preset
from hcx_extend.units import human_bytes, human_count


@dataclass
class ComponentCount:
    name: str
    module_type: str
    parameters: int
    bytes: int


def unique_parameters(module: nn.Module) -> list[nn.Parameter]:
    """Parameters counted once even when tied (``named_parameters`` already de-duplicates by identity)."""
    return [p for _, p in module.named_parameters()]


def count_components(model: OmniForCausalLM) -> list[ComponentCount]:
    """Parameters and bytes per component under ``model.``; the LLM is split into embeddings, layers and head."""
    rows = []
    seen: set[int] = set()

    def add(name: str, module: nn.Module) -> None:
        params = [p for p in unique_parameters(module) if id(p) not in seen]
        seen.update(id(p) for p in params)
        rows.append(
            ComponentCount(
                name=name,
                module_type=type(module).__name__,
                parameters=sum(p.numel() for p in params),
                bytes=sum(p.numel() * p.element_size() for p in params),
            )
        )

    llm = model.language_model
    add("language_model.embed_tokens", llm.get_input_embeddings())
    add("language_model.layers", llm.get_decoder().layers)
    add("language_model.norm", llm.get_decoder().norm)
    head = llm.get_output_embeddings()
    if head is not None:
        add("language_model.lm_head" + (" (tied)" if head.weight is llm.get_input_embeddings().weight else ""), head)
    for name, module in model.model.named_children():
        if name != "language_model":
            add(name, module)
    return rows


def describe(model: OmniForCausalLM, title: str) -> str:
    """A printable summary: components with parameter counts, then modalities with their tokens."""
    rows = count_components(model)
    total = sum(r.parameters for r in rows)
    dtype = next(model.parameters()).dtype
    lines = [title, "", f"{'component':<36} {'type':<44} {'parameters':>14} {'share':>7}"]
    for row in rows:
        lines.append(f"{row.name:<36} {row.module_type:<44} {row.parameters:>14,} {100 * row.parameters / max(total, 1):>6.2f}%")
    lines.append(f"{'total':<36} {'':<44} {total:>14,} {'100.00%':>7}")
    element = torch.finfo(dtype).bits // 8 if dtype.is_floating_point else 1
    lines.append(
        f"weights: {human_count(total)} parameters = {human_bytes(total * 2)} in bf16, "
        f"{human_bytes(total * element)} as built ({dtype})"
    )
    lines.append("")
    lines.append(f"{'modality':<10} {'encoder':<22} {'module':<18} {'projector':<20} {'marker':<10} {'token':<18} {'id':>7}  input")
    for m in model.config.modalities.values():
        projector = f"{m.projector_module} ({m.projector['type']})"
        contract = f"{m.input.kind} {m.input.layout}, channels {m.input.channels}, max {m.input.max_length}"
        lines.append(
            f"{m.name:<10} {m.encoder['model_type']:<22} {m.encoder_module:<18} {projector:<20} {m.marker:<10} "
            f"{m.token:<18} {str(m.token_id):>7}  {contract}"
        )
    if not model.config.modalities:
        lines.append("(no modalities: a plain causal LM)")
    if model.carried_tensors:
        lines.append(f"carried tensors (not built, kept for saving): {len(model.carried_tensors)}")
    return "\n".join(lines)


def model_for_info(target: str | os.PathLike) -> tuple[OmniForCausalLM, str]:
    """A model to describe and a title: a preset or an omni folder's config (no weights read), else the weights."""
    if str(target) in PRESETS:
        return build_preset(str(target), device="meta"), f"{target} (preset, built on the meta device: no weights)"
    path = Path(target)
    if path.is_dir() and (path / "config.json").exists() and read_config_dict(path).get("model_type") in OMNI_MODEL_TYPES:
        with init_empty_weights():
            model = OmniForCausalLM(read_omni_config(path))
        return model, f"{path} (config only; weights not loaded)"
    source = read_source(path)
    return extend(source, []).model, f"{path} ({source.kind})"
