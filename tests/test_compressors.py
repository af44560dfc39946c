"""Token compressors: the MambaMia scan and masks, Omni weight names, bad configs, and the model path."""

import math

import pytest
import torch
import torch.nn.functional as F

from hcx_extend.compressors import build_compressor
from hcx_extend.compressors.mamba2 import Mamba2Mixer
from hcx_extend.compressors.mambamia import MambaMiaCompressor
from hcx_extend.compressors import mamba2, ssd
from hcx_extend.compressors.ssd import ssd_scan, ssd_scan_pure


def step_by_step_scan(x, dt, A, B, C):
    """The recurrence written out, one time step at a time: S = exp(dt*A) S + dt x B^T; y = S C."""
    batch, length, heads, head_dim = x.shape
    group_of_head = torch.arange(heads) // (heads // B.shape[2])
    state = torch.zeros(batch, heads, head_dim, B.shape[-1], dtype=x.dtype)
    outputs = []
    for t in range(length):
        b_t, c_t = B[:, t, group_of_head], C[:, t, group_of_head]  # (batch, heads, state)
        state = torch.exp(dt[:, t] * A)[..., None, None] * state + (dt[:, t, :, None] * x[:, t])[..., None] * b_t[:, :, None]
        outputs.append(torch.einsum("bhpn,bhn->bhp", state, c_t))
    return torch.stack(outputs, dim=1)


def scan_inputs(batch=2, length=150, heads=4, head_dim=8, groups=2, state=16, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, length, heads, head_dim, generator=g, dtype=dtype)
    dt = F.softplus(torch.randn(batch, length, heads, generator=g, dtype=dtype) - 1.0)
    A = -torch.exp(torch.rand(heads, generator=g, dtype=dtype) * 2)
    # B and C scaled by state**-0.5 as in a trained layer, so outputs are of order 1 and 1e-5 is both an
    # absolute and a relative bound (float32 resolves about 1e-7 of a value).
    B = torch.randn(batch, length, groups, state, generator=g, dtype=dtype) / state**0.5
    C = torch.randn(batch, length, groups, state, generator=g, dtype=dtype) / state**0.5
    return x, dt, A, B, C


@pytest.mark.parametrize("block_len", [1, 16, 64, 256])
def test_pure_scan_equals_the_step_by_step_recurrence_in_float32(block_len):
    x, dt, A, B, C = scan_inputs()
    expected = step_by_step_scan(x, dt, A, B, C)
    got = ssd_scan_pure(x, dt, A, B, C, block_len=block_len)
    assert got.shape == expected.shape == (2, 150, 4, 8)
    assert 0.5 < expected.abs().max() < 10
    assert (got - expected).abs().max().item() < 1e-5
    # Against float64 as well: the blockwise form is no less accurate than the loop.
    exact = step_by_step_scan(*(t.double() for t in (x, dt, A, B, C)))
    assert (got.double() - exact).abs().max().item() < 1e-5


def test_scan_longer_than_a_saved_state_segment_and_its_gradients_equal_the_recurrence():
    """Several recomputed segments (STATE_EVERY positions each) of several blocks: values and gradients."""
    length = 2 * ssd.STATE_EVERY + 37
    inputs = [t.requires_grad_() for t in scan_inputs(batch=1, length=length, heads=2, head_dim=4, groups=1, state=8)]
    got = ssd_scan_pure(*inputs, block_len=48)  # 48 does not divide STATE_EVERY: segments of 5 blocks
    weights = torch.randn(got.shape, generator=torch.Generator().manual_seed(5))
    got_grads = torch.autograd.grad((got * weights).sum(), inputs)
    expected = step_by_step_scan(*inputs)
    expected_grads = torch.autograd.grad((expected * weights).sum(), inputs)
    assert (got - expected).abs().max().item() < 1e-5
    for name, a, b in zip("x dt A B C".split(), got_grads, expected_grads):
        assert b.abs().max() > 1e-3, name
        assert ((a - b).abs().max() / b.abs().max()).item() < 1e-5, name


class PretendCuda(torch.Tensor):
    """A CPU tensor that says it is on CUDA, to see which way `ssd_scan` dispatches."""

    @property
    def is_cuda(self):
        return True


