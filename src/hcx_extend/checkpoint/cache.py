"""A converted copy of a ``.gguf`` base model, so it is read in a second instead of dequantised each time.

transformers reads a GGUF file by dequantising every tensor to float32 (about 10 s for the embedded
SmolLM2-135M on 2 CPU cores). The first `cached_source` of a GGUF file writes what that produced (a
transformers folder: ``config.json``, ``model.safetensors``, the tokenizer) under the cache folder;
later calls read that folder, memory-mapped. The copy is keyed by the file's name, size and a hash of
its first MiB, so a different file never hits a stale copy. Weights are bit-identical to a fresh
read: they are the same float32 tensors, written once.

The cache folder is ``$HCX_EXTEND_CACHE`` or ``~/.cache/hcx-extend``; delete it at any time. When it
cannot be written, the GGUF file is read directly (nothing fails).
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from pathlib import Path

from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from hcx_extend.checkpoint.sources import Source, read_source
from hcx_extend.layout import replace_folder

CACHE_ENV = "HCX_EXTEND_CACHE"
_FINGERPRINT_BYTES = 1 << 20


def cache_root() -> Path:
    """Where converted copies live: ``$HCX_EXTEND_CACHE`` or ``~/.cache/hcx-extend``."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "hcx-extend")


def gguf_cache_folder(path: str | os.PathLike) -> Path:
    """The folder a GGUF file's converted copy goes to (whether or not it exists yet)."""
    path = Path(path).resolve()
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        digest.update(handle.read(_FINGERPRINT_BYTES))
    key = f"{path.stem}-{path.stat().st_size}-{digest.hexdigest()[:16]}"
    return cache_root() / "gguf" / key


def cached_source(path: str | os.PathLike) -> Source:
    """`read_source` of ``path``, reading a ``.gguf`` file through its converted copy (made on first use)."""
    path = Path(path)
    if not (path.is_file() and path.suffix == ".gguf"):
        return read_source(path)
    folder = gguf_cache_folder(path)
    if not ((folder / "config.json").exists() and (folder / "model.safetensors").exists()):
        try:
            convert_gguf(path, folder)
        except OSError as error:
            warnings.warn(f"could not cache a converted copy of {path} in {folder} ({error}); reading the GGUF file")
            return read_source(path)
    source = read_source(folder)
    source.path = path
    source.kind = "gguf"
    return source


def convert_gguf(path: Path, folder: Path) -> Path:
    """Dequantise ``path`` once and write it, with its tokenizer, to ``folder`` (atomically)."""
    llm = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name)
    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    state = llm.state_dict()
    if getattr(llm.config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)
    config = llm.config.to_dict()
    config.pop("quantization_config", None)  # the weights are dequantised now
    with replace_folder(folder) as staging:
        save_file({k: v.contiguous() for k, v in state.items()}, staging / "model.safetensors", metadata={"format": "pt"})
        (staging / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True, default=str))
        tokenizer.save_pretrained(str(staging))
    return folder
