"""Hold the LLM's linear layers in 4-bit NF4 or 8-bit with bitsandbytes; encoders stay in full precision.

The 4-bit recipe is the extension guide's ``BitsAndBytesConfig``::

    load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
    bnb_4bit_compute_dtype=torch.bfloat16

applied in place: every ``nn.Linear`` of the chosen components (the LLM by default) except those named
in ``skip`` (``lm_head`` by default, as transformers does) becomes a ``bnb.nn.Linear4bit`` (NF4, blocks
of 64 weights, block scales quantised again to 8 bits in groups of 256) or a ``bnb.nn.Linear8bitLt``
(LLM.int8: int8 weights with one float32 scale per output row, outlier threshold 6). Embeddings,
norms, encoders, projectors and compressors keep their dtype unless ``components`` names them.

Bytes per quantised weight matrix of ``n`` weights and ``rows`` output rows, as bitsandbytes 0.50 stores
them (checked against real layers in the tests):

* nf4: ``ceil(n / 2)`` packed + ``ceil(n / 64)`` uint8 block scales + ``4 * ceil(n / 64 / 256)`` float32
  second-level scales + 4 (offset) + 1088 (the layer's own 16- and 256-entry float32 code tables):
  about 0.516 byte per weight, 25.8 % of bf16;
* int8: ``n`` + ``4 * rows``.

bitsandbytes 0.50 runs both on the CPU (slow reference kernels), so this is testable without a GPU.

bitsandbytes is imported only when something is quantised (`import_bitsandbytes`), never at import
time of this package, and its hub lookup for an optional CPU kernel is kept quiet (`quiet_kernel_lookup`).
"""

from __future__ import annotations

import contextlib
import logging
import math
from dataclasses import dataclass, field
from typing import Iterable, Iterator

import torch
from torch import nn

from hcx_extend.units import human_bytes

QUANT_METHODS = ("nf4", "int8")
# What bitsandbytes 0.50 logs while it is imported on a CPU with AVX512-BF16: it asks the `kernels`
# package for an optional faster 4-bit CPU matmul from the Hugging Face Hub ("kernels-community/
# quantization-bitsandbytes"). Offline (HF_HUB_OFFLINE=1), or without network, the lookup fails and it
# logs two warnings, then uses its own CPU kernel: results are the same, only speed differs. A user who
# reads "Failed to load" in a good run thinks the run failed, so these two lines (and nothing else) are
# dropped while bitsandbytes is imported; neither package has a setting that skips the lookup.
KERNEL_LOOKUP_LOGS = {
    "kernels._internals.hf_hub": "Skipping publisher trust check for 'kernels-community/quantization-bitsandbytes'",
    "bitsandbytes.backends.cpu.ops": "Failed to load CPU gemm_4bit_forward from kernels-community",
}
NF4_BLOCK = 64
NESTED_BLOCK = 256


class _DropKernelLookup(logging.Filter):
    def __init__(self, prefix: str):
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.prefix)


@contextlib.contextmanager
def quiet_kernel_lookup() -> Iterator[None]:
    """Drop bitsandbytes' hub kernel-lookup warnings (`KERNEL_LOOKUP_LOGS`) while the block runs.

    Wrap every import that may import bitsandbytes for the first time: `import_bitsandbytes`, and peft's
    (peft imports bitsandbytes whenever it is installed). Other records of those loggers pass.
    """
    filters = [(logging.getLogger(name), _DropKernelLookup(prefix)) for name, prefix in KERNEL_LOOKUP_LOGS.items()]
    for logger, drop in filters:
        logger.addFilter(drop)
    try:
        yield
    finally:
        for logger, drop in filters:
            logger.removeFilter(drop)


def import_bitsandbytes():
    """The bitsandbytes module, imported on first use with its hub kernel lookup kept quiet."""
    with quiet_kernel_lookup():
        import bitsandbytes
    return bitsandbytes


def check_method(method: str | None) -> str | None:
    """``method`` if it is None, "nf4" or "int8"; a ValueError naming the choices otherwise."""
    if method is not None and method not in QUANT_METHODS:
        raise ValueError(f"unknown quantisation {method!r}; choose nf4 (4-bit NF4, double quantisation) or int8")
    return method


