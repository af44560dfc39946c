"""Activation memory of a training step or a prefill, found by running the model on the meta device.

Nothing is computed and nothing is allocated: the model is built on PyTorch's meta device and one
step runs on meta tensors of the real shapes while the recorders of `hcx_extend.memory.recorders`
watch it (``saved``: what autograd keeps, per row; ``peak``: the most bytes alive at once).

The step is the model's own code: each modality's encoder kind builds an example batch of the
workload's size (`ModalityEncoder.example_batch`: data on meta, lengths and grids on the CPU) and
``OmniForCausalLM.encode_modality`` encodes, projects and compresses it exactly as in a forward pass.
Then, as `OmniForCausalLM.forward` with the trainer's ``logits_to_keep="labels"`` does: masked scatter
into the token embeddings -> LLM -> logits at the labelled positions -> ``cross_entropy(logits.float())``
-> backward. An encoder kind that cannot build an example batch (or whose encode reads values) is
reported as untraced, with the reason.

While tracing, attention runs as the target device runs it (`hcx_extend.memory.attention_kernels`)
and two value reads inside transformers are answered (`hcx_extend.memory.transformers_patches`).
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from hcx_extend.config import ModalityConfig
from hcx_extend.encoders import get_encoder
from hcx_extend.memory.attention_kernels import attention_stand_in
from hcx_extend.memory.device_model import DeviceModel
from hcx_extend.memory.recorders import LiveBytes, SavedTensors
from hcx_extend.memory.transformers_patches import labelled_positions, unpacked_sequences
from hcx_extend.memory.workload import Workload
from hcx_extend.model import OmniForCausalLM

META = torch.device("meta")


@dataclass
class StepTrace:
    """What one traced step kept and peaked at (bytes; weights and optimiser state not included).

    Attributes:
        saved: bytes saved for backward per row (training) or nothing.
        peak: most bytes alive at once: activations, logits, loss, temporaries, gradients, KV cache.
        kv_cache: bytes of the KV cache after a prefill (inference only).
        logits: bytes of the logits, which the trainer's output object keeps until the optimiser step.
        modality_tokens: LLM positions each modality's item fills (after its compressor).
        untraced: encoder rows whose activations are missing, with the reason.
    """

    saved: dict[str, int] = field(default_factory=dict)
    peak: int = 0
    kv_cache: int = 0
    logits: int = 0
    modality_tokens: dict[str, int] = field(default_factory=dict)
    untraced: dict[str, str] = field(default_factory=dict)


def encoded_modalities(model: OmniForCausalLM, modalities: list[str]) -> list[ModalityConfig]:
    """One modality per encoder module (video shares the image tower and is not run twice)."""
    chosen, seen = [], set()
    for name in modalities:
        modality = model.config.modality(name)
        if modality.encoder_module not in seen:
            seen.add(modality.encoder_module)
            chosen.append(modality)
    return chosen


def _encode(model: OmniForCausalLM, modality: ModalityConfig, workload: Workload, saved: SavedTensors | None,
            trace: StepTrace) -> list[torch.Tensor] | None:
    """`OmniForCausalLM.encode_modality` on the kind's example batch; None (and an untraced row) if it cannot run."""
    encoder = get_encoder(modality.encoder["model_type"])
    try:
        batch = encoder.example_batch(modality, workload.batch, workload.item_size(modality.input.kind), META)
    except NotImplementedError as error:
        trace.untraced[modality.encoder_module] = str(error)
        return None
    before = dict(saved.by_component) if saved else {}
    try:
        return model.encode_modality(modality.name, batch)
    except (NotImplementedError, RuntimeError) as error:  # e.g. Tensor.item() on a meta tensor
        if saved:
            saved.by_component.clear()
            saved.by_component.update(before)
        trace.untraced[modality.encoder_module] = (f"{modality.name}: its encoder does not run on the meta device "
                                                   f"({str(error).splitlines()[0]})")
        return None


