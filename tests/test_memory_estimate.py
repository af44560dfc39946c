"""The memory estimator: its bookkeeping rules, agreement with a measured training step, and the CLI."""

from dataclasses import replace

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from hcx_extend.cli import main
from hcx_extend.compressors import compressed_length
from hcx_extend.encoders import _REGISTRY, get_encoder, register_encoder
from hcx_extend.encoders.base import ModalityEncoder
from hcx_extend.encoders.imu import IMUModalityEncoder
from hcx_extend.memory import Workload, estimate_memory, weight_footprint
from hcx_extend.memory.activations import encoded_modalities
from hcx_extend.memory.quantize import module_bytes, quantizable_linears, quantized_weight_bytes
from hcx_extend.model import OmniForCausalLM
from hcx_extend.presets import build_preset, preset_config
from hcx_extend.ladder import get_strategy
from hcx_extend.training import apply_strategy

# One 56x56 image (4 tokens), the tiny audio window (16 tokens), 20 sensor steps: 40 placeholders.
SMALL_STEP = Workload(batch=1, seq=96, image_size=56, sensor_steps=20)

pytestmark = pytest.mark.usefixtures("one_thread")


def _batch(model, workload):
    """Placeholders of every modality first, then text; returns ids, modality inputs, labelled share."""
    generator = torch.Generator().manual_seed(0)
    inputs, placeholders = {}, []
    for modality in encoded_modalities(model, list(model.config.modalities)):
        encoder = get_encoder(modality.encoder["model_type"])
        if modality.input.kind == "image":
            item = torch.rand(3, workload.image_size, workload.image_size, generator=generator)
        elif modality.input.kind == "audio":
            item = torch.randn(modality.input.channels, modality.input.max_length, generator=generator)
        else:
            item = torch.randn(workload.sensor_steps, modality.input.channels, generator=generator)
        batch = encoder.collate([item] * workload.batch, modality)
        inputs[modality.name] = batch
        placeholders += [modality.token_id] * compressed_length(modality.compressor, encoder.token_counts(batch, modality)[0])
    text = torch.randint(0, 1000, (workload.batch, workload.seq - len(placeholders)), generator=generator)
    ids = torch.cat([torch.tensor(placeholders).expand(workload.batch, -1), text], dim=1)
    return ids, inputs, (workload.seq - len(placeholders)) / (workload.seq - 1)


def _config(compressor=None):
    config = preset_config("tiny-hcx-omni")
    config.modalities["sensor"].compressor = compressor
    return config


def _measured_peak(strategy: str, workload: Workload, compressor=None) -> int:
    """Bytes alive before a training step (weights, optimiser state) + the most the step allocates on top."""
    torch.manual_seed(0)
    model = OmniForCausalLM(_config(compressor))
    ids, inputs, _ = _batch(model, workload)
    model.fresh_components = set()
    apply_strategy(model, get_strategy(strategy))
    model.set_train_mode()
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters)

    def step():
        output = model(input_ids=ids, modality_inputs=inputs, labels=ids, logits_to_keep="labels")
        output.loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()
    state = sum(t.untyped_storage().nbytes() for s in optimizer.state.values() for t in s.values() if t.dim())
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    live = peak = 0
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"), key=lambda e: e.start_ns())
    for event in events:
        live += event.nbytes()
        peak = max(peak, live)
    return module_bytes(model) + state + peak


@pytest.mark.parametrize("strategy, compressor", [
    ("projector", None),
    ("lora-all", None),
    ("projector", {"type": "mambamia", "chunk_size": 5}),  # the estimator used to fail on any mambamia model
])
def test_estimated_peak_matches_a_measured_cpu_training_step(strategy, compressor):
    with torch.device("meta"):
        layout = OmniForCausalLM(_config(compressor))
    ids_fraction = _batch(layout, SMALL_STEP)[2]
    workload = replace(SMALL_STEP, label_fraction=ids_fraction)
    estimate = estimate_memory(_config(compressor), strategy, workload, dtype=torch.float32,
                               trained_dtype=torch.float32, foreach=False)
    measured = _measured_peak(strategy, workload, compressor)
    assert estimate.peak == pytest.approx(measured, rel=0.05)
    if compressor:
        assert estimate.modality_tokens["sensor"] == 4  # 20 steps in chunks of 5
        # Frozen, but between the trained projector and the loss: it keeps activations for backward.
        assert estimate.row("sensor_compressor").activations > 0 and estimate.row("sensor_compressor").trained == 0


