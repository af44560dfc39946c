"""`TrainConfig`: the settings of a training run, checked when they are made.

Configuration is data: a run's settings are saved in its checkpoints (``state.json``) and a resumed run
must agree with them on `RESUME_KEYS`. Every field is checked for its type and range here, so a
setting given as a string, a zero batch or a NaN learning rate is a ValueError naming the field before
any model is touched.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

from hcx_extend.ladder import Strategy

# Settings a resumed run must share with the run it continues.
RESUME_KEYS = ("strategy", "modalities", "epochs", "batch_size", "learning_rate", "weight_decay", "warmup_steps",
               "min_lr_ratio", "lr_schedule", "projector_lr", "adapter_lr", "pretrained_lr", "max_grad_norm", "seed",
               "ema_decay", "label_smoothing")


@dataclass
class TrainConfig:
    """Settings of a run.

    Args:
        strategy: a name from `hcx_extend.ladder.STRATEGIES`.
        modalities: modalities the strategy trains (None = all).
        epochs / batch_size: passes over the data and samples per optimiser step (global).
        learning_rate: one rate for every parameter whose role has no rate of its own below (None = the
            strategy's `LearningRates` per role: new modules, adapters, pretrained weights).
        weight_decay / warmup_steps / min_lr_ratio: AdamW with linear warm-up then cosine decay to
            ``min_lr_ratio`` times each group's rate.
        lr_schedule: "cosine" (default), "linear" (both decay to ``min_lr_ratio``) or "constant", after warm-up.
        projector_lr / adapter_lr / pretrained_lr: rates for projector parameters, LoRA adapters and
            pretrained weights trained in full (None = see `rates_for`).
        gradient_accumulation_steps: split each batch into this many micro-batches (same result, less memory).
        mixed_precision: "no", "bf16" or "fp16" autocast (accelerate).
        gradient_checkpointing: recompute the LLM's layer activations in the backward pass (less memory,
            about a third more compute).
        max_grad_norm: gradient clipping (None = off).
        ema_decay: keep an exponential moving average of the trained weights with this decay per step
            (e.g. 0.9); evaluations, model selection and the returned model use the average (None = off).
        label_smoothing: cross-entropy label smoothing on the answer tokens (0 = off).
        eval_every_steps: evaluate every N steps (None = after every epoch).
        patience: stop after this many evaluations without a better score (None = never).
        target_score: stop as soon as an evaluation's score reaches this (None = never).
        max_steps: stop after this many steps in all (None = run every epoch).
        save_every_steps: also write the resume checkpoint every N steps (None = at evaluations only).
        output_dir: where checkpoints and ``log.jsonl`` go (None = keep nothing on disk).
        resume: continue from ``output_dir/last`` when it exists.
        seed: data order and dropout.
        progress: show a progress bar.
    """

    strategy: str = "new-encoder"
    modalities: Sequence[str] | None = None
    epochs: int = 10
    batch_size: int = 8
    learning_rate: float | None = None
    weight_decay: float = 0.01
    warmup_steps: int = 0
    min_lr_ratio: float = 0.1
    lr_schedule: str = "cosine"
    projector_lr: float | None = None
    adapter_lr: float | None = None
    pretrained_lr: float | None = None
    gradient_accumulation_steps: int = 1
    mixed_precision: str = "no"
    gradient_checkpointing: bool = False
    max_grad_norm: float | None = 1.0
    ema_decay: float | None = None
    label_smoothing: float = 0.0
    eval_every_steps: int | None = None
    patience: int | None = None
    target_score: float | None = None
    max_steps: int | None = None
    save_every_steps: int | None = None
    output_dir: str | None = None
    resume: bool = True
    seed: int = 0
    progress: bool = True

    def __post_init__(self):
        def integer(name: str, low: int, optional: bool = False) -> None:
            value = getattr(self, name)
            if value is None and optional:
                return
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}{' or None' if optional else ''}, got {value!r}")

        def number(name: str, low: float, optional: bool = False, positive: bool = False) -> None:
            value = getattr(self, name)
            if value is None and optional:
                return
            if (not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value)
                    or value < low or (positive and value <= 0)):
                bound = "> 0" if positive else f">= {low}"
                raise ValueError(f"{name} must be a finite number {bound}{' or None' if optional else ''}, got {value!r}")

        if not isinstance(self.strategy, str):
            raise ValueError(f"strategy must be a strategy name, got {self.strategy!r}")
        for name in ("epochs", "batch_size", "gradient_accumulation_steps"):
            integer(name, 1)
        integer("warmup_steps", 0)
        integer("seed", -(2 ** 63))
        for name in ("eval_every_steps", "patience", "max_steps", "save_every_steps"):
            integer(name, 1, optional=True)
        for name in ("learning_rate", "projector_lr", "adapter_lr", "pretrained_lr", "max_grad_norm"):
            number(name, 0, optional=True, positive=True)
        number("weight_decay", 0)
        if self.ema_decay is not None and (isinstance(self.ema_decay, bool) or not isinstance(self.ema_decay, (int, float))
                                           or not 0 <= self.ema_decay < 1):
            raise ValueError(f"ema_decay must be a number in [0, 1) or None, got {self.ema_decay!r}")
        if isinstance(self.label_smoothing, bool) or not isinstance(self.label_smoothing, (int, float)) \
                or not 0 <= self.label_smoothing < 1:
            raise ValueError(f"label_smoothing must be a number in [0, 1), got {self.label_smoothing!r}")
        number("target_score", -math.inf, optional=True)
        if not isinstance(self.min_lr_ratio, (int, float)) or not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"min_lr_ratio must be a number in [0, 1], got {self.min_lr_ratio!r}")
        if self.lr_schedule not in ("cosine", "linear", "constant"):
            raise ValueError(f"lr_schedule must be cosine, linear or constant, got {self.lr_schedule!r}")
        if self.mixed_precision not in ("no", "bf16", "fp16"):
            raise ValueError(f"mixed_precision must be no, bf16 or fp16, got {self.mixed_precision!r}")
        if self.batch_size % self.gradient_accumulation_steps:
            raise ValueError(f"batch_size {self.batch_size} must be divisible by gradient_accumulation_steps "
                             f"{self.gradient_accumulation_steps}")
        if self.modalities is not None and (isinstance(self.modalities, str)
                                            or not all(isinstance(m, str) for m in self.modalities)):
            raise ValueError(f"modalities must be a list of modality names or None, got {self.modalities!r}")

    def rates_for(self, strategy: Strategy) -> dict[str, float]:
        """Learning rate per parameter role: ``new``, ``pretrained``, ``adapter`` and, when ``projector_lr``
        is set, ``projector``. A rate set here wins; otherwise the strategy's `LearningRates` apply, except
        that an explicit ``learning_rate`` covers every role whose own rate is not set (one rate for all)."""
        defaults = strategy.learning_rates
        rates = {
            "new": self.learning_rate or defaults.new,
            "pretrained": self.pretrained_lr or self.learning_rate or defaults.pretrained,
            "adapter": self.adapter_lr or self.learning_rate or defaults.adapter,
        }
        if self.projector_lr is not None:
            rates["projector"] = self.projector_lr
        return rates
