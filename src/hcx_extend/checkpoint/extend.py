"""`extend`: add modalities to an existing model; existing weights load unchanged, new modules start fresh.

Any `Source` works (an HCX omni checkpoint, a HyperCLOVAXVisionV2 checkpoint, a plain causal LM
folder, a ``.gguf`` file). The new modality's placeholder token is added to the tokenizer when it
is missing (`hcx_extend.processor.align_tokens`), growing the embeddings if needed; existing rows
stay bit-identical. Adding a modality needs the LLM's tokenizer (the source's, or one passed in), and
no placeholder may take an id the tokenizer or the source's configs declare as BOS/EOS/PAD/UNK.
Tensors the model does not build (the Omni checkpoint's ``model.discrete_*``) are carried through to
the saved checkpoint unchanged.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import torch
from accelerate import init_empty_weights

from hcx_extend.checkpoint.sources import Source, load_tokenizer, read_source
from hcx_extend.config import ModalityConfig
from hcx_extend.layout import iter_safetensors, iter_safetensors_file, replace_folder
from hcx_extend.model import OmniForCausalLM
from hcx_extend.processor import align_tokens
from hcx_extend.weights import LoadReport, load_tensors


@dataclass
class Extended:
    """What `extend` made: the model, its tokenizer, the `LoadReport`, and what the source was."""

    model: OmniForCausalLM
    tokenizer: Any
    report: LoadReport
    source_kind: str
    source_path: Path | None = None


def extend(
    source: str | os.PathLike | Source,
    modalities: Iterable[ModalityConfig | dict[str, Any]] | dict[str, dict[str, Any]],
    *,
    tokenizer: Any = None,
    output_dir: str | os.PathLike | None = None,
    dtype: torch.dtype | str | None = None,
    max_shard_size: int | str = "5GB",
) -> Extended:
    """Add modalities to an existing model.

    Args:
        source: a checkpoint folder, a ``.gguf`` file, or a `Source` from `read_source`.
        modalities: `ModalityConfig` objects or dicts (a dict of dicts is keyed by name); may be empty.
        tokenizer: overrides the source's tokenizer: a tokenizer object or a folder holding one (the CLI's
            ``--tokenizer DIR``). Needed when the source has none and a modality is added. When a
            modality's placeholder token is missing from it, the token is added and the embeddings grow
            (existing rows stay bit-identical).
        output_dir: when given, the model (HCX layout) and tokenizer are saved there, all at once.
        dtype: cast the weights ("bf16", "fp32", ...); None keeps the source's.

    Returns:
        `Extended` with the model (eval mode), the tokenizer and the `LoadReport`.

    Raises:
        FileNotFoundError: ``tokenizer`` names a folder that does not exist.
        ValueError: a modality to add but no usable tokenizer (neither the source's nor ``tokenizer``);
            a placeholder on a special token's id (`hcx_extend.processor.align_tokens`); a modality that
            already exists; a bad modality config (named in the message).
    """
    source = source if isinstance(source, Source) else read_source(source)
    config = source.config
    if isinstance(tokenizer, (str, os.PathLike)):
        tokenizer = _read_tokenizer_folder(Path(tokenizer))
    tokenizer = tokenizer if tokenizer is not None else source.tokenizer
    if isinstance(modalities, dict):
        modalities = [ModalityConfig.from_dict(name, spec) for name, spec in modalities.items()]
    existing = set()
    for modality in config.modalities.values():
        existing |= {modality.encoder_module, modality.projector_module, modality.compressor_module}
    new_components: set[str] = set()
    added: list[ModalityConfig] = []
    for modality in modalities:
        if isinstance(modality, dict):
            if "name" not in modality:
                raise ValueError(f"a modality dict needs a 'name'; got keys {sorted(modality)}")
            modality = ModalityConfig.from_dict(modality["name"], modality)
        if tokenizer is None:
            # Without the LLM's tokenizer no placeholder id can be checked against its tokens, and a
            # checkpoint saved without one could not encode a prompt anyway.
            raise ValueError(
                f"{modality.name}: {source.path or 'the source'} has no usable tokenizer (no tokenizer files beside "
                "the weights), so a placeholder token cannot be added; pass the LLM's tokenizer: "
                "`hcx-extend extend SOURCE --tokenizer DIR` (a folder with tokenizer.json), or tokenizer=DIR (or a "
                "tokenizer object) in Python"
            )
        if modality.token_id is None or modality.token_id >= config.text_config.vocab_size:
            # The tokenizer decides: align_tokens reuses the token's id or adds the token.
            modality.token_id = None
        added.append(config.add_modality(modality))
        new_components |= {modality.encoder_module, modality.projector_module, modality.compressor_module} - existing
    new_components.discard(None)
    with init_empty_weights(include_buffers=False):
        model = OmniForCausalLM(config)
    report = load_tensors(model, source.tensors, new_components=new_components,
                          source=str(source.path or source.kind))
    if dtype is not None:
        model.cast_weights(dtype)
    model.tie_weights()
    model.eval()
    _load_pretrained_encoders(model, added)
    if tokenizer is not None:
        align_tokens(model, tokenizer, declared=source.special_ids)
    if output_dir is not None:
        with replace_folder(output_dir) as staging:
            model.save_pretrained(staging, max_shard_size=max_shard_size)
            if tokenizer is not None:
                tokenizer.save_pretrained(str(staging))
    return Extended(model=model, tokenizer=tokenizer, report=report, source_kind=source.kind,
                    source_path=source.path)


def _read_tokenizer_folder(folder: Path) -> Any:
    if not folder.is_dir():
        raise FileNotFoundError(f"tokenizer folder {folder} does not exist (expected a folder with tokenizer.json)")
    tokenizer = load_tokenizer(folder)
    if tokenizer is None:
        raise ValueError(f"{folder} holds no usable tokenizer (expected tokenizer.json or tokenizer_config.json with "
                         "its vocabulary); pass the folder the LLM's tokenizer was saved in")
    return tokenizer


def _load_pretrained_encoders(model: OmniForCausalLM, modalities: list[ModalityConfig]) -> None:
    """Initialise new encoders from ``modality.pretrained`` (a safetensors file or checkpoint folder)."""
    for modality in modalities:
        if not modality.pretrained:
            continue
        path = Path(modality.pretrained)
        state = dict(iter_safetensors_file(path) if path.is_file() else iter_safetensors(path))
        encoder = getattr(model.model, modality.encoder_module)
        try:
            result = encoder.load_state_dict(state, strict=False)
        except RuntimeError as error:
            raise ValueError(f"{modality.name}: weights in {path} do not fit the encoder ({error})") from None
        if result.missing_keys or result.unexpected_keys:
            raise ValueError(
                f"{modality.name}: weights in {path} do not fit the encoder: missing {result.missing_keys[:5]}, "
                f"unexpected {result.unexpected_keys[:5]}"
            )
