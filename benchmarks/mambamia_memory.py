"""Peak memory of the pure-PyTorch MambaMia compressor at the Omni model's sizes, before and after issue 10.

Traced exactly on PyTorch's meta device (no weights, no GPU, a few seconds): a dispatch mode follows
every storage that an op creates until it is freed and keeps the peak, the way
``torch.cuda.max_memory_allocated`` does on a GPU, minus the allocator's rounding and kernel workspaces.
The model's weights and the input existed before and are not counted by the tracer; they are added
to the totals below.

* **before**: the code as of commit 1b6a80b (frozen below: the all-blocks-at-once SSD scan and the
  mixer that kept its float32 gated-norm intermediates), run in this same process;
* **after**: `hcx_extend.compressors` as it is now (block-by-block scan recomputed in backward,
  convolution and gated output recomputed in backward, see `compressors/ssd.py` and `mamba2.py`).

Workload (issue 10, ``benchmarks/gpu_mambamia_check.py``): 4 streams of 8,000 / 7,000 / 6,013 / 5,000
tokens of width 4096, compressor hidden 3072, one layer, 96 heads of 64, state 128, chunk 25, bf16
weights and activations, scan blocks of 256 (and of 64). Target: the training step's (forward +
backward) peak at most a quarter of before's. On the GPU the same peak measured 22.5 GB.

    python benchmarks/mambamia_memory.py            # writes benchmarks/results/mambamia_memory.txt too
"""

from __future__ import annotations

import argparse
import contextlib
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from hcx_extend.compressors import mamba2, mambamia
from hcx_extend.compressors.mambamia import MambaMiaCompressor
from hcx_extend.memory.recorders import LiveBytes

GB = 1e9
LENGTHS = (8000, 7000, 6013, 5000)
OMNI = {"llm_hidden_size": 4096, "chunk_size": 25, "hidden_size": 3072, "num_layers": 1, "head_dim": 64,
        "state_size": 128, "expand": 2, "n_groups": 1}


# ------------------------------------------------------------------------- the code before (commit 1b6a80b)
def _segment_sums(a: torch.Tensor) -> torch.Tensor:
    length = a.shape[-1]
    rows = a[..., :, None].expand(*a.shape, length)
    strictly_below = torch.tril(torch.ones(length, length, dtype=torch.bool, device=a.device), diagonal=-1)
    sums = torch.cumsum(rows.masked_fill(~strictly_below, 0.0), dim=-2)
    on_or_below = torch.tril(torch.ones(length, length, dtype=torch.bool, device=a.device))
    return sums.masked_fill(~on_or_below, float("-inf"))


def baseline_ssd_scan_pure(x, dt, A, B, C, block_len=64):
    """The scan before: every block's float32 decays and products at once."""
    batch, length, heads, head_dim = x.shape
    groups, state_size = B.shape[2:]
    per_group = heads // groups
    pad = (-length) % block_len
    blocks = (length + pad) // block_len

    def blocked(t):
        t = F.pad(t.float(), (0,) * (2 * (t.dim() - 2)) + (0, pad))
        t = t.view(batch, blocks, block_len, *t.shape[2:])
        return t.permute(0, 3, 1, 2, *range(4, t.dim())).contiguous()

    xdt = blocked(x * dt[..., None]).view(batch, groups, per_group, blocks, block_len, head_dim)
    B = blocked(B)[:, :, None]
    C = blocked(C)[:, :, None]
    a = blocked(dt) * A.float()[None, :, None, None]
    a = a.view(batch, groups, per_group, blocks, block_len)
    a_cum = torch.cumsum(a, dim=-1)
    y = (C @ B.transpose(-1, -2) * torch.exp(_segment_sums(a))) @ xdt
    decay_to_end = torch.exp(a_cum[..., -1:] - a_cum)
    block_states = (xdt * decay_to_end[..., None]).transpose(-1, -2) @ B
    block_decay = torch.exp(a_cum[..., -1])[..., None, None]
    running = torch.zeros_like(block_states[:, :, :, 0])
    entering = []
    for c in range(blocks):
        entering.append(running)
        running = running * block_decay[:, :, :, c] + block_states[:, :, :, c]
    entering = torch.stack(entering, dim=3)
    y = y + (C @ entering.transpose(-1, -2)) * torch.exp(a_cum)[..., None]
    y = y.reshape(batch, heads, blocks * block_len, head_dim).transpose(1, 2)
    return y[:, :length].to(x.dtype)


def baseline_mixer_forward(self, u, valid=None):
    """`Mamba2Mixer.forward` before: no recomputation, float32 gated norm kept for backward."""
    batch, length, _ = u.shape
    groups_width = self.n_groups * self.state_size
    z, xBC, dt = torch.split(self.in_proj(u), [self.d_inner, self.d_inner + 2 * groups_width, self.heads], dim=-1)
    if valid is not None:
        xBC = xBC.masked_fill(~valid[..., None], 0.0)
    xBC = F.silu(self.conv1d(xBC.transpose(1, 2))[..., :length].transpose(1, 2))
    x, B, C = torch.split(xBC, [self.d_inner, groups_width, groups_width], dim=-1)
    dt = F.softplus(dt.float() + self.dt_bias.float())
    if valid is not None:
        dt = dt.masked_fill(~valid[..., None], 0.0)
    x = x.reshape(batch, length, self.heads, self.head_dim)
    y = baseline_ssd_scan_pure(x, dt, -torch.exp(self.A_log.float()),
                               B.reshape(batch, length, self.n_groups, self.state_size),
                               C.reshape(batch, length, self.n_groups, self.state_size), block_len=self.scan_block)
    y = y + x * self.D.to(x.dtype)[:, None]
    y = y.reshape(batch, length, self.d_inner)
    gated = y.float() * F.silu(z.float())
    groups = gated.view(*gated.shape[:-1], -1, self.norm.group_size)
    normed = groups * torch.rsqrt(groups.pow(2).mean(-1, keepdim=True) + self.norm.eps)
    return self.out_proj((normed.view_as(gated) * self.norm.weight.float()).to(y.dtype))


