"""The ``hcx-extend`` command. Each sub-command is a thin shell over a library function."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _load_for_info(target: str):
    """A preset name (built on the meta device) or a checkpoint folder / .gguf file."""
    from hcx_extend.presets import PRESETS, build_preset

    if target in PRESETS:
        return build_preset(target, device="meta"), f"{target} (preset, built on the meta device: no weights)"
    path = Path(target)
    if path.is_dir() and (path / "config.json").exists():
        import torch
        from accelerate import init_empty_weights

        from hcx_extend.checkpoint import read_config_dict
        from hcx_extend.config import OmniConfig
        from hcx_extend.model import OmniForCausalLM

        raw = read_config_dict(path)
        if raw.get("model_type") in ("hcx_omni", "vlm"):
            with init_empty_weights():
                model = OmniForCausalLM(OmniConfig(**raw))
            return model, f"{path} (config only; weights not loaded)"
    from hcx_extend.checkpoint import build_model_from_tensors, read_source

    source = read_source(path)
    model, _ = build_model_from_tensors(source.config, source.tensors)
    return model, f"{path} ({source.kind})"


def cmd_info(args: argparse.Namespace) -> int:
    from hcx_extend.summary import describe

    model, title = _load_for_info(args.target)
    print(describe(model, title))
    return 0


def cmd_extend(args: argparse.Namespace) -> int:
    from hcx_extend.checkpoint import extend
    from hcx_extend.config import ModalityConfig
    from hcx_extend.presets import sensor_modality

    modalities = [sensor_modality(name) for name in args.add_imu]
    for file in args.modality:
        spec = json.loads(Path(file).read_text())
        modalities.append(ModalityConfig.from_dict(spec["name"], spec))
    if not modalities:
        print("nothing to add: give --add-imu NAME or --modality FILE.json", file=sys.stderr)
        return 2
    result = extend(args.source, modalities, output_dir=args.output, dtype=args.dtype)
    print(f"read {args.source} as {result.source_kind}")
    print(result.report)
    for m in modalities:
        stored = result.model.config.modality(m.name)
        print(f"added {m.name}: model.{stored.encoder_module} + model.{stored.projector_module}, token {stored.token} = {stored.token_id}")
    print(f"saved to {args.output}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from hcx_extend.demo import run_demo

    return run_demo(args)


def cmd_chat(args: argparse.Namespace) -> int:
    import torch

    from hcx_extend.checkpoint import load_trained
    from hcx_extend.data.sensors import read_recording, resample
    from hcx_extend.processor import OmniProcessor

    model, tokenizer = load_trained(args.checkpoint)
    if tokenizer is None:
        raise ValueError(f"{args.checkpoint} has no tokenizer")
    inputs: dict[str, list] = {}
    prompt = args.prompt
    for name, files in (("imu", args.imu),):
        if not files:
            continue
        modality = model.config.modality(name)
        recordings = [read_recording(f, modality.input.channel_names) for f in files]
        if args.rate and modality.input.sample_rate:
            recordings = [resample(r, args.rate, modality.input.sample_rate) for r in recordings]
        inputs[name] = recordings
        missing = len(files) - prompt.count(modality.marker)
        if missing > 0:  # no markers written: the recordings go before the question
            prompt = " ".join([modality.marker] * missing + [prompt])
    processor = OmniProcessor(tokenizer, model.config)
    batch = processor([[{"role": "user", "content": prompt}]], inputs)
    with torch.no_grad():
        generated = model.generate(**batch, max_new_tokens=args.max_new_tokens, do_sample=False,
                                   pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
    print(processor.decode(generated[0, batch["input_ids"].shape[1]:]))
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from hcx_extend.training.recipe import run_training

    return run_training(args)


def cmd_merge(args: argparse.Namespace) -> int:
    from hcx_extend.checkpoint import load_trained
    from hcx_extend.training.adapters import adapted_components, merge_adapters

    model, tokenizer = load_trained(args.checkpoint)
    components = adapted_components(model)
    merged = merge_adapters(model)
    model.save_pretrained(args.output)
    if tokenizer is not None:
        tokenizer.save_pretrained(args.output)
    print(f"merged {merged} LoRA layers of {components or 'no component'}; plain HCX checkpoint in {args.output}")
    return 0


def cmd_estimate(args: argparse.Namespace) -> int:
    from hcx_extend.memory.commands import run_estimate

    return run_estimate(args)


def cmd_plan(args: argparse.Namespace) -> int:
    from hcx_extend.memory.commands import run_plan

    return run_plan(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hcx-extend",
        description="Extend HyperCLOVA X omni models with new input modalities.",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    info = commands.add_parser("info", help="modules, parameter counts per component and placeholder tokens")
    info.add_argument("target", help="a preset (tiny-hcx-omni, hcx-omni-8b), a checkpoint folder or a .gguf file")
    info.set_defaults(run=cmd_info)

    ext = commands.add_parser("extend", help="add modalities to a checkpoint and save it in the HCX layout")
    ext.add_argument("source", help="HCX omni / HyperCLOVAXVisionV2 / causal-LM folder, or a .gguf file")
    ext.add_argument("--output", required=True, help="folder for the extended checkpoint")
    ext.add_argument("--add-imu", action="append", default=[], metavar="NAME", help="add an IMU modality called NAME")
    ext.add_argument("--modality", action="append", default=[], metavar="FILE", help="add a modality from a JSON file")
    ext.add_argument("--dtype", default=None, help="cast weights (float32, bfloat16, float16); default: keep")
    ext.set_defaults(run=cmd_extend)

    chat = commands.add_parser("chat", help="answer a prompt (with IMU recordings) from a saved checkpoint")
    chat.add_argument("checkpoint", help="a demo/trainer checkpoint folder or a full HCX checkpoint")
    chat.add_argument("prompt", help='e.g. "What activity is the person doing?"; <imu> marks where recordings go')
    chat.add_argument("--imu", action="append", default=[], metavar="FILE",
                      help="an IMU recording (.csv with a header row, .npy, .ts); repeat for several")
    chat.add_argument("--rate", type=float, default=None, help="sample rate of the files in Hz (resampled to the model's)")
    chat.add_argument("--max-new-tokens", type=int, default=32)
    chat.set_defaults(run=cmd_chat)

    from hcx_extend.training.recipe import add_train_arguments

    train = commands.add_parser("train", help="train with a strategy of the ladder (projector ... full, qlora)")
    add_train_arguments(train)
    train.set_defaults(run=cmd_train)

    merge = commands.add_parser("merge", help="fold a run's LoRA adapters into a plain HCX checkpoint")
    merge.add_argument("checkpoint", help="a checkpoint folder written by train or demo")
    merge.add_argument("--output", required=True, help="folder for the merged full checkpoint")
    merge.set_defaults(run=cmd_merge)

    est = commands.add_parser("estimate", help="memory a training strategy or inference needs, per component")
    est.add_argument("target", help="a preset (e.g. hcx-omni-8b) or a checkpoint folder; no weights are loaded")
    est.add_argument("--strategy", default="all",
                     help="projector, new-encoder, lora-encoder, lora-all, qlora, full, inference, or all (default)")
    est.add_argument("--batch", type=int, default=1, help="sequences per step (default 1)")
    est.add_argument("--seq", type=int, default=2048, help="tokens per sequence (default 2048)")
    est.add_argument("--dtype", default="bf16", help="weight and activation dtype: bf16, fp16, fp32 (default bf16)")
    est.add_argument("--quant", default=None, help="hold the LLM's linear layers in nf4 or int8 (default: per strategy)")
    est.add_argument("--gradient-checkpointing", action="store_true", help="keep one activation per layer")
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
    plan.set_defaults(run=cmd_plan)

    from hcx_extend.demo import add_demo_arguments

    demo = commands.add_parser("demo", help="the IMU activity demo: extend SmolLM2 with an IMU, train, evaluate")
    add_demo_arguments(demo)
    demo.set_defaults(run=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
