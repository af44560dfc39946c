"""The Mamba2 state-space scan ("SSD", Dao & Gu 2024) in plain PyTorch, plus the mamba_ssm kernel when present.

Per head ``h`` with a scalar decay ``A_h < 0`` and a state ``S_t`` of shape ``(head_dim, state_size)``::

    S_t = exp(dt_t * A_h) * S_{t-1} + dt_t * x_t B_t^T        (S_{-1} = 0)
    y_t = S_t C_t

`ssd_scan_pure` computes this block by block: the sequence is cut into blocks of ``block_len``
steps; inside a block the outputs are one masked matrix product (the "quadratic" form, with
decays ``exp(sum_{k=s+1}^{t} dt_k A)``) plus the state carried in from the blocks before, and the
state at the block's end is handed to the next block (``ceil(length / block_len)`` iterations).

Memory: only one block's float32 work exists at a time (``(batch, heads, block_len, block_len)``
decays and ``(batch, block_len, heads, head_dim)`` products), never the whole sequence's. When
gradients are needed each block is recomputed in the backward pass (`recompute_in_backward`), so
what is kept for backward is the inputs (views, no copies) and one float32 state
``(batch, heads, head_dim, state_size)`` per `STATE_EVERY` positions. With the mixer's own
recomputation (`Mamba2Mixer`), the Omni-size compressor's training step (4 streams of 8,000 tokens,
96 heads of 64, state 128, bf16) peaks at 5.4 GB instead of 24.5 GB (``benchmarks/mambamia_memory.py``).

A step with ``dt_t = 0`` leaves the state exactly unchanged and adds nothing to it; callers mask
padding that way (`Mamba2Mixer` does).

`ssd_scan` dispatches to mamba_ssm's fused Triton kernel (``mamba_chunk_scan_combined``) when that
package imports and the tensors are on CUDA (`scan_kernel_for`), and to `ssd_scan_pure` otherwise.
"""

from __future__ import annotations

import functools
import os
from typing import Callable

import torch
from torch.utils.checkpoint import checkpoint

# Positions between the float32 states that `ssd_scan_pure` keeps for backward (rounded to whole blocks).
STATE_EVERY = 256


@functools.cache
def mamba_ssm_scan_kernel() -> Callable | None:
    """mamba_ssm's ``mamba_chunk_scan_combined``, or None when mamba_ssm (or Triton) is not installed.

    First-call cost: each of mamba_ssm's ~15 scan kernels (forward and backward) autotunes over 4 to 10
    Triton configs, compiling every one; the first training step took 89 s on an H200 that way (issue
    10). Unless ``MAMBA_DETERMINISTIC`` is set in the environment, mamba_ssm is switched to its
    deterministic mode before its kernels are imported: one fixed config per kernel (no autotuning)
    and deterministic reductions. The first step then compiles each kernel once, and Triton keeps the
    compiled kernels on disk (``TRITON_CACHE_DIR``, default ``~/.triton/cache``) for later processes.
    ``MAMBA_DETERMINISTIC=0`` restores mamba_ssm's autotuning.
    """
    try:
        from mamba_ssm.utils import determinism
    except ImportError:  # mamba_ssm absent, or a version without deterministic mode
        determinism = None
    if determinism is not None and "MAMBA_DETERMINISTIC" not in os.environ:
        determinism.set_deterministic_mode(True)
    try:
        from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined
    except ImportError:
        return None
    return mamba_chunk_scan_combined


def scan_kernel_for(x: torch.Tensor, use_kernels: bool) -> Callable | None:
    """The kernel `ssd_scan` should call for ``x``: mamba_ssm's when asked for, installed and ``x`` is on CUDA; else None."""
    if not use_kernels or not x.is_cuda:
        return None
    return mamba_ssm_scan_kernel()


def recompute_in_backward(function: Callable, *args: torch.Tensor):
    """``function(*args)``; when autograd records it, nothing inside is kept: it runs again in the backward pass.

    Only the arguments are held for backward (references, not copies). ``function`` must be
    deterministic (no dropout): the random state is not replayed.
    """
    if torch.is_grad_enabled() and any(isinstance(a, torch.Tensor) and a.requires_grad for a in args):
        return checkpoint(function, *args, use_reentrant=False, preserve_rng_state=False)
    return function(*args)


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


