"""The indivisible pieces the device-map planner places, and their bytes.

Units are whole: each modality module (``vision_model``, ``mm_projector``, ...), the LLM's
``embed_tokens`` (with ``rotary_emb``, and the head when it is tied to the embeddings), each decoder
layer ``model.language_model.model.layers.N`` (never split), and the final ``norm`` + ``lm_head``.

Bytes: parameters in the dtype they will be loaded in (the LLM's Linear layers in ``quant``, as
`hcx_extend.memory.quantize` counts them); buffers (rotary tables) in their own dtype, because
loading casts only the checkpoint's tensors and these are computed at construction.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from hcx_extend.memory.quantize import check_method, quantizable_linears, quantized_weight_bytes
from hcx_extend.model import OmniForCausalLM

LLM = "model.language_model"
LAYER_PREFIX = f"{LLM}.model.layers."


@dataclass
class Unit:
    """One indivisible piece to place.

    Attributes:
        names: module names (relative to `OmniForCausalLM`) that form the unit.
        nbytes: bytes of its parameters and buffers.
        role: "encoder", "projector", "compressor", "embeddings", "layer" or "head".
        largest_module: bytes of the largest set of parameters one module holds directly: what
            accelerate copies onto the executing device for that module's forward when the unit is
            offloaded (its hooks sit on every module with direct parameters and release them after).
        buffers: bytes of its buffers, which accelerate keeps on the executing device even when the
            unit is offloaded.
    """

    names: list[str]
    nbytes: int
    role: str
    largest_module: int = 0
    buffers: int = 0


def _parameter_bytes(model: OmniForCausalLM, dtype: torch.dtype, quant: str | None) -> dict[str, int]:
    quantized = {}
    if check_method(quant):
        for name, linear in quantizable_linears(model.language_model):
            quantized[f"{LLM}.{name}.weight"] = quantized_weight_bytes(linear.out_features, linear.in_features, quant)
    sizes, seen = {}, set()
    for name, parameter in model.named_parameters():
        if id(parameter) in seen:
            continue  # tied weights are stored once
        seen.add(id(parameter))
        element = dtype.itemsize if parameter.is_floating_point() else parameter.element_size()
        sizes[name] = quantized.get(name, parameter.numel() * element)
    return sizes


def _unit_names(model: OmniForCausalLM) -> list[tuple[list[str], str]]:
    """``(module names, role)`` of every unit, in forward order."""
    units: list[tuple[list[str], str]] = []
    placed: set[str] = set()
    for modality in model.config.modalities.values():
        for module, role in ((modality.encoder_module, "encoder"), (modality.projector_module, "projector"),
                             (modality.compressor_module, "compressor")):
            if module is not None and module not in placed:
                placed.add(module)
                units.append(([f"model.{module}"], role))
    llm = model.language_model
    decoder = f"{LLM}.model"
    embeddings = [f"{decoder}.embed_tokens"] + ([f"{decoder}.rotary_emb"] if hasattr(llm.model, "rotary_emb") else [])
    head = llm.get_output_embeddings()
    tied = head is not None and head.weight is llm.get_input_embeddings().weight
    if tied:
        embeddings.append(f"{LLM}.lm_head")
    units.append((embeddings, "embeddings"))
    units += [([f"{LAYER_PREFIX}{index}"], "layer") for index in range(len(llm.model.layers))]
    units.append(([f"{decoder}.norm"] + ([] if tied or head is None else [f"{LLM}.lm_head"]), "head"))
    return units


def placement_units(model: OmniForCausalLM, dtype: torch.dtype = torch.bfloat16, quant: str | None = None) -> list[Unit]:
    """The model's placement units in forward order with their bytes in ``dtype`` / ``quant``.

    Raises:
        ValueError: the model has parameters or buffers outside the HCX layout's units.
    """
    parameters = _parameter_bytes(model, dtype, quant)
    buffers = {name: b.numel() * b.element_size() for name, b in model.named_buffers()}
    module_direct: dict[str, int] = {}
    for module_name, module in model.named_modules():
        prefix = f"{module_name}." if module_name else ""
        module_direct[module_name] = sum(parameters.get(prefix + name, 0) for name in module._parameters)

    def inside(key: str, names: list[str]) -> bool:
        return any(key == n or key.startswith(n + ".") for n in names)

    units = []
    for names, role in _unit_names(model):
        weight = sum(n for key, n in parameters.items() if inside(key, names))
        buffer = sum(n for key, n in buffers.items() if inside(key, names))
        largest = max((n for key, n in module_direct.items() if inside(key, names)), default=0)
        units.append(Unit(names, weight + buffer, role, largest, buffer))
    covered = [name for unit in units for name in unit.names]
    uncovered = [key for key in [*parameters, *buffers] if not inside(key, covered)]
    if uncovered:
        raise ValueError(f"the planner does not know where {uncovered[:3]} belong; the model has modules "
                         "outside the HCX layout")
    return units
