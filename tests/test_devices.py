"""The device class of bug on the CPU: batches must follow the model to its device, in one place.

A CUDA machine is not needed to see whether batches reach the model's device through the one place
that moves them (`hcx_extend.model.move_to_device`, called by ``OmniForCausalLM.forward`` and
``generate`` with ``input_device``): a mover that marks what it moves, and checks where inputs enter
the model (token embeddings, each modality's encoder), show whether any entry point feeds the model a
tensor that did not go through it. tests/test_gpu.py runs the same entry points on a real GPU.
"""

import pytest
import torch

import hcx_extend.model as model_module
from hcx_extend import OmniProcessor, align_tokens, build_preset
from hcx_extend.data.examples import Example
from hcx_extend.evaluation import evaluate_examples, mean_answer_loss
from hcx_extend.inference import GenerationSettings, answer
from hcx_extend.model import move_to_device
from hcx_extend.training import TrainConfig, Trainer

pytestmark = pytest.mark.usefixtures("one_thread")


class Moved(torch.Tensor):
    """Marks a tensor that went through the batch mover."""


def marking_mover(monkeypatch, mark=True):
    """Replace the model's batch mover by one that marks what it moves (or, mark=False, moves nothing)."""
    real = model_module.move_to_device

    def mover(value, device):
        value = real(value, device)
        if not mark:
            return value
        if isinstance(value, torch.Tensor):
            return value.as_subclass(Moved)
        if isinstance(value, dict):
            return {k: mover(v, device) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return type(value)(mover(v, device) for v in value)
        return value

    monkeypatch.setattr(model_module, "move_to_device", mover)


def unmoved_tensors(value, path="batch"):
    if isinstance(value, torch.Tensor):
        return [] if isinstance(value, Moved) else [path]
    if isinstance(value, dict):
        return [p for k, v in value.items() for p in unmoved_tensors(v, f"{path}.{k}")]
    if isinstance(value, (list, tuple)):
        return [p for i, v in enumerate(value) for p in unmoved_tensors(v, f"{path}[{i}]")]
    return []


@pytest.fixture
def watched(tokenizer, monkeypatch):
    """The tiny model with checks where inputs enter it: token ids at the embeddings, each modality's batch."""
    model = build_preset("tiny-hcx-omni", seed=0).eval()
    align_tokens(model, tokenizer)
    arrivals = {"unmoved": [], "calls": 0}

    def at_embeddings(module, args):
        arrivals["calls"] += 1
        arrivals["unmoved"] += unmoved_tensors(args[0], "input_ids")

    model.get_input_embeddings().register_forward_pre_hook(at_embeddings)
    encode = model.encode_modality

    def encode_modality(name, batch):
        arrivals["unmoved"] += unmoved_tensors(batch, name)
        return encode(name, batch)

    monkeypatch.setattr(model, "encode_modality", encode_modality)
    return model, OmniProcessor(tokenizer, model.config), arrivals


def sensor_examples():
    return [Example([{"role": "user", "content": "<sensor> which way?"},
                     {"role": "assistant", "content": "up" if i % 2 else "down"}], {"sensor": [torch.randn(9 + i, 6)]})
            for i in range(4)]


@pytest.mark.parametrize("mark", [True, False])
def test_every_entry_point_hands_its_batch_through_the_one_mover(watched, monkeypatch, mark):
    """answer/chat (generate), evaluation (generate + loss) and the Trainer (its step and its evaluate callback)
    build CPU batches; every tensor reaching the model went through move_to_device. With a mover that marks
    nothing (mark=False) the same check finds the unmoved tensors, so it can fail."""
    model, processor, arrivals = watched
    marking_mover(monkeypatch, mark)
    examples = sensor_examples()
    answer(model, processor, [e.messages[:1] for e in examples[:2]], {"sensor": [e.inputs["sensor"][0] for e in examples[:2]]},
           GenerationSettings(max_new_tokens=2))
    evaluate_examples(model, processor, examples, GenerationSettings(max_new_tokens=2))
    mean_answer_loss(model, processor, examples)
    config = TrainConfig(strategy="projector", modalities=["sensor"], epochs=1, batch_size=2, progress=False)
    Trainer(model, processor, examples, config, evaluate=lambda m: {"score": mean_answer_loss(m, processor, examples)},
            log=lambda line: None).train()
    assert arrivals["calls"] >= 6  # generate (prefill + steps), evaluation, loss, two training steps, evaluation
    if mark:
        assert arrivals["unmoved"] == []
    else:
        assert {"input_ids", "sensor.values", "sensor.lengths"} <= set(arrivals["unmoved"])


def test_the_mover_reaches_every_tensor_in_nested_batches():
    batch = {"a": torch.zeros(2), "b": [torch.ones(1), (torch.ones(3), "text")], "c": {"d": torch.zeros(1, 2)}, "e": 3}
    moved = move_to_device(batch, torch.device("meta"))
    tensors = [moved["a"], moved["b"][0], moved["b"][1][0], moved["c"]["d"]]
    assert all(t.device.type == "meta" for t in tensors)
    assert moved["b"][1][1] == "text" and moved["e"] == 3 and isinstance(moved["b"][1], tuple)


def test_input_device_follows_an_accelerate_execution_device(tiny_model):
    """A dispatched model's embeddings may sit on the CPU or meta between calls: batches go where they execute."""

    class Hook:
        execution_device = 0

    tiny_model.get_input_embeddings()._hf_hook = Hook()
    assert tiny_model.input_device == torch.device("cuda:0")
    Hook.execution_device = "cpu"
    assert tiny_model.input_device == torch.device("cpu")


def test_generate_moves_the_batch_before_generation(tokenizer, monkeypatch):
    """generate() hands transformers tensors on input_device (recorded at the model's forward)."""
    model = build_preset("tiny-hcx-omni", seed=0).eval()
    align_tokens(model, tokenizer)
    processor = OmniProcessor(tokenizer, model.config)
    batch = processor([[{"role": "user", "content": "<sensor> what?"}]], {"sensor": [torch.randn(9, 6)]},
                      padding_side="left")
    seen = []
    moved = move_to_device

    def recording(value, device):
        seen.append(device)
        return moved(value, device)

    monkeypatch.setattr(model_module, "move_to_device", recording)
    with torch.no_grad():
        ids = model.generate(**batch, max_new_tokens=2, do_sample=False, pad_token_id=0)
    assert ids.shape[1] == batch["input_ids"].shape[1] + 2
    assert seen and all(device == model.input_device for device in seen)
