"""Host memory while loading a multi-GB sharded checkpoint: planned dispatch with disk offload vs reading it whole.

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

    python benchmarks/dispatch_memory.py [--layers 24] [--shard 1GB]
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

TEXT_CONFIG = {"model_type": "hyperclovax", "vocab_size": 32_000, "hidden_size": 2048, "intermediate_size": 5632,
               "num_attention_heads": 16, "num_key_value_heads": 4, "max_position_embeddings": 4096,
               "tie_word_embeddings": False}


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
def write_checkpoint(directory: Path, layers: int, shard_bytes: int) -> dict:
    """Random bf16 weights in HCX layout, one shard in memory at a time."""
    import torch
    from safetensors.torch import save_file

    from hcx_extend.config import OmniConfig
    from hcx_extend.model import OmniForCausalLM

    config = OmniConfig(text_config={**TEXT_CONFIG, "num_hidden_layers": layers})
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
    import torch
    from accelerate import init_empty_weights

    from hcx_extend.layout import read_config_dict
    from hcx_extend.config import OmniConfig
    from hcx_extend.memory import dispatch_checkpoint, plan_device_map
    from hcx_extend.model import OmniForCausalLM

    with init_empty_weights():
        skeleton = OmniForCausalLM(OmniConfig(**read_config_dict(directory)))
    plan = plan_device_map(skeleton, {"cpu": cpu_budget, "disk": "1TB"}, dtype=torch.bfloat16)
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
    from safetensors.torch import load_file

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
    parser.add_argument("--child", nargs=2, metavar=("MODE", "DIR"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(args.child[0], args.child[1], args.cpu)
        return 0
    from hcx_extend.units import parse_size
    from hcx_extend.units import human_bytes

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


if __name__ == "__main__":
    sys.exit(main())
