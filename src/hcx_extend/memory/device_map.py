"""Place an omni model on GPUs, the CPU and disk by memory budget; load a sharded checkpoint that way.

`plan_device_map` returns an accelerate device map over HCX module names. The units it places are
whole: each modality module (``vision_model``, ``mm_projector``, ``audio_model``, ...), the LLM's
``embed_tokens`` (with ``rotary_emb``), each decoder layer ``model.language_model.model.layers.N``
(never split), the final ``norm`` and ``lm_head`` (a tied head goes with the embeddings). Policies:

* ``auto``: fill the devices in forward order (encoders and their projectors, embeddings, layers 0..N-1,
  norm, head), the first accelerator first, then the next, the CPU, the disk;
* ``encoders-on-cpu`` (the extension guide §4.1): encoders on the CPU; projectors, compressors,
  embeddings, norm and head on the first accelerator; decoder layers fill what is left of it in order,
  then the next devices. (The Omni checkpoint's discrete tokenisers are not built by this package:
  their tensors are carried, not placed.)

When anything is offloaded (CPU or disk) and an accelerator executes, accelerate copies each offloaded
unit onto it for its forward: the plan reserves room for the largest offloaded unit there.

Budgets are ``{"cuda:0": "24GB", "cpu": "64GB", "disk": "500GB"}`` (or ``["cuda:0=24GB", ...]``);
sizes in B/KB/MB/GB/TB (powers of 1000) or KiB/MiB/GiB/TiB, or plain byte counts. Weights are counted
in ``dtype`` with the LLM's Linear layers in ``quant`` (bytes as in `hcx_extend.memory.quantize`).

`dispatch_checkpoint` builds the model with ``init_empty_weights`` (no memory) and lets accelerate's
``load_checkpoint_and_dispatch`` read the safetensors shards one at a time into their devices, writing
disk-placed weights to an offload folder.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import torch
from torch import nn

from accelerate import init_empty_weights, load_checkpoint_and_dispatch

from hcx_extend.config import OmniConfig
from hcx_extend.layout import read_config_dict, safetensors_files
from hcx_extend.memory.estimate import meta_twin
from hcx_extend.memory.quantize import check_method, quantizable_linears, quantized_weight_bytes
from hcx_extend.model import OmniForCausalLM
from hcx_extend.units import human_bytes, parse_dtype, parse_size

POLICIES = ("auto", "encoders-on-cpu")
LLM = "model.language_model"
LAYER_PREFIX = f"{LLM}.model.layers."
_DEVICE = re.compile(r"cuda:(\d+)|cpu|disk")


# ---------------------------------------------------------------------------------------- budgets
def parse_budgets(budgets: dict[str, int | float | str] | Iterable[str]) -> dict[str, int]:
    """Budgets as ``{device: bytes}``, ordered fastest first (cuda:0, cuda:1, ..., cpu, disk).

    Accepts a dict or ``"DEVICE=SIZE"`` strings. Raises ValueError for unknown devices, repeated
    devices, bad sizes or no budget at all.
    """
    if not isinstance(budgets, dict):
        pairs = {}
        for entry in budgets:
            device, separator, size = str(entry).partition("=")
            if not separator:
                raise ValueError(f"budget {entry!r} is not DEVICE=SIZE (e.g. cuda:0=24GB, cpu=64GB, disk=500GB)")
            device = device.strip()
            if device in pairs:
                raise ValueError(f"device {device!r} has two budgets; give each device once")
            pairs[device] = size
        budgets = pairs
    parsed = {}
    for device, size in budgets.items():
        device = "cuda:0" if device == "cuda" else device
        if not _DEVICE.fullmatch(device):
            raise ValueError(f"unknown device {device!r} in the budgets; use cuda:N, cpu or disk")
        parsed[device] = parse_size(size, device)
    if not parsed:
        raise ValueError("no budgets given; pass e.g. cuda:0=24GB cpu=64GB disk=500GB")
    return dict(sorted(parsed.items(), key=lambda item: _device_rank(item[0])))


def _device_rank(device: str) -> tuple[int, int]:
    if device.startswith("cuda:"):
        return 0, int(device.split(":")[1])
    return (1, 0) if device == "cpu" else (2, 0)


def accelerate_device(device: str) -> int | str:
    """Our device names as accelerate's device map writes them: ``cuda:1`` -> 1; cpu/disk unchanged."""
    return int(device.split(":")[1]) if device.startswith("cuda:") else device


# ---------------------------------------------------------------------------------------- units
@dataclass
class Unit:
    """One indivisible piece to place: module names (relative to `OmniForCausalLM`) and their bytes."""

    names: list[str]
    nbytes: int
    role: str  # "encoder", "projector", "compressor", "embeddings", "layer", "head"


def _tensor_bytes(name: str, tensor: torch.Tensor, dtype: torch.dtype, quantized: dict[str, int]) -> int:
    if name in quantized:
        return quantized[name]
    element = dtype.itemsize if tensor.is_floating_point() else tensor.element_size()
    return tensor.numel() * element


