"""MambaMia on CUDA: the pure-PyTorch scan against mamba_ssm's kernel (agreement and time), at Omni's sizes.

Checks, each printed as one JSON line, then a summary:

1. ``pure_cuda_vs_cpu``: the pure scan on the GPU equals the pure scan on the CPU (float32, small
   input): max |difference| <= 1e-4 relative to max |y|.
2. ``scan``: the pure scan vs ``mamba_chunk_scan_combined`` on the same inputs at Omni's sizes
   (96 heads of 64, state 128, one group; 8,320 positions = 8,000 tokens plus a query per 25),
   float32 and bfloat16, with timings. Tolerance, as max |difference| / max |y|: 1e-3 in float32
   (the kernel may multiply in TF32) and 2e-2 in bfloat16.
3. ``compressor``: the whole MambaMia compressor at Omni's sizes (4096 -> 3072, 1 layer, chunk 25),
   bfloat16, a batch of 4 streams of 8,000 down to 5,000 tokens, kernels on vs off: same tolerance
   as bfloat16 above, forward and forward+backward timings.

Without CUDA it says so and exits 0. Without mamba_ssm it runs check 1 and times the pure path
only (checks 2 and 3 need the kernel), says so, and exits 0. Exit code 1 when a check fails.

    python benchmarks/gpu_mambamia_check.py
"""

from __future__ import annotations

import json
import sys
import time

import torch
import torch.nn.functional as F

from hcx_extend.compressors.mambamia import MambaMiaCompressor
from hcx_extend.compressors.ssd import mamba_ssm_scan_kernel, ssd_scan, ssd_scan_pure

TOLERANCE = {torch.float32: 1e-3, torch.bfloat16: 2e-2}


def timed(fn, repeats: int = 5) -> tuple[float, object]:
    """(median seconds over ``repeats`` after one warm-up, last result), synchronising the GPU."""
    result = fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        result = fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
    return sorted(times)[len(times) // 2], result


def scan_inputs(batch, length, heads, head_dim, state, device, dtype, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    x = torch.randn(batch, length, heads, head_dim, generator=g)
    dt = F.softplus(torch.randn(batch, length, heads, generator=g) - 2.0)
    A = -torch.exp(torch.rand(heads, generator=g) * 2.5)
    B = torch.randn(batch, length, 1, state, generator=g)
    C = torch.randn(batch, length, 1, state, generator=g)
    return (x.to(device, dtype), dt.to(device), A.to(device), B.to(device, dtype), C.to(device, dtype))


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max() / b.float().abs().max())


def report(record: dict, failures: list[str]) -> None:
    print(json.dumps(record), flush=True)
    if record.get("ok") is False:
        failures.append(record["check"])


def main() -> int:
    if not torch.cuda.is_available():
        print("gpu_mambamia_check: CUDA is not available; nothing to check (the CPU path is covered by the tests)")
        return 0
    device = torch.device("cuda")
    kernel = mamba_ssm_scan_kernel()
    print(f"device {torch.cuda.get_device_name()}, torch {torch.__version__}, mamba_ssm kernel: "
          f"{'found' if kernel else 'not installed'}", flush=True)
    failures: list[str] = []

    small = scan_inputs(2, 300, 8, 16, 32, "cpu", torch.float32)
    on_cpu = ssd_scan_pure(*small)
    on_gpu = ssd_scan_pure(*(t.to(device) for t in small)).cpu()
    error = relative_error(on_gpu, on_cpu)
    report({"check": "pure_cuda_vs_cpu", "relative_error": error, "tolerance": 1e-4, "ok": error <= 1e-4}, failures)

    for dtype in (torch.float32, torch.bfloat16):
        inputs = scan_inputs(1, 8320, 96, 64, 128, device, dtype)
        pure_seconds, pure = timed(lambda: ssd_scan_pure(*inputs, block_len=256))
        record = {"check": "scan", "dtype": str(dtype), "positions": 8320, "pure_seconds": pure_seconds}
        if kernel is not None:
            kernel_seconds, fast = timed(lambda: ssd_scan(*inputs, block_len=256, use_kernels=True))
            error = relative_error(fast, pure)
            record.update(kernel_seconds=kernel_seconds, speedup=pure_seconds / kernel_seconds,
                          relative_error=error, tolerance=TOLERANCE[dtype], ok=error <= TOLERANCE[dtype])
        report(record, failures)

    torch.manual_seed(0)
    compressor = MambaMiaCompressor(4096, chunk_size=25, hidden_size=3072, num_layers=1, state_size=128,
                                    scan_block=256).to(device, torch.bfloat16)
    x = torch.randn(4, 8000, 4096, device=device, dtype=torch.bfloat16)
    lengths = torch.tensor([8000, 7000, 6013, 5000], device=device)

    def forward(use_kernels: bool):
        for module in compressor.modules():
            if hasattr(module, "use_kernels"):
                module.use_kernels = use_kernels
        with torch.no_grad():
            return compressor(x, lengths)[0]

    def forward_backward(use_kernels: bool):
        forward(use_kernels)  # sets the flag
        compressor.zero_grad(set_to_none=True)
        out, _ = compressor(x, lengths)
        out.float().pow(2).mean().backward()

    pure_seconds, pure = timed(lambda: forward(False), repeats=3)
    pure_train_seconds, _ = timed(lambda: forward_backward(False), repeats=3)
    record = {"check": "compressor", "dtype": "bfloat16", "batch": 4, "tokens": 8000,
              "pure_forward_seconds": pure_seconds, "pure_forward_backward_seconds": pure_train_seconds,
              "peak_memory_gb": torch.cuda.max_memory_allocated() / 2**30}
    if kernel is not None:
        kernel_seconds, fast = timed(lambda: forward(True), repeats=3)
        kernel_train_seconds, _ = timed(lambda: forward_backward(True), repeats=3)
        error = relative_error(fast, pure)
        record.update(kernel_forward_seconds=kernel_seconds, kernel_forward_backward_seconds=kernel_train_seconds,
                      forward_speedup=pure_seconds / kernel_seconds, relative_error=error,
                      tolerance=TOLERANCE[torch.bfloat16], ok=error <= TOLERANCE[torch.bfloat16])
    report(record, failures)

    if kernel is None:
        print("gpu_mambamia_check: mamba_ssm is not installed, so the fast path was not compared; "
              "the pure path ran on CUDA (timings above). Install mamba-ssm to compare.")
    if failures:
        print(f"gpu_mambamia_check: FAILED {failures}")
        return 1
    print("gpu_mambamia_check: all checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
