import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tiny_tokenizer import make_tokenizer
from transformers import AutoConfig, AutoTokenizer, HyperCLOVAXVisionV2Config, HyperCLOVAXVisionV2ForConditionalGeneration, LlamaConfig, LlamaForCausalLM

from hcx_extend import OmniForCausalLM, extend, load_checkpoint
from hcx_extend.checkpoint import read_source
from hcx_extend.cli import main
from hcx_extend.layout import iter_safetensors
from hcx_extend.presets import TINY_HCX_OMNI, imu_modality

IMU = dict(in_channels=6, hidden_size=16, num_layers=1, num_heads=2, ffn_size=32, dropout=0.0, output_size=24)


def read_all(folder):
    return dict(iter_safetensors(folder))


@torch.no_grad()
def test_save_then_load_reproduces_logits_exactly(tiny_model, mixed_batch, tmp_path):
    tiny_model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists() and (tmp_path / "config.json").exists()
    loaded = OmniForCausalLM.from_pretrained(tmp_path)
    assert loaded.config.to_dict()["modalities"] == tiny_model.config.to_dict()["modalities"]
    assert torch.equal(loaded(**mixed_batch).logits, tiny_model(**mixed_batch).logits)


@torch.no_grad()
def test_sharded_save_round_trips(tiny_model, mixed_batch, tmp_path):
    tiny_model.save_pretrained(tmp_path, max_shard_size="10MB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) >= 3 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    loaded, report = load_checkpoint(tmp_path)
    assert not report.missing and not report.unexpected and not report.carried
    assert torch.equal(loaded(**mixed_batch).logits, tiny_model(**mixed_batch).logits)
    # Saving again unsharded removes the old shards.
    loaded.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.glob("*.safetensors")) == ["model.safetensors"]


def _tiny_llama(vocab=300):
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    return LlamaForCausalLM(config)


@pytest.mark.parametrize("vocab", [259, 300])
def test_extending_a_plain_causal_lm_keeps_its_weights_bit_identical(tmp_path, tokenizer, vocab):
    llm = _tiny_llama(vocab)
    llm.save_pretrained(tmp_path / "llm")
    tokenizer.save_pretrained(tmp_path / "llm")
    original = {k: v.clone() for k, v in llm.state_dict().items()}

    result = extend(tmp_path / "llm", [imu_modality("imu", **IMU)], output_dir=tmp_path / "out")
    assert result.source_kind == "causal_lm"
    imu = result.model.config.modality("imu")
    # The saved tokenizer lacked the placeholder: it was added after the existing 259 tokens.
    assert imu.token_id == len(tokenizer) == result.tokenizer.convert_tokens_to_ids("<|IMU_PAD|>")
    # A full vocabulary grows by one row; one with spare rows keeps its size.
    assert result.model.get_input_embeddings().num_embeddings == max(vocab, 260)
    reloaded = OmniForCausalLM.from_pretrained(tmp_path / "out")
    for model in (result.model, reloaded):
        state = model.state_dict()
        for key, tensor in original.items():
            extended = state["model.language_model." + key]
            assert torch.equal(extended[: tensor.shape[0]], tensor), key
        assert model.get_output_embeddings().weight is model.get_input_embeddings().weight  # still tied
    assert {k.split(".")[1] for k in read_all(tmp_path / "out")} == {"language_model", "imu_model", "imu_projector"}
    assert "imu_model" in result.report.initialised and "imu_projector" in result.report.initialised


def _tiny_vision_v2():
    torch.manual_seed(0)
    config = HyperCLOVAXVisionV2Config(
        text_config={k: v for k, v in TINY_HCX_OMNI["text_config"].items() if k != "tie_word_embeddings"},
        vision_config={k: v for k, v in TINY_HCX_OMNI["vision_config"].items() if k != "model_type"},
    )
    return HyperCLOVAXVisionV2ForConditionalGeneration(config)


def _v2_key_to_hcx(key):
    """The mapping the test expects, written out independently of the library's."""
    if key == "lm_head.weight":
        return "model.language_model.lm_head.weight"
    for projector in ("model.projector.", "model.vision_projector."):
        if key.startswith(projector):
            return "model.mm_projector." + key[len(projector):]
    if key.startswith("model.language_model."):
        return "model.language_model.model." + key[len("model.language_model."):]
    return key


def test_extending_a_transformers_vision_v2_checkpoint_keeps_its_weights(tmp_path, tokenizer):
    v2 = _tiny_vision_v2()
    v2.save_pretrained(tmp_path / "v2")
    saved = read_all(tmp_path / "v2")
    # transformers 5 writes the projector in the hub's spelling but the LLM without the inner ".model.".
    assert "model.vision_projector.weight" in saved
    assert any(k.startswith("model.language_model.layers.") for k in saved)

    # transformers saves no tokenizer: the LLM's is passed in (without it, see the test below).
    result = extend(tmp_path / "v2", [imu_modality("sensor", **IMU)], tokenizer=tokenizer, output_dir=tmp_path / "out")
    assert result.source_kind == "vision_v2"
    assert result.model.config.modality("image").projector == {"type": "linear"}
    state = result.model.state_dict()
    for key, tensor in saved.items():
        assert torch.equal(state[_v2_key_to_hcx(key)], tensor), key
    written = read_all(tmp_path / "out")
    assert "model.mm_projector.weight" in written and "model.language_model.model.layers.0.mlp.up_proj.weight" in written


