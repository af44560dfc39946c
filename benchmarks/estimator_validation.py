"""The memory estimator against measured peaks: one real training step per strategy, side by side.

For each config and strategy, the same step is run twice in this process:

* estimated: `hcx_extend.memory.estimate_memory` on the config (meta device, no weights);
* measured: the model is built with random weights, prepared exactly as the trainer prepares it
  (`apply_strategy`: freezing, quantisation, LoRA adapters), and one training step runs as
  `Trainer._train_step` does (forward with ``logits_to_keep="labels"``, backward, gradient clipping,
  AdamW step). The second step is measured, after the optimiser state exists.

Measured peak, CPU: bytes of weights, buffers and optimiser state before the step + the most bytes the
step allocated on top (the PyTorch profiler's allocation events, replayed in order). CUDA: everything
``torch.cuda.max_memory_allocated`` saw during the measured step (weights, optimiser state, the batch,
cuBLAS workspaces, every temporary), after ``reset_peak_memory_stats``. Inference = one prefill with
the KV cache (``logits_to_keep=1``), as ``generate`` starts.

The estimator is told what the measured run does: the device (``estimate_memory(device="cpu"|"cuda")``:
on CUDA the allocator's 512-byte blocks, the attention kernel the GPU picks, cuBLAS workspaces; see
docs/memory.md), the dtype (fp32 for every strategy; pure bf16, as the trainer runs a bf16 model, for
a few), the same workload (batch, sequence, item sizes, labelled share of positions) and AdamW's loop
(per-tensor on the CPU, ``foreach`` on CUDA). Each row prints estimated / measured and PASS or FAIL
against the target, every ratio within 0.85 - 1.15; the last line says PASS or FAIL for all rows.

    python benchmarks/estimator_validation.py                 # tiny and small configs, CPU, about 4 minutes
    python benchmarks/estimator_validation.py --device cuda   # + a 2 B LLM at hcx-omni-8b's widths, ~2 minutes
"""

from __future__ import annotations

import argparse
import copy
import gc
import sys
import time
from dataclasses import replace

import torch
from torch.profiler import ProfilerActivity, profile

from hcx_extend.compressors import compressed_length
from hcx_extend.config import OmniConfig
from hcx_extend.encoders import get_encoder
from hcx_extend.ladder import get_strategy
from hcx_extend.memory import DeviceModel, Workload, estimate_memory
from hcx_extend.memory.activations import encoded_modalities
from hcx_extend.memory.quantize import module_bytes
from hcx_extend.model import OmniForCausalLM
from hcx_extend.presets import preset_config
from hcx_extend.training import apply_strategy

STRATEGY_ORDER = ("projector", "new-encoder", "lora-encoder", "lora-all", "qlora", "full", "inference")
TARGET = 0.15  # every row's estimated / measured within 1 +- TARGET

SMALL_CONFIG = {
    "text_config": {
        "model_type": "hyperclovax", "vocab_size": 32_000, "hidden_size": 256, "intermediate_size": 704,
        "num_hidden_layers": 4, "num_attention_heads": 8, "num_key_value_heads": 2, "head_dim": 32,
        "max_position_embeddings": 4096, "tie_word_embeddings": False,
    },
    "vision_config": {
        "model_type": "qwen2_5_vl_vision", "depth": 4, "hidden_size": 128, "intermediate_size": 256,
        "num_heads": 4, "out_hidden_size": 256, "patch_size": 14, "spatial_merge_size": 2,
        "temporal_patch_size": 2, "window_size": 112, "fullatt_block_indexes": [3],
    },
    "mm_projector_type": "mlp",
    "audio_config": {
        "model_type": "qwen2_audio_encoder", "num_mel_bins": 32, "encoder_layers": 4, "encoder_attention_heads": 4,
        "encoder_ffn_dim": 256, "d_model": 128, "max_source_positions": 200,
    },
    "audio_projector_type": "mlp",
    "audio_start_id": 30_001,
    "img_start_id": 30_002,
    "video_start_id": 30_003,
    "sensor_start_id": 30_004,
    "sensor_config": {
        "model_type": "imu", "in_channels": 6, "hidden_size": 128, "num_layers": 2, "num_heads": 4,
        "ffn_size": 256, "dropout": 0.1, "output_size": 256, "max_length": 4096,
    },
    "sensor_projector_type": "mlp",
}


# A text-only LLM with hcx-omni-8b's layer shapes (8 layers, about 2 B parameters): GPU only.
LLM_2B_TEXT = {"model_type": "hyperclovax", "vocab_size": 32_000, "hidden_size": 4096, "intermediate_size": 12288,
               "num_hidden_layers": 8, "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128,
               "max_position_embeddings": 4096, "tie_word_embeddings": False}


