"""Checkpoints: save and load in the HyperCLOVA X layout, and `extend` existing models with modalities.

Format: ``config.json`` (an `OmniConfig`) plus safetensors weights, one ``model.safetensors`` or
``model-0000i-of-0000n.safetensors`` shards with ``model.safetensors.index.json``. Keys follow the
HCX layout (``model.language_model.model.layers.N.*``, ``model.vision_model.*``, ...). Tied weights
are stored once. Only safetensors are read: no pickles.

`extend` reads three kinds of source and writes the HCX layout:

* an HCX-layout omni checkpoint (ours, or the Omni hub's ``model_type: "vlm"``);
* a transformers ``HyperCLOVAXVisionV2`` checkpoint, in either spelling: the hub's
  (``model.vision_projector.*``, ``model.language_model.model.*``, ``model.language_model.lm_head.*``)
  or what transformers 5 saves (``model.projector.*``, ``model.language_model.layers.N.*``, ``lm_head.*``);
* a plain causal LM: a transformers folder (``model.*``, ``lm_head.*``) or a GGUF file.

Tensors under prefixes the model does not build (the Omni checkpoint's ``model.discrete_*``,
``model.video_audio_compressor.*`` when no compressor is configured, ...) are kept in
``model.carried_tensors`` and written back unchanged on save.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

import torch
from accelerate import init_empty_weights
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import AutoConfig

from hcx_extend.config import ModalityConfig, OmniConfig
from hcx_extend.model import OmniForCausalLM

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
_SHARD_PATTERN = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")


# ---------------------------------------------------------------------------------------- reports
@dataclass
class LoadReport:
    """What happened to each checkpoint tensor and each model parameter, grouped by component.

    A component is the module directly under ``model.`` (``language_model``, ``vision_model``, ...).
    """

    loaded: dict[str, int] = field(default_factory=dict)
    missing: dict[str, list[str]] = field(default_factory=dict)
    unexpected: dict[str, list[str]] = field(default_factory=dict)
    carried: dict[str, list[str]] = field(default_factory=dict)
    initialised: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"loaded: {', '.join(f'{c} ({n} tensors)' for c, n in self.loaded.items()) or 'nothing'}"]
        if self.initialised:
            lines.append(f"initialised fresh: {', '.join(self.initialised)}")
        for title, groups in (("missing", self.missing), ("unexpected", self.unexpected), ("carried unchanged", self.carried)):
            for component, keys in groups.items():
                shown = ", ".join(keys[:3]) + (f", ... ({len(keys)} in all)" if len(keys) > 3 else "")
                lines.append(f"{title} in {component}: {shown}")
        return "\n".join(lines)


def component_of(key: str) -> str:
    """``model.vision_model.blocks.0.attn.qkv.weight`` -> ``vision_model``; other keys -> their first part."""
    parts = key.split(".")
    return parts[1] if parts[0] == "model" and len(parts) > 1 else parts[0]


def _group(keys: Iterable[str]) -> dict[str, list[str]]:
    groups: dict[str, list[str]] = defaultdict(list)
    for key in sorted(keys):
        groups[component_of(key)].append(key)
    return dict(groups)


# ---------------------------------------------------------------------------------------- saving
def _parse_size(size: int | str) -> int:
    if isinstance(size, int):
        return size
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]?B)\s*", size.upper())
    if not match:
        raise ValueError(f"max_shard_size must be bytes or like '5GB', '500MB'; got {size!r}")
    return int(float(match.group(1)) * {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9}[match.group(2)])


def tensors_to_save(model: OmniForCausalLM) -> dict[str, torch.Tensor]:
    """The model's state dict with tied duplicates dropped, plus its carried tensors."""
    tensors: dict[str, torch.Tensor] = {}
    seen: set[tuple[int, tuple[int, ...]]] = set()
    for key, tensor in model.state_dict().items():
        if tensor.device.type == "meta":
            raise ValueError(f"cannot save {key}: it has no data (meta device); load or initialise the weights first")
        identity = (tensor.data_ptr(), tuple(tensor.shape))
        if tensor.numel() and identity in seen:
            continue  # a tied weight, restored by tie_weights() on load
        seen.add(identity)
        tensors[key] = tensor
    for key, tensor in model.carried_tensors.items():
        if key in tensors:
            raise ValueError(f"carried tensor {key} collides with a model parameter")
        tensors[key] = tensor
    return tensors


