"""LoRA adapters on model components: add, save (peft format), load, merge.

Adapters are injected in place with peft (``inject_adapter_in_model``), one component at a time
(``vision_model``, ``imu_model``, ``language_model``, ...), so the model keeps its HCX structure.
Each component's adapter is saved in the standard peft format::

    DIRECTORY/adapters/<component>/adapter_config.json
    DIRECTORY/adapters/<component>/adapter_model.safetensors   keys "base_model.model.<path>.lora_A.weight", ...

so ``peft.PeftModel.from_pretrained(<that component>, DIRECTORY/adapters/<component>)`` also works.
`merge_adapters` folds every adapter into its base Linear and removes peft's wrappers: the model
then saves as a plain HCX-layout checkpoint that loads without peft.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from hcx_extend.ladder import LoraSpec
from hcx_extend.lora_targets import resolve_lora_targets
from hcx_extend.memory.quantize import import_bitsandbytes, quiet_kernel_lookup

ADAPTER_NAME = "default"
PEFT_PREFIX = "base_model.model."


def _peft():
    """The peft module, imported on first use only: peft imports bitsandbytes (and with it a hub lookup
    for a CPU kernel) whenever bitsandbytes is installed, so a run without adapters imports neither."""
    with quiet_kernel_lookup():
        import peft
    return peft


def _component(model, name: str) -> nn.Module:
    if not hasattr(model.model, name):
        raise ValueError(f"no component model.{name}; components: {model.model.component_names()}")
    return getattr(model.model, name)


def add_lora(model, component: str, spec: LoraSpec):
    """Inject LoRA layers into ``model.<component>`` for ``spec``; returns the peft ``LoraConfig`` used.

    Only the new ``lora_A``/``lora_B`` parameters are made trainable within the component.
    """
    peft = _peft()
    module = _component(model, component)
    targets = resolve_lora_targets(module, spec.targets, component)
    config = peft.LoraConfig(r=spec.r, lora_alpha=spec.alpha, lora_dropout=spec.dropout, target_modules=targets, bias="none")
    # peft picks its bitsandbytes LoRA layers only when the module says it is quantised.
    _mark_quantised(module)
    training = module.training
    peft.inject_adapter_in_model(config, module, adapter_name=ADAPTER_NAME)
    module.train(training)  # new LoRA layers start in training mode (dropout on); follow the component
    for name, parameter in module.named_parameters():
        parameter.requires_grad_("lora_" in name)
        # Adapters in fp32 over a bf16/fp16 (or 4-bit, bf16-compute) base, as peft's get_peft_model does
        # by default: AdamW steps of lr x ~1 on bf16 weights round away (bf16 keeps 8 bits of mantissa).
        if "lora_" in name and parameter.dtype in (torch.bfloat16, torch.float16):
            parameter.data = parameter.data.float()
    adapted = getattr(model, "lora_configs", {})
    adapted[component] = config
    model.lora_configs = adapted
    return config


def _mark_quantised(module: nn.Module) -> None:
    bnb = sys.modules.get("bitsandbytes")
    if bnb is None:  # never imported, so nothing was quantised
        return
    if any(isinstance(m, bnb.nn.Linear4bit) for m in module.modules()):
        module.is_loaded_in_4bit = True
    if any(isinstance(m, bnb.nn.Linear8bitLt) for m in module.modules()):
        module.is_loaded_in_8bit = True


def adapted_components(model) -> list[str]:
    return list(getattr(model, "lora_configs", {}))


def save_adapters(model, directory: str | os.PathLike) -> list[Path]:
    """Write every component's adapter in peft's format under ``directory/adapters/<component>``."""
    configs = getattr(model, "lora_configs", {})
    if not configs:
        return []
    peft = _peft()
    written = []
    for component, config in configs.items():
        folder = Path(directory) / "adapters" / component
        folder.mkdir(parents=True, exist_ok=True)
        state = peft.get_peft_model_state_dict(_component(model, component), adapter_name=ADAPTER_NAME)
        tensors = {PEFT_PREFIX + key: value.detach().to("cpu").contiguous() for key, value in state.items()}
        save_file(tensors, folder / "adapter_model.safetensors", metadata={"format": "pt"})
        config.save_pretrained(str(folder))
        written.append(folder)
    return written


def load_adapters(model, directory: str | os.PathLike) -> list[str]:
    """Inject and fill the adapters saved by `save_adapters` in ``directory``; returns their components."""
    root = Path(directory) / "adapters"
    if not root.is_dir():
        return []
    peft = _peft()
    loaded = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        component = folder.name
        module = _component(model, component)
        config = peft.LoraConfig.from_pretrained(str(folder))
        _mark_quantised(module)
        training = module.training
        peft.inject_adapter_in_model(config, module, adapter_name=ADAPTER_NAME)
        module.train(training)
        state = {key[len(PEFT_PREFIX):] if key.startswith(PEFT_PREFIX) else key: value
                 for key, value in load_file(folder / "adapter_model.safetensors").items()}
        result = peft.set_peft_model_state_dict(module, state, adapter_name=ADAPTER_NAME)
        if getattr(result, "unexpected_keys", None):
            raise ValueError(f"{folder}: adapter tensors match no LoRA layer: {result.unexpected_keys[:3]}")
        adapted = getattr(model, "lora_configs", {})
        adapted[component] = config
        model.lora_configs = adapted
        loaded.append(component)
    return loaded


@torch.no_grad()
def merge_adapters(model) -> int:
    """Fold every LoRA adapter into its base layer and drop peft's wrappers. Returns the layers merged.

    Quantised (4-bit/8-bit) base layers are dequantised first, so the merged model holds plain
    ``nn.Linear`` weights in the compute dtype and loads without peft or bitsandbytes.
    """
    if not adapted_components(model):
        return 0
    peft = _peft()
    merged = 0
    for component in list(getattr(model, "lora_configs", {})):
        module = _component(model, component)
        for path, layer in list(module.named_modules()):
            if not isinstance(layer, peft.tuners.lora.LoraLayer):
                continue
            base = _plain_linear(layer.get_base_layer())
            delta = layer.get_delta_weight(ADAPTER_NAME).to(base.weight.dtype)
            base.weight += delta
            parent_path, _, name = path.rpartition(".")
            setattr(module.get_submodule(parent_path) if parent_path else module, name, base)
            merged += 1
        for flag in ("is_loaded_in_4bit", "is_loaded_in_8bit"):
            if hasattr(module, flag):
                delattr(module, flag)
    model.lora_configs = {}
    return merged


def _plain_linear(layer: nn.Module) -> nn.Linear:
    """``layer`` itself if it is a plain Linear, else a Linear holding its dequantised weight."""
    if type(layer) is nn.Linear:
        return layer
    bnb = import_bitsandbytes()
    if isinstance(layer, bnb.nn.Linear4bit):
        weight = bnb.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state)
        dtype = layer.compute_dtype or weight.dtype
    elif isinstance(layer, bnb.nn.Linear8bitLt):
        weight = layer.weight.data.float() * layer.weight.SCB[:, None].float() / 127.0
        dtype = torch.bfloat16
    else:
        raise TypeError(f"cannot merge into a {type(layer).__name__}")
    plain = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None, device=weight.device, dtype=dtype)
    plain.weight.copy_(weight.to(dtype))
    if layer.bias is not None:
        plain.bias.copy_(layer.bias.to(dtype))
    return plain
