"""Score generated answers against expected ones: exact match, per-class precision and recall, confusion.

The model is asked each example's question (`hcx_extend.inference.answer`, greedy by default) and
its answer is compared with the example's final assistant message after `normalise` (case, outer
whitespace, quotes and trailing punctuation do not count). For classification-like data (few
distinct answers) the report also gives precision and recall per class and a confusion matrix whose
columns are the classes plus ``other`` for answers that are none of them.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from hcx_extend.config import IGNORE_INDEX
from hcx_extend.data.examples import Example
from hcx_extend.inference import GenerationSettings, answer
from hcx_extend.layout import atomic_write_text
from hcx_extend.model import OmniForCausalLM
from hcx_extend.processor import OmniProcessor

OTHER = "other"


def normalise(text: str) -> str:
    """``' "Walking." '`` -> ``'walking'``: lower case, inner whitespace collapsed, outer quotes and punctuation dropped."""
    text = re.sub(r"\s+", " ", text.strip().lower())
    return text.strip("\"'`").rstrip(".!?;:,").strip()


@dataclass
class ClassificationReport:
    """Exact-match accuracy with per-class precision/recall and a confusion matrix.

    Attributes:
        classes: the expected answers (normalised), sorted; the matrix's rows.
        columns: ``classes`` plus ``"other"`` when some prediction is none of them; the matrix's columns.
        matrix: ``matrix[i][j]`` = examples of class ``classes[i]`` answered ``columns[j]``.
        precision / recall: per class; precision is None for a class never predicted.
    """

    correct: int
    total: int
    classes: list[str]
    columns: list[str]
    matrix: list[list[int]]
    precision: dict[str, float | None]
    recall: dict[str, float]

    @property
    def accuracy(self) -> float:
        return self.correct / self.total if self.total else 0.0

    def table(self) -> str:
        """The confusion matrix and per-class precision/recall, printable."""
        width = max(len(c) for c in self.columns) + 2
        lines = ["true \\ predicted".ljust(18) + "".join(c.rjust(width) for c in self.columns)
                 + "   precision  recall"]
        for name, row in zip(self.classes, self.matrix):
            precision = self.precision[name]
            shown = "-" if precision is None else f"{precision:.1%}"
            lines.append(name.ljust(18) + "".join(str(v).rjust(width) for v in row)
                         + f"   {shown:>9}  {self.recall[name]:>6.1%}")
        lines.append(f"exact match: {self.correct}/{self.total} = {self.accuracy:.1%}")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {**asdict(self), "accuracy": self.accuracy}


def score_answers(truths: Sequence[str], predictions: Sequence[str]) -> ClassificationReport:
    """Compare predictions with truths (both normalised with `normalise`)."""
    if len(truths) != len(predictions):
        raise ValueError(f"{len(truths)} expected answers but {len(predictions)} predictions")
    truths = [normalise(t) for t in truths]
    predictions = [normalise(p) for p in predictions]
    classes = sorted(set(truths))
    shown = [p if p in classes else OTHER for p in predictions]
    columns = classes + ([OTHER] if OTHER in shown and OTHER not in classes else [])
    matrix = np.zeros((len(classes), len(columns)), dtype=int)
    for truth, guess in zip(truths, shown):
        matrix[classes.index(truth), columns.index(guess)] += 1
    precision: dict[str, float | None] = {}
    recall: dict[str, float] = {}
    for i, name in enumerate(classes):
        predicted = int(matrix[:, columns.index(name)].sum())
        precision[name] = int(matrix[i, columns.index(name)]) / predicted if predicted else None
        recall[name] = int(matrix[i, columns.index(name)]) / int(matrix[i].sum())
    correct = sum(t == p for t, p in zip(truths, predictions))
    return ClassificationReport(correct, len(truths), classes, columns, matrix.tolist(), precision, recall)


@dataclass
class Evaluation:
    """What `evaluate_examples` found: the report and every question's answer."""

    report: ClassificationReport
    answers: list[str]
    truths: list[str]

    def to_dict(self) -> dict:
        return {**self.report.to_dict(),
                "examples": [{"expected": t, "answer": a} for t, a in zip(self.truths, self.answers)]}


def evaluate_examples(
    model: OmniForCausalLM,
    processor: OmniProcessor,
    examples: Sequence[Example],
    settings: GenerationSettings = GenerationSettings(max_new_tokens=16),
    *,
    batch_size: int = 16,
    parse: Callable[[str], str] | None = None,
) -> Evaluation:
    """Ask every example's question and score the answers against its final assistant message.

    Args:
        examples: chats ending with the expected assistant answer, with their modality items.
        settings: generation settings (greedy by default).
        batch_size: questions generated together.
        parse: maps a generated answer to a label before scoring (default: the answer itself).

    Raises:
        ValueError: an example without an expected answer; bad inputs (the processor's messages).
    """
    missing = [i for i, e in enumerate(examples) if e.answer is None]
    if missing:
        raise ValueError(f"examples {missing[:5]} have no final assistant answer to compare with")
    answers: list[str] = []
    for start in range(0, len(examples), batch_size):
        chunk = examples[start:start + batch_size]
        inputs: dict[str, list] = {}
        for example in chunk:
            for name, items in example.inputs.items():
                inputs.setdefault(name, []).extend(items)
        answers += [a.text for a in answer(model, processor, [e.prompt for e in chunk], inputs, settings)]
    parsed = [parse(a) for a in answers] if parse else answers
    truths = [e.answer for e in examples]
    return Evaluation(score_answers(truths, parsed), answers, truths)


@torch.no_grad()
def mean_answer_loss(model: OmniForCausalLM, processor: OmniProcessor, examples: Sequence[Example],
                     batch_size: int = 16) -> float:
    """Cross-entropy per answer token over ``examples`` (chats ending with the expected answer)."""
    total, tokens = 0.0, 0
    for start in range(0, len(examples), batch_size):
        chunk = examples[start:start + batch_size]
        inputs: dict[str, list] = {}
        for example in chunk:
            for name, items in example.inputs.items():
                inputs.setdefault(name, []).extend(items)
        batch = processor([e.messages for e in chunk], inputs, return_labels=True, padding_side="right")
        count = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
        total += float(model(**batch, logits_to_keep="labels").loss) * count
        tokens += count
    return total / max(tokens, 1)


def write_evaluation(evaluation: Evaluation, folder: str | os.PathLike, title: str = "") -> list[Path]:
    """``folder/evaluation.json`` and ``folder/confusion_matrix.png``; returns the paths written."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_text(folder / "evaluation.json", json.dumps(evaluation.to_dict(), indent=2))
    png = write_confusion_png(evaluation.report, folder / "confusion_matrix.png", title)
    return [folder / "evaluation.json", png]


def write_confusion_png(report: ClassificationReport, path: str | os.PathLike, title: str = "") -> Path:
    """The confusion matrix as a PNG (counts in the cells, accuracy in the title)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    matrix = np.asarray(report.matrix)
    size = max(4.5, 0.9 * len(report.columns) + 2)
    figure, axis = plt.subplots(figsize=(size + 1, size))
    axis.imshow(matrix, cmap="Blues")
    axis.set_xticks(range(len(report.columns)), report.columns, rotation=30)
    axis.set_yticks(range(len(report.classes)), report.classes)
    for (i, j), value in np.ndenumerate(matrix):
        axis.text(j, i, str(value), ha="center", va="center",
                  color="white" if value > matrix.max() / 2 else "black")
    axis.set_xlabel("predicted")
    axis.set_ylabel("expected")
    axis.set_title(f"{title + ': ' if title else ''}exact match {report.accuracy:.1%}")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return Path(path)
