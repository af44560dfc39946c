"""``hcx-extend demo --task sequence``: list the activities of a 40 s to 160 s IMU stream, in order.

Read it top to bottom:

1. load SmolLM2-135M-Instruct (or ``--llm``) and add an ``imu`` modality: a local IMU encoder
   (convolution only, `SEQUENCE_ENCODER`; 4 steps averaged per token, so 2.5 tokens per second)
   followed by the chosen compressor (``--compressor``): ``mambamia`` or ``avgpool`` with chunks of
   25 tokens (10 s), or ``none``. A stream of 400 to 1600 steps gives 100 to 400 sensor tokens and
   reaches the LLM as 4 to 16 tokens (100 to 400 with ``none``);
2. draw streams of 4 to 16 BasicMotions recordings (`hcx_extend.data.long_sequence`): training
   streams from the train split with 2 recordings per activity held out, validation streams from
   those held-out recordings, test streams from the test split (touched once, at the end). Short
   streams of 1 to 3 training recordings are mixed into training (not into validation or test);
3. fit per-channel normalisation on the training recordings;
4. train with ``--strategy`` (default ``new-encoder``: encoder, projector and compressor learn; the
   LLM is frozen), keeping the evaluation with the best validation score (exact match, then
   activity error rate);
5. answer "<imu> List the activities in order." by greedy generation for every test stream and
   report exact match, activity error rate and LLM tokens per stream; write ``metrics.json``,
   ``loss_curve.png`` and a checkpoint (``hcx-extend chat`` reads it) into the run folder.

Settings (`SEQUENCE_TRAINING`) were chosen on validation streams within a budget of about ten
minutes on 2 CPU cores; ``--epochs``, ``--batch-size``, ``--lr`` and ``--stride`` override them.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from hcx_extend.checkpoint import cached_source, extend
from hcx_extend.config import ModalityConfig
from hcx_extend.data.examples import Example
from hcx_extend.data.long_sequence import (
    MAX_RECORDINGS,
    Stream,
    make_streams,
    score_answers,
    sequence_chat,
    sequence_splits,
)
from hcx_extend.data.sensors import fit_normalization
from hcx_extend.evaluation import mean_answer_loss
from hcx_extend.inference import GenerationSettings, answer
from hcx_extend.model import OmniForCausalLM
from hcx_extend.presets import imu_modality, smollm2_gguf_path
from hcx_extend.processor import OmniProcessor
from hcx_extend.recipes.activity import log, peak_rss_gb
from hcx_extend.runs import prepare_run_folder, save_run, write_run_notes
from hcx_extend.training import TrainConfig, Trainer
from hcx_extend.training.report import write_loss_curve

CHUNK_SIZE = 25
COMPRESSORS: dict[str, dict[str, Any]] = {
    "mambamia": {"type": "mambamia", "chunk_size": CHUNK_SIZE},
    "avgpool": {"type": "avgpool", "chunk_size": CHUNK_SIZE},
    "none": {"type": "none"},
}
# The activity demo's encoder attends over its whole input without positions: over a long stream it
# blurs neighbouring recordings together. Here it only extracts local features (convolution, no
# attention layers) and the compressor does the temporal modelling.
SEQUENCE_ENCODER: dict[str, Any] = {"num_layers": 0, "kernel_size": 5, "output_size": 256}
SEQUENCE_TRAINING: dict[str, Any] = {
    "epochs": 8,
    "batch_size": 8,
    "learning_rate": 1e-3,
    "warmup_steps": 4,
    "min_lr_ratio": 0.1,
    "stride": 4,
    "train_streams": 128,
    "short_streams": 64,
    "validation_streams": 24,
    "test_streams": 40,
}
# Up to 16 activities of at most 3 tokens each ("badminton" plus ", "), and the end-of-turn token.
ANSWER = GenerationSettings(max_new_tokens=3 * MAX_RECORDINGS + 4)


def sequence_modality(compressor: str, stride: int) -> ModalityConfig:
    """The task's ``imu`` modality with ``stride`` steps per encoder token and the named compressor."""
    if compressor not in COMPRESSORS:
        raise ValueError(f"unknown compressor {compressor!r}; choose from {sorted(COMPRESSORS)}")
    return imu_modality("imu", max_length=100 * MAX_RECORDINGS, compressor=dict(COMPRESSORS[compressor]),
                        **{**SEQUENCE_ENCODER, "stride": stride})


