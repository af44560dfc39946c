"""Scoring generated answers: exact match after normalisation, per-class precision/recall, confusion matrix."""

import json

import pytest

from hcx_extend.cli import main
from hcx_extend.evaluation import normalise, score_answers


def test_normalisation_ignores_case_space_quotes_and_final_punctuation():
    assert normalise(' "Walking." ') == "walking"
    assert normalise("Running\n fast!") == "running fast"
    assert normalise("badminton?") == normalise("Badminton")


def test_precision_recall_and_confusion_by_hand():
    truths = ["walking", "walking", "walking", "running", "running", "standing"]
    answers = ["Walking", "running", "jumping", "running.", "running", "walking"]
    report = score_answers(truths, answers)
    assert (report.correct, report.total) == (3, 6)
    assert report.classes == ["running", "standing", "walking"]
    assert report.columns == ["running", "standing", "walking", "other"]
    assert report.matrix == [[2, 0, 0, 0], [0, 0, 1, 0], [1, 0, 1, 1]]
    assert report.recall == {"running": 1.0, "standing": 0.0, "walking": 1 / 3}
    # running predicted 3 times, 2 right; standing never predicted; walking predicted twice, once right.
    assert report.precision == {"running": 2 / 3, "standing": None, "walking": 0.5}
    assert "exact match: 3/6 = 50.0%" in report.table()
    with pytest.raises(ValueError, match="2 expected answers but 1 predictions"):
        score_answers(["a", "b"], ["a"])


def test_evaluate_command_and_selection_by_accuracy(tmp_path, capsys):
    """`train --select-by accuracy` keeps the best evaluation by generated-answer accuracy; `evaluate`
    writes the report, its JSON and a confusion-matrix PNG for any checkpoint."""
    from test_train_cli import make_workspace

    workspace = make_workspace(tmp_path)
    out = workspace / "run"
    assert main(["train", "--llm", str(workspace / "llm"), "--add-imu", "imu", "--data", str(workspace / "data" / "train.jsonl"),
                 "--eval-data", str(workspace / "data" / "eval.jsonl"), "--select-by", "accuracy", "--epochs", "2",
                 "--batch-size", "2", "--lr", "1e-3", "--output", str(out)]) == 0
    best = json.loads((out / "train_summary.json").read_text())["best"]
    assert 0.0 <= best["eval_accuracy"] <= 1.0 and best["eval_score"] == pytest.approx(
        best["eval_accuracy"] - 1e-3 * best["eval_loss"])
    capsys.readouterr()
    assert main(["evaluate", str(out / "checkpoint"), "--data", str(workspace / "data" / "eval.jsonl"),
                 "--output", str(tmp_path / "report")]) == 0
    printed = capsys.readouterr().out
    report = json.loads((tmp_path / "report" / "evaluation.json").read_text())
    assert report["total"] == 2 and sorted(report["classes"]) == ["down", "up"]
    assert sum(map(sum, report["matrix"])) == 2 and len(report["examples"]) == 2
    assert f"exact match: {report['correct']}/2" in printed
    assert (tmp_path / "report" / "confusion_matrix.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_choice_scores_are_the_answer_likelihoods(tokenizer):
    """Each choice's score is the summed log-probability of its answer tokens: for the expected answer it is
    minus the answer loss times the answer's token count, and the prediction is the likeliest choice."""
    import numpy as np
    import torch

    from hcx_extend import OmniProcessor
    from hcx_extend.data.examples import Example
    from hcx_extend.evaluation import mean_answer_loss, score_choices
    from test_training import tiny

    model = tiny(tokenizer, dropout=0.0).eval()
    processor = OmniProcessor(tokenizer, model.config)
    generator = torch.Generator().manual_seed(3)
    examples = [Example([{"role": "user", "content": "<sensor> which way?"}, {"role": "assistant", "content": answer}],
                        {"sensor": [torch.randn(10 + i, 6, generator=generator)]})
                for i, answer in enumerate(["up", "down", "left", "up"])]
    scores = score_choices(model, processor, examples, ["up", "down", "left"], batch_size=3)
    assert scores.log_likelihoods.shape == (4, 3)
    for row, example in enumerate(examples):
        batch = processor([example.messages], example.inputs, return_labels=True, padding_side="right")
        tokens = int((batch["labels"][:, 1:] != -100).sum())
        expected = -mean_answer_loss(model, processor, [example]) * tokens
        assert scores.log_likelihoods[row, scores.choices.index(example.answer)] == pytest.approx(expected, rel=1e-4, abs=1e-4)
    assert scores.predictions == [scores.choices[i] for i in scores.log_likelihoods.argmax(axis=1)]
    right = np.array([p == t for p, t in zip(scores.predictions, scores.truths)])
    assert ((scores.margins > 0) == right).all()
    assert np.allclose(scores.probabilities.sum(axis=1), 1.0)
    assert scores.closest(2) == list(np.argsort(scores.margins)[:2])
    assert scores.report.correct == int(right.sum())
    with pytest.raises(ValueError, match="not among the choices"):
        score_choices(model, processor, examples, ["up", "down"])
    with pytest.raises(ValueError, match="two or more distinct"):
        score_choices(model, processor, examples, ["up", "Up."])


def test_evaluate_with_choices_prints_both_accuracies_and_the_margins(tmp_path, capsys):
    from test_train_cli import make_workspace

    workspace = make_workspace(tmp_path)
    out = workspace / "run"
    assert main(["train", "--llm", str(workspace / "llm"), "--add-imu", "imu", "--data", str(workspace / "data" / "train.jsonl"),
                 "--epochs", "1", "--batch-size", "2", "--output", str(out)]) == 0
    capsys.readouterr()
    assert main(["evaluate", str(out / "checkpoint"), "--data", str(workspace / "data" / "eval.jsonl"),
                 "--output", str(tmp_path / "report"), "--choices", "data"]) == 0
    printed = capsys.readouterr().out
    choices = json.loads((tmp_path / "report" / "choices.json").read_text())
    assert choices["choices"] == ["down", "up"] and len(choices["examples"]) == 2
    assert "by generation:" in printed and "by choice:" in printed and "margin" in printed
    assert choices["min_margin"] == min(e["margin"] for e in choices["examples"])
    assert main(["evaluate", str(out / "checkpoint"), "--data", str(workspace / "data" / "eval.jsonl"),
                 "--output", str(tmp_path / "report"), "--choices", "left,right"]) == 2