def _inputs_embeds(model: OmniForCausalLM, modalities: list[str], workload: Workload, saved: SavedTensors | None,
                   trace: StepTrace) -> torch.Tensor:
    """Token embeddings with every traced modality's embeddings spliced in, as `OmniForCausalLM.embed_inputs`."""
    batch, seq = workload.batch, workload.seq
    ids = torch.empty(batch, seq, dtype=torch.long, device=META)
    embeds = model.get_input_embeddings()(ids)
    encoded = []
    for modality in encoded_modalities(model, modalities):
        features = _encode(model, modality, workload, saved, trace)
        if features is not None:
            encoded.append(features)
            trace.modality_tokens[modality.name] = sum(f.shape[0] for f in features) // batch
    if sum(trace.modality_tokens.values()) > seq:
        raise ValueError(
            f"the modality items fill {sum(trace.modality_tokens.values())} positions per sequence "
            f"({trace.modality_tokens}) but a sequence has only {seq} tokens; raise --seq or use smaller items "
            "(image_size, sensor_steps, audio_frames)"
        )
    with saved.component("language_model.embed_tokens") if saved else nullcontext():
        mask = torch.empty(batch, seq, 1, dtype=torch.bool, device=META)
        for features in encoded:
            embeds = embeds.masked_scatter(mask, torch.cat(features).to(embeds.dtype))
    return embeds


def trace_training_step(model: OmniForCausalLM, modalities: list[str], workload: Workload,
                        device: DeviceModel | None = None) -> StepTrace:
    """Forward + backward of one training step of ``model`` (on meta, trainability already set).

    Args:
        model: an `OmniForCausalLM` on the meta device whose trained parameters have
            ``requires_grad`` set (LoRA adapters already attached as `LoraEmulation` hooks).
        modalities: the modalities whose items the step feeds.
        workload: sizes.
        device: the device model (allocator rounding, attention kernels); default the CPU.

    Returns:
        `StepTrace` with per-row saved bytes and the peak of live bytes over the step.
    """
    device = device or DeviceModel.cpu()
    saved = SavedTensors(model, device)
    live = LiveBytes(device)
    trace = StepTrace()
    try:
        with unpacked_sequences(), attention_stand_in(device), live, saved.hooks():
            embeds = _inputs_embeds(model, modalities, workload, saved, trace)
            kept = workload.batch * workload.labelled_positions
            with labelled_positions(model.language_model, kept):
                logits = model.language_model(inputs_embeds=embeds, logits_to_keep=True, use_cache=False).logits
            with saved.component("language_model.lm_head"):
                targets = torch.empty(kept, dtype=torch.long, device=META)
                loss = F.cross_entropy(logits.float(), targets)
            saved.recording = False
            trace.logits = device.block_bytes(logits.untyped_storage().nbytes())
            del embeds, targets
            if loss.requires_grad:
                loss.backward()
            del loss, logits
    finally:
        saved.remove()
    trace.saved = dict(saved.by_component)
    trace.peak = live.peak
    return trace


def trace_prefill(model: OmniForCausalLM, modalities: list[str], workload: Workload,
                  device: DeviceModel | None = None) -> StepTrace:
    """One prefill as ``generate`` runs it (no gradients, KV cache on, logits of the last position)."""
    device = device or DeviceModel.cpu()
    live = LiveBytes(device)
    trace = StepTrace()
    with torch.no_grad(), unpacked_sequences(), attention_stand_in(device), live:
        embeds = _inputs_embeds(model, modalities, workload, None, trace)
        output = model.language_model(inputs_embeds=embeds, use_cache=True, logits_to_keep=1)
        cache = output.cache
        trace.kv_cache = sum(device.block_bytes(t.untyped_storage().nbytes())
                             for layer in cache.layers for t in (layer.keys, layer.values) if t is not None)
        del embeds, output, cache
    trace.peak = live.peak
    return trace
