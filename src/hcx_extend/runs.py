"""A training run's folder, and `load_model`: the one loader for every kind of checkpoint.

A run checkpoint holds what training changed, not the whole model (a few MB instead of the LLM)::

    checkpoint/
      config.json                the model's full OmniConfig (new modalities, normalisation statistics)
      trainable.safetensors      the components trained in full and those initialised for the run, under their HCX names
      adapters/<component>/      each LoRA adapter in peft's format
      run.json                   the strategy, the components, and the base model's identity
      tokenizer files            the tokenizer with the placeholder tokens added

``run.json`` names its base model three ways: a path relative to the checkpoint (it survives moving
the run and its base together), the absolute path (it survives moving the run alone), and an
identity (file or folder name, size, a fingerprint of its first bytes). The embedded SmolLM2 is
also recorded as ``embedded``, so a run made from it loads on any machine where the package is
installed. When none of these finds the base, the error says what is missing and how to point to it
(``load_model(path, base=...)``, ``--base``).

`load_model` reads every kind: a run checkpoint (rebuilt from its base), a complete HCX-layout omni
folder (ours, merged, or the Omni hub's), a HyperCLOVAXVisionV2 folder, a plain causal LM folder or
a ``.gguf`` file (both as an omni model without modalities). It loads correctly or raises.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any, Iterable

import torch
from safetensors.torch import save_file

from hcx_extend.checkpoint import cached_source, extend, load_tokenizer, read_omni_config
from hcx_extend.devices import resolve_device
from hcx_extend.ladder import get_strategy
from hcx_extend.layout import (
    atomic_write_text,
    iter_safetensors_file,
    read_json,
    replace_folder,
)
from hcx_extend.memory.quantize import quantize_language_model
from hcx_extend.model import RUN_FILE, OmniForCausalLM
from hcx_extend.presets import SMOLLM2_FILE, smollm2_gguf_path
from hcx_extend.training.adapters import load_adapters, merge_adapters, save_adapters
from hcx_extend.weights import tensors_to_save

TRAINED_FILE = "trainable.safetensors"
_FINGERPRINT_BYTES = 1 << 20


# ---------------------------------------------------------------------------------------- the run folder
def prepare_run_folder(path: str | os.PathLike, *, resume: bool = False) -> Path:
    """Create the run folder; without ``resume``, drop an earlier run's training state there first."""
    run = Path(path)
    if run.exists() and not run.is_dir():
        raise ValueError(f"{run} exists and is not a folder; choose another --output")
    if not resume and (run / "training").exists():
        shutil.rmtree(run / "training")
    run.mkdir(parents=True, exist_ok=True)
    return run


def base_identity(path: str | os.PathLike) -> dict[str, Any]:
    """How a run recognises its base model again: name, size and a fingerprint of its first bytes."""
    path = Path(path).resolve()
    digest = hashlib.sha256()
    if path.is_file():
        size = path.stat().st_size
        with path.open("rb") as handle:
            digest.update(handle.read(_FINGERPRINT_BYTES))
    else:
        files = sorted(p for p in path.iterdir() if p.is_file())
        size = sum(p.stat().st_size for p in files)
        for file in files:
            digest.update(file.name.encode())
            digest.update(str(file.stat().st_size).encode())
        if (path / "config.json").exists():
            digest.update((path / "config.json").read_bytes())
    identity = {"name": path.name, "size": size, "fingerprint": digest.hexdigest()[:16]}
    if path.name == SMOLLM2_FILE:
        identity["embedded"] = "smollm2"
    return identity


def save_run(
    model: OmniForCausalLM,
    directory: str | os.PathLike,
    *,
    base: str | os.PathLike,
    components: Iterable[str],
    tokenizer: Any = None,
    strategy: str | None = None,
) -> Path:
    """Write a run checkpoint (layout in the module docstring) to ``directory``, all at once.

    Args:
        model: the trained model.
        directory: the checkpoint folder; replaced atomically (a reader never sees half of it).
        base: the model the run started from (any path `read_source` reads).
        components: the components trained in full (LoRA adapters are found on the model). Components
            initialised for this run (``model.fresh_components``) are saved too, trained or not: the base
            does not have them, and a frozen random encoder (the ``projector`` rung) is part of the model.
        strategy: the strategy's name (tells `load_model` whether the LLM must be quantised first).
    """
    directory = Path(directory)
    base = Path(base).resolve()
    adapted = set(getattr(model, "lora_configs", {}))
    components = [c for c in components if c not in adapted]
    components += [c for c in sorted(getattr(model, "fresh_components", ())) if c not in adapted and c not in components]
    prefixes = tuple(f"model.{c}." for c in components)
    # Tied duplicates (an LLM's lm_head sharing embed_tokens, trained under `full`) are dropped as in
    # `save_pretrained`; loading the kept tensor restores both.
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors_to_save(model).items() if k.startswith(prefixes)}
    run = {
        "base": {"relative": os.path.relpath(base, directory.resolve()), "absolute": str(base),
                 **base_identity(base)},
        "components": components,
        "adapters": sorted(adapted),
        "strategy": strategy,
    }
    with replace_folder(directory) as staging:
        save_file(tensors, staging / TRAINED_FILE, metadata={"format": "pt"})
        save_adapters(model, staging)
        (staging / "config.json").write_text(json.dumps(model.config.to_dict(), indent=2, sort_keys=True, default=str))
        (staging / RUN_FILE).write_text(json.dumps(run, indent=2))
        if tokenizer is not None:
            tokenizer.save_pretrained(str(staging))
    return directory


