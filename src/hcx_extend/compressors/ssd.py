"""The Mamba2 state-space scan ("SSD", Dao & Gu 2024) in plain PyTorch, plus the mamba_ssm kernel when present.

Per head ``h`` with a scalar decay ``A_h < 0`` and a state ``S_t`` of shape ``(head_dim, state_size)``::

    S_t = exp(dt_t * A_h) * S_{t-1} + dt_t * x_t B_t^T        (S_{-1} = 0)
    y_t = S_t C_t

`ssd_scan_pure` computes this without a Python loop over time steps: the sequence is cut into
blocks of ``block_len`` steps; inside a block the outputs are one masked matrix product (the
"quadratic" form, with decays ``exp(sum_{k=s+1}^{t} dt_k A)``), and only the block-end states are
carried from block to block in a short loop (``ceil(length / block_len)`` iterations). It runs on
any device; the arithmetic is done in float32 whatever the input dtype.

A step with ``dt_t = 0`` leaves the state exactly unchanged and adds nothing to it; callers mask
padding that way (`Mamba2Mixer` does).

`ssd_scan` dispatches to mamba_ssm's fused Triton kernel (``mamba_chunk_scan_combined``) when that
package imports and the tensors are on CUDA, and to `ssd_scan_pure` otherwise.
"""

from __future__ import annotations

import functools
from typing import Callable

import torch
import torch.nn.functional as F


@functools.cache
def mamba_ssm_scan_kernel() -> Callable | None:
    """mamba_ssm's ``mamba_chunk_scan_combined``, or None when mamba_ssm (or Triton) is not installed."""
    try:
        from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined
    except ImportError:
        return None
    return mamba_chunk_scan_combined


def check_scan_inputs(x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor) -> None:
    """Raise a ValueError naming the first shape that does not fit the others."""
    if x.dim() != 4:
        raise ValueError(f"ssd scan: x must be (batch, length, heads, head_dim), got shape {tuple(x.shape)}")
    batch, length, heads, _ = x.shape
    if dt.shape != (batch, length, heads):
        raise ValueError(f"ssd scan: dt must be {(batch, length, heads)} to match x, got {tuple(dt.shape)}")
    if A.shape != (heads,):
        raise ValueError(f"ssd scan: A must be ({heads},) (one decay per head), got {tuple(A.shape)}")
    if B.dim() != 4 or B.shape[:2] != (batch, length) or B.shape != C.shape:
        raise ValueError(
            f"ssd scan: B and C must both be (batch={batch}, length={length}, groups, state_size), "
            f"got {tuple(B.shape)} and {tuple(C.shape)}"
        )
    if heads % B.shape[2]:
        raise ValueError(f"ssd scan: {heads} heads cannot be split over {B.shape[2]} groups; heads must be a multiple")


def segment_sums(a: torch.Tensor) -> torch.Tensor:
    """``out[..., t, s] = a[..., s+1] + ... + a[..., t]`` for ``s <= t`` and ``-inf`` above the diagonal.

    a ``(..., L)`` -> ``(..., L, L)``. Summed directly rather than as a difference of cumulative sums,
    so long blocks with strong decay lose no precision.
    """
    length = a.shape[-1]
    rows = a[..., :, None].expand(*a.shape, length)  # rows[..., k, s] = a[k]
    strictly_below = torch.tril(torch.ones(length, length, dtype=torch.bool, device=a.device), diagonal=-1)
    sums = torch.cumsum(rows.masked_fill(~strictly_below, 0.0), dim=-2)
    on_or_below = torch.tril(torch.ones(length, length, dtype=torch.bool, device=a.device))
    return sums.masked_fill(~on_or_below, float("-inf"))


