"""The issue-5 GPU check, one script: estimator vs measured peaks, planner + dispatch, 4-bit loading, streaming.

Sections (each prints its own figures; everything is measured in this one run):

1. estimator: `estimator_validation.validate` on the device (``torch.cuda.max_memory_allocated``), tiny
   and small omni configs plus a 2 B LLM at hcx-omni-8b's layer widths in bf16.
2. planner + dispatch: a few-GB LLM (random weights, built from a config) saved as sharded safetensors,
   planned with a GPU budget that forces CPU offload, dispatched, and checked against the same model run
   whole on the GPU (logits must be identical).
3. 4-bit: the same LLM with its Linear layers in NF4 (double quantisation, bf16 compute): bytes before and
   after, top-1 next-token agreement and relative logit error on fixed prompts.
4. streaming, all at the same GPU budget (non-layer weights + room for 4 decoder layers): decode tokens/s,
   bytes moved per token host->device and device->host, for
   (a) `LayerStreamer` (2 resident layers + 2 prefetch slots, pinned host copies; and with 1 slot and 3
       resident layers, which moves one layer less per token but cannot overlap copies with compute),
   (b) the guide's literal ``DynamicLayerLoader`` (4 slots, evict the lowest index with ``.to("cpu")``,
       load with ``.to(device)``, no prefetch), reimplemented below as docs/extension-guide.md describes it,
   (c) accelerate's CPU offload (``dispatch_model``: 3 resident layers, the others copied in per forward);
   plus the PCIe bound: bytes per token / measured pinned host->device bandwidth.

``--device cpu`` (or ``--dry-run``) runs every section with small sizes on the CPU, to prove the script
works end to end where no GPU is available; its timings mean nothing.

    bash benchmarks/gpu_check.sh            # on a GPU machine; writes benchmarks/results/gpu_check.txt
    python benchmarks/gpu_check.py --device cpu
"""

from __future__ import annotations

import argparse
import copy
import gc
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

# hcx-omni-8b's decoder layer widths, 8 layers: 8 x 436 MB + 2 x 262 MB embeddings/head, about 4 GB in bf16.
GPU_LLM = {"model_type": "hyperclovax", "vocab_size": 32_000, "hidden_size": 4096, "intermediate_size": 12288,
           "num_hidden_layers": 8, "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128,
           "max_position_embeddings": 4096, "tie_word_embeddings": False}
CPU_LLM = {**GPU_LLM, "vocab_size": 1000, "hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 6,
           "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 64}
BUDGET_LAYERS = 4  # the GPU budget: every non-layer weight + this many decoder layers
PROMPT_TOKENS, DECODE_TOKENS = 32, 16


def log(line: str = "") -> None:
    print(line, flush=True)


def section(title: str) -> float:
    log(f"\n=== {title}")
    return time.perf_counter()


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---------------------------------------------------------------------------------------- the model
def build_llm(text: dict, device: torch.device, dtype: torch.dtype):
    """An `OmniForCausalLM` with random weights (initialised on ``device``, returned on the CPU)."""
    from hcx_extend.config import OmniConfig
    from hcx_extend.model import OmniForCausalLM

    torch.manual_seed(0)
    with torch.device(device):
        model = OmniForCausalLM(OmniConfig(text_config=dict(text)))
    for parameter in model.parameters():  # buffers (rotary frequencies) stay float32, as a loaded checkpoint's do
        parameter.data = parameter.data.to("cpu", dtype)
    for module in model.modules():
        for name, buffer in module._buffers.items():
            if buffer is not None:
                module._buffers[name] = buffer.to("cpu")
    return model.eval()


def layer_nbytes(model) -> int:
    layer = model.language_model.model.layers[0]
    return sum(p.numel() * p.element_size() for p in layer.parameters())


def non_layer_nbytes(model) -> int:
    inside = {id(p) for p in model.language_model.model.layers.parameters()}
    return sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()] if id(t) not in inside)


def prompt(vocab: int) -> torch.Tensor:
    return torch.randint(0, vocab, (1, PROMPT_TOKENS), generator=torch.Generator().manual_seed(0))


