"""Activation memory of a training step or a prefill, found by running the model on the meta device.

Nothing is computed and nothing is allocated: the model is built on PyTorch's meta device and one
step runs on meta tensors of the real shapes while two recorders watch it:

* `SavedTensors` (autograd's saved-tensor hooks) adds up, per component, the bytes autograd keeps
  for backward: the estimate's "activations" column. A storage is counted once however many views
  of it are saved, and weights are never counted.
* `LiveBytes` (a dispatch mode) follows every storage an op creates until it is freed and keeps the
  peak: activations plus logits, loss buffers, backward temporaries and gradients as they appear.

Two things are replaced while tracing, because the meta device would not do them as a GPU does:

* attention: on meta, ``scaled_dot_product_attention`` takes the math path, which keeps the
  ``(heads, L, L)`` probabilities. Flash / memory-efficient kernels on GPUs, and the CPU flash
  kernel, keep only q, k, v, the output and the log-sum-exp; `fused_attention` stands in with exactly
  those (and the mask, when one is given).
* LoRA: `LoraEmulation` adds adapters with forward hooks that compute what peft's ``lora.Linear``
  computes (cast to the adapter dtype, dropout, A, B, scale, add, cast back), so autograd saves what
  peft would make it save.

The step mirrors `OmniForCausalLM.forward` with the trainer's ``logits_to_keep="labels"``: encoder ->
(concatenate items) -> projector -> (compressor) -> masked scatter into the token embeddings -> LLM
-> logits at the labelled positions -> ``cross_entropy(logits.float())``. Encoders are run through a
per-type probe (`ENCODER_PROBES`) that feeds inputs of the workload's size; an encoder type without a
probe is reported as untraced.
"""

from __future__ import annotations

import math
import weakref
from collections import defaultdict
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from hcx_extend.config import ModalityConfig
from hcx_extend.model import OmniForCausalLM

META = torch.device("meta")


# ---------------------------------------------------------------------------------------- workload
@dataclass(frozen=True)
class Workload:
    """What one training step (or one prefill) processes.

    Args:
        batch: sequences per step.
        seq: LLM tokens per sequence, modality placeholders included.
        image_size: side in pixels of the one image each sequence holds (vision encoders).
        audio_frames: mel frames of the one audio clip per sequence; None = the encoder's full window
            (Qwen2-Audio always runs on its padded 30 s window, so this changes only the token count).
        sensor_steps: time steps of the one sensor recording per sequence.
        label_fraction: share of positions that carry a label (the trainer computes logits only there).
    """

    batch: int = 1
    seq: int = 2048
    image_size: int = 448
    audio_frames: int | None = None
    sensor_steps: int = 100
    label_fraction: float = 1.0

    def __post_init__(self):
        for name in ("batch", "seq", "image_size", "sensor_steps"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"workload: {name} must be a positive integer, got {value!r}")
        if self.audio_frames is not None and self.audio_frames < 1:
            raise ValueError(f"workload: audio_frames must be positive or None, got {self.audio_frames!r}")
        if not 0 < self.label_fraction <= 1:
            raise ValueError(f"workload: label_fraction must be in (0, 1], got {self.label_fraction!r}")

    @property
    def labelled_positions(self) -> int:
        """Positions per sequence whose logits are computed (the last position never has a target)."""
        return max(1, math.floor((self.seq - 1) * self.label_fraction))


# ---------------------------------------------------------------------------------------- components
def component_of_module(name: str) -> str | None:
    """The estimate row a module (name relative to `OmniForCausalLM`) belongs to.

    ``model.language_model.model.embed_tokens`` -> ``language_model.embed_tokens``;
    ``model.language_model.model.layers.N...`` -> ``language_model.layers``; the final norm and
    ``lm_head`` -> ``language_model.lm_head``; ``model.vision_model...`` -> ``vision_model``.
    """
    parts = name.split(".")
    if len(parts) < 2 or parts[0] != "model":
        return None
    if parts[1] != "language_model":
        return parts[1]
    rest = parts[2:]
    if rest[:1] == ["lm_head"]:
        return "language_model.lm_head"
    if rest[:1] == ["model"] and len(rest) > 1:
        if rest[1] == "embed_tokens":
            return "language_model.embed_tokens"
        if rest[1] == "layers":
            return "language_model.layers"
        return "language_model.lm_head"  # final norm, rotary tables
    return "language_model.lm_head"


def component_of_parameter(name: str) -> str:
    """The estimate row of a parameter: the component of its owning module."""
    return component_of_module(name.rsplit(".", 1)[0]) or name.split(".")[0]