def test_weights_gradients_and_adamw_state_follow_the_documented_rules():
    config = preset_config("tiny-hcx-omni")
    estimate = estimate_memory(config, "projector", SMALL_STEP)  # frozen bf16, trained fp32
    model = build_preset("tiny-hcx-omni", device="meta")
    for name in ("mm_projector", "audio_projector", "sensor_projector"):
        count = sum(p.numel() for p in getattr(model.model, name).parameters())
        row = estimate.row(name)
        assert (row.trained, row.weights, row.gradients, row.optimizer) == (count, 4 * count, 4 * count, 8 * count)
    vision = sum(p.numel() for p in model.model.vision_model.parameters())
    assert estimate.row("vision_model").weights == 2 * vision
    assert estimate.row("vision_model").gradients == estimate.row("vision_model").activations == 0
    layers = sum(p.numel() for p in model.language_model.model.layers.parameters())
    assert estimate.row("language_model.layers").weights == 2 * layers
    # Gradients flow through the frozen LLM to reach the projectors, so its layers keep activations.
    assert estimate.row("language_model.layers").activations > 0
    assert estimate.parameters == sum(p.numel() for p in model.parameters())


def test_lora_parameters_equal_what_the_trainer_adds():
    model = build_preset("tiny-hcx-omni")
    model.fresh_components = set()
    apply_strategy(model, get_strategy("lora-all"))
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    lora = {name: sum(p.numel() for n, p in getattr(model.model, name).named_parameters() if "lora_" in n)
            for name in ("vision_model", "audio_model", "sensor_model")}
    estimate = estimate_memory(preset_config("tiny-hcx-omni"), "lora-all", SMALL_STEP)
    assert estimate.trained == trained
    assert {name: estimate.row(name).trained for name in lora} == lora
    # A fresh encoder has nothing to adapt: the trainer trains it in full, and so does the estimate.
    fresh = estimate_memory(preset_config("tiny-hcx-omni"), "lora-encoder", SMALL_STEP, fresh=["sensor_model"])
    sensor = sum(p.numel() for p in build_preset("tiny-hcx-omni", device="meta").model.sensor_model.parameters())
    assert fresh.row("sensor_model").trained == sensor
    assert fresh.row("vision_model").trained == lora["vision_model"]


def test_qlora_holds_llm_linears_in_nf4_and_full_refuses_quantisation():
    config = preset_config("tiny-hcx-omni")
    qlora = estimate_memory(config, "qlora", SMALL_STEP)
    meta = build_preset("tiny-hcx-omni", device="meta")
    linears = quantizable_linears(meta.language_model.model.layers)
    norms = sum(p.numel() for n, p in meta.language_model.model.layers.named_parameters() if "norm" in n)
    lora_bytes = 4 * sum(16 * (layer.in_features + layer.out_features) for name, layer in linears
                         if name.rpartition(".")[2] in ("q_proj", "k_proj", "v_proj", "o_proj"))
    expected = sum(quantized_weight_bytes(l.out_features, l.in_features, "nf4") for _, l in linears) + 2 * norms + lora_bytes
    assert qlora.row("language_model.layers").weights == expected
    head_and_final_norm = meta.language_model.lm_head.weight.numel() + meta.language_model.model.norm.weight.numel()
    assert qlora.row("language_model.lm_head").weights == 2 * head_and_final_norm  # the head stays bf16
    with pytest.raises(ValueError, match="cannot be held in nf4"):
        estimate_memory(config, "full", SMALL_STEP, quant="nf4")