def scan_block(x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
               state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One block of the scan, in float32 (float64 when x is float64).

    Args:
        x ``(batch, l, heads, head_dim)``, dt ``(batch, l, heads)``, A ``(heads,)``, B and C
        ``(batch, l, groups, state_size)``: the block's slice of the scan inputs.
        state: ``(batch, groups, heads per group, head_dim, state_size)`` float32 (float64 for float64 x), the
            state before the block.

    Returns:
        y ``(batch, l, heads, head_dim)`` in x's dtype, and the state after the block's last step.
    """
    batch, length, heads, head_dim = x.shape
    groups = B.shape[2]
    per_group = heads // groups
    work = torch.float64 if x.dtype == torch.float64 else torch.float32  # float64 for reference runs
    # Layout (batch, groups, heads per group, l, ...): B and C broadcast over the heads of their group.
    xdt = (x.to(work) * dt.to(work)[..., None]).view(batch, length, groups, per_group, head_dim).permute(0, 2, 3, 1, 4)
    a = (dt.to(work) * A.to(work)).view(batch, length, groups, per_group).permute(0, 2, 3, 1)  # log-decay of each step
    a_cum = torch.cumsum(a, dim=-1)
    B = B.to(work).transpose(1, 2)[:, :, None]  # (b, g, 1, l, n)
    C = C.to(work).transpose(1, 2)[:, :, None]

    # Outputs from inputs of the same block, (C_t . B_s) exp(a_{s+1} + ... + a_t) dt_s x_s for s <= t,
    # plus the state carried in, decayed up to each step.
    y = (C @ B.transpose(-1, -2) * torch.exp(segment_sums(a))) @ xdt
    y = y + (C @ state.transpose(-1, -2)) * torch.exp(a_cum)[..., None]
    # The state after the block: the one carried in, decayed over the block, plus the block's own inputs.
    decay_to_end = torch.exp(a_cum[..., -1:] - a_cum)
    state = state * torch.exp(a_cum[..., -1])[..., None, None] + (xdt * decay_to_end[..., None]).transpose(-1, -2) @ B
    return y.permute(0, 3, 1, 2, 4).reshape(batch, length, heads, head_dim).to(x.dtype), state


def ssd_scan_pure(
    x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor, block_len: int = 64
) -> torch.Tensor:
    """The scan in plain PyTorch, one block at a time (`scan_block`), recomputed in backward.

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
    state = x.new_zeros(batch, groups, heads // groups, head_dim, state_size,
                        dtype=torch.float64 if x.dtype == torch.float64 else torch.float32)
    if length == 0:
        return x.new_zeros(x.shape)
    # Recomputed a segment of whole blocks at a time, so one state is kept per STATE_EVERY positions
    # whatever the block length. torch.split, not slicing: a slice's backward is a zero-filled copy of the
    # whole input, once per segment.
    segment = block_len * max(1, STATE_EVERY // block_len)
    outputs = []
    for x_part, dt_part, B_part, C_part in zip(*(t.split(segment, dim=1) for t in (x, dt, B, C))):
        y, state = recompute_in_backward(scan_segment, x_part, dt_part, A, B_part, C_part, state, block_len)
        outputs.append(y)
    return torch.cat(outputs, dim=1) if len(outputs) > 1 else outputs[0]


def scan_segment(x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                 state: torch.Tensor, block_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`scan_block` over consecutive blocks of ``block_len`` steps; same arguments and results."""
    outputs = []
    for x_part, dt_part, B_part, C_part in zip(*(t.split(block_len, dim=1) for t in (x, dt, B, C))):
        y, state = scan_block(x_part, dt_part, A, B_part, C_part, state)
        outputs.append(y)
    return (torch.cat(outputs, dim=1) if len(outputs) > 1 else outputs[0]), state


def ssd_scan(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    block_len: int = 64,
    use_kernels: bool = True,
) -> torch.Tensor:
    """`ssd_scan_pure`'s result, computed by mamba_ssm's kernel when `scan_kernel_for` gives one.

    Shapes and arguments as in `ssd_scan_pure`; the kernel gets ``chunk_size=block_len`` and A in
    float32. The two agree to float32 rounding: 1.2e-7 relative when the kernel runs in Triton's
    interpreter (exact float32); on a GPU Triton multiplies float32 in TF32 (see
    ``benchmarks/gpu_mambamia_check.py`` and docs/gpu.md).
    """
    kernel = scan_kernel_for(x, use_kernels)
    if kernel is None:
        return ssd_scan_pure(x, dt, A, B, C, block_len)
    check_scan_inputs(x, dt, A, B, C)
    return kernel(x.contiguous(), dt.contiguous(), A.float().contiguous(), B.contiguous(), C.contiguous(),
                  chunk_size=block_len)