@torch.no_grad()
def decode(model, ids: torch.Tensor, device: torch.device, steps: int = DECODE_TOKENS, on_pass=None):
    """Prefill, then ``steps`` greedy decoding steps with the KV cache.

    Returns ``(seconds for the decoding steps, logits of every step)``; ``on_pass`` is called after the
    prefill so a caller can reset its counters.
    """
    output = model(input_ids=ids.to(device), use_cache=True)
    cache, logits = output.cache, [output.logits[:, -1].float().cpu()]
    token = output.logits[:, -1:].argmax(-1)
    synchronize(device)
    if on_pass is not None:
        on_pass()
    started = time.perf_counter()
    for _ in range(steps):
        output = model(input_ids=token, cache=cache, use_cache=True)
        cache = output.cache
        token = output.logits[:, -1:].argmax(-1)
        logits.append(output.logits[:, -1].float().cpu())
    synchronize(device)
    return time.perf_counter() - started, torch.stack(logits)


# ---------------------------------------------------------------------------------------- 1. estimator
def check_estimator(device: torch.device) -> None:
    import estimator_validation

    if device.type == "cuda":
        estimator_validation.validate("cuda", log=log)
    else:
        estimator_validation.validate("cpu", ("projector", "lora-all", "inference"), log=log, only=("tiny-hcx-omni",))


# ---------------------------------------------------------------------------------------- 2. planner + dispatch
def check_dispatch(model, device: torch.device, reference_logits: torch.Tensor) -> None:
    from hcx_extend.memory import Workload, dispatch_checkpoint, plan_device_map
    from hcx_extend.units import human_bytes

    executor = "cuda:0" if device.type == "cuda" else "cpu"
    budget = non_layer_nbytes(model) + BUDGET_LAYERS * layer_nbytes(model)
    budgets = {executor: budget, "cpu" if executor != "cpu" else "disk": 10 * sum(
        p.numel() * p.element_size() for p in model.parameters())}
    with tempfile.TemporaryDirectory(prefix="hcx-gpu-check-") as folder:
        started = time.perf_counter()
        model.save_pretrained(Path(folder) / "checkpoint", max_shard_size="1GB")
        # Room for the forward passes this check runs (the prompt plus 2 decoding steps, no modality items).
        plan = plan_device_map(model, budgets, dtype=next(model.parameters()).dtype,
                               workload=Workload(batch=1, seq=PROMPT_TOKENS + 2), modalities=[])
        log(plan.table())
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        loaded = dispatch_checkpoint(Path(folder) / "checkpoint", plan, offload_folder=Path(folder) / "offload")
        loaded_in = time.perf_counter() - started
        seconds, logits = decode(loaded, prompt(model.config.text_config.vocab_size), device, steps=2)
        same = torch.equal(logits, reference_logits[:3])
        gpu = torch.cuda.max_memory_allocated() if device.type == "cuda" else 0
        log(f"saved + planned + dispatched in {loaded_in:.1f} s; prefill + 2 steps: logits identical to the whole model "
            f"on the device: {same} (max |diff| {(logits - reference_logits[:3]).abs().max():.3g}); peak device memory "
            f"{human_bytes(gpu)} for a budget of {human_bytes(budget)}")
        del loaded
        gc.collect()


# ---------------------------------------------------------------------------------------- 3. 4-bit
def check_quantization(model, device: torch.device) -> None:
    from hcx_extend.memory import next_token_agreement, quantize_language_model

    reference = copy.deepcopy(model).to(device)
    quantized = copy.deepcopy(model).to(device)
    report = quantize_language_model(quantized, "nf4", compute_dtype=torch.bfloat16)
    log(str(report))
    log(f"LLM linear weights: {100 * report.linear_bytes_after / report.linear_bytes_before:.1f} % of their "
        f"{next(model.parameters()).dtype} bytes (target <= 30 % of bf16)")
    prompts = torch.randint(0, model.config.text_config.vocab_size, (8, 64),
                            generator=torch.Generator().manual_seed(1)).to(device)
    agreement = next_token_agreement(reference.language_model, quantized.language_model, prompts)
    with torch.no_grad():
        a = reference.language_model(input_ids=prompts).logits.float()
        b = quantized.language_model(input_ids=prompts).logits.float()
    log(f"fixed prompts (8 x 64 random ids, seed 1): top-1 next-token agreement {100 * agreement:.1f} %, relative "
        f"logit error {float((a - b).norm() / a.norm()):.3f} (random weights: flat logits, see docs/memory.md)")
    del reference, quantized
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------- 4. streaming
class GuideDynamicLayerLoader:
    """The extension guide's loader as written: ``max_layers`` slots, evict the lowest loaded index with
    ``layer.to("cpu")`` (a device-to-host copy), load with ``layer.to(device)``, no prefetch."""

    def __init__(self, layers, device: torch.device, max_layers: int):
        self.layers, self.device, self.max_layers = layers, device, max_layers
        self.loaded: set[int] = set()
        self.bytes_to_device = self.bytes_to_host = 0
        self.nbytes = sum(p.numel() * p.element_size() for p in layers[0].parameters())
        self.hooks = [layer.register_forward_pre_hook(self._hook(i)) for i, layer in enumerate(layers)]

    def _hook(self, index: int):
        def hook(module, args):
            self.load(index)

        return hook

    def load(self, index: int) -> None:
        if index in self.loaded:
            return
        if len(self.loaded) >= self.max_layers:
            victim = min(self.loaded)
            self.layers[victim].to("cpu")
            self.loaded.remove(victim)
            self.bytes_to_host += self.nbytes
        self.layers[index].to(self.device)
        self.loaded.add(index)
        self.bytes_to_device += self.nbytes


