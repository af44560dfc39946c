"""One loader for every checkpoint kind: it loads correctly or refuses with a message that says what to do."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from hcx_extend import OmniForCausalLM, OmniProcessor, extend, imu_modality, load_model
from hcx_extend.cli import main
from hcx_extend.data.examples import Example
from hcx_extend.runs import save_run
from hcx_extend.training import TrainConfig, Trainer

IMU = dict(hidden_size=16, num_layers=1, num_heads=2, ffn_size=32, output_size=24, stride=2)


@pytest.fixture
def llm_folder(tmp_path, tokenizer):
    torch.manual_seed(0)
    llm = LlamaForCausalLM(LlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True))
    llm.save_pretrained(tmp_path / "llm")
    tokenizer.save_pretrained(tmp_path / "llm")
    return tmp_path / "llm"


def trained_run(llm_folder, folder, strategy="new-encoder", **imu):
    """Train a tiny imu modality for two steps and save the run checkpoint; returns (model, checkpoint)."""
    torch.manual_seed(0)
    extended = extend(llm_folder, [imu_modality("imu", **{**IMU, **imu})])
    model, tokenizer = extended.model, extended.tokenizer
    processor = OmniProcessor(tokenizer, model.config)
    generator = torch.Generator().manual_seed(0)
    examples = [Example([{"role": "user", "content": "<imu> which?"}, {"role": "assistant", "content": "up" if i % 2 else "no"}],
                        {"imu": [torch.randn(10 + i, 6, generator=generator)]}) for i in range(4)]
    trainer = Trainer(model, processor, examples, TrainConfig(strategy=strategy, epochs=1, batch_size=2,
                                                              learning_rate=1e-2, progress=False), log=lambda line: None)
    trainer.train()
    checkpoint = save_run(model, folder, base=llm_folder, components=trainer.components, tokenizer=tokenizer,
                          strategy=strategy)
    return model, tokenizer, checkpoint


def logits(model, batch):
    with torch.no_grad():
        return model.eval()(**batch).logits


def batch_for(model, tokenizer):
    processor = OmniProcessor(tokenizer, model.config)
    return processor([[{"role": "user", "content": "<imu> which?"}]], {"imu": [torch.ones(9, 6)]})


# projector: the new encoder is frozen at its random initialisation, which the base does not hold, so the
# checkpoint must carry it as well.
@pytest.mark.parametrize("strategy", ["new-encoder", "lora-all", "projector"])
def test_a_run_checkpoint_loads_exactly_and_from_pretrained_refuses_it(llm_folder, tmp_path, strategy):
    model, tokenizer, checkpoint = trained_run(llm_folder, tmp_path / "run", strategy)
    loaded, loaded_tokenizer = load_model(checkpoint)
    batch = batch_for(model, tokenizer)
    assert torch.equal(logits(loaded, batch), logits(model, batch))
    assert loaded_tokenizer.get_vocab() == tokenizer.get_vocab()
    # The run holds only what was trained: from_pretrained would need its base, so it says where to go.
    with pytest.raises(ValueError, match=r"training run's checkpoint.*hcx_extend.load_model"):
        OmniForCausalLM.from_pretrained(checkpoint)
    # The run is small: no copy of the LLM was written.
    assert (checkpoint / "trainable.safetensors").stat().st_size < sum(
        f.stat().st_size for f in llm_folder.glob("*.safetensors"))


@torch.no_grad()
def test_full_and_plain_folders_load_or_refuse_clearly(llm_folder, tmp_path):
    # A plain causal LM: load_model makes an omni model without modalities; from_pretrained refuses.
    plain, tokenizer = load_model(llm_folder)
    assert plain.config.modalities == {} and len(tokenizer) == 259
    reference = LlamaForCausalLM.from_pretrained(llm_folder)
    ids = torch.tensor([[1, 2, 3, 4]])
    assert torch.equal(plain(input_ids=ids).logits, reference(input_ids=ids).logits)
    with pytest.raises(ValueError, match="not an omni checkpoint"):
        OmniForCausalLM.from_pretrained(llm_folder)
    # A full HCX folder (what extend and merge write) loads with either loader.
    extended = extend(llm_folder, [imu_modality("imu", **IMU)], output_dir=tmp_path / "full")
    batch = batch_for(extended.model, extended.tokenizer)
    for model in (load_model(tmp_path / "full")[0], OmniForCausalLM.from_pretrained(tmp_path / "full")):
        assert torch.equal(model(**batch).logits, extended.model(**batch).logits)


def test_a_component_missing_from_a_full_folder_is_an_error_not_random_weights(llm_folder, tmp_path):
    extend(llm_folder, [imu_modality("imu", **IMU)], output_dir=tmp_path / "full")
    # Drop the projector's tensors from the checkpoint.
    from safetensors.torch import load_file, save_file

    tensors = load_file(tmp_path / "full" / "model.safetensors")
    save_file({k: v for k, v in tensors.items() if not k.startswith("model.imu_projector.")},
              tmp_path / "full" / "model.safetensors")
    with pytest.raises(ValueError, match="component imu_projector has no tensors"):
        load_model(tmp_path / "full")


def test_a_moved_run_finds_its_base_or_says_how_to_point_to_it(llm_folder, tmp_path):
    model, tokenizer, checkpoint = trained_run(llm_folder, tmp_path / "project" / "run")
    batch = batch_for(model, tokenizer)
    expected = logits(model, batch)
    run = json.loads((checkpoint / "run.json").read_text())
    assert run["base"]["name"] == "llm" and run["base"]["relative"] == "../../llm"
    # Moving the run alone: the absolute path still finds the base.
    shutil.move(tmp_path / "project", tmp_path / "elsewhere")
    assert torch.equal(logits(load_model(tmp_path / "elsewhere" / "run")[0], batch), expected)
    # Moving the run and its base together: the relative path finds it.
    (tmp_path / "disk2").mkdir()
    shutil.move(tmp_path / "elsewhere", tmp_path / "disk2" / "project")
    shutil.move(llm_folder, tmp_path / "disk2" / "llm")
    moved = tmp_path / "disk2" / "project" / "run"
    assert torch.equal(logits(load_model(moved)[0], batch), expected)
    # The base gone from both places: a clear error naming it and how to point to it; base= fixes it.
    shutil.move(tmp_path / "disk2" / "llm", tmp_path / "archive")
    with pytest.raises(FileNotFoundError, match=r"trained from base model 'llm'.*load_model\(path, base=\.\.\.\) or --base PATH"):
        load_model(moved)
    assert torch.equal(logits(load_model(moved, base=tmp_path / "archive")[0], batch), expected)


def test_train_adds_a_modality_from_a_json_file_without_copying_the_llm(llm_folder, tmp_path, capsys):
    """A 12-channel modality called `vowel`, described in a file, trained and then asked about."""
    spec = {"name": "vowel", "encoder": {"model_type": "imu", "in_channels": 12, **IMU},
            "projector": {"type": "mlp", "activation": "silu"},
            "input": {"kind": "sensor", "channels": 12, "max_length": 64, "sample_rate": 100}}
    (tmp_path / "vowel.json").write_text(json.dumps(spec))
    data = tmp_path / "data"
    data.mkdir()
    rng = np.random.default_rng(0)
    lines = []
    for i in range(4):
        np.save(data / f"v{i}.npy", rng.normal(size=(20, 12)).astype(np.float32))
        lines.append(json.dumps({"messages": [{"role": "user", "content": "<vowel> which vowel?"},
                                              {"role": "assistant", "content": "a" if i % 2 else "o"}],
                                 "inputs": {"vowel": [f"v{i}.npy"]}}))
    (data / "train.jsonl").write_text("\n".join(lines) + "\n")
    assert main(["train", "--llm", str(llm_folder), "--modality-file", str(tmp_path / "vowel.json"), "--data",
                 str(data / "train.jsonl"), "--epochs", "1", "--batch-size", "2", "--output", str(tmp_path / "run")]) == 0
    checkpoint = tmp_path / "run" / "checkpoint"
    written = sum(f.stat().st_size for f in (tmp_path / "run").rglob("*.safetensors"))
    assert written < sum(f.stat().st_size for f in llm_folder.glob("*.safetensors"))
    model, _ = load_model(checkpoint)
    assert model.config.modality("vowel").input.channels == 12
    capsys.readouterr()
    assert main(["chat", str(checkpoint), "--input", f"vowel={data / 'v0.npy'}", "--rate", "vowel=100",
                 "--max-new-tokens", "2", "which vowel?"]) == 0
    assert capsys.readouterr().err == ""  # a 12-channel modality named vowel is read and answered
    assert main(["chat", str(checkpoint), "--input", f"vowel={data / 'v0.npy'}", "--rate", "0", "which?"]) == 2
    assert "--rate must be a positive number" in capsys.readouterr().err


def test_the_example_modality_file_extends_a_model_that_reads_12_lead_ecg(llm_folder, tmp_path):
    """examples/modalities/ecg12.json: 12 leads at 500 Hz, stride 10, MambaMia chunks of 25."""
    example = Path(__file__).resolve().parents[1] / "examples" / "modalities" / "ecg12.json"
    assert main(["extend", str(llm_folder), "--modality-file", str(example), "--output", str(tmp_path / "ecg")]) == 0
    model, tokenizer = load_model(tmp_path / "ecg")
    modality = model.config.modality("ecg")
    assert modality.input.channel_names[:3] == ["I", "II", "III"] and modality.input.sample_rate == 500
    # 10 s at 500 Hz: 5000 steps -> 500 encoder tokens (stride 10) -> 20 tokens for the LLM (chunks of 25).
    processor = OmniProcessor(tokenizer, model.config)
    ten_seconds = np.random.default_rng(0).normal(size=(5000, 12)).astype(np.float32)
    batch = processor([[{"role": "user", "content": "<ecg> Rhythm?"}]], {"ecg": [ten_seconds]})
    assert int((batch["input_ids"] == modality.token_id).sum()) == 20
    with torch.no_grad():
        logits = model(**batch).logits
    assert logits.shape[:2] == batch["input_ids"].shape and torch.isfinite(logits).all()


def test_placeholders_never_collide_with_existing_tokens(llm_folder, tmp_path, tokenizer):
    # No tokenizer next to the weights: an error saying what to provide, not a placeholder on id 1.
    (llm_folder / "tokenizer.json").unlink()
    (llm_folder / "tokenizer_config.json").unlink()
    with pytest.raises(ValueError, match="has no usable tokenizer .* cannot be added; pass the LLM's tokenizer: "
                                         "`hcx-extend extend SOURCE --tokenizer DIR`"):
        extend(llm_folder, [imu_modality("imu", **IMU)])
    # The tokenizer's own tokens cannot be reused as placeholders, by string or by id.
    eos = tokenizer.eos_token
    with pytest.raises(ValueError, match="is already the tokenizer's EOS token 256"):
        modality = imu_modality("imu", **IMU)
        modality.token = eos
        extend(llm_folder, [modality], tokenizer=tokenizer)
    with pytest.raises(ValueError, match="is already the tokenizer's ordinary token"):
        modality = imu_modality("imu", **IMU)
        modality.token = "a"
        extend(llm_folder, [modality], tokenizer=tokenizer)
    with pytest.raises(ValueError, match="placeholder id 65 is the tokenizer's token"):
        extend(llm_folder, [imu_modality("imu", token_id=65, **IMU)], tokenizer=tokenizer)
    # With the tokenizer given, a new special token is added after the existing ones.
    extended = extend(llm_folder, [imu_modality("imu", **IMU)], tokenizer=tokenizer)
    assert extended.model.config.modality("imu").token_id == 259
    assert tokenizer.convert_ids_to_tokens(259) == "<|IMU_PAD|>"


def test_a_dtype_applies_to_weights_not_to_rotary_tables(llm_folder, tmp_path):
    """transformers keeps rotary inverse frequencies in float32; casting them with the weights would
    round them and change the logits of every position."""
    extend(llm_folder, [imu_modality("imu", **IMU)], output_dir=tmp_path / "full")
    model = OmniForCausalLM.from_pretrained(tmp_path / "full", dtype="bf16")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    rotary = [b for n, b in model.named_buffers() if "inv_freq" in n]
    assert rotary and all(b.dtype == torch.float32 for b in rotary)