def examples_of(streams: list[Stream]) -> list[Example]:
    return [Example(sequence_chat(s.answer), {"imu": [s.values]}) for s in streams]


def predict_lists(model: OmniForCausalLM, processor: OmniProcessor, streams: list[Stream], batch_size: int = 8) -> list[str]:
    """Greedy answers to "List the activities in order.", one per stream."""
    answers: list[str] = []
    for start in range(0, len(streams), batch_size):
        chunk = streams[start:start + batch_size]
        found = answer(model, processor, [sequence_chat() for _ in chunk], {"imu": [s.values for s in chunk]}, ANSWER)
        answers += [a.text for a in found]
    return answers


def train_and_test(
    compressor: str,
    *,
    llm: str | None = None,
    strategy: str = "new-encoder",
    seed: int = 0,
    settings: dict[str, Any] | None = None,
    run: Path | None = None,
    resume: bool = False,
    patience: int | None = None,
    log: Callable[[str], None] = log,
) -> dict[str, Any]:
    """Steps 1 to 5 of the module docstring for one compressor; returns the metrics (and writes them when ``run``)."""
    settings = {**SEQUENCE_TRAINING, **(settings or {})}
    started = time.perf_counter()
    log(f"1/5 loading the LLM and adding an imu modality with the {compressor} compressor")
    base = Path(llm) if llm else smollm2_gguf_path()
    torch.manual_seed(seed)
    extended = extend(cached_source(base), [sequence_modality(compressor, settings["stride"])])
    model, tokenizer = extended.model, extended.tokenizer
    loaded = time.perf_counter() - started

    log("2/5 drawing streams of 4 to 16 BasicMotions recordings")
    splits = sequence_splits(seed, settings["train_streams"], settings["validation_streams"], settings["test_streams"])
    log(f"    train {len(splits.train)} streams ({len(splits.train_pool)} recordings), validation "
        f"{len(splits.validation)} ({len(splits.validation_pool)} held-out recordings), test {len(splits.test)} "
        f"(test split)")

    log("3/5 fitting per-channel normalisation on the training recordings")
    model.config.modality("imu").normalization = fit_normalization(splits.train_pool.values)
    processor = OmniProcessor(tokenizer, model.config)

    def evaluate(m: OmniForCausalLM) -> dict[str, float]:
        scores = score_answers(predict_lists(m, processor, splits.validation), splits.validation)
        loss = mean_answer_loss(m, processor, examples_of(splits.validation), batch_size=8)
        return {**scores, "loss": loss, "score": scores["exact_match"] - 0.1 * scores["activity_error_rate"]}

    log(f"4/5 training ({strategy})")
    # Short streams (1 to 3 recordings, same pool, same question) teach what each activity looks like
    # sooner; validation and test streams are 4 to 16 recordings only.
    short = make_streams(splits.train_pool, settings["short_streams"], seed=seed * 3 + 4, min_recordings=1,
                         max_recordings=3)
    config = TrainConfig(
        strategy=strategy, modalities=["imu"], epochs=settings["epochs"], batch_size=settings["batch_size"],
        learning_rate=settings["learning_rate"], warmup_steps=settings["warmup_steps"],
        min_lr_ratio=settings["min_lr_ratio"], patience=patience, seed=seed,
        output_dir=str(run / "training") if run else None, resume=resume,
    )
    trainer = Trainer(model, processor, examples_of(splits.train + short), config, evaluate=evaluate, log=log)
    result = trainer.train()

    log(f"5/5 answering for the {len(splits.test)} test streams (greedy generation)")
    test_started = time.perf_counter()
    answers = predict_lists(model, processor, splits.test)
    test_seconds = time.perf_counter() - test_started
    scores = score_answers(answers, splits.test)
    tokens = processor.placeholder_counts("imu", [s.values for s in splits.test])
    by_size = {}
    for size in range(4, MAX_RECORDINGS + 1, 4):
        members = [i for i, s in enumerate(splits.test) if size <= len(s.labels) < size + 4]
        if members:
            by_size[f"{size}-{min(size + 3, MAX_RECORDINGS)}"] = score_answers(
                [answers[i] for i in members], [splits.test[i] for i in members])["exact_match"]
    metrics = {
        "compressor": compressor,
        "compressor_spec": model.config.modality("imu").compressor,
        "strategy": strategy,
        "test_exact_match": scores["exact_match"],
        "test_activity_error_rate": scores["activity_error_rate"],
        "test_exact_match_by_recordings": by_size,
        "test_streams": len(splits.test),
        "sensor_steps_per_stream": {"mean": float(np.mean([len(s.values) for s in splits.test])),
                                    "min": min(len(s.values) for s in splits.test),
                                    "max": max(len(s.values) for s in splits.test)},
        "llm_tokens_per_stream": {"mean": float(np.mean(tokens)), "min": min(tokens), "max": max(tokens)},
        "best_validation": result.best,
        "steps": result.steps,
        "train_seconds": result.train_seconds,
        "test_seconds": test_seconds,
        "load_seconds": loaded,
        "wall_seconds": time.perf_counter() - started,
        "peak_rss_gb": peak_rss_gb(),
        "settings": settings,
        "seed": seed,
        "llm": str(base),
        "examples": [{"labels": s.answer, "answer": a} for s, a in list(zip(splits.test, answers))[:6]],
    }
    if run is not None:
        save_run(model, run / "checkpoint", base=base, components=trainer.components, tokenizer=tokenizer,
                 strategy=strategy)
        write_loss_curve(run / "loss_curve.png", result.history, f"sequence task, {compressor} compressor")
        write_run_notes(run / "metrics.json", metrics)
    return metrics


