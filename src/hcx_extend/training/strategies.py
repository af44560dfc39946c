"""Training strategies: which parts of the model learn, as data.

The extension guide's ladder, cheapest first. A `Strategy` says what is trained for the *target*
modalities (those being added or adapted); everything else stays frozen. The training loop never
branches on the strategy: `apply_strategy` freezes, adds adapters, and the loop trains whatever is
trainable.

============ ===================================================================================
projector    only the target modalities' projectors learn (guide §3)
new-encoder  a freshly initialised encoder + its projector (+ compressor); LLM and other encoders frozen
lora-encoder LoRA adapters on the target encoders' attention; their projectors (+ compressors) learn
lora-all     LoRA on the target encoders and on the LLM; projectors (+ compressors) learn
qlora        lora-all with the LLM's linear layers held in 4-bit NF4 (double quantisation, bf16 compute)
full         everything learns: LLM, target encoders, projectors, compressors
============ ===================================================================================
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

from torch import nn

from hcx_extend.model import OmniForCausalLM, compressor_module_name


@dataclass(frozen=True)
class LoraSpec:
    """A LoRA adapter recipe (the guide's §2 defaults).

    Args:
        r / alpha / dropout: rank, scaling numerator (scale = alpha / r) and input dropout.
        targets: "attention", "mlp", "all-linear", or explicit Linear names, resolved per architecture
            by `hcx_extend.training.lora_targets`.
    """

    r: int = 16
    alpha: int = 32
    dropout: float = 0.1
    targets: str | tuple[str, ...] = "attention"


@dataclass(frozen=True)
class Strategy:
    """What one rung of the ladder trains.

    Args:
        name: the CLI name.
        summary: one line for reports.
        projectors: train the target modalities' projectors in full.
        encoders: train the target modalities' encoders in full.
        compressors: train the target modalities' compressors in full.
        language_model: train the LLM in full.
        encoder_lora: LoRA adapters on the target encoders (None = none).
        llm_lora: LoRA adapters on the LLM (None = none).
        quantize_llm: hold the LLM's linear layers in "nf4" or "int8" (None = full precision).
    """

    name: str
    summary: str
    projectors: bool = True
    encoders: bool = False
    compressors: bool = False
    language_model: bool = False
    encoder_lora: LoraSpec | None = None
    llm_lora: LoraSpec | None = None
    quantize_llm: str | None = None


STRATEGIES: dict[str, Strategy] = {
    "projector": Strategy("projector", "only the projectors learn; encoders and LLM frozen"),
    "new-encoder": Strategy(
        "new-encoder", "a new encoder and its projector (and compressor) learn; LLM and other encoders frozen",
        encoders=True, compressors=True,
    ),
    "lora-encoder": Strategy(
        "lora-encoder", "LoRA on the encoders' attention; projectors (and compressors) learn; LLM frozen",
        compressors=True, encoder_lora=LoraSpec(),
    ),
    "lora-all": Strategy(
        "lora-all", "LoRA on encoders and LLM; projectors (and compressors) learn",
        compressors=True, encoder_lora=LoraSpec(), llm_lora=LoraSpec(),
    ),
    "qlora": Strategy(
        "qlora", "lora-all with the LLM held in 4-bit NF4 (double quantisation, bf16 compute)",
        compressors=True, encoder_lora=LoraSpec(), llm_lora=LoraSpec(), quantize_llm="nf4",
    ),
    "full": Strategy(
        "full", "everything learns: LLM, encoders, projectors, compressors",
        encoders=True, compressors=True, language_model=True,
    ),
}


def get_strategy(name: str) -> Strategy:
    if name not in STRATEGIES:
        raise ValueError(f"unknown strategy {name!r}; choose from {list(STRATEGIES)}")
    return STRATEGIES[name]


def trainable_components(model: OmniForCausalLM, strategy: Strategy, modalities: Iterable[str] | None = None) -> list[str]:
    """Names of the components under ``model.`` that ``strategy`` trains for ``modalities`` (default: all)."""
    names = list(modalities) if modalities is not None else list(model.config.modalities)
    components: list[str] = []
    for name in names:
        modality = model.config.modality(name)
        if strategy.encoders:
            components.append(modality.encoder_module)
        if strategy.projectors:
            components.append(modality.projector_module)
        compressor = compressor_module_name(modality)
        if strategy.compressors and compressor is not None:
            components.append(compressor)
    if strategy.language_model:
        components.append("language_model")
    return list(dict.fromkeys(components))


def apply_strategy(model: OmniForCausalLM, strategy: Strategy, modalities: Iterable[str] | None = None) -> list[str]:
    """Prepare ``model`` for ``strategy``: freeze everything, quantise the LLM and add LoRA adapters if the
    strategy says so, then unfreeze the components it trains in full.

    A target encoder listed in ``model.fresh_components`` (initialised here, e.g. the new modality's
    encoder after `extend`) gets no adapter under the LoRA strategies: there are no pretrained weights
    to adapt, so it is trained in full. Call once per model. Returns the components that learn.
    """
    from hcx_extend.training.adapters import add_lora, adapted_components

    if adapted_components(model):
        raise ValueError(f"the model already has adapters on {adapted_components(model)}; build a fresh model per strategy")
    names = list(modalities) if modalities is not None else list(model.config.modalities)
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    if strategy.quantize_llm:
        from hcx_extend.memory.quantize import quantize_language_model

        quantize_language_model(model, method=strategy.quantize_llm)
    adapted: list[str] = []
    fresh_encoders: list[str] = []
    if strategy.encoder_lora:
        for encoder in dict.fromkeys(model.config.modality(n).encoder_module for n in names):
            if encoder in model.fresh_components:
                fresh_encoders.append(encoder)  # nothing pretrained to adapt: train it in full
            else:
                add_lora(model, encoder, strategy.encoder_lora)
                adapted.append(encoder)
    if strategy.llm_lora:
        add_lora(model, "language_model", strategy.llm_lora)
        adapted.append("language_model")
    components = fresh_encoders + trainable_components(model, strategy, names)
    for component in components:
        for parameter in getattr(model.model, component).parameters():
            parameter.requires_grad_(True)
    return list(dict.fromkeys(adapted + components))


def set_train_mode(model: OmniForCausalLM) -> None:
    """Training mode (dropout on) only for components that learn; frozen ones stay deterministic.

    Exception: transformers checkpoints a decoder layer only while that layer is in training mode, so
    with gradient checkpointing on, a frozen LLM's layers get ``training=True`` themselves (not their
    attention or MLP children, so no dropout turns on).
    """
    model.train()
    for _, module in model.model.named_children():
        if frozen(module):
            module.eval()
    for layer in model.language_model.get_decoder().layers:
        if getattr(layer, "gradient_checkpointing", False):
            layer.training = True


def frozen(module: nn.Module) -> bool:
    return not any(p.requires_grad for p in module.parameters())
