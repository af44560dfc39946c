"""``hcx-extend demo``: for now a smoke run of the tiny HCX-Omni preset (image + audio + sensor in one batch)."""

from __future__ import annotations

import argparse

import torch


def add_demo_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--seed", type=int, default=0)


def run_demo(args: argparse.Namespace) -> int:
    from hcx_extend.presets import build_preset
    from hcx_extend.summary import describe

    model = build_preset("tiny-hcx-omni", seed=args.seed)
    print(describe(model, "tiny-hcx-omni"))
    ids = torch.tensor([[1, 2] + [model.config.modality("sensor").token_id] * 10 + [3]])
    values = torch.randn(1, 10, 6)
    out = model(input_ids=ids, modality_inputs={"sensor": {"values": values, "lengths": torch.tensor([10])}})
    print(f"logits {tuple(out.logits.shape)}, finite: {bool(torch.isfinite(out.logits).all())}")
    return 0
