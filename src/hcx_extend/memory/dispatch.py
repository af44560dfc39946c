"""Load a sharded HCX-layout checkpoint straight onto the devices of a `DevicePlan`.

`dispatch_checkpoint` builds the model with ``init_empty_weights`` (no memory) and lets accelerate's
``load_checkpoint_and_dispatch`` read the safetensors shards one at a time into their devices, writing
disk-placed weights to an offload folder; accelerate's hooks then move offloaded weights in at run time.

Weights are loaded in the plan's dtype, always passed to accelerate explicitly. Without it
(``dtype=None``) accelerate casts every tensor it loads onto a device to the dtype of the *empty
model's* parameter (``set_module_tensor_to_device``: "cast to the dtype of the existing parameter"),
which is float32 for a model built from a config, while disk-offloaded tensors keep the checkpoint's
dtype. A bf16 checkpoint then ran with fp32 resident weights and bf16 offloaded ones: logits that
differed from the bf16 model's (max |diff| 0.122 on an H200) and twice the planned weight memory on
the GPU (3.44 GB for a 2.07 GB budget).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable

import torch
from accelerate import init_empty_weights, load_checkpoint_and_dispatch
from safetensors import safe_open

from hcx_extend.config import OmniConfig
from hcx_extend.layout import read_config_dict, safetensors_files
from hcx_extend.memory.device_map import DevicePlan, plan_device_map
from hcx_extend.model import OmniForCausalLM
from hcx_extend.units import dtype_name, parse_dtype

_SAFETENSORS_FLOATS = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def checkpoint_float_dtypes(checkpoint: str | os.PathLike) -> set[torch.dtype]:
    """The floating dtypes the checkpoint's tensors are stored in (read from the shard headers only)."""
    found = set()
    for path in safetensors_files(Path(checkpoint)):
        with safe_open(path, framework="pt") as reader:
            for key in reader.keys():
                stored = reader.get_slice(key).get_dtype()
                if stored in _SAFETENSORS_FLOATS:
                    found.add(_SAFETENSORS_FLOATS[stored])
    return found


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
        dtype: dtype of the loaded weights. None: the plan's dtype; when planning here, the
            checkpoint's own (if all its floating tensors share one; else bf16). Buffers computed at
            construction (rotary tables) keep their dtype, as ``from_pretrained`` in transformers does.
        offload_folder: where disk-placed weights go (required when the plan uses the disk).

    Returns:
        the model in eval mode, with accelerate's hooks moving offloaded weights at run time.

    Raises:
        ValueError: neither plan nor budgets, a dtype other than the plan's (its bytes were counted
            in the plan's), or a disk plan without ``offload_folder``.
        FileNotFoundError: no config.json / safetensors weights.
    """
    directory = Path(checkpoint)
    safetensors_files(directory)  # raises a clear FileNotFoundError when there are none
    config = OmniConfig(**read_config_dict(directory))
    with init_empty_weights():
        model = OmniForCausalLM(config)
    if plan is None:
        if budgets is None:
            raise ValueError("give a DevicePlan or budgets (e.g. {'cuda:0': '24GB', 'cpu': '64GB', 'disk': '500GB'})")
        stored = checkpoint_float_dtypes(directory)
        planned = parse_dtype(dtype) if dtype is not None else (stored.pop() if len(stored) == 1 else torch.bfloat16)
        plan = plan_device_map(model, budgets, policy, dtype=planned)
    if dtype is not None and parse_dtype(dtype) != plan.dtype:
        raise ValueError(f"the plan counted weights in {dtype_name(plan.dtype)} but dtype={dtype_name(parse_dtype(dtype))} "
                         "was asked for; plan with the dtype you load in (plan_device_map(..., dtype=...))")
    if plan.quant:
        raise ValueError(f"the plan holds the LLM's linear layers in {plan.quant}; dispatch_checkpoint loads full-precision "
                         "checkpoints: quantise after loading (quantize_language_model) or plan without quant")
    if "disk" in plan.device_map.values() and offload_folder is None:
        raise ValueError("the plan offloads weights to disk: pass offload_folder (a folder with room for them)")
    model = load_checkpoint_and_dispatch(
        model, str(directory), device_map=plan.device_map, offload_folder=offload_folder, dtype=plan.dtype,
        no_split_module_classes=[type(model.language_model.model.layers[0]).__name__],
    )
    model.eval()
    return model