def _storage_key(tensor: torch.Tensor) -> int:
    return tensor.untyped_storage()._cdata


# ---------------------------------------------------------------------------------------- recorders
class LiveBytes(TorchDispatchMode):
    """Follows every storage an op creates until it is freed; ``peak`` is the most alive at once.

    Storages that existed before (weights, inputs) and views of them are not counted. Frees are seen
    through a finalizer on the storage object, which lives exactly as long as the storage.
    """

    def __init__(self):
        super().__init__()
        self.live = 0
        self.peak = 0
        self._alive: set[int] = set()

    def _free(self, key: int, nbytes: int) -> None:
        self._alive.discard(key)
        self.live -= nbytes

    def reset_peak(self) -> None:
        self.peak = self.live

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {_storage_key(a) for a in tree_flatten((args, kwargs))[0] if isinstance(a, torch.Tensor)}
        for tensor in tree_flatten(out)[0]:
            if not isinstance(tensor, torch.Tensor):
                continue
            storage = tensor.untyped_storage()
            key = storage._cdata
            if key in self._alive or key in inputs:
                continue
            nbytes = storage.nbytes()
            self._alive.add(key)
            self.live += nbytes
            weakref.finalize(storage, self._free, key, nbytes)
        self.peak = max(self.peak, self.live)
        return out


