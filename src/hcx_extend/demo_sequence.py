"""``hcx-extend demo --task sequence``: list the activities of a 40 s to 160 s IMU stream, in order.

Top to bottom:

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
4. train with ``new-encoder`` (encoder, projector and compressor learn; the LLM is frozen),
   keeping the epoch with the best validation score (exact match, then activity error rate);
5. answer "<imu> List the activities in order." by greedy generation for every test stream and
   report exact match, activity error rate and LLM tokens per stream; write ``metrics.json``,
   ``loss_curve.png`` and a checkpoint (``hcx-extend chat`` reads it) into the run folder.

Settings: the sequence task has its own defaults (`SEQUENCE_TRAINING`). The demo's parser shares
``--epochs``, ``--batch-size``, ``--lr`` and ``--stride`` with the activity task and fills them with
the activity task's defaults; a value equal to that default (or None) is read as "not given" and
the sequence default is used. ``--output`` left at ``runs/imu-demo`` becomes
``runs/sequence-<compressor>``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from hcx_extend.data.long_sequence import (
    MAX_RECORDINGS,
    Stream,
    make_streams,
    score_answers,
    sequence_chat,
    sequence_splits,
)
from hcx_extend.data.sensors import fit_normalization
from hcx_extend.demo import DEFAULT_ENCODER, DEFAULT_TRAINING, imu_modality, log, peak_rss_gb, write_loss_curve
from hcx_extend.model import OmniForCausalLM
from hcx_extend.processor import OmniProcessor, compressed_length

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
# Chosen on validation streams within a budget of about ten minutes on 2 CPU cores (see the module
# docstring for how CLI values override them).
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
DEFAULT_OUTPUT = "runs/imu-demo"
# Up to 16 activities of at most 3 tokens each ("badminton" plus ", "), and the end-of-turn token.
MAX_NEW_TOKENS = 3 * MAX_RECORDINGS + 4


def sequence_settings(args: argparse.Namespace) -> dict[str, Any]:
    """`SEQUENCE_TRAINING` with the CLI values that differ from the activity task's defaults."""
    given = {
        "epochs": (getattr(args, "epochs", None), DEFAULT_TRAINING["epochs"]),
        "batch_size": (getattr(args, "batch_size", None), DEFAULT_TRAINING["batch_size"]),
        "learning_rate": (getattr(args, "lr", None), DEFAULT_TRAINING["learning_rate"]),
        "stride": (getattr(args, "stride", None), DEFAULT_ENCODER["stride"]),
    }
    settings = dict(SEQUENCE_TRAINING)
    for key, (value, activity_default) in given.items():
        if value is not None and value != activity_default:
            settings[key] = value
    return settings


def sequence_modality(compressor: str, stride: int) -> dict[str, Any]:
    """The demo's ``imu`` modality with ``stride`` steps per encoder token and the named compressor."""
    if compressor not in COMPRESSORS:
        raise ValueError(f"unknown compressor {compressor!r}; choose from {sorted(COMPRESSORS)}")
    modality = imu_modality(stride)
    modality["encoder"].update(SEQUENCE_ENCODER)
    modality["compressor"] = dict(COMPRESSORS[compressor])
    modality["input"]["max_length"] = 100 * MAX_RECORDINGS
    return modality


def build_sequence_model(llm: str | None, compressor: str, stride: int, seed: int):
    """The LLM with the sequence task's ``imu`` modality: ``(model, tokenizer, base path)``."""
    from hcx_extend.checkpoint import extend
    from hcx_extend.presets import smollm2_gguf_path

    base = Path(llm) if llm else smollm2_gguf_path()
    torch.manual_seed(seed)
    result = extend(base, [sequence_modality(compressor, stride)])
    if result.tokenizer is None:
        raise ValueError(f"{base} has no tokenizer; the demo needs one to build chats")
    return result.model, result.tokenizer, base


