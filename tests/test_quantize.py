"""Quantised loading on the CPU: NF4 (double quantisation) and int8 for the LLM's Linear layers.

Closeness is measured on a fixed prompt set (4 x 32 random token ids, seed 0) as top-1 next-token
agreement with the full-precision model and as the relative L2 error of the logits. The tiny preset has
random weights, so its logits are nearly flat and a small perturbation flips many argmaxes: the bars
below (int8 >= 90 % agreement and <= 5 % error; nf4 >= 50 % and <= 35 %) are what such a model
allows, measured here; each layer is also checked to compute exactly ``x @ dequantize(W).T``.
"""

import copy

import bitsandbytes as bnb
import bitsandbytes.functional as bnbf
import pytest
import torch
from torch import nn

from hcx_extend.config import OmniConfig
from hcx_extend.memory import next_token_agreement, quantize_language_model
from hcx_extend.memory.quantize import quantizable_linears, quantized_weight_bytes
from hcx_extend.model import OmniForCausalLM
from hcx_extend.presets import build_preset

PROMPTS = torch.randint(0, 128_000, (4, 32), generator=torch.Generator().manual_seed(0))

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def reference():
    return build_preset("tiny-hcx-omni").eval()


@pytest.fixture(scope="module")
def nf4(reference):
    model = copy.deepcopy(reference)
    report = quantize_language_model(model, "nf4", compute_dtype=torch.bfloat16)
    return model, report


def _relative_error(reference, candidate):
    with torch.no_grad():
        a = reference.language_model(input_ids=PROMPTS).logits
        b = candidate.language_model(input_ids=PROMPTS).logits
    return float((a - b).norm() / a.norm())


def test_nf4_replaces_the_llm_linears_but_not_the_head_or_encoders(reference, nf4):
    model, report = nf4
    expected = [f"language_model.{name}" for name, _ in quantizable_linears(reference.model.language_model)]
    assert report.replaced == expected and len(expected) == 14  # 7 per decoder layer, lm_head kept
    assert all(isinstance(model.get_submodule(f"model.{name}"), bnb.nn.Linear4bit) for name in expected)
    assert type(model.language_model.lm_head) is nn.Linear
    assert all(type(m) is not bnb.nn.Linear4bit for m in model.model.vision_model.modules())
    assert model.model.sensor_projector.fc1.weight.dtype == torch.float32
    weight = model.language_model.model.layers[0].self_attn.q_proj.weight
    assert weight.quant_state.nested and weight.quant_state.quant_type == "nf4"  # double quantisation


def test_nf4_footprint_is_reported_exactly(reference, nf4):
    _, report = nf4
    linears = quantizable_linears(reference.model.language_model)
    assert report.linear_bytes_after == sum(quantized_weight_bytes(l.out_features, l.in_features, "nf4") for _, l in linears)
    assert report.model_bytes_before - report.model_bytes_after == report.linear_bytes_before - report.linear_bytes_after
    assert "14 linear layers quantised" in str(report)


def test_nf4_llm_linears_take_under_30_percent_of_their_bf16_bytes():
    # Real layers of a 512-wide LLM (the tiny preset's 64-wide layers are dominated by per-layer code tables).
    text = {"model_type": "hyperclovax", "vocab_size": 1000, "hidden_size": 512, "intermediate_size": 1536,
            "num_hidden_layers": 2, "num_attention_heads": 8, "num_key_value_heads": 4, "tie_word_embeddings": False}
    model = OmniForCausalLM(OmniConfig(text_config=text)).to(torch.bfloat16)
    report = quantize_language_model(model, "nf4")
    assert report.linear_ratio <= 0.30
    # The same rule on hcx-omni-8b's LLM (meta device: shapes only).
    linears = quantizable_linears(build_preset("hcx-omni-8b", device="meta").model.language_model)
    nf4_bytes = sum(quantized_weight_bytes(l.out_features, l.in_features, "nf4") for _, l in linears)
    assert nf4_bytes / sum(2 * l.weight.numel() for _, l in linears) == pytest.approx(0.258, abs=0.002)


def test_each_nf4_layer_computes_with_its_dequantised_weight(nf4):
    model, _ = nf4
    layer = model.language_model.model.layers[1].mlp.down_proj
    x = torch.randn(3, layer.in_features, generator=torch.Generator().manual_seed(1))
    dequantised = bnbf.dequantize_4bit(layer.weight.data, layer.weight.quant_state).to(torch.bfloat16)
    assert torch.equal(layer(x), torch.nn.functional.linear(x.to(torch.bfloat16), dequantised).float())


def test_nf4_stays_close_to_full_precision(reference, nf4):
    model, _ = nf4
    assert next_token_agreement(reference.language_model, model.language_model, PROMPTS) >= 0.5
    assert _relative_error(reference, model) <= 0.35


def test_int8_stays_closer(reference):
    model = copy.deepcopy(reference)
    report = quantize_language_model(model, "int8")
    assert isinstance(model.language_model.model.layers[0].mlp.up_proj, bnb.nn.Linear8bitLt)
    assert report.linear_bytes_after == sum(
        quantized_weight_bytes(l.out_features, l.in_features, "int8")
        for _, l in quantizable_linears(reference.model.language_model))
    assert next_token_agreement(reference.language_model, model.language_model, PROMPTS) >= 0.9
    assert _relative_error(reference, model) <= 0.05


def test_encoders_are_quantised_only_when_asked(reference):
    model = copy.deepcopy(reference)
    report = quantize_language_model(model, "int8", components=("language_model", "sensor_model"), skip=("lm_head", "fc2"))
    assert "sensor_model.output_proj" in report.replaced
    assert not any(name.endswith("fc2") for name in report.replaced)
    assert isinstance(model.model.sensor_model.output_proj, bnb.nn.Linear8bitLt)
    assert type(model.model.sensor_model.layers[0].fc2) is nn.Linear


@pytest.mark.parametrize("kwargs, message", [
    ({"method": "nf2"}, "unknown quantisation"),
    ({"components": ("smell_model",)}, "cannot quantise 'smell_model'"),
    ({"skip": ("proj", "lm_head")}, "no nn.Linear layer to quantise"),
])
def test_bad_requests_raise_clear_errors(reference, kwargs, message):
    with pytest.raises(ValueError, match=message):
        quantize_language_model(copy.deepcopy(reference), **kwargs)


def test_weights_on_the_meta_device_cannot_be_quantised():
    with pytest.raises(ValueError, match="meta device"):
        quantize_language_model(build_preset("tiny-hcx-omni", device="meta"))


def test_an_evaluation_pass_leaves_nf4_training_gradients_unchanged(reference):
    """bitsandbytes repacks 4-bit weights for its CPU inference kernel on an eval, no-grad pass; QLoRA
    alternates such passes (generate between epochs) with training steps, which must see the same weights."""
    model = copy.deepcopy(reference)
    quantize_language_model(model, "nf4", compute_dtype=torch.bfloat16)
    llm = model.language_model

    def input_gradient() -> torch.Tensor:
        llm.train()
        embeddings = llm.get_input_embeddings()(PROMPTS[:1, :8]).detach().requires_grad_(True)
        llm(inputs_embeds=embeddings).logits.float().pow(2).mean().backward()
        return embeddings.grad

    before = input_gradient()
    llm.eval()
    with torch.no_grad():
        llm(input_ids=PROMPTS[:1, :8])
    after = input_gradient()
    layers = [m for m in llm.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert layers and not any(getattr(m.weight.quant_state, "packing_format_for_cpu", False) for m in layers)
    assert before.abs().max() > 0 and torch.equal(before, after)