def _vision_v2_saved_by_transformers(folder, **config):
    """A HyperCLOVAXVisionV2 checkpoint as transformers' own class saves it: no tokenizer files."""
    torch.manual_seed(0)
    v2 = HyperCLOVAXVisionV2ForConditionalGeneration(HyperCLOVAXVisionV2Config(
        text_config={k: v for k, v in TINY_HCX_OMNI["text_config"].items() if k != "tie_word_embeddings"},
        vision_config={k: v for k, v in TINY_HCX_OMNI["vision_config"].items() if k != "model_type"}, **config))
    v2.save_pretrained(folder)
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "generation_config.json", "model.safetensors"]
    return folder


def test_a_vision_v2_checkpoint_without_a_tokenizer_is_an_error_that_names_the_tokenizer_option(tmp_path, capsys):
    source = _vision_v2_saved_by_transformers(tmp_path / "v2", bos_token_id=1)
    # transformers makes up a GPT-2 tokenizer holding <|endoftext|> alone for this folder; adding a
    # placeholder to it gave id 1, the config's BOS. It is no tokenizer.
    described = read_source(source)
    assert described.tokenizer is None
    assert described.special_ids == {1: "config.json bos_token_id", 2: "config.json text_config eos_token_id"}
    with pytest.raises(ValueError, match="has no usable tokenizer .* `hcx-extend extend SOURCE --tokenizer DIR`"):
        extend(source, [imu_modality("imu", **IMU)])
    assert main(["extend", str(source), "--add-imu", "imu", "--output", str(tmp_path / "out")]) == 2
    assert "imu: " + str(source) + " has no usable tokenizer" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_a_supplied_tokenizer_gives_the_placeholder_an_id_no_special_token_has(tmp_path, tokenizer, capsys):
    source = _vision_v2_saved_by_transformers(tmp_path / "v2", bos_token_id=1)
    tokenizer.save_pretrained(tmp_path / "tokenizer")
    assert main(["extend", str(source), "--add-imu", "imu", "--tokenizer", str(tmp_path / "tokenizer"),
                 "--output", str(tmp_path / "out")]) == 0
    assert "token <|IMU_PAD|> = 259" in capsys.readouterr().out
    model = OmniForCausalLM.from_pretrained(tmp_path / "out")
    specials = {1, 2, tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id}
    assert specials == {1, 2, 256, 257, 258}
    assert model.config.modality("imu").token_id == 259 and 259 not in specials
    assert AutoTokenizer.from_pretrained(tmp_path / "out").convert_tokens_to_ids("<|IMU_PAD|>") == 259
    with torch.no_grad():  # text that starts with BOS holds no placeholder (it did when the placeholder was 1)
        logits = model(input_ids=torch.tensor([[1, 72, 105, 2]])).logits
    assert logits.shape == (1, 4, model.get_input_embeddings().num_embeddings)


def test_no_placeholder_takes_an_id_the_configs_declare_special(tmp_path, tokenizer):
    # config.json declares BOS 259: exactly the id the tokenizer hands the next token it adds.
    source = _vision_v2_saved_by_transformers(tmp_path / "bos", bos_token_id=259)
    with pytest.raises(ValueError, match="the tokenizer gave the new placeholder '<\\|IMU_PAD\\|>' id 259, which is "
                                         "config.json bos_token_id; this tokenizer does not match the checkpoint"):
        extend(source, [imu_modality("imu", **IMU)], tokenizer=tokenizer)
    # generation_config.json lists a second EOS id; an explicit token_id on it is refused too.
    source = _vision_v2_saved_by_transformers(tmp_path / "eos")
    generation = json.loads((source / "generation_config.json").read_text())
    (source / "generation_config.json").write_text(json.dumps({**generation, "eos_token_id": [2, 300]}))
    assert read_source(source).special_ids[300] == "generation_config.json eos_token_id"
    with pytest.raises(ValueError, match="imu: placeholder id 300 is generation_config.json eos_token_id"):
        extend(source, [imu_modality("imu", token_id=300, **IMU)], tokenizer=make_tokenizer())
    assert extend(source, [imu_modality("imu", token_id=301, **IMU)],
                  tokenizer=make_tokenizer()).model.config.modality("imu").token_id == 301
    (source / "generation_config.json").write_text('{"eos_token_id": [2, ')  # truncated
    with pytest.raises(ValueError, match="generation_config.json: not valid JSON"):
        read_source(source)


