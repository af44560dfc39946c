"""``hcx-extend train``: fine-tune a model on chats with modality inputs, with any strategy of the ladder.

Read it top to bottom:

1. the model: ``--llm`` (any local causal LM folder, .gguf file or HCX checkpoint; default: the
   embedded SmolLM2) with modalities added when missing: ``--add-imu NAME`` (the IMU preset) and
   ``--modality-file FILE.json`` (any modality, `hcx_extend.checkpoint.modality_file`). They are added
   in memory: no copy of the LLM is written, the run checkpoint refers to ``--llm``;
2. the data: ``--data basic-motions`` (the demo's training split, 2 recordings per activity held out
   for evaluation) or a JSONL file (`hcx_extend.data.examples`); ``--eval-data`` is another one;
3. per-channel normalisation of sensor modalities fitted on the training items;
4. the strategy: ``projector``, ``new-encoder``, ``lora-encoder``, ``lora-all``, ``qlora`` or ``full``;
5. `Trainer` with the options below; the best evaluation is kept, by answer loss or, with
   ``--select-by accuracy``, by exact-match accuracy of generated answers;
6. ``OUTPUT/checkpoint``: the components trained in full, each LoRA adapter in peft's format, the
   full config and the base model's identity (`hcx_extend.runs`); ``chat``, ``serve``, ``evaluate``
   and ``merge`` read it.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from hcx_extend.checkpoint import cached_source, extend
from hcx_extend.checkpoint.modality_file import read_modality_file
from hcx_extend.data.basic_motions import activity_chat, load_basic_motions, parse_activity, stratified_split
from hcx_extend.data.examples import Example, read_jsonl
from hcx_extend.data.sensors import fit_normalization
from hcx_extend.evaluation import evaluate_examples, mean_answer_loss
from hcx_extend.inference import GenerationSettings
from hcx_extend.ladder import STRATEGIES
from hcx_extend.presets import imu_modality, smollm2_gguf_path
from hcx_extend.processor import OmniProcessor
from hcx_extend.runs import prepare_run_folder, save_run, write_run_notes
from hcx_extend.training import TrainConfig, Trainer


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--strategy", default="new-encoder", choices=list(STRATEGIES))
    parser.add_argument("--data", default="basic-motions", help="basic-motions, or a JSONL file of examples")
    parser.add_argument("--eval-data", default=None, help="JSONL file of evaluation examples")
    parser.add_argument("--llm", default=None, help="base model: causal LM folder, .gguf or HCX checkpoint")
    parser.add_argument("--add-imu", action="append", default=None, metavar="NAME",
                        help="add an IMU modality called NAME if missing (default for basic-motions: imu)")
    parser.add_argument("--modality-file", action="append", default=[], metavar="FILE",
                        help="add the modality described in a JSON file if missing (repeatable)")
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
    parser.add_argument("--select-by", default="loss", choices=["loss", "accuracy"],
                        help="keep the checkpoint with the lowest eval answer loss (default) or the highest exact-match "
                        "accuracy of generated answers")
    parser.add_argument("--patience", type=int, default=None, help="early stopping after N evaluations without gain")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--resume", action="store_true", help="continue an interrupted run in --output")


def run(args: argparse.Namespace) -> int:
    output = prepare_run_folder(args.output, resume=args.resume)
    base = Path(args.llm) if args.llm else smollm2_gguf_path()
    basic_motions = args.data == "basic-motions"
    imu_names = args.add_imu if args.add_imu is not None else (["imu"] if basic_motions else [])
    from_files = [read_modality_file(path) for path in args.modality_file]

    # 1. the model
    torch.manual_seed(args.seed)
    source = cached_source(base)
    new = [imu_modality(name) for name in imu_names] + from_files
    result = extend(source, [m for m in new if m.name not in source.config.modalities])
    model, tokenizer = result.model, result.tokenizer

    # 2. the data
    if basic_motions:
        train, held_out = stratified_split(load_basic_motions("train"), per_class=2, seed=args.seed)
        examples = [Example(activity_chat(l), {"imu": [v]}) for v, l in zip(train.values, train.labels)]
        evaluation = [Example(activity_chat(l), {"imu": [v]}) for v, l in zip(held_out.values, held_out.labels)]
    else:
        examples = read_jsonl(args.data, model.config)
        evaluation = read_jsonl(args.eval_data, model.config) if args.eval_data else []
    used = sorted({name for e in examples for name in e.inputs})

    # 3. normalisation of sensor modalities
    for name in used:
        modality = model.config.modality(name)
        if modality.input.kind == "sensor" and modality.normalization is None:
            modality.normalization = fit_normalization([item for e in examples for item in e.inputs.get(name, [])])
    processor = OmniProcessor(tokenizer, model.config)

    # 4-5. strategy and training
    select_by_accuracy = basic_motions or args.select_by == "accuracy"
    parse = parse_activity if basic_motions else None

    def evaluate(m) -> dict[str, float]:
        loss = mean_answer_loss(m, processor, evaluation)
        if not select_by_accuracy:
            return {"loss": loss, "score": -loss}
        accuracy = evaluate_examples(m, processor, evaluation, GenerationSettings(max_new_tokens=16),
                                     parse=parse).report.accuracy
        return {"accuracy": accuracy, "loss": loss, "score": accuracy - 1e-3 * loss}

    config = TrainConfig(
        strategy=args.strategy, modalities=args.modality or used, epochs=args.epochs, batch_size=args.batch_size,
        learning_rate=args.lr, projector_lr=args.projector_lr, adapter_lr=args.adapter_lr,
        warmup_steps=args.warmup_steps, lr_schedule=args.lr_schedule, gradient_accumulation_steps=args.grad_accum,
        mixed_precision=args.mixed_precision, gradient_checkpointing=args.gradient_checkpointing,
        eval_every_steps=args.eval_every, patience=args.patience, seed=args.seed,
        output_dir=str(output / "training"), resume=args.resume,
    )
    trainer = Trainer(model, processor, examples, config, evaluate=evaluate if evaluation else None)
    result = trainer.train()

    # 6. the checkpoint
    checkpoint = save_run(model, output / "checkpoint", base=base, components=trainer.components,
                          tokenizer=tokenizer, strategy=args.strategy)
    adapters = sorted(getattr(model, "lora_configs", {}))
    full = [c for c in trainer.components if c not in adapters]
    write_run_notes(output / "train_summary.json", {
        "strategy": args.strategy, "best": result.best, "steps": result.steps,
        "train_seconds": result.train_seconds, "components": trainer.components,
    })
    print(f"checkpoint: {checkpoint} (trained in full: {full or 'none'}; adapters: {adapters or 'none'})")
    return 0