class SavedTensors:
    """Bytes autograd saves for backward, per component, while ``recording`` is true.

    A tensor is attributed to the innermost component module running when it is saved; what is saved
    outside every component (the LLM's selection of the labelled positions) goes to
    ``language_model.lm_head``, with the logits and the loss.

    Args:
        model: the traced model; its parameters and buffers are never counted.
    """

    def __init__(self, model: nn.Module):
        self.excluded = {_storage_key(t) for t in [*model.parameters(), *model.buffers()]}
        self.by_component: dict[str, int] = defaultdict(int)
        self.recording = True
        self._seen: set[int] = set()
        self._stack: list[str] = []
        self._handles = []
        for name, module in model.named_modules():
            component = component_of_module(name)
            if component is None or not _is_component_root(name):
                continue
            self._handles.append(module.register_forward_pre_hook(self._enter(component)))
            self._handles.append(module.register_forward_hook(self._leave, always_call=True))

    def _enter(self, component: str):
        def hook(module, args) -> None:
            self._stack.append(component)

        return hook

    def _leave(self, module, args, output) -> None:
        self._stack.pop()

    @contextmanager
    def component(self, name: str) -> Iterator[None]:
        """Attribute what is saved outside any component module (splice, loss) to ``name``."""
        self._stack.append(name)
        try:
            yield
        finally:
            self._stack.pop()

    def _pack(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.recording:
            key = _storage_key(tensor)
            if key not in self.excluded and key not in self._seen:
                self._seen.add(key)
                component = self._stack[-1] if self._stack else "language_model.lm_head"
                self.by_component[component] += tensor.untyped_storage().nbytes()
        return tensor

    @contextmanager
    def hooks(self) -> Iterator[None]:
        with torch.autograd.graph.saved_tensors_hooks(self._pack, lambda tensor: tensor):
            yield

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


def _is_component_root(name: str) -> bool:
    """Modules whose forward marks the start of a component (hooks nest, so one level is enough)."""
    parts = name.split(".")
    if len(parts) == 2 and parts[0] == "model" and parts[1] != "language_model":
        return True
    return name in ("model.language_model.model.embed_tokens", "model.language_model.model.norm",
                    "model.language_model.lm_head") or (
        len(parts) == 5 and parts[:4] == ["model", "language_model", "model", "layers"])


# ---------------------------------------------------------------------------------------- attention
class _FusedAttentionFunction(torch.autograd.Function):
    """Shapes and saved tensors of a flash / memory-efficient attention kernel, without computing."""

    @staticmethod
    def forward(ctx, query, key, value, mask):
        out = query.new_empty((*query.shape[:-1], value.shape[-1]))
        logsumexp = query.new_empty(query.shape[:-1], dtype=torch.float32)
        ctx.save_for_backward(query, key, value, out, logsumexp, mask)
        return out

    @staticmethod
    def backward(ctx, grad):
        query, key, value, _, _, _ = ctx.saved_tensors
        return torch.empty_like(query), torch.empty_like(key), torch.empty_like(value), None


def _fused_sdpa(query, key, value, attn_mask=None, *args, **kwargs):
    return _FusedAttentionFunction.apply(query, key, value, attn_mask)


@contextmanager
def fused_attention() -> Iterator[None]:
    """Route ``F.scaled_dot_product_attention`` to `_FusedAttentionFunction` while active.

    The function is swapped on ``torch.nn.functional`` (callers look it up there at call time) rather
    than through a torch-function mode, because the backward recomputation of checkpointed layers
    runs on autograd's own thread, where modes of the calling thread do not apply.
    """
    original = F.scaled_dot_product_attention
    F.scaled_dot_product_attention = _fused_sdpa
    try:
        yield
    finally:
        F.scaled_dot_product_attention = original


# ---------------------------------------------------------------------------------------- LoRA
def lora_parameter_count(linear: nn.Linear, rank: int) -> int:
    """``rank * (in_features + out_features)``: the A and B matrices of one adapter."""
    return rank * (linear.in_features + linear.out_features)


class LoraEmulation:
    """LoRA adapters on ``linears`` as forward hooks, computing what peft's ``lora.Linear`` does.

    Args:
        linears: the adapted Linear layers.
        rank / alpha / dropout: the `LoraSpec`.
        dtype: the adapters' dtype (peft keeps adapters in float32 over a bf16 model by default).
    """

    def __init__(self, linears: list[nn.Linear], rank: int, alpha: int, dropout: float, dtype: torch.dtype):
        self.adapters: list[nn.Module] = []
        self._handles = []
        scale = alpha / rank
        for linear in linears:
            device = linear.weight.device
            down = nn.Linear(linear.in_features, rank, bias=False, device=device, dtype=dtype)
            up = nn.Linear(rank, linear.out_features, bias=False, device=device, dtype=dtype)
            self.adapters.extend((down, up))

            def hook(module, args, output, down=down, up=up):
                x = args[0].to(down.weight.dtype)
                update = up(down(F.dropout(x, dropout, training=True))) * scale
                return (output + update).to(output.dtype)

            self._handles.append(linear.register_forward_hook(hook))

    def parameters(self) -> list[nn.Parameter]:
        return [p for adapter in self.adapters for p in adapter.parameters()]

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


# ---------------------------------------------------------------------------------------- encoder probes
EncoderProbe = Callable[[nn.Module, ModalityConfig, int, Workload], torch.Tensor]
"""``probe(encoder, modality, items, workload) -> (items, tokens_per_item, width)`` on meta."""


def _probe_imu(encoder: nn.Module, modality: ModalityConfig, items: int, workload: Workload) -> torch.Tensor:
    dtype = next(encoder.parameters()).dtype
    channels = modality.input.channels or encoder.input_conv.in_channels
    values = torch.empty(items, workload.sensor_steps, channels, device=META, dtype=dtype)
    lengths = torch.full((items,), workload.sensor_steps, dtype=torch.long)
    features, _ = encoder(values, lengths)
    return features


def _probe_qwen_audio(encoder: nn.Module, modality: ModalityConfig, items: int, workload: Workload) -> torch.Tensor:
    from hcx_extend.encoders.qwen_audio import audio_token_count

    config = encoder.config
    dtype = next(encoder.parameters()).dtype
    window = 2 * config.max_source_positions
    frames = min(workload.audio_frames or window, window)
    features = torch.empty(items, config.num_mel_bins, window, device=META, dtype=dtype)
    positions = config.max_source_positions
    # The encoder masks padding after its stride-2 convolution: a (items, 1, positions, positions) mask.
    mask = torch.empty(items, 1, positions, positions, device=META, dtype=torch.bool)
    hidden = encoder(features, attention_mask=mask).last_hidden_state
    return hidden[:, : audio_token_count(frames)]


def _probe_qwen_vision(encoder: nn.Module, modality: ModalityConfig, items: int, workload: Workload) -> torch.Tensor:
    from transformers.vision_utils import get_vision_cu_seqlens, get_vision_position_ids, get_vision_window_index

    from hcx_extend.encoders.qwen_vision import image_token_count

    config = encoder.config
    dtype = next(encoder.parameters()).dtype
    side = config.patch_size * config.spatial_merge_size
    grid_side = max(side, round(workload.image_size / side) * side) // config.patch_size
    grid = torch.tensor([[1, grid_side, grid_side]] * items)
    # Index tables are data, not activations: compute them on the CPU, keep what is only read as
    # Python numbers there, and move what meets meta tensors to meta.
    window_index, cu_window = get_vision_window_index(grid, config.spatial_merge_size, config.window_size, config.patch_size)
    cu_seqlens = get_vision_cu_seqlens(grid)
    row = config.in_channels * config.temporal_patch_size * config.patch_size**2
    pixels = torch.empty(int(grid.prod(-1).sum()), row, device=META, dtype=dtype)
    output = encoder(
        pixels,
        grid_thw=grid,
        position_ids=get_vision_position_ids(grid, config.spatial_merge_size).to(META),
        cu_seqlens=cu_seqlens,
        max_seqlen=int((cu_seqlens[1:] - cu_seqlens[:-1]).max()),
        window_index=window_index.to(META),
        cu_window_seqlens=cu_window,
        max_window_seqlen=int((cu_window[1:] - cu_window[:-1]).max()),
    )
    tokens = image_token_count(workload.image_size, workload.image_size, modality.encoder)
    return output.pooler_output.view(items, tokens, -1)


ENCODER_PROBES: dict[str, EncoderProbe] = {
    "imu": _probe_imu,
    "imu_guide": _probe_imu,  # the guide's literal encoder takes the same (values, lengths)
    "qwen2_audio_encoder": _probe_qwen_audio,
    "qwen2_5_vl_vision": _probe_qwen_vision,
}


def register_encoder_probe(model_type: str, probe: EncoderProbe, *, replace: bool = False) -> None:
    """Let the estimator trace a user-registered encoder type (see `EncoderProbe` for the contract)."""
    if model_type in ENCODER_PROBES and not replace:
        raise ValueError(f"an encoder probe for {model_type!r} exists; pass replace=True to override it")
    ENCODER_PROBES[model_type] = probe


# ---------------------------------------------------------------------------------------- the step
@dataclass
class StepTrace:
    """What one traced step kept and peaked at (bytes; weights and optimiser state not included).

    Attributes:
        saved: bytes saved for backward per component (training) or 0.
        peak: most bytes alive at once: activations, logits, loss, temporaries, gradients, KV cache.
        kv_cache: bytes of the KV cache after a prefill (inference only).
        logits: bytes of the logits, which the trainer's output object keeps until the optimiser step.
        modality_tokens: LLM positions each modality's items fill.
        untraced: encoder components without a probe (their activations are missing).
    """

    saved: dict[str, int] = field(default_factory=dict)
    peak: int = 0
    kv_cache: int = 0
    logits: int = 0
    modality_tokens: dict[str, int] = field(default_factory=dict)
    untraced: list[str] = field(default_factory=list)


def _encode(model: OmniForCausalLM, modality: ModalityConfig, workload: Workload, untraced: list[str]) -> torch.Tensor | None:
    """Encoder -> concatenated items -> projector (-> compressor), as `OmniForCausalLM.encode_modality`."""
    encoder = getattr(model.model, modality.encoder_module)
    probe = ENCODER_PROBES.get(modality.encoder["model_type"])
    if probe is None:
        untraced.append(modality.encoder_module)
        return None
    features = probe(encoder, modality, workload.batch, workload)
    items, tokens, width = features.shape
    projector = getattr(model.model, modality.projector_module)
    weight = next(projector.parameters())
    projected = projector(torch.cat([features.reshape(items * tokens, width)]).to(weight.dtype))
    compressor_name = modality.compressor_module
    if compressor_name is not None:
        compressor = getattr(model.model, compressor_name)
        padded = projected.view(items, tokens, -1)
        compressed, _ = compressor(padded, torch.full((items,), tokens, device=META))
        projected = compressed.reshape(-1, compressed.shape[-1])
    return projected


def encoded_modalities(model: OmniForCausalLM, modalities: list[str]) -> list[ModalityConfig]:
    """One modality per encoder module (video shares the image tower and is not run twice)."""
    chosen, seen = [], set()
    for name in modalities:
        modality = model.config.modality(name)
        if modality.encoder_module not in seen:
            seen.add(modality.encoder_module)
            chosen.append(modality)
    return chosen


def _inputs_embeds(model, modalities, workload, trace_saved: SavedTensors | None, untraced, tokens) -> torch.Tensor:
    batch, seq = workload.batch, workload.seq
    projected = []
    for modality in encoded_modalities(model, modalities):
        output = _encode(model, modality, workload, untraced)
        if output is not None:
            projected.append(output)
            tokens[modality.name] = output.shape[0] // batch
    if sum(tokens.values()) > seq:
        raise ValueError(
            f"the modality items fill {sum(tokens.values())} positions per sequence ({tokens}) but a sequence has "
            f"only {seq} tokens; raise --seq or use smaller items (image_size, sensor_steps, audio_frames)"
        )
    ids = torch.empty(batch, seq, dtype=torch.long, device=META)
    embeds = model.get_input_embeddings()(ids)
    context = trace_saved.component("language_model.embed_tokens") if trace_saved else nullcontext()
    with context:
        mask = torch.empty(batch, seq, 1, dtype=torch.bool, device=META)
        for values in projected:
            embeds = embeds.masked_scatter(mask, values.to(embeds.dtype))
    return embeds


@contextmanager
def _unpacked_sequences() -> Iterator[None]:
    """transformers looks for packed sequences in the position ids by reading their values, which meta
    tensors do not have; the traced batch holds one sequence per row, the answer the check would give."""
    from transformers import masking_utils

    original = masking_utils.find_packed_sequence_indices
    masking_utils.find_packed_sequence_indices = lambda position_ids: None
    try:
        yield
    finally:
        masking_utils.find_packed_sequence_indices = original


@contextmanager
def _labelled_positions(language_model: nn.Module, count: int) -> Iterator[None]:
    """Select ``count`` positions the way ``logits_to_keep=<bool mask>`` does (``hidden[mask]``).

    A boolean mask cannot be applied on meta (the result's size depends on its values), so the
    language model's ``slice_logits_to_keep`` is swapped for an index by two long tensors of ``count``
    entries: the same output, and the same saved indices, as ``hidden[mask]``.
    """
    import sys

    module = sys.modules[type(language_model).__module__]
    original = getattr(module, "slice_logits_to_keep", None)
    if original is None:
        raise ValueError(f"{type(language_model).__name__} does not slice logits with slice_logits_to_keep; "
                         "the estimator cannot trace its logits_to_keep='labels' path")

    def select(hidden: torch.Tensor, keep) -> torch.Tensor:
        rows = torch.empty(count, dtype=torch.long, device=hidden.device)
        columns = torch.empty(count, dtype=torch.long, device=hidden.device)
        return hidden[rows, columns]

    module.slice_logits_to_keep = select
    try:
        yield
    finally:
        module.slice_logits_to_keep = original


def trace_training_step(model: OmniForCausalLM, modalities: list[str], workload: Workload) -> StepTrace:
    """Forward + backward of one training step of ``model`` (on meta, trainability already set).

    Args:
        model: an `OmniForCausalLM` on the meta device whose trained parameters have
            ``requires_grad`` set (LoRA adapters already attached as `LoraEmulation` hooks).
        modalities: the modalities whose items the step feeds.
        workload: sizes.

    Returns:
        `StepTrace` with per-component saved bytes and the peak of live bytes over the step.
    """
    saved = SavedTensors(model)
    live = LiveBytes()
    trace = StepTrace()
    try:
        with _unpacked_sequences(), fused_attention(), live, saved.hooks():
            embeds = _inputs_embeds(model, modalities, workload, saved, trace.untraced, trace.modality_tokens)
            kept = workload.batch * workload.labelled_positions
            with _labelled_positions(model.language_model, kept):
                logits = model.language_model(inputs_embeds=embeds, logits_to_keep=True, use_cache=False).logits
            with saved.component("language_model.lm_head"):
                targets = torch.empty(kept, dtype=torch.long, device=META)
                loss = F.cross_entropy(logits.float(), targets)
            saved.recording = False
            trace.logits = logits.untyped_storage().nbytes()
            del embeds, targets
            if loss.requires_grad:
                loss.backward()
            del loss, logits
    finally:
        saved.remove()
    trace.saved = dict(saved.by_component)
    trace.peak = live.peak
    return trace


def trace_prefill(model: OmniForCausalLM, modalities: list[str], workload: Workload) -> StepTrace:
    """One prefill as ``generate`` runs it (no gradients, KV cache on, logits of the last position)."""
    live = LiveBytes()
    trace = StepTrace()
    with torch.no_grad(), fused_attention(), live:
        embeds = _inputs_embeds(model, modalities, workload, None, trace.untraced, trace.modality_tokens)
        output = model.language_model(inputs_embeds=embeds, use_cache=True, logits_to_keep=1)
        cache = output.cache
        trace.kv_cache = sum(
            t.untyped_storage().nbytes() for layer in cache.layers for t in (layer.keys, layer.values) if t is not None
        )
        del embeds, output, cache
    trace.peak = live.peak
    return trace


__all__ = [
    "ENCODER_PROBES",
    "fused_attention",
    "LiveBytes",
    "LoraEmulation",
    "SavedTensors",
    "StepTrace",
    "Workload",
    "component_of_module",
    "encoded_modalities",
    "component_of_parameter",
    "lora_parameter_count",
    "register_encoder_probe",
    "trace_prefill",
    "trace_training_step",
]
