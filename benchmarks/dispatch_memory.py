"""Dispatching a sharded checkpoint: host memory while loading, and planned vs measured device peak with exact logits.

Two checks; the first runs by default, the second with ``--device``.

1. Host memory while loading a multi-GB sharded checkpoint: planned dispatch with disk offload vs reading it whole.

A synthetic HCX-layout checkpoint (an LLM of about 1.4 B parameters in bf16, about 2.7 GB, in 1 GB
shards) is written to a temporary folder shard by shard (never whole in memory) and removed at the
end. Two fresh processes then load it:

* dispatch: `plan_device_map` with a small CPU budget (the CPU is the executing device here; on a
  GPU machine it would be cuda:0) and the rest on disk, then `dispatch_checkpoint`
  (``init_empty_weights`` + accelerate's ``load_checkpoint_and_dispatch`` with an offload folder);
* whole: every tensor of every shard copied into process memory, as loading a state dict into an
  allocated model does (``load_file`` alone would only map the files: its tensors share the page cache).

Each process samples its own ``/proc/self/status`` every 2 ms: peak private memory (RssAnon, what
loading allocates) and peak resident set (VmHWM, which also counts the checkpoint's mmapped file pages).
Reported: both peaks above the process's baseline, the weights left resident on the CPU by the plan,
and the ratios to the largest shard. Target: dispatch's peak private memory under 1.5x the largest shard.

2. ``--device cuda`` (or ``cpu``): a bf16 LLM (on CUDA hcx-omni-8b's layer widths, 8 layers, about 4 GB; on
the CPU a small one) is written as a sharded checkpoint, run whole on the device (the resident model:
bf16 weights, float32 rotary tables), then planned with a budget of every non-layer weight + 4 decoder
layers (the rest offloaded to the CPU, or to the disk on the CPU) and dispatched; both run the same
prefill + 2 greedy steps. Printed: the plan, planned peak on the executing device vs measured
(``torch.cuda.max_memory_allocated`` on CUDA; the profiler's allocation events on the CPU), and the
logits' max |diff| against the resident model. PASS when measured <= planned and the logits are identical.

    python benchmarks/dispatch_memory.py [--layers 24] [--shard 1GB]
    python benchmarks/dispatch_memory.py --device cuda          # about 1 minute on an H100/H200
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch
from accelerate import init_empty_weights
from safetensors.torch import load_file, save_file
from torch.profiler import ProfilerActivity, profile

from hcx_extend.config import OmniConfig
from hcx_extend.layout import read_config_dict
from hcx_extend.memory import Workload, dispatch_checkpoint, plan_device_map
from hcx_extend.memory.placement import placement_units
from hcx_extend.memory.quantize import module_bytes
from hcx_extend.model import OmniForCausalLM
from hcx_extend.units import human_bytes, parse_size

TEXT_CONFIG = {"model_type": "hyperclovax", "vocab_size": 32_000, "hidden_size": 2048, "intermediate_size": 5632,
               "num_attention_heads": 16, "num_key_value_heads": 4, "max_position_embeddings": 4096,
               "tie_word_embeddings": False}
# The device check's LLMs: hcx-omni-8b's decoder widths (8 layers of 386 MB in bf16) on CUDA, a small one on the CPU.
GPU_LLM = {"model_type": "hyperclovax", "vocab_size": 32_000, "hidden_size": 4096, "intermediate_size": 12288,
           "num_hidden_layers": 8, "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128,
           "max_position_embeddings": 4096, "tie_word_embeddings": False}
CPU_LLM = {**GPU_LLM, "vocab_size": 1000, "hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 6,
           "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 64}
PROMPT_TOKENS, DECODE_STEPS, BUDGET_LAYERS = 32, 2, 4


def status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


class Sampler:
    """Peak RssAnon over a block, sampled every 2 ms on a thread (the kernel keeps no peak for it)."""

    def __init__(self):
        self.peak_anon = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            self.peak_anon = max(self.peak_anon, status_kib("RssAnon") * 1024)
            time.sleep(0.002)

    def __enter__(self):
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak_anon = max(self.peak_anon, status_kib("RssAnon") * 1024)


# ---------------------------------------------------------------------------------------- writing
def write_checkpoint(directory: Path, layers: int, shard_bytes: int, text_config: dict | None = None) -> dict:
    """Random bf16 weights in HCX layout, one shard in memory at a time."""
    config = OmniConfig(text_config=dict(text_config or {**TEXT_CONFIG, "num_hidden_layers": layers}))
    with torch.device("meta"):
        skeleton = OmniForCausalLM(config)
    shapes = {k: tuple(v.shape) for k, v in skeleton.state_dict().items()}
    directory.mkdir(parents=True)
    generator = torch.Generator().manual_seed(0)
    shard: dict = {}
    size = 0
    names: list[list[str]] = []

    def flush():
        nonlocal shard, size
        names.append(list(shard))
        save_file(shard, directory / f"part-{len(names)}.safetensors", metadata={"format": "pt"})
        shard, size = {}, 0

    for key, shape in shapes.items():
        tensor = (torch.randn(shape, generator=generator) * 0.02).to(torch.bfloat16)
        if shard and size + tensor.numel() * 2 > shard_bytes:
            flush()
        shard[key] = tensor
        size += tensor.numel() * 2
    flush()
    weight_map, sizes = {}, []
    for index, keys in enumerate(names, start=1):
        final = f"model-{index:05d}-of-{len(names):05d}.safetensors"
        (directory / f"part-{index}.safetensors").rename(directory / final)
        sizes.append((directory / final).stat().st_size)
        weight_map.update({key: final for key in keys})
    total = sum(sizes)
    (directory / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    raw = config.to_dict()
    raw["architectures"] = ["OmniForCausalLM"]
    (directory / "config.json").write_text(json.dumps(raw, default=str))
    return {"total": total, "largest_shard": max(sizes), "shards": len(sizes)}


# ---------------------------------------------------------------------------------------- loading (child processes)
def load_dispatched(directory: Path, cpu_budget: str) -> dict:
    with init_empty_weights():
        skeleton = OmniForCausalLM(OmniConfig(**read_config_dict(directory)))
    plan = plan_device_map(skeleton, {"cpu": cpu_budget, "disk": "1TB"}, dtype=torch.bfloat16,
                           workload=Workload(batch=1, seq=8), modalities=[])
    base_anon, base_rss = status_kib("RssAnon") * 1024, status_kib("VmRSS") * 1024
    with Sampler() as sampler:
        model = dispatch_checkpoint(directory, plan, offload_folder=directory.parent / "offload")
    resident = plan.used("cpu")
    ids = torch.randint(0, 1000, (1, 8))
    with torch.no_grad():
        logits = model(input_ids=ids).logits  # the dispatched model runs
    return {"peak_anon": sampler.peak_anon - base_anon, "peak_rss": status_kib("VmHWM") * 1024 - base_rss,
            "resident_cpu_weights": resident, "on_disk": plan.used("disk"), "finite": bool(torch.isfinite(logits).all())}


def load_whole(directory: Path) -> dict:
    base_anon, base_rss = status_kib("RssAnon") * 1024, status_kib("VmRSS") * 1024
    with Sampler() as sampler:
        state = {}
        for path in sorted(directory.glob("model-*.safetensors")):
            state.update({key: tensor.clone() for key, tensor in load_file(path).items()})
    return {"peak_anon": sampler.peak_anon - base_anon, "peak_rss": status_kib("VmHWM") * 1024 - base_rss,
            "tensors": len(state)}


def child(mode: str, directory: str, cpu_budget: str) -> None:
    result = load_dispatched(Path(directory), cpu_budget) if mode == "dispatch" else load_whole(Path(directory))
    print("RESULT " + json.dumps(result))


def run_child(mode: str, directory: Path, cpu_budget: str) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", mode, str(directory), "--cpu", cpu_budget],
                         capture_output=True, text=True, check=True)
    line = next(l for l in out.stdout.splitlines() if l.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--shard", default="1GB", help="shard size (default 1GB)")
    parser.add_argument("--cpu", default="400MB", help="CPU budget of the plan (default 400MB; the rest goes to disk)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default=None,
                        help="run check 2 (planned vs measured peak, exact logits) on this device instead of check 1")
    parser.add_argument("--child", nargs=2, metavar=("MODE", "DIR"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(args.child[0], args.child[1], args.cpu)
        return 0
    if args.device:
        return device_check(args.device)
    workdir = Path(tempfile.mkdtemp(prefix="hcx-dispatch-"))
    try:
        started = time.perf_counter()
        written = write_checkpoint(workdir / "checkpoint", args.layers, parse_size(args.shard))
        print(f"checkpoint: {human_bytes(written['total'])} in {written['shards']} shards, largest "
              f"{human_bytes(written['largest_shard'])} (written in {time.perf_counter() - started:.0f} s)")
        dispatched = run_child("dispatch", workdir / "checkpoint", args.cpu)
        shutil.rmtree(workdir / "offload", ignore_errors=True)
        whole = run_child("whole", workdir / "checkpoint", args.cpu)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    shard = written["largest_shard"]
    print(f"dispatch plan: {human_bytes(dispatched['resident_cpu_weights'])} resident on the CPU, "
          f"{human_bytes(dispatched['on_disk'])} offloaded to disk; forward pass finite: {dispatched['finite']}")
    print(f"{'loader':<10} {'peak private':>13} {'x shard':>8} {'peak RSS':>11} {'x shard':>8}")
    for name, result in (("dispatch", dispatched), ("whole", whole)):
        print(f"{name:<10} {human_bytes(result['peak_anon']):>13} {result['peak_anon'] / shard:8.2f} "
              f"{human_bytes(result['peak_rss']):>11} {result['peak_rss'] / shard:8.2f}")
    print(f"dispatch / whole peak private memory: {dispatched['peak_anon'] / whole['peak_anon']:.2f}; "
          f"target dispatch < 1.5x largest shard: {'met' if dispatched['peak_anon'] < 1.5 * shard else 'missed'}")
    return 0


# ---------------------------------------------------------------------------------------- 2. device check
def resident_model(directory: Path, device: torch.device) -> OmniForCausalLM:
    """The checkpoint loaded whole onto ``device`` as stored (bf16 weights), rotary tables in float32 as built."""
    with init_empty_weights(include_buffers=False):
        model = OmniForCausalLM(OmniConfig(**read_config_dict(directory)))
    state = {}
    for path in sorted(directory.glob("model-*.safetensors")):
        state.update(load_file(path, device=str(device)))
    model.load_state_dict(state, strict=True, assign=True)
    for module in model.modules():
        for name, buffer in module._buffers.items():
            if buffer is not None:
                module._buffers[name] = buffer.to(device)
    return model.eval()


@torch.no_grad()
def decode(model, ids: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Prefill + `DECODE_STEPS` greedy steps with the KV cache; the last position's logits of each, stacked."""
    output = model(input_ids=ids.to(device), use_cache=True)
    logits = [output.logits[:, -1].float().cpu()]
    for _ in range(DECODE_STEPS):
        token = output.logits[:, -1:].argmax(-1)
        output = model(input_ids=token, cache=output.cache, use_cache=True)
        logits.append(output.logits[:, -1].float().cpu())
    return torch.stack(logits)


