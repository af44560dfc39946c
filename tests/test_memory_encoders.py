"""Encoder kinds as the memory estimator uses them: example batches on the meta device, and settings errors.

An example batch must be the batch `collate` builds for items of the same size (same keys, shapes,
dtypes and metadata), with the data on meta, so that tracing ``encode_modality`` on it is tracing the
real thing.
"""

import math

import pytest
import torch

from hcx_extend.checkpoint.modality_file import check_modality
from hcx_extend.config import ModalityConfig
from hcx_extend.encoders import get_encoder
from hcx_extend.encoders.base import ModalityEncoder
from hcx_extend.model import OmniForCausalLM
from hcx_extend.presets import build_preset, preset_config

SIZES = {"image": 56, "audio": 20, "sensor": 23}

pytestmark = pytest.mark.usefixtures("one_thread")


def _item(modality, size):
    if modality.input.kind == "image":
        return torch.rand(3, size, size)
    if modality.input.kind == "audio":
        return torch.randn(modality.input.channels, size)
    return torch.randn(size, modality.input.channels)


@pytest.mark.parametrize("name", ["image", "audio", "sensor"])
def test_an_example_batch_is_the_collated_batch_with_its_data_on_meta(name):
    model = build_preset("tiny-hcx-omni", device="meta")
    modality = model.config.modality(name)
    encoder = get_encoder(modality.encoder["model_type"])
    size = SIZES[modality.input.kind]
    example = encoder.example_batch(modality, 2, size)
    collated = encoder.collate([_item(modality, size)] * 2, modality)
    assert example.keys() == collated.keys()
    for key, value in collated.items():
        assert (example[key].shape, example[key].dtype) == (value.shape, value.dtype), key
        if value.is_floating_point():
            assert example[key].device.type == "meta"  # data
        else:
            assert torch.equal(example[key], value)  # metadata (lengths, grids, frame masks), on the CPU
    assert encoder.token_counts(example, modality) == encoder.token_counts(collated, modality)


@pytest.mark.parametrize("compressor", [None, {"type": "mambamia", "chunk_size": 5}, {"type": "avgpool", "chunk_size": 4}])
def test_encode_modality_runs_on_meta_and_gives_the_real_token_counts(compressor):
    config = preset_config("tiny-hcx-omni")
    config.modalities["sensor"].compressor = compressor
    torch.manual_seed(0)
    real = OmniForCausalLM(config).eval()
    with torch.device("meta"):
        meta = OmniForCausalLM(config)
    for name in ("image", "audio", "sensor"):
        modality = real.config.modality(name)
        encoder = get_encoder(modality.encoder["model_type"])
        size = SIZES[modality.input.kind]
        with torch.no_grad():
            expected = real.encode_modality(name, encoder.collate([_item(modality, size)] * 2, modality))
        traced = meta.encode_modality(name, encoder.example_batch(modality, 2, size))
        assert [t.shape for t in traced] == [t.shape for t in expected]
        assert all(t.device.type == "meta" for t in traced)
    sensor_tokens = traced[0].shape[0]
    chunk = (compressor or {}).get("chunk_size", 1)
    assert sensor_tokens == math.ceil(SIZES["sensor"] / chunk)


def test_example_batches_respect_the_input_contract():
    model = build_preset("tiny-hcx-omni", device="meta")
    sensor = model.config.modality("sensor")
    with pytest.raises(ValueError, match="more than the maximum 512"):
        get_encoder("imu").example_batch(sensor, 1, 513)
    with pytest.raises(ValueError, match="at least one item"):
        get_encoder("imu").example_batch(sensor, 0, 10)


def test_a_kind_without_example_batches_says_so():
    class Plain(ModalityEncoder):
        build = output_size = default_contract = collate = token_counts = validate_batch = encode = None

    sensor = build_preset("tiny-hcx-omni", device="meta").config.modality("sensor")
    with pytest.raises(NotImplementedError, match="sensor: encoder kind Plain does not implement example_batch"):
        Plain.example_batch(Plain.__new__(Plain), sensor, 1, 10)


VISION = {"model_type": "qwen2_5_vl_vision", "depth": 1, "hidden_size": 16, "intermediate_size": 32, "num_heads": 2,
          "out_hidden_size": 24}
AUDIO = {"model_type": "qwen2_audio_encoder", "num_mel_bins": 8, "encoder_layers": 1, "encoder_attention_heads": 2,
         "encoder_ffn_dim": 32, "d_model": 16, "max_source_positions": 8}


@pytest.mark.parametrize("encoder, message", [
    ({**VISION, "depth": "two"}, "photo: encoder setting depth='two' is invalid"),
    ({**VISION, "patch_size": "14"}, "photo: encoder setting patch_size='14' is invalid"),
    ({**VISION, "hidden_size": -16}, "photo: encoder setting hidden_size must be an integer >= 1, got -16"),
    ({**VISION, "num_heads": 3}, "photo: encoder setting hidden_size=16 is not divisible by num_heads=3"),
    ({**AUDIO, "d_model": "16"}, "photo: encoder setting d_model='16' is invalid"),
    ({**AUDIO, "num_mel_bins": 0}, "photo: encoder setting num_mel_bins must be an integer >= 1, got 0"),
    ({**AUDIO, "encoder_attention_heads": 5}, "d_model=16 is not divisible by encoder_attention_heads=5"),
])
def test_bad_qwen_encoder_settings_name_the_modality_and_the_setting(encoder, message):
    with pytest.raises(ValueError, match=message):
        check_modality(ModalityConfig("photo", encoder=encoder))
