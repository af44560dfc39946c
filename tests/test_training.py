import json

import pytest
import torch

from hcx_extend import OmniProcessor, align_tokens, build_preset
from hcx_extend.data.examples import Example
from hcx_extend.training import TrainConfig, Trainer


def tiny(tokenizer, dropout=0.1):
    """The tiny preset with dropout in the sensor encoder, so resuming must restore the RNG too."""
    from hcx_extend import OmniForCausalLM, preset_config

    config = preset_config("tiny-hcx-omni")
    config.modality("sensor").encoder["dropout"] = dropout
    # Larger initial weights than the preset's 0.02, so the frozen random LLM can express a preference
    # for one answer at all (with 0.02 its logits stay within about 1 of uniform whatever the input).
    config.text_config.initializer_range = 0.5
    # A small vocabulary keeps these tests fast; the tokenizer assigns the placeholder ids.
    config.text_config.vocab_size = 512
    for modality in config.modalities.values():
        modality.token_id = None
    torch.manual_seed(0)
    model = OmniForCausalLM(config)
    align_tokens(model, tokenizer)
    return model


def examples(count=12, seed=0):
    generator = torch.Generator().manual_seed(seed)
    out = []
    for i in range(count):
        label = "up" if i % 2 else "down"
        sign = 1.0 if label == "up" else -1.0
        values = sign * torch.linspace(0, 1, 16)[:, None].repeat(1, 6) + 0.1 * torch.randn(16, 6, generator=generator)
        out.append(Example([{"role": "user", "content": "<sensor> which way?"},
                            {"role": "assistant", "content": label}], {"sensor": [values]}))
    return out


def test_training_lowers_the_loss_and_touches_only_trainable_parameters(tokenizer):
    model = tiny(tokenizer, dropout=0.0)
    processor = OmniProcessor(tokenizer, model.config)
    frozen_before = {n: p.detach().clone() for n, p in model.named_parameters()
                     if not n.startswith(("model.sensor_model.", "model.sensor_projector."))}
    data = examples()
    batch = processor([e.messages for e in data], {"sensor": [e.inputs["sensor"][0] for e in data]},
                      return_labels=True, padding_side="right")
    with torch.no_grad():
        before = float(model(**batch).loss)
    config = TrainConfig(strategy="new-encoder", modalities=["sensor"], epochs=6, batch_size=4, learning_rate=1e-2,
                         progress=False)
    result = Trainer(model, processor, data, config, log=lambda line: None).train()
    with torch.no_grad():
        after = float(model(**batch).loss)
    assert result.steps == 18
    assert after < before - 3.0  # the answers became at least e^3 = 20 times more likely
    for name, parameter in model.named_parameters():
        if name in frozen_before:
            assert torch.equal(parameter, frozen_before[name]), name


class Crash(Exception):
    pass


class CrashingTrainer(Trainer):
    """Dies in the middle of step ``crash_at`` (after the forward, before the update)."""

    crash_at = 0

    def _train_step(self, indices, epoch):
        if self.step + 1 == self.crash_at:
            raise Crash
        return super()._train_step(indices, epoch)


def run(tokenizer, output_dir, trainer_class=Trainer, **overrides):
    model = tiny(tokenizer)
    processor = OmniProcessor(tokenizer, model.config)
    data, held_out = examples(12, seed=0), examples(4, seed=1)
    eval_batch = processor([e.messages for e in held_out], {"sensor": [e.inputs["sensor"][0] for e in held_out]},
                           return_labels=True, padding_side="right")

    def evaluate(m):
        # Uses the global RNG on purpose: the trainer must not let evaluation disturb training.
        torch.rand(3)
        return {"loss": float(m(**eval_batch).loss), "score": -float(m(**eval_batch).loss)}

    config = TrainConfig(strategy="new-encoder", modalities=["sensor"], epochs=3, batch_size=4, learning_rate=1e-3,
                         warmup_steps=2, output_dir=str(output_dir), save_every_steps=1, progress=False, **overrides)
    trainer = trainer_class(model, processor, data, config, evaluate=evaluate, log=lambda line: None)
    return model, trainer


