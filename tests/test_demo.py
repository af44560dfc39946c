"""The main job end to end on the real LLM and data (one short epoch), and chat on its checkpoint."""

import io
import json

import numpy as np
import pytest

from hcx_extend.cli import main
from hcx_extend.data.basic_motions import QUESTION, load_basic_motions, parse_activity
from hcx_extend.presets import smollm2_gguf_path


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("demo")
    assert main(["demo", "--epochs", "1", "--validation", "2", "--output", str(run), "--seed", "3"]) == 0
    return run


def test_demo_writes_metrics_plots_and_a_checkpoint(demo_run):
    metrics = json.loads((demo_run / "metrics.json").read_text())
    assert metrics["test_total"] == 40
    assert np.array(metrics["confusion"]["matrix"]).sum() == 40
    assert metrics["test_correct"] == np.trace(np.array(metrics["confusion"]["matrix"])[:, :4])
    # 32 training recordings (8 held out for validation), a fresh variation of each per epoch, batch 4, one epoch.
    assert metrics["steps"] == 8
    assert 0.0 <= metrics["best_validation"]["eval_accuracy"] <= 1.0 and metrics["best_validation"]["step"] == 8
    # The test split scored by each answer's likelihood too: the margins agree with the choice accuracy.
    choices = json.loads((demo_run / "choices.json").read_text())
    assert choices["choices"] == ["standing", "walking", "running", "badminton"]
    right = sum(e["margin"] > 0 for e in choices["examples"])
    assert right / 40 == metrics["test_choice_accuracy"] == choices["accuracy"]
    assert metrics["test_min_margin"] == min(e["margin"] for e in choices["examples"])
    assert sorted(p.name for p in (demo_run / "recordings").iterdir()) == [
        "badminton.csv", "running.csv", "standing.csv", "walking.csv"]
    for name in ("loss_curve.png", "confusion_matrix.png"):
        assert (demo_run / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (demo_run / "checkpoint" / "trainable.safetensors").exists()
    assert metrics["peak_rss_gb"] < 2.5


def test_chat_answers_from_the_demo_checkpoint_like_the_demo(demo_run, tmp_path, capsys):
    recording = load_basic_motions("test").values[0]
    np.save(tmp_path / "recording.npy", recording)
    capsys.readouterr()
    assert main(["chat", str(demo_run / "checkpoint"), "--imu", str(tmp_path / "recording.npy"),
                 "--max-new-tokens", "6", QUESTION]) == 0
    answer = capsys.readouterr().out.strip()
    expected = json.loads((demo_run / "metrics.json").read_text())["examples"][0]["answer"]
    assert answer == expected
    # A plain text prompt works too.
    assert main(["chat", str(demo_run / "checkpoint"), "--max-new-tokens", "8", "What is the capital of France?"]) == 0
    assert "paris" in capsys.readouterr().out.lower()


def test_the_readme_chat_line_works_as_written(demo_run, capsys):
    """README: hcx-extend chat runs/imu-demo/checkpoint --imu runs/imu-demo/recordings/walking.csv "What activity ..." """
    recording = demo_run / "recordings" / "walking.csv"
    assert recording.read_text().splitlines()[0] == "acc_x,acc_y,acc_z,gyro_x,gyro_y,gyro_z"
    capsys.readouterr()
    assert main(["chat", str(demo_run / "checkpoint"), "--imu", str(recording), QUESTION]) == 0
    answer = capsys.readouterr().out.strip()
    # The demo's own evaluation asked the same question about the same (first walking) test recording.
    index = load_basic_motions("test").labels.index("walking")
    expected = json.loads((demo_run / "evaluation.json").read_text())["examples"][index]["answer"]
    assert parse_activity(answer) == parse_activity(expected)


def test_interactive_chat_keeps_the_model_loaded(demo_run, monkeypatch, capsys):
    monkeypatch.setattr("sys.stdin", io.StringIO(f"{QUESTION}\nAnd now?\n\n"))
    recording = demo_run / "recordings" / "running.csv"
    capsys.readouterr()
    assert main(["chat", str(demo_run / "checkpoint"), "--imu", str(recording), "--max-new-tokens", "6"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith(f"{demo_run / 'checkpoint'} loaded; modalities ['imu'], inputs {{'imu': 1}}")
    assert len(lines) == 3 and all(line.startswith("assistant:") for line in lines[1:])  # one answer per question


def test_any_checkpoint_kind_chats_the_embedded_llm_included(capsys):
    capsys.readouterr()
    assert main(["chat", str(smollm2_gguf_path()), "--max-new-tokens", "8", "What is the capital of France?"]) == 0
    assert "paris" in capsys.readouterr().out.lower()