def configs(device: str = "cpu"):
    """``(name, config, workload, dtype, strategies)``: fp32 for every strategy, pure bf16 (the trainer on a
    bf16 model: adapters and AdamW moments in bf16 too) for a few, and on CUDA a 2 B LLM at real widths."""
    tiny = Workload(batch=2, seq=256, image_size=224, sensor_steps=100)
    small = Workload(batch=2, seq=768, image_size=336, audio_frames=400, sensor_steps=200)
    yield "tiny-hcx-omni", preset_config("tiny-hcx-omni"), tiny, torch.float32, STRATEGY_ORDER
    yield "small", OmniConfig(**copy.deepcopy(SMALL_CONFIG)), small, torch.float32, STRATEGY_ORDER
    yield "tiny bf16", preset_config("tiny-hcx-omni"), tiny, torch.bfloat16, ("projector", "lora-all", "full", "inference")
    if device == "cuda":
        yield ("llm-2b bf16", OmniConfig(text_config=dict(LLM_2B_TEXT)), Workload(batch=1, seq=2048), torch.bfloat16,
               ("lora-all", "qlora", "full", "inference"))


# ---------------------------------------------------------------------------------------- the batch
def make_batch(model, workload, device):
    """Token ids with each modality's placeholders first, then random text; one item per modality per row."""
    generator = torch.Generator().manual_seed(0)
    modality_inputs, placeholders = {}, []
    for modality in encoded_modalities(model, list(model.config.modalities)):
        encoder = get_encoder(modality.encoder["model_type"])
        kind = modality.input.kind
        if kind == "image":
            items = [torch.rand(3, workload.image_size, workload.image_size, generator=generator)]
        elif kind == "audio":
            frames = workload.audio_frames or modality.input.max_length
            items = [torch.randn(modality.input.channels, frames, generator=generator)]
        else:
            items = [torch.randn(workload.sensor_steps, modality.input.channels, generator=generator)]
        batch = encoder.collate(items * workload.batch, modality)
        modality_inputs[modality.name] = {k: v.to(device) for k, v in batch.items()}
        placeholders += [modality.token_id] * compressed_length(modality.compressor, encoder.token_counts(batch, modality)[0])
    text = torch.randint(0, 1000, (workload.batch, workload.seq - len(placeholders)), generator=generator)
    input_ids = torch.cat([torch.tensor(placeholders, dtype=torch.long).expand(workload.batch, -1), text], dim=1).to(device)
    # The model ignores labels on placeholders; position t predicts t + 1.
    labelled = sum(1 for t in range(1, workload.seq) if t >= len(placeholders))
    return input_ids, modality_inputs, labelled / (workload.seq - 1)


# ---------------------------------------------------------------------------------------- measuring
def static_bytes(model, optimizer) -> int:
    state = [t for s in (optimizer.state.values() if optimizer else []) for t in s.values()
             if isinstance(t, torch.Tensor) and t.dim() > 0]
    return module_bytes(model) + sum(t.untyped_storage().nbytes() for t in state)


def clear_cublas_workspaces() -> None:
    """Free the cuBLAS workspaces earlier rows left (each (thread, stream) keeps one), so every row is measured
    as in a fresh process: its warm-up step creates what it needs."""
    clear = getattr(torch._C, "_cuda_clearCublasWorkspaces", None)
    if clear is not None:
        clear()


def cuda_peak(run) -> int:
    """Everything ``torch.cuda.max_memory_allocated`` counts while ``run()`` runs (what must fit on the GPU)."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    run()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated()


def peak_of(run) -> int:
    """CPU: the most bytes allocated on top of what was alive before ``run()`` (profiler allocation events)."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        run()
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    live = peak = 0
    for event in events:
        if event.device_type() == torch.autograd.DeviceType.CPU:
            live += event.nbytes()
            peak = max(peak, live)
    return peak


def measure(config, strategy: str, workload, device: str, dtype: torch.dtype = torch.float32) -> int:
    torch.manual_seed(0)
    if device == "cuda":
        clear_cublas_workspaces()
    with torch.device(device):  # initialise where it runs (fast on a GPU)
        model = OmniForCausalLM(copy.deepcopy(config)).to(dtype)
    input_ids, modality_inputs, _ = make_batch(model, workload, device)
    if strategy == "inference":
        model.eval()

        def prefill():
            with torch.no_grad():
                model(input_ids=input_ids, modality_inputs=modality_inputs, use_cache=True, logits_to_keep=1)

        prefill()
        return cuda_peak(prefill) if device == "cuda" else static_bytes(model, None) + peak_of(prefill)
    model.fresh_components = set()  # a pretrained checkpoint: LoRA adapts the encoders
    apply_strategy(model, get_strategy(strategy))
    model.set_train_mode()
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=1e-4)

    def step():
        output = model(input_ids=input_ids, modality_inputs=modality_inputs, labels=input_ids, logits_to_keep="labels")
        output.loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()  # creates the optimiser state
    gc.collect()
    return cuda_peak(step) if device == "cuda" else static_bytes(model, optimizer) + peak_of(step)


