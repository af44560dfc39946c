"""``hcx-extend train``: fine-tune a model on chats with modality inputs, with any strategy of the ladder.

Read it top to bottom:

1. the model: ``--llm`` (any local causal LM folder, .gguf file or HCX checkpoint; default: the
   embedded SmolLM2) with modalities added when missing: ``--add-imu NAME`` (the IMU preset) and
   ``--modality-file FILE.json`` (any modality, `hcx_extend.checkpoint.modality_file`). They are added
   in memory: no copy of the LLM is written, the run checkpoint refers to ``--llm``;
2. the data: ``--data basic-motions`` (the demo's training split, 2 recordings per activity held out
   for evaluation) or a JSONL file (`hcx_extend.data.examples`); ``--eval-data`` is another one;
3. what must follow the data, unless set by a flag (`hcx_extend.training.data_defaults`, each choice
   logged with its reason): batch size and epochs from the number of examples, a new sensor encoder's
   stride from the recordings' length, whether the answers are a closed set of labels; per-channel
   normalisation of sensor modalities fitted on the training items;
4. the strategy (default ``projector``; also ``new-encoder``, ``lora-encoder``, ``lora-all``, ``qlora``,
   ``full``), with its own default learning rates (`hcx_extend.ladder.LearningRates`) unless ``--lr`` is given;
5. `Trainer`: a fresh variation of every sensor recording in every epoch (``--no-augment``: none); the best
   evaluation is kept: by accuracy of each label's likelihood when the answers are a closed set,
   else by answer loss, or with ``--select-by accuracy`` by exact match of generated answers;
6. ``OUTPUT/checkpoint``: the components trained in full, each LoRA adapter in peft's format, the
   full config and the base model's identity (`hcx_extend.runs`); ``chat``, ``serve``, ``evaluate``
   and ``merge`` read it.
"""

from __future__ import annotations

import argparse
import copy
from pathlib import Path

import torch

from hcx_extend.checkpoint import cached_source, extend
from hcx_extend.checkpoint.modality_file import read_modality_file
from hcx_extend.data.basic_motions import activity_chat, load_basic_motions, parse_activity, stratified_split
from hcx_extend.data.augment import EPOCH_VARIATIONS, example_variations
from hcx_extend.data.examples import Example, read_jsonl
from hcx_extend.data.sensors import fit_normalization
from hcx_extend.evaluation import evaluate_examples, mean_answer_loss, score_choices
from hcx_extend.inference import GenerationSettings
from hcx_extend.ladder import STRATEGIES
from hcx_extend.presets import imu_modality, smollm2_gguf_path
from hcx_extend.processor import OmniProcessor
from hcx_extend.runs import prepare_run_folder, save_run, write_run_notes
from hcx_extend.training import TrainConfig, Trainer
from hcx_extend.training.data_defaults import derive_batch_size, derive_choices, derive_epochs, derive_stride


