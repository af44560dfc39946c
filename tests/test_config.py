import pytest

from hcx_extend import ModalityConfig, OmniConfig, preset_config
from hcx_extend.checkpoint.modality_file import check_modality
from hcx_extend.config import HCX_IMAGE_TOKEN_ID, HCX_SENSOR_TOKEN_ID, HCX_VIDEO_TOKEN_ID

TEXT = {"model_type": "hyperclovax", "vocab_size": 130_000, "hidden_size": 32, "intermediate_size": 64,
        "num_hidden_layers": 1, "num_attention_heads": 2}
VISION = {"model_type": "qwen2_5_vl_vision", "depth": 1, "hidden_size": 16, "intermediate_size": 32, "num_heads": 2,
          "out_hidden_size": 24}
AUDIO = {"model_type": "qwen2_audio_encoder", "num_mel_bins": 8, "encoder_layers": 1, "encoder_attention_heads": 2,
         "encoder_ffn_dim": 32, "d_model": 16, "max_source_positions": 8}


def test_omni_hub_flat_fields_become_modalities():
    config = OmniConfig(model_type="vlm", text_config=TEXT, vision_config=VISION, audio_config=AUDIO,
                        mm_projector_type="linear", audio_projector_type="mlp", img_start_id=128060,
                        video_start_id=128061, anyres=False)
    assert sorted(config.modalities) == ["audio", "image", "video"]
    image, video, audio = config.modality("image"), config.modality("video"), config.modality("audio")
    assert (image.encoder_module, image.projector_module, image.token_id) == ("vision_model", "mm_projector", 128060)
    assert (video.encoder_module, video.projector_module, video.token_id) == ("vision_model", "mm_projector", 128061)
    assert image.projector == {"type": "linear"} and audio.projector == {"type": "mlp"}
    assert (audio.encoder_module, audio.projector_module) == ("audio_model", "audio_projector")
    # The input contract comes from the encoder's settings once the modality is checked (or built).
    assert audio.input is None
    assert check_modality(audio).input.channels == 8 and audio.input.max_length == 16
    assert config.anyres is False  # unknown hub fields are kept
    assert config.model_type == "hcx_omni"


def test_guide_sensor_fields_become_a_sensor_modality():
    config = OmniConfig(text_config=TEXT, sensor_config={"in_channels": 6, "hidden_size": 16, "num_heads": 2},
                        sensor_model_name_or_path="/weights/imu", sensor_projector_type="mlp", sensor_start_id=128080)
    sensor = config.modality("sensor")
    assert sensor.encoder["model_type"] == "imu"
    assert (sensor.encoder_module, sensor.projector_module) == ("sensor_model", "sensor_projector")
    assert sensor.token_id == 128080 and sensor.pretrained == "/weights/imu"
    assert check_modality(sensor).input.kind == "sensor" and sensor.input.channels == 6


def test_default_token_ids_follow_hcx():
    assert ModalityConfig("image", encoder=VISION).token_id == HCX_IMAGE_TOKEN_ID == 128060
    assert ModalityConfig("video", encoder=VISION).token_id == HCX_VIDEO_TOKEN_ID == 128061
    assert ModalityConfig("sensor", encoder={"model_type": "imu"}).token_id == HCX_SENSOR_TOKEN_ID == 128080
    imu = ModalityConfig("imu", encoder={"model_type": "imu"})
    assert imu.token_id is None and imu.token == "<|IMU_PAD|>" and imu.marker == "<imu>"
    assert (imu.encoder_module, imu.projector_module) == ("imu_model", "imu_projector")


def test_round_trip_through_dict():
    config = preset_config("tiny-hcx-omni")
    again = OmniConfig(**config.to_dict())
    assert again.to_dict() == config.to_dict()
    assert again.modality("sensor") == config.modality("sensor")


def test_bad_configs_raise_clear_errors():
    with pytest.raises(ValueError, match="lower-case identifier"):
        ModalityConfig("IMU-1", encoder={"model_type": "imu"})
    with pytest.raises(ValueError, match="unknown encoder type 'lidar_net'"):
        check_modality(ModalityConfig("lidar", encoder={"model_type": "lidar_net"}))
    with pytest.raises(ValueError, match="already used by"):
        OmniConfig(text_config=TEXT, modalities={
            "a": {"encoder": {"model_type": "imu"}, "token_id": 5},
            "b": {"encoder": {"model_type": "imu"}, "token_id": 5}})
    with pytest.raises(ValueError, match="share module model.x_model"):
        OmniConfig(text_config=TEXT, modalities={
            "a": {"encoder": {"model_type": "imu", "hidden_size": 16, "num_heads": 2}, "encoder_module": "x_model"},
            "b": {"encoder": {"model_type": "imu"}, "encoder_module": "x_model"}})
    with pytest.raises(ValueError, match="unknown modality 'lidar'"):
        preset_config("tiny-hcx-omni").modality("lidar")
    with pytest.raises(ValueError, match="unknown modality fields"):
        OmniConfig(text_config=TEXT, modalities={"a": {"encoder": {"model_type": "imu"}, "chanels": 3}})


def test_llm_config_fields_are_checked_where_the_config_is_made():
    with pytest.raises(ValueError, match=r"text_config: hidden_size must be an integer >= 1, got '32'"):
        OmniConfig(text_config={**TEXT, "hidden_size": "32"})
    with pytest.raises(ValueError, match=r"text_config: num_attention_heads must be an integer >= 1, got 0"):
        OmniConfig(text_config={**TEXT, "num_attention_heads": 0})
    with pytest.raises(ValueError, match=r"text_config: .*rms_norm_eps"):  # transformers' own type check, wrapped
        OmniConfig(text_config={**TEXT, "rms_norm_eps": "small"})
    with pytest.raises(ValueError, match=r"text_config must be an object of the LLM's config fields, got 'x'"):
        OmniConfig(text_config="x")
    with pytest.raises(ValueError, match=r"dtype must name a torch dtype .* got 'float99'"):
        OmniConfig(text_config=TEXT, dtype="float99")
    with pytest.raises(ValueError, match=r"imu: a modality must be an object of ModalityConfig fields"):
        OmniConfig(text_config=TEXT, modalities={"imu": None})
    assert OmniConfig(text_config=TEXT).text_config.hidden_size == 32
