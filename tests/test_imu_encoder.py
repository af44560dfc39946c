import pytest
import torch

from hcx_extend.encoders.imu import IMUEncoder


@pytest.mark.parametrize("stride,positions", [(1, "none"), (4, "none"), (3, "sinusoidal")])
@torch.no_grad()
def test_batched_output_equals_per_sample_output_under_padding(stride, positions):
    torch.manual_seed(0)
    encoder = IMUEncoder(in_channels=6, hidden_size=32, num_layers=2, num_heads=4, ffn_size=64, output_size=40,
                         stride=stride, positions=positions).eval()
    lengths = [37, 100, 5, 64]
    items = [torch.randn(n, 6) for n in lengths]
    padded = torch.nn.utils.rnn.pad_sequence(items, batch_first=True, padding_value=123.0)  # junk padding
    batched, out_lengths = encoder(padded, torch.tensor(lengths))
    assert out_lengths.tolist() == [-(-n // stride) for n in lengths]
    for i, item in enumerate(items):
        alone, alone_length = encoder(item[None], torch.tensor([item.shape[0]]))
        n = int(alone_length)
        assert n == out_lengths[i]
        assert torch.allclose(batched[i, :n], alone[0], atol=1e-5), f"item {i}"
        assert torch.all(batched[i, n:] == 0)


def test_attention_exposes_separate_q_k_v_o_projections():
    encoder = IMUEncoder(hidden_size=32, num_layers=1, num_heads=4, ffn_size=64, output_size=16)
    linear_names = {name.split(".")[-1] for name, m in encoder.named_modules() if isinstance(m, torch.nn.Linear)}
    assert {"q_proj", "k_proj", "v_proj", "o_proj"} <= linear_names


def test_bad_encoder_settings():
    with pytest.raises(ValueError, match="hidden_size 30 is not divisible by num_heads 4"):
        IMUEncoder(hidden_size=30, num_heads=4)
    with pytest.raises(ValueError, match="stride must be >= 1"):
        IMUEncoder(stride=0)
