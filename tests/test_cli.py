import pytest

from hcx_extend.cli import main


def test_help_lists_the_commands(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for command in ("info", "extend", "demo"):
        assert f"    {command} " in out


def test_info_on_the_8b_preset_counts_parameters_per_component_without_weights(capsys):
    assert main(["info", "hcx-omni-8b"]) == 0
    out = capsys.readouterr().out
    rows = {line.split()[0]: line.split() for line in out.splitlines() if line.strip()}
    counts = {name: int(row[2].replace(",", "")) for name, row in rows.items()
              if name.startswith(("language_model", "vision_model", "audio_model", "mm_projector", "audio_projector"))}
    # 36 decoder layers of 4096 wide attention (32 q / 8 kv heads of 128) and a 12288-wide SwiGLU MLP.
    per_layer = 2 * 4096 * 4096 + 2 * 4096 * 1024 + 3 * 4096 * 12288 + 2 * 4096
    assert counts["language_model.layers"] == 36 * per_layer
    assert counts["language_model.embed_tokens"] == counts["language_model.lm_head"] == 200_704 * 4096
    assert counts["mm_projector"] == 5120 * 4096 + 4096
    assert counts["audio_projector"] == 1280 * 1280 + 1280 + 4096 * 1280 + 4096
    assert 0.6e9 < counts["vision_model"] < 0.7e9 and 0.6e9 < counts["audio_model"] < 0.65e9
    assert "<|IMAGE_PAD|>" in out and "128060" in out and "128061" in out
    assert "meta device" in out


def test_info_and_extend_on_a_saved_checkpoint(tiny_model, tokenizer, tmp_path, capsys):
    tiny_model.save_pretrained(tmp_path / "tiny")
    tokenizer.save_pretrained(tmp_path / "tiny")
    assert main(["info", str(tmp_path / "tiny")]) == 0
    assert "sensor_model" in capsys.readouterr().out
    assert main(["extend", str(tmp_path / "tiny"), "--add-imu", "imu", "--output", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert "added imu: model.imu_model + model.imu_projector, token <|IMU_PAD|> = 259" in out
    assert (tmp_path / "out" / "model.safetensors").exists()


def test_errors_are_reported_without_a_traceback(tmp_path, capsys):
    assert main(["info", str(tmp_path / "nowhere")]) == 2
    assert "error:" in capsys.readouterr().err