class RecordingKernel:
    """Stands in for mamba_chunk_scan_combined: records its arguments, returns a marked result."""

    def __init__(self):
        self.calls = []

    def __call__(self, x, dt, A, B, C, chunk_size):
        self.calls.append({"x": x, "dt": dt, "A": A, "B": B, "C": C, "chunk_size": chunk_size})
        return torch.full(x.shape, 7.0)


def test_scan_calls_the_mamba_ssm_kernel_on_cuda_with_the_scan_inputs(monkeypatch):
    kernel = RecordingKernel()
    monkeypatch.setattr(ssd, "mamba_ssm_scan_kernel", lambda: kernel)
    x, dt, A, B, C = scan_inputs(length=40)
    strided_B = B.transpose(2, 3).contiguous().transpose(2, 3)  # same values, not contiguous
    # A in float64 and B not contiguous: the kernel gets A in float32 and contiguous tensors.
    out = ssd_scan(x.as_subclass(PretendCuda), dt, A.double(), strided_B, C, block_len=16)
    assert torch.equal(out, torch.full(x.shape, 7.0))
    (call,) = kernel.calls
    assert call["chunk_size"] == 16
    assert torch.equal(call["x"], x) and torch.equal(call["dt"], dt) and torch.equal(call["C"], C)
    assert call["A"].dtype == torch.float32 and torch.equal(call["A"], A)
    assert not strided_B.is_contiguous() and call["B"].is_contiguous() and torch.equal(call["B"], B)


def test_scan_falls_back_to_the_pure_scan_off_cuda_when_disabled_or_without_mamba_ssm(monkeypatch):
    kernel = RecordingKernel()
    monkeypatch.setattr(ssd, "mamba_ssm_scan_kernel", lambda: kernel)
    x, dt, A, B, C = scan_inputs(length=40)
    pure = ssd_scan_pure(x, dt, A, B, C, block_len=16)
    assert torch.equal(ssd_scan(x, dt, A, B, C, block_len=16), pure)  # a CPU tensor
    assert torch.equal(ssd_scan(x.as_subclass(PretendCuda), dt, A, B, C, block_len=16, use_kernels=False), pure)
    assert kernel.calls == []
    monkeypatch.setattr(ssd, "mamba_ssm_scan_kernel", lambda: None)  # mamba_ssm not installed
    assert torch.equal(ssd_scan(x.as_subclass(PretendCuda), dt, A, B, C, block_len=16), pure)
    with pytest.raises(ValueError, match=r"dt must be"):  # the kernel path checks shapes too
        monkeypatch.setattr(ssd, "mamba_ssm_scan_kernel", lambda: kernel)
        ssd_scan(x.as_subclass(PretendCuda), dt[:, :9], A, B, C)


def test_a_zero_step_size_skips_the_step_exactly():
    """dt = 0 leaves the state untouched: the other steps' outputs equal those of the sequence without it."""
    x, dt, A, B, C = scan_inputs(batch=1, length=60)
    keep = torch.ones(60, dtype=torch.bool)
    keep[[5, 17, 18, 19, 40]] = False
    masked = ssd_scan_pure(x, dt * keep[None, :, None], A, B, C, block_len=16)
    shortened = ssd_scan_pure(x[:, keep], dt[:, keep], A, B[:, keep], C[:, keep], block_len=16)
    torch.testing.assert_close(masked[:, keep], shortened, atol=1e-5, rtol=1e-5)


def test_scan_rejects_mismatched_shapes():
    x, dt, A, B, C = scan_inputs(length=10)
    with pytest.raises(ValueError, match=r"dt must be \(2, 10, 4\)"):
        ssd_scan_pure(x, dt[:, :9], A, B, C)
    with pytest.raises(ValueError, match="4 heads cannot be split over 3 groups"):
        ssd_scan_pure(x, dt, A, B[..., :1, :].expand(2, 10, 3, 16), C[..., :1, :].expand(2, 10, 3, 16))


