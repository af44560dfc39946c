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
from hcx_extend.data.examples import Example, gather_inputs
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
        answers += [a.text for a in answer(model, processor, [e.prompt for e in chunk], gather_inputs(chunk), settings)]
    parsed = [parse(a) for a in answers] if parse else answers
    truths = [e.answer for e in examples]
    return Evaluation(score_answers(truths, parsed), answers, truths)


@dataclass
class ChoiceScores:
    """Each example's log-likelihood of every allowed answer (lm-evaluation-harness' multiple choice).

    Attributes:
        choices: the allowed answers, in column order.
        log_likelihoods: ``(examples, choices)``: the summed log-probability of each choice's tokens
            (the whole assistant turn, its end-of-turn token included) given the example's prompt.
        truths: the expected answers (normalised).
    """

    choices: list[str]
    log_likelihoods: np.ndarray
    truths: list[str]

    @property
    def predictions(self) -> list[str]:
        return [self.choices[i] for i in self.log_likelihoods.argmax(axis=1)]

    @property
    def probabilities(self) -> np.ndarray:
        """``(examples, choices)``: the likelihoods renormalised over the allowed answers."""
        shifted = self.log_likelihoods - self.log_likelihoods.max(axis=1, keepdims=True)
        weights = np.exp(shifted)
        return weights / weights.sum(axis=1, keepdims=True)

    @property
    def margins(self) -> np.ndarray:
        """``(examples,)``: log-likelihood of the expected answer minus the best other one (> 0 = right)."""
        truth = np.array([self.choices.index(t) for t in self.truths])
        rows = np.arange(len(truth))
        others = self.log_likelihoods.copy()
        others[rows, truth] = -np.inf
        return self.log_likelihoods[rows, truth] - others.max(axis=1)

    @property
    def report(self) -> ClassificationReport:
        return score_answers(self.truths, self.predictions)

    def closest(self, count: int = 3) -> list[int]:
        """The ``count`` examples nearest the decision boundary (smallest margins first)."""
        return [int(i) for i in np.argsort(self.margins, kind="stable")[:count]]

    def summary(self, count: int = 3) -> str:
        """Accuracy by choice, the mean and smallest margins, and the examples closest to the boundary."""
        margins, probabilities = self.margins, self.probabilities
        lines = [f"by choice: {self.report.correct}/{len(self.truths)} = {self.report.accuracy:.1%}; margin "
                 f"(log-likelihood of the right answer minus the best wrong one) mean {margins.mean():.2f}, "
                 f"min {margins.min():.2f}"]
        for index in self.closest(count):
            ranked = np.argsort(-probabilities[index], kind="stable")
            shown = ", ".join(f"{self.choices[j]} {probabilities[index, j]:.1%}" for j in ranked[:3])
            lines.append(f"  example {index} ({self.truths[index]}): margin {margins[index]:.2f}; {shown}")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {"choices": self.choices, "accuracy": self.report.accuracy,
                "mean_margin": float(self.margins.mean()), "min_margin": float(self.margins.min()),
                "examples": [{"expected": t, "predicted": p, "margin": float(m),
                              "probabilities": dict(zip(self.choices, map(float, row)))}
                             for t, p, m, row in zip(self.truths, self.predictions, self.margins, self.probabilities)]}


@torch.no_grad()
def score_choices(model: OmniForCausalLM, processor: OmniProcessor, examples: Sequence[Example],
                  choices: Sequence[str], *, batch_size: int = 8) -> ChoiceScores:
    """Score every allowed answer of every example by its log-likelihood (no generation).

    Each example's prompt is completed with each choice as the assistant's answer; the answer tokens'
    log-probabilities are summed. The prediction is the most likely choice, so the result says how
    sure the model is, not only whether its greedy answer happened to be right. The prompt (modality
    items included) is run once per example and its KV cache shared by the choices, so scoring costs
    about one forward pass of the prompt, not one per choice.

    Args:
        examples: chats ending with the expected answer, which must be one of ``choices`` (after `normalise`).
        choices: the closed set of answers (two or more, distinct after `normalise`).
        batch_size: examples per forward pass.

    Raises:
        ValueError: fewer than two choices, duplicates, or an expected answer that is not a choice.
    """
    choices = list(choices)
    normalised = [normalise(c) for c in choices]
    if len(choices) < 2 or len(set(normalised)) != len(choices):
        raise ValueError(f"choices must be two or more distinct answers, got {choices}")
    truths = [normalise(e.answer) if e.answer is not None else None for e in examples]
    strangers = sorted({t for t in truths if t not in normalised}, key=str)
    if strangers:
        raise ValueError(f"expected answers {strangers[:5]} are not among the choices {choices}")
    scores = np.zeros((len(examples), len(choices)))
    for start in range(0, len(examples), batch_size):
        chunk = examples[start:start + batch_size]
        scores[start:start + len(chunk)] = _choice_log_likelihoods(model, processor, chunk, choices)
    return ChoiceScores(normalised, scores, truths)


