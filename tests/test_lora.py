import pytest
import torch
from torch import nn

from hcx_extend import OmniForCausalLM
from hcx_extend.encoders.imu_guide import GuideIMUEncoder
from hcx_extend.training.adapters import load_adapters, merge_adapters, save_adapters
from hcx_extend.lora_targets import resolve_lora_targets
from hcx_extend.ladder import STRATEGIES
from hcx_extend.training import apply_strategy


def leaf_names(paths):
    return sorted({p.rsplit(".", 1)[-1] for p in paths})


def test_attention_resolves_per_architecture(tiny_model):
    parts = tiny_model.model
    assert leaf_names(resolve_lora_targets(parts.vision_model, "attention")) == ["proj", "qkv"]
    assert leaf_names(resolve_lora_targets(parts.audio_model, "attention")) == ["k_proj", "out_proj", "q_proj", "v_proj"]
    assert leaf_names(resolve_lora_targets(parts.sensor_model, "attention")) == ["k_proj", "o_proj", "q_proj", "v_proj"]
    assert leaf_names(resolve_lora_targets(parts.language_model, "attention")) == ["k_proj", "o_proj", "q_proj", "v_proj"]
    # Every layer is covered: 2 vision blocks x 2 Linear layers.
    assert resolve_lora_targets(parts.vision_model, "attention") == [
        "blocks.0.attn.qkv", "blocks.0.attn.proj", "blocks.1.attn.qkv", "blocks.1.attn.proj"]


def test_mlp_and_all_linear_groups(tiny_model):
    parts = tiny_model.model
    assert leaf_names(resolve_lora_targets(parts.vision_model, "mlp")) == ["down_proj", "gate_proj", "up_proj"]
    assert leaf_names(resolve_lora_targets(parts.sensor_model, "mlp")) == ["fc1", "fc2"]
    everything = resolve_lora_targets(parts.language_model, "all-linear")
    assert "lm_head" not in everything and len(everything) == 2 * 7


def test_explicit_names_and_the_guides_recipe(tiny_model):
    assert leaf_names(resolve_lora_targets(tiny_model.model.audio_model, ["q_proj", "v_proj"])) == ["q_proj", "v_proj"]
    with pytest.raises(ValueError, match=r"vision_model: LoRA target\(s\) \['q_proj', 'v_proj'\] match no Linear layer; "
                                         r"the Linear layers here are named \['0', '2', 'down_proj', 'gate_proj', 'proj', 'qkv', 'up_proj'\]"):
        resolve_lora_targets(tiny_model.model.vision_model, ["q_proj", "v_proj"], "vision_model")
    guide = GuideIMUEncoder(hidden_size=32, num_heads=4, num_layers=1, output_size=16)
    with pytest.raises(ValueError, match=r"the Linear layers here are named \['linear1', 'linear2', 'output_proj'\]"):
        resolve_lora_targets(guide, ["q_proj", "v_proj"])
    # nn.TransformerEncoder hides q/k/v in one in_proj_weight and never calls out_proj as a module.
    with pytest.raises(ValueError, match="LoRA target group 'attention' matches no Linear layer"):
        resolve_lora_targets(guide, "attention")


def fresh(tokenizer):
    """The tiny preset, treated as if every weight had been loaded from a pretrained checkpoint."""
    from hcx_extend import align_tokens, build_preset

    model = build_preset("tiny-hcx-omni", seed=0).eval()
    model.fresh_components = set()
    align_tokens(model, tokenizer)
    return model


@torch.no_grad()
def _perturb_adapters(model):
    generator = torch.Generator().manual_seed(0)
    for name, parameter in model.named_parameters():
        if "lora_" in name:
            parameter.copy_(0.05 * torch.randn(parameter.shape, generator=generator))


def test_save_load_merge_round_trip(tokenizer, processor, mixed_batch, tmp_path):
    model = fresh(tokenizer)
    apply_strategy(model, STRATEGIES["lora-all"], ["sensor", "image"])
    assert not any(m.training for m in model.modules())  # adapters follow the model's eval mode: no dropout
    _perturb_adapters(model)  # LoRA B starts at zero; make the adapters do something
    with torch.no_grad():
        with_adapters = model(**mixed_batch).logits
    save_adapters(model, tmp_path)
    assert sorted(p.name for p in (tmp_path / "adapters").iterdir()) == ["language_model", "sensor_model", "vision_model"]
    assert (tmp_path / "adapters" / "vision_model" / "adapter_config.json").exists()

    # Load into a fresh copy of the base model: same outputs.
    reloaded = fresh(tokenizer)
    assert load_adapters(reloaded, tmp_path) == ["language_model", "sensor_model", "vision_model"]
    reloaded.model.sensor_projector.load_state_dict(model.model.sensor_projector.state_dict())
    reloaded.model.mm_projector.load_state_dict(model.model.mm_projector.state_dict())
    with torch.no_grad():
        assert torch.allclose(reloaded(**mixed_batch).logits, with_adapters, atol=1e-6)

    # Merge: plain Linear layers again, same outputs up to float rounding.
    assert merge_adapters(reloaded) == 4 * 2 + 2 * 2 + 2 * 4  # llm q/k/v/o, vision qkv/proj, sensor q/k/v/o
    assert not any("lora_" in n or "base_layer" in n for n in reloaded.state_dict())
    with torch.no_grad():
        merged = reloaded(**mixed_batch).logits
    assert torch.allclose(merged, with_adapters, atol=1e-5)  # fp32: W x + B(A x) vs (W + BA) x differ in rounding only
    reloaded.save_pretrained(tmp_path / "merged")
    plain = OmniForCausalLM.from_pretrained(tmp_path / "merged")
    with torch.no_grad():
        assert torch.equal(plain(**mixed_batch).logits, merged)
    assert all(type(m) is not nn.Module for m in plain.modules())