def reference_mixer(mixer: Mamba2Mixer, u: torch.Tensor) -> torch.Tensor:
    """Mamba2 written out with loops: split in_proj into z | xBC | dt, causal conv, SSM, gated group RMSNorm."""
    d, heads, n = mixer.d_inner, mixer.heads, mixer.n_groups * mixer.state_size
    projected = u @ mixer.in_proj.weight.T
    z, xBC, dt = projected[..., :d], projected[..., d:2 * d + 2 * n], projected[..., 2 * d + 2 * n:]
    kernel = mixer.conv1d.weight.shape[-1]
    conv = torch.zeros_like(xBC) + mixer.conv1d.bias
    for t in range(u.shape[1]):
        for j in range(kernel):
            source = t - (kernel - 1) + j
            if source >= 0:
                conv[:, t] += mixer.conv1d.weight[:, 0, j] * xBC[:, source]
    xBC = F.silu(conv)
    x, B, C = xBC[..., :d], xBC[..., d:d + n], xBC[..., d + n:]
    shape = (*u.shape[:2], mixer.n_groups, mixer.state_size)
    x = x.reshape(*u.shape[:2], heads, mixer.head_dim)
    y = step_by_step_scan(x, F.softplus(dt + mixer.dt_bias), -torch.exp(mixer.A_log), B.reshape(shape), C.reshape(shape))
    y = (y + mixer.D[:, None] * x).reshape(*u.shape[:2], d) * F.silu(z)
    groups = y.view(*u.shape[:2], mixer.n_groups, -1)
    y = (groups / torch.sqrt(groups.pow(2).mean(-1, keepdim=True) + 1e-5)).view_as(y) * mixer.norm.weight
    return y @ mixer.out_proj.weight.T


@torch.no_grad()
def test_mixer_equals_mamba2_written_out_step_by_step():
    torch.manual_seed(0)
    mixer = Mamba2Mixer(24, head_dim=8, state_size=6, expand=2, conv_kernel=4, n_groups=2, scan_block=8)
    u = torch.randn(2, 30, 24)
    expected = reference_mixer(mixer, u)
    assert (mixer(u) - expected).abs().max().item() < 1e-5


def test_mixer_gradients_through_recomputed_slices_equal_the_written_out_mixer(monkeypatch):
    """The convolution and the gated output are recomputed in backward, the latter in slices of positions."""
    monkeypatch.setattr(mamba2, "FLOAT32_SLICE_ELEMENTS", 2 * 7 * 48)  # slices of 7 positions for batch 2, d_inner 48
    torch.manual_seed(0)
    mixer = Mamba2Mixer(24, head_dim=8, state_size=6, expand=2, conv_kernel=4, n_groups=2, scan_block=8)
    with torch.no_grad():
        mixer.D.add_(0.3 * torch.randn_like(mixer.D))
    u = torch.randn(2, 30, 24, requires_grad=True)
    weights = torch.randn(2, 30, 24)
    got = mixer(u)
    got_grads = torch.autograd.grad((got * weights).sum(), [u, *mixer.parameters()])
    expected = reference_mixer(mixer, u)
    expected_grads = torch.autograd.grad((expected * weights).sum(), [u, *mixer.parameters()])
    assert (got - expected).abs().max().item() < 1e-5
    names = ["u"] + [name for name, _ in mixer.named_parameters()]
    for name, a, b in zip(names, got_grads, expected_grads):
        assert b.abs().max() > 1e-4, name
        assert ((a - b).abs().max() / b.abs().max()).item() < 1e-4, name


@torch.no_grad()
def test_mixer_outputs_ignore_whatever_sits_in_invalid_positions():
    torch.manual_seed(0)
    mixer = Mamba2Mixer(24, head_dim=8, state_size=6, scan_block=8)
    u = torch.randn(2, 40, 24)
    valid = torch.ones(2, 40, dtype=torch.bool)
    valid[0, 10:14] = False  # a hole inside the sequence
    valid[1, 31:] = False  # a padded tail
    junk = torch.where(valid[..., None], u, 1000 * torch.randn_like(u))
    torch.testing.assert_close(mixer(junk, valid)[valid], mixer(u, valid)[valid], atol=1e-5, rtol=1e-5)
    assert (mixer(junk)[0, 14:] - mixer(u)[0, 14:]).abs().max() > 1  # without the mask the junk leaks


