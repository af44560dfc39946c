"""Place an omni model on GPUs, the CPU and disk by memory budget: an accelerate device map and its peak.

`plan_device_map` places whole units (`hcx_extend.memory.placement`) by policy:

* ``auto``: fill the devices in forward order (encoders and their projectors, embeddings, layers 0..N-1,
  norm, head), the first accelerator first, then the next, the CPU, the disk;
* ``encoders-on-cpu`` (the extension guide §4.1): encoders on the CPU; projectors, compressors,
  embeddings, norm and head on the first accelerator; decoder layers fill what is left of it in order,
  then the next devices.

What lands on the executing device (the first accelerator, or the CPU when no accelerator is given) is
more than the units placed there. With accelerate's dispatch (accelerate 1.x ``hooks.py``), an offloaded
unit (on the CPU or the disk) still *runs* there: a hook on every module that holds parameters copies
them in before that module's forward and drops them after, and the unit's buffers (rotary tables) are
moved there for good. So the plan counts on the executing device

    peak = weights of the units placed there
         + reserve     (buffers of offloaded units + the largest module's parameters among them)
         + activations (the estimator's inference trace for the planned workload: working buffers,
                        KV cache, logits, cuBLAS workspace on CUDA)

and refuses budgets that cannot hold it. Budgets of the other devices hold their units' weights.
`hcx_extend.memory.dispatch.dispatch_checkpoint` loads a checkpoint by such a plan.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable

import torch
from torch import nn

from hcx_extend.config import OmniConfig
from hcx_extend.memory.budgets import accelerate_device, parse_budgets
from hcx_extend.memory.estimate import INFERENCE, estimate_memory, meta_twin
from hcx_extend.memory.placement import LAYER_PREFIX, Unit, placement_units
from hcx_extend.memory.quantize import check_method
from hcx_extend.memory.workload import Workload
from hcx_extend.model import OmniForCausalLM
from hcx_extend.units import dtype_name, human_bytes, parse_dtype

POLICIES = ("auto", "encoders-on-cpu")


@dataclass
class DevicePlan:
    """Where every unit goes, and what each device must hold.

    Attributes:
        device_map: accelerate's device map (module name -> GPU index, "cpu" or "disk").
        placements: ``(unit, device)`` in forward order, device in our spelling (``cuda:0``).
        budgets: bytes per device, fastest first.
        reserve: per device, room for what offloaded units bring onto the executing device (their
            buffers, and the largest module's parameters while it runs).
        activations: per device, the working memory of a forward pass of ``workload`` (estimator's
            inference trace, workspaces included) on the executing device.
        policy: the policy used.
        dtype / quant: how the weights were counted; `dispatch_checkpoint` loads them that way.
        workload: the forward pass the activations are for.
    """

    device_map: dict[str, int | str]
    placements: list[tuple[Unit, str]]
    budgets: dict[str, int]
    reserve: dict[str, int] = field(default_factory=dict)
    activations: dict[str, int] = field(default_factory=dict)
    policy: str = "auto"
    dtype: torch.dtype = torch.bfloat16
    quant: str | None = None
    workload: Workload | None = None

    @property
    def executor(self) -> str:
        """The device that runs every unit: the first accelerator, else the CPU."""
        return next(d for d in self.budgets if d != "disk")

    def used(self, device: str) -> int:
        """Bytes of the units placed on ``device``."""
        return sum(unit.nbytes for unit, d in self.placements if d == device)

    def peak(self, device: str) -> int:
        """Planned peak on ``device``: its units + reserve + activations."""
        return self.used(device) + self.reserve.get(device, 0) + self.activations.get(device, 0)

    def validate(self, model: nn.Module | None = None) -> None:
        """Check every device's planned peak against its budget, whole decoder layers and (given the model)
        that every parameter and buffer is placed exactly once.

        Raises:
            ValueError: naming the first violation.
        """
        for device, budget in self.budgets.items():
            if self.peak(device) > budget:
                raise ValueError(
                    f"plan needs {human_bytes(self.peak(device))} on {device} (weights {human_bytes(self.used(device))}, "
                    f"reserve {human_bytes(self.reserve.get(device, 0))}, activations "
                    f"{human_bytes(self.activations.get(device, 0))}) but its budget is {human_bytes(budget)}")
        for name in self.device_map:
            if name.startswith(LAYER_PREFIX) and "." in name[len(LAYER_PREFIX):]:
                raise ValueError(f"plan splits a decoder layer: {name}")
        if model is not None:
            keys = list(self.device_map)
            for name, _ in [*model.named_parameters(), *model.named_buffers()]:
                owners = [k for k in keys if name.startswith(k + ".")]
                if len(owners) != 1:
                    raise ValueError(f"{name} is placed by {len(owners)} entries of the device map ({owners}); "
                                     "expected exactly one")

    def table(self) -> str:
        """Devices with their units, weights, reserve, activations, planned peak and budget."""
        workload = f", activations for batch {self.workload.batch} x {self.workload.seq} tokens" if self.workload else ""
        lines = [f"policy {self.policy}, weights {dtype_name(self.dtype)}"
                 f"{', LLM linears ' + self.quant if self.quant else ''}{workload}",
                 f"{'device':<8} {'weights':>10} {'reserve':>10} {'activ.':>10} {'peak':>10} {'budget':>10}  units"]
        for device, budget in self.budgets.items():
            units = [u for u, d in self.placements if d == device]
            if not units and not budget:
                continue
            lines.append(f"{device:<8} {human_bytes(self.used(device)):>10} {human_bytes(self.reserve.get(device, 0)):>10} "
                         f"{human_bytes(self.activations.get(device, 0)):>10} {human_bytes(self.peak(device)):>10} "
                         f"{human_bytes(budget):>10}  {_describe(units)}")
        return "\n".join(lines)


def _describe(units: list[Unit]) -> str:
    """``vision_model, mm_projector, layers 0-11, lm_head`` (consecutive layers collapsed)."""
    parts: list[str] = []
    run: list[int] = []

    def flush():
        if run:
            parts.append(f"layers {run[0]}-{run[-1]}" if len(run) > 1 else f"layer {run[0]}")
            run.clear()

    for unit in units:
        if unit.role == "layer":
            run.append(int(unit.names[0][len(LAYER_PREFIX):]))
            continue
        flush()
        parts.append(" + ".join(n.split(".")[-1] for n in unit.names))
    flush()
    return ", ".join(parts) or "-"


def forward_activations(model: OmniForCausalLM, workload: Workload, executor: str, dtype: torch.dtype,
                        quant: str | None, modalities: list[str] | None = None) -> int:
    """Bytes a prefill of ``workload`` needs on ``executor`` besides the weights (estimator's inference trace)."""
    estimate = estimate_memory(model.config, INFERENCE, workload, dtype=dtype, quant=quant, modalities=modalities,
                               device="cuda" if executor.startswith("cuda:") else "cpu")
    return estimate.peak - estimate.total("weights")


def _reserve(placements: list[tuple[Unit, str]], executor: str) -> int:
    offloaded = [u for u, d in placements if d != executor and d in ("cpu", "disk")]
    return sum(u.buffers for u in offloaded) + max((u.largest_module for u in offloaded), default=0)


def plan_device_map(
    model_or_config: OmniForCausalLM | OmniConfig,
    budgets: dict[str, int | float | str] | Iterable[str],
    policy: str = "auto",
    *,
    dtype: torch.dtype | str = torch.bfloat16,
    quant: str | None = None,
    workload: Workload | None = None,
    modalities: list[str] | None = None,
) -> DevicePlan:
    """An accelerate device map for the model under ``budgets`` (see the module docstring).

    Args:
        model_or_config: a model (any device, meta included) or an `OmniConfig` (built on meta).
        budgets: bytes per device (``cuda:N``, ``cpu``, ``disk``).
        policy: "auto" or "encoders-on-cpu".
        dtype: dtype the weights will be loaded in.
        quant: "nf4" / "int8" for the LLM's Linear layers, or None.
        workload: the forward pass to leave room for (default `Workload()`: 1 x 2048 tokens with one
            item of every modality in ``modalities``).
        modalities: modalities the workload feeds (default: all of the model's).

    Returns:
        a validated `DevicePlan`.

    Raises:
        ValueError: unknown policy or device, bad sizes, an executing device that cannot hold one
            decoder layer plus the activations, or budgets that cannot hold the model.
    """
    if policy not in POLICIES:
        raise ValueError(f"unknown policy {policy!r}; choose from {list(POLICIES)}")
    dtype, quant = parse_dtype(dtype), check_method(quant)
    budgets = parse_budgets(budgets)
    workload = workload or Workload()
    model = model_or_config if isinstance(model_or_config, nn.Module) else meta_twin(model_or_config, dtype)
    units = placement_units(model, dtype, quant)
    devices = list(budgets)
    if devices[0] == "disk":
        raise ValueError("budgets name only the disk; give an accelerator (cuda:N) or the CPU to run on")
    executor = devices[0]
    activations = forward_activations(model, workload, executor, dtype, quant, modalities)
    largest_layer = max((u.nbytes for u in units if u.role == "layer"), default=0)
    if budgets[executor] < largest_layer + activations:
        raise ValueError(
            f"{executor} budget {human_bytes(budgets[executor])} cannot hold even one decoder layer "
            f"({human_bytes(largest_layer)} in {dtype_name(dtype)}{' / ' + quant if quant else ''}) plus the activations "
            f"of a {workload.batch} x {workload.seq}-token forward pass ({human_bytes(activations)}); raise it to at "
            f"least {largest_layer + activations:,} bytes, quantise (--quant nf4) or plan a shorter workload"
        )
    total = sum(u.nbytes for u in units)
    if total + activations > sum(budgets.values()):
        raise ValueError(
            f"the model needs {human_bytes(total)} (+ {human_bytes(activations)} of activations) but the budgets add up "
            f"to {human_bytes(sum(budgets.values()))}; add a disk budget (disk=500GB) or raise the others"
        )
    assign = _assign_auto if policy == "auto" else _assign_encoders_on_cpu
    reserve = 0
    for _ in range(4):  # the reserve depends on what is offloaded, which depends on the reserve
        placements = assign(units, budgets, executor, reserve + activations)
        needed = _reserve(placements, executor)
        if needed <= reserve:
            break
        reserve = needed
    if all(device == "disk" for _, device in placements):
        # accelerate cannot dispatch a map with nothing resident, and every unit would be read from disk per pass.
        raise ValueError(
            f"{executor} budget {human_bytes(budgets[executor])} holds no unit once it keeps room for the offloaded "
            f"weights in flight ({human_bytes(reserve)}) and the activations ({human_bytes(activations)}); raise it "
            f"to at least {reserve + activations + units[0].nbytes:,} bytes"
        )
    plan = DevicePlan(
        device_map={name: accelerate_device(device) for unit, device in placements for name in unit.names},
        placements=placements,
        budgets=budgets,
        reserve={executor: reserve} if reserve else {},
        activations={executor: activations},
        policy=policy,
        dtype=dtype,
        quant=quant,
        workload=workload,
    )
    plan.validate(model)
    return plan


def _fill(units: list[Unit], free: dict[str, int], devices: list[str]) -> list[tuple[Unit, str]]:
    """Place units in order, moving to the next device once one does not fit (order is kept)."""
    placements = []
    position = 0
    for unit in units:
        while position < len(devices) and unit.nbytes > free[devices[position]]:
            position += 1
        if position == len(devices):
            raise ValueError(
                f"{', '.join(unit.names)} ({unit.nbytes:,} bytes) fits on no device with the remaining budgets "
                f"{ {d: free[d] for d in devices} }; raise a budget or add disk=..."
            )
        free[devices[position]] -= unit.nbytes
        placements.append((unit, devices[position]))
    return placements


def _assign_auto(units: list[Unit], budgets: dict[str, int], executor: str, kept: int) -> list[tuple[Unit, str]]:
    free = dict(budgets)
    free[executor] -= kept
    return _fill(units, free, list(budgets))


def _assign_encoders_on_cpu(units: list[Unit], budgets: dict[str, int], executor: str,
                            kept: int) -> list[tuple[Unit, str]]:
    if not executor.startswith("cuda:"):
        raise ValueError("policy encoders-on-cpu keeps projectors and the LLM's ends on an accelerator; "
                         "give a cuda:N budget (or use policy auto)")
    free = dict(budgets)
    free[executor] -= kept
    slower = [d for d in budgets if not d.startswith("cuda:")]
    placed: dict[int, str] = {}
    encoders = [i for i, u in enumerate(units) if u.role == "encoder"]
    for i, (_, device) in zip(encoders, _fill([units[i] for i in encoders], free, slower)):
        placed[i] = device
    pinned = [i for i, u in enumerate(units) if u.role in ("projector", "compressor", "embeddings", "head")]
    need = sum(units[i].nbytes for i in pinned)
    if need > free[executor]:
        raise ValueError(
            f"{executor} budget leaves {free[executor]:,} bytes but projectors, embeddings and head need "
            f"{need:,}; raise the {executor} budget or use policy auto"
        )
    for i in pinned:
        placed[i] = executor
        free[executor] -= units[i].nbytes
    layers = [i for i, u in enumerate(units) if u.role == "layer"]
    for i, (_, device) in zip(layers, _fill([units[i] for i in layers], free, list(budgets))):
        placed[i] = device
    return [(units[i], placed[i]) for i in range(len(units))]