def _choice_log_likelihoods(model: OmniForCausalLM, processor: OmniProcessor, examples: Sequence[Example],
                            choices: list[str]) -> np.ndarray:
    """``(examples, choices)`` summed answer log-probabilities, the shared prompt run once per example.

    The processor tokenizes a prompt and its answer separately, so every choice's row starts with the
    prompt's tokens. The prompt runs with its last token masked out of the cache; each continuation is
    that last token plus the choice's answer tokens, so every answer token is predicted inside it.
    """
    count = len(choices)
    prompts = processor([e.prompt for e in examples], gather_inputs(examples), padding_side="right")
    # Every (example, choice) chat in full; the items are collated once per choice (no encoder runs here).
    full = processor([e.prompt + [{"role": "assistant", "content": c}] for e in examples for c in choices],
                     gather_inputs([e for e in examples for _ in choices]), return_labels=True, padding_side="right")
    lengths = prompts["attention_mask"].sum(1).tolist()
    prompt_ids = prompts["input_ids"].tolist()
    continuations, targets = [], []
    for row, (ids, labels, valid) in enumerate(zip(full["input_ids"].tolist(), full["labels"].tolist(),
                                                   full["attention_mask"].sum(1).tolist())):
        length = lengths[row // count]
        if ids[:length] != prompt_ids[row // count][:length]:
            raise ValueError("the chat template renders a prompt differently inside the full chat; "
                             "choices cannot share its cache")
        continuations.append(ids[length - 1:valid])
        targets.append(labels[length:valid])
    prefix_mask = prompts["attention_mask"].clone()
    prefix_mask[torch.arange(len(examples)), torch.tensor(lengths) - 1] = 0
    prefill = model(input_ids=prompts["input_ids"], attention_mask=prefix_mask,
                    modality_inputs=prompts["modality_inputs"], use_cache=True, logits_to_keep=1)
    cache = prefill.cache
    cache.batch_repeat_interleave(count)

    width = max(len(c) for c in continuations)
    input_ids = torch.tensor([c + [c[-1]] * (width - len(c)) for c in continuations])
    mask = torch.tensor([[1] * len(c) + [0] * (width - len(c)) for c in continuations])
    positions = torch.tensor([[lengths[r // count] - 1 + t for t in range(width)] for r in range(len(continuations))])
    target_ids = torch.full((len(continuations), width), IGNORE_INDEX)
    for r, labels in enumerate(targets):
        target_ids[r, :len(labels)] = torch.tensor(labels, dtype=torch.long)  # position t predicts token t + 1
    keep = target_ids != IGNORE_INDEX
    output = model(input_ids=input_ids, attention_mask=torch.cat([prefix_mask.repeat_interleave(count, 0), mask], 1),
                   position_ids=positions, cache=cache, use_cache=True, logits_to_keep=keep)
    log_probs = torch.log_softmax(output.logits.float(), dim=-1)
    token_scores = log_probs.gather(1, target_ids[keep].to(log_probs.device)[:, None])[:, 0]
    sums = torch.zeros(len(continuations), dtype=torch.float64).index_add_(0, keep.nonzero()[:, 0],
                                                                           token_scores.double().cpu())
    return sums.view(len(examples), count).numpy()


@torch.no_grad()
def mean_answer_loss(model: OmniForCausalLM, processor: OmniProcessor, examples: Sequence[Example],
                     batch_size: int = 16) -> float:
    """Cross-entropy per answer token over ``examples`` (chats ending with the expected answer)."""
    total, tokens = 0.0, 0
    for start in range(0, len(examples), batch_size):
        chunk = examples[start:start + batch_size]
        batch = processor([e.messages for e in chunk], gather_inputs(chunk), return_labels=True, padding_side="right")
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