def save_checkpoint(model: OmniForCausalLM, directory: str | os.PathLike, max_shard_size: int | str = "5GB") -> None:
    """Write ``config.json`` and safetensors shards to ``directory``.

    Files are written to a temporary folder first and moved in at the end, so an interrupted save
    leaves the previous checkpoint intact; stale shards of an earlier save are removed.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    limit = _parse_size(max_shard_size)
    tensors = tensors_to_save(model)
    shards: list[dict[str, torch.Tensor]] = [{}]
    shard_bytes = 0
    for key, tensor in tensors.items():
        size = tensor.numel() * tensor.element_size()
        if shards[-1] and shard_bytes + size > limit:
            shards.append({})
            shard_bytes = 0
        shards[-1][key] = tensor.detach().to("cpu").contiguous()
        shard_bytes += size
    names = [SINGLE_FILE] if len(shards) == 1 else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    config = model.config.to_dict()
    config["architectures"] = [type(model).__name__]
    with tempfile.TemporaryDirectory(dir=directory, prefix=".saving-") as staging:
        staging = Path(staging)
        for name, shard in zip(names, shards):
            save_file(shard, staging / name, metadata={"format": "pt"})
        if len(shards) > 1:
            index = {
                "metadata": {"total_size": sum(t.numel() * t.element_size() for t in tensors.values())},
                "weight_map": {key: name for name, shard in zip(names, shards) for key in shard},
            }
            (staging / INDEX_FILE).write_text(json.dumps(index, indent=2))
        (staging / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True, default=str))
        for old in directory.iterdir():
            if old.is_file() and (old.name in (SINGLE_FILE, INDEX_FILE) or _SHARD_PATTERN.fullmatch(old.name)):
                old.unlink()
        for produced in staging.iterdir():
            os.replace(produced, directory / produced.name)


# ---------------------------------------------------------------------------------------- reading
def safetensors_files(directory: Path) -> list[Path]:
    """The safetensors files of a checkpoint folder (via the index when there is one)."""
    index = directory / INDEX_FILE
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        return [directory / name for name in sorted(set(weight_map.values()))]
    if (directory / SINGLE_FILE).exists():
        return [directory / SINGLE_FILE]
    files = sorted(directory.glob("*.safetensors"))
    if files:
        return files
    pickles = sorted(p.name for p in directory.glob("*.bin")) + sorted(p.name for p in directory.glob("*.pt"))
    hint = f" (found {', '.join(pickles)}: pickled weights are not read; convert them to safetensors)" if pickles else ""
    raise FileNotFoundError(f"no safetensors weights in {directory}{hint}")


def iter_safetensors(directory: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(key, tensor)`` one tensor at a time, so loading never holds two copies of a checkpoint."""
    for path in safetensors_files(directory):
        yield from iter_safetensors_file(path)


def read_config_dict(directory: Path) -> dict[str, Any]:
    path = directory / "config.json"
    if not path.exists():
        raise FileNotFoundError(f"{directory} has no config.json")
    return json.loads(path.read_text())


# ---------------------------------------------------------------------------------------- key layouts
def hcx_key_from_vision_v2(key: str) -> str:
    """Map either spelling of a HyperCLOVAXVisionV2 key onto the HCX layout."""
    for old, new in (("model.vision_projector.", "model.mm_projector."), ("model.projector.", "model.mm_projector.")):
        if key.startswith(old):
            return new + key[len(old):]
    if key.startswith("lm_head."):
        return "model.language_model." + key
    if key.startswith("model.language_model.") and not key.startswith(("model.language_model.model.", "model.language_model.lm_head.")):
        return "model.language_model.model." + key[len("model.language_model."):]
    return key