def test_extending_a_hub_spelled_vision_v2_checkpoint(tmp_path, tokenizer):
    """The hub spelling: model.vision_projector.*, model.language_model.model.*, model.language_model.lm_head.*."""
    v2 = _tiny_vision_v2()
    hub = {}
    for key, tensor in v2.state_dict().items():
        if key.startswith("model.projector."):
            key = "model.vision_projector." + key[len("model.projector."):]
        elif key == "lm_head.weight":
            key = "model.language_model.lm_head.weight"
        elif key.startswith("model.language_model."):
            key = "model.language_model.model." + key[len("model.language_model."):]
        hub[key] = tensor.clone().contiguous()
    folder = tmp_path / "hub"
    folder.mkdir()
    del hub["model.language_model.lm_head.weight"]  # tied to the embeddings in this config
    save_file(hub, folder / "model.safetensors")
    config = v2.config.to_dict()
    config["model_type"] = "vlm"
    (folder / "config.json").write_text(json.dumps(config, default=str))

    result = extend(folder, [imu_modality("sensor", **IMU)], tokenizer=tokenizer)
    state = result.model.state_dict()
    for key, tensor in hub.items():
        target = key.replace("model.vision_projector.", "model.mm_projector.")
        assert torch.equal(state[target], tensor), key


def test_unbuilt_hcx_tensors_survive_extend_and_save_bit_identical(tiny_model, tokenizer, tmp_path):
    # An Omni-hub-style checkpoint: flat config fields and weights the model does not build.
    tiny_model.save_pretrained(tmp_path / "omni")
    weights = read_all(tmp_path / "omni")
    extra = {
        "model.discrete_vision_model.encoder.proj.weight": torch.randn(7, 5),
        "model.discrete_audio_model.codebook": torch.randn(11).to(torch.bfloat16),
        "model.video_audio_compressor.query_token": torch.randn(16),
    }
    save_file({**{k: v for k, v in weights.items() if not k.startswith("model.sensor")}, **extra},
              tmp_path / "omni" / "model.safetensors")
    raw = json.loads((tmp_path / "omni" / "config.json").read_text())
    flat = {"model_type": "vlm", "text_config": raw["text_config"], "vision_config": TINY_HCX_OMNI["vision_config"],
            "audio_config": TINY_HCX_OMNI["audio_config"], "mm_projector_type": "mlp", "audio_projector_type": "mlp",
            "audio_start_id": 128071, "video_audio_compressor_type": "mambamia", "img_start_id": 128060,
            "video_start_id": 128061}
    (tmp_path / "omni" / "config.json").write_text(json.dumps(flat))

    result = extend(tmp_path / "omni", [imu_modality("imu", token_id=128081, **IMU)], tokenizer=tokenizer,
                    output_dir=tmp_path / "out")
    assert result.source_kind == "omni"
    assert sorted(result.report.carried) == ["discrete_audio_model", "discrete_vision_model", "video_audio_compressor"]
    written = read_all(tmp_path / "out")
    for key, tensor in extra.items():
        assert written[key].dtype == tensor.dtype and torch.equal(written[key], tensor), key
    for key, tensor in weights.items():
        if not key.startswith("model.sensor"):
            assert torch.equal(written[key], tensor), key
    # And the carried tensors survive another load-save cycle.
    again = OmniForCausalLM.from_pretrained(tmp_path / "out")
    again.save_pretrained(tmp_path / "again")
    assert all(torch.equal(read_all(tmp_path / "again")[k], v) for k, v in extra.items())


def test_loading_reports_and_rejects_mismatched_checkpoints(tiny_model, tmp_path):
    tiny_model.save_pretrained(tmp_path)
    weights = read_all(tmp_path)
    weights["model.language_model.model.layers.7.mlp.up_proj.weight"] = torch.zeros(2, 2)
    del weights["model.sensor_model.layers.0.fc1.weight"]
    save_file(weights, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match="language_model: model.language_model.model.layers.7"):
        load_checkpoint(tmp_path)
    model, report = load_checkpoint(tmp_path, strict=False)
    assert report.unexpected == {"language_model": ["model.language_model.model.layers.7.mlp.up_proj.weight"]}
    assert report.missing == {"sensor_model": ["model.sensor_model.layers.0.fc1.weight"]}
    assert "sensor_model" in report.initialised
    # Everything that was present loaded unchanged.
    assert torch.equal(model.state_dict()["model.sensor_model.layers.0.fc2.weight"], weights["model.sensor_model.layers.0.fc2.weight"])


def test_pickled_weights_are_refused(tmp_path, tiny_model):
    tiny_model.save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").rename(tmp_path / "pytorch_model.bin")
    with pytest.raises(FileNotFoundError, match="pickled weights are not read"):
        load_checkpoint(tmp_path)
