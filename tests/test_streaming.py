"""Layer streaming on the CPU: exact logits, slot accounting, load order, bytes moved, no write-back; NF4 layers."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from hcx_extend.config import OmniConfig
from hcx_extend.memory import LayerStreamer, quantize_language_model, resident_layer_count
from hcx_extend.memory.quantize import quantized_weight_bytes
from hcx_extend.memory.streaming import layer_bytes
from hcx_extend.model import OmniForCausalLM

TEXT = {"model_type": "hyperclovax", "vocab_size": 1000, "hidden_size": 64, "intermediate_size": 128,
        "num_hidden_layers": 6, "num_attention_heads": 4, "num_key_value_heads": 2,
        "max_position_embeddings": 256, "tie_word_embeddings": False}
PROMPT = torch.randint(0, 1000, (2, 12), generator=torch.Generator().manual_seed(0))

pytestmark = pytest.mark.usefixtures("one_thread")


def _model():
    torch.manual_seed(0)
    return OmniForCausalLM(OmniConfig(text_config=dict(TEXT))).eval()


def _generate(model, steps=4):
    """Greedy prefill + ``steps`` decoding steps with the KV cache; logits of every step."""
    with torch.no_grad():
        out = model.generate(PROMPT, max_new_tokens=steps, do_sample=False, output_logits=True,
                             return_dict_in_generate=True, pad_token_id=0)
    return out.sequences, torch.stack(out.logits)


@pytest.fixture(scope="module")
def expected():
    return _generate(_model())


class WritesInto(TorchDispatchMode):
    """Records every op that writes into one of the watched storages (in-place ops, copy_, out=)."""

    def __init__(self, storages):
        super().__init__()
        self.watched = {s.data_ptr() for s in storages}
        self.writes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        for position, argument in enumerate(func._schema.arguments):
            if argument.alias_info is None or not argument.alias_info.is_write:
                continue
            target = args[position] if position < len(args) else kwargs.get(argument.name)
            if isinstance(target, torch.Tensor) and target.untyped_storage().data_ptr() in self.watched:
                self.writes.append(str(func))
        return func(*args, **kwargs)


def test_streamed_prefill_and_decoding_equal_the_resident_model_exactly(expected):
    model = _model()
    streamer = LayerStreamer(model, "cpu", resident_layers=2)
    sequences, logits = _generate(model)
    assert torch.equal(sequences, expected[0])
    assert torch.equal(logits, expected[1])
    assert streamer.resident == [0, 1] and streamer.streamed == [2, 3, 4, 5]


def test_each_pass_moves_exactly_the_streamed_layers_and_nothing_back():
    model = _model()
    streamer = LayerStreamer(model, "cpu", resident_layers=2, slots=2)
    host = streamer.host_buffers()
    before = {i: buffer.clone() for i, buffer in host.items()}
    watcher = WritesInto([b.untyped_storage() for b in host.values()])
    with watcher:
        _generate(model, steps=4)
    passes = streamer.stats.passes
    assert passes == 4  # the prefill gives the first new token, 3 decoding steps the others
    # One prefetch at construction, then 4 streamed layers per pass (the last one of a pass prefetches
    # the first of the next): (4 * passes + 1) copies of exactly one layer each.
    assert streamer.layer_nbytes >= layer_bytes(model.language_model.model.layers[0])
    assert streamer.stats.bytes_to_device == (4 * passes + 1) * streamer.layer_nbytes
    assert streamer.bytes_per_pass == 4 * streamer.layer_nbytes
    assert streamer.stats.bytes_to_host == 0
    assert watcher.writes == []
    assert all(torch.equal(host[i], before[i]) for i in host)
    with watcher:  # the watcher does see a write-back when there is one
        host[2].copy_(before[2])
    assert watcher.writes == ["aten.copy_.default"]


def test_loads_alternate_slots_in_pass_order_and_never_exceed_them():
    model = _model()
    streamer = LayerStreamer(model, "cpu", resident_layers=3, slots=2)
    slot_memory = [buffer.data_ptr() for buffer in streamer._slot_buffers]
    span = streamer.layer_nbytes
    in_slots = []

    def count(module, args):
        on_slots = 0
        for layer in model.language_model.model.layers:
            pointer = next(layer.parameters()).data_ptr()
            on_slots += any(start <= pointer < start + span for start in slot_memory)
        in_slots.append(on_slots)

    hooks = [layer.register_forward_pre_hook(count) for layer in model.language_model.model.layers]
    with torch.no_grad():
        model(input_ids=PROMPT)
        model(input_ids=PROMPT)
    for hook in hooks:
        hook.remove()
    assert streamer.stats.loads == [(3, 0), (4, 1), (5, 0), (3, 1), (4, 0), (5, 1), (3, 0)]
    assert streamer.stats.evictions == [3, 4, 5, 3, 4]
    assert max(in_slots) == 2


def test_one_slot_without_prefetch_loads_on_demand():
    model = _model()
    streamer = LayerStreamer(model, "cpu", resident_layers=4, slots=1)
    with torch.no_grad():
        model(input_ids=PROMPT)
        model(input_ids=PROMPT)
    assert streamer.stats.loads == [(4, 0), (5, 0), (4, 0), (5, 0)]
    assert streamer.stats.bytes_to_device == 4 * streamer.layer_nbytes


def test_the_budget_decides_how_many_layers_stay_resident():
    model = _model()
    layer = layer_bytes(model.language_model.model.layers[0])
    layers = {id(p) for p in model.language_model.model.layers.parameters()}
    other = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()] if id(t) not in layers)
    assert resident_layer_count(model, other + 6 * layer) == 6
    assert resident_layer_count(model, other + 5 * layer) == 3  # two slots are set aside when streaming
    assert resident_layer_count(model, other + 2 * layer) == 0
    with pytest.raises(ValueError, match="cannot hold the non-layer weights"):
        resident_layer_count(model, other + layer)
    streamer = LayerStreamer(model, "cpu", budget=other + 6 * layer)
    assert streamer.streamed == [] and streamer.bytes_per_pass == 0
    with torch.no_grad():
        model(input_ids=PROMPT)
    assert streamer.stats.bytes_to_device == 0


def test_bad_streamer_settings_raise_clear_errors():
    with pytest.raises(ValueError, match="exactly one of budget"):
        LayerStreamer(_model(), "cpu")
    with pytest.raises(ValueError, match="slots must be"):
        LayerStreamer(_model(), "cpu", resident_layers=2, slots=0)
    with pytest.raises(ValueError, match=r"resident_layers must be in \[0, 6\]"):
        LayerStreamer(_model(), "cpu", resident_layers=7)


# ---------------------------------------------------------------------------------------- NF4 layers stream packed
NF4_TEXT = {**TEXT, "hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 4}


def _nf4_model():
    """The NF4 model of the guide's BitsAndBytesConfig, quantised on the CPU (bitsandbytes' CPU kernels)."""
    torch.manual_seed(0)
    model = OmniForCausalLM(OmniConfig(text_config=dict(NF4_TEXT))).eval()
    quantize_language_model(model, "nf4", compute_dtype=torch.bfloat16)
    return model


def test_nf4_layers_stream_packed_and_decode_exactly_as_the_resident_nf4_model():
    resident = _nf4_model()
    expected_sequences, expected_logits = _generate(resident, steps=3)
    model = _nf4_model()
    streamer = LayerStreamer(model, "cpu", resident_layers=1, slots=2)
    sequences, logits = _generate(model, steps=3)
    assert torch.equal(sequences, expected_sequences)  # next-token agreement 100 %
    assert torch.equal(logits, expected_logits)
    layer = model.language_model.model.layers[3]
    assert type(layer.self_attn.q_proj.weight).__name__ == "Params4bit"
    assert layer.self_attn.q_proj.weight.quant_state.absmax.data_ptr() in {
        b.data_ptr() + offset for b in streamer._slot_buffers + [streamer.host_buffers()[3]] for offset in streamer._offsets}


def test_an_nf4_pass_moves_the_packed_bytes_about_a_quarter_of_bf16():
    model = _nf4_model()
    layer = model.language_model.model.layers[0]
    # Packed weights + block scales + double-quantisation state + code tables, as bitsandbytes stores them
    # (memory/quantize.py's formula), and the four RMSNorm weights (HyperCLOVAX's Peri-LN) in float32.
    linears = [m for m in layer.modules() if type(m).__name__ == "Linear4bit"]
    norms = [m for m in layer.modules() if type(m).__name__.endswith("RMSNorm")]
    assert len(linears) == 7 and len(norms) == 4
    expected = sum(quantized_weight_bytes(m.out_features, m.in_features, "nf4") for m in linears) + 4 * 256 * 4
    assert layer_bytes(layer) == expected
    streamer = LayerStreamer(model, "cpu", resident_layers=1, slots=2)
    assert 0 <= streamer.layer_nbytes - expected <= 256 * 40  # alignment of each tensor in the flat buffer
    with torch.no_grad():
        model(input_ids=PROMPT)
        model(input_ids=PROMPT)
    assert streamer.stats.bytes_to_device == (3 * 2 + 1) * streamer.layer_nbytes  # 3 streamed layers, 2 passes
    bf16 = sum(m.out_features * m.in_features * 2 for m in linears) + 4 * 256 * 2
    assert 0.26 < streamer.layer_nbytes / bf16 < 0.28