def baseline_layer_forward(self, seq, frame_mask, valid):
    seq = self.pool_chunks(seq, frame_mask)
    return seq + self.mixer(self.norm(seq), valid)


def baseline_backbone_forward(self, seq, frame_mask, valid):
    for layer in self.layers:
        seq = layer(seq, frame_mask, valid)
    return self.norm_f(seq)


def baseline_compressor_forward(self, x, lengths):
    """`MambaMiaCompressor.forward` before (argument checks left out): pad, then project; norm_f on every position."""
    items, tokens, _ = x.shape
    chunk = self.chunk_size
    chunks = max(1, math.ceil(tokens / chunk))
    lengths = lengths.to(x.device)
    positions = torch.arange(chunks * chunk, device=x.device)
    frame_mask = (positions[None, :] < lengths[:, None]).view(items, chunks, chunk)
    new_lengths = torch.div(lengths + chunk - 1, chunk, rounding_mode="floor")
    chunk_valid = torch.arange(chunks, device=x.device)[None, :] < new_lengths[:, None]
    frames = self.input_proj(F.pad(x, (0, 0, 0, chunks * chunk - tokens)))
    frames = frames.view(items, chunks, chunk, -1).masked_fill(~frame_mask[..., None], 0.0)
    query = self.query_token.to(frames.dtype).expand(items, chunks, 1, -1)
    seq = self.input_norm(torch.cat([frames, query], dim=2).flatten(1, 2))
    valid = torch.cat([frame_mask, chunk_valid[..., None]], dim=2).flatten(1, 2)
    seq = self.model(seq, frame_mask, valid)
    queries = seq.view(items, chunks, chunk + 1, -1)[:, :, -1]
    return self.output_proj(queries).masked_fill(~chunk_valid[..., None], 0.0), new_lengths


BASELINE = ((mamba2.Mamba2Mixer, baseline_mixer_forward), (mambamia.MambaMiaLayer, baseline_layer_forward),
            (mambamia.MambaMiaBackbone, baseline_backbone_forward),
            (mambamia.MambaMiaCompressor, baseline_compressor_forward))


@contextlib.contextmanager
def baseline_code():
    """Swap the forwards of commit 1b6a80b in for the current ones."""
    current = [(cls, cls.forward) for cls, _ in BASELINE]
    for cls, forward in BASELINE:
        cls.forward = forward
    try:
        yield
    finally:
        for cls, forward in current:
            cls.forward = forward


# ------------------------------------------------------------------------- measuring
def measure(scan_block: int, lengths: tuple[int, ...], train: bool, device: str = "meta") -> dict[str, float]:
    """Peak bytes of one compressor call (and its backward when ``train``) on ``device``."""
    with torch.device(device):
        compressor = MambaMiaCompressor(**OMNI, scan_block=scan_block, use_kernels=False).to(torch.bfloat16)
        x = torch.empty(len(lengths), max(lengths), OMNI["llm_hidden_size"], dtype=torch.bfloat16)
    compressor.train(train)
    weights = sum(p.numel() * p.element_size() for p in compressor.parameters())
    lengths_tensor = torch.tensor(lengths)  # on the CPU: the compressor reads its maximum
    tracer = LiveBytes()  # the estimator's recorder; on the CPU device model it counts exact bytes
    with tracer, torch.set_grad_enabled(train):
        out, _ = compressor(x, lengths_tensor)
        if train:
            out.float().pow(2).mean().backward()
    return {"traced": tracer.peak, "weights": weights, "input": x.numel() * x.element_size(),
            "total": tracer.peak + weights + x.numel() * x.element_size()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=list(LENGTHS))
    parser.add_argument("--output", default=str(Path(__file__).parent / "results" / "mambamia_memory.txt"))
    args = parser.parse_args(argv)
    lengths = tuple(args.lengths)
    positions = math.ceil(max(lengths) / OMNI["chunk_size"]) * (OMNI["chunk_size"] + 1)
    lines = [f"MambaMia compressor (pure PyTorch, bf16) at Omni sizes: {len(lengths)} streams of {list(lengths)} tokens "
             f"x 4096 -> hidden 3072, 96 heads x 64, state 128, chunk 25 ({positions} scan positions); traced on the "
             "meta device. total = traced peak + weights + input (what torch.cuda.max_memory_allocated would show).",
             f"{'scan block':>10} {'step':<18} {'before (GB)':>12} {'after (GB)':>11} {'after/before':>13}"]
    results = {}
    for block in (256, 64):
        for train in (True, False):
            with baseline_code():
                before = measure(block, lengths, train)
            after = measure(block, lengths, train)
            results[(block, train)] = (before, after)
            step = "forward + backward" if train else "forward (no grad)"
            lines.append(f"{block:>10} {step:<18} {before['total'] / GB:>12.2f} {after['total'] / GB:>11.2f} "
                         f"{after['total'] / before['total']:>13.3f}")
    before, after = results[(256, True)]
    ratio = after["total"] / before["total"]
    lines.append(f"target (issue 10): training peak at scan block 256 at most 1/4 of before: "
                 f"{after['total'] / GB:.2f} GB / {before['total'] / GB:.2f} GB = {ratio:.3f} -> "
                 f"{'PASS' if ratio <= 0.25 else 'FAIL'}")
    text = "\n".join(lines)
    print(text)
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(text + "\n")
    return 0 if ratio <= 0.25 else 1


if __name__ == "__main__":
    sys.exit(main())
