"""hcx-extend: extend HyperCLOVA X omni models with new input modalities.

Main entry points:

* `OmniConfig`, `ModalityConfig`: what the model is made of (config.py)
* `OmniForCausalLM`: the model in the HCX weight layout (model.py)
* `OmniProcessor`, `align_tokens`: chats + raw inputs -> model inputs (processor.py)
* `extend`: add modalities to an existing checkpoint (checkpoint/)
* `load_model`: load any checkpoint kind, a training run's included (runs.py)
* `answer`, `chat`: generate answers about modality inputs (inference.py)
* `build_preset`, `imu_modality`: the tiny test model, hcx-omni-8b on the meta device, the IMU modality (presets.py)
"""

from hcx_extend.checkpoint import LoadReport, extend, load_checkpoint, read_source
from hcx_extend.config import InputContract, ModalityConfig, OmniConfig
from hcx_extend.inference import GenerationSettings, answer, chat
from hcx_extend.model import OmniForCausalLM
from hcx_extend.presets import build_preset, imu_modality, preset_config
from hcx_extend.processor import OmniProcessor, align_tokens
from hcx_extend.runs import load_model, save_run

__version__ = "0.2.0"

__all__ = [
    "GenerationSettings",
    "InputContract",
    "LoadReport",
    "ModalityConfig",
    "OmniConfig",
    "OmniForCausalLM",
    "OmniProcessor",
    "align_tokens",
    "answer",
    "build_preset",
    "chat",
    "extend",
    "imu_modality",
    "load_checkpoint",
    "load_model",
    "preset_config",
    "read_source",
    "save_run",
]
