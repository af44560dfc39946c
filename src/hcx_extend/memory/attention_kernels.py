"""Attention while tracing on the meta device: the kernel the real device would run, with what it keeps.

On meta, ``scaled_dot_product_attention`` would take the math path for every call. A GPU or the CPU
picks a kernel (`DeviceModel.attention_kernel`) and that kernel decides what stays in memory:

* ``cpu-flash``, ``flash`` (FlashAttention-2 / cuDNN) and ``efficient`` (memory-efficient): PyTorch's
  own meta kernels of ``_scaled_dot_product_flash_attention_for_cpu`` / ``_scaled_dot_product_flash_attention``
  / ``_scaled_dot_product_efficient_attention`` run, so the outputs (their memory layout, which decides
  whether a later ``.contiguous()`` copies; the log-sum-exp, padded as the kernel pads it) and what
  autograd saves are the real ones. A boolean mask becomes the additive float bias
  ``scaled_dot_product_attention`` makes of it (and is padded to 8 columns for the memory-efficient
  kernel); the backward's scratch buffers on a GPU (`DeviceModel.attention_backward_scratch`) are
  allocated for the duration of the backward node;
* ``math``: ``_scaled_dot_product_attention_math`` itself, the composite the GPU falls back to; it keeps
  the ``(batch, heads, L, S)`` probabilities for backward.

`attention_stand_in` swaps the function on ``torch.nn.functional`` (callers look it up there at call
time) rather than using a torch-function mode, because the backward recomputation of checkpointed
layers runs on autograd's own thread, where modes of the calling thread do not apply.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
import torch.nn.functional as F

from hcx_extend.memory.device_model import DeviceModel

aten = torch.ops.aten
MASK_ALIGNMENT = 8  # scaled_dot_product_attention pads an additive mask to 8 columns for the memory-efficient kernel


def additive_mask(mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """A boolean mask as the additive bias ``scaled_dot_product_attention`` makes of it (0 / -inf, same shape)."""
    if mask is None or mask.dtype != torch.bool:
        return mask
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(mask.logical_not(), float("-inf"))


def aligned_bias(bias: torch.Tensor, query: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
    """The bias as the memory-efficient kernel gets it: padded to `MASK_ALIGNMENT` columns when its strides
    are not aligned (a copy of the unexpanded bias), then expanded to ``(batch, heads, L, S)`` (a view)."""
    aligned = all(s % MASK_ALIGNMENT == 0 for s in bias.stride()[:-1]) and bias.stride(-1) == 1
    if not aligned:
        columns = bias.shape[-1]
        bias = F.pad(bias, (0, MASK_ALIGNMENT - columns % MASK_ALIGNMENT))[..., :columns]
    return bias.expand(query.shape[0], query.shape[1], query.shape[2], key.shape[2])


def hold_during_backward(output: torch.Tensor, nbytes: int) -> None:
    """Allocate ``nbytes`` when ``output``'s backward node starts and free them when it ends."""
    node = output.grad_fn
    if node is None or nbytes <= 0:
        return
    held: list[torch.Tensor] = []

    def allocate(grad_outputs):
        held.append(torch.empty(nbytes, dtype=torch.uint8, device=output.device))

    def release(grad_inputs, grad_outputs):
        held.clear()

    node.register_prehook(allocate)
    node.register_hook(release)


def traced_attention(device: DeviceModel):
    """``scaled_dot_product_attention`` as ``device`` runs it, for meta tensors."""

    def scaled_dot_product_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                                     enable_gqa=False):
        kernel = device.attention_kernel(query, key, value, attn_mask, enable_gqa)
        bias = additive_mask(attn_mask, query.dtype)
        if kernel == "cpu-flash":
            return aten._scaled_dot_product_flash_attention_for_cpu(query, key, value, dropout_p, is_causal,
                                                                     attn_mask=bias, scale=scale)[0]
        if kernel == "math":
            return aten._scaled_dot_product_attention_math(query, key, value, bias, dropout_p, is_causal, None,
                                                           scale=scale, enable_gqa=enable_gqa)[0]
        if kernel == "flash":
            out = aten._scaled_dot_product_flash_attention(query, key, value, dropout_p, is_causal, False,
                                                           scale=scale)[0]
        else:
            needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value))
            bias = aligned_bias(bias, query, key) if bias is not None else None
            out = aten._scaled_dot_product_efficient_attention(query, key, value, bias, needs_grad, dropout_p,
                                                               is_causal, scale=scale)[0]
        hold_during_backward(out, device.attention_backward_scratch(kernel, query, key))
        return out

    return scaled_dot_product_attention


@contextmanager
def attention_stand_in(device: DeviceModel) -> Iterator[None]:
    """Route ``F.scaled_dot_product_attention`` to `traced_attention` while active."""
    original = F.scaled_dot_product_attention
    F.scaled_dot_product_attention = traced_attention(device)
    try:
        yield
    finally:
        F.scaled_dot_product_attention = original
