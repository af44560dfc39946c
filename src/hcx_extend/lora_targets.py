"""Say what LoRA should adapt; get the Linear layers that exist in each architecture.

The guide's ``target_modules=["q_proj", "v_proj"]`` matches nothing in the Qwen2.5-VL vision tower
(one fused ``qkv``) or in ``nn.TransformerEncoder`` (a fused ``in_proj_weight``, and an ``out_proj``
that ``nn.MultiheadAttention`` never calls as a module), and peft then fails. Users say what they mean instead, and `resolve_lora_targets` finds the module names:

* ``"attention"``: every Linear directly inside an attention module (class name containing
  "Attention"): ``q_proj``/``k_proj``/``v_proj``/``o_proj`` in HyperCLOVAX, Llama and our IMU
  encoder, ``q_proj``/``k_proj``/``v_proj``/``out_proj`` in the Qwen2-Audio tower, ``qkv``/``proj``
  in the Qwen2.5-VL tower;
* ``"mlp"``: every Linear of a feed-forward block (class name containing "MLP" or "FeedForward",
  or ``fc1``/``fc2``/``linear1``/``linear2``/``gate_proj``/``up_proj``/``down_proj`` inside a
  layer or block);
* ``"all-linear"``: every Linear except the LM head;
* explicit names such as ``("q_proj", "v_proj")``: Linear layers whose own name is one of them.
  A name that matches nothing is an error listing the Linear names that do exist.
"""

from __future__ import annotations

from typing import Iterable

from torch import nn

GROUPS = ("attention", "mlp", "all-linear")
_MLP_NAMES = {"fc1", "fc2", "linear1", "linear2", "gate_proj", "up_proj", "down_proj"}


def _linear_layers(module: nn.Module) -> list[tuple[str, str, nn.Linear]]:
    """``(path, parent class name, layer)`` for every Linear under ``module`` that is called as a module.

    ``nn.MultiheadAttention`` reads its ``out_proj.weight`` directly instead of calling it, so an
    adapter there would never run: such layers are left out.
    """
    found = []
    for path, layer in module.named_modules():
        if isinstance(layer, nn.Linear) and path:
            parent_path = path.rsplit(".", 1)[0] if "." in path else ""
            parent = module.get_submodule(parent_path) if parent_path else module
            if isinstance(parent, nn.MultiheadAttention):
                continue
            found.append((path, type(parent).__name__, layer))
    return found


def _in_group(group: str, path: str, parent: str, layer: nn.Linear, head: nn.Module | None) -> bool:
    name = path.rsplit(".", 1)[-1]
    if group == "attention":
        return "attention" in parent.lower()
    if group == "mlp":
        lowered = parent.lower()
        return "mlp" in lowered or "feedforward" in lowered or (
            name in _MLP_NAMES and ("layer" in lowered or "block" in lowered)
        )
    return layer is not head  # all-linear


def resolve_lora_targets(module: nn.Module, targets: str | Iterable[str], component: str = "module") -> list[str]:
    """Full paths (relative to ``module``) of the Linear layers ``targets`` means in this architecture.

    Args:
        module: a component, e.g. ``model.model.vision_model`` or ``model.model.language_model``.
        targets: "attention", "mlp", "all-linear", or explicit Linear names.
        component: used in error messages.

    Raises:
        ValueError: if nothing matches, or an explicit name matches no Linear (the message lists the
            Linear names that exist).
    """
    linears = _linear_layers(module)
    available = sorted({path.rsplit(".", 1)[-1] for path, _, _ in linears})
    head = module.get_output_embeddings() if hasattr(module, "get_output_embeddings") else None
    if isinstance(targets, str) and targets in GROUPS:
        paths = [path for path, parent, layer in linears if _in_group(targets, path, parent, layer, head)]
        if not paths:
            raise ValueError(f"{component}: LoRA target group {targets!r} matches no Linear layer; "
                             f"the Linear layers are named {available}")
        return paths
    names = [targets] if isinstance(targets, str) else list(targets)
    if not names:
        raise ValueError(f"{component}: no LoRA targets given; use {GROUPS} or Linear names from {available}")
    unknown = [name for name in names if name not in available]
    if unknown:
        raise ValueError(
            f"{component}: LoRA target(s) {unknown} match no Linear layer; the Linear layers here are named "
            f"{available} (or use one of {GROUPS})"
        )
    return [path for path, _, _ in linears if path.rsplit(".", 1)[-1] in names]