def find_base(directory: Path, run: dict[str, Any], base: str | os.PathLike | None = None) -> Path:
    """The base model of the run in ``directory``: ``base`` if given, else what ``run.json`` records.

    Raises:
        FileNotFoundError: naming every place looked at, the base's identity and how to point to it.
    """
    if base is not None:
        path = Path(base)
        if not path.exists():
            raise FileNotFoundError(f"base model {path} does not exist")
        return path
    record = run.get("base")
    if isinstance(record, str):  # runs written before run.json recorded an identity
        record = {"absolute": record, "name": Path(record).name}
    if not isinstance(record, dict) or any(
            not isinstance(record.get(key), (str, type(None))) for key in ("relative", "absolute", "name", "embedded")):
        raise ValueError(f"{directory / RUN_FILE}: 'base' must describe the base model with string paths "
                         f"(relative, absolute, name), got {record!r}")
    candidates = []
    if record.get("relative"):
        candidates.append((directory / record["relative"]).resolve())
    if record.get("absolute"):
        candidates.append(Path(record["absolute"]))
    if record.get("embedded") == "smollm2":
        try:
            candidates.append(smollm2_gguf_path())
        except FileNotFoundError:
            pass
    for candidate in candidates:
        if candidate.exists():
            return candidate
    looked = ", ".join(str(c) for c in candidates) or "nowhere (run.json records no path)"
    identity = f"{record.get('name')!r}" + (f", {record['size']:,} bytes" if "size" in record else "")
    raise FileNotFoundError(
        f"{directory} was trained from base model {identity}, which is not at {looked}; pass its location: "
        "load_model(path, base=...) or --base PATH"
    )


# ---------------------------------------------------------------------------------------- loading
def load_model(path: str | os.PathLike, *, base: str | os.PathLike | None = None,
               dtype: torch.dtype | str | None = None,
               device: torch.device | str | None = None) -> tuple[OmniForCausalLM, Any]:
    """Load any checkpoint kind (see the module docstring) as ``(model, tokenizer)`` in eval mode.

    Args:
        path: a run checkpoint, an omni / VisionV2 / causal-LM folder, or a ``.gguf`` file.
        base: for a run checkpoint, where its base model is (default: what ``run.json`` records).
        dtype: cast the weights ("bf16", "fp32", ...); None keeps them as stored.
        device: where the model runs ("cpu", "cuda", "cuda:1", or "auto" = the first GPU if there is one);
            None leaves it on the CPU. Batches follow the model (`OmniForCausalLM.input_device`).

    Raises:
        FileNotFoundError: ``path`` (or a run's base) does not exist.
        ValueError: the folder is incomplete or inconsistent (the message names the file); an unknown device.
    """
    path = Path(path)
    if path.is_dir() and (path / RUN_FILE).exists():
        model, tokenizer = _load_run(path, base, dtype)
    else:
        source = cached_source(path)
        if source.kind == "omni":
            model, _ = OmniForCausalLM.from_folder(path, dtype=dtype)
        else:
            model = extend(source, [], dtype=dtype).model
        tokenizer = source.tokenizer
    if device is not None:
        model.to(resolve_device(device))
    return model, tokenizer


def _load_run(directory: Path, base: str | os.PathLike | None, dtype) -> tuple[OmniForCausalLM, Any]:
    run = read_json(directory / RUN_FILE)
    if not isinstance(run, dict) or not isinstance(run.get("components"), list):
        raise ValueError(f"{directory / RUN_FILE}: expected an object with 'base' and 'components'")
    config = read_omni_config(directory)
    if not (directory / TRAINED_FILE).exists():
        raise ValueError(f"{directory} lacks {TRAINED_FILE}; the run checkpoint is incomplete")
    source = cached_source(find_base(directory, run, base))
    tokenizer = load_tokenizer(directory) or source.tokenizer
    new = [m for name, m in config.modalities.items() if name not in source.config.modalities]
    model = extend(source, new, tokenizer=tokenizer, dtype=dtype).model
    trained = dict(iter_safetensors_file(directory / TRAINED_FILE))
    expected = {k for k in tensors_to_save(model) if k.startswith(tuple(f"model.{c}." for c in run["components"]))}
    if set(trained) != expected:
        raise ValueError(
            f"{directory / TRAINED_FILE}: trained tensors do not match the rebuilt model (missing "
            f"{sorted(expected - set(trained))[:3]}, unexpected {sorted(set(trained) - expected)[:3]}); was the base "
            "model changed?"
        )
    try:
        model.load_state_dict(trained, strict=False)
    except RuntimeError as error:
        raise ValueError(f"{directory / TRAINED_FILE}: {error}") from None
    model.fresh_components -= set(run["components"])
    for name, modality in config.modalities.items():
        model.config.modality(name).normalization = modality.normalization
    if (directory / "adapters").is_dir():
        strategy = run.get("strategy")
        if strategy and get_strategy(strategy).quantize_llm:
            quantize_language_model(model, method=get_strategy(strategy).quantize_llm)
        load_adapters(model, directory)
    model.eval()
    return model, tokenizer


def merge_run(path: str | os.PathLike, output: str | os.PathLike, *,
              base: str | os.PathLike | None = None) -> tuple[int, list[str]]:
    """Fold a run's LoRA adapters into its base and write a complete HCX checkpoint (with tokenizer) to ``output``.

    Returns the number of LoRA layers merged and the components they were on. The output loads
    without peft or bitsandbytes (`OmniForCausalLM.from_pretrained`).
    """
    model, tokenizer = load_model(path, base=base)
    components = sorted(getattr(model, "lora_configs", {}))
    merged = merge_adapters(model)
    with replace_folder(output) as staging:
        model.save_pretrained(staging)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(staging))
    return merged, components


def write_run_notes(path: str | os.PathLike, notes: dict[str, Any]) -> None:
    """A run folder's JSON record (metrics, summary), written atomically."""
    atomic_write_text(path, json.dumps(notes, indent=2))
