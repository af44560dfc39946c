"""What a device's allocator counts that a trace of tensor shapes does not: the device model of the estimator.

The meta-device trace knows every tensor an operator creates and when it dies. What a GPU's
``torch.cuda.max_memory_allocated`` reports differs from that sum in four documented ways, and each
is one field or method of `DeviceModel`:

1. **Allocator rounding** (`DeviceModel.block_bytes`). PyTorch's CUDA caching allocator hands out
   blocks whose size is the request rounded up to a multiple of 512 bytes (``kMinBlockSize``), and at
   least 512 bytes; ``memory_allocated`` counts block sizes. (c10/cuda/CUDACachingAllocator.cpp,
   ``round_size``; docs: "CUDA semantics, memory management".) A large block (> 1 MiB) that is carved
   from a cached segment keeps the whole remainder when that remainder is 1 MiB or less (it is not
   split); that depends on the cache's history and is not modelled: it adds at most 1 MiB per live
   large block.
2. **cuBLAS workspaces** (`DeviceModel.blas_workspace`, `DeviceModel.persistent_bytes`). ATen gives
   every (cuBLAS handle, stream) pair a workspace allocated through the caching allocator on its first
   matmul and kept: ``CUBLAS_WORKSPACE_CONFIG`` (":SIZE_KiB:COUNT" pairs) sets its size; the default is
   ":4096:2:16:8" = 8,519,680 bytes, and 32 MiB on compute capability 9.x (Hopper: H100, H200;
   aten/src/ATen/cuda/CublasHandlePool.cpp, pytorch PRs #89027 and #120925). cuBLASLt shares that
   workspace in current builds (unified workspaces, PRs #145130 / #168175). Handles are per thread:
   a training step uses two, the caller's thread for forward and autograd's device thread for
   backward; a prefill uses one. The PyTorch 2.15 documentation describes a change: workspaces are
   kept only with ``TORCH_CUBLAS_WORKSPACE_CACHE=1``, otherwise bound for the duration of a call; then
   one workspace is counted (the one alive beside the matmul output at the peak).
3. **Which attention kernel runs** (`DeviceModel.attention_kernel`). On the meta device nothing
   chooses; the GPU's ``scaled_dot_product_attention`` picks the first kernel whose constraints hold
   (aten/src/ATen/native/transformers/cuda/sdp_utils.cpp): FlashAttention-2 (or cuDNN, which keeps
   the same buffers) for fp16/bf16 without an explicit mask and head size <= 256, grouped-query
   attention included; the memory-efficient kernel for fp16/bf16/fp32 with or without a mask, head
   size a multiple of 8, but *not* grouped-query attention; otherwise the math kernel, which
   materialises the ``(batch, heads, L, S)`` scores and keeps the probabilities for backward. The
   last case is what made fp32 models with grouped-query attention (the `small` validation config)
   use far more memory on an H200 than traced: ``enable_gqa`` attention in fp32 has no fused kernel.
   On the CPU, PyTorch's flash kernel takes every case (fp32 and bf16, masks, groups).
4. **Kernel scratch buffers** (`DeviceModel.attention_backward_scratch`): FlashAttention-2's backward
   allocates a float32 ``dq`` accumulator ``(batch, round128(L), heads, round32(head_dim))``, the
   softmax row sums ``(batch, heads, round128(L))`` and, under grouped-query attention, full-head
   ``dk``/``dv`` before summing them per group (flash_api.cpp, ``mha_bwd``); the memory-efficient
   kernel's backward allocates ``delta (batch, heads, L)`` in float32 and, for fp16/bf16, a float32
   ``dq`` accumulator. Their forward outputs (log-sum-exp, padded to 32 rows for the
   memory-efficient kernel) come from PyTorch's own meta kernels.

Not modelled: autocast's cast-weight cache (the estimator does not model mixed-precision autocast),
cuDNN convolution workspaces (chosen at run time by heuristics), NCCL buffers, the CUDA context
itself (not in ``memory_allocated``).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

import torch

SMALL_BLOCK = 512  # kMinBlockSize: every CUDA allocation is rounded up to a multiple of this
DEFAULT_CUBLAS_CONFIG = ":4096:2:16:8"  # ATen's default outside Hopper: 4 MiB x 2 + 16 KiB x 8
HOPPER_CUBLAS_CONFIG = ":4096:8"  # 32 MiB on compute capability 9.x
KERNELS = ("cpu-flash", "flash", "efficient", "math")


def cublas_workspace_bytes(config: str | None, capability: tuple[int, int] = (9, 0)) -> int:
    """Bytes of one cuBLAS workspace for a ``CUBLAS_WORKSPACE_CONFIG`` value (None: ATen's default).

    ``":4096:8"`` is 8 buffers of 4096 KiB = 33,554,432 bytes; the default is ":4096:8" on compute
    capability 9.x and ":4096:2:16:8" (8,519,680 bytes) elsewhere.

    Raises:
        ValueError: a value that is not ":SIZE:COUNT" pairs.
    """
    if config is None:
        config = HOPPER_CUBLAS_CONFIG if capability[0] == 9 else DEFAULT_CUBLAS_CONFIG
    pairs = re.findall(r":(\d+):(\d+)", config)
    if not pairs or "".join(f":{size}:{count}" for size, count in pairs) != config.strip():
        raise ValueError(f"CUBLAS_WORKSPACE_CONFIG={config!r} is not ':SIZE_KIB:COUNT' pairs (e.g. ':4096:8')")
    return sum(int(size) * 1024 * int(count) for size, count in pairs)


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


@dataclass(frozen=True)
class DeviceModel:
    """Allocator and kernel facts of one device kind (see the module docstring).

    Attributes:
        name: "cpu" or "cuda".
        block: allocations are rounded up to a multiple of this many bytes (1 = exact).
        blas_workspace: bytes of one cuBLAS workspace per (thread, stream) (0 on the CPU).
        workspaces_kept: each (thread, stream) keeps its workspace (PyTorch up to 2.14, or
            ``TORCH_CUBLAS_WORKSPACE_CACHE=1``); False: a workspace lives only during a call.
    """

    name: str = "cpu"
    block: int = 1
    blas_workspace: int = 0
    workspaces_kept: bool = True

    @classmethod
    def cpu(cls) -> DeviceModel:
        """The CPU: exact allocation sizes (what the profiler's allocation events report), no workspaces."""
        return cls("cpu", 1, 0)

    @classmethod
    def cuda(cls, capability: tuple[int, int] | None = None, cublas_config: str | None = None,
             workspaces_kept: bool | None = None) -> DeviceModel:
        """An NVIDIA GPU under PyTorch's caching allocator.

        Args:
            capability: compute capability; None = the local GPU's when there is one, else (9, 0)
                (H100/H200, the cards this project validates on).
            cublas_config: a ``CUBLAS_WORKSPACE_CONFIG`` value; None = the environment's, else ATen's default.
            workspaces_kept: None = as the installed PyTorch does (kept up to 2.14; from 2.15 only with
                ``TORCH_CUBLAS_WORKSPACE_CACHE=1``).
        """
        if capability is None:
            capability = torch.cuda.get_device_capability() if torch.cuda.is_available() else (9, 0)
        if cublas_config is None:
            cublas_config = os.environ.get("CUBLAS_WORKSPACE_CONFIG")
        if workspaces_kept is None:
            version = tuple(int(part) for part in re.findall(r"\d+", torch.__version__)[:2])
            workspaces_kept = version < (2, 15) or os.environ.get("TORCH_CUBLAS_WORKSPACE_CACHE") == "1"
        return cls("cuda", SMALL_BLOCK, cublas_workspace_bytes(cublas_config, capability), workspaces_kept)

    @classmethod
    def named(cls, device: str | DeviceModel) -> DeviceModel:
        """``"cpu"`` / ``"cuda"`` (or ``"cuda:N"``) as a `DeviceModel`; a `DeviceModel` is returned as is."""
        if isinstance(device, DeviceModel):
            return device
        kind = str(device).split(":")[0]
        if kind == "cpu":
            return cls.cpu()
        if kind == "cuda":
            return cls.cuda()
        raise ValueError(f"unknown device {device!r} for the memory estimate; use cpu or cuda")

    # ------------------------------------------------------------------------------ allocator
    def block_bytes(self, nbytes: int) -> int:
        """Bytes the allocator counts for a request of ``nbytes`` (0 stays 0: nothing is allocated)."""
        if nbytes <= 0 or self.block == 1:
            return max(nbytes, 0)
        return _round_up(nbytes, self.block)

    def persistent_bytes(self, training: bool) -> int:
        """Workspace bytes at the step's peak: one cuBLAS workspace per thread that runs matmuls when they are
        kept (two in training: forward's thread and autograd's), else the one bound during a call."""
        return self.blas_workspace * (2 if training and self.workspaces_kept else 1)

    # ------------------------------------------------------------------------------ attention
    def attention_kernel(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                         mask: torch.Tensor | None, enable_gqa: bool = False) -> str:
        """The ``scaled_dot_product_attention`` kernel this device runs for these inputs (one of `KERNELS`).

        Shapes ``(batch, heads, L, head_dim)``; key/value may have fewer heads under ``enable_gqa``.
        """
        if self.name == "cpu":
            return "cpu-flash"
        head_dim, value_dim = query.shape[-1], value.shape[-1]
        grouped = key.shape[-3] != query.shape[-3]
        if grouped and not enable_gqa:
            return "math"  # PyTorch rejects mismatched heads in every fused kernel
        half = query.dtype in (torch.float16, torch.bfloat16)
        if half and mask is None and head_dim == value_dim and head_dim <= 256:
            return "flash"
        if not grouped and query.dtype in (torch.float16, torch.bfloat16, torch.float32) \
                and head_dim % 8 == 0 and value_dim % 8 == 0:
            return "efficient"
        return "math"

    def attention_backward_scratch(self, kernel: str, query: torch.Tensor, key: torch.Tensor) -> int:
        """Bytes a fused attention kernel's backward allocates besides the input gradients (freed after it)."""
        batch, heads, length, head_dim = query.shape
        if kernel == "flash":
            rows = _round_up(length, 128)
            scratch = 4 * batch * rows * heads * _round_up(head_dim, 32) + 4 * batch * heads * rows
            if key.shape[-3] != heads:  # grouped query attention: full-head dk and dv, summed afterwards
                scratch += 2 * batch * key.shape[-2] * heads * head_dim * query.element_size()
            return scratch
        if kernel == "efficient":
            scratch = 4 * batch * heads * length
            if query.dtype != torch.float32:
                scratch += 4 * batch * length * heads * head_dim
            return scratch
        return 0


def describe(device: DeviceModel) -> str:
    """One line for tables: what the device model adds."""
    if device.name == "cpu":
        return "cpu: exact sizes, no workspaces"
    kept = "kept per thread (2 in training)" if device.workspaces_kept else "bound per call"
    return (f"cuda: blocks rounded to {device.block} B, cuBLAS workspace {device.blas_workspace / 2**20:g} MiB {kept}, "
            "attention kernels chosen as on the GPU")


__all__ = ["DeviceModel", "KERNELS", "cublas_workspace_bytes", "describe"]
