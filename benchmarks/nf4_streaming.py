"""Streaming NF4-packed decoder layers: decode tokens/s against the bf16 PCIe bound, measured in one run.

The bf16 `LayerStreamer` already runs at its PCIe bound (issue 10: 23.7 tokens/s = 100 % of 54.9 GB/s
over the bytes of the streamed layers). Streaming the layers as bitsandbytes NF4 (packed 4-bit weights +
scales, dequantised on the GPU at matmul time) moves about a quarter of the bytes per token, so the same
PCIe link can carry about 3.9x the tokens.

Steps, all in this process, on hcx-omni-8b's layer widths (8 layers of 386 MB in bf16; `gpu_check.GPU_LLM`):

1. bf16 streaming at gpu_check's budget (non-layer weights + 4 layers: 2 resident, 2 slots, 6 streamed):
   tokens/s, bytes per token; pinned host->device bandwidth; the bf16 PCIe bound = bandwidth / bytes per token;
2. the resident NF4 model: the same weights quantised on the device (the guide's config: NF4, double
   quantisation, bf16 compute), all on the GPU: reference logits of every decoding step;
3. the same NF4 model streamed, with the same layer split as (1) (2 resident, 2 slots, 6 streamed): tokens/s,
   bytes per token, next-token agreement with (2) and whether the logits are identical.

At gpu_check's budget in bytes NF4 layers would all fit (4 bf16 layers hold 15 NF4 layers), so nothing would
stream; the comparison keeps the layer split instead (NF4 then uses less GPU memory than bf16 did).

Targets (issue 10, item 8): NF4 streamed tokens/s >= 2.5 x the bf16 PCIe bound; agreement 100 %.

    python benchmarks/nf4_streaming.py              # on a GPU
    python benchmarks/nf4_streaming.py --device cpu # dry run, small sizes (bitsandbytes' CPU kernels)
"""

from __future__ import annotations

import argparse
import copy
import gc
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

from gpu_check import (  # noqa: E402  (benchmarks/ is not a package)
    BUDGET_LAYERS,
    CPU_LLM,
    DECODE_TOKENS,
    GPU_LLM,
    build_llm,
    decode,
    layer_nbytes,
    non_layer_nbytes,
    pinned_bandwidth,
    prompt,
)

from hcx_extend.memory import LayerStreamer, quantize_language_model  # noqa: E402
from hcx_extend.units import human_bytes  # noqa: E402

TARGET_SPEEDUP = 2.5


def log(line: str = "") -> None:
    print(line, flush=True)


def free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def streamed_decode(model, device: torch.device, ids: torch.Tensor, **streamer_args) -> dict:
    """Stream ``model``'s layers onto ``device`` and decode; tokens/s, bytes per token, logits."""
    streamer = LayerStreamer(model, device, **streamer_args)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    decode(model, ids, device, steps=2)  # warm-up: kernels, allocator, first prefetch
    seconds, logits = decode(model, ids, device, on_pass=streamer.reset)
    result = {"tokens_per_s": DECODE_TOKENS / seconds, "bytes_per_token": streamer.stats.bytes_to_device / DECODE_TOKENS,
              "resident": len(streamer.resident), "streamed": len(streamer.streamed), "layer_bytes": streamer.layer_nbytes,
              "peak": torch.cuda.max_memory_allocated() if device.type == "cuda" else 0, "logits": logits}
    streamer.remove()
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--dry-run", action="store_true", help="same as --device cpu: small sizes on the CPU")
    args = parser.parse_args(argv)
    device = torch.device("cpu" if args.dry_run or args.device == "cpu" else "cuda:0")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run with --device cpu for the dry run")
    started = time.perf_counter()
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (dry run: timings mean nothing)"
    log(f"device: {name}; torch {torch.__version__}")
    text = GPU_LLM if device.type == "cuda" else CPU_LLM
    model = build_llm(text, device, torch.bfloat16)
    layers = len(model.language_model.model.layers)
    budget = non_layer_nbytes(model) + BUDGET_LAYERS * layer_nbytes(model)
    ids = prompt(text["vocab_size"])

    # 1. bf16 streaming and the PCIe bound
    bf16 = streamed_decode(copy.deepcopy(model), device, ids, budget=budget)
    free(device)
    bandwidth = pinned_bandwidth(device, min(1 << 30, 4 * layer_nbytes(model)))
    bound = bandwidth / bf16["bytes_per_token"]
    log(f"bf16: {bf16['resident']} resident + 2 slots, {bf16['streamed']} of {layers} layers streamed, "
        f"{human_bytes(bf16['bytes_per_token'])}/token, {bf16['tokens_per_s']:.2f} tokens/s; pinned host->device "
        f"{bandwidth / 1e9:.1f} GB/s -> PCIe bound {bound:.2f} tokens/s ({100 * bf16['tokens_per_s'] / bound:.0f} % of it)")

    # 2. the resident NF4 model (quantised on the device, as a user with the GPU would)
    resident = copy.deepcopy(model).to(device)
    report = quantize_language_model(resident, "nf4", compute_dtype=torch.bfloat16)
    log(str(report))
    decode(resident, ids, device, steps=2)
    resident_seconds, reference = decode(resident, ids, device)
    resident_speed = DECODE_TOKENS / resident_seconds
    # 3. the same packed weights, back on the host, streamed with the bf16 run's layer split
    packed = resident.to("cpu")
    del resident
    free(device)
    nf4 = streamed_decode(packed, device, ids, resident_layers=bf16["resident"], slots=2)
    same_tokens = (nf4["logits"].argmax(-1) == reference.argmax(-1)).float().mean().item()
    identical = torch.equal(nf4["logits"], reference)
    speedup = nf4["tokens_per_s"] / bound
    log(f"NF4 resident (all {layers} layers on the device): {resident_speed:.2f} tokens/s")
    log(f"NF4 streamed: {nf4['resident']} resident + 2 slots, {nf4['streamed']} streamed, "
        f"{human_bytes(nf4['bytes_per_token'])}/token = {100 * nf4['bytes_per_token'] / bf16['bytes_per_token']:.1f} % "
        f"of bf16's; {nf4['tokens_per_s']:.2f} tokens/s = {speedup:.2f}x the bf16 PCIe bound, "
        f"{nf4['tokens_per_s'] / bf16['tokens_per_s']:.2f}x bf16 streaming; its own PCIe bound "
        f"{bandwidth / nf4['bytes_per_token']:.2f} tokens/s; peak device memory {human_bytes(nf4['peak'])} "
        f"(bf16 streaming: {human_bytes(bf16['peak'])})")
    log(f"next-token agreement with the resident NF4 model: {100 * same_tokens:.1f} % of {len(reference)} steps; "
        f"logits identical: {identical}")
    ok_speed, ok_agreement = speedup >= TARGET_SPEEDUP, same_tokens == 1.0
    log(f"target NF4 streamed >= {TARGET_SPEEDUP}x bf16 PCIe bound: {speedup:.2f}x -> "
        f"{'PASS' if ok_speed else 'FAIL'}{' (dry run: CPU timings mean nothing)' if device.type == 'cpu' else ''}")
    log(f"target next-token agreement 100 %: {100 * same_tokens:.1f} % -> {'PASS' if ok_agreement else 'FAIL'}")
    log(f"total {time.perf_counter() - started:.0f} s")
    return 0 if ok_agreement and (ok_speed or device.type == "cpu") else 1


if __name__ == "__main__":
    sys.exit(main())