def hcx_key_from_causal_lm(key: str) -> str:
    """``model.layers.0...`` -> ``model.language_model.model.layers.0...``; ``lm_head.*`` likewise."""
    return "model.language_model." + key


# ---------------------------------------------------------------------------------------- loading
def _dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    try:
        return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}.get(dtype) or getattr(torch, dtype)
    except AttributeError:
        raise ValueError(f"unknown dtype {dtype!r}; use float32, bfloat16 or float16") from None


def build_model_from_tensors(
    config: OmniConfig,
    tensors: Iterable[tuple[str, torch.Tensor]],
    *,
    new_components: Iterable[str] = (),
    strict: bool = True,
    dtype: torch.dtype | str | None = None,
) -> tuple[OmniForCausalLM, LoadReport]:
    """Build an `OmniForCausalLM` for ``config`` whose weights come from ``tensors`` (HCX-layout keys).

    The model is built without allocating weights; each checkpoint tensor is then assigned in place.
    Components with no tensor at all, or listed in ``new_components``, are initialised fresh;
    ``strict`` rejects tensors inside built components that match no parameter, shape mismatches,
    and partly missing components. Other tensors are carried through unchanged.
    """
    with init_empty_weights(include_buffers=False):
        model = OmniForCausalLM(config)
    expected = {key: value for key, value in model.state_dict(keep_vars=True).items()}
    components = set(model.model.component_names())
    new_components = set(new_components)
    loaded: dict[str, torch.Tensor] = {}
    carried: dict[str, torch.Tensor] = {}
    unexpected: list[str] = []
    mismatched: list[str] = []
    for key, tensor in tensors:
        if key in expected:
            if tuple(expected[key].shape) != tuple(tensor.shape):
                mismatched.append(f"{key}: checkpoint {tuple(tensor.shape)}, model {tuple(expected[key].shape)}")
            elif component_of(key) not in new_components:
                loaded[key] = tensor
        elif component_of(key) in components:
            unexpected.append(key)
            carried[key] = tensor
        else:
            carried[key] = tensor
    if mismatched:
        raise ValueError("checkpoint shapes do not match the config:\n  " + "\n  ".join(mismatched[:20]))
    if strict and unexpected:
        groups = _group(unexpected)
        raise ValueError(
            "checkpoint tensors inside built components match no parameter: "
            + "; ".join(f"{c}: {', '.join(k[:3])}{' ...' if len(k) > 3 else ''}" for c, k in groups.items())
            + ". Check the config (layer counts, encoder types) or load with strict=False"
        )

    model.load_state_dict(loaded, strict=False, assign=True)
    model.tie_weights()
    report = LoadReport(loaded={c: len(k) for c, k in _group(loaded).items()}, carried=_group(carried), unexpected=_group(unexpected))
    still_empty = [key for key, value in model.state_dict(keep_vars=True).items() if value.device.type == "meta"]
    for component, keys in _group(still_empty).items():
        fresh_expected = component in new_components or component not in {component_of(k) for k in loaded}
        if not fresh_expected:
            if strict:
                raise ValueError(
                    f"{component}: {len(keys)} tensor(s) missing from the checkpoint, e.g. {', '.join(keys[:3])}; "
                    "load with strict=False to initialise them"
                )
            report.missing[component] = keys
        _materialise_component(model, component, loaded)
        report.initialised.append(component)
    model.carried_tensors = carried
    model.fresh_components = set(report.initialised)
    target = _dtype(dtype)
    if target is not None:
        model.to(target)
    model.tie_weights()
    model.eval()
    return model, report


