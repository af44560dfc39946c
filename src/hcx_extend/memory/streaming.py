"""Run an LLM whose decoder layers do not all fit on the device: keep what fits, stream the rest.

The extension guide's ``DynamicLayerLoader`` moves layers with ``layer.to(device)`` and evicts the
lowest index with ``layer.to("cpu")``. With 4 slots for 36 layers every layer is copied in and out on
every forward pass, each eviction is a device-to-host copy, and nothing overlaps the copies.
`LayerStreamer` does the same job the way the hardware wants it:

* **resident layers**: as many decoder layers as the budget allows stay on the device for good;
  only the others are streamed, so a pass moves ``streamed layers x layer bytes`` and nothing more;
* **host copies, never written back**: each streamed layer's weights live in one flat host buffer
  (pinned when CUDA is used, so copies are asynchronous DMA). Eviction just points the layer's
  parameters back at that buffer: no device-to-host copy, no allocation;
* **slots**: ``slots`` preallocated flat device buffers (2 by default) receive streamed layers with
  one copy each; parameters become views into the slot;
* **prefetch**: when a streamed layer starts, the next streamed layer (in pass order, wrapping round
  to the next pass) is copied into the free slot on a side CUDA stream; events order copy-after-use
  and use-after-copy, so the CPU never waits;
* it wraps the layers with forward hooks and changes nothing else, so prefill and token-by-token
  decoding with the KV cache run the model's own code, and the logits equal the non-streamed model's
  exactly (same device, same dtype: the same kernels read the same values).

**NF4 layers stream packed.** A model quantised with `quantize_language_model(model, "nf4")` (on the
CPU, or on the GPU and moved back) streams its layers as bitsandbytes stores them: the packed 4-bit
weights, their block scales and the double-quantisation state go into the same flat host buffer and
the same slots, and the quantisation state of each ``Linear4bit`` is pointed at the slot like its
weight. bitsandbytes dequantises on the device at matmul time, as it does for a resident NF4 model,
so each pass moves about a quarter of the bf16 bytes (0.516 byte per weight, `quantized_weight_bytes`)
and the logits equal the resident NF4 model's exactly. PCIe then stops being the bound it is for bf16
streaming: ``benchmarks/nf4_streaming.py`` measures tokens/s against the bf16 PCIe bound.

On ``device="cpu"`` the same code runs with synchronous copies (no streams, no pinning), which is what
the tests use to check slot accounting, load order and bytes moved.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from hcx_extend.units import parse_size

_ALIGN = 256  # bytes; every tensor in a flat buffer starts on this boundary


@dataclass
class StreamStats:
    """What the streamer did since it was built (or since `reset`).

    Attributes:
        bytes_to_device: bytes copied host -> device (streamed layers only).
        bytes_to_host: bytes copied device -> host. The streamer never does this; the field is there so
            a benchmark can put it next to a loader that does.
        loads: ``(layer, slot)`` in the order copies were issued.
        evictions: layers whose slot was reused, in order.
        passes: forward passes through the decoder (prefill or one decoding step each).
    """

    bytes_to_device: int = 0
    bytes_to_host: int = 0
    loads: list[tuple[int, int]] = field(default_factory=list)
    evictions: list[int] = field(default_factory=list)
    passes: int = 0


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layers of an `OmniForCausalLM` or a transformers causal LM."""
    llm = getattr(model, "language_model", model)
    decoder = llm.get_decoder() if hasattr(llm, "get_decoder") else getattr(llm, "model", llm)
    layers = getattr(decoder, "layers", None)
    if not isinstance(layers, nn.ModuleList) or not len(layers):
        raise ValueError(f"cannot find decoder layers in {type(model).__name__}; expected model.language_model.model.layers")
    return layers


# How a streamed tensor is re-pointed: a parameter's .data, a buffer slot, or an attribute of a bitsandbytes
# QuantState (absmax, code, offset; state2's absmax and code).
PARAMETER, BUFFER, QUANT_STATE = "parameter", "buffer", "quant_state"


