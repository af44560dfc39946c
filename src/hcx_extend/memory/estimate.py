"""How much memory a training strategy (or inference) needs, per component, without loading weights.

For each component (every encoder, projector and compressor, and the LLM split into embeddings,
decoder layers and head) the estimate gives bytes of

* weights: frozen parameters in ``dtype``; trained parameters in ``trained_dtype``; the LLM's Linear
  layers in ``quant`` (see `hcx_extend.memory.quantize` for the bytes per weight); LoRA adapters;
* gradients: one per trained parameter, in ``trained_dtype``;
* optimiser state: AdamW's two moments per trained parameter. torch's AdamW keeps them in the
  parameter's dtype and our `Trainer` steps the parameters in place, with no separate master copy.
  So with the default ``trained_dtype=float32``, trained parameters are held in fp32 (they *are* the
  fp32 master weights) and cost 16 bytes each (weight 4, gradient 4, moments 8), while frozen weights
  and activations use ``dtype``. ``trained_dtype=bfloat16`` is pure-bf16 AdamW: 8 bytes each;
* activations: what autograd saves for backward, traced on the meta device through the model's own
  code (`hcx_extend.memory.activations`); for inference, the KV cache of a prefill.

The number to compare with a GPU's memory is ``peak``: weights + optimiser state + the most bytes
alive at once during the step (activations, logits and loss buffers, backward temporaries and
gradients as they appear, simulated op by op on meta), or at the optimiser step (all gradients plus
foreach AdamW's one temporary copy of the trained parameters), whichever is larger. Quantised layers
add one dequantised weight matrix (bitsandbytes dequantises before each matmul).

``device`` says which machine the numbers are for (`hcx_extend.memory.device_model`): ``"cpu"`` counts
exact tensor sizes and the CPU's flash attention kernel; ``"cuda"`` counts what
``torch.cuda.max_memory_allocated`` counts: every tensor rounded up to the caching allocator's
512-byte blocks, the attention kernel the GPU would pick for each call (fused kernels keep no
``(L, L)`` matrix; the math fallback, e.g. fp32 grouped-query attention, does) with its backward
scratch buffers, and the cuBLAS workspaces (one per thread that runs matmuls: two in training).

LoRA parameters are counted from module shapes: ``r * (in + out)`` per adapted Linear. Which Linear
layers are adapted is decided by the trainer's own rule, `hcx_extend.lora_targets`
("attention": every Linear directly inside a module whose class name contains "Attention": q/k/v/o
in the LLM and the IMU encoder, q/k/v/out_proj in the audio tower, the fused ``qkv`` and ``proj`` in
the vision tower). What is trained comes from `hcx_extend.ladder.plan_strategy`, the plan
`apply_strategy` executes: an encoder named in ``fresh`` (initialised, not pretrained) is trained in
full instead of adapted.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
from torch import nn

from hcx_extend.config import OmniConfig
from hcx_extend.ladder import STRATEGIES, LoraSpec, Strategy, get_strategy, plan_strategy
from hcx_extend.lora_targets import resolve_lora_targets
from hcx_extend.memory.activations import StepTrace, trace_prefill, trace_training_step
from hcx_extend.memory.components import LLM_ROWS, component_of_parameter
from hcx_extend.memory.device_model import DeviceModel
from hcx_extend.memory.lora_emulation import LoraEmulation, lora_parameter_count
from hcx_extend.memory.quantize import check_method, quantizable_linears, quantized_weight_bytes
from hcx_extend.memory.workload import Workload
from hcx_extend.model import OmniForCausalLM
from hcx_extend.units import human_bytes, human_count, parse_dtype

INFERENCE = "inference"


@dataclass
class ComponentMemory:
    """Bytes of one component. ``trained`` counts trained parameters, LoRA adapters included."""

    name: str
    parameters: int = 0
    trained: int = 0
    weights: int = 0
    gradients: int = 0
    optimizer: int = 0
    activations: int = 0

    @property
    def total(self) -> int:
        return self.weights + self.gradients + self.optimizer + self.activations


@dataclass
class MemoryEstimate:
    """The estimate for one strategy (or ``"inference"``); see the module docstring for the rules.

    Attributes:
        rows: one `ComponentMemory` per component, modality modules first, then the LLM.
        peak: the most bytes alive at once during one step (what must fit on the device).
        kv_cache: KV cache bytes after the prefill (inference).
        untraced: encoder components whose activations could not be traced, with the reason.
        device: the device model's name ("cpu" or "cuda").
        workspaces: bytes of library workspaces in ``peak`` (cuBLAS on CUDA; 0 on the CPU).
    """

    strategy: str
    workload: Workload
    dtype: torch.dtype
    trained_dtype: torch.dtype
    quant: str | None
    gradient_checkpointing: bool
    rows: list[ComponentMemory]
    peak: int
    kv_cache: int = 0
    modality_tokens: dict[str, int] = field(default_factory=dict)
    untraced: dict[str, str] = field(default_factory=dict)
    device: str = "cpu"
    workspaces: int = 0

    def row(self, name: str) -> ComponentMemory:
        for row in self.rows:
            if row.name == name:
                return row
        raise KeyError(f"no component {name!r}; rows: {[r.name for r in self.rows]}")

    def total(self, column: str) -> int:
        return sum(getattr(row, column) for row in self.rows)

    @property
    def parameters(self) -> int:
        return self.total("parameters")

    @property
    def trained(self) -> int:
        return self.total("trained")

    def table(self) -> str:
        """A printable per-component table with totals and the peak."""
        scale, unit = (1e9, "GB") if max(row.total for row in self.rows) >= 1e9 else (1e6, "MB")

        def gb(value: int) -> str:
            return f"{value / scale:9.3f}"

        lines = [
            f"{'component':<30} {'params':>10} {'trained':>10} {'weights':>9} {'grads':>9} {'optim':>9} "
            f"{'activ.':>9} {'total':>9}   ({unit})"
        ]
        for r in self.rows:
            lines.append(
                f"{r.name:<30} {human_count(r.parameters):>10} {human_count(r.trained):>10} {gb(r.weights)} "
                f"{gb(r.gradients)} {gb(r.optimizer)} {gb(r.activations)} {gb(r.total)}"
            )
        totals = ComponentMemory("sum of rows", self.parameters, self.trained, self.total("weights"),
                                 self.total("gradients"), self.total("optimizer"), self.total("activations"))
        lines.append(
            f"{totals.name:<30} {human_count(totals.parameters):>10} {human_count(totals.trained):>10} "
            f"{gb(totals.weights)} {gb(totals.gradients)} {gb(totals.optimizer)} {gb(totals.activations)} "
            f"{gb(totals.total)}"
        )
        if self.workspaces:
            lines.append(f"{self.device} library workspaces (in the peak): {human_bytes(self.workspaces)}")
        if self.strategy == INFERENCE:
            lines.append(f"peak during the prefill on {self.device}: {human_bytes(self.peak)} (weights, KV cache "
                         f"{human_bytes(self.kv_cache)}, working buffers)")
        else:
            lines.append(f"peak during one training step on {self.device}: {human_bytes(self.peak)} (gradients and "
                         "activations are not all alive at once; logits, loss and backward buffers come on top)")
        for component, reason in self.untraced.items():
            lines.append(f"activations not traced for {component}: {reason}")
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------- building the twin
def meta_twin(model_or_config: OmniForCausalLM | OmniConfig, dtype: torch.dtype) -> OmniForCausalLM:
    """A weightless copy of the model (meta device) in ``dtype``."""
    config = model_or_config.config if isinstance(model_or_config, nn.Module) else model_or_config
    if not isinstance(config, OmniConfig):
        raise ValueError(f"expected an OmniForCausalLM or an OmniConfig, got {type(model_or_config).__name__}")
    with torch.device("meta"):
        twin = OmniForCausalLM(copy.deepcopy(config))
    twin.to(dtype)
    for parameter in twin.parameters():
        parameter.requires_grad_(False)
    return twin


def resolve_strategy(strategy: str | Strategy) -> Strategy | None:
    """A `Strategy`, or None for ``"inference"``."""
    if strategy == INFERENCE:
        return None
    if isinstance(strategy, str) and strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}; choose from {[*STRATEGIES, INFERENCE]}")
    return get_strategy(strategy)


def _lora_targets(twin: OmniForCausalLM, adapted: list[tuple[str, LoraSpec]]) -> list[tuple[str, LoraSpec, nn.Linear]]:
    """``(row, spec, linear)`` for every Linear the LoRA adapters wrap."""
    targets = []
    for component, spec in adapted:
        module = getattr(twin.model, component)
        for path in resolve_lora_targets(module, spec.targets, component):
            row = component_of_parameter(f"model.{component}.{path}.weight")
            targets.append((row, spec, module.get_submodule(path)))
    return targets


# ---------------------------------------------------------------------------------------- the estimate
def estimate_memory(
    model_or_config: OmniForCausalLM | OmniConfig,
    strategy: str | Strategy = "projector",
    workload: Workload | None = None,
    *,
    dtype: torch.dtype | str = torch.bfloat16,
    trained_dtype: torch.dtype | str = torch.float32,
    quant: str | None = None,
    gradient_checkpointing: bool = False,
    modalities: list[str] | None = None,
    fresh: tuple[str, ...] | list[str] = (),
    foreach: bool = True,
    device: str | DeviceModel = "cpu",
) -> MemoryEstimate:
    """Memory of one training step of ``strategy`` (or of an inference prefill), per component.

    Args:
        model_or_config: a model (only its config is read; weights are never touched) or an `OmniConfig`.
        strategy: a name from `STRATEGIES`, a `Strategy`, or ``"inference"``.
        workload: batch, sequence length and item sizes (`Workload()` by default).
        dtype: frozen weights and activations ("bf16", "fp16", "fp32").
        trained_dtype: trained parameters, their gradients and AdamW moments.
        quant: hold the LLM's Linear layers (not ``lm_head``) in "nf4" or "int8"; None = the strategy's
            ``quantize_llm`` (nf4 for qlora), full precision for inference.
        gradient_checkpointing: keep only each decoder layer's input; recompute the rest in backward.
        modalities: the modalities trained and fed (default: all of the model's).
        fresh: components initialised rather than pretrained (a new modality's encoder); LoRA
            strategies train such encoders in full. Default: none (a pretrained checkpoint).
        foreach: AdamW's multi-tensor step (the default on GPUs) keeps one temporary copy of the
            trained parameters; False = the per-tensor loop (CPU), one tensor at a time.
        device: "cpu", "cuda" or a `DeviceModel`: whose allocator, attention kernels and workspaces
            the peak counts (module docstring).

    Returns:
        `MemoryEstimate`.

    Raises:
        ValueError: unknown strategy / dtype / quantisation / modality / device, a quantised LLM that
            the strategy trains in full, or items that do not fit in the sequence.
    """
    workload = workload or Workload()
    device = DeviceModel.named(device)
    dtype, trained_dtype = parse_dtype(dtype), parse_dtype(trained_dtype)
    resolved = resolve_strategy(strategy)
    quant = check_method(quant if quant is not None else (resolved.quantize_llm if resolved else None))
    twin = meta_twin(model_or_config, dtype)
    modalities = list(modalities) if modalities is not None else list(twin.config.modalities)
    for name in modalities:
        twin.config.modality(name)  # raises for unknown names
    if resolved is not None and resolved.language_model and quant:
        raise ValueError(f"strategy {resolved.name} trains the LLM's weights in full; they cannot be held in {quant}")

    trained_names: set[str] = set()
    lora: list[tuple[str, LoraSpec, nn.Linear]] = []
    emulations: list[LoraEmulation] = []
    if resolved is not None:
        plan = plan_strategy(twin.config, resolved, modalities, fresh)
        full, adapted = plan.full, list(plan.adapted)
        for component in full:
            module = getattr(twin.model, component)
            module.to(trained_dtype)
            module.requires_grad_(True)
        trained_names = {name for name, p in twin.named_parameters() if p.requires_grad}
        lora = _lora_targets(twin, adapted)
        for spec in {spec for _, spec, _ in lora}:
            linears = [linear for _, s, linear in lora if s == spec]
            emulations.append(LoraEmulation(linears, spec.r, spec.alpha, spec.dropout, trained_dtype))
        _set_train_mode(twin, gradient_checkpointing)
    else:
        twin.eval()

    rows = _weight_rows(twin, trained_names, lora, quant, trained_dtype, device)
    try:
        if resolved is None:
            trace = trace_prefill(twin, modalities, workload, device)
        else:
            trace = trace_training_step(twin, modalities, workload, device)
    finally:
        for emulation in emulations:
            emulation.remove()
    return _assemble(rows, trace, twin, resolved, workload, dtype, trained_dtype, quant,
                     gradient_checkpointing, foreach, device)


def _set_train_mode(twin: OmniForCausalLM, gradient_checkpointing: bool) -> None:
    """The modes the trainer sets: training for components that learn, eval for frozen ones."""
    if gradient_checkpointing:
        twin.language_model.activation_checkpointing_enable()
    twin.set_train_mode()
    if gradient_checkpointing:
        twin.language_model.train()  # transformers only checkpoints layers in training mode


def _weight_rows(twin, trained_names, lora, quant, trained_dtype, device: DeviceModel) -> list[ComponentMemory]:
    """Weights, gradients and AdamW moments per row; each tensor counted as the device's allocator counts it."""
    rows: dict[str, ComponentMemory] = {}
    order = [name for name in twin.model.component_names() if name != "language_model"] + list(LLM_ROWS)
    for name in order:
        rows[name] = ComponentMemory(name)
    quantized = {}
    if quant:
        for name, linear in quantizable_linears(twin.language_model):
            quantized[f"model.language_model.{name}.weight"] = quantized_weight_bytes(
                linear.out_features, linear.in_features, quant)
    blocks = device.block_bytes
    trained_bytes = trained_dtype.itemsize
    for name, parameter in twin.named_parameters():
        row = rows[component_of_parameter(name)]
        row.parameters += parameter.numel()
        row.weights += blocks(quantized.get(name, parameter.numel() * parameter.element_size()))
        if name in trained_names:
            row.trained += parameter.numel()
            row.gradients += blocks(parameter.numel() * trained_bytes)
            row.optimizer += 2 * blocks(parameter.numel() * trained_bytes)
    for row_name, spec, linear in lora:
        row = rows[row_name]
        row.trained += lora_parameter_count(linear, spec.r)
        # Two tensors per adapter: A (r x in) and B (out x r).
        adapter = blocks(spec.r * linear.in_features * trained_bytes) + blocks(spec.r * linear.out_features * trained_bytes)
        row.weights += adapter
        row.gradients += adapter
        row.optimizer += 2 * adapter
    return list(rows.values())


def _assemble(rows, trace: StepTrace, twin, resolved, workload, dtype, trained_dtype, quant,
              gradient_checkpointing, foreach, device: DeviceModel) -> MemoryEstimate:
    by_name = {row.name: row for row in rows}
    for component, saved in trace.saved.items():
        by_name[component].activations += saved
    if resolved is None:
        by_name["language_model.layers"].activations += trace.kv_cache
    elif gradient_checkpointing:
        # Checkpointed layers keep only their input hidden states (the rest is recomputed in backward).
        text = twin.config.text_config
        by_name["language_model.layers"].activations += text.num_hidden_layers * device.block_bytes(
            workload.batch * workload.seq * text.hidden_size * dtype.itemsize)
    weights = sum(row.weights for row in rows)
    optimizer = sum(row.optimizer for row in rows)
    gradients = sum(row.gradients for row in rows)
    trained_bytes = trained_dtype.itemsize
    largest_trained = device.block_bytes(
        max((p.numel() for p in twin.parameters() if p.requires_grad), default=0) * trained_bytes)
    # foreach AdamW's sqrt(v) buffer is one copy of the trained parameters: as many bytes as their gradients.
    step_temporary = gradients if foreach else largest_trained
    dequantized = 0
    if quant:
        dequantized = device.block_bytes(max((linear.weight.numel() for _, linear in quantizable_linears(
            twin.language_model)), default=0) * dtype.itemsize)
    # The trainer's output object (its logits) lives until after the optimiser step.
    peak_dynamic = trace.peak if resolved is None else max(trace.peak, gradients + step_temporary + trace.logits)
    workspaces = device.persistent_bytes(training=resolved is not None)
    return MemoryEstimate(
        strategy=resolved.name if resolved else INFERENCE,
        workload=workload,
        dtype=dtype,
        trained_dtype=trained_dtype,
        quant=quant,
        gradient_checkpointing=gradient_checkpointing,
        rows=rows,
        peak=weights + optimizer + peak_dynamic + dequantized + workspaces,
        kv_cache=trace.kv_cache,
        modality_tokens=trace.modality_tokens,
        untraced=trace.untraced,
        device=device.name,
        workspaces=workspaces,
    )


def weight_footprint(model_or_config: OmniForCausalLM | OmniConfig, dtype: torch.dtype | str = torch.bfloat16,
                     quant: str | None = None) -> int:
    """Bytes of all weights with the LLM's Linear layers (not ``lm_head``) in ``quant`` (None = ``dtype``)."""
    dtype = parse_dtype(dtype)
    twin = meta_twin(model_or_config, dtype)
    rows = _weight_rows(twin, set(), [], check_method(quant), dtype, DeviceModel.cpu())
    return sum(row.weights for row in rows)
