"""Training strategies: which parts of the model learn, as data.

The extension guide's ladder, cheapest first. A `Strategy` says what is trained for the *target*
modalities (those being added or adapted); everything else stays frozen. The training loop never
branches on the strategy: `apply_strategy` sets ``requires_grad`` and the loop trains whatever is
trainable.

========== ========================================================================
projector  everything frozen but the target modalities' projectors (guide §3)
new-encoder a freshly initialised encoder + its projector (+ compressor); LLM and other
           encoders frozen
========== ========================================================================
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

from torch import nn

from hcx_extend.model import OmniForCausalLM, compressor_module_name


@dataclass(frozen=True)
class Strategy:
    """What one rung of the ladder trains.

    Args:
        name: the CLI name.
        summary: one line for reports.
        projectors: train the target modalities' projectors.
        encoders: train the target modalities' encoders in full.
        compressors: train the target modalities' compressors.
        language_model: train the LLM in full.
    """

    name: str
    summary: str
    projectors: bool = True
    encoders: bool = False
    compressors: bool = False
    language_model: bool = False


STRATEGIES: dict[str, Strategy] = {
    "projector": Strategy("projector", "only the projectors learn; encoders and LLM frozen", projectors=True),
    "new-encoder": Strategy(
        "new-encoder",
        "a new encoder and its projector (and compressor) learn; LLM and other encoders frozen",
        projectors=True,
        encoders=True,
        compressors=True,
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
    """Freeze everything, then unfreeze what ``strategy`` trains. Returns the trained component names."""
    components = trainable_components(model, strategy, modalities)
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    for component in components:
        for parameter in getattr(model.model, component).parameters():
            parameter.requires_grad_(True)
    return components


def set_train_mode(model: OmniForCausalLM) -> None:
    """Training mode (dropout on) only for components that learn; frozen ones stay deterministic."""
    model.train()
    for _, module in model.model.named_children():
        if frozen(module):
            module.eval()


def frozen(module: nn.Module) -> bool:
    return not any(p.requires_grad for p in module.parameters())
