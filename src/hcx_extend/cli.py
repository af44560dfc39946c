"""The ``hcx-extend`` command. Each sub-command parses its arguments, calls library functions and prints.

Errors are one line, ``error: ...``, and exit code 2; ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import traceback
from pathlib import Path

from hcx_extend.checkpoint import extend
from hcx_extend.checkpoint.modality_file import read_modality_file
from hcx_extend.data.examples import read_jsonl, read_modality_files
from hcx_extend.evaluation import evaluate_examples, score_choices, write_evaluation
from hcx_extend.inference import Conversation, GenerationSettings
from hcx_extend.layout import atomic_write_text
from hcx_extend.memory.commands import run_estimate, run_plan
from hcx_extend.presets import imu_modality
from hcx_extend.processor import OmniProcessor
from hcx_extend.recipes import activity, sequence, train
from hcx_extend.runs import load_model, merge_run
from hcx_extend.serve import ServeOptions, default_model_name, run_server
from hcx_extend.summary import describe, model_for_info


class CommandError(Exception):
    """A mistake in the command line itself (not in the files it names)."""


def cmd_info(args: argparse.Namespace) -> int:
    model, title = model_for_info(args.target)
    print(describe(model, title))
    return 0


def cmd_extend(args: argparse.Namespace) -> int:
    modalities = [imu_modality(name) for name in args.add_imu] + [read_modality_file(f) for f in args.modality]
    if not modalities:
        raise CommandError("nothing to add: give --add-imu NAME or --modality FILE.json")
    result = extend(args.source, modalities, tokenizer=args.tokenizer, output_dir=args.output, dtype=args.dtype)
    print(f"read {args.source} as {result.source_kind}")
    print(result.report)
    for m in modalities:
        stored = result.model.config.modality(m.name)
        print(f"added {m.name}: model.{stored.encoder_module} + model.{stored.projector_module}, "
              f"token {stored.token} = {stored.token_id}")
    print(f"saved to {args.output}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    if args.task == "sequence":
        if args.no_augment:
            raise CommandError("--no-augment applies to the activity task only (the sequence task does not augment)")
        return sequence.run(args)
    if args.compressor is not None:
        raise CommandError("--compressor applies to --task sequence only")
    return activity.run(args)


def _pairs(values: list[str], option: str) -> dict[str, list[str]]:
    pairs: dict[str, list[str]] = {}
    for value in values:
        name, separator, file = value.partition("=")
        if not separator or not name or not file:
            raise CommandError(f"{option} takes NAME=FILE (e.g. {option} imu=walk.csv), got {value!r}")
        pairs.setdefault(name, []).append(file)
    return pairs


def _rates(values: list[str], names: list[str]) -> dict[str, float]:
    rates: dict[str, float] = {}
    for value in values:
        name, separator, number = value.rpartition("=")
        if separator and not name:
            raise CommandError(f"--rate takes HZ or NAME=HZ, got {value!r}")
        targets = [name] if separator else names
        if not targets:
            raise CommandError(f"--rate {value} is given but there are no input files to resample; add --input "
                               "NAME=FILE (or --imu FILE)")
        try:
            rate = float(number)
        except ValueError:
            raise CommandError(f"--rate takes HZ or NAME=HZ, got {value!r}") from None
        if not 0 < rate < math.inf:
            raise CommandError(f"--rate must be a positive number of samples per second, got {value!r}")
        rates.update({target: rate for target in targets})
    return rates


def cmd_chat(args: argparse.Namespace) -> int:
    files = _pairs(args.input, "--input")
    if args.imu:
        files.setdefault("imu", []).extend(args.imu)
    rates = _rates(args.rate, list(files))
    model, tokenizer = load_model(args.checkpoint, base=args.base, device=args.device)
    if tokenizer is None:
        raise ValueError(f"{args.checkpoint} has no tokenizer; save the LLM's tokenizer beside its weights")
    processor = OmniProcessor(tokenizer, model.config)
    settings = GenerationSettings(max_new_tokens=args.max_new_tokens, temperature=args.temperature)
    conversation = Conversation(model, processor, settings, read_modality_files(model.config, files, rates))
    if args.prompt is not None:
        print(conversation.ask(args.prompt))
        return 0
    print(f"{args.checkpoint} loaded; modalities {sorted(model.config.modalities)}, inputs "
          f"{ {name: len(items) for name, items in conversation.inputs.items()} or 'none'}. Ask away; an empty line or "
          "Ctrl-D ends.", flush=True)
    for line in sys.stdin:
        if not line.strip():
            break
        try:
            print(f"assistant: {conversation.ask(line.strip())}", flush=True)
        except ValueError as error:
            print(f"error: {error}", flush=True)
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    return train.run(args)


def cmd_merge(args: argparse.Namespace) -> int:
    merged, components = merge_run(args.checkpoint, args.output, base=args.base)
    print(f"merged {merged} LoRA layers of {components or 'no component'}; plain HCX checkpoint in {args.output}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    model, tokenizer = load_model(args.checkpoint, base=args.base, device=args.device)
    processor = OmniProcessor(tokenizer, model.config)
    examples = read_jsonl(args.data, model.config)
    evaluation = evaluate_examples(model, processor, examples, GenerationSettings(max_new_tokens=args.max_new_tokens),
                                   batch_size=args.batch_size)
    output = Path(args.output) if args.output else Path(args.checkpoint).parent / "evaluation"
    written = write_evaluation(evaluation, output, Path(args.data).stem)
    print(evaluation.report.table())
    if args.choices is not None:
        choices = (sorted({e.answer for e in examples}) if args.choices == "data"
                   else [c.strip() for c in args.choices.split(",") if c.strip()])
        try:
            scores = score_choices(model, processor, examples, choices, batch_size=args.batch_size)
        except ValueError as error:
            raise CommandError(f"--choices: {error}") from None
        print(f"by generation: {evaluation.report.correct}/{evaluation.report.total} = {evaluation.report.accuracy:.1%}")
        print(scores.summary(count=5))
        atomic_write_text(output / "choices.json", json.dumps(scores.to_dict(), indent=2))
        written.append(output / "choices.json")
    print(f"wrote {', '.join(str(p) for p in written)}")
    return 0


def cmd_estimate(args: argparse.Namespace) -> int:
    return run_estimate(args)


def cmd_plan(args: argparse.Namespace) -> int:
    return run_plan(args)


def cmd_serve(args: argparse.Namespace) -> int:
    options = ServeOptions(
        host=args.host, port=args.port, api_key=args.api_key or os.environ.get("HCX_EXTEND_API_KEY") or None,
        model_name=args.model_name or default_model_name(args.checkpoint), max_batch_size=args.max_batch_size,
        batch_window_s=args.batch_window_ms / 1000, max_queue=args.max_queue, max_body_bytes=args.max_body_bytes,
        max_tokens_limit=args.max_tokens_limit, default_max_tokens=args.default_max_tokens,
        request_timeout_s=args.request_timeout)
    run_server(args.checkpoint, options, base=args.base, threads=args.threads, log_level=args.log_level,
               device=args.device)
    return 0


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors: ``error: ...`` and exit code 2."""

    def error(self, message: str):
        self.exit(2, f"error: {' '.join(message.split())} (see {self.prog} --help)\n")


