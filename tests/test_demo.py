"""The main job end to end on the real LLM and data (one short epoch), and chat on its checkpoint."""

import json

import numpy as np
import pytest

from hcx_extend.cli import main
from hcx_extend.data.basic_motions import load_basic_motions


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("demo")
    assert main(["demo", "--epochs", "1", "--output", str(run), "--seed", "3"]) == 0
    return run


def test_demo_writes_metrics_plots_and_a_checkpoint(demo_run):
    metrics = json.loads((demo_run / "metrics.json").read_text())
    assert metrics["test_total"] == 40
    assert np.array(metrics["confusion"]["matrix"]).sum() == 40
    assert metrics["test_correct"] == np.trace(np.array(metrics["confusion"]["matrix"])[:, :4])
    assert metrics["steps"] == 4  # 32 training recordings (8 held out for validation), batch 8, one epoch
    assert metrics["best_validation"]["eval_accuracy"] is not None
    for name in ("loss_curve.png", "confusion_matrix.png"):
        assert (demo_run / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (demo_run / "checkpoint" / "trainable.safetensors").exists()
    assert metrics["peak_rss_gb"] < 2.5


def test_chat_answers_from_the_demo_checkpoint_like_the_demo(demo_run, tmp_path, capsys):
    recording = load_basic_motions("test").values[0]
    np.save(tmp_path / "recording.npy", recording)
    capsys.readouterr()
    assert main(["chat", str(demo_run / "checkpoint"), "--imu", str(tmp_path / "recording.npy"),
                 "--max-new-tokens", "6", "What activity is the person doing?"]) == 0
    answer = capsys.readouterr().out.strip()
    expected = json.loads((demo_run / "metrics.json").read_text())["examples"][0]["answer"]
    assert answer == expected
    # A plain text prompt works too.
    assert main(["chat", str(demo_run / "checkpoint"), "--max-new-tokens", "8", "What is the capital of France?"]) == 0
    assert "paris" in capsys.readouterr().out.lower()