@torch.no_grad()
def test_chunk_pooling_gives_padded_frames_no_weight():
    compressor = tiny_mambamia(chunk=5)
    layer = compressor.model.layers[0]
    seq = torch.randn(1, 2 * 6, 24)  # two chunks of 5 frames, each followed by its query slot
    frame_mask = torch.tensor([[[True] * 5, [True, True, False, False, False]]])
    junk = seq.clone()
    junk[0, 8:11] = 1000.0  # the three padded frames of the second chunk
    pooled, pooled_junk = layer.pool_chunks(seq, frame_mask), layer.pool_chunks(junk, frame_mask)
    torch.testing.assert_close(pooled_junk[0, [5, 11]], pooled[0, [5, 11]])
    # The query moves towards a weighted mean of the two valid frames only.
    query, frames = seq[0, 11], seq[0, 6:8]
    weights = torch.softmax(layer.weight_fc(query)[:2], dim=0)
    gate = torch.sigmoid(layer.gate_fc(query)).clamp(0.01, 0.99)
    torch.testing.assert_close(pooled[0, 11], gate * (weights @ frames) + (1 - gate) * query)


@torch.no_grad()
def test_a_fresh_layer_starts_as_a_chunk_average():
    layer = build_compressor({"type": "mambamia", "chunk_size": 4, "head_dim": 8, "state_size": 8}, 16).model.layers[0]
    seq = torch.randn(1, 2 * 5, 16)
    frame_mask = torch.tensor([[[True] * 4, [True, False, False, False]]])
    pooled = layer.pool_chunks(seq, frame_mask)
    gate = torch.sigmoid(torch.tensor(2.0))
    torch.testing.assert_close(pooled[0, 4], gate * seq[0, :4].mean(0) + (1 - gate) * seq[0, 4])
    torch.testing.assert_close(pooled[0, 9], gate * seq[0, 5] + (1 - gate) * seq[0, 9])
    assert torch.equal(layer(seq, frame_mask, torch.ones(1, 10, dtype=torch.bool)), pooled)  # mixer adds 0 yet


def tiny_mambamia(chunk=5, layers=2, seed=0) -> MambaMiaCompressor:
    torch.manual_seed(seed)
    compressor = MambaMiaCompressor(32, chunk_size=chunk, hidden_size=24, num_layers=layers, head_dim=8,
                                    state_size=16, scan_block=8)
    with torch.no_grad():  # gates and conv biases away from their init so every path matters
        for p in compressor.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return compressor.eval()


def test_padded_items_give_exactly_what_they_give_alone():
    compressor = tiny_mambamia(chunk=5)
    torch.manual_seed(1)
    items = [torch.randn(n, 32) for n in (7, 13, 25, 1)]
    padded = torch.nn.utils.rnn.pad_sequence(items, batch_first=True, padding_value=float("nan"))  # junk
    lengths = torch.tensor([7, 13, 25, 1])
    batched, new_lengths = compressor(padded, lengths)
    assert batched.shape == (4, 5, 32)
    assert new_lengths.tolist() == [2, 3, 5, 1]  # ceil(n / 5): partial last chunks are kept, not dropped
    for i, item in enumerate(items):
        alone, alone_length = compressor(item[None], torch.tensor([len(item)]))
        assert alone_length.tolist() == [new_lengths[i]]
        torch.testing.assert_close(batched[i, :new_lengths[i]], alone[0], atol=1e-5, rtol=1e-5)
        assert torch.all(batched[i, new_lengths[i]:] == 0)


def test_padding_gives_finite_gradients():
    compressor = tiny_mambamia(chunk=5).train()
    padded = torch.randn(2, 13, 32)
    out, lengths = compressor(padded, torch.tensor([13, 4]))
    out.sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in compressor.parameters())
    assert compressor.query_token.grad.abs().sum() > 0 and compressor.model.layers[0].mixer.A_log.grad.abs().sum() > 0


@torch.no_grad()
def test_each_output_token_sees_its_chunk_and_earlier_ones_only():
    compressor = tiny_mambamia(chunk=5)
    x = torch.randn(1, 13, 32)
    base, _ = compressor(x, torch.tensor([13]))
    changed = x.clone()
    changed[0, 12] += 1.0  # the last token, alone in the last (partial) chunk
    after, _ = compressor(changed, torch.tensor([13]))
    torch.testing.assert_close(after[0, :2], base[0, :2], atol=1e-6, rtol=0)
    assert (after[0, 2] - base[0, 2]).abs().max() > 1e-3  # not truncated: it reaches the output