def placement_units(model: OmniForCausalLM, dtype: torch.dtype = torch.bfloat16, quant: str | None = None) -> list[Unit]:
    """The model's placement units in forward order with their bytes in ``dtype`` / ``quant``."""
    quantized = {}
    if check_method(quant):
        for name, linear in quantizable_linears(model.language_model):
            quantized[f"{LLM}.{name}.weight"] = quantized_weight_bytes(linear.out_features, linear.in_features, quant)
    sizes: dict[str, int] = {}
    seen: set[int] = set()
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if id(tensor) in seen:
            continue  # tied weights are stored once
        seen.add(id(tensor))
        sizes[name] = _tensor_bytes(name, tensor, dtype, quantized)

    def size_of(*prefixes: str) -> int:
        return sum(n for key, n in sizes.items() if any(key.startswith(p + ".") for p in prefixes))

    units: list[Unit] = []
    placed_modality_modules: set[str] = set()
    for modality in model.config.modalities.values():
        for module, role in ((modality.encoder_module, "encoder"), (modality.projector_module, "projector"),
                             (modality.compressor_module, "compressor")):
            if module is None or module in placed_modality_modules:
                continue
            placed_modality_modules.add(module)
            units.append(Unit([f"model.{module}"], size_of(f"model.{module}"), role))
    llm = model.language_model
    decoder_prefix = f"{LLM}.model"
    embeddings = [f"{decoder_prefix}.embed_tokens"]
    if hasattr(llm.model, "rotary_emb"):
        embeddings.append(f"{decoder_prefix}.rotary_emb")
    head = llm.get_output_embeddings()
    tied = head is not None and head.weight is llm.get_input_embeddings().weight
    if tied:
        embeddings.append(f"{LLM}.lm_head")
    units.append(Unit(embeddings, size_of(*embeddings), "embeddings"))
    for index in range(len(llm.model.layers)):
        name = f"{LAYER_PREFIX}{index}"
        units.append(Unit([name], size_of(name), "layer"))
    tail = [f"{decoder_prefix}.norm"] + ([] if tied or head is None else [f"{LLM}.lm_head"])
    units.append(Unit(tail, size_of(*tail), "head"))
    covered = {name for unit in units for name in unit.names}
    uncovered = [k for k in sizes if not any(k.startswith(c + ".") for c in covered)]
    if uncovered:
        raise ValueError(f"the planner does not know where {uncovered[:3]} belong; the model has modules "
                         "outside the HCX layout")
    return units


# ---------------------------------------------------------------------------------------- the plan
@dataclass
class DevicePlan:
    """Where every unit goes.

    Attributes:
        device_map: accelerate's device map (module name -> GPU index, "cpu" or "disk").
        placements: ``(unit, device)`` in forward order, device in our spelling (``cuda:0``).
        budgets: bytes per device, fastest first.
        reserve: bytes kept free on the executing accelerator for the largest offloaded unit.
        policy: the policy used.
    """

    device_map: dict[str, int | str]
    placements: list[tuple[Unit, str]]
    budgets: dict[str, int]
    reserve: dict[str, int] = field(default_factory=dict)
    policy: str = "auto"

    def used(self, device: str) -> int:
        return sum(unit.nbytes for unit, d in self.placements if d == device)

    def validate(self, model: nn.Module | None = None) -> None:
        """Check budgets, whole decoder layers and (given the model) that every parameter is placed.

        Raises:
            ValueError: naming the first violation.
        """
        for device, budget in self.budgets.items():
            need = self.used(device) + self.reserve.get(device, 0)
            if need > budget:
                raise ValueError(f"plan puts {need:,} bytes on {device} but its budget is {budget:,}")
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
        """Devices with their units, bytes used and budget."""
        lines = [f"policy {self.policy}", f"{'device':<8} {'used':>11} {'budget':>11} {'reserve':>10}  units"]
        for device, budget in self.budgets.items():
            units = [u for u, d in self.placements if d == device]
            if not units and not budget:
                continue
            lines.append(f"{device:<8} {human_bytes(self.used(device)):>11} {human_bytes(budget):>11} "
                         f"{human_bytes(self.reserve.get(device, 0)):>10}  {_describe(units)}")
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


