"""Checkpoints in, checkpoints out: recognise what a path holds and add modalities to it.

* `read_source` (sources.py): an HCX omni / HyperCLOVAXVisionV2 / causal-LM folder or a ``.gguf``
  file, described as an `OmniConfig` plus a stream of HCX-layout tensors.
* `extend` (extend.py): add modalities to a source; existing weights unchanged, new modules fresh.
* `load_checkpoint`: a complete HCX-layout omni folder and its `LoadReport`.
* `cached_source` (cache.py): `read_source` through a converted copy of a ``.gguf`` file (read once).

The file format itself (key layout, shards, atomic writes) is `hcx_extend.layout`; filling a model
from tensors is `hcx_extend.weights`.
"""

from __future__ import annotations

import os

import torch

from hcx_extend.checkpoint.cache import cached_source
from hcx_extend.checkpoint.extend import Extended, extend
from hcx_extend.checkpoint.sources import Source, load_tokenizer, read_omni_config, read_source
from hcx_extend.model import OmniForCausalLM
from hcx_extend.weights import LoadReport


def load_checkpoint(path: str | os.PathLike, *, dtype: torch.dtype | str | None = None,
                    strict: bool = True) -> tuple[OmniForCausalLM, LoadReport]:
    """A complete HCX-layout omni checkpoint folder (ours, a merged run, or the Omni hub's) and its report."""
    return OmniForCausalLM.from_folder(path, dtype=dtype, strict=strict)


__all__ = ["Extended", "LoadReport", "Source", "cached_source", "extend", "load_checkpoint", "load_tokenizer",
           "read_omni_config", "read_source"]
