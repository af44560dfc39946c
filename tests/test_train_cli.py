"""`hcx-extend train` on JSONL data with a LoRA strategy, then `merge` and `chat` on its checkpoint."""

import json

import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from hcx_extend import OmniForCausalLM
from hcx_extend.runs import load_model
from hcx_extend.cli import main
from tiny_tokenizer import make_tokenizer

CHANNELS = ["acc_x", "acc_y", "acc_z", "gyro_x", "gyro_y", "gyro_z"]


@pytest.fixture
def workspace(tmp_path):
    return make_workspace(tmp_path)


def make_workspace(tmp_path):
    """A tiny Llama with the test tokenizer, and JSONL train/eval data of 6-channel .npy recordings."""
    tokenizer = make_tokenizer()
    torch.manual_seed(0)
    llm = LlamaForCausalLM(LlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True))
    llm.save_pretrained(tmp_path / "llm")
    tokenizer.save_pretrained(tmp_path / "llm")
    data = tmp_path / "data"
    (data / "recordings").mkdir(parents=True)
    rng = np.random.default_rng(0)
    lines = []
    for i in range(8):
        name = f"recordings/r{i}.npy"
        np.save(data / name, rng.normal(size=(12 + i, 6)).astype(np.float32))
        lines.append(json.dumps({"messages": [{"role": "user", "content": "<imu> what?"},
                                              {"role": "assistant", "content": "up" if i % 2 else "down"}],
                                 "inputs": {"imu": [name]}}))
    (data / "train.jsonl").write_text("\n".join(lines[:6]) + "\n")
    (data / "eval.jsonl").write_text("\n".join(lines[6:]) + "\n")
    return tmp_path


def test_train_merge_chat(workspace, capsys):
    out = workspace / "run"
    assert main(["train", "--llm", str(workspace / "llm"), "--add-imu", "imu", "--data", str(workspace / "data" / "train.jsonl"),
                 "--eval-data", str(workspace / "data" / "eval.jsonl"), "--strategy", "lora-all", "--epochs", "2",
                 "--batch-size", "2", "--grad-accum", "2", "--lr", "1e-3", "--output", str(out)]) == 0
    checkpoint = out / "checkpoint"
    assert sorted(p.name for p in (checkpoint / "adapters").iterdir()) == ["language_model"]
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["steps"] == 6 and summary["best"]["eval_loss"] > 0
    # The new IMU encoder had nothing to adapt: it was trained in full, with its projector.
    assert summary["components"] == ["language_model", "imu_model", "imu_projector"]

    with_adapters, tokenizer = load_model(checkpoint)
    assert main(["merge", str(checkpoint), "--output", str(workspace / "merged")]) == 0
    merged = OmniForCausalLM.from_pretrained(workspace / "merged")
    assert not any("lora_" in k for k in merged.state_dict())
    ids = torch.tensor([[1, 5, 9] + [merged.config.modality("imu").token_id] * 3 + [7]])  # 12 steps, stride 4
    imu = {"imu": {"values": torch.randn(1, 12, 6), "lengths": torch.tensor([12])}}
    with torch.no_grad():
        assert torch.allclose(merged(input_ids=ids, modality_inputs=imu).logits,
                              with_adapters(input_ids=ids, modality_inputs=imu).logits, atol=1e-5)

    recording = workspace / "data" / "recordings" / "r0.npy"
    assert main(["chat", str(checkpoint), "--imu", str(recording), "--max-new-tokens", "3", "what?"]) == 0
    np.save(workspace / "three.npy", np.zeros((10, 3), dtype=np.float32))
    capsys.readouterr()
    assert main(["chat", str(checkpoint), "--imu", str(workspace / "three.npy"), "what?"]) == 2
    assert "imu: item 0 expected 6 channels, got 3" in capsys.readouterr().err


def test_bad_jsonl_is_reported(workspace, capsys):
    (workspace / "bad.jsonl").write_text('{"inputs": {}}\n')
    assert main(["train", "--llm", str(workspace / "llm"), "--add-imu", "imu", "--data", str(workspace / "bad.jsonl"),
                 "--output", str(workspace / "run")]) == 2
    assert "bad.jsonl:1: needs 'messages'" in capsys.readouterr().err
