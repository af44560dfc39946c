"""The Mamba2 mixer (Dao & Gu 2024) with a padding mask, named as in mamba_ssm's ``Mamba2`` module.

Data path for ``u (batch, length, hidden)``::

    z, xBC, dt = split(in_proj(u))                       widths d_inner, d_inner + 2*G*N, heads
    x, B, C    = split(SiLU(causal depthwise conv1d(xBC)))
    dt         = softplus(dt + dt_bias)                  one step size per head and position
    y          = SSD scan(x, dt, A = -exp(A_log), B, C) + D * x
    out        = out_proj(RMSNorm_groupwise(y * SiLU(z)) * norm.weight)

with ``d_inner = expand * hidden``, ``heads = d_inner / head_dim``, ``G = n_groups``, ``N = state_size``.

Padding: positions where ``valid`` is False get ``dt = 0`` (the state passes through them
unchanged) and a zero convolution input, so what sits in padded positions never reaches a valid
position's output; their own outputs are meaningless. Parameters: ``in_proj.weight`` (no bias),
``conv1d.{weight (conv_dim, 1, kernel), bias}``, ``dt_bias``, ``A_log``, ``D`` (one per head),
``norm.weight (d_inner,)``, ``out_proj.weight`` (no bias) — the names the Omni checkpoint uses.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from hcx_extend.compressors.ssd import recompute_in_backward, ssd_scan

# Elements of one float32 temporary of the gated output (64 MiB): positions are processed in slices this large.
FLOAT32_SLICE_ELEMENTS = 1 << 24


class GatedRMSNorm(nn.Module):
    """``RMSNorm(y * SiLU(z)) * weight``, normalised over groups of ``group_size`` channels.

    Args:
        width: channels (``d_inner``).
        group_size: channels per normalisation group (``d_inner / n_groups``); must divide ``width``.
        eps: added to the mean square.
    """

    def __init__(self, width: int, group_size: int, eps: float = 1e-5):
        super().__init__()
        if width % group_size:
            raise ValueError(f"gated RMSNorm: width {width} is not a multiple of group_size {group_size}")
        self.group_size = group_size
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(width))

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)

    def forward(self, y: torch.Tensor, z: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
        """y, z ``(..., width)`` -> ``(..., width)``; computed in float32, returned in y's dtype.

        ``weight`` replaces ``self.weight`` (a caller that recomputes this in backward passes it in).
        """
        weight = self.weight if weight is None else weight
        gated = y.float() * F.silu(z.float())
        groups = gated.view(*gated.shape[:-1], -1, self.group_size)
        normed = groups * torch.rsqrt(groups.pow(2).mean(-1, keepdim=True) + self.eps)
        return (normed.view_as(gated) * weight.float()).to(y.dtype)


class Mamba2Mixer(nn.Module):
    """One Mamba2 sequence mixer: ``(batch, length, hidden) -> (batch, length, hidden)``, causal.

    Args:
        hidden_size: input and output width.
        head_dim: channels per SSM head; ``expand * hidden_size`` must be a multiple of it.
        state_size: SSM state size ``N`` per head.
        expand: ``d_inner = expand * hidden_size``.
        conv_kernel: width of the causal depthwise convolution.
        n_groups: groups sharing ``B`` and ``C``; must divide the number of heads.
        scan_block: block length of the SSD scan (speed only).
        use_kernels: use mamba_ssm's scan kernel on CUDA when it is installed.

    Raises:
        ValueError: a size that is not a positive integer, ``expand * hidden_size`` not a multiple of
            ``head_dim``, or heads not a multiple of ``n_groups``.
    """

    def __init__(
        self,
        hidden_size: int,
        head_dim: int = 64,
        state_size: int = 64,
        expand: int = 2,
        conv_kernel: int = 4,
        n_groups: int = 1,
        scan_block: int = 64,
        use_kernels: bool = True,
    ):
        super().__init__()
        sizes = {"hidden_size": hidden_size, "head_dim": head_dim, "state_size": state_size, "expand": expand,
                 "conv_kernel": conv_kernel, "n_groups": n_groups, "scan_block": scan_block}
        for name, value in sizes.items():
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"mamba2 mixer: {name} must be an integer >= 1, got {value!r}")
        d_inner = expand * hidden_size
        if d_inner % head_dim:
            raise ValueError(
                f"mamba2 mixer: expand * hidden_size = {expand} * {hidden_size} = {d_inner} is not divisible by "
                f"head_dim {head_dim}; choose a hidden_size or head_dim so that it is"
            )
        heads = d_inner // head_dim
        if heads % n_groups:
            raise ValueError(f"mamba2 mixer: {heads} heads are not divisible by n_groups {n_groups}")
        self.d_inner, self.heads, self.head_dim = d_inner, heads, head_dim
        self.state_size, self.n_groups = state_size, n_groups
        self.scan_block, self.use_kernels = scan_block, use_kernels
        conv_dim = d_inner + 2 * n_groups * state_size
        self.in_proj = nn.Linear(hidden_size, 2 * d_inner + 2 * n_groups * state_size + heads, bias=False)
        self.conv1d = nn.Conv1d(conv_dim, conv_dim, conv_kernel, groups=conv_dim, padding=conv_kernel - 1)
        self.dt_bias = nn.Parameter(torch.empty(heads))
        self.A_log = nn.Parameter(torch.empty(heads))
        self.D = nn.Parameter(torch.empty(heads))
        self.norm = GatedRMSNorm(d_inner, d_inner // n_groups)
        self.out_proj = nn.Linear(d_inner, hidden_size, bias=False)
        self.reset_parameters()

    def reset_parameters(self, dt_min: float = 1e-3, dt_max: float = 0.1) -> None:
        """Mamba2's initialisation: ``softplus(dt_bias)`` log-uniform in [dt_min, dt_max], ``A`` uniform in [1, 16], ``D = 1``."""
        with torch.no_grad():
            dt = torch.exp(torch.rand(self.heads) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
            self.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # inverse of softplus
            self.A_log.copy_(torch.log(torch.empty(self.heads).uniform_(1.0, 16.0)))
            self.D.fill_(1.0)

    def forward(self, u: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
        """u ``(batch, length, hidden)``, valid ``(batch, length)`` bool (None = all valid) -> ``(batch, length, hidden)``.

        Memory: the convolution and everything after the scan (``D`` skip, gated norm, ``out_proj``)
        are recomputed in the backward pass (`recompute_in_backward`), so backward keeps only tensors of
        the input dtype and the scan's block states, no float32 copies; the float32 gated norm runs
        on slices of positions (`FLOAT32_SLICE_ELEMENTS`), so its temporaries stay small too.
        """
        batch, length, _ = u.shape
        groups_width = self.n_groups * self.state_size
        z, xBC, dt = torch.split(self.in_proj(u), [self.d_inner, self.d_inner + 2 * groups_width, self.heads], dim=-1)
        # A copy of z, so the whole in_proj output (2.06 x d_inner wide) need not live until backward.
        z = z.contiguous()
        if valid is not None:
            xBC = xBC.masked_fill(~valid[..., None], 0.0)
        xBC = recompute_in_backward(self._causal_conv, xBC, self.conv1d.weight, self.conv1d.bias)
        x, B, C = torch.split(xBC, [self.d_inner, groups_width, groups_width], dim=-1)
        dt = F.softplus(dt.float() + self.dt_bias.float())
        if valid is not None:
            dt = dt.masked_fill(~valid[..., None], 0.0)
        x = x.reshape(batch, length, self.heads, self.head_dim)
        y = ssd_scan(
            x, dt, -torch.exp(self.A_log.float()),
            B.reshape(batch, length, self.n_groups, self.state_size),
            C.reshape(batch, length, self.n_groups, self.state_size),
            block_len=self.scan_block, use_kernels=self.use_kernels,
        )
        # The gated norm works in float32; a slice of positions at a time keeps its copies small.
        step = max(1, FLOAT32_SLICE_ELEMENTS // (batch * self.d_inner))
        out = [recompute_in_backward(self._gated_output, y_part, x_part, self.D, z_part, self.norm.weight,
                                     self.out_proj.weight)
               for y_part, x_part, z_part in zip(y.split(step, dim=1), x.split(step, dim=1), z.split(step, dim=1))]
        return torch.cat(out, dim=1) if len(out) > 1 else out[0]

    def _causal_conv(self, xBC: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        """SiLU(causal depthwise conv1d) over time: ``(batch, length, conv_dim)`` -> same shape."""
        length = xBC.shape[1]
        return F.silu(F.conv1d(xBC.transpose(1, 2), weight, bias, padding=weight.shape[-1] - 1,
                               groups=weight.shape[0])[..., :length].transpose(1, 2))

    def _gated_output(self, y: torch.Tensor, x: torch.Tensor, D: torch.Tensor, z: torch.Tensor,
                      norm_weight: torch.Tensor, out_weight: torch.Tensor) -> torch.Tensor:
        """``out_proj(norm(y + D x, z))`` for y, x ``(batch, length, heads, head_dim)``, z ``(batch, length, d_inner)``."""
        batch, length = y.shape[:2]
        y = (y + x * D.to(x.dtype)[:, None]).reshape(batch, length, self.d_inner)
        return F.linear(self.norm(y, z, norm_weight), out_weight)