def ssd_scan_pure(
    x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor, block_len: int = 64
) -> torch.Tensor:
    """The scan in plain PyTorch, blockwise.

    Args:
        x: ``(batch, length, heads, head_dim)`` inputs.
        dt: ``(batch, length, heads)`` step sizes, already positive (softplus applied); 0 = skip the step.
        A: ``(heads,)`` decay rates (negative).
        B, C: ``(batch, length, groups, state_size)``; head ``h`` uses group ``h // (heads // groups)``.
        block_len: steps per block (a speed/memory knob; the result does not depend on it).

    Returns:
        y ``(batch, length, heads, head_dim)`` in the dtype of ``x`` (no ``D`` skip term).

    Raises:
        ValueError: shapes that do not fit together, or ``block_len < 1``.
    """
    check_scan_inputs(x, dt, A, B, C)
    if block_len < 1:
        raise ValueError(f"ssd scan: block_len must be >= 1, got {block_len}")
    batch, length, heads, head_dim = x.shape
    groups, state_size = B.shape[2:]
    per_group = heads // groups
    pad = (-length) % block_len
    blocks = (length + pad) // block_len

    def blocked(t: torch.Tensor) -> torch.Tensor:
        """(batch, length, k, ...) -> (batch, k, blocks, block_len, ...), float32, zero-padded along length."""
        t = F.pad(t.float(), (0,) * (2 * (t.dim() - 2)) + (0, pad))
        t = t.view(batch, blocks, block_len, *t.shape[2:])
        return t.permute(0, 3, 1, 2, *range(4, t.dim())).contiguous()

    # Layout (batch, groups, heads per group, blocks, block_len, ...): B and C broadcast over the heads
    # of their group instead of being copied per head.
    xdt = blocked(x * dt[..., None]).view(batch, groups, per_group, blocks, block_len, head_dim)
    B = blocked(B)[:, :, None]  # (b, g, 1, c, l, n)
    C = blocked(C)[:, :, None]
    a = blocked(dt) * A.float()[None, :, None, None]  # (b, h, c, l): log-decay of each step
    a = a.view(batch, groups, per_group, blocks, block_len)
    a_cum = torch.cumsum(a, dim=-1)

    # 1. Outputs from inputs of the same block: (C_t . B_s) exp(a_{s+1} + ... + a_t) dt_s x_s, s <= t.
    y = (C @ B.transpose(-1, -2) * torch.exp(segment_sums(a))) @ xdt

    # 2. Each block's own contribution to the state at its last step.
    decay_to_end = torch.exp(a_cum[..., -1:] - a_cum)
    block_states = (xdt * decay_to_end[..., None]).transpose(-1, -2) @ B  # (b, g, z, c, p, n)

    # 3. Carry states across blocks: entering[c] is the state just before block c starts.
    block_decay = torch.exp(a_cum[..., -1])[..., None, None]  # (b, g, z, c, 1, 1)
    running = torch.zeros_like(block_states[:, :, :, 0])
    entering = []
    for c in range(blocks):
        entering.append(running)
        running = running * block_decay[:, :, :, c] + block_states[:, :, :, c]
    entering = torch.stack(entering, dim=3)  # (b, g, z, c, p, n)

    # 4. Outputs from the state carried in, decayed up to each step.
    y = y + (C @ entering.transpose(-1, -2)) * torch.exp(a_cum)[..., None]
    y = y.reshape(batch, heads, blocks * block_len, head_dim).transpose(1, 2)
    return y[:, :length].to(x.dtype)


def ssd_scan(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    block_len: int = 64,
    use_kernels: bool = True,
) -> torch.Tensor:
    """`ssd_scan_pure`'s result, computed by mamba_ssm's kernel when ``use_kernels`` and it can run.

    The kernel runs when mamba_ssm imports and ``x`` is on CUDA; shapes and arguments as in
    `ssd_scan_pure`. The two agree to float32 rounding (see ``benchmarks/gpu_mambamia_check.py``).
    """
    kernel = mamba_ssm_scan_kernel() if use_kernels and x.is_cuda else None
    if kernel is None:
        return ssd_scan_pure(x, dt, A, B, C, block_len)
    check_scan_inputs(x, dt, A, B, C)
    return kernel(x.contiguous(), dt.contiguous(), A.float().contiguous(), B.contiguous(), C.contiguous(),
                  chunk_size=block_len)