def _materialise_component(model: OmniForCausalLM, component: str, loaded: dict[str, torch.Tensor]) -> None:
    """Replace ``model.<component>`` by a freshly initialised copy holding whatever was loaded for it."""
    if component == "language_model":
        from transformers import AutoModelForCausalLM

        fresh = AutoModelForCausalLM.from_config(model.config.text_config)
    else:
        fresh = _fresh_modality_module(model.config, component)
    prefix = f"model.{component}."
    own = {k[len(prefix):]: v for k, v in loaded.items() if k.startswith(prefix)}
    fresh.load_state_dict(own, strict=False, assign=True)
    if hasattr(fresh, "tie_weights"):
        fresh.tie_weights()
    setattr(model.model, component, fresh)


def _fresh_modality_module(config: OmniConfig, component: str) -> torch.nn.Module:
    from hcx_extend.compressors import build_compressor
    from hcx_extend.encoders import get_encoder
    from hcx_extend.model import compressor_module_name
    from hcx_extend.projectors import build_projector

    for modality in config.modalities.values():
        encoder = get_encoder(modality.encoder["model_type"])
        if component == modality.encoder_module:
            return encoder.build(modality.encoder)
        if component == modality.projector_module:
            return build_projector(modality.projector, encoder.output_size(modality.encoder), config.text_config.hidden_size)
        if component == compressor_module_name(modality):
            return build_compressor(modality.compressor, config.text_config.hidden_size)
    raise ValueError(f"no modality owns component {component!r}")


def load_checkpoint(
    path: str | os.PathLike, *, dtype: torch.dtype | str | None = None, strict: bool = True
) -> tuple[OmniForCausalLM, LoadReport]:
    """Load an HCX-layout omni checkpoint folder (ours or the Omni hub's)."""
    directory = Path(path)
    config = OmniConfig(**read_config_dict(directory))
    return build_model_from_tensors(config, iter_safetensors(directory), strict=strict, dtype=dtype)


# ---------------------------------------------------------------------------------------- sources
@dataclass
class Source:
    """A model read from disk, described in HCX terms: its config and a stream of HCX-layout tensors."""

    kind: str  # "omni", "vision_v2", "causal_lm", "gguf"
    config: OmniConfig
    tensors: Iterable[tuple[str, torch.Tensor]]
    tokenizer: Any = None


def _rename(tensors: Iterable[tuple[str, torch.Tensor]], rename) -> Iterator[tuple[str, torch.Tensor]]:
    for key, tensor in tensors:
        yield rename(key), tensor


def _load_tokenizer(directory: Path, **kwargs):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(directory), **kwargs)
    except (OSError, ValueError, TypeError):
        return None


def read_source(path: str | os.PathLike) -> Source:
    """Recognise what ``path`` holds and describe it as a `Source` (nothing is downloaded)."""
    path = Path(path)
    if path.is_file() and path.suffix == ".gguf":
        return _read_gguf(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path} is neither a checkpoint folder nor a .gguf file")
    raw = read_config_dict(path)
    model_type = raw.get("model_type")
    tokenizer = _load_tokenizer(path)
    if model_type in ("hcx_omni", "vlm", "hyperclovax_vision_v2"):
        keys = set()
        for file in safetensors_files(path):
            with safe_open(file, framework="pt") as reader:
                keys.update(reader.keys())
        vision_v2 = model_type == "hyperclovax_vision_v2" or any(
            k.startswith(("model.vision_projector.", "model.projector.")) for k in keys
        )
        if vision_v2:
            return Source("vision_v2", _config_from_vision_v2(raw), _rename(iter_safetensors(path), hcx_key_from_vision_v2), tokenizer)
        return Source("omni", OmniConfig(**raw), iter_safetensors(path), tokenizer)
    text_config = AutoConfig.from_pretrained(str(path))
    return Source("causal_lm", OmniConfig(text_config=text_config.to_dict(), modalities={}),
                  _rename(iter_safetensors(path), hcx_key_from_causal_lm), tokenizer)