def test_a_run_interrupted_mid_epoch_resumes_to_the_same_parameters(tokenizer, tmp_path):
    straight, trainer = run(tokenizer, tmp_path / "straight")
    straight_result = trainer.train()

    CrashingTrainer.crash_at = 5  # epoch 2, second batch
    _, crashing = run(tokenizer, tmp_path / "resumed", trainer_class=CrashingTrainer)
    with pytest.raises(Crash):
        crashing.train()
    state = json.loads((tmp_path / "resumed" / "last" / "state.json").read_text())
    assert state["step"] == 4 and not state["finished"]

    resumed, trainer = run(tokenizer, tmp_path / "resumed")
    resumed_result = trainer.train()
    assert resumed_result.steps == straight_result.steps == 9
    assert [h["loss"] for h in resumed_result.history if "loss" in h] == [h["loss"] for h in straight_result.history if "loss" in h]
    assert resumed_result.best["step"] == straight_result.best["step"]
    for (name, a), (_, b) in zip(straight.named_parameters(), resumed.named_parameters()):
        assert torch.equal(a, b), name


def test_resuming_with_other_settings_is_refused(tokenizer, tmp_path):
    _, trainer = run(tokenizer, tmp_path, max_steps=2)
    trainer.train()
    model, trainer = run(tokenizer, tmp_path, seed=1)
    with pytest.raises(ValueError, match="other settings \\(seed: 0 vs 1\\)"):
        trainer.train()


def test_checkpoint_holds_only_trained_parameters_and_the_full_config(tokenizer, tmp_path):
    from safetensors import safe_open

    _, trainer = run(tokenizer, tmp_path, max_steps=3)
    trainer.train()
    with safe_open(tmp_path / "last" / "trainable.safetensors", framework="pt") as reader:
        keys = set(reader.keys()) - {"__rng_state__"}
    assert keys and all(k.startswith(("model.sensor_model.", "model.sensor_projector.")) for k in keys)
    config = json.loads((tmp_path / "last" / "config.json").read_text())
    assert config["model_type"] == "hcx_omni" and "sensor" in config["modalities"]
    assert (tmp_path / "best" / "trainable.safetensors").exists()


def test_full_fine_tune_of_a_tied_llm_saves_and_loads_back(tokenizer, tmp_path):
    """An LLM whose head shares the embeddings (SmolLM2, most small LLMs) trained in full: the tied
    weight is stored once and both come back, still tied, with the trained values."""
    from hcx_extend.runs import load_model, save_run

    model = tiny(tokenizer)
    model.config.text_config.tie_word_embeddings = True
    model.language_model.config.tie_word_embeddings = True
    model.language_model.tie_weights()
    embeddings = model.language_model.get_input_embeddings().weight
    assert model.language_model.get_output_embeddings().weight is embeddings
    model.save_pretrained(tmp_path / "base")
    with torch.no_grad():
        embeddings.add_(0.25)  # "training" changes the shared weight and the projector
        for parameter in model.model.sensor_projector.parameters():
            parameter.mul_(2.0)
    components = ["language_model", "sensor_model", "sensor_projector"]
    save_run(model, tmp_path / "run", base=tmp_path / "base", components=components, strategy="full")
    loaded, _ = load_model(tmp_path / "run")
    assert loaded.language_model.get_output_embeddings().weight is loaded.language_model.get_input_embeddings().weight
    expected, got = model.state_dict(), loaded.state_dict()
    for key in expected:
        if key.startswith(tuple(f"model.{c}." for c in components)):
            assert torch.equal(got[key], expected[key]), key


def shifted(example, rng):
    """A variation that adds a random offset to the sensor item (what augmentation hooks do)."""
    values = example.inputs["sensor"][0]
    return Example(example.messages, {"sensor": [values + float(rng.normal())]})


