"""The training ladder side by side: what each strategy trains, and how it does on the IMU demo task.

Part 1 (no weights, seconds): on the ``hcx-omni-8b`` preset built on the meta device, the parameters
each strategy trains, their size, and their share of the model, next to the extension guide's
claims ("projector-only trains 10-50 MB", "encoder LoRA trains about 0.1 %"). All modalities are
targets and every encoder counts as pretrained (LoRA applies to it).

Part 2 (minutes per strategy): ``hcx-extend demo --strategy S`` for each strategy, each in its own
process, same seed; test accuracy, training time, wall time and peak memory from its metrics.json.
On the demo the IMU encoder is new, so the LoRA strategies train it in full (there are no pretrained
weights to adapt) and add adapters to the LLM (lora-all, qlora).

    python benchmarks/strategy_table.py                 # both parts
    python benchmarks/strategy_table.py --meta-only     # part 1
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

STRATEGY_ORDER = ("projector", "new-encoder", "lora-encoder", "lora-all", "qlora", "full")


def meta_table() -> None:
    from hcx_extend.presets import build_preset
    from hcx_extend.training.report import trainable_table
    from hcx_extend.ladder import STRATEGIES
    from hcx_extend.training import apply_strategy

    print("hcx-omni-8b (meta device): what each strategy trains, all modalities targeted")
    print(f"{'strategy':<13} {'trained':>15} {'bf16 MB':>9} {'fp32 MB':>9} {'% of all':>9}  components")
    for name in STRATEGY_ORDER:
        if STRATEGIES[name].quantize_llm:
            continue  # same trainable parameters as lora-all; quantisation changes the frozen bytes only
        model = build_preset("hcx-omni-8b", device="meta")
        model.fresh_components = set()
        apply_strategy(model, STRATEGIES[name])
        rows = trainable_table(model)
        trained = sum(r["trained"] for r in rows)
        total = sum(r["parameters"] for r in rows)
        lora = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
        parts = ", ".join(f"{r['component']} {r['trained'] / 1e6:.1f}M" for r in rows if r["trained"])
        print(f"{name:<13} {trained:>15,} {2 * trained / 1e6:>9.1f} {4 * trained / 1e6:>9.1f} {100 * trained / total:>8.3f}%  {parts}")
        if lora:
            print(f"{'':<13} of which LoRA adapters {lora:,} = {100 * lora / total:.3f}% of all parameters")
    print("guide's claims: projector-only 10-50 MB; encoder LoRA about 0.1 %")


def demo_table(seed: int, output: Path, strategies: list[str]) -> None:
    rows = []
    for name in strategies:
        run = output / name
        print(f"running the demo with --strategy {name} ...", flush=True)
        command = [sys.executable, "-m", "hcx_extend.cli", "demo", "--strategy", name, "--seed", str(seed), "--output", str(run)]
        completed = subprocess.run(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        if completed.returncode:
            rows.append((name, None, completed.stderr.strip().splitlines()[-1:]))
            continue
        rows.append((name, json.loads((run / "metrics.json").read_text()), None))
    print()
    print(f"{'strategy':<13} {'test accuracy':>14} {'train s':>8} {'wall s':>7} {'peak GB':>8} {'steps':>6}")
    for name, metrics, error in rows:
        if metrics is None:
            print(f"{name:<13} failed: {error}")
            continue
        print(f"{name:<13} {metrics['test_correct']:>5}/40 {metrics['test_accuracy']:>6.1%} {metrics['train_seconds']:>8.0f} "
              f"{metrics['wall_seconds']:>7.0f} {metrics['peak_rss_gb']:>8.2f} {metrics['steps']:>6}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--meta-only", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", default="runs/strategies")
    parser.add_argument("--strategies", nargs="+", default=list(STRATEGY_ORDER))
    args = parser.parse_args()
    meta_table()
    if not args.meta_only:
        print()
        demo_table(args.seed, Path(args.output), args.strategies)


if __name__ == "__main__":
    main()
