"""LoRA adapters on a meta-device model, computing what peft's ``lora.Linear`` computes.

The estimator cannot call peft on a weightless twin cheaply, and it needs autograd to save exactly
what peft makes it save: `LoraEmulation` adds the adapters as forward hooks (cast to the adapter
dtype, dropout, A, B, scale, add, cast back). Which Linear layers are adapted is the trainer's own
rule (`hcx_extend.lora_targets`); the parameter count of one adapter is `lora_parameter_count`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def lora_parameter_count(linear: nn.Linear, rank: int) -> int:
    """``rank * (in_features + out_features)``: the A and B matrices of one adapter."""
    return rank * (linear.in_features + linear.out_features)


class LoraEmulation:
    """LoRA adapters on ``linears`` as forward hooks, computing what peft's ``lora.Linear`` does.

    Args:
        linears: the adapted Linear layers.
        rank / alpha / dropout: the `LoraSpec`.
        dtype: the adapters' dtype (peft keeps adapters in float32 over a bf16 model by default).
    """

    def __init__(self, linears: list[nn.Linear], rank: int, alpha: int, dropout: float, dtype: torch.dtype):
        self.adapters: list[nn.Module] = []
        self._handles = []
        scale = alpha / rank
        for linear in linears:
            device = linear.weight.device
            down = nn.Linear(linear.in_features, rank, bias=False, device=device, dtype=dtype)
            up = nn.Linear(rank, linear.out_features, bias=False, device=device, dtype=dtype)
            self.adapters.extend((down, up))

            def hook(module, args, output, down=down, up=up):
                x = args[0].to(down.weight.dtype)
                update = up(down(F.dropout(x, dropout, training=True))) * scale
                return (output + update).to(output.dtype)

            self._handles.append(linear.register_forward_hook(hook))

    def parameters(self) -> list[nn.Parameter]:
        return [p for adapter in self.adapters for p in adapter.parameters()]

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
