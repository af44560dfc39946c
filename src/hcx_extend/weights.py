"""Fill a model built without memory from a stream of named tensors, and say what happened to each.

`load_tensors` is the one place where checkpoint tensors meet model parameters. The model is built
with ``init_empty_weights`` (parameters on the meta device, no memory); each tensor is then assigned
in place, so loading never holds two copies of the weights. A component (a module directly under
``model.``: ``language_model``, ``vision_model``, ``imu_projector``, ...) that the stream does not
fill is initialised fresh only when the caller says it is new (`extend` adding a modality); any
other gap is an error, so no path returns random weights where a checkpoint should have held them.

Tensors under prefixes the model does not build (the Omni checkpoint's ``model.discrete_*``, ...)
are kept in ``model.carried_tensors`` and written back unchanged by `tensors_to_save`.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Iterable

import torch
from torch import nn

from hcx_extend.layout import component_of


@dataclass
class LoadReport:
    """What happened to each checkpoint tensor and each model parameter, grouped by component.

    A component is the module directly under ``model.`` (``language_model``, ``vision_model``, ...).
    """

    loaded: dict[str, int] = field(default_factory=dict)
    missing: dict[str, list[str]] = field(default_factory=dict)
    unexpected: dict[str, list[str]] = field(default_factory=dict)
    carried: dict[str, list[str]] = field(default_factory=dict)
    initialised: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"loaded: {', '.join(f'{c} ({n} tensors)' for c, n in self.loaded.items()) or 'nothing'}"]
        if self.initialised:
            lines.append(f"initialised fresh: {', '.join(self.initialised)}")
        for title, groups in (("missing", self.missing), ("unexpected", self.unexpected),
                              ("carried unchanged", self.carried)):
            for component, keys in groups.items():
                shown = ", ".join(keys[:3]) + (f", ... ({len(keys)} in all)" if len(keys) > 3 else "")
                lines.append(f"{title} in {component}: {shown}")
        return "\n".join(lines)


def group_by_component(keys: Iterable[str]) -> dict[str, list[str]]:
    groups: dict[str, list[str]] = defaultdict(list)
    for key in sorted(keys):
        groups[component_of(key)].append(key)
    return dict(groups)


def tensors_to_save(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's state dict with tied duplicates dropped, plus its carried tensors."""
    tensors: dict[str, torch.Tensor] = {}
    seen: set[tuple[int, tuple[int, ...]]] = set()
    for key, tensor in model.state_dict().items():
        if tensor.device.type == "meta":
            raise ValueError(f"cannot save {key}: it has no data (meta device); load or initialise the weights first")
        identity = (tensor.data_ptr(), tuple(tensor.shape))
        if tensor.numel() and identity in seen:
            continue  # a tied weight, restored by tie_weights() on load
        seen.add(identity)
        tensors[key] = tensor
    for key, tensor in getattr(model, "carried_tensors", {}).items():
        if key in tensors:
            raise ValueError(f"carried tensor {key} collides with a model parameter")
        tensors[key] = tensor
    return tensors


def load_tensors(
    model: nn.Module,
    tensors: Iterable[tuple[str, torch.Tensor]],
    *,
    new_components: Iterable[str] = (),
    strict: bool = True,
    source: str = "the checkpoint",
) -> LoadReport:
    """Assign HCX-layout ``tensors`` to ``model`` (an `OmniForCausalLM` built under ``init_empty_weights``).

    Args:
        model: the model to fill; its ``model.fresh_component(name)`` builds a freshly initialised
            component when one must be initialised.
        tensors: ``(key, tensor)`` pairs in the HCX layout.
        new_components: components to initialise fresh whatever the stream holds for them (a modality
            being added).
        strict: refuse tensors inside built components that match no parameter, and components (or parts
            of components) the stream does not fill. With ``strict=False`` they are reported and
            initialised.
        source: named in error messages (a folder, a file).

    Returns:
        the `LoadReport`; ``model.carried_tensors`` holds the tensors of modules the model does not build,
        ``model.fresh_components`` the components initialised here.

    Raises:
        ValueError: shape mismatches (and integer tensors where the model has floating ones) always;
            unexpected or missing tensors when ``strict``.
    """
    expected = dict(model.state_dict(keep_vars=True))
    components = set(model.model.component_names())
    new_components = set(new_components)
    loaded: dict[str, torch.Tensor] = {}
    carried: dict[str, torch.Tensor] = {}
    unexpected: list[str] = []
    mismatched: list[str] = []
    for key, tensor in tensors:
        if key in expected:
            if tuple(expected[key].shape) != tuple(tensor.shape):
                mismatched.append(f"{key}: {source} {tuple(tensor.shape)}, model {tuple(expected[key].shape)}")
            elif expected[key].is_floating_point() != tensor.is_floating_point():
                mismatched.append(f"{key}: {source} holds {tensor.dtype}, the model {expected[key].dtype}")
            elif component_of(key) not in new_components:
                loaded[key] = tensor
        elif component_of(key) in components:
            unexpected.append(key)
            carried[key] = tensor
        else:
            carried[key] = tensor
    if mismatched:
        raise ValueError(f"{source}: shapes or dtypes do not match the config:\n  " + "\n  ".join(mismatched[:20]))
    if strict and unexpected:
        raise ValueError(
            f"{source}: tensors inside built components match no parameter: "
            + "; ".join(f"{c}: {', '.join(k[:3])}{' ...' if len(k) > 3 else ''}"
                        for c, k in group_by_component(unexpected).items())
            + ". Check the config (layer counts, encoder types) or load with strict=False"
        )

    model.load_state_dict(loaded, strict=False, assign=True)
    model.tie_weights()
    report = LoadReport(loaded={c: len(k) for c, k in group_by_component(loaded).items()},
                        carried=group_by_component(carried), unexpected=group_by_component(unexpected))
    still_empty = [key for key, value in model.state_dict(keep_vars=True).items() if value.device.type == "meta"]
    for component, keys in group_by_component(still_empty).items():
        if component not in new_components:
            if strict:
                what = "has no tensors" if component not in report.loaded else f"lacks {len(keys)} tensor(s)"
                raise ValueError(
                    f"{source}: component {component} {what} (e.g. {', '.join(keys[:3])}); a complete checkpoint "
                    "holds every component. Load with strict=False to initialise it fresh, or add the modality "
                    "with extend()"
                )
            report.missing[component] = keys
        fresh = model.model.fresh_component(component)
        prefix = f"model.{component}."
        fresh.load_state_dict({k[len(prefix):]: v for k, v in loaded.items() if k.startswith(prefix)},
                              strict=False, assign=True)
        if hasattr(fresh, "tie_weights"):
            fresh.tie_weights()
        setattr(model.model, component, fresh)
        report.initialised.append(component)
    model.carried_tensors = carried
    model.fresh_components = set(report.initialised)
    model.tie_weights()
    return report