def llm_tokens(model: OmniForCausalLM, stream: Stream) -> int:
    """Placeholder tokens the LLM reads for ``stream`` (encoder stride, then compressor)."""
    modality = model.config.modality("imu")
    stride = modality.encoder.get("stride", 1)
    return compressed_length(modality, -(-len(stream.values) // stride))


@torch.no_grad()
def predict_lists(model: OmniForCausalLM, processor: OmniProcessor, streams: list[Stream], batch_size: int = 8) -> list[str]:
    """Greedy answers to "List the activities in order.", one per stream."""
    answers = []
    pad = processor.tokenizer.pad_token_id or processor.tokenizer.eos_token_id
    for start in range(0, len(streams), batch_size):
        chunk = streams[start:start + batch_size]
        batch = processor([sequence_chat() for _ in chunk], {"imu": [s.values for s in chunk]}, padding_side="left")
        generated = model.generate(**batch, max_new_tokens=MAX_NEW_TOKENS, do_sample=False, pad_token_id=pad)
        answers.extend(processor.decode(row) for row in generated[:, batch["input_ids"].shape[1]:])
    return answers


@torch.no_grad()
def mean_loss(model: OmniForCausalLM, processor: OmniProcessor, streams: list[Stream], batch_size: int = 8) -> float:
    losses = []
    for start in range(0, len(streams), batch_size):
        chunk = streams[start:start + batch_size]
        batch = processor([sequence_chat(s.answer) for s in chunk], {"imu": [s.values for s in chunk]},
                          return_labels=True, padding_side="right")
        losses.append(float(model(**batch, logits_to_keep="labels").loss) * len(chunk))
    return sum(losses) / len(streams)


def train_and_test(
    compressor: str,
    *,
    llm: str | None = None,
    seed: int = 0,
    settings: dict[str, Any] | None = None,
    run: Path | None = None,
    resume: bool = False,
    patience: int | None = None,
    log: Callable[[str], None] = log,
) -> dict[str, Any]:
    """Steps 1 to 5 of the module docstring for one compressor; returns the metrics (and writes them when ``run``)."""
    from hcx_extend.checkpoint import save_trained
    from hcx_extend.training.trainer import Example, TrainConfig, Trainer

    settings = {**SEQUENCE_TRAINING, **(settings or {})}
    started = time.perf_counter()
    log(f"1/5 loading the LLM and adding an imu modality with the {compressor} compressor")
    model, tokenizer, base = build_sequence_model(llm, compressor, settings["stride"], seed)
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
        loss = mean_loss(m, processor, splits.validation)
        return {**scores, "loss": loss, "score": scores["exact_match"] - 0.1 * scores["activity_error_rate"]}

    log("4/5 training (new-encoder: encoder, projector and compressor learn; the LLM is frozen)")
    # Short streams (1 to 3 recordings, same pool, same question) teach what each activity looks like
    # sooner; validation and test streams are 4 to 16 recordings only.
    short = make_streams(splits.train_pool, settings["short_streams"], seed=seed * 3 + 4, min_recordings=1,
                         max_recordings=3)
    examples = [Example(sequence_chat(s.answer), {"imu": [s.values]}) for s in splits.train + short]
    config = TrainConfig(
        strategy="new-encoder", modalities=["imu"], epochs=settings["epochs"], batch_size=settings["batch_size"],
        learning_rate=settings["learning_rate"], warmup_steps=settings["warmup_steps"],
        min_lr_ratio=settings["min_lr_ratio"], patience=patience, seed=seed,
        output_dir=str(run / "training") if run else None, resume=resume,
    )
    result = Trainer(model, processor, examples, config, evaluate=evaluate, log=log).train()

    log(f"5/5 answering for the {len(splits.test)} test streams (greedy generation)")
    test_started = time.perf_counter()
    answers = predict_lists(model, processor, splits.test)
    test_seconds = time.perf_counter() - test_started
    scores = score_answers(answers, splits.test)
    tokens = [llm_tokens(model, s) for s in splits.test]
    by_size = {}
    for size in range(4, MAX_RECORDINGS + 1, 4):
        members = [i for i, s in enumerate(splits.test) if size <= len(s.labels) < size + 4]
        if members:
            by_size[f"{size}-{min(size + 3, MAX_RECORDINGS)}"] = score_answers(
                [answers[i] for i in members], [splits.test[i] for i in members])["exact_match"]
    metrics = {
        "compressor": compressor,
        "compressor_spec": model.config.modality("imu").compressor,
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
        components = [n for n, m in model.model.named_children() if any(p.requires_grad for p in m.parameters())]
        save_trained(model, run / "checkpoint", base=base, components=components, tokenizer=tokenizer)
        write_loss_curve(run, result.history, f"sequence task, {compressor} compressor")
        (run / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return metrics


def run_sequence_demo(args: argparse.Namespace) -> int:
    """Entry point of ``hcx-extend demo --task sequence`` (arguments from `hcx_extend.demo.add_demo_arguments`)."""
    if args.threads:
        torch.set_num_threads(args.threads)
    compressor = args.compressor
    run = Path(args.output if args.output != DEFAULT_OUTPUT else f"runs/sequence-{compressor}")
    if not args.resume and (run / "training").exists():
        import shutil

        shutil.rmtree(run / "training")
    run.mkdir(parents=True, exist_ok=True)
    settings = sequence_settings(args)
    metrics = train_and_test(compressor, llm=args.llm, seed=args.seed, settings=settings, run=run,
                             resume=args.resume, patience=args.patience)
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
    log(f"run folder: {run} (metrics.json, loss_curve.png, checkpoint/)")
    log(f"try: hcx-extend chat {run / 'checkpoint'} --imu <stream.npy> \"List the activities in order.\"")
    return 0