def test_variations_are_fresh_every_epoch_and_the_same_after_a_resume(tokenizer, tmp_path):
    seen = []

    def recording(example, rng):
        varied = shifted(example, rng)
        seen.append(float(varied.inputs["sensor"][0][0, 0] - example.inputs["sensor"][0][0, 0]))
        return varied

    straight, trainer = run(tokenizer, tmp_path / "straight")
    trainer.vary = recording
    straight_result = trainer.train()
    offsets = list(seen)
    assert len(offsets) == 36  # 12 examples x 3 epochs, one draw each
    assert len(set(round(o, 6) for o in offsets)) == 36  # every epoch draws new variations

    CrashingTrainer.crash_at = 6
    _, crashing = run(tokenizer, tmp_path / "resumed", trainer_class=CrashingTrainer)
    crashing.vary = shifted
    with pytest.raises(Crash):
        crashing.train()
    resumed, trainer = run(tokenizer, tmp_path / "resumed")
    trainer.vary = shifted
    resumed_result = trainer.train()
    assert [h["loss"] for h in resumed_result.history if "loss" in h] == \
        [h["loss"] for h in straight_result.history if "loss" in h]
    for (name, a), (_, b) in zip(straight.named_parameters(), resumed.named_parameters()):
        assert torch.equal(a, b), name


def test_the_weight_average_is_what_is_evaluated_kept_and_resumed(tokenizer, tmp_path):
    # Decay 0: the average is the latest weights, so the run must end exactly where plain training ends.
    plain, trainer = run(tokenizer, tmp_path / "plain")
    trainer.evaluate = None
    trainer.train()
    averaged, trainer = run(tokenizer, tmp_path / "zero", ema_decay=0.0)
    trainer.evaluate = None
    trainer.train()
    for (name, a), (_, b) in zip(plain.named_parameters(), averaged.named_parameters()):
        assert torch.equal(a, b), name

    # Decay 0.9: the returned weights are the average, not the last step's.
    model, trainer = run(tokenizer, tmp_path / "ema", ema_decay=0.9)
    trainer.evaluate = None
    last = {}
    original = trainer.ema.update

    def remember(named, step):
        named = list(named)
        original(named, step)
        last.update({n: p.detach().clone() for n, p in named})

    trainer.ema.update = remember
    trainer.train()
    name = "model.sensor_projector.fc2.weight" if "model.sensor_projector.fc2.weight" in last else sorted(last)[0]
    assert torch.equal(dict(model.named_parameters())[name], trainer.ema.tensors[name])
    assert not torch.equal(trainer.ema.tensors[name], last[name])

    # A resumed run restores the average too.
    straight, trainer = run(tokenizer, tmp_path / "straight", ema_decay=0.9)
    trainer.train()
    CrashingTrainer.crash_at = 6
    _, crashing = run(tokenizer, tmp_path / "resumed", trainer_class=CrashingTrainer, ema_decay=0.9)
    with pytest.raises(Crash):
        crashing.train()
    resumed, trainer = run(tokenizer, tmp_path / "resumed", ema_decay=0.9)
    trainer.train()
    for (name, a), (_, b) in zip(straight.named_parameters(), resumed.named_parameters()):
        assert torch.equal(a, b), name


def test_resuming_a_run_without_a_weight_average_with_one_is_refused(tokenizer, tmp_path):
    _, trainer = run(tokenizer, tmp_path, max_steps=2)
    trainer.train()
    with pytest.raises(ValueError, match="ema_decay"):
        run(tokenizer, tmp_path, ema_decay=0.9)[1].train()


def test_each_parameter_role_gets_its_strategys_rate_unless_one_is_set(tokenizer):
    from hcx_extend.ladder import get_strategy

    model = tiny(tokenizer)
    processor = OmniProcessor(tokenizer, model.config)
    model.fresh_components = {"sensor_model", "sensor_projector"}
    config = TrainConfig(strategy="full", modalities=["sensor"], epochs=1, batch_size=4, progress=False)
    trainer = Trainer(model, processor, examples(4), config, log=lambda line: None)
    rates = {g["name"]: g["lr"] for g in trainer.param_groups}
    defaults = get_strategy("full").learning_rates
    assert rates == {"new": defaults.new, "pretrained": defaults.pretrained}
    names = {g["name"]: {id(p) for p in g["params"]} for g in trainer.param_groups}
    llm = {id(p) for n, p in model.named_parameters() if n.startswith("model.language_model.")}
    assert llm <= names["pretrained"] and not llm & names["new"]

    explicit = TrainConfig(strategy="full", learning_rate=1e-2, pretrained_lr=1e-6, projector_lr=5e-3)
    assert explicit.rates_for(get_strategy("full")) == {"new": 1e-2, "pretrained": 1e-6, "adapter": 1e-2,
                                                        "projector": 5e-3}
