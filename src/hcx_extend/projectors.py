"""Projectors: map an encoder's embeddings into the LLM's hidden size.

Built-in types (a modality's ``projector: {"type": ...}``):

* ``linear``: one ``nn.Linear(in, out)`` (parameters ``weight``, ``bias``), as HyperCLOVAX Vision V2.
* ``mlp``: ``fc2(act(fc1(x)))`` with ``fc1: in -> hidden`` (hidden defaults to ``in``) and
  ``fc2: hidden -> out``; ``activation`` "gelu" (the Omni model's ``mm_projector``/``audio_projector``)
  or "silu" (the extension guide's sensor projector).

Register more with ``register_projector("name", builder)`` where ``builder(spec, in_features,
out_features) -> nn.Module`` and ``spec`` is the modality's projector dict.
"""

from __future__ import annotations

from typing import Any, Callable

from torch import nn

ProjectorBuilder = Callable[[dict[str, Any], int, int], nn.Module]

_ACTIVATIONS = {"gelu": nn.GELU, "silu": nn.SiLU, "relu": nn.ReLU}


class MLPProjector(nn.Module):
    """``fc2(act(fc1(x)))``: ``(..., in_features) -> (..., out_features)``."""

    def __init__(self, in_features: int, out_features: int, hidden_features: int | None = None, activation: str = "gelu"):
        super().__init__()
        if activation not in _ACTIVATIONS:
            raise ValueError(f"mlp projector: unknown activation {activation!r}; choose from {sorted(_ACTIVATIONS)}")
        hidden_features = hidden_features or in_features
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = _ACTIVATIONS[activation]()
        self.fc2 = nn.Linear(hidden_features, out_features)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


def _build_linear(spec: dict[str, Any], in_features: int, out_features: int) -> nn.Module:
    return nn.Linear(in_features, out_features, bias=spec.get("bias", True))


def _build_mlp(spec: dict[str, Any], in_features: int, out_features: int) -> nn.Module:
    return MLPProjector(in_features, out_features, spec.get("hidden_size"), spec.get("activation", "gelu"))


_REGISTRY: dict[str, ProjectorBuilder] = {"linear": _build_linear, "mlp": _build_mlp}
# Settings each built-in type accepts; registered types check their own.
_SETTINGS = {"linear": {"bias"}, "mlp": {"hidden_size", "activation"}}


def register_projector(name: str, builder: ProjectorBuilder, *, replace: bool = False) -> None:
    if name in _REGISTRY and not replace:
        raise ValueError(f"projector type {name!r} is already registered; pass replace=True to override it")
    _REGISTRY[name] = builder


def check_projector(spec: dict[str, Any]) -> None:
    """Raise a ValueError for an unknown projector type or, for the built-in types, bad settings."""
    kind = spec.get("type")
    if kind not in _REGISTRY:
        raise ValueError(f"unknown projector type {kind!r}; registered: {sorted(_REGISTRY)}")
    known = _SETTINGS.get(kind)
    if known is None:
        return
    unknown = set(spec) - known - {"type"}
    if unknown:
        raise ValueError(f"{kind} projector: unknown settings {sorted(unknown)}; known: {sorted(known)}")
    if kind == "mlp":
        hidden = spec.get("hidden_size")
        if hidden is not None and (not isinstance(hidden, int) or isinstance(hidden, bool) or hidden < 1):
            raise ValueError(f"mlp projector: hidden_size must be a positive integer, got {hidden!r}")
        if spec.get("activation", "gelu") not in _ACTIVATIONS:
            raise ValueError(f"mlp projector: unknown activation {spec.get('activation')!r}; "
                             f"choose from {sorted(_ACTIVATIONS)}")
    if kind == "linear" and not isinstance(spec.get("bias", True), bool):
        raise ValueError(f"linear projector: bias must be true or false, got {spec.get('bias')!r}")


def build_projector(spec: dict[str, Any], in_features: int, out_features: int) -> nn.Module:
    """A new projector for the modality's ``projector`` dict."""
    check_projector(spec)
    return _REGISTRY[spec["type"]](spec, in_features, out_features)
