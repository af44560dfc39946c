"""The training ladder, specified once: what each strategy plans (from the config alone) and what
`apply_strategy` then leaves trainable in a real model."""

import pytest

from hcx_extend import align_tokens, build_preset, preset_config
from hcx_extend.ladder import STRATEGIES, LoraSpec, get_strategy, plan_strategy
from hcx_extend.training import apply_strategy
from hcx_extend.training.report import trainable_table


def pretrained(tokenizer):
    """The tiny preset, treated as if every weight had been loaded from a pretrained checkpoint."""
    model = build_preset("tiny-hcx-omni", seed=0).eval()
    model.fresh_components = set()
    align_tokens(model, tokenizer)
    return model


def trainable(model):
    return {n for n, p in model.named_parameters() if p.requires_grad}


# What each strategy trains for the sensor modality of a pretrained model, as a predicate on parameter names.
EXPECTED = {
    "projector": lambda n: n.startswith("model.sensor_projector."),
    "new-encoder": lambda n: n.startswith(("model.sensor_model.", "model.sensor_projector.")),
    "lora-encoder": lambda n: n.startswith("model.sensor_projector.") or (
        n.startswith("model.sensor_model.") and "lora_" in n and "self_attn" in n),
    "lora-all": lambda n: n.startswith("model.sensor_projector.") or (
        n.startswith(("model.sensor_model.", "model.language_model.")) and "lora_" in n and "self_attn" in n),
    "full": lambda n: n.startswith(("model.sensor_model.", "model.sensor_projector.", "model.language_model.")),
}


def test_plans_follow_the_ladder():
    config = preset_config("tiny-hcx-omni")
    spec = LoraSpec()
    assert plan_strategy(config, "projector", ["sensor"]).full == ("sensor_projector",)
    assert plan_strategy(config, "new-encoder", ["sensor"]).full == ("sensor_model", "sensor_projector")
    lora_encoder = plan_strategy(config, "lora-encoder", ["sensor"])
    assert lora_encoder.adapted == (("sensor_model", spec),) and lora_encoder.full == ("sensor_projector",)
    lora_all = plan_strategy(config, "lora-all", ["sensor"])
    assert lora_all.adapted == (("sensor_model", spec), ("language_model", spec))
    qlora = plan_strategy(config, "qlora", ["sensor"])
    assert qlora.quantize_llm == "nf4" and qlora.adapted == lora_all.adapted
    assert plan_strategy(config, "full", ["sensor"]).full == ("sensor_model", "sensor_projector", "language_model")
    # A fresh encoder has nothing pretrained to adapt: the LoRA strategies train it in full.
    fresh = plan_strategy(config, "lora-all", ["sensor"], fresh={"sensor_model", "sensor_projector"})
    assert fresh.adapted == (("language_model", spec),) and fresh.full == ("sensor_model", "sensor_projector")
    assert fresh.components == ["language_model", "sensor_model", "sensor_projector"]
    # Default targets: every modality; shared modules (image and video share the vision tower) appear once.
    assert plan_strategy(config, "projector").full == ("mm_projector", "audio_projector", "sensor_projector")


def test_unknown_names_are_errors():
    with pytest.raises(ValueError, match="unknown strategy 'lora-everything'"):
        get_strategy("lora-everything")
    with pytest.raises(ValueError, match="unknown modality 'lidar'"):
        plan_strategy(preset_config("tiny-hcx-omni"), "projector", ["lidar"])


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_apply_strategy_executes_the_plan(tokenizer, name):
    model = pretrained(tokenizer)
    plan = apply_strategy(model, STRATEGIES[name], ["sensor"])
    assert plan == plan_strategy(model.config, name, ["sensor"], fresh=set())
    names = {n for n, _ in model.named_parameters()}
    assert trainable(model) == {n for n in names if EXPECTED[name](n)}
    table = {row["component"]: row for row in trainable_table(model)}
    assert table["vision_model"]["trained"] == 0 and table["audio_model"]["trained"] == 0


def test_lora_adapts_every_attention_layer_once(tokenizer):
    model = pretrained(tokenizer)
    apply_strategy(model, STRATEGIES["lora-encoder"], ["sensor"])
    # 2 layers x q/k/v/o x (A, B), rank 16.
    assert len([n for n in trainable(model) if "lora_" in n]) == 2 * 4 * 2
    with pytest.raises(ValueError, match="already has adapters"):
        apply_strategy(model, STRATEGIES["lora-encoder"], ["sensor"])


def test_a_freshly_initialised_encoder_is_trained_in_full_under_lora(tokenizer):
    model = pretrained(tokenizer)
    model.fresh_components = {"sensor_model", "sensor_projector"}  # as after extend() added the sensor
    assert apply_strategy(model, STRATEGIES["lora-all"], ["sensor"]).components == [
        "language_model", "sensor_model", "sensor_projector"]
    names = trainable(model)
    assert {n for n in names if n.startswith("model.sensor_model.")} == {
        n for n, _ in model.named_parameters() if n.startswith("model.sensor_model.")}
    assert all("lora_" in n for n in names if n.startswith("model.language_model."))
