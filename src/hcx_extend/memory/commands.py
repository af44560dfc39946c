"""``hcx-extend estimate`` and ``hcx-extend plan``: thin shells over `estimate_memory` and `plan_device_map`.

Both read a preset name or a checkpoint folder's ``config.json`` and build the model on the meta
device: no weights are loaded, so they run on a laptop for the full-size ``hcx-omni-8b``. Estimates are
for a CUDA GPU unless ``args.device`` says "cpu" (`hcx_extend.memory.device_model`); a plan leaves room
on its executing device for a ``args.batch`` x ``args.seq`` forward pass (default 1 x 2048).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from hcx_extend.checkpoint.sources import read_omni_config
from hcx_extend.config import OmniConfig
from hcx_extend.ladder import STRATEGIES
from hcx_extend.memory.device_map import plan_device_map
from hcx_extend.memory.estimate import INFERENCE, estimate_memory, weight_footprint
from hcx_extend.memory.workload import Workload
from hcx_extend.presets import PRESETS, preset_config
from hcx_extend.units import human_bytes, human_count, parse_dtype

# The extension guide's training table (docs/extension-guide.md), printed beside ours.
GUIDE_TABLE = {"projector": "~4 GB", "lora-encoder": "~8 GB", "lora-all": "~16 GB", "full": "80 GB+"}


def target_config(target: str) -> tuple[OmniConfig, str]:
    """The `OmniConfig` of a preset name or a checkpoint folder, and a label for printing."""
    if target in PRESETS:
        return preset_config(target), f"{target} (preset)"
    path = Path(target)
    if path.is_dir() and (path / "config.json").exists():
        return read_omni_config(path), str(path)
    raise ValueError(
        f"{target!r} is neither a preset ({', '.join(sorted(PRESETS))}) nor a folder with config.json; "
        "give one of those (weights are not needed)"
    )


def run_estimate(args: argparse.Namespace) -> int:
    """Print the per-component estimate for ``args.strategy`` (``all``: every strategy and inference)."""
    config, label = target_config(args.target)
    strategies = [*STRATEGIES, INFERENCE] if args.strategy == "all" else [args.strategy]
    workload = Workload(batch=args.batch, seq=args.seq)
    dtype = parse_dtype(args.dtype)
    trained_dtype = parse_dtype(getattr(args, "trained_dtype", None) or "fp32")
    estimates = []
    for name in strategies:
        if args.strategy == "all" and args.quant and name in STRATEGIES and STRATEGIES[name].language_model:
            print(f"\n== {name}: skipped (it trains the LLM's weights, which cannot be held in {args.quant})")
            continue
        estimate = estimate_memory(config, name, workload, dtype=dtype, trained_dtype=trained_dtype, quant=args.quant,
                                   gradient_checkpointing=args.gradient_checkpointing,
                                   device=getattr(args, "device", None) or "cuda")
        estimates.append(estimate)
        print(f"\n== {name}: {label}, batch {workload.batch} x {workload.seq} tokens, "
              f"{_precision(estimate)}{', gradient checkpointing' if estimate.gradient_checkpointing else ''}, "
              f"on {estimate.device}")
        if estimate.modality_tokens:
            print("   items per sequence: " + ", ".join(f"{m} {n} tokens" for m, n in estimate.modality_tokens.items()))
        print(estimate.table())
    if len(estimates) > 1:
        print("\n" + summary_table(estimates))
    print("\n" + footprint_lines(config, dtype))
    return 0


def _precision(estimate) -> str:
    dtype = str(estimate.dtype).replace("torch.", "")
    trained = str(estimate.trained_dtype).replace("torch.", "")
    quant = f", LLM linears in {estimate.quant}" if estimate.quant else ""
    if estimate.strategy == "inference":
        return f"weights {dtype}{quant}"
    return f"frozen weights {dtype}, trained parameters + AdamW state {trained}{quant}"


def summary_table(estimates) -> str:
    """One line per strategy: trained parameters, bytes per kind, peak, and the guide's figure."""
    lines = [f"{'strategy':<13} {'trained':>18} {'weights':>9} {'grad+opt':>9} {'activ.':>9} {'peak':>9} "
             f"{'peak-frozen':>11} {'guide':>8}   (GB; peak-frozen = peak without the frozen weights)"]
    for e in estimates:
        # Gradients are one trained-dtype copy of the trained parameters: the same bytes as their weights.
        frozen = e.total("weights") - e.total("gradients")
        share = 100 * e.trained / max(e.parameters, 1)
        lines.append(
            f"{e.strategy:<13} {human_count(e.trained):>9} {share:6.2f}% {e.total('weights') / 1e9:9.2f} "
            f"{(e.total('gradients') + e.total('optimizer')) / 1e9:9.2f} {e.total('activations') / 1e9:9.2f} "
            f"{e.peak / 1e9:9.2f} {(e.peak - frozen) / 1e9:11.2f} {GUIDE_TABLE.get(e.strategy, '-'):>8}"
        )
    return "\n".join(lines)


def footprint_lines(config: OmniConfig, dtype) -> str:
    """Whole-model weight bytes in ``dtype``, int8 and nf4 (LLM Linear layers quantised, head kept)."""

    full = weight_footprint(config, dtype)
    int8 = weight_footprint(config, dtype, "int8")
    nf4 = weight_footprint(config, dtype, "nf4")
    name = str(dtype).replace("torch.", "")
    return (f"weights of the whole model: {name} {human_bytes(full)}, LLM linears int8 {human_bytes(int8)}, "
            f"LLM linears nf4 {human_bytes(nf4)} (embeddings, head, norms, encoders and projectors stay {name})")


def run_plan(args: argparse.Namespace) -> int:
    """Print the device plan for ``args.budget`` under ``args.policy``."""
    config, label = target_config(args.target)
    if not args.budget:
        raise ValueError("give at least one --budget DEVICE=SIZE (e.g. --budget cuda:0=24GB --budget cpu=64GB)")
    workload = Workload(batch=getattr(args, "batch", None) or 1, seq=getattr(args, "seq", None) or 2048)
    plan = plan_device_map(config, args.budget, args.policy, dtype=args.dtype, quant=args.quant, workload=workload)
    print(f"{label}: weights in {args.dtype}{', LLM linears in ' + args.quant if args.quant else ''}")
    print(plan.table())
    print("\ndevice map (accelerate):")
    for name, device in plan.device_map.items():
        print(f"  {name}: {device}")
    return 0
