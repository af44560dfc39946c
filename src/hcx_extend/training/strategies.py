"""Apply a training strategy to a model: freeze, quantise, add LoRA adapters, unfreeze what learns.

What each strategy trains is decided by `hcx_extend.ladder.plan_strategy` from the config alone;
`apply_strategy` executes that plan on a real model (the memory estimator reads the same plan).
"""

from __future__ import annotations

from typing import Iterable

from hcx_extend.ladder import Strategy, StrategyPlan, plan_strategy
from hcx_extend.memory.quantize import quantize_language_model
from hcx_extend.model import OmniForCausalLM
from hcx_extend.training.adapters import adapted_components, add_lora


def apply_strategy(model: OmniForCausalLM, strategy: str | Strategy,
                   modalities: Iterable[str] | None = None) -> StrategyPlan:
    """Prepare ``model`` for ``strategy`` and return the plan it executed.

    Everything is frozen; the LLM is quantised and LoRA adapters are added where the plan says so;
    the components the plan trains in full are unfrozen. ``model.fresh_components`` (what was
    initialised rather than loaded) tells the plan which encoders have nothing pretrained to adapt.
    Call once per model.
    """
    if adapted_components(model):
        raise ValueError(f"the model already has adapters on {adapted_components(model)}; build a fresh model per strategy")
    plan = plan_strategy(model.config, strategy, modalities, fresh=model.fresh_components)
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    if plan.quantize_llm:
        quantize_language_model(model, method=plan.quantize_llm)
    for component, spec in plan.adapted:
        add_lora(model, component, spec)
    for component in plan.full:
        for parameter in getattr(model.model, component).parameters():
            parameter.requires_grad_(True)
    return plan