def omni_compressor_state_dict(llm=32, inner=24, chunk=5, layers=1, head_dim=8, state=16, groups=1, kernel=4):
    """Tensors named and shaped as the Omni checkpoint's model.video_audio_compressor (docs/hcx-omni-8b-facts.md)."""
    d_inner = 2 * inner
    heads = d_inner // head_dim
    conv_dim = d_inner + 2 * groups * state
    g = torch.Generator().manual_seed(0)
    shapes = {
        "input_proj.weight": (inner, llm), "input_proj.bias": (inner,), "query_token": (inner,),
        "input_norm.weight": (inner,), "input_norm.bias": (inner,),
        "output_proj.weight": (llm, inner), "output_proj.bias": (llm,), "model.norm_f.weight": (inner,),
    }
    for i in range(layers):
        shapes.update({
            f"model.layers.{i}.norm.weight": (inner,),
            f"model.layers.{i}.mixer.in_proj.weight": (2 * d_inner + 2 * groups * state + heads, inner),
            f"model.layers.{i}.mixer.conv1d.weight": (conv_dim, 1, kernel),
            f"model.layers.{i}.mixer.conv1d.bias": (conv_dim,),
            f"model.layers.{i}.mixer.dt_bias": (heads,), f"model.layers.{i}.mixer.A_log": (heads,),
            f"model.layers.{i}.mixer.D": (heads,), f"model.layers.{i}.mixer.norm.weight": (d_inner,),
            f"model.layers.{i}.mixer.out_proj.weight": (inner, d_inner),
            f"model.layers.{i}.weight_fc.weight": (chunk, inner), f"model.layers.{i}.weight_fc.bias": (chunk,),
            f"model.layers.{i}.gate_fc.weight": (1, inner), f"model.layers.{i}.gate_fc.bias": (1,),
        })
    return {name: 0.1 * torch.randn(shape, generator=g) for name, shape in shapes.items()}


def test_a_state_dict_with_the_omni_compressor_names_loads_strictly():
    state = omni_compressor_state_dict()
    assert state["model.layers.0.mixer.in_proj.weight"].shape == (2 * 48 + 2 * 16 + 6, 24)  # 2*d_inner + 2*G*N + heads
    compressor = build_compressor({"type": "mambamia", "chunk_size": 5, "hidden_size": 24, "head_dim": 8,
                                   "state_size": 16}, 32)
    compressor.load_state_dict(state, strict=True)
    assert torch.equal(compressor.model.layers[0].mixer.A_log, state["model.layers.0.mixer.A_log"])
    out, lengths = compressor(torch.randn(1, 12, 32), torch.tensor([12]))
    assert out.shape == (1, 3, 32) and lengths.tolist() == [3]


def test_the_real_omni_sizes_give_the_checkpoint_shapes():
    with torch.device("meta"):
        compressor = build_compressor({"type": "mambamia", "chunk_size": 25, "hidden_size": 3072, "state_size": 128},
                                      4096)
    shapes = {name: tuple(p.shape) for name, p in compressor.state_dict().items()}
    assert shapes["model.layers.0.mixer.in_proj.weight"] == (12640, 3072)
    assert shapes["model.layers.0.mixer.conv1d.weight"] == (6144 + 256, 1, 4)
    assert shapes["model.layers.0.mixer.A_log"] == (96,)
    assert shapes["model.layers.0.weight_fc.weight"] == (25, 3072)
    assert shapes["input_proj.weight"] == (3072, 4096) and shapes["output_proj.weight"] == (4096, 3072)


@pytest.mark.parametrize("spec, message", [
    ({"chunk_size": 0}, "chunk_size must be an integer >= 1, got 0"),
    ({"chunk_size": -3}, "chunk_size must be an integer >= 1, got -3"),
    ({"chunk_size": 2.5}, "chunk_size must be an integer >= 1, got 2.5"),
    ({"hidden_size": 40}, r"expand \* hidden_size = 2 \* 40 = 80 is not divisible by head_dim 64"),
    ({"hidden_size": 96, "head_dim": 64, "n_groups": 2}, "3 heads are not divisible by n_groups 2"),
    ({"state_size": 0}, "state_size must be an integer >= 1, got 0"),
    ({"num_layers": 0}, "num_layers must be an integer >= 1, got 0"),
    ({"chunk": 25}, r"unknown settings \['chunk'\]"),
])
def test_bad_mambamia_configs_raise_clear_errors(spec, message):
    with pytest.raises(ValueError, match=message):
        build_compressor({"type": "mambamia", **spec}, 64)


