"""Run big omni models on small GPUs.

* `estimate_memory`: bytes per component (weights, gradients, AdamW state, activations) and the peak of
  a training step for each strategy, or of an inference prefill; works on the meta device, for a CPU or
  a CUDA `DeviceModel` (allocator rounding, attention kernels, cuBLAS workspaces).
* `plan_device_map` / `dispatch_checkpoint`: place whole units (modality modules, decoder layers) on
  GPUs, CPU and disk by budget, counting what lands on the executing device (offloaded weights copied
  in, buffers, activations), then load sharded safetensors straight onto those devices.
* `quantize_language_model`: the LLM's Linear layers in 4-bit NF4 (double quantisation) or int8.
* `LayerStreamer`: keep the layers that fit resident, stream the rest through prefetched slots.
"""

from hcx_extend.memory.device_model import DeviceModel
from hcx_extend.memory.budgets import parse_budgets
from hcx_extend.memory.device_map import DevicePlan, plan_device_map
from hcx_extend.memory.dispatch import dispatch_checkpoint
from hcx_extend.memory.estimate import MemoryEstimate, estimate_memory, weight_footprint
from hcx_extend.memory.quantize import QuantizationReport, next_token_agreement, quantize_language_model
from hcx_extend.memory.streaming import LayerStreamer, StreamStats, resident_layer_count
from hcx_extend.memory.workload import Workload

__all__ = [
    "DeviceModel",
    "DevicePlan",
    "LayerStreamer",
    "MemoryEstimate",
    "QuantizationReport",
    "StreamStats",
    "Workload",
    "dispatch_checkpoint",
    "estimate_memory",
    "next_token_agreement",
    "parse_budgets",
    "plan_device_map",
    "quantize_language_model",
    "resident_layer_count",
    "weight_footprint",
]
