"""Time to test accuracy on the IMU demo task: hcx-extend's recipe vs the extension guide's literal one.

Both recipes extend the same LLM (the embedded SmolLM2-135M-Instruct) with an IMU modality and
train on all 40 BasicMotions training recordings; after every epoch the 40 test recordings are
answered by greedy generation. Reported per recipe: training seconds (evaluation excluded) until
test accuracy first reaches 90 % and 97.5 %, training samples per second, peak resident memory.

* guide: the guide's encoder exactly (``imu_guide``: nn.TransformerEncoder, 100 tokens per
  recording), its SiLU MLP projector 1280 -> 1280 -> hidden, AdamW lr 1e-4, batch 8, plain loop
  (loss computed on the answer positions only, like ours, so the comparison is between recipes).
* hcx-extend: the demo's settings (`hcx_extend.recipes.activity.ActivitySettings`: its rung, ``imu``
  encoder with stride 4 -> 25 tokens, masks, a fresh variation of each recording every epoch, weight
  averaging, warm-up + cosine schedule, loss on answer positions only) through
  `hcx_extend.recipes.activity.fit`, on the whole train split (no held-out validation here).

Each recipe runs in its own process (so peak memory is its own); both run in the same invocation and
the ratios compare them. This is a benchmark, not a test: test accuracy is used here to measure
time-to-accuracy, never to pick a model.

    python benchmarks/imu_time_to_accuracy.py --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

TARGETS = (0.9, 0.975)


def worker(recipe: str, seed: int, max_epochs: int) -> dict:
    import torch

    from hcx_extend.checkpoint import cached_source, extend
    from hcx_extend.config import ModalityConfig
    from hcx_extend.data.augment import augment_recordings, example_variations
    from hcx_extend.data.basic_motions import Recordings, load_basic_motions, parse_activity
    from hcx_extend.data.sensors import fit_normalization
    from hcx_extend.evaluation import evaluate_examples
    from hcx_extend.presets import imu_modality, smollm2_gguf_path
    from hcx_extend.processor import OmniProcessor
    from hcx_extend.recipes.activity import ANSWER, ActivitySettings, examples_of
    from hcx_extend.training import Trainer

    torch.manual_seed(seed)
    settings = ActivitySettings()
    if recipe == "guide":
        modality = ModalityConfig("imu", encoder={"model_type": "imu_guide"}, projector={"type": "mlp", "activation": "silu"},
                                  input={"kind": "sensor", "channels": 6, "max_length": 4096})
    else:
        modality = imu_modality("imu", stride=settings.stride)
    result = extend(cached_source(smollm2_gguf_path()), [modality])
    model, tokenizer = result.model, result.tokenizer
    train, test = load_basic_motions("train"), load_basic_motions("test")
    model.config.modality("imu").normalization = fit_normalization(train.values)
    processor = OmniProcessor(tokenizer, model.config)
    curve: list[dict] = []

    def test_accuracy(m) -> float:
        return evaluate_examples(m, processor, examples_of(test), ANSWER, batch_size=20, parse=parse_activity).report.accuracy

    if recipe == "guide":
        trainable = [p for n, p in model.named_parameters() if n.startswith(("model.imu_model.", "model.imu_projector."))]
        for p in model.parameters():
            p.requires_grad_(False)
        for p in trainable:
            p.requires_grad_(True)
        optimizer = torch.optim.AdamW(trainable, lr=1e-4)
        generator = torch.Generator().manual_seed(seed)
        train_seconds = 0.0
        examples = examples_of(train)
        epoch_samples = len(examples)
        for epoch in range(max_epochs):
            model.train()
            model.model.language_model.eval()
            started = time.perf_counter()
            order = torch.randperm(len(train), generator=generator).tolist()
            for start in range(0, len(order), 8):
                chunk = [examples[i] for i in order[start:start + 8]]
                batch = processor([e.messages for e in chunk], {"imu": [e.inputs["imu"][0] for e in chunk]},
                                  return_labels=True, padding_side="right")
                # Loss on the answer positions only, as ours: the comparison is about the recipes, not the loss trick.
                model(**batch, logits_to_keep="labels").loss.backward()
                optimizer.step()
                optimizer.zero_grad()
            train_seconds += time.perf_counter() - started
            model.eval()
            with torch.no_grad():
                accuracy = test_accuracy(model)
            curve.append({"epoch": epoch + 1, "train_seconds": train_seconds, "test_accuracy": accuracy})
            print(json.dumps(curve[-1]), file=sys.stderr, flush=True)
            if accuracy >= max(TARGETS):
                break
    else:
        values, labels = train.values, train.labels
        if not settings.fresh_variations:
            values, labels = augment_recordings(values, labels, settings.augmentation, seed)
        vary = example_variations(settings.augmentation, ["imu"]) if settings.fresh_variations else None
        epoch_samples = len(values)

        def evaluate(m) -> dict:
            accuracy = test_accuracy(m)
            curve.append({"epoch": len(curve) + 1, "test_accuracy": accuracy})
            print(json.dumps(curve[-1]), file=sys.stderr, flush=True)
            # Stopping at the target is how time-to-accuracy is measured, not model selection.
            return {"test_accuracy": accuracy, "score": accuracy}

        # The demo's schedule (its epoch count sets the decay), stopping once the target is reached.
        config = settings.training(seed=seed, target_score=max(TARGETS), progress=False)
        config.patience = None
        trainer = Trainer(model, processor, examples_of(Recordings(values, labels)), config, evaluate=evaluate,
                          log=lambda line: None, vary=vary)
        history = trainer.train().history
        seconds = [h["train_seconds"] for h in history if "eval_test_accuracy" in h]
        for point, elapsed in zip(curve, seconds):
            point["train_seconds"] = elapsed
    samples = epoch_samples * len(curve)
    return {
        "recipe": recipe,
        "seed": seed,
        "curve": curve,
        "samples_per_second": samples / curve[-1]["train_seconds"],
        "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6,
        **{f"seconds_to_{t}": next((p["train_seconds"] for p in curve if p["test_accuracy"] >= t), None) for t in TARGETS},
    }


def run_worker(recipe: str, seed: int, max_epochs: int) -> dict:
    command = [sys.executable, __file__, "--worker", recipe, "--seed", str(seed), "--max-epochs", str(max_epochs)]
    output = subprocess.run(command, check=True, stdout=subprocess.PIPE, text=True).stdout
    return json.loads(output.strip().splitlines()[-1])


def fmt(value, spec=".0f", missing="not reached"):
    return missing if value is None else format(value, spec)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--max-epochs", type=int, default=30)
    parser.add_argument("--worker", choices=["guide", "hcx-extend"], help=argparse.SUPPRESS)
    parser.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.seed, args.max_epochs)))
        return

    rows = []
    for seed in args.seeds:
        for recipe in ("hcx-extend", "guide"):
            print(f"seed {seed}: {recipe} ...", flush=True)
            rows.append(run_worker(recipe, seed, args.max_epochs))
    print()
    print(f"{'recipe':<11} {'seed':>4} {'s to 90%':>9} {'s to 97.5%':>11} {'samples/s':>10} {'peak GB':>8}  accuracy per epoch")
    for r in rows:
        curve = " ".join(f"{p['test_accuracy']:.2f}" for p in r["curve"])
        print(f"{r['recipe']:<11} {r['seed']:>4} {fmt(r['seconds_to_0.9']):>9} {fmt(r['seconds_to_0.975']):>11} "
              f"{r['samples_per_second']:>10.2f} {r['peak_rss_gb']:>8.2f}  {curve}")
    print()
    for seed in args.seeds:
        ours = next(r for r in rows if r["seed"] == seed and r["recipe"] == "hcx-extend")
        guide = next(r for r in rows if r["seed"] == seed and r["recipe"] == "guide")
        ratios = []
        for t in TARGETS:
            a, b = ours[f"seconds_to_{t}"], guide[f"seconds_to_{t}"]
            ratios.append(f"time to {t:.1%}: " + (f"{b / a:.2f}x shorter" if a and b else "n/a (a recipe did not reach it)"))
        ratios.append(f"samples/s {ours['samples_per_second'] / guide['samples_per_second']:.2f}x")
        ratios.append(f"peak memory {ours['peak_rss_gb'] / guide['peak_rss_gb']:.2f}x")
        print(f"seed {seed}: hcx-extend vs guide: " + "; ".join(ratios))


if __name__ == "__main__":
    main()