def estimate(config, strategy: str, workload, device: str, dtype: torch.dtype = torch.float32) -> int:
    return estimate_memory(config, strategy, workload, dtype=dtype, trained_dtype=dtype, foreach=device == "cuda",
                           device=device).peak


def cublas_workspace_probe() -> tuple[int, int]:
    """(bytes a first matmul on a new stream leaves allocated, bytes it peaked at beyond its tensors):
    the retained and the transient cuBLAS workspace of one (thread, stream), measured."""
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        a = torch.ones(64, 64, device="cuda")
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        c = a @ a
        torch.cuda.synchronize()
        retained = torch.cuda.memory_allocated() - base - c.untyped_storage().nbytes()
        transient = torch.cuda.max_memory_allocated() - base - c.untyped_storage().nbytes()
    return retained, transient


def describe_device(device: str, log=print) -> None:
    if device != "cuda":
        log(f"device: CPU; torch {torch.__version__}")
        return
    log(f"device: {torch.cuda.get_device_name()} (compute capability "
        f"{'.'.join(map(str, torch.cuda.get_device_capability()))}); torch {torch.__version__}, CUDA {torch.version.cuda}")


def report_workspace(log=print) -> None:
    """The device model's cuBLAS workspace next to the one measured on a new stream (run after the rows)."""
    retained, transient = cublas_workspace_probe()
    clear_cublas_workspaces()
    log(f"cuBLAS workspace per (thread, stream): model {DeviceModel.cuda().blas_workspace:,} B, kept; measured on a "
        f"new stream {retained:,} B kept after the matmul, {transient:,} B at its peak")


def validate(device: str, strategies=STRATEGY_ORDER, log=print, only: tuple[str, ...] | None = None) -> list[dict]:
    """Estimated vs measured peak per config and strategy; returns the rows it printed."""
    describe_device(device, log)
    rows = []
    log(f"{'config':<14} {'strategy':<13} {'estimated':>11} {'measured':>11} {'ratio':>7} {'check':>5}   ({device})")
    for name, config, workload, dtype, config_strategies in configs(device):
        if only is not None and name not in only:
            continue
        for strategy in [s for s in strategies if s in config_strategies]:
            if strategy == "qlora" and device == "cpu" and name != "tiny-hcx-omni":
                continue  # bitsandbytes' CPU 4-bit kernels are slow; tiny covers the path
            started = time.perf_counter()
            with torch.device("meta"):
                layout = OmniForCausalLM(copy.deepcopy(config))
            _, _, fraction = make_batch(layout, workload, "cpu")
            sized = replace(workload, label_fraction=fraction)
            estimated = estimate(config, strategy, sized, device, dtype)
            measured = measure(config, strategy, sized, device, dtype)
            ratio = estimated / measured
            row = {"config": name, "strategy": strategy, "estimated": estimated, "measured": measured,
                   "ratio": ratio, "pass": abs(ratio - 1) <= TARGET, "seconds": time.perf_counter() - started}
            rows.append(row)
            log(f"{name:<14} {strategy:<13} {estimated / 1e6:9.1f}MB {measured / 1e6:9.1f}MB {ratio:7.3f} "
                f"{'PASS' if row['pass'] else 'FAIL':>5}")
            gc.collect()
            if device == "cuda":
                torch.cuda.empty_cache()
    if device == "cuda":
        report_workspace(log)
    ratios = [r["ratio"] for r in rows]
    inside = sum(r["pass"] for r in rows)
    verdict = "PASS" if inside == len(rows) else "FAIL"
    log(f"{verdict}: estimator on {device}, {inside}/{len(rows)} rows within +-{TARGET:.0%}; ratio range "
        f"{min(ratios):.3f} - {max(ratios):.3f}")
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--strategy", action="append", default=None, help="only these strategies")
    parser.add_argument("--config", action="append", default=None, help="only these configs (tiny-hcx-omni, small, ...)")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run without --device cuda for the CPU validation")
    validate(args.device, tuple(args.strategy or STRATEGY_ORDER), only=tuple(args.config) if args.config else None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