# Numeric options shared by several commands, by their argparse dest, and what they must be. argparse
# checks only the type; 0 epochs or a negative batch would otherwise start loading a model first, or
# (demo: a falsy value means "the default") be silently replaced.
_POSITIVE_INTEGERS = ("epochs", "batch_size", "max_new_tokens", "grad_accum", "eval_every", "patience", "threads",
                      "stride", "batch", "seq")
_NON_NEGATIVE_INTEGERS = ("warmup_steps",)
_POSITIVE_NUMBERS = ("lr", "projector_lr", "adapter_lr", "pretrained_lr")
_NON_NEGATIVE_NUMBERS = ("temperature",)


def check_arguments(args: argparse.Namespace) -> None:
    """Refuse numeric options outside their range before a command starts (see `_POSITIVE_INTEGERS`).

    Raises:
        CommandError: naming the option and the value.
    """
    def option(dest: str) -> str:
        return "--" + dest.replace("_", "-")

    for dest in _POSITIVE_INTEGERS + _NON_NEGATIVE_INTEGERS:
        value = getattr(args, dest, None)
        low = 1 if dest in _POSITIVE_INTEGERS else 0
        if value is not None and value < low:
            raise CommandError(f"{option(dest)} must be an integer >= {low}, got {value}")
    for dest in _POSITIVE_NUMBERS + _NON_NEGATIVE_NUMBERS:
        value = getattr(args, dest, None)
        if value is None:
            continue
        if not math.isfinite(value) or value < 0 or (dest in _POSITIVE_NUMBERS and value == 0):
            bound = "> 0" if dest in _POSITIVE_NUMBERS else ">= 0"
            raise CommandError(f"{option(dest)} must be a finite number {bound}, got {value}")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="hcx-extend", description="Extend HyperCLOVA X omni models with new input modalities.")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True, parser_class=_Parser)

    info = commands.add_parser("info", help="modules, parameter counts per component and placeholder tokens")
    info.add_argument("target", help="a preset (tiny-hcx-omni, hcx-omni-8b), a checkpoint folder or a .gguf file")
    info.set_defaults(run=cmd_info)

    ext = commands.add_parser("extend", help="add modalities to a checkpoint and save it in the HCX layout")
    ext.add_argument("source", help="HCX omni / HyperCLOVAXVisionV2 / causal-LM folder, or a .gguf file")
    ext.add_argument("--output", required=True, help="folder for the extended checkpoint")
    ext.add_argument("--add-imu", action="append", default=[], metavar="NAME", help="add an IMU modality called NAME")
    ext.add_argument("--modality-file", "--modality", dest="modality", action="append", default=[], metavar="FILE",
                     help="add a modality from a JSON file (see examples/modalities/)")
    ext.add_argument("--dtype", default=None, help="cast weights (float32, bfloat16, float16); default: keep")
    ext.add_argument("--tokenizer", default=None, metavar="DIR",
                     help="the LLM's tokenizer folder, for a source saved without one (default: the source's own)")
    ext.set_defaults(run=cmd_extend)

    chat = commands.add_parser("chat", help="ask a saved model about recordings (any modality); interactive without "
                               "a prompt")
    chat.add_argument("checkpoint", help="a run checkpoint, a full HCX checkpoint, an LLM folder or a .gguf file")
    chat.add_argument("prompt", nargs="?", default=None,
                      help='e.g. "What activity is the person doing?"; markers such as <imu> say where items go '
                      "(default: in front). Without a prompt, questions are read from stdin, one per line")
    chat.add_argument("--input", action="append", default=[], metavar="NAME=FILE",
                      help="an item of modality NAME (.csv with a header row, .npy, .ts); repeatable")
    chat.add_argument("--imu", action="append", default=[], metavar="FILE", help="shorthand for --input imu=FILE")
    chat.add_argument("--rate", action="append", default=[], metavar="[NAME=]HZ",
                      help="sample rate of the files in Hz; resampled to the modality's rate")
    chat.add_argument("--base", default=None, help="where a run checkpoint's base model is, if it moved")
    chat.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default: a GPU if there is one)")
    chat.add_argument("--max-new-tokens", type=int, default=32)
    chat.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    chat.set_defaults(run=cmd_chat)

    tr = commands.add_parser("train", help="train with a strategy of the ladder (projector ... full, qlora)")
    train.add_arguments(tr)
    tr.set_defaults(run=cmd_train)

    merge = commands.add_parser("merge", help="fold a run's LoRA adapters into a plain HCX checkpoint")
    merge.add_argument("checkpoint", help="a checkpoint folder written by train or demo")
    merge.add_argument("--output", required=True, help="folder for the merged full checkpoint")
    merge.add_argument("--base", default=None, help="where the run's base model is, if it moved")
    merge.set_defaults(run=cmd_merge)

    ev = commands.add_parser("evaluate", help="exact-match accuracy, per-class precision/recall and a confusion matrix")
    ev.add_argument("checkpoint", help="any checkpoint load_model reads")
    ev.add_argument("--data", required=True, help="JSONL examples whose last message is the expected answer")
    ev.add_argument("--output", default=None, help="folder for evaluation.json and confusion_matrix.png "
                    "(default: CHECKPOINT/../evaluation)")
    ev.add_argument("--base", default=None, help="where a run checkpoint's base model is, if it moved")
    ev.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default: a GPU if there is one)")
    ev.add_argument("--max-new-tokens", type=int, default=16)
    ev.add_argument("--choices", default=None, metavar="A,B,...|data",
                    help="the closed set of answers (comma-separated, or 'data' for the distinct answers in --data): "
                    "also score each by its likelihood and print accuracy by choice, the mean margin and the "
                    "examples closest to the boundary (written to choices.json)")
    ev.add_argument("--batch-size", type=int, default=16)
    ev.set_defaults(run=cmd_evaluate)

    est = commands.add_parser("estimate", help="memory a training strategy or inference needs, per component")
    est.add_argument("target", help="a preset (e.g. hcx-omni-8b) or a checkpoint folder; no weights are loaded")
    est.add_argument("--strategy", default="all",
                     help="projector, new-encoder, lora-encoder, lora-all, qlora, full, inference, or all (default)")
    est.add_argument("--batch", type=int, default=1, help="sequences per step (default 1)")
    est.add_argument("--seq", type=int, default=2048, help="tokens per sequence (default 2048)")
    est.add_argument("--dtype", default="bf16", help="weight and activation dtype: bf16, fp16, fp32 (default bf16)")
    est.add_argument("--quant", default=None, help="hold the LLM's linear layers in nf4 or int8 (default: per strategy)")
    est.add_argument("--gradient-checkpointing", action="store_true", help="keep one activation per layer")
    est.add_argument("--device", default="cuda", choices=["cuda", "cpu"],
                     help="the device to estimate for: cuda (default) adds allocator rounding, kernel workspaces and the "
                     "attention kernel a GPU picks; cpu counts tensors only")
    est.add_argument("--trained-dtype", default="fp32",
                     help="dtype of trained parameters, their gradients and AdamW moments: fp32 (default) or bf16")
    est.set_defaults(run=cmd_estimate)

    plan = commands.add_parser("plan", help="place components and LLM layers on GPU/CPU/disk by memory budget")
    plan.add_argument("target", help="a preset (e.g. hcx-omni-8b) or a checkpoint folder; no weights are loaded")
    plan.add_argument("--budget", action="append", default=[], metavar="DEVICE=SIZE",
                      help="e.g. cuda:0=24GB, cpu=64GB, disk=500GB; repeat per device")
    plan.add_argument("--policy", default="auto", help="auto or encoders-on-cpu (default auto)")
    plan.add_argument("--dtype", default="bf16", help="weight dtype (default bf16)")
    plan.add_argument("--quant", default=None, help="nf4 or int8 for the LLM's linear layers")
    plan.add_argument("--batch", type=int, default=1, help="sequences per forward pass to leave room for (default 1)")
    plan.add_argument("--seq", type=int, default=2048, help="tokens per sequence to leave room for (default 2048)")
    plan.set_defaults(run=cmd_plan)

    serve = commands.add_parser("serve", help="an OpenAI-compatible chat-completions server for sensor inputs, "
                                "with a page at /")
    serve.add_argument("checkpoint", help="any checkpoint load_model reads (run checkpoint, HCX folder, LLM, .gguf)")
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    serve.add_argument("--port", type=int, default=8000, help="TCP port (default 8000)")
    serve.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1/* (default: "
                       "$HCX_EXTEND_API_KEY, else no key)")
    serve.add_argument("--base", default=None, help="where a run checkpoint's base model is, if it moved")
    serve.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default: a GPU if there is one)")
    serve.add_argument("--model-name", default=None, help="the model id clients name (default: the checkpoint's "
                       "folder, or its run's folder for .../checkpoint)")
    serve.add_argument("--max-batch-size", type=int, default=32, help="requests generated together (default 32)")
    serve.add_argument("--batch-window-ms", type=float, default=10.0,
                       help="how long to collect requests into a batch after the first arrives (default 10)")
    serve.add_argument("--max-queue", type=int, default=128, help="requests waiting before 429 (default 128)")
    serve.add_argument("--max-body-bytes", type=int, default=8 * 1024 * 1024,
                       help="largest request body before 413 (default 8 MiB)")
    serve.add_argument("--max-tokens-limit", type=int, default=1024, help="the most max_tokens a request may ask "
                       "for (default 1024)")
    serve.add_argument("--default-max-tokens", type=int, default=128, help="answer length when a request does "
                       "not say (default 128)")
    serve.add_argument("--request-timeout", type=float, default=300.0,
                       help="seconds before an unanswered request gets 504, queueing included (default 300)")
    serve.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: one per core; fewer "
                       "is faster on a CPU shared with other processes)")
    serve.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    serve.set_defaults(run=cmd_serve)

    demo = commands.add_parser("demo", help="the IMU activity demo: extend SmolLM2 with an IMU, train, evaluate")
    demo.add_argument("--task", choices=["activity", "sequence"], default="activity",
                      help="activity: one recording, one label (default); sequence: long streams, list the activities")
    demo.add_argument("--compressor", choices=sorted(sequence.COMPRESSORS), default=None,
                      help="token compressor of the sequence task (default mambamia)")
    activity.add_arguments(demo)
    demo.set_defaults(run=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one command; returns its exit code.

    Every error, whatever the command and whatever raised it, is one line ``error: ...`` on stderr and
    exit code 2 (130 for Ctrl-C); ``--debug`` prints the traceback before that line. ``--help`` exits 0.
    """
    parser = build_parser()
    try:
        args, extra = parser.parse_known_args(argv)
        # argparse gives an optional positional (chat's PROMPT) its empty match before the options that follow
        # the checkpoint are read; a single string left over is that prompt.
        if extra and args.command == "chat" and args.prompt is None and len(extra) == 1 and not extra[0].startswith("-"):
            args.prompt, extra = extra[0], []
        if extra:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    except SystemExit as exit:
        if exit.code in (0, None):
            raise  # --help
        return 2  # _Parser.error printed the line
    try:
        check_arguments(args)
        return args.run(args)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except Exception as error:  # noqa: BLE001 - the CLI's boundary: one line per error, a traceback on --debug
        if args.debug:
            traceback.print_exc()
        expected = isinstance(error, (CommandError, ValueError, OSError))
        message = str(error) if expected else f"{type(error).__name__}: {error} (an unexpected error; rerun with " \
                                               "--debug for the traceback and report it)"
        print(f"error: {' '.join(message.split()) or type(error).__name__}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