def move_non_layers(model, device: torch.device) -> None:
    layers = {id(t) for t in [*model.language_model.model.layers.parameters(), *model.language_model.model.layers.buffers()]}
    for module in model.modules():
        for name, parameter in module._parameters.items():
            if parameter is not None and id(parameter) not in layers:
                parameter.data = parameter.data.to(device)
        for name, buffer in module._buffers.items():
            if buffer is not None and id(buffer) not in layers:
                module._buffers[name] = buffer.to(device)


def pinned_bandwidth(device: torch.device, nbytes: int) -> float:
    """Host -> device bytes per second from pinned memory (best of 5 copies)."""
    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=device.type == "cuda")
    target = torch.empty(nbytes, dtype=torch.uint8, device=device)
    best = float("inf")
    for _ in range(5):
        synchronize(device)
        started = time.perf_counter()
        target.copy_(host, non_blocking=True)
        synchronize(device)
        best = min(best, time.perf_counter() - started)
    return nbytes / best


def check_streaming(model, device: torch.device, reference_logits: torch.Tensor) -> None:
    from accelerate import dispatch_model

    from hcx_extend.memory import LayerStreamer
    from hcx_extend.units import human_bytes

    ids = prompt(model.config.text_config.vocab_size)
    layer = layer_nbytes(model)
    budget = non_layer_nbytes(model) + BUDGET_LAYERS * layer
    log(f"GPU budget for weights: {human_bytes(budget)} (non-layer weights + {BUDGET_LAYERS} of "
        f"{len(model.language_model.model.layers)} layers of {human_bytes(layer)})")
    rows = []

    def measure(name, candidate, bytes_to_device, bytes_to_host, reset):
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        seconds, logits = decode(candidate, ids, device, on_pass=reset)
        peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else 0
        rows.append({"name": name, "tokens_per_s": DECODE_TOKENS / seconds, "h2d": bytes_to_device() / DECODE_TOKENS,
                     "d2h": bytes_to_host() / DECODE_TOKENS, "peak": peak,
                     "exact": torch.equal(logits, reference_logits)})

    # (a) ours: 2 slots (prefetch overlaps every copy) and 1 slot (one more resident layer, copies serialised)
    for slots in (2, 1):
        ours = copy.deepcopy(model)
        streamer = LayerStreamer(ours, device, budget=budget, slots=slots)
        kind = "prefetch" if streamer.prefetch else "no overlap"
        measure(f"ours ({len(streamer.resident)} resident + {streamer.slots} slot{'s' * (slots > 1)}, {kind})", ours,
                lambda s=streamer: s.stats.bytes_to_device, lambda s=streamer: s.stats.bytes_to_host, streamer.reset)
        streamer.remove()
        del ours, streamer
        gc.collect()

    # (b) the guide's literal loader: the same budget as 4 slots
    guide = copy.deepcopy(model)
    move_non_layers(guide, device)
    loader = GuideDynamicLayerLoader(guide.language_model.model.layers, device, BUDGET_LAYERS)

    def reset_guide(loader=loader):
        loader.bytes_to_device = loader.bytes_to_host = 0

    measure(f"guide DynamicLayerLoader ({BUDGET_LAYERS} slots)", guide, lambda l=loader: l.bytes_to_device,
            lambda l=loader: l.bytes_to_host, reset_guide)
    del guide, loader
    gc.collect()

    # (c) accelerate CPU offload: one layer of the budget is its transient copy, the rest resident layers
    offloaded = copy.deepcopy(model)
    resident = BUDGET_LAYERS - 1
    layers = len(offloaded.language_model.model.layers)
    main = 0 if device.type == "cuda" else "cpu"
    slow = "cpu" if device.type == "cuda" else "disk"  # on the CPU dry run, offload to disk to exercise the hooks
    device_map = {"model.language_model.model.embed_tokens": main, "model.language_model.model.rotary_emb": main,
                  "model.language_model.model.norm": main, "model.language_model.lm_head": main}
    device_map.update({f"model.language_model.model.layers.{i}": main if i < resident else slow for i in range(layers)})
    with tempfile.TemporaryDirectory() as offload_dir:
        offloaded = dispatch_model(offloaded, device_map, main_device=main, offload_dir=offload_dir)
        per_pass = (layers - resident) * layer
        passes = {"count": 0}
        first = offloaded.language_model.model.layers[0]
        handle = first.register_forward_pre_hook(lambda m, a: passes.__setitem__("count", passes["count"] + 1))

        def reset_accelerate():
            passes["count"] = 0

        measure(f"accelerate CPU offload ({resident} resident)", offloaded, lambda: passes["count"] * per_pass,
                lambda: 0, reset_accelerate)
        handle.remove()
        del offloaded
        gc.collect()

    bandwidth = pinned_bandwidth(device, min(1 << 30, 4 * layer))
    guide_speed = next(r["tokens_per_s"] for r in rows if r["name"].startswith("guide"))
    log(f"pinned host->device bandwidth: {bandwidth / 1e9:.1f} GB/s")
    log(f"{'method':<46} {'tok/s':>8} {'H2D/token':>11} {'D2H/token':>11} {'peak GPU':>10} {'x guide':>8} "
        f"{'PCIe bound':>11} {'of bound':>9} {'exact':>6}")
    for row in rows:
        bound = bandwidth / row["h2d"] if row["h2d"] else float("inf")
        log(f"{row['name']:<46} {row['tokens_per_s']:8.2f} {human_bytes(row['h2d']):>11} {human_bytes(row['d2h']):>11} "
            f"{human_bytes(row['peak']):>10} {row['tokens_per_s'] / guide_speed:8.2f} {bound:9.2f}/s "
            f"{100 * row['tokens_per_s'] / bound:8.1f}% {str(row['exact']):>6}")
    log("targets: ours >= 2x the guide's loader and >= 80 % of its PCIe bound; ours' logits identical to the resident model")


