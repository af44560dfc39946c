"""Train what a strategy leaves trainable: `apply_strategy` (strategies.py), LoRA adapters (adapters.py),
the `Trainer` (trainer.py) and what a run reports (report.py). The ladder itself is data: `hcx_extend.ladder`."""

from hcx_extend.training.strategies import apply_strategy
from hcx_extend.training.trainer import TrainConfig, Trainer, TrainResult

__all__ = ["TrainConfig", "TrainResult", "Trainer", "apply_strategy"]
