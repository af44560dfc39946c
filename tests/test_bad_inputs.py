"""Every bad input raises a ValueError naming the modality, what was expected and what came."""

import math

import pytest
import torch

from hcx_extend import OmniConfig, OmniForCausalLM, preset_config


def sensor_batch(values, lengths=None):
    lengths = torch.tensor([values.shape[1]] * values.shape[0]) if lengths is None else lengths
    return {"values": values, "lengths": lengths}


def ids_with(model, name, count):
    token = model.config.modality(name).token_id
    return torch.tensor([[1, 2] + [token] * count + [3]])


def test_unknown_modality_name(tiny_model, processor):
    with pytest.raises(ValueError, match=r"unknown modality 'lidar'; this model has \['audio', 'image', 'sensor', 'video'\]"):
        tiny_model(input_ids=torch.tensor([[1, 2]]), modality_inputs={"lidar": {"values": torch.zeros(1, 3, 6)}})
    with pytest.raises(ValueError, match="unknown modality 'lidar'"):
        processor("hi <lidar>", {"lidar": [torch.zeros(3, 6)]})


def test_placeholder_count_must_match_items(tiny_model, processor):
    with pytest.raises(ValueError, match=r"sensor: the text has 2 <sensor> marker\(s\) but 3 item\(s\) were given"):
        processor("<sensor> and <sensor>", {"sensor": [torch.zeros(4, 6)] * 3})
    with pytest.raises(ValueError, match=r"sensor: the text has more <sensor> markers than the 1 item\(s\) given"):
        processor("<sensor> and <sensor>", {"sensor": [torch.zeros(4, 6)]})
    with pytest.raises(ValueError, match=r"sensor: input_ids hold 5 placeholder token\(s\) \(id 128080\) but the 1 item\(s\) give 4"):
        tiny_model(input_ids=ids_with(tiny_model, "sensor", 5), modality_inputs={"sensor": sensor_batch(torch.zeros(1, 4, 6))})
    with pytest.raises(ValueError, match=r"sensor: input_ids hold 5 placeholder token\(s\) \(id 128080\) but no sensor inputs"):
        tiny_model(input_ids=ids_with(tiny_model, "sensor", 5))


def test_wrong_channel_count_or_rank(tiny_model, processor):
    with pytest.raises(ValueError, match=r"sensor: item 0 expected 6 channels, got 3 \(shape \(100, 3\)"):
        processor("<sensor>", {"sensor": [torch.zeros(100, 3)]})
    with pytest.raises(ValueError, match=r"sensor: item 0 expected a 2-D array laid out \(time, channels\), got shape \(100,\)"):
        processor("<sensor>", {"sensor": [torch.zeros(100)]})
    with pytest.raises(ValueError, match=r"sensor: expected 6 channels, got 3 \(shape \(1, 4, 3\)"):
        tiny_model(input_ids=ids_with(tiny_model, "sensor", 4), modality_inputs={"sensor": sensor_batch(torch.zeros(1, 4, 3))})
    with pytest.raises(ValueError, match=r"image: item 0 expected 3 channels, got 1"):
        processor("<image>", {"image": [torch.rand(1, 28, 28)]})
    with pytest.raises(ValueError, match=r"audio: item 0 expected 16 channels, got 8"):
        processor("<audio>", {"audio": [torch.zeros(8, 20)]})


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_nan_or_inf(tiny_model, processor, bad):
    recording = torch.zeros(10, 6)
    recording[3, 2] = bad
    with pytest.raises(ValueError, match=r"sensor: input holds 1 NaN/Inf value\(s\)"):
        processor("<sensor>", {"sensor": [recording]})
    with pytest.raises(ValueError, match=r"sensor: input holds 1 NaN/Inf value\(s\)"):
        tiny_model(input_ids=ids_with(tiny_model, "sensor", 10), modality_inputs={"sensor": sensor_batch(recording[None])})
    image = torch.rand(3, 28, 28)
    image[0, 0, 0] = bad
    with pytest.raises(ValueError, match=r"image: input holds 1 NaN/Inf"):
        processor("<image>", {"image": [image]})


def test_longer_than_the_maximum_is_rejected_not_truncated(tiny_model, processor):
    with pytest.raises(ValueError, match=r"sensor: item 0 has 513 steps, more than the maximum 512.*Nothing is truncated"):
        processor("<sensor>", {"sensor": [torch.zeros(513, 6)]})
    with pytest.raises(ValueError, match=r"sensor: item 0 has 513 steps, more than the maximum 512"):
        tiny_model(input_ids=ids_with(tiny_model, "sensor", 513), modality_inputs={"sensor": sensor_batch(torch.zeros(1, 513, 6))})
    with pytest.raises(ValueError, match=r"audio: item 0 has 65 frames, more than the maximum 64"):
        processor("<audio>", {"audio": [torch.zeros(16, 65)]})


def test_empty_items_are_rejected(processor):
    with pytest.raises(ValueError, match=r"sensor: item 0 is empty \(0 steps\)"):
        processor("<sensor>", {"sensor": [torch.zeros(0, 6)]})


def test_placeholder_id_outside_the_vocabulary():
    config = preset_config("tiny-hcx-omni")
    config.modality("sensor").token_id = 200_000
    with pytest.raises(ValueError, match=r"sensor: placeholder id 200000 is outside the LLM vocabulary \(size 128256\)"):
        with torch.device("meta"):
            OmniForCausalLM(config)


def test_input_ids_outside_the_vocabulary(tiny_model):
    with pytest.raises(ValueError, match=r"input_ids hold ids outside the vocabulary \[0, 128256\)"):
        tiny_model(input_ids=torch.tensor([[1, 128256]]))