def _quant_state_tensors(state) -> list[tuple[object, str, torch.Tensor, str]]:
    """The tensors of a bitsandbytes 4-bit ``QuantState`` (the nested one's too), as streamable entries."""
    found = [(state, "absmax", state.absmax, QUANT_STATE), (state, "code", state.code, QUANT_STATE)]
    if state.nested:
        found += [(state, "offset", state.offset, QUANT_STATE), (state.state2, "absmax", state.state2.absmax, QUANT_STATE),
                  (state.state2, "code", state.state2.code, QUANT_STATE)]
    return found


def _layer_tensors(layer: nn.Module) -> list[tuple[object, str, torch.Tensor, str]]:
    """``(owner, attribute, tensor, kind)`` for every parameter, buffer and 4-bit quantisation state tensor of ``layer``."""
    found = []
    for module in layer.modules():
        for name, parameter in module._parameters.items():
            if parameter is None:
                continue
            state = getattr(parameter, "quant_state", None)
            if type(parameter) is not nn.Parameter and (state is None or type(parameter).__name__ != "Params4bit"):
                raise ValueError(
                    f"{type(module).__name__}.{name} is a {type(parameter).__name__}; streaming handles plain weights "
                    "and bitsandbytes 4-bit (nf4/fp4) weights only (quantise with nf4, or stream an unquantised model)"
                )
            found.append((module, name, parameter, PARAMETER))
            if state is not None:
                found += _quant_state_tensors(state)
        for name, buffer in module._buffers.items():
            if buffer is not None:
                found.append((module, name, buffer, BUFFER))
    return found


