"""hcx-extend: extend HyperCLOVA X omni models with new input modalities.

Main entry points:

* `OmniConfig`, `ModalityConfig`: what the model is made of (config.py)
* `OmniForCausalLM`: the model in the HCX weight layout (model.py)
* `OmniProcessor`, `align_tokens`: chats + raw inputs -> model inputs (processor.py)
* `extend`, `load_checkpoint`: add modalities to existing checkpoints (checkpoint.py)
* `build_preset`: tiny test model, hcx-omni-8b on the meta device (presets.py)
"""

from hcx_extend.config import InputContract, ModalityConfig, OmniConfig
from hcx_extend.model import OmniForCausalLM
from hcx_extend.processor import OmniProcessor, align_tokens
from hcx_extend.checkpoint import LoadReport, extend, load_checkpoint, read_source
from hcx_extend.presets import build_preset, preset_config

__version__ = "0.1.0"

__all__ = [
    "InputContract",
    "LoadReport",
    "ModalityConfig",
    "OmniConfig",
    "OmniForCausalLM",
    "OmniProcessor",
    "align_tokens",
    "build_preset",
    "extend",
    "load_checkpoint",
    "preset_config",
    "read_source",
]