def test_the_default_llm_width_must_split_into_heads():
    with pytest.raises(ValueError, match="is not divisible by head_dim 64"):
        build_compressor({"type": "mambamia"}, 48)  # d_inner 96 is not a multiple of 64
    assert build_compressor({"type": "mambamia"}, 576).model.layers[0].mixer.heads == 18  # SmolLM2's width


def model_with_sensor_compressor(tokenizer, compressor):
    from hcx_extend import OmniForCausalLM, align_tokens, preset_config

    config = preset_config("tiny-hcx-omni")
    config.text_config.vocab_size = 512
    for modality in config.modalities.values():
        modality.token_id = None
    config.modality("sensor").compressor = compressor
    torch.manual_seed(0)
    model = OmniForCausalLM(config).eval()
    align_tokens(model, tokenizer)
    return model


@pytest.mark.parametrize("compressor", [
    {"type": "mambamia", "chunk_size": 4, "head_dim": 16, "state_size": 8},
    {"type": "avgpool", "chunk_size": 4},
    {"type": "none"},
])
def test_placeholder_counts_equal_compressed_lengths_through_the_model(tokenizer, compressor):
    from hcx_extend import OmniProcessor

    model = model_with_sensor_compressor(tokenizer, compressor)
    processor = OmniProcessor(tokenizer, model.config)
    sensor = [torch.randn(n, 6) for n in (20, 7, 33)]
    batch = processor([[{"role": "user", "content": "<sensor> then <sensor>?"}],
                       [{"role": "user", "content": "<sensor> what?"}]], {"sensor": sensor})
    token_id = model.config.modality("sensor").token_id
    per_row = (batch["input_ids"] == token_id).sum(1).tolist()
    expected = [20 + 7, 33] if compressor["type"] == "none" else [math.ceil(20 / 4) + math.ceil(7 / 4), math.ceil(33 / 4)]
    assert per_row == expected
    with torch.no_grad():
        encoded = model.encode_modality("sensor", batch["modality_inputs"]["sensor"])
        assert [len(e) for e in encoded] == ([20, 7, 33] if compressor["type"] == "none" else [5, 2, 9])
        logits = model(**batch).logits  # the splice checks counts: a mismatch would raise here
    assert torch.isfinite(logits).all()


def test_new_encoder_training_trains_the_compressor(tokenizer):
    from hcx_extend import OmniProcessor
    from hcx_extend.data.examples import Example
    from hcx_extend.training import TrainConfig, Trainer

    model = model_with_sensor_compressor(tokenizer, {"type": "mambamia", "chunk_size": 4, "head_dim": 16,
                                                     "state_size": 8})
    processor = OmniProcessor(tokenizer, model.config)
    g = torch.Generator().manual_seed(0)
    examples = [Example([{"role": "user", "content": "<sensor> which way?"},
                         {"role": "assistant", "content": "up" if i % 2 else "down"}],
                        {"sensor": [torch.randn(10 + i, 6, generator=g)]}) for i in range(8)]
    before = {n: p.detach().clone() for n, p in model.named_parameters() if n.startswith("model.sensor_compressor.")}
    # No weight decay: a parameter then changes only if gradients reach it.
    config = TrainConfig(strategy="new-encoder", modalities=["sensor"], epochs=2, batch_size=4, learning_rate=1e-2,
                         weight_decay=0.0, progress=False)
    result = Trainer(model, processor, examples, config, log=lambda message: None).train()
    assert result.steps == 4
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert set(before) <= trained
    assert not any(n.startswith("model.language_model.") for n in trained)
    after = dict(model.named_parameters())
    for name in ("query_token", "model.layers.0.mixer.A_log", "model.layers.0.weight_fc.weight",
                 "model.layers.0.gate_fc.bias", "output_proj.weight"):
        full = f"model.sensor_compressor.{name}"
        assert not torch.equal(after[full].detach(), before[full]), f"{full} did not change"