def _config_from_vision_v2(raw: dict[str, Any]) -> OmniConfig:
    """HyperCLOVAXVisionV2: one vision tower shared by image and video, one Linear projector."""
    raw = dict(raw)
    vision = dict(raw["vision_config"])
    if vision.get("model_type") in ("qwen2_5_vl", "qwen2_5_vl_visual", None):
        vision["model_type"] = "qwen2_5_vl_vision"
    text = dict(raw["text_config"])
    text.setdefault("model_type", "hyperclovax")
    text["tie_word_embeddings"] = raw.get("tie_word_embeddings", True)
    image_id, video_id = raw.get("image_token_id", 128060), raw.get("video_token_id", 128061)
    return OmniConfig(
        text_config=text,
        modalities={
            "image": ModalityConfig("image", encoder=vision, projector={"type": "linear"}, token_id=image_id),
            "video": ModalityConfig("video", encoder=vision, projector={"type": "linear"}, token_id=video_id),
        },
    )


def _read_gguf(path: Path) -> Source:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # transformers dequantises GGUF weights to float32 while loading.
    llm = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name)
    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    state = llm.state_dict()
    if getattr(llm.config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)
    text_config = llm.config.to_dict()
    text_config.pop("quantization_config", None)  # the weights are dequantised now
    config = OmniConfig(text_config=text_config, modalities={})
    return Source("gguf", config, _rename(list(state.items()), hcx_key_from_causal_lm), tokenizer)


# ---------------------------------------------------------------------------------------- extend
@dataclass
class Extended:
    model: OmniForCausalLM
    tokenizer: Any
    report: LoadReport
    source_kind: str


def extend(
    source: str | os.PathLike | Source,
    modalities: Iterable[ModalityConfig | dict[str, Any]] | dict[str, dict[str, Any]],
    *,
    tokenizer: Any = None,
    output_dir: str | os.PathLike | None = None,
    dtype: torch.dtype | str | None = None,
    max_shard_size: int | str = "5GB",
) -> Extended:
    """Add modalities to an existing model; existing weights load unchanged, new modules start fresh.

    Args:
        source: a checkpoint folder, a ``.gguf`` file, or a `Source` from `read_source`.
        modalities: `ModalityConfig` objects or dicts (a dict of dicts is keyed by name).
        tokenizer: overrides the source's tokenizer. When a modality's placeholder token is missing
            from it, the token is added and the embeddings grow (existing rows stay bit-identical).
        output_dir: when given, the model (HCX layout) and tokenizer are saved there.

    Returns:
        `Extended` with the model, the tokenizer and the `LoadReport`.
    """
    from hcx_extend.model import compressor_module_name
    from hcx_extend.processor import align_tokens

    source = source if isinstance(source, Source) else read_source(source)
    config = source.config
    tokenizer = tokenizer if tokenizer is not None else source.tokenizer
    if isinstance(modalities, dict):
        modalities = [ModalityConfig.from_dict(name, spec) for name, spec in modalities.items()]
    existing_modules = {name for m in config.modalities.values() for name in (m.encoder_module, m.projector_module)}
    new_components: set[str] = set()
    added = []
    for modality in modalities:
        if isinstance(modality, dict):
            modality = ModalityConfig.from_dict(modality["name"], modality)
        if tokenizer is not None and (modality.token_id is None or modality.token_id >= config.text_config.vocab_size):
            # The tokenizer decides: align_tokens reuses the token's id or adds the token.
            modality.token_id = None
        added.append(config.add_modality(modality))
        new_components |= {modality.encoder_module, modality.projector_module} - existing_modules
        if (compressor := compressor_module_name(modality)) is not None:
            new_components.add(compressor)
    model, report = build_model_from_tensors(config, source.tensors, new_components=new_components, dtype=dtype)
    _load_pretrained_encoders(model, added)
    if tokenizer is not None:
        align_tokens(model, tokenizer)
    if output_dir is not None:
        model.save_pretrained(output_dir, max_shard_size=max_shard_size)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(output_dir))
    return Extended(model=model, tokenizer=tokenizer, report=report, source_kind=source.kind)


