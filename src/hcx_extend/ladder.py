"""The training ladder as data: which parts of the model learn under each strategy.

The extension guide's ladder, cheapest first. A `Strategy` says what is trained for the *target*
modalities (those being added or adapted); everything else stays frozen. `plan_strategy` turns a
strategy and a config into a `StrategyPlan` (components trained in full, components adapted with
LoRA, quantisation) without touching any weights. Two readers execute that one plan:
`hcx_extend.training.apply_strategy` on a real model and `hcx_extend.memory.estimate_memory` on a
weightless twin, so what is estimated is what is trained. The training loop never branches on the
strategy.

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

from dataclasses import dataclass, field
from typing import Iterable

from hcx_extend.config import OmniConfig


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
class LearningRates:
    """A rung's default AdamW learning rates, by what a parameter is.

    Args:
        new: modules initialised for this run (a new encoder, its projector and compressor): they start
            from random weights and need large steps.
        adapter: LoRA adapters (the LoRA paper and peft's examples use 1e-4 to 3e-4).
        pretrained: pretrained weights trained in full (an LLM, a pretrained encoder): small steps, or
            the model forgets what it knew (full fine-tunes of LLMs use 1e-5 to 5e-5).
    """

    new: float = 1e-3
    adapter: float = 2e-4
    pretrained: float = 2e-5


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
        learning_rates: the rung's default learning rates (`LearningRates`); ``train`` and ``demo`` use
            them unless the user sets a rate.
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
    learning_rates: LearningRates = LearningRates()


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


def get_strategy(name: str | Strategy) -> Strategy:
    """The `Strategy` called ``name`` (a `Strategy` is returned as is)."""
    if isinstance(name, Strategy):
        return name
    if name not in STRATEGIES:
        raise ValueError(f"unknown strategy {name!r}; choose from {list(STRATEGIES)}")
    return STRATEGIES[name]


@dataclass(frozen=True)
class StrategyPlan:
    """What a strategy does to one model, decided from its config alone.

    Attributes:
        strategy: the `Strategy` planned.
        full: components (names under ``model.``) whose parameters are all trained.
        adapted: ``(component, LoraSpec)`` pairs that get LoRA adapters (their base weights stay frozen).
        quantize_llm: "nf4" / "int8" when the LLM's Linear layers are held quantised, else None.
    """

    strategy: Strategy
    full: tuple[str, ...] = ()
    adapted: tuple[tuple[str, LoraSpec], ...] = field(default_factory=tuple)
    quantize_llm: str | None = None

    @property
    def components(self) -> list[str]:
        """Every component that learns, adapted ones first."""
        return list(dict.fromkeys([c for c, _ in self.adapted] + list(self.full)))


def plan_strategy(config: OmniConfig, strategy: str | Strategy, modalities: Iterable[str] | None = None,
                  fresh: Iterable[str] = ()) -> StrategyPlan:
    """The `StrategyPlan` of ``strategy`` for ``modalities`` (default: all of the config's).

    Args:
        config: the model's `OmniConfig`.
        strategy: a name from `STRATEGIES` or a `Strategy`.
        modalities: the target modalities.
        fresh: components initialised rather than pretrained (a modality just added by ``extend``). A
            fresh target encoder gets no LoRA adapter under the LoRA strategies: there is nothing
            pretrained to adapt, so it is trained in full.

    Raises:
        ValueError: an unknown strategy or modality.
    """
    strategy = get_strategy(strategy)
    names = list(modalities) if modalities is not None else list(config.modalities)
    targets = [config.modality(name) for name in names]
    fresh = set(fresh)
    full: list[str] = []
    adapted: list[tuple[str, LoraSpec]] = []
    if strategy.encoder_lora is not None:
        for encoder in dict.fromkeys(m.encoder_module for m in targets):
            if encoder in fresh:
                full.append(encoder)
            else:
                adapted.append((encoder, strategy.encoder_lora))
    if strategy.llm_lora is not None:
        adapted.append(("language_model", strategy.llm_lora))
    for modality in targets:
        if strategy.encoders:
            full.append(modality.encoder_module)
        if strategy.projectors:
            full.append(modality.projector_module)
        if strategy.compressors and modality.compressor_module is not None:
            full.append(modality.compressor_module)
    if strategy.language_model:
        full.append("language_model")
    return StrategyPlan(strategy, tuple(dict.fromkeys(full)), tuple(adapted), strategy.quantize_llm)
