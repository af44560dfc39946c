"""A small trainer for modality extension, built on accelerate.

It trains whatever the strategy left trainable (`hcx_extend.training.strategies`), with AdamW, a
warm-up + cosine schedule, gradient clipping, periodic evaluation with model selection on a metric,
early stopping, and checkpoints that hold only the trained parameters plus the full config. A run
that is interrupted resumes from its last checkpoint and continues as if it had never stopped: the
data order, dropout randomness, optimiser and schedule all come back.

Checkpoints (``output_dir/last`` after every save, ``output_dir/best`` at the best evaluation) hold the
trained parameters, the optimiser and RNG state, the progress and the full config; they are replaced
atomically, so a process killed at any moment resumes to the same result (`hcx_extend.training.resume`).

Several processes (``accelerate launch``): each global batch is split across processes and the
gradients are averaged, so the result does not depend on the process count.
"""

from __future__ import annotations

import contextlib
import json
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from accelerate import Accelerator, DistributedDataParallelKwargs
from tqdm.auto import tqdm

from hcx_extend.config import IGNORE_INDEX
from hcx_extend.data.examples import Example, gather_inputs
from hcx_extend.ladder import get_strategy
from hcx_extend.layout import atomic_write_text
from hcx_extend.memory import Workload, estimate_memory
from hcx_extend.model import OmniForCausalLM
from hcx_extend.processor import OmniProcessor
from hcx_extend.training.averaging import WeightAverage, split_checkpoint
from hcx_extend.training.report import trainable_report
from hcx_extend.training.resume import (
    LOG_FILE,
    TRAINED_FILE,
    find_resume_folder,
    read_best,
    read_optimizer_state,
    read_state,
    read_trained,
    recover_leftovers,
    write_checkpoint_folder,
)
from hcx_extend.training.settings import RESUME_KEYS, TrainConfig
from hcx_extend.training.strategies import apply_strategy
from hcx_extend.units import human_bytes


@dataclass
class TrainResult:
    history: list[dict[str, Any]]
    best: dict[str, Any] | None
    steps: int
    train_seconds: float
    stopped_early: bool


EvalFn = Callable[[OmniForCausalLM], dict[str, float]]
# Draws one variation of a training example; called afresh for every example in every epoch.
VaryFn = Callable[[Example, np.random.Generator], Example]