def _load_pretrained_encoders(model: OmniForCausalLM, modalities: list[ModalityConfig]) -> None:
    """Initialise new encoders from ``modality.pretrained`` (a local safetensors folder) when set."""
    for modality in modalities:
        if not modality.pretrained:
            continue
        directory = Path(modality.pretrained)
        state = dict(iter_safetensors(directory))
        encoder = getattr(model.model, modality.encoder_module)
        result = encoder.load_state_dict(state, strict=False)
        if result.missing_keys or result.unexpected_keys:
            raise ValueError(
                f"{modality.name}: weights in {directory} do not fit the encoder: missing {result.missing_keys[:5]}, "
                f"unexpected {result.unexpected_keys[:5]}"
            )


# ---------------------------------------------------------------------------------------- trained parts
TRAINED_FILE = "trainable.safetensors"
RUN_FILE = "run.json"


def save_trained(
    model: OmniForCausalLM,
    directory: str | os.PathLike,
    *,
    base: str | os.PathLike,
    components: Iterable[str],
    tokenizer: Any = None,
    strategy: str | None = None,
) -> None:
    """Save only the components trained in full plus the full config; ``base`` is the model they extend.

    A few MB instead of the whole LLM: `load_trained` rebuilds the model from ``base`` (any source
    `read_source` reads) and puts the trained components back. LoRA adapters are saved next to them
    by `hcx_extend.training.adapters.save_adapters`; ``strategy`` tells `load_trained` whether the
    LLM must be quantised first (qlora).
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    components = list(components)
    prefixes = tuple(f"model.{c}." for c in components)
    # Tied duplicates (an LLM's lm_head sharing embed_tokens, trained under `full`) are dropped as in
    # `save_checkpoint`; loading the kept tensor restores both.
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors_to_save(model).items() if k.startswith(prefixes)}
    save_file(tensors, directory / TRAINED_FILE, metadata={"format": "pt"})
    (directory / "config.json").write_text(json.dumps(model.config.to_dict(), indent=2, sort_keys=True, default=str))
    run = {"base": str(Path(base).resolve()), "components": components, "strategy": strategy}
    (directory / RUN_FILE).write_text(json.dumps(run, indent=2))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(directory))


def load_trained(directory: str | os.PathLike, *, dtype: torch.dtype | str | None = None):
    """Load what `save_trained` wrote, or a full checkpoint folder: ``(model, tokenizer)``."""
    directory = Path(directory)
    if not (directory / RUN_FILE).exists():
        model, _ = load_checkpoint(directory, dtype=dtype)
        return model, _load_tokenizer(directory)
    run = json.loads((directory / RUN_FILE).read_text())
    config = OmniConfig(**read_config_dict(directory))
    source = read_source(run["base"])
    tokenizer = _load_tokenizer(directory) or source.tokenizer
    new = [m for name, m in config.modalities.items() if name not in source.config.modalities]
    model = extend(source, new, tokenizer=tokenizer, dtype=dtype).model
    trained = dict(iter_safetensors_file(directory / TRAINED_FILE))
    expected = {k for k in tensors_to_save(model) if k.startswith(tuple(f"model.{c}." for c in run["components"]))}
    if set(trained) != expected:
        raise ValueError(
            f"{directory}: trained tensors do not match the rebuilt model (missing {sorted(expected - set(trained))[:3]}, "
            f"unexpected {sorted(set(trained) - expected)[:3]})"
        )
    model.load_state_dict(trained, strict=False)
    for name, modality in config.modalities.items():
        model.config.modality(name).normalization = modality.normalization
    if (directory / "adapters").is_dir():
        from hcx_extend.training.adapters import load_adapters
        from hcx_extend.training.strategies import STRATEGIES

        strategy = STRATEGIES.get(run.get("strategy") or "")
        if strategy is not None and strategy.quantize_llm:
            from hcx_extend.memory.quantize import quantize_language_model

            quantize_language_model(model, method=strategy.quantize_llm)
        load_adapters(model, directory)
    model.eval()
    return model, tokenizer


def iter_safetensors_file(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    with safe_open(path, framework="pt", device="cpu") as reader:
        for key in reader.keys():
            yield key, reader.get_tensor(key)
