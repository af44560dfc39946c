"""MambaMia: the HyperCLOVA X Omni model's token compressor, in plain PyTorch (type ``mambamia``).

``T`` tokens become ``ceil(T / chunk_size)``: a learned query token is placed after every chunk of
``chunk_size`` tokens, Mamba2 blocks run over the interleaved sequence, and the query positions are
the output. Data path for ``x (items, T, llm_hidden)`` with ``K = chunk_size``, ``n = ceil(T / K)``::

    frames  = input_proj(x), padded to n*K          (items, n, K, hidden)
    seq     = input_norm([frames_1, q, frames_2, q, ..., frames_n, q])   (items, n*(K+1), hidden)
    for each layer:
        pool each chunk into its query slot (below), then  seq = seq + mixer(norm(seq))
    out     = output_proj(norm_f(seq)[query slots])  (items, n, llm_hidden)

Pooling a chunk (``MambaMiaLayer``), from the query slot's current value ``q`` and frames ``f_1..f_K``::

    w = softmax(weight_fc(q))                       over the chunk's valid frames
    g = clamp(sigmoid(gate_fc(q)), 0.01, 0.99)
    q <- g * sum_j w_j f_j + (1 - g) * q

Masks: frames beyond an item's length (the tail of its last chunk, and whole chunks when it is
batched with longer items) get zero softmax weight and are skipped by the mixer (see
`Mamba2Mixer`), so an item gives the same output alone or padded in a batch. Chunks that hold no
frame of an item come back as zeros and are not counted in ``new_lengths``.

Parameter names match the Omni checkpoint's ``model.video_audio_compressor``: ``input_proj``,
``query_token``, ``input_norm`` (LayerNorm, eps 1e-6), ``model.layers.N.{norm, mixer, weight_fc,
gate_fc}``, ``model.norm_f``, ``output_proj``. Omni's sizes: ``hidden_size`` 3072 for a 4096-wide LLM,
1 layer, head_dim 64, state_size 128, expand 2, conv_kernel 4, n_groups 1, chunk_size 25.
What the public code does not pin down and is chosen here: the gate weighs the pooled frames
(``g``) against the old query (``1 - g``), pooling acts on the residual stream before the layer's
RMSNorm, and a fresh compressor starts as a chunk average (see `MambaMiaLayer.reset_parameters`;
on the sequence task this trained much faster than a random start).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from hcx_extend.compressors.mamba2 import Mamba2Mixer
from hcx_extend.compressors.ssd import recompute_in_backward

# Defaults for small LLMs (SmolLM2-135M is 576 wide): the compressor works at the LLM's own width,
# one layer as in Omni, and a state of 64 (Omni: 128) since a 576-wide stream carries less.
MAMBAMIA_DEFAULTS: dict[str, Any] = {
    "chunk_size": 25,
    "hidden_size": None,  # None = the LLM hidden size
    "num_layers": 1,
    "head_dim": 64,
    "state_size": 64,
    "expand": 2,
    "conv_kernel": 4,
    "n_groups": 1,
    "scan_block": 64,
    "use_kernels": True,
}
GATE_RANGE = (0.01, 0.99)


class MambaMiaLayer(nn.Module):
    """Chunk pooling into the query slots, then a pre-norm residual Mamba2 mixer.

    Args:
        hidden_size: width of the interleaved sequence.
        chunk_size: frames per chunk ``K``; the sequence is laid out as ``n`` groups of ``K + 1``.
        mixer_settings: keyword arguments of `Mamba2Mixer` other than ``hidden_size``.
    """

    def __init__(self, hidden_size: int, chunk_size: int, mixer_settings: dict[str, Any]):
        super().__init__()
        self.chunk_size = chunk_size
        self.norm = nn.RMSNorm(hidden_size, eps=1e-5)
        self.mixer = Mamba2Mixer(hidden_size, **mixer_settings)
        self.weight_fc = nn.Linear(hidden_size, chunk_size)
        self.gate_fc = nn.Linear(hidden_size, 1)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Start as a chunk average: uniform pooling weights, a gate that mostly takes the pooled frames
        (sigmoid(2) = 0.88) and a mixer branch that adds nothing yet (zero ``out_proj``). Training moves
        away from there; a pretrained checkpoint (Omni's) overwrites all of it."""
        nn.init.zeros_(self.weight_fc.weight)
        nn.init.zeros_(self.weight_fc.bias)
        nn.init.zeros_(self.gate_fc.weight)
        nn.init.constant_(self.gate_fc.bias, 2.0)
        nn.init.zeros_(self.mixer.out_proj.weight)

    def pool_chunks(self, seq: torch.Tensor, frame_mask: torch.Tensor) -> torch.Tensor:
        """seq ``(items, n*(K+1), hidden)``, frame_mask ``(items, n, K)`` -> seq with each query slot pooled."""
        items, _, hidden = seq.shape
        groups = seq.view(items, -1, self.chunk_size + 1, hidden)
        frames, query = groups[:, :, :-1], groups[:, :, -1]
        logits = self.weight_fc(query).float()
        # finfo.min rather than -inf: a chunk with no valid frame gets uniform weights instead of NaN.
        logits = logits.masked_fill(~frame_mask, torch.finfo(logits.dtype).min)
        weights = torch.softmax(logits, dim=-1).to(frames.dtype) * frame_mask.to(frames.dtype)
        pooled = torch.einsum("bnk,bnkh->bnh", weights, frames)
        gate = torch.sigmoid(self.gate_fc(query)).clamp(*GATE_RANGE)
        query = gate * pooled + (1 - gate) * query
        return torch.cat([frames, query[:, :, None]], dim=2).view(items, -1, hidden)

    def forward(self, seq: torch.Tensor, frame_mask: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """seq ``(items, n*(K+1), hidden)``; frame_mask ``(items, n, K)``; valid ``(items, n*(K+1))``."""
        seq = self.pool_chunks(seq, frame_mask)
        # The RMSNorm works in float32; recomputing it in backward keeps none of its float32 copies.
        return seq + self.mixer(recompute_in_backward(self.norm, seq), valid)


class MambaMiaBackbone(nn.Module):
    """The layers and the final RMSNorm (``model.layers.N``, ``model.norm_f`` in the checkpoint)."""

    def __init__(self, hidden_size: int, chunk_size: int, num_layers: int, mixer_settings: dict[str, Any]):
        super().__init__()
        self.layers = nn.ModuleList(MambaMiaLayer(hidden_size, chunk_size, mixer_settings) for _ in range(num_layers))
        self.norm_f = nn.RMSNorm(hidden_size, eps=1e-5)

    def forward(self, seq: torch.Tensor, frame_mask: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """seq ``(items, n*(K+1), hidden)`` -> the query slots after the final norm, ``(items, n, hidden)``.

        The norm is per position, so it runs on the query slots only (1 in K+1 positions).
        """
        for layer in self.layers:
            seq = layer(seq, frame_mask, valid)
        items, chunks, chunk = frame_mask.shape
        return self.norm_f(seq.view(items, chunks, chunk + 1, -1)[:, :, -1])


class MambaMiaCompressor(nn.Module):
    """``(items, T, llm_hidden)`` with lengths -> ``(items, ceil(T / chunk_size), llm_hidden)`` and new lengths.

    Args:
        llm_hidden_size: width of the input and output (the LLM's hidden size).
        chunk_size: tokens per output token ``K`` (Omni: 25).
        hidden_size: internal width (None = ``llm_hidden_size``; Omni: 3072 for 4096).
        num_layers: MambaMia layers (Omni: 1).
        head_dim / state_size / expand / conv_kernel / n_groups / scan_block / use_kernels: the
            `Mamba2Mixer` settings.

    Raises:
        ValueError: ``chunk_size < 1``, a non-positive size, or a hidden size the heads do not divide
            (`mambamia_settings` and `Mamba2Mixer` say which).
    """

    def __init__(self, llm_hidden_size: int, chunk_size: int = 25, hidden_size: int | None = None,
                 num_layers: int = 1, **mixer_settings: Any):
        super().__init__()
        if not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size < 1:
            raise ValueError(f"mambamia: chunk_size must be an integer >= 1, got {chunk_size!r}")
        self.chunk_size = chunk_size
        hidden_size = llm_hidden_size if hidden_size is None else hidden_size
        for name, value in (("llm hidden size", llm_hidden_size), ("hidden_size", hidden_size), ("num_layers", num_layers)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"mambamia: {name} must be an integer >= 1, got {value!r}")
        self.input_proj = nn.Linear(llm_hidden_size, hidden_size)
        self.query_token = nn.Parameter(torch.empty(hidden_size))
        self.input_norm = nn.LayerNorm(hidden_size, eps=1e-6)
        self.model = MambaMiaBackbone(hidden_size, chunk_size, num_layers, mixer_settings)
        self.output_proj = nn.Linear(hidden_size, llm_hidden_size)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.query_token, std=0.02)

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x ``(items, T, llm_hidden)`` zero- or junk-padded, lengths ``(items,)`` -> ``(items, n, llm_hidden)``, ``(items,)``."""
        if x.dim() != 3:
            raise ValueError(f"mambamia: expected x of shape (items, tokens, hidden), got {tuple(x.shape)}")
        if lengths.shape != (x.shape[0],):
            raise ValueError(f"mambamia: lengths must be ({x.shape[0]},) for {x.shape[0]} items, got {tuple(lengths.shape)}")
        if lengths.numel() and int(lengths.max()) > x.shape[1]:
            raise ValueError(f"mambamia: a length in {lengths.tolist()} exceeds the {x.shape[1]} tokens given")
        items, tokens, _ = x.shape
        chunk = self.chunk_size
        chunks = max(1, math.ceil(tokens / chunk))
        lengths = lengths.to(x.device)
        positions = torch.arange(chunks * chunk, device=x.device)
        frame_mask = (positions[None, :] < lengths[:, None]).view(items, chunks, chunk)
        new_lengths = torch.div(lengths + chunk - 1, chunk, rounding_mode="floor")
        chunk_valid = torch.arange(chunks, device=x.device)[None, :] < new_lengths[:, None]

        frames = self.input_proj(x)  # projected before padding: the padded copy is then hidden_size wide, not llm's
        if chunks * chunk > tokens:
            frames = torch.nn.functional.pad(frames, (0, 0, 0, chunks * chunk - tokens))
        # masked_fill, not a product: padding may hold anything, NaN included, and must not leak.
        frames = frames.view(items, chunks, chunk, -1).masked_fill(~frame_mask[..., None], 0.0)
        query = self.query_token.to(frames.dtype).expand(items, chunks, 1, -1)
        seq = self.input_norm(torch.cat([frames, query], dim=2).flatten(1, 2))
        valid = torch.cat([frame_mask, chunk_valid[..., None]], dim=2).flatten(1, 2)

        queries = self.model(seq, frame_mask, valid)
        out = self.output_proj(queries).masked_fill(~chunk_valid[..., None], 0.0)
        return out, new_lengths


def mambamia_settings(spec: dict[str, Any]) -> dict[str, Any]:
    """The compressor spec merged over `MAMBAMIA_DEFAULTS`; unknown keys raise a ValueError listing the known ones."""
    known = set(MAMBAMIA_DEFAULTS) | {"type", "module"}
    unknown = set(spec) - known
    if unknown:
        raise ValueError(f"mambamia compressor: unknown settings {sorted(unknown)}; known: {sorted(known)}")
    return {**MAMBAMIA_DEFAULTS, **{k: v for k, v in spec.items() if k not in ("type", "module")}}


def build_mambamia(spec: dict[str, Any], llm_hidden_size: int) -> MambaMiaCompressor:
    """The registry builder: a `MambaMiaCompressor` for a ``{"type": "mambamia", ...}`` spec."""
    return MambaMiaCompressor(llm_hidden_size, **mambamia_settings(spec))