class Trainer:
    """Train ``model`` on ``examples`` with ``config``.

    Args:
        model: the model; the strategy decides what in it learns.
        processor: builds batches (labels on the assistant answers only).
        examples: training `Example`s.
        config: `TrainConfig`.
        evaluate: called on the model in eval mode; returns metrics including ``"score"`` (higher is
            better) used for model selection and early stopping. None = no evaluation.
        log: where progress lines go (default: print on the main process).
        vary: draws a variation of an example (augmentation). It is called for every example in every
            epoch with a generator seeded by (seed, epoch, example index), so each epoch sees new
            variations while a resumed run, or one split over processes, sees the same ones.
    """

    def __init__(
        self,
        model: OmniForCausalLM,
        processor: OmniProcessor,
        examples: Sequence[Example],
        config: TrainConfig,
        evaluate: EvalFn | None = None,
        log: Callable[[str], None] | None = None,
        accelerator: Accelerator | None = None,
        vary: VaryFn | None = None,
    ):
        if not examples:
            raise ValueError("no training examples")
        self.config = config
        self.processor = processor
        self.examples = list(examples)
        self.evaluate = evaluate
        self.vary = vary
        self.accelerator = accelerator or Accelerator(
            # On a machine without CUDA, several launched processes form a gloo (MULTI_CPU) group.
            cpu=not torch.cuda.is_available(),
            mixed_precision=config.mixed_precision,
            # Frozen-but-present modalities may not take part in every batch.
            kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)],
        )
        self.log = log or (lambda line: self.accelerator.print(line))
        self.strategy = get_strategy(config.strategy)
        self.plan = apply_strategy(model, self.strategy, config.modalities)
        self.components = self.plan.components
        self.model = model
        self.parameters = {name: p for name, p in model.named_parameters() if p.requires_grad}
        if not self.parameters:
            raise ValueError(f"strategy {self.strategy.name} leaves nothing to train for modalities {config.modalities}")
        world = self.accelerator.num_processes
        if config.batch_size % world:
            raise ValueError(f"batch_size {config.batch_size} must be divisible by the {world} processes")
        # A last batch smaller than the process count would leave a process idle: it is dropped.
        full, rest = divmod(len(self.examples), config.batch_size)
        self.steps_per_epoch = full + (1 if rest >= world else 0)
        if self.steps_per_epoch == 0:
            raise ValueError(f"{len(self.examples)} examples are too few for {world} processes")
        self.total_steps = self.steps_per_epoch * config.epochs
        if config.max_steps is not None:
            self.total_steps = min(self.total_steps, config.max_steps)
        if config.gradient_checkpointing:
            model.language_model.activation_checkpointing_enable({"use_reentrant": False})
        self.param_groups = self._parameter_groups(model)
        optimizer = torch.optim.AdamW(self.param_groups, weight_decay=config.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, self._lr_factor)
        self.model, self.optimizer = self.accelerator.prepare(model, optimizer)
        # Exponential moving average of the trained weights (fp32): what is evaluated, kept and returned.
        self.ema = WeightAverage(self.parameters.items(), config.ema_decay) if config.ema_decay is not None else None
        self.output_dir = Path(config.output_dir) if config.output_dir else None
        self.step = 0
        self.history: list[dict[str, Any]] = []
        self.best: dict[str, Any] | None = None
        self.best_state: dict[str, torch.Tensor] | None = None
        self.evals_without_improvement = 0
        self.finished = False

    # ------------------------------------------------------------------ schedule
    def _parameter_groups(self, model: OmniForCausalLM) -> list[dict[str, Any]]:
        """AdamW groups by what a parameter is, each with its learning rate (`TrainConfig.rates_for`).

        Roles: ``adapter`` (LoRA), ``projector`` (only when ``projector_lr`` is set), ``new`` (components
        initialised for this run) and ``pretrained`` (weights loaded from a checkpoint).
        """
        projectors = {m.projector_module for m in model.config.modalities.values()}
        rates = self.config.rates_for(self.strategy)
        groups: dict[str, list[torch.nn.Parameter]] = {role: [] for role in rates}
        for name, parameter in self.parameters.items():
            component = name.split(".")[1]
            if "lora_" in name:
                role = "adapter"
            elif component in projectors and "projector" in rates:
                role = "projector"
            else:
                role = "new" if component in model.fresh_components else "pretrained"
            groups[role].append(parameter)
        return [{"params": params, "lr": rates[role], "name": role} for role, params in groups.items() if params]

    def _lr_factor(self, step: int) -> float:
        warmup = self.config.warmup_steps
        if warmup and step < warmup:
            return (step + 1) / warmup
        if self.config.lr_schedule == "constant":
            return 1.0
        span = max(1, self.steps_per_epoch * self.config.epochs - warmup)
        progress = min(1.0, (step - warmup) / span)
        floor = self.config.min_lr_ratio
        shape = 0.5 * (1 + math.cos(math.pi * progress)) if self.config.lr_schedule == "cosine" else 1 - progress
        return floor + (1 - floor) * shape

    def _epoch_order(self, epoch: int) -> list[int]:
        generator = torch.Generator().manual_seed(self.config.seed * 100_003 + epoch)
        return torch.randperm(len(self.examples), generator=generator).tolist()

    # ------------------------------------------------------------------ loop
    def train(self) -> TrainResult:
        self.log(f"strategy {self.strategy.name}: {self.strategy.summary}")
        self.log(trainable_report(self.accelerator.unwrap_model(self.model)))
        self.log("learning rates (after warm-up): " + ", ".join(
            f"{g['name']} {g['initial_lr']:.2g} ({sum(p.numel() for p in g['params']):,} parameters)"
            for g in self.optimizer.param_groups))
        self.log(self._memory_report())
        resume_from = self._resume_folder() if self.config.resume and self.output_dir else None
        if resume_from is not None:
            self._load_checkpoint(resume_from)
            self.log(f"resumed from {resume_from} at step {self.step}")
        started = time.perf_counter()
        train_seconds = sum(h.get("seconds", 0.0) for h in self.history if "loss" in h)
        stopped_early = False
        if self.finished:
            self.log("this run already finished; nothing left to train")
        bar = tqdm(total=self.total_steps, initial=self.step, desc="training", unit="step",
                   mininterval=0.1 if sys.stderr.isatty() else 15.0,
                   disable=not (self.config.progress and self.accelerator.is_main_process))
        while not self.finished and self.step < self.total_steps and not stopped_early:
            epoch, position = divmod(self.step, self.steps_per_epoch)
            order = self._epoch_order(epoch)
            batch_indices = order[position * self.config.batch_size:(position + 1) * self.config.batch_size]
            step_started = time.perf_counter()
            loss = self._train_step(batch_indices, epoch)
            seconds = time.perf_counter() - step_started
            train_seconds += seconds
            self.step += 1
            record = {"step": self.step, "epoch": epoch, "loss": loss, "lr": self.scheduler.get_last_lr()[-1],
                      "seconds": seconds, "train_seconds": train_seconds}
            self._record(record)
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.3f}", lr=f"{record['lr']:.2e}")
            end_of_epoch = self.step % self.steps_per_epoch == 0
            due = (self.step % self.config.eval_every_steps == 0) if self.config.eval_every_steps else end_of_epoch
            if self.evaluate is not None and (due or self.step == self.total_steps):
                stopped_early = self._evaluate_and_select(epoch, train_seconds)
            if self.output_dir and (due or end_of_epoch or self.step == self.total_steps or
                                    (self.config.save_every_steps and self.step % self.config.save_every_steps == 0)):
                self._save_checkpoint(self.output_dir / "last")
        bar.close()
        # Finished means every epoch ran or early stopping fired; a max_steps stop can be resumed further.
        self.finished = self.finished or stopped_early or self.step >= self.steps_per_epoch * self.config.epochs
        if self.output_dir:
            self._save_checkpoint(self.output_dir / "last")
        if self.best_state is not None:
            self._load_trainable(self.best_state)
        elif self.ema is not None:
            self._load_trainable(self.ema.tensors)
        self.accelerator.unwrap_model(self.model).eval()
        self.log(f"trained {self.step} steps in {train_seconds:.1f} s (wall {time.perf_counter() - started:.1f} s)")
        return TrainResult(self.history, self.best, self.step, train_seconds, stopped_early)

    def _memory_report(self) -> str:
        """The estimator's per-component bytes (weights, gradients, optimiser state, activations) for this run."""
        model = self.accelerator.unwrap_model(self.model)
        world, micro = self.accelerator.num_processes, self.config.gradient_accumulation_steps
        per_pass = max(1, self.config.batch_size // (world * micro))
        batch = self._collate(self.examples[:per_pass])
        labels = batch["labels"][:, 1:]
        sensor_steps = [int(b["lengths"].max()) for b in batch["modality_inputs"].values() if "lengths" in b]
        workload = Workload(batch=per_pass, seq=batch["input_ids"].shape[1], sensor_steps=max(sensor_steps or [1]),
                            label_fraction=max(1e-3, float((labels != IGNORE_INDEX).float().mean())))
        dtype = {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(model.get_input_embeddings().weight.dtype, "fp32")
        try:
            estimate = estimate_memory(
                model.config, self.strategy, workload, dtype=dtype, trained_dtype="fp32",
                gradient_checkpointing=self.config.gradient_checkpointing,
                modalities=list(self.config.modalities or model.config.modalities),
                fresh=tuple(model.fresh_components), foreach=self.accelerator.device.type == "cuda",
                device="cuda" if self.accelerator.device.type == "cuda" else "cpu",
            )
        except (ValueError, NotImplementedError, RuntimeError) as error:
            return f"memory estimate unavailable: {error}"
        return (f"memory this run needs per process (estimate for batch {per_pass} x {workload.seq} tokens, "
                f"weights {dtype}, trained fp32): peak {human_bytes(estimate.peak)}\n{estimate.table()}")

    def _example(self, index: int, epoch: int) -> Example:
        example = self.examples[index]
        if self.vary is None:
            return example
        return self.vary(example, np.random.default_rng([self.config.seed % 2 ** 32, epoch, index]))

    def _train_step(self, indices: list[int], epoch: int) -> float:
        """One optimiser step on the global batch ``indices``; returns its mean loss per answer token."""
        self.accelerator.unwrap_model(self.model).set_train_mode()
        world, rank = self.accelerator.num_processes, self.accelerator.process_index
        micro = self.config.gradient_accumulation_steps
        size = math.ceil(len(indices) / micro)
        chunks = [indices[i:i + size] for i in range(0, len(indices), size)]
        batches = [self._collate([self._example(i, epoch) for i in chunk[rank::world]]) for chunk in chunks]
        # The loss is a mean over answer tokens. Weight each micro-batch by its share of the global batch's
        # tokens (times the process count, since DDP averages gradients over processes), so any split over
        # processes and micro-batches gives the gradient of one pass over the whole batch.
        tokens = [int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in batches]
        total = self.accelerator.reduce(torch.tensor(float(sum(tokens)), device=self.accelerator.device), reduction="sum")
        loss_sum = torch.zeros((), device=self.accelerator.device)
        for number, (batch, count) in enumerate(zip(batches, tokens)):
            last = number == len(batches) - 1
            with contextlib.nullcontext() if last else self.accelerator.no_sync(self.model):
                output = self.model(**batch, logits_to_keep="labels", use_cache=False,
                                    label_smoothing=self.config.label_smoothing)
                self.accelerator.backward(output.loss * (count * world / total))
            loss_sum += output.loss.detach() * count
        if self.config.max_grad_norm is not None:
            self.accelerator.clip_grad_norm_(list(self.parameters.values()), self.config.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.ema is not None:
            self.ema.update(self._trainable_named(), self.step)
        return float(self.accelerator.reduce(loss_sum, reduction="sum") / total)

    @contextlib.contextmanager
    def _averaged_weights(self):
        """Within the block the model holds the EMA weights (when there is an EMA); afterwards its own."""
        if self.ema is None:
            yield
            return
        own = {name: p.detach().clone() for name, p in self._trainable_named()}
        self._load_trainable(self.ema.tensors)
        try:
            yield
        finally:
            self._load_trainable(own)

    def _collate(self, examples: list[Example]) -> dict[str, Any]:
        return self.processor([e.messages for e in examples], gather_inputs(examples), return_labels=True,
                              padding_side="right")

    def _evaluate_and_select(self, epoch: int, train_seconds: float) -> bool:
        """Evaluate, keep the best trainable state, and say whether to stop early."""
        rng = torch.get_rng_state()
        model = self.accelerator.unwrap_model(self.model)
        model.eval()
        with torch.no_grad(), self._averaged_weights():
            metrics = self.evaluate(model) if self.accelerator.is_main_process else {}
        torch.set_rng_state(rng)
        metrics = self.accelerator.gather_for_metrics([metrics])[0] if self.accelerator.num_processes > 1 else metrics
        record = {"step": self.step, "epoch": epoch, "train_seconds": train_seconds,
                  **{f"eval_{k}": v for k, v in metrics.items()}}
        self._record(record)
        score = metrics.get("score")
        improved = score is not None and (self.best is None or score > self.best["eval_score"])
        if improved:
            self.best = record
            self.best_state = ({name: t.clone() for name, t in self.ema.tensors.items()} if self.ema is not None
                               else {name: p.detach().clone() for name, p in self._trainable_named()})
            self.evals_without_improvement = 0
            if self.output_dir:
                self._save_checkpoint(self.output_dir / "best")
        else:
            self.evals_without_improvement += 1
        shown = ", ".join(f"{k} {v:.4g}" for k, v in metrics.items())
        self.log(f"step {self.step} (epoch {epoch + 1}): {shown}{' *best*' if improved else ''}")
        patience, target = self.config.patience, self.config.target_score
        reached = target is not None and score is not None and score >= target
        return reached or (patience is not None and self.evals_without_improvement >= patience)

    def _record(self, record: dict[str, Any]) -> None:
        self.history.append(record)
        if self.output_dir and self.accelerator.is_main_process:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            with (self.output_dir / "log.jsonl").open("a") as handle:
                handle.write(json.dumps(record) + "\n")

    # ------------------------------------------------------------------ checkpoints
    def _trainable_named(self):
        model = self.accelerator.unwrap_model(self.model)
        return [(name, p) for name, p in model.named_parameters() if p.requires_grad]

    def _load_trainable(self, state: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for name, parameter in self._trainable_named():
                parameter.copy_(state[name].to(parameter.dtype))

    def _save_checkpoint(self, directory: Path) -> None:
        """Write a checkpoint folder (`hcx_extend.training.resume`), replacing ``directory`` atomically."""
        self.accelerator.wait_for_everyone()
        if not self.accelerator.is_main_process:
            return
        state = {"step": self.step, "finished": self.finished, "history": self.history, "best": self.best,
                 "evals_without_improvement": self.evals_without_improvement,
                 "scheduler": self.scheduler.state_dict(), "train_config": _jsonable(asdict(self.config)),
                 "components": self.components}
        tensors = {name: p.detach().to("cpu").contiguous() for name, p in self._trainable_named()}
        tensors.update(self.ema.to_checkpoint() if self.ema is not None else {})
        write_checkpoint_folder(directory, tensors,
                                self.optimizer.state_dict(), state,
                                self.accelerator.unwrap_model(self.model).config.to_dict())

    def _resume_folder(self) -> Path | None:
        """The checkpoint to resume from (`find_resume_folder`), after undoing what a killed save left."""
        if self.accelerator.is_main_process:  # one process renames and removes; the others wait for it
            recover_leftovers(self.output_dir)
        self.accelerator.wait_for_everyone()
        return find_resume_folder(self.output_dir)

    def _load_checkpoint(self, directory: Path) -> None:
        """Restore parameters, optimiser, schedule, history and RNG from a checkpoint folder.

        Raises:
            ValueError: naming the file: another run's settings or parameters, a truncated or corrupt
                file, an optimizer.pt holding anything but tensors and plain containers (it is not unpickled).
        """
        state = read_state(directory / "state.json")
        saved, current = state["train_config"], _jsonable(asdict(self.config))
        different = [k for k in RESUME_KEYS if saved.get(k) != current.get(k)]
        if different:
            raise ValueError(
                f"{directory} holds a run with other settings ({', '.join(f'{k}: {saved.get(k)} vs {current.get(k)}' for k in different)}); "
                "use another output_dir or resume=False"
            )
        tensors, rng = read_trained(directory / TRAINED_FILE)
        tensors, averaged = split_checkpoint(tensors)
        if (self.ema is not None) != bool(averaged):
            raise ValueError(f"{directory / TRAINED_FILE}: the run {'has' if averaged else 'has no'} weight average "
                             f"but this one {'has none' if self.ema is None else 'has one'} (ema_decay)")
        expected = dict(self._trainable_named())
        if set(tensors) != set(expected):
            raise ValueError(
                f"checkpoint {directory} trains other parameters than this run "
                f"(missing {sorted(set(expected) - set(tensors))[:3]}, extra {sorted(set(tensors) - set(expected))[:3]})"
            )
        wrong = [f"{n} {tuple(t.shape)} vs {tuple(expected[n].shape)}" for n, t in tensors.items()
                 if t.shape != expected[n].shape]
        if wrong:
            raise ValueError(f"{directory / TRAINED_FILE}: parameter shapes differ from this run's: {wrong[:3]}")
        try:
            self.optimizer.load_state_dict(read_optimizer_state(directory / "optimizer.pt"))
            self.scheduler.load_state_dict(state["scheduler"])
        except (KeyError, TypeError, IndexError, RuntimeError) as error:
            raise ValueError(f"{directory}: the optimiser or schedule state does not fit this run ({error})") from None
        except ValueError as error:
            if str(error).startswith(str(directory)):
                raise
            raise ValueError(f"{directory}: the optimiser or schedule state does not fit this run ({error})") from None
        self._load_trainable(tensors)
        if self.ema is not None:
            self.ema.from_checkpoint(averaged)
        self.step = state["step"]
        self.finished = bool(state.get("finished", False))
        self.history = state["history"]
        self.best = state.get("best")
        self.evals_without_improvement = state["evals_without_improvement"]
        self.best_state = read_best(directory.parent / "best", self.best["step"] if self.best else None)
        if self.accelerator.is_main_process:
            # Records logged after this checkpoint (and a line cut by a kill) are replaced by the checkpoint's.
            atomic_write_text(self.output_dir / LOG_FILE, "".join(json.dumps(r) + "\n" for r in self.history))
        try:
            torch.set_rng_state(rng)
        except (RuntimeError, TypeError) as error:
            raise ValueError(f"{directory / TRAINED_FILE}: the stored RNG state is not usable ({error})") from None


def _jsonable(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    return value
