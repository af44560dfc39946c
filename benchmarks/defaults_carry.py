"""Do `train`'s defaults carry to sensors that are not BasicMotions? Other aeon datasets, no tuning flags.

For each dataset bundled with aeon (offline), the train split is written as a user would write it:
one ``.npy`` recording per example, a JSONL file of chats, and a modality file that names only the
encoder kind and the channel count (no stride, no epochs, no learning rate). A stratified quarter of
the train split is held out as validation data; the test split is never read. Then, as a user runs it:

    hcx-extend train --modality-file F --data train.jsonl --eval-data val.jsonl --strategy S --output RUN
    hcx-extend evaluate RUN/checkpoint --data val.jsonl --choices data

and the validation accuracy (by generation and by each label's likelihood) and the mean margin are
reported next to the derived settings that `train` logged. Used to choose `train`'s default rung; the
numbers are validation numbers, never test numbers.

    python benchmarks/defaults_carry.py --datasets ArrowHead JapaneseVowels --strategies projector new-encoder
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

QUESTION = "Which class is this recording? Answer with one word: {labels}."


def load(name: str, per_class: int | None) -> tuple[list[np.ndarray], list[str]]:
    from aeon.datasets import load_classification

    X, y = load_classification(name, split="train")
    recordings = [np.asarray(x, dtype=np.float32).T for x in X]  # (time, channels); lengths may vary
    labels = [f"class{label}" if str(label)[:1].isdigit() else str(label) for label in y]
    if per_class is not None:
        rng = np.random.default_rng(0)
        keep = []
        for label in sorted(set(labels)):
            members = [i for i, l in enumerate(labels) if l == label]
            keep += rng.choice(members, size=min(per_class, len(members)), replace=False).tolist()
        recordings, labels = [recordings[i] for i in sorted(keep)], [labels[i] for i in sorted(keep)]
    return recordings, labels


def write_workspace(folder: Path, name: str, recordings, labels) -> dict:
    rng = np.random.default_rng(1)
    validation = set()
    for label in sorted(set(labels)):
        members = [i for i, l in enumerate(labels) if l == label]
        validation |= set(rng.choice(members, size=max(1, len(members) // 4), replace=False).tolist())
    question = QUESTION.format(labels=", ".join(sorted(set(labels))))
    lines = {"train": [], "val": []}
    (folder / "recordings").mkdir(parents=True, exist_ok=True)
    for i, (values, label) in enumerate(zip(recordings, labels)):
        np.save(folder / "recordings" / f"{i}.npy", values)
        lines["val" if i in validation else "train"].append(json.dumps({
            "messages": [{"role": "user", "content": f"<sensor> {question}"}, {"role": "assistant", "content": label}],
            "inputs": {"sensor": [f"recordings/{i}.npy"]}}))
    for split, rows in lines.items():
        (folder / f"{split}.jsonl").write_text("\n".join(rows) + "\n")
    channels = recordings[0].shape[1]
    modality = {"name": "sensor", "encoder": {"model_type": "imu", "in_channels": channels},
                "projector": {"type": "mlp", "activation": "silu"},
                "input": {"kind": "sensor", "channels": channels, "max_length": 4096}}
    (folder / "sensor.json").write_text(json.dumps(modality))
    lengths = [len(r) for r in recordings]
    return {"dataset": name, "classes": len(set(labels)), "channels": channels, "train": len(lines["train"]),
            "validation": len(lines["val"]), "lengths": f"{min(lengths)}-{max(lengths)}"}


def run(folder: Path, strategy: str) -> dict:
    out = folder / f"run-{strategy}"
    cli = [sys.executable, "-m", "hcx_extend.cli"]
    started = time.perf_counter()
    trained = subprocess.run(cli + ["train", "--modality-file", str(folder / "sensor.json"), "--data",
                                    str(folder / "train.jsonl"), "--eval-data", str(folder / "val.jsonl"),
                                    "--strategy", strategy, "--output", str(out)],
                             check=True, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    derived = json.loads((out / "train_summary.json").read_text())["derived"]
    subprocess.run(cli + ["evaluate", str(out / "checkpoint"), "--data", str(folder / "val.jsonl"), "--choices", "data",
                          "--output", str(out / "evaluation")], check=True, capture_output=True, text=True)
    generated = json.loads((out / "evaluation" / "evaluation.json").read_text())
    choices = json.loads((out / "evaluation" / "choices.json").read_text())
    del trained
    return {"strategy": strategy, "seconds": seconds, "generation": generated["accuracy"],
            "choice": choices["accuracy"], "mean_margin": choices["mean_margin"], "derived": derived}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--datasets", nargs="+", default=["ArrowHead", "JapaneseVowels"])
    parser.add_argument("--strategies", nargs="+", default=["projector", "new-encoder"])
    parser.add_argument("--per-class", type=int, default=12, help="at most this many training recordings per class")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="defaults-carry-"))
    print(f"# python benchmarks/defaults_carry.py --datasets {' '.join(args.datasets)} --strategies "
          f"{' '.join(args.strategies)} --per-class {args.per_class}", flush=True)
    for name in args.datasets:
        recordings, labels = load(name, args.per_class)
        info = write_workspace(root / name, name, recordings, labels)
        print(f"\n{name}: {info['classes']} classes, {info['channels']} channel(s), {info['lengths']} steps, "
              f"{info['train']} train / {info['validation']} validation recordings", flush=True)
        for strategy in args.strategies:
            row = run(root / name, strategy)
            print(f"  {strategy:<12} validation accuracy by generation {row['generation']:.1%}, by choice "
                  f"{row['choice']:.1%}, mean margin {row['mean_margin']:.2f}, {row['seconds']:.0f} s", flush=True)
            for key, why in row["derived"].items():
                print(f"      {key}: {why}")


if __name__ == "__main__":
    main()
