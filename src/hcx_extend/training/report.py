"""What a run trains and how it went: parameters per component before it starts, the loss curve after."""

from __future__ import annotations

import os
from pathlib import Path

from hcx_extend.model import OmniForCausalLM
from hcx_extend.units import human_bytes


def trainable_table(model: OmniForCausalLM) -> list[dict]:
    """One row per component under ``model.``: total and trained parameters and the trained bytes."""
    rows = []
    for name, module in model.model.named_children():
        parameters = [p for _, p in module.named_parameters()]
        trained = [p for p in parameters if p.requires_grad]
        rows.append({
            "component": name,
            "parameters": sum(p.numel() for p in parameters),
            "trained": sum(p.numel() for p in trained),
            "trained_bytes": sum(p.numel() * p.element_size() for p in trained),
        })
    return rows


def trainable_report(model: OmniForCausalLM, title: str = "trainable parameters") -> str:
    rows = trainable_table(model)
    total = sum(r["parameters"] for r in rows)
    lines = [title, f"{'component':<20} {'trained':>14} {'of':>14} {'MB':>10} {'% of all':>9}"]
    for r in rows:
        lines.append(
            f"{r['component']:<20} {r['trained']:>14,} {r['parameters']:>14,} {r['trained_bytes'] / 1e6:>10.2f} "
            f"{100 * r['trained'] / total:>8.3f}%"
        )
    trained = sum(r["trained"] for r in rows)
    trained_bytes = sum(r["trained_bytes"] for r in rows)
    lines.append(f"{'total':<20} {trained:>14,} {total:>14,} {trained_bytes / 1e6:>10.2f} {100 * trained / total:>8.3f}%")
    lines.append(f"trained weights {human_bytes(trained_bytes)}; with AdamW state and gradients about {human_bytes(4 * trained_bytes)}")
    return "\n".join(lines)


def write_loss_curve(path: str | os.PathLike, history: list[dict], title: str) -> Path:
    """A PNG of the training loss per step and the validation loss per evaluation (log scale)."""
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
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return Path(path)