def quantized_weight_bytes(out_features: int, in_features: int, method: str) -> int:
    """Bytes bitsandbytes keeps for one ``(out_features, in_features)`` weight (bias not included)."""
    check_method(method)
    n = out_features * in_features
    if method == "int8":
        return n + 4 * out_features
    blocks = math.ceil(n / NF4_BLOCK)
    code_tables = 4 * (16 + 256)
    return math.ceil(n / 2) + blocks + 4 * math.ceil(blocks / NESTED_BLOCK) + 4 + code_tables


def _skipped(name: str, skip: Iterable[str]) -> bool:
    parts = name.split(".")
    return any(entry in parts or name.endswith(entry) for entry in skip)


def quantizable_linears(module: nn.Module, skip: Iterable[str] = ("lm_head",)) -> list[tuple[str, nn.Linear]]:
    """``(name, layer)`` of every ``nn.Linear`` under ``module`` that quantisation replaces.

    A layer is skipped when one of the dotted parts of its name equals an entry of ``skip`` or its
    name ends with one (``skip=("lm_head",)`` keeps the output head in full precision).
    """
    skip = tuple(skip)
    return [(name, layer) for name, layer in module.named_modules()
            if type(layer) is nn.Linear and not _skipped(name, skip)]


@dataclass
class QuantizationReport:
    """What `quantize_language_model` did.

    Attributes:
        method: "nf4" or "int8".
        replaced: names (relative to ``model.model``) of the Linear layers now quantised.
        linear_bytes_before / linear_bytes_after: bytes of those layers' weights before and after
            (biases excluded; they keep their dtype).
        model_bytes_before / model_bytes_after: every parameter, buffer and quantisation state of the
            whole model, each storage counted once.
    """

    method: str
    replaced: list[str] = field(default_factory=list)
    linear_bytes_before: int = 0
    linear_bytes_after: int = 0
    model_bytes_before: int = 0
    model_bytes_after: int = 0

    @property
    def linear_ratio(self) -> float:
        return self.linear_bytes_after / max(self.linear_bytes_before, 1)

    def __str__(self) -> str:
        return (
            f"{self.method}: {len(self.replaced)} linear layers quantised; their weights "
            f"{human_bytes(self.linear_bytes_before)} -> {human_bytes(self.linear_bytes_after)} "
            f"({100 * self.linear_ratio:.1f} %); whole model {human_bytes(self.model_bytes_before)} -> "
            f"{human_bytes(self.model_bytes_after)}"
        )


def module_bytes(module: nn.Module) -> int:
    """Bytes of every parameter, buffer and bitsandbytes quantisation state under ``module``, each storage once."""
    seen: set[int] = set()
    total = 0

    def add(tensor: torch.Tensor | None) -> None:
        nonlocal total
        if tensor is None or tensor.device.type == "meta":
            return
        storage = tensor.untyped_storage()
        if storage.data_ptr() in seen:
            return
        seen.add(storage.data_ptr())
        total += storage.nbytes()

    for tensor in [*module.parameters(), *module.buffers()]:
        add(tensor)
        state = getattr(tensor, "quant_state", None)
        while state is not None:
            add(state.absmax)
            add(state.code)
            add(state.offset if isinstance(state.offset, torch.Tensor) else None)
            state = state.state2 if state.nested else None
        add(getattr(tensor, "SCB", None))
    return total


