"""``hcx-extend train``: fine-tune a model on chats with modality inputs, with any strategy of the ladder.

Read it top to bottom:

1. the model: ``--llm`` (any local causal LM folder, .gguf file or HCX checkpoint; default: the
   embedded SmolLM2) with ``--add-imu NAME`` modalities added when missing;
2. the data: ``--data basic-motions`` (the demo's training split, 2 recordings per activity held out
   for evaluation) or a JSONL file, one example per line::

       {"messages": [{"role": "user", "content": "<imu> What is the person doing?"},
                     {"role": "assistant", "content": "walking"}],
        "inputs": {"imu": ["recordings/walk_01.csv"]}}

   (paths relative to the JSONL file; .csv/.npy/.ts for sensors, .npy for other modalities);
   ``--eval-data`` is another such file (evaluation = loss on its answers);
3. per-channel normalisation of sensor modalities fitted on the training items;
4. the strategy: ``projector``, ``new-encoder``, ``lora-encoder``, ``lora-all``, ``qlora`` or ``full``;
5. `Trainer` with the options below; the best evaluation is kept;
6. ``OUTPUT/checkpoint``: the components trained in full, each LoRA adapter in peft's format, the
   full config; ``hcx-extend chat`` and ``hcx-extend merge`` read it.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hcx_extend.training.strategies import STRATEGIES
from hcx_extend.training.trainer import Example, TrainConfig, Trainer


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--strategy", default="new-encoder", choices=list(STRATEGIES))
    parser.add_argument("--data", default="basic-motions", help="basic-motions, or a JSONL file of examples")
    parser.add_argument("--eval-data", default=None, help="JSONL file of evaluation examples")
    parser.add_argument("--llm", default=None, help="base model: causal LM folder, .gguf or HCX checkpoint")
    parser.add_argument("--add-imu", action="append", default=None, metavar="NAME",
                        help="add an IMU modality called NAME if missing (default for basic-motions: imu)")
    parser.add_argument("--modality", action="append", default=None, metavar="NAME",
                        help="modalities the strategy trains (default: those in the data)")
    parser.add_argument("--output", default="runs/train", help="run folder (default runs/train)")
    parser.add_argument("--epochs", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=5e-4, help="learning rate (default 5e-4)")
    parser.add_argument("--projector-lr", type=float, default=None)
    parser.add_argument("--adapter-lr", type=float, default=None)
    parser.add_argument("--warmup-steps", type=int, default=4)
    parser.add_argument("--lr-schedule", default="cosine", choices=["cosine", "linear", "constant"])
    parser.add_argument("--grad-accum", type=int, default=1, help="gradient accumulation micro-batches")
    parser.add_argument("--mixed-precision", default="no", choices=["no", "bf16", "fp16"])
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--eval-every", type=int, default=None, help="evaluate every N steps (default: each epoch)")
    parser.add_argument("--patience", type=int, default=None, help="early stopping after N evaluations without gain")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--resume", action="store_true", help="continue an interrupted run in --output")


def load_examples(path: Path, model) -> list[Example]:
    """Examples from a JSONL file; modality items are read from the files it names."""
    from hcx_extend.data.sensors import read_recording

    examples = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}:{number}: not JSON ({error})") from None
        if "messages" not in record:
            raise ValueError(f"{path}:{number}: needs 'messages' (a chat) and optionally 'inputs'")
        inputs: dict[str, list[Any]] = {}
        for name, files in record.get("inputs", {}).items():
            modality = model.config.modality(name)
            items = []
            for file in files:
                file = path.parent / file
                if modality.input.kind == "sensor":
                    items.append(read_recording(file, modality.input.channel_names))
                else:
                    items.append(np.load(file, allow_pickle=False))
            inputs[name] = items
        examples.append(Example(record["messages"], inputs))
    if not examples:
        raise ValueError(f"{path} holds no examples")
    return examples


def run_training(args: argparse.Namespace) -> int:
    from hcx_extend.checkpoint import extend, save_trained
    from hcx_extend.data.sensors import fit_normalization
    from hcx_extend.demo import imu_modality, mean_loss, predict
    from hcx_extend.presets import smollm2_gguf_path
    from hcx_extend.processor import OmniProcessor
    from hcx_extend.training.adapters import adapted_components, save_adapters

    output = Path(args.output)
    base = Path(args.llm) if args.llm else smollm2_gguf_path()
    basic_motions = args.data == "basic-motions"
    names = args.add_imu if args.add_imu is not None else (["imu"] if basic_motions else [])

    # 1. the model
    torch.manual_seed(args.seed)
    from hcx_extend.checkpoint import read_source

    source = read_source(base)
    new = [{**imu_modality(4), "name": name} for name in names if name not in source.config.modalities]
    result = extend(source, new)
    model, tokenizer = result.model, result.tokenizer
    if tokenizer is None:
        raise ValueError(f"{base} has no tokenizer")

    # 2. the data
    evaluation: list[Example] = []
    if basic_motions:
        from hcx_extend.data.basic_motions import activity_chat, load_basic_motions, parse_activity, stratified_split

        train, held_out = stratified_split(load_basic_motions("train"), per_class=2, seed=args.seed)
        examples = [Example(activity_chat(l), {"imu": [v]}) for v, l in zip(train.values, train.labels)]
    else:
        examples = load_examples(Path(args.data), model)
        if args.eval_data:
            evaluation = load_examples(Path(args.eval_data), model)
    used = sorted({name for e in examples for name in e.inputs})

    # 3. normalisation of sensor modalities
    for name in used:
        modality = model.config.modality(name)
        if modality.input.kind == "sensor" and modality.normalization is None:
            modality.normalization = fit_normalization([item for e in examples for item in e.inputs.get(name, [])])
    processor = OmniProcessor(tokenizer, model.config)

    # 4-5. strategy and training
    def evaluate(m) -> dict[str, float]:
        if basic_motions:
            predictions = [parse_activity(a) for a in predict(m, processor, held_out)]
            accuracy = float(np.mean([p == t for p, t in zip(predictions, held_out.labels)]))
            loss = mean_loss(m, processor, held_out)
            return {"accuracy": accuracy, "loss": loss, "score": accuracy - 1e-3 * loss}
        inputs: dict[str, list[Any]] = {}
        for example in evaluation:
            for name, items in example.inputs.items():
                inputs.setdefault(name, []).extend(items)
        batch = processor([e.messages for e in evaluation], inputs, return_labels=True, padding_side="right")
        loss = float(m(**batch, logits_to_keep="labels").loss)
        return {"loss": loss, "score": -loss}

    config = TrainConfig(
        strategy=args.strategy, modalities=args.modality or used, epochs=args.epochs, batch_size=args.batch_size,
        learning_rate=args.lr, projector_lr=args.projector_lr, adapter_lr=args.adapter_lr,
        warmup_steps=args.warmup_steps, lr_schedule=args.lr_schedule, gradient_accumulation_steps=args.grad_accum,
        mixed_precision=args.mixed_precision, gradient_checkpointing=args.gradient_checkpointing,
        eval_every_steps=args.eval_every, patience=args.patience, seed=args.seed,
        output_dir=str(output / "training"), resume=args.resume,
    )
    trainer = Trainer(model, processor, examples, config, evaluate=evaluate if basic_motions or evaluation else None)
    result = trainer.train()

    # 6. the checkpoint
    checkpoint = output / "checkpoint"
    full = [c for c in trainer.components if c not in adapted_components(model)]
    save_trained(model, checkpoint, base=base, components=full, tokenizer=tokenizer, strategy=args.strategy)
    save_adapters(model, checkpoint)
    summary = {"strategy": args.strategy, "best": result.best, "steps": result.steps,
               "train_seconds": result.train_seconds, "components": trainer.components}
    (output / "train_summary.json").write_text(json.dumps(summary, indent=2))
    print(f"checkpoint: {checkpoint} (trained in full: {full or 'none'}; adapters: {adapted_components(model) or 'none'})")
    return 0