def plan_device_map(
    model_or_config: OmniForCausalLM | OmniConfig,
    budgets: dict[str, int | float | str] | Iterable[str],
    policy: str = "auto",
    *,
    dtype: torch.dtype | str = torch.bfloat16,
    quant: str | None = None,
) -> DevicePlan:
    """An accelerate device map for the model under ``budgets`` (see the module docstring).

    Args:
        model_or_config: a model (any device, meta included) or an `OmniConfig` (built on meta).
        budgets: bytes per device (``cuda:N``, ``cpu``, ``disk``).
        policy: "auto" or "encoders-on-cpu".
        dtype: dtype the weights will be loaded in.
        quant: "nf4" / "int8" for the LLM's Linear layers, or None.

    Returns:
        a validated `DevicePlan`.

    Raises:
        ValueError: unknown policy or device, bad sizes, an executing device that cannot hold one
            decoder layer, or budgets that cannot hold the model.
    """
    if policy not in POLICIES:
        raise ValueError(f"unknown policy {policy!r}; choose from {list(POLICIES)}")
    dtype = parse_dtype(dtype)
    budgets = parse_budgets(budgets)
    model = model_or_config if isinstance(model_or_config, nn.Module) else meta_twin(model_or_config, dtype)
    units = placement_units(model, dtype, quant)
    devices = list(budgets)
    executor = devices[0] if devices[0] != "disk" else None
    if executor is None:
        raise ValueError("budgets name only the disk; give an accelerator (cuda:N) or the CPU to run on")
    largest_layer = max((u.nbytes for u in units if u.role == "layer"), default=0)
    if budgets[executor] < largest_layer:
        raise ValueError(
            f"{executor} budget {budgets[executor]:,} bytes cannot hold even one decoder layer "
            f"({largest_layer:,} bytes in {str(dtype).replace('torch.', '')}{' / ' + quant if quant else ''}); "
            f"raise it to at least {largest_layer:,} bytes or quantise (--quant nf4)"
        )
    total = sum(u.nbytes for u in units)
    if total > sum(budgets.values()):
        raise ValueError(
            f"the model needs {total:,} bytes but the budgets add up to {sum(budgets.values()):,}; "
            "add a disk budget (disk=500GB) or raise the others"
        )
    assign = _assign_auto if policy == "auto" else _assign_encoders_on_cpu
    reserve = 0
    for _ in range(4):  # the reserve depends on what is offloaded, which depends on the reserve
        placements = assign(units, budgets, executor, reserve)
        offloaded = [u.nbytes for u, d in placements if d in ("cpu", "disk") and d != executor]
        needed = max(offloaded, default=0)
        if needed <= reserve:
            break
        reserve = needed
    plan = DevicePlan(
        device_map={name: accelerate_device(device) for unit, device in placements for name in unit.names},
        placements=placements,
        budgets=budgets,
        reserve={executor: reserve} if reserve else {},
        policy=policy,
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


def _assign_auto(units: list[Unit], budgets: dict[str, int], executor: str, reserve: int) -> list[tuple[Unit, str]]:
    free = dict(budgets)
    free[executor] -= reserve
    return _fill(units, free, list(budgets))


def _assign_encoders_on_cpu(units: list[Unit], budgets: dict[str, int], executor: str,
                            reserve: int) -> list[tuple[Unit, str]]:
    if not executor.startswith("cuda:"):
        raise ValueError("policy encoders-on-cpu keeps projectors and the LLM's ends on an accelerator; "
                         "give a cuda:N budget (or use policy auto)")
    free = dict(budgets)
    free[executor] -= reserve
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


# ---------------------------------------------------------------------------------------- loading
def dispatch_checkpoint(
    checkpoint: str | os.PathLike,
    plan: DevicePlan | None = None,
    *,
    budgets: dict[str, int | float | str] | Iterable[str] | None = None,
    policy: str = "auto",
    dtype: torch.dtype | str | None = None,
    offload_folder: str | os.PathLike | None = None,
) -> OmniForCausalLM:
    """Load an HCX-layout safetensors checkpoint straight onto its devices.

    Args:
        checkpoint: folder with ``config.json`` and ``model.safetensors`` or sharded
            ``model-*.safetensors`` + ``model.safetensors.index.json``.
        plan: a `DevicePlan`; or give ``budgets`` (and ``policy``) to plan here.
        dtype: cast weights while loading (None = as stored).
        offload_folder: where disk-placed weights go (required when the plan uses the disk).

    Returns:
        the model in eval mode, with accelerate's hooks moving offloaded weights at run time.

    Raises:
        ValueError: neither plan nor budgets, or a disk plan without ``offload_folder``.
        FileNotFoundError: no config.json / safetensors weights.
    """
    directory = Path(checkpoint)
    safetensors_files(directory)  # raises a clear FileNotFoundError when there are none
    config = OmniConfig(**read_config_dict(directory))
    with init_empty_weights():
        model = OmniForCausalLM(config)
    dtype = parse_dtype(dtype) if dtype is not None else None
    if plan is None:
        if budgets is None:
            raise ValueError("give a DevicePlan or budgets (e.g. {'cuda:0': '24GB', 'cpu': '64GB', 'disk': '500GB'})")
        plan = plan_device_map(model, budgets, policy, dtype=dtype or torch.bfloat16)
    if "disk" in plan.device_map.values() and offload_folder is None:
        raise ValueError("the plan offloads weights to disk: pass offload_folder (a folder with room for them)")
    model = load_checkpoint_and_dispatch(
        model, str(directory), device_map=plan.device_map, offload_folder=offload_folder, dtype=dtype,
        no_split_module_classes=[type(model.language_model.model.layers[0]).__name__],
    )
    model.eval()
    return model
