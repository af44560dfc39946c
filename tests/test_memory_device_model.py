"""The estimator's device model: CUDA allocator rounding, cuBLAS workspaces, attention kernels and their buffers.

Every expected value is computed by hand from the documented rules (docs/memory.md, "The device model").
"""

import pytest
import torch
import torch.nn.functional as F

from hcx_extend.config import OmniConfig
from hcx_extend.memory import DeviceModel, Workload, estimate_memory
from hcx_extend.memory.attention_kernels import attention_stand_in
from hcx_extend.memory.device_model import cublas_workspace_bytes
from hcx_extend.memory.recorders import LiveBytes

META = torch.device("meta")
HOPPER = DeviceModel.cuda(capability=(9, 0), cublas_config=":4096:8", workspaces_kept=True)  # torch <= 2.14 on an H100
# A text-only LLM with grouped-query attention (4 query heads share 2 key/value heads), head_dim 16.
GQA_LLM = {"model_type": "hyperclovax", "vocab_size": 1000, "hidden_size": 64, "intermediate_size": 128,
           "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
           "max_position_embeddings": 1024, "tie_word_embeddings": False}


def _qkv(batch, heads, kv_heads, length, head_dim, dtype, requires_grad=False):
    def make(h):
        return torch.empty(batch, h, length, head_dim, device=META, dtype=dtype, requires_grad=requires_grad)

    return make(heads), make(kv_heads), make(kv_heads)


def test_cuda_blocks_are_requests_rounded_up_to_512_bytes():
    assert [HOPPER.block_bytes(n) for n in (0, 1, 512, 513, 1_000_001)] == [0, 512, 512, 1024, 1954 * 512]
    assert [DeviceModel.cpu().block_bytes(n) for n in (0, 1, 513)] == [0, 1, 513]


def test_cublas_workspace_follows_cublas_workspace_config():
    assert cublas_workspace_bytes(None, (9, 0)) == 4096 * 1024 * 8 == 33_554_432  # Hopper: 32 MiB
    assert cublas_workspace_bytes(None, (8, 0)) == 4096 * 1024 * 2 + 16 * 1024 * 8 == 8_519_680
    assert cublas_workspace_bytes(":16:8", (9, 0)) == 131_072
    with pytest.raises(ValueError, match="SIZE_KIB:COUNT"):
        cublas_workspace_bytes(":4096", (9, 0))
    # One workspace per thread that runs matmuls: forward's and autograd's in training, one in a prefill.
    assert HOPPER.persistent_bytes(training=True) == 2 * 33_554_432
    assert HOPPER.persistent_bytes(training=False) == 33_554_432
    assert DeviceModel.cpu().persistent_bytes(training=True) == 0
    # PyTorch 2.15 binds a workspace only during a call unless TORCH_CUBLAS_WORKSPACE_CACHE=1: one at the peak.
    per_call = DeviceModel.cuda(capability=(9, 0), cublas_config=":4096:8", workspaces_kept=False)
    assert per_call.persistent_bytes(training=True) == per_call.persistent_bytes(training=False) == 33_554_432
    with pytest.raises(ValueError, match="unknown device"):
        DeviceModel.named("tpu")


@pytest.mark.parametrize("dtype, kv_heads, mask, head_dim, expected", [
    (torch.bfloat16, 2, False, 128, "flash"),      # grouped-query attention runs in FlashAttention-2
    (torch.bfloat16, 4, True, 128, "efficient"),   # a mask rules flash out
    (torch.float32, 4, False, 64, "efficient"),    # fp32: no flash kernel
    (torch.float32, 2, False, 64, "math"),         # fp32 + grouped-query: no fused kernel at all
    (torch.bfloat16, 2, True, 64, "math"),         # a mask + grouped-query
    (torch.float32, 4, False, 12, "math"),         # head size not a multiple of 8
])
def test_the_gpu_attention_kernel_is_chosen_as_pytorch_chooses_it(dtype, kv_heads, mask, head_dim, expected):
    query, key, value = _qkv(1, 4, kv_heads, 16, head_dim, dtype)
    attn_mask = torch.ones(1, 1, 1, 16, dtype=torch.bool, device=META) if mask else None
    assert HOPPER.attention_kernel(query, key, value, attn_mask, enable_gqa=kv_heads != 4) == expected
    assert DeviceModel.cpu().attention_kernel(query, key, value, attn_mask, enable_gqa=kv_heads != 4) == "cpu-flash"