# ---------------------------------------------------------------------------------------- main
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--dry-run", action="store_true", help="same as --device cpu: small sizes on the CPU")
    parser.add_argument("--skip", action="append", default=[], choices=["estimator", "dispatch", "quant", "stream"])
    args = parser.parse_args(argv)
    device = torch.device("cpu" if args.dry_run or args.device == "cpu" else "cuda:0")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run with --device cpu for the dry run")
    started = time.perf_counter()
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (dry run: timings mean nothing)"
    log(f"device: {name}; torch {torch.__version__}")
    if "estimator" not in args.skip:
        t = section("1. estimator vs measured peak memory")
        check_estimator(device)
        log(f"({time.perf_counter() - t:.0f} s)")
    dtype = torch.bfloat16
    text = GPU_LLM if device.type == "cuda" else CPU_LLM
    model = build_llm(text, device, dtype)
    log(f"\nmodel: {sum(p.numel() for p in model.parameters()) / 1e9:.2f} B parameters in {dtype} "
        f"({len(model.language_model.model.layers)} layers of {layer_nbytes(model) / 1e6:.0f} MB)")
    whole = copy.deepcopy(model).to(device)
    _, reference_logits = decode(whole, prompt(text["vocab_size"]), device)
    del whole
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    if "dispatch" not in args.skip:
        t = section("2. planner + dispatch from sharded safetensors")
        check_dispatch(model, device, reference_logits)
        log(f"({time.perf_counter() - t:.0f} s)")
    if "quant" not in args.skip:
        t = section("3. 4-bit NF4 loading")
        check_quantization(model, device)
        log(f"({time.perf_counter() - t:.0f} s)")
    if "stream" not in args.skip:
        t = section("4. layer streaming at the same GPU budget")
        check_streaming(model, device, reference_logits)
        log(f"({time.perf_counter() - t:.0f} s)")
    log(f"\ntotal {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
