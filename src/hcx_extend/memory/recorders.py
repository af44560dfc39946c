"""Two recorders that watch a step run on the meta device: what is alive at once, and what autograd keeps.

* `LiveBytes` (a dispatch mode) follows every storage an operator creates until it is freed and keeps
  the peak: activations plus logits, loss buffers, backward temporaries and gradients as they appear.
* `SavedTensors` (autograd's saved-tensor hooks) adds up, per estimate row, the bytes autograd keeps
  for backward. A storage is counted once however many views of it are saved; weights never are.

Both count a storage of ``n`` bytes as ``device.block_bytes(n)``: exact on the CPU, rounded up to the
CUDA caching allocator's 512-byte blocks for a GPU (`hcx_extend.memory.device_model`).
"""

from __future__ import annotations

import weakref
from collections import defaultdict
from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from hcx_extend.memory.components import component_of_module, is_component_root
from hcx_extend.memory.device_model import DeviceModel


def storage_key(tensor: torch.Tensor) -> int:
    return tensor.untyped_storage()._cdata


class LiveBytes(TorchDispatchMode):
    """Follows every storage an op creates until it is freed; ``peak`` is the most alive at once.

    Storages that existed before (weights, inputs) and views of them are not counted. Frees are seen
    through a finalizer on the storage object, which lives exactly as long as the storage.

    Args:
        device: how the device's allocator counts a storage's bytes.
    """

    def __init__(self, device: DeviceModel | None = None):
        super().__init__()
        self.device = device or DeviceModel.cpu()
        self.live = 0
        self.peak = 0
        self._alive: set[int] = set()

    def _free(self, key: int, nbytes: int) -> None:
        self._alive.discard(key)
        self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {storage_key(a) for a in tree_flatten((args, kwargs))[0] if isinstance(a, torch.Tensor)}
        for tensor in tree_flatten(out)[0]:
            if not isinstance(tensor, torch.Tensor):
                continue
            storage = tensor.untyped_storage()
            key = storage._cdata
            if key in self._alive or key in inputs:
                continue
            nbytes = self.device.block_bytes(storage.nbytes())
            self._alive.add(key)
            self.live += nbytes
            weakref.finalize(storage, self._free, key, nbytes)
        self.peak = max(self.peak, self.live)
        return out


class SavedTensors:
    """Bytes autograd saves for backward, per estimate row, while ``recording`` is true.

    A tensor is attributed to the innermost row's module running when it is saved; what is saved
    outside every row's module (the LLM's selection of the labelled positions) goes to
    ``language_model.lm_head``, with the logits and the loss.

    Args:
        model: the traced model; its parameters and buffers are never counted.
        device: how the device's allocator counts a storage's bytes.
    """

    def __init__(self, model: nn.Module, device: DeviceModel | None = None):
        self.device = device or DeviceModel.cpu()
        self.excluded = {storage_key(t) for t in [*model.parameters(), *model.buffers()]}
        self.by_component: dict[str, int] = defaultdict(int)
        self.recording = True
        self._seen: set[int] = set()
        self._stack: list[str] = []
        self._handles = []
        for name, module in model.named_modules():
            component = component_of_module(name)
            if component is None or not is_component_root(name):
                continue
            self._handles.append(module.register_forward_pre_hook(self._enter(component)))
            self._handles.append(module.register_forward_hook(self._leave, always_call=True))

    def _enter(self, component: str):
        def hook(module, args) -> None:
            self._stack.append(component)

        return hook

    def _leave(self, module, args, output) -> None:
        self._stack.pop()

    @contextmanager
    def component(self, name: str) -> Iterator[None]:
        """Attribute what is saved outside any row's module (splice, loss) to ``name``."""
        self._stack.append(name)
        try:
            yield
        finally:
            self._stack.pop()

    def _pack(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.recording:
            key = storage_key(tensor)
            if key not in self.excluded and key not in self._seen:
                self._seen.add(key)
                component = self._stack[-1] if self._stack else "language_model.lm_head"
                self.by_component[component] += self.device.block_bytes(tensor.untyped_storage().nbytes())
        return tensor

    @contextmanager
    def hooks(self) -> Iterator[None]:
        with torch.autograd.graph.saved_tensors_hooks(self._pack, lambda tensor: tensor):
            yield

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