def test_fused_kernels_backward_scratch_buffers():
    query, key, _ = _qkv(1, 32, 8, 2048, 128, torch.bfloat16)
    # float32 dq accumulator (1, 2048, 32, 128) + softmax sums (1, 32, 2048) + bf16 dk, dv over all 32 heads.
    flash = 4 * 2048 * 32 * 128 + 4 * 32 * 2048 + 2 * 2048 * 32 * 128 * 2
    assert HOPPER.attention_backward_scratch("flash", query, key) == flash == 67_371_008
    query, key, _ = _qkv(2, 4, 4, 100, 8, torch.float32)
    assert HOPPER.attention_backward_scratch("efficient", query, key) == 4 * 2 * 4 * 100  # delta only
    query, key, _ = _qkv(2, 4, 4, 100, 8, torch.bfloat16)
    assert HOPPER.attention_backward_scratch("efficient", query, key) == 4 * 2 * 4 * 100 + 4 * 2 * 100 * 4 * 8
    assert HOPPER.attention_backward_scratch("math", query, key) == 0


def test_fp32_grouped_query_attention_on_cuda_keeps_the_probabilities():
    """The math kernel materialises (batch, heads, L, S) scores and keeps the probabilities for backward;
    the CPU's flash kernel keeps neither."""
    probabilities = 1 * 4 * 256 * 256 * 4
    for device, low, high in ((HOPPER, probabilities, None), (DeviceModel.cpu(), 0, probabilities // 8)):
        query, key, value = _qkv(1, 4, 2, 256, 16, torch.float32, requires_grad=True)
        saved = []
        live = LiveBytes(device)
        with attention_stand_in(device), live, torch.autograd.graph.saved_tensors_hooks(
                lambda t: saved.append(t.untyped_storage().nbytes()) or t, lambda t: t):
            out = F.scaled_dot_product_attention(query, key, value, is_causal=True, enable_gqa=True)
        assert max(saved) >= low and (high is None or max(saved) < high)
        if device is HOPPER:
            assert live.peak >= 2 * probabilities  # scores and probabilities alive together in the softmax
        assert out.shape == (1, 4, 256, 16)


def test_a_flash_backward_holds_its_scratch_while_it_runs():
    query, key, value = _qkv(1, 32, 8, 2048, 128, torch.bfloat16, requires_grad=True)
    live = LiveBytes(HOPPER)
    with attention_stand_in(HOPPER), live:
        out = F.scaled_dot_product_attention(query, key, value, is_causal=True, enable_gqa=True)
        forward = live.live
        out.backward(torch.empty_like(out))
    scratch = HOPPER.attention_backward_scratch("flash", query, key)
    gradients = 2 * (query.numel() + key.numel() + value.numel())
    assert live.peak >= forward + scratch + gradients


def test_cuda_estimate_adds_workspaces_rounding_and_the_math_kernel_of_fp32_gqa():
    config = OmniConfig(text_config=dict(GQA_LLM))
    workload = Workload(batch=2, seq=512)
    cpu = estimate_memory(config, "inference", workload, dtype="fp32", device="cpu")
    cuda = estimate_memory(config, "inference", workload, dtype="fp32", device=HOPPER)
    assert (cpu.device, cpu.workspaces, cuda.device, cuda.workspaces) == ("cpu", 0, "cuda", 33_554_432)
    scores = 2 * 4 * 512 * 512 * 4  # (batch, heads, L, L) in fp32
    # A prefill's attention holds the scores and the probabilities at once on the GPU, never on the CPU.
    assert cuda.peak - cpu.peak - cuda.workspaces >= 2 * scores
    training = estimate_memory(config, "lora-all", workload, dtype="fp32", device=HOPPER)
    on_cpu = estimate_memory(config, "lora-all", workload, dtype="fp32", device="cpu")
    assert training.workspaces == 2 * 33_554_432
    # Each of the 2 layers saves its probabilities on the GPU, where the CPU kernel saves its output and
    # log-sum-exp instead: (2, 4, 512, 16) and (2, 4, 512) in fp32.
    cpu_kernel_keeps = 2 * 4 * 512 * 16 * 4 + 2 * 4 * 512 * 4
    gpu_rows, cpu_rows = (e.row("language_model.layers").activations for e in (training, on_cpu))
    assert gpu_rows - cpu_rows >= 2 * (scores - cpu_kernel_keeps)