def test_hcx_omni_8b_estimates_on_the_meta_device():
    config = preset_config("hcx-omni-8b")
    inference = estimate_memory(config, "inference", Workload(batch=1, seq=2048))
    assert inference.parameters == pytest.approx(9.94e9, rel=0.01)
    # 36 layers x (K and V) x 8 kv heads x 128 dims x 2048 positions x 2 bytes
    assert inference.kv_cache == 36 * 2 * 8 * 128 * 2048 * 2
    assert inference.total("weights") == weight_footprint(config, "bf16") == 2 * inference.parameters
    assert weight_footprint(config, "bf16", "nf4") < 0.5 * weight_footprint(config, "bf16")
    projector = estimate_memory(config, "projector", Workload(batch=1, seq=2048))
    assert projector.peak > projector.total("weights") + projector.total("optimizer")
    assert projector.trained == sum(r.trained for r in projector.rows if r.name.endswith("projector"))


def test_gradient_checkpointing_keeps_one_hidden_state_per_layer():
    config = preset_config("hcx-omni-8b")
    settings = {"strategy": "lora-all", "workload": Workload(batch=1, seq=1024), "modalities": ["image"]}
    plain = estimate_memory(config, **settings)
    checkpointed = estimate_memory(config, **settings, gradient_checkpointing=True)
    assert checkpointed.peak < 0.8 * plain.peak
    assert checkpointed.row("language_model.layers").activations >= 36 * 1024 * 4096 * 2


class _NoExampleBatches(IMUModalityEncoder):
    """A user's encoder kind that does not implement example_batch."""

    example_batch = ModalityEncoder.example_batch


class _ReadsValues(IMUModalityEncoder):
    """A user's encoder kind whose encode reads tensor values (impossible on the meta device)."""

    def encode(self, module, batch, modality):
        scale = float(batch["values"].abs().max())
        return [f * scale for f in super().encode(module, batch, modality)]


@pytest.mark.parametrize("kind, reason", [
    (_NoExampleBatches(), "does not implement example_batch"),
    (_ReadsValues(), "does not run on the meta device"),
])
def test_an_encoder_kind_the_estimator_cannot_trace_gives_an_untraced_row(kind, reason):
    register_encoder("user_imu", kind)
    try:
        config = preset_config("tiny-hcx-omni")
        config.modalities["sensor"].encoder["model_type"] = "user_imu"
        untraced = estimate_memory(config, "new-encoder", SMALL_STEP)
    finally:
        _REGISTRY.pop("user_imu")
    assert list(untraced.untraced) == ["sensor_model"] and reason in untraced.untraced["sensor_model"]
    assert untraced.row("sensor_model").activations == 0 and "sensor" not in untraced.modality_tokens
    assert "activations not traced for sensor_model" in untraced.table()
    traced = estimate_memory(preset_config("tiny-hcx-omni"), "new-encoder", SMALL_STEP)
    assert traced.untraced == {} and traced.row("sensor_model").activations > 0
    assert untraced.row("vision_model").activations == traced.row("vision_model").activations


@pytest.mark.parametrize("kwargs, message", [
    ({"strategy": "everything"}, "unknown strategy"),
    ({"dtype": "fp8"}, "unknown dtype"),
    ({"quant": "nf3"}, "unknown quantisation"),
    ({"modalities": ["smell"]}, "unknown modality"),
    ({"workload": Workload(seq=32)}, "raise --seq"),
])
def test_bad_estimate_requests_raise_clear_errors(kwargs, message):
    kwargs = {"strategy": "projector", "workload": SMALL_STEP, **kwargs}
    with pytest.raises(ValueError, match=message):
        estimate_memory(preset_config("tiny-hcx-omni"), **kwargs)


def test_estimate_cli_prints_the_table_and_rejects_unknown_targets(capsys):
    assert main(["estimate", "tiny-hcx-omni", "--strategy", "lora-all", "--seq", "512"]) == 0
    out = capsys.readouterr().out
    assert "language_model.layers" in out and "peak during one training step" in out
    assert "LLM linears nf4" in out
    assert main(["estimate", "no-such-model"]) == 2
    assert "neither a preset" in capsys.readouterr().err
    assert main(["estimate", "hcx-omni-8b", "--strategy", "full", "--quant", "nf4"]) == 2
    assert "cannot be held in nf4" in capsys.readouterr().err