def measured_peak(run, device: torch.device) -> int:
    """Bytes on ``device`` at the peak of ``run()``. CUDA: ``max_memory_allocated`` (everything allocated);
    CPU: the most bytes alive at once in the profiler's allocation events (allocations made before
    ``run()`` are not seen; the caller adds them)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        run()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        run()
    live = peak = 0
    for event in sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                        key=lambda e: e.start_ns()):
        if event.device_type() == torch.autograd.DeviceType.CPU:
            live += event.nbytes()
            peak = max(peak, live)
    return peak


def device_check(device_name: str) -> int:
    device = torch.device("cuda:0" if device_name == "cuda" else "cpu")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run with --device cpu")
    text = GPU_LLM if device.type == "cuda" else CPU_LLM
    executor, slower = ("cuda:0", "cpu") if device.type == "cuda" else ("cpu", "disk")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"device check on {name}; torch {torch.__version__}")
    ids = torch.randint(0, text["vocab_size"], (1, PROMPT_TOKENS), generator=torch.Generator().manual_seed(0))
    workdir = Path(tempfile.mkdtemp(prefix="hcx-dispatch-device-"))
    try:
        written = write_checkpoint(workdir / "checkpoint", text["num_hidden_layers"], parse_size("1GB"), text)
        resident = resident_model(workdir / "checkpoint", device)
        reference = decode(resident, ids, device)
        units = placement_units(resident, torch.bfloat16)
        layer = next(u.nbytes for u in units if u.role == "layer")
        budget = sum(u.nbytes for u in units if u.role != "layer") + BUDGET_LAYERS * layer
        del resident
        if device.type == "cuda":
            torch.cuda.empty_cache()
        plan = plan_device_map(OmniConfig(**read_config_dict(workdir / "checkpoint")),
                               {executor: budget, slower: 10 * written["total"]}, dtype=torch.bfloat16,
                               workload=Workload(batch=1, seq=PROMPT_TOKENS + DECODE_STEPS), modalities=[])
        print(f"checkpoint {human_bytes(written['total'])}; budget on {executor}: non-layer weights + {BUDGET_LAYERS} "
              f"layers = {human_bytes(budget)}")
        print(plan.table())
        loaded = {}

        def load():
            loaded["model"] = dispatch_checkpoint(workdir / "checkpoint", plan, offload_folder=workdir / "offload")

        loading = measured_peak(load, device)
        model, result = loaded.pop("model"), {}

        def run():
            result["logits"] = decode(model, ids, device)

        running = measured_peak(run, device)
        if device.type == "cpu":  # the profiler sees only what the passes allocate; add the resident weights
            running += module_bytes(model)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    planned = plan.peak(executor)
    difference = float((result["logits"] - reference).abs().max())
    within = running <= planned
    print(f"planned peak on {executor}: {human_bytes(planned)}; measured while running (prefill + {DECODE_STEPS} steps): "
          f"{human_bytes(running)} = {running / planned:.2f} x planned; while dispatching: {human_bytes(loading)}"
          f"{' (on the CPU: what loading allocates, shards included)' if device.type == 'cpu' else ''}")
    print(f"logits max |diff| against the resident model: {difference:.3g} "
          f"({'identical' if difference == 0 else 'different'})")
    print(f"{'PASS' if within and difference == 0 else 'FAIL'}: dispatch on {device_name}, measured running peak "
          f"{'<=' if within else '>'} planned, logits {'identical' if difference == 0 else 'differ'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