def add_arguments(parser: argparse.ArgumentParser) -> None:
    # projector first, as the extension guide orders the ladder: on small data a new encoder trained along
    # overfits (benchmarks/results/imu_cross_validation.txt, defaults_carry.txt); the frozen random one does not.
    parser.add_argument("--strategy", default="projector", choices=list(STRATEGIES),
                        help="the rung (default projector: a new encoder stays at its random initialisation, "
                        "only projectors learn)")
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
    parser.add_argument("--epochs", type=int, default=None,
                        help="passes over the data (default: from the number of examples, about 640 seen in all)")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="examples per step (default: from the number of examples, 2 to 8)")
    parser.add_argument("--lr", type=float, default=None,
                        help="one learning rate for everything trained (default: the strategy's rates for new "
                        "modules, adapters and pretrained weights)")
    parser.add_argument("--projector-lr", type=float, default=None)
    parser.add_argument("--adapter-lr", type=float, default=None)
    parser.add_argument("--pretrained-lr", type=float, default=None,
                        help="learning rate of pretrained weights trained in full (e.g. the LLM under full)")
    parser.add_argument("--stride", type=int, default=None,
                        help="steps per token of new imu encoders whose file sets none (default: from the "
                        "median recording length, about 25 tokens)")
    parser.add_argument("--no-augment", action="store_true",
                        help="train on the recordings as they are (default: a fresh variation of each every epoch)")
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

    # 1-2. the data (read against the config the model will have), then the model
    torch.manual_seed(args.seed)
    source = cached_source(base)
    new = [m for m in [imu_modality(name) for name in imu_names] + from_files
           if m.name not in source.config.modalities]
    # The stride of an imu encoder from a modality file follows the data unless the file (or --stride) sets
    # one; the --add-imu preset keeps its own (4 steps per token, made for 10 Hz).
    derive = {m.name for m in new if m.encoder.get("model_type") == "imu" and "stride" not in m.encoder}
    probe = copy.deepcopy(source.config)
    for modality in new:
        probe.add_modality(copy.deepcopy(modality))
    if basic_motions:
        train, held_out = stratified_split(load_basic_motions("train"), per_class=2, seed=args.seed)
        examples = [Example(activity_chat(l), {"imu": [v]}) for v, l in zip(train.values, train.labels)]
        evaluation = [Example(activity_chat(l), {"imu": [v]}) for v, l in zip(held_out.values, held_out.labels)]
    else:
        examples = read_jsonl(args.data, probe)
        evaluation = read_jsonl(args.eval_data, probe) if args.eval_data else []
    used = sorted({name for e in examples for name in e.inputs})
    chosen: dict[str, str] = {}
    for modality in (m for m in new if m.name in derive):
        lengths = [len(item) for e in examples for item in e.inputs.get(modality.name, [])]
        if args.stride is not None:
            modality.encoder["stride"] = args.stride
        elif lengths:
            stride = derive_stride(lengths)
            modality.encoder["stride"] = stride.value
            chosen[f"{modality.name} stride"] = f"{stride.value} ({stride.reason})"
    result = extend(source, new)
    model, tokenizer = result.model, result.tokenizer

    # 3. normalisation of sensor modalities
    for name in used:
        modality = model.config.modality(name)
        if modality.input.kind == "sensor" and modality.normalization is None:
            modality.normalization = fit_normalization([item for e in examples for item in e.inputs.get(name, [])])
    processor = OmniProcessor(tokenizer, model.config)

    # 4-5. strategy and training
    batch_size, epochs = derive_batch_size(len(examples)), derive_epochs(len(examples))
    choices = derive_choices(examples) if not basic_motions else None
    if args.batch_size is None:
        chosen["batch size"] = f"{batch_size.value} ({batch_size.reason})"
    if args.epochs is None:
        chosen["epochs"] = f"{epochs.value} ({epochs.reason})"
    if evaluation and choices is not None and args.select_by == "loss":
        chosen["evaluation"] = f"answers {choices.value} ({choices.reason})"
    sensors = [name for name in used if model.config.modality(name).input.kind == "sensor"]
    if sensors and not args.no_augment:
        chosen["variations"] = f"a fresh one of each {', '.join(sensors)} recording every epoch ({EPOCH_VARIATIONS})"
    for name, why in chosen.items():
        print(f"{name}: {why}")
    select_by_accuracy = basic_motions or args.select_by == "accuracy"
    parse = parse_activity if basic_motions else None
    closed = choices.value if choices is not None and args.select_by == "loss" else None

    def evaluate(m) -> dict[str, float]:
        loss = mean_answer_loss(m, processor, evaluation)
        if closed is not None and all(e.answer in closed for e in evaluation):
            accuracy = score_choices(m, processor, evaluation, closed).report.accuracy
            return {"accuracy": accuracy, "loss": loss, "score": accuracy - 1e-3 * loss}
        if not select_by_accuracy:
            return {"loss": loss, "score": -loss}
        accuracy = evaluate_examples(m, processor, evaluation, GenerationSettings(max_new_tokens=16),
                                     parse=parse).report.accuracy
        return {"accuracy": accuracy, "loss": loss, "score": accuracy - 1e-3 * loss}

    config = TrainConfig(
        strategy=args.strategy, modalities=args.modality or used,
        epochs=args.epochs or epochs.value, batch_size=args.batch_size or batch_size.value,
        learning_rate=args.lr, projector_lr=args.projector_lr, adapter_lr=args.adapter_lr,
        pretrained_lr=args.pretrained_lr,
        warmup_steps=args.warmup_steps, lr_schedule=args.lr_schedule, gradient_accumulation_steps=args.grad_accum,
        mixed_precision=args.mixed_precision, gradient_checkpointing=args.gradient_checkpointing,
        eval_every_steps=args.eval_every, patience=args.patience, seed=args.seed,
        output_dir=str(output / "training"), resume=args.resume,
    )
    vary = example_variations(EPOCH_VARIATIONS, sensors) if sensors and not args.no_augment else None
    trainer = Trainer(model, processor, examples, config, evaluate=evaluate if evaluation else None, vary=vary)
    result = trainer.train()

    # 6. the checkpoint
    checkpoint = save_run(model, output / "checkpoint", base=base, components=trainer.components,
                          tokenizer=tokenizer, strategy=args.strategy)
    adapters = sorted(getattr(model, "lora_configs", {}))
    full = [c for c in trainer.components if c not in adapters]
    write_run_notes(output / "train_summary.json", {
        "strategy": args.strategy, "best": result.best, "steps": result.steps,
        "train_seconds": result.train_seconds, "components": trainer.components, "derived": chosen,
    })
    print(f"checkpoint: {checkpoint} (trained in full: {full or 'none'}; adapters: {adapters or 'none'})")
    return 0