def quantize_language_model(
    model: nn.Module,
    method: str = "nf4",
    compute_dtype: torch.dtype = torch.bfloat16,
    skip: Iterable[str] = ("lm_head",),
    components: Iterable[str] = ("language_model",),
) -> QuantizationReport:
    """Replace the LLM's ``nn.Linear`` layers by bitsandbytes 4-bit NF4 or 8-bit layers, in place.

    Args:
        model: an `OmniForCausalLM` with real weights (CPU or CUDA). The layers are quantised on the
            device they are on.
        method: "nf4" (the guide's 4-bit config: NF4, double quantisation) or "int8" (LLM.int8).
        compute_dtype: dtype 4-bit layers compute in (inputs are cast to it, outputs cast back).
        skip: Linear layers to keep, matched on the parts of their names (see `quantizable_linears`).
        components: which components under ``model.model`` to quantise; add encoder names
            (``"vision_model"``, ...) to quantise those too.

    Returns:
        `QuantizationReport` with the footprint before and after.

    Raises:
        ValueError: for an unknown method or component, for weights on the meta device (nothing to
            quantise: load the checkpoint first), or when nothing matches.
    """
    bnb = import_bitsandbytes()
    check_method(method)
    report = QuantizationReport(method=method, model_bytes_before=module_bytes(model))
    known = dict(model.model.named_children())
    for component in components:
        if component not in known:
            raise ValueError(f"cannot quantise {component!r}: the model has components {sorted(known)}")
        for name, linear in quantizable_linears(known[component], skip):
            if linear.weight.device.type == "meta":
                raise ValueError(
                    f"{component}.{name} has no weights (meta device); load or dispatch the checkpoint, then quantise"
                )
            replacement = _quantized_copy(bnb, linear, method, compute_dtype)
            parent_name, _, own = name.rpartition(".")
            parent = known[component].get_submodule(parent_name) if parent_name else known[component]
            setattr(parent, own, replacement)
            report.replaced.append(f"{component}.{name}")
            report.linear_bytes_before += linear.weight.numel() * linear.weight.element_size()
            report.linear_bytes_after += module_bytes(replacement) - _bias_bytes(replacement)
    if not report.replaced:
        raise ValueError(f"no nn.Linear layer to quantise in {list(components)} (skip={tuple(skip)})")
    report.model_bytes_after = module_bytes(model)
    return report


def _bias_bytes(layer: nn.Module) -> int:
    bias = getattr(layer, "bias", None)
    return 0 if bias is None else bias.numel() * bias.element_size()


def _quantized_copy(bnb, linear: nn.Linear, method: str, compute_dtype: torch.dtype) -> nn.Module:
    device = linear.weight.device
    has_bias = linear.bias is not None
    weight = linear.weight.detach()
    if method == "nf4":
        layer = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=has_bias, compute_dtype=compute_dtype,
                                  compress_statistics=True, quant_type="nf4", device="meta")
        # Params4bit quantises when it is moved to a device; start from a CPU copy so moving quantises.
        layer.weight = bnb.nn.Params4bit(weight.to("cpu"), requires_grad=False, quant_type="nf4",
                                         compress_statistics=True)
    else:
        layer = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, bias=has_bias,
                                    has_fp16_weights=False, threshold=6.0, device="meta")
        layer.weight = bnb.nn.Int8Params(weight.to("cpu"), requires_grad=False, has_fp16_weights=False)
    if has_bias:
        layer.bias = nn.Parameter(linear.bias.detach().to("cpu"), requires_grad=False)
    layer = layer.to(device)
    if method == "nf4" and not layer.weight.bnb_quantized:
        # On the CPU, moving to the device the copy is already on does not quantise: ask explicitly.
        layer.weight = layer.weight._quantize(device)
    if method == "nf4":
        # bitsandbytes 0.50 repacks a 4-bit weight in place for its CPU inference kernel the first time
        # the layer runs in eval mode without gradients (CPUs with AVX512-BF16), and its training-mode
        # path then reads the repacked bytes as if they were not: after one evaluation (say, generate()
        # between epochs) QLoRA trains against a garbled LLM. Found on the IMU demo, where qlora stalled
        # at a loss of ~3.4 after the first evaluation. Keep the standard layout.
        layer.support_avx512bf16_for_cpu = False
    return layer


@torch.no_grad()
def next_token_agreement(reference: nn.Module, candidate: nn.Module, prompts: torch.Tensor) -> float:
    """Share of positions where both models predict the same next token (argmax of the logits).

    Args:
        reference / candidate: causal LMs taking ``input_ids``.
        prompts: ``(n, seq)`` token ids.

    Returns:
        agreement in [0, 1] over all ``n * seq`` positions.
    """
    expected = reference(input_ids=prompts).logits.argmax(-1)
    got = candidate(input_ids=prompts).logits.argmax(-1)
    return float((expected == got).float().mean())