def _layout(tensors: list[torch.Tensor]) -> tuple[list[int], int]:
    """Byte offsets of each tensor in a flat buffer, and the buffer's size."""
    offsets, size = [], 0
    for tensor in tensors:
        offsets.append(size)
        size += -(-tensor.numel() * tensor.element_size() // _ALIGN) * _ALIGN
    return offsets, size


def layer_bytes(layer: nn.Module) -> int:
    """Bytes of one layer's parameters and buffers."""
    return sum(t.numel() * t.element_size() for _, _, t, _ in _layer_tensors(layer))


def resident_layer_count(model: nn.Module, budget: int, slots: int = 2) -> int:
    """How many decoder layers stay on the device when the model's weights get ``budget`` bytes there.

    Everything that is not a decoder layer (embeddings, head, norms, encoders, projectors) is resident
    and counted first; if all layers then fit, all are resident and nothing streams; otherwise
    ``slots`` layer-sized buffers are set aside and the remainder holds resident layers.

    Raises:
        ValueError: when the budget cannot hold the non-layer weights plus the slots.
    """
    layers = decoder_layers(model)
    in_layers = {id(t) for layer in layers for _, _, t, _ in _layer_tensors(layer)}
    other = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()] if id(t) not in in_layers)
    per_layer = max(layer_bytes(layer) for layer in layers)
    if budget >= other + len(layers) * per_layer:
        return len(layers)
    room = budget - other - slots * per_layer
    if room < 0:
        raise ValueError(
            f"a device budget of {budget:,} bytes cannot hold the non-layer weights ({other:,} bytes) plus {slots} "
            f"streaming slot(s) of {per_layer:,} bytes; give at least {other + slots * per_layer:,} bytes"
        )
    return min(len(layers), room // per_layer)


class LayerStreamer:
    """Keep ``resident`` decoder layers on ``device``, stream the others through ``slots`` buffers.

    Args:
        model: an `OmniForCausalLM` or transformers causal LM with its weights on the CPU; its decoder
            layers may be bitsandbytes NF4 (`quantize_language_model`), which then stream packed.
        device: where the model runs ("cuda:0", "cpu").
        budget: device bytes for the model's weights (int or "8GB"); sets the resident layer count
            (see `resident_layer_count`). Give this or ``resident_layers``.
        resident_layers: keep exactly this many layers (the first ones) on the device.
        slots: device buffers for streamed layers: 2 lets one compute while the next arrives; 1 serialises.
        prefetch: copy the next streamed layer while the current one computes.
        pin: pin the host copies (default: when ``device`` is a CUDA device).

    After construction every non-layer module and the resident layers are on ``device``; streamed
    layers' parameters point at their host buffers until a slot receives them. Call `remove` to
    detach the hooks (the streamed layers are then left pointing at their host copies). For inference:
    a slot is overwritten once its layer has run, so gradients through streamed layers would be wrong.

    Raises:
        ValueError: both or neither of budget / resident_layers, slots < 1, int8-quantised layers,
            layers of different shapes, or a budget too small (see `resident_layer_count`).
    """

    def __init__(self, model: nn.Module, device: str | torch.device, *, budget: int | str | None = None,
                 resident_layers: int | None = None, slots: int = 2, prefetch: bool = True, pin: bool | None = None):
        if (budget is None) == (resident_layers is None):
            raise ValueError("give exactly one of budget (device bytes for the weights) or resident_layers")
        if slots < 1:
            raise ValueError(f"slots must be >= 1, got {slots}")
        self.device = torch.device(device)
        self.layers = decoder_layers(model)
        if resident_layers is None:
            resident_layers = resident_layer_count(model, parse_size(budget, str(self.device)), slots)
        if not 0 <= resident_layers <= len(self.layers):
            raise ValueError(f"resident_layers must be in [0, {len(self.layers)}], got {resident_layers}")
        self.resident = list(range(resident_layers))
        self.streamed = list(range(resident_layers, len(self.layers)))
        self.slots = min(slots, len(self.streamed))
        self.prefetch = prefetch and self.slots > 1
        cuda = self.device.type == "cuda"
        self.pin = cuda if pin is None else pin
        self.stats = StreamStats()
        self._copy_stream = torch.cuda.Stream(self.device) if cuda else None
        self._hooks = []
        self._move_resident(model)
        self._build_buffers()
        for index in self.streamed:
            layer = self.layers[index]
            self._hooks.append(layer.register_forward_pre_hook(self._before(index)))
            self._hooks.append(layer.register_forward_hook(self._after(index), always_call=True))
        if self.prefetch:
            self._load(self.streamed[0])  # overlaps the first pass's resident layers

    # ------------------------------------------------------------------ setup
    def _move_resident(self, model: nn.Module) -> None:
        streamed = {id(t) for i in self.streamed for _, _, t, _ in _layer_tensors(self.layers[i])}
        for module in model.modules():
            for name, parameter in module._parameters.items():
                if parameter is not None and id(parameter) not in streamed:
                    parameter.data = parameter.data.to(self.device)
                    if getattr(parameter, "quant_state", None) is not None:
                        parameter.quant_state.to(self.device)  # a resident 4-bit layer: its scales go along
            for name, buffer in module._buffers.items():
                if buffer is not None and id(buffer) not in streamed:
                    module._buffers[name] = buffer.to(self.device)

    def _build_buffers(self) -> None:
        """One flat host buffer per streamed layer (filled once), ``slots`` flat device buffers."""
        self._entries: dict[int, list[tuple[object, str, torch.Size, torch.dtype, str]]] = {}
        self._host: dict[int, torch.Tensor] = {}
        self._offsets: list[int] = []
        self.layer_nbytes = 0  # bytes of one streamed layer's flat buffer (alignment padding included)
        layout = None
        for index in self.streamed:
            tensors = _layer_tensors(self.layers[index])
            signature = [(name, t.shape, t.dtype) for _, name, t, _ in tensors]
            if layout is None:
                layout = signature
                offsets, size = _layout([t for _, _, t, _ in tensors])
                self._offsets, self.layer_nbytes = offsets, size
            elif signature != layout:
                raise ValueError(f"decoder layer {index} differs in shape from layer {self.streamed[0]}; "
                                 "streaming needs identical layers")
            host = torch.empty(size, dtype=torch.uint8, pin_memory=self.pin)
            for (owner, name, tensor, kind), offset in zip(tensors, offsets):
                view = _view(host, offset, tensor)
                view.copy_(tensor.detach())
                self._point(owner, name, view, kind)
            self._host[index] = host
            self._entries[index] = [(m, n, t.shape, t.dtype, p) for m, n, t, p in tensors]
        self._slot_buffers = [torch.empty(self.layer_nbytes, dtype=torch.uint8, device=self.device)
                              for _ in range(self.slots)]
        self._slot_owner: list[int | None] = [None] * self.slots
        self._ready: dict[int, torch.cuda.Event | None] = {}
        self._released: list[torch.cuda.Event | None] = [None] * self.slots
        self._next_slot = 0

    @staticmethod
    def _point(owner, name: str, tensor: torch.Tensor, kind: str) -> None:
        if kind == PARAMETER:
            owner._parameters[name].data = tensor
        elif kind == BUFFER:
            owner._buffers[name] = tensor
        else:
            setattr(owner, name, tensor)

    def _bind(self, index: int, flat: torch.Tensor) -> None:
        """Point layer ``index``'s tensors at views of ``flat`` (its host buffer or a slot)."""
        for (owner, name, shape, dtype, kind), offset in zip(self._entries[index], self._offsets):
            nbytes = shape.numel() * dtype.itemsize
            self._point(owner, name, flat[offset:offset + nbytes].view(dtype).view(shape), kind)

    # ------------------------------------------------------------------ streaming
    def _slot_of(self, index: int) -> int | None:
        return self._slot_owner.index(index) if index in self._slot_owner else None

    def _load(self, index: int) -> int:
        """Copy layer ``index`` into the next slot (evicting its previous owner without a copy)."""
        slot = self._next_slot
        self._next_slot = (slot + 1) % self.slots
        previous = self._slot_owner[slot]
        if previous is not None:
            self._bind(previous, self._host[previous])
            self.stats.evictions.append(previous)
            self._ready.pop(previous, None)
        buffer = self._slot_buffers[slot]
        if self._copy_stream is not None:
            # Wait until the compute stream is done with the slot's previous layer, then copy on the side stream.
            if self._released[slot] is not None:
                self._copy_stream.wait_event(self._released[slot])
            with torch.cuda.stream(self._copy_stream):
                buffer.copy_(self._host[index], non_blocking=True)
                ready = torch.cuda.Event()
                ready.record(self._copy_stream)
            self._ready[index] = ready
        else:
            buffer.copy_(self._host[index])
            self._ready[index] = None
        self._slot_owner[slot] = index
        self._bind(index, buffer)
        self.stats.bytes_to_device += self.layer_nbytes
        self.stats.loads.append((index, slot))
        return slot

    def _next_streamed(self, index: int) -> int:
        position = self.streamed.index(index)
        return self.streamed[(position + 1) % len(self.streamed)]

    def _before(self, index: int):
        def hook(module, args):
            if index == self.streamed[0]:
                self.stats.passes += 1
            if self._slot_of(index) is None:
                self._load(index)
            ready = self._ready.get(index)
            if ready is not None:
                torch.cuda.current_stream(self.device).wait_event(ready)
            upcoming = self._next_streamed(index)
            if self.prefetch and self._slot_of(upcoming) is None:
                self._load(upcoming)

        return hook

    def _after(self, index: int):
        def hook(module, args, output):
            slot = self._slot_of(index)
            if self._copy_stream is not None and slot is not None:
                released = torch.cuda.Event()
                released.record(torch.cuda.current_stream(self.device))
                self._released[slot] = released

        return hook

    # ------------------------------------------------------------------ reporting
    @property
    def bytes_per_pass(self) -> int:
        """Bytes a full pass copies host -> device in the steady state: every streamed layer once, or
        nothing when the slots hold all streamed layers."""
        return len(self.streamed) * self.layer_nbytes if len(self.streamed) > self.slots else 0

    def reset(self) -> None:
        self.stats = StreamStats()

    def host_buffers(self) -> dict[int, torch.Tensor]:
        """The flat host copy of each streamed layer (for checks that nothing writes to them)."""
        return dict(self._host)

    def remove(self) -> None:
        """Detach the hooks; streamed layers point at their host copies again."""
        for handle in self._hooks:
            handle.remove()
        self._hooks.clear()
        if self._copy_stream is not None:
            torch.cuda.synchronize(self.device)
        for slot, owner in enumerate(self._slot_owner):
            if owner is not None:
                self._bind(owner, self._host[owner])
            self._slot_owner[slot] = None


def _view(flat: torch.Tensor, offset: int, like: torch.Tensor) -> torch.Tensor:
    nbytes = like.numel() * like.element_size()
    return flat[offset:offset + nbytes].view(like.dtype).view(like.shape)