def run(args: argparse.Namespace) -> int:
    """Entry point of ``hcx-extend demo --task sequence`` (arguments: `hcx_extend.recipes.activity.add_arguments`)."""
    if args.threads:
        torch.set_num_threads(args.threads)
    compressor = args.compressor or "mambamia"
    run_folder = prepare_run_folder(args.output or f"runs/sequence-{compressor}", resume=args.resume)
    overrides = {key: value for key, value in (("epochs", args.epochs), ("batch_size", args.batch_size),
                                               ("learning_rate", args.lr), ("stride", args.stride)) if value is not None}
    metrics = train_and_test(compressor, llm=args.llm, strategy=args.strategy, seed=args.seed,
                             settings=overrides, run=run_folder, resume=args.resume, patience=args.patience)
    log("")
    for example in metrics["examples"][:3]:
        log(f"    truth:  {example['labels']}\n    answer: {example['answer']}")
    log(f"test exact match: {metrics['test_exact_match']:.1%} of {metrics['test_streams']} streams; "
        f"activity error rate {metrics['test_activity_error_rate']:.1%}")
    tokens, steps = metrics["llm_tokens_per_stream"], metrics["sensor_steps_per_stream"]
    log(f"LLM tokens per stream: mean {tokens['mean']:.0f} (min {tokens['min']}, max {tokens['max']}) for "
        f"{steps['mean']:.0f} sensor steps on average ({compressor})")
    log(f"wall time {metrics['wall_seconds']:.0f} s (loading {metrics['load_seconds']:.0f} s, training "
        f"{metrics['train_seconds']:.0f} s, test {metrics['test_seconds']:.0f} s), peak memory "
        f"{metrics['peak_rss_gb']:.2f} GB")
    log(f"run folder: {run_folder} (metrics.json, loss_curve.png, checkpoint/)")
    log(f"try: hcx-extend chat {run_folder / 'checkpoint'} --imu <stream.npy> \"List the activities in order.\"")
    return 0
