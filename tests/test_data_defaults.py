"""Training settings derived from the data (`hcx_extend.training.data_defaults`) and their use by `train`."""

import json

import numpy as np

from hcx_extend.cli import main
from hcx_extend.data.examples import Example
from hcx_extend.training.data_defaults import derive_batch_size, derive_choices, derive_epochs, derive_stride


def test_batch_and_epochs_follow_the_number_of_examples():
    assert [derive_batch_size(n).value for n in (5, 10, 32, 64, 300)] == [2, 2, 4, 8, 8]
    # About 640 examples seen in all, at least 3 epochs, at most 60.
    assert [derive_epochs(n).value for n in (5, 10, 32, 64, 300)] == [60, 60, 20, 10, 3]
    assert "32 training examples" in derive_epochs(32).reason


def test_stride_follows_the_median_length():
    assert derive_stride([7, 9, 29]).value == 1
    assert derive_stride([100] * 5).value == 4  # BasicMotions: 25 tokens
    assert derive_stride([1000, 1200, 900]).value == 40
    assert "median recording 1000 steps" in derive_stride([1000, 1200, 900]).reason


def chat(answer):
    return Example([{"role": "user", "content": "<imu> ?"}, {"role": "assistant", "content": answer}])


def test_a_few_repeated_answers_are_a_closed_set():
    assert derive_choices([chat(a) for a in ["b", "a", "b", "a"]]).value == ["a", "b"]
    assert derive_choices([chat(a) for a in ["a", "b", "c", "a"]]).value is None  # b and c appear once
    assert derive_choices([chat(f"sentence {i}") for i in range(30)]).value is None


def test_train_derives_stride_epochs_and_batch_from_the_data_and_says_why(tmp_path, capsys):
    from test_train_cli import make_workspace

    workspace = make_workspace(tmp_path)
    data = workspace / "data"
    rng = np.random.default_rng(1)
    lines = []
    for i in range(6):
        np.save(data / f"long{i}.npy", rng.normal(size=(70 + i, 3)).astype(np.float32))
        lines.append(json.dumps({"messages": [{"role": "user", "content": "<acc> what?"},
                                              {"role": "assistant", "content": "up" if i % 2 else "down"}],
                                 "inputs": {"acc": [f"long{i}.npy"]}}))
    (data / "acc.jsonl").write_text("\n".join(lines) + "\n")
    modality = {"name": "acc", "encoder": {"model_type": "imu", "in_channels": 3, "num_layers": 1},
                "projector": {"type": "mlp", "activation": "silu"},
                "input": {"kind": "sensor", "channels": 3, "max_length": 500}}
    (workspace / "acc.json").write_text(json.dumps(modality))
    out = workspace / "run"
    assert main(["train", "--llm", str(workspace / "llm"), "--modality-file", str(workspace / "acc.json"),
                 "--data", str(data / "acc.jsonl"), "--epochs", "2", "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "acc stride: 3 (median recording 72 steps" in printed
    assert "batch size: 2 (6 training examples" in printed
    assert "epochs:" not in printed  # set by the user: nothing derived
    config = json.loads((out / "checkpoint" / "config.json").read_text())
    assert config["modalities"]["acc"]["encoder"]["stride"] == 3
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["steps"] == 2 * 3 and summary["derived"]["batch size"].startswith("2 ")
