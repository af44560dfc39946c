"""Checkpoint files on disk: the HCX key layout, safetensors shards and ``config.json``.

Format: ``config.json`` plus safetensors weights, one ``model.safetensors`` or
``model-0000i-of-0000n.safetensors`` shards with ``model.safetensors.index.json``. Keys follow the
HyperCLOVA X layout (``model.language_model.model.layers.N.*``, ``model.vision_model.*``, ...).
Only safetensors are read: no pickles.

Other spellings of the same weights are mapped onto the HCX layout here (`hcx_key_from_vision_v2`,
`hcx_key_from_causal_lm`). Nothing in this module knows the model classes: it moves named tensors
and dicts between memory and files, and every error names the file it is about.
"""

from __future__ import annotations

import glob
import json
import os
import re
import secrets
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from hcx_extend.units import parse_size

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
CONFIG_FILE = "config.json"
SHARD_PATTERN = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")


# ---------------------------------------------------------------------------------------- key layouts
def hcx_key_from_vision_v2(key: str) -> str:
    """Map either spelling of a HyperCLOVAXVisionV2 key onto the HCX layout.

    The hub's (``model.vision_projector.*``, ``model.language_model.model.*``,
    ``model.language_model.lm_head.*``) and what transformers 5 saves (``model.projector.*``,
    ``model.language_model.layers.N.*``, ``lm_head.*``).
    """
    for old, new in (("model.vision_projector.", "model.mm_projector."), ("model.projector.", "model.mm_projector.")):
        if key.startswith(old):
            return new + key[len(old):]
    if key.startswith("lm_head."):
        return "model.language_model." + key
    if key.startswith("model.language_model.") and not key.startswith(("model.language_model.model.",
                                                                       "model.language_model.lm_head.")):
        return "model.language_model.model." + key[len("model.language_model."):]
    return key


def hcx_key_from_causal_lm(key: str) -> str:
    """``model.layers.0...`` -> ``model.language_model.model.layers.0...``; ``lm_head.*`` likewise."""
    return "model.language_model." + key


def component_of(key: str) -> str:
    """``model.vision_model.blocks.0.attn.qkv.weight`` -> ``vision_model``; other keys -> their first part."""
    parts = key.split(".")
    return parts[1] if parts[0] == "model" and len(parts) > 1 else parts[0]


# ---------------------------------------------------------------------------------------- reading
def read_json(path: Path) -> Any:
    """A JSON file's content.

    Raises:
        FileNotFoundError: ``"<path> does not exist"``.
        ValueError: naming the file: not UTF-8, not JSON (truncated, corrupt), a folder, not readable.
    """
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} does not exist") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{path}: not valid JSON ({error}); the file may be truncated or corrupt") from None
    except IsADirectoryError:
        raise ValueError(f"{path} is a folder, not a JSON file") from None
    except OSError as error:  # permissions, I/O errors
        raise ValueError(f"{path}: cannot be read ({error.strerror or error})") from None
    except RecursionError:
        raise ValueError(f"{path}: JSON nested too deeply to read") from None


def read_config_dict(directory: Path) -> dict[str, Any]:
    """``directory/config.json`` as a dict.

    Raises:
        FileNotFoundError: no such folder, or no config.json in it.
        ValueError: config.json is not a JSON object (see `read_json`).
    """
    path = Path(directory) / CONFIG_FILE
    if not Path(directory).exists():
        raise FileNotFoundError(f"{directory} does not exist")
    if not Path(directory).is_dir():
        raise ValueError(f"{directory} is a file, not a checkpoint folder")
    if not path.exists():
        raise FileNotFoundError(f"{directory} has no {CONFIG_FILE}")
    config = read_json(path)
    if not isinstance(config, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(config).__name__}")
    return config


def safetensors_files(directory: Path) -> list[Path]:
    """The weight files of a checkpoint folder: the index's shards, or ``model.safetensors``.

    Other ``*.safetensors`` files (a run's ``trainable.safetensors``, peft's ``adapter_model.safetensors``)
    are not model weights and are never picked up.
    """
    directory = Path(directory)
    index = directory / INDEX_FILE
    if index.exists():
        content = read_json(index)
        weight_map = content.get("weight_map") if isinstance(content, dict) else None
        if not isinstance(weight_map, dict) or not weight_map:
            raise ValueError(f"{index}: has no 'weight_map'; the index is corrupt")
        names = set(weight_map.values())
        if not all(isinstance(name, str) and SHARD_PATTERN.fullmatch(name) for name in names):
            odd = sorted(repr(name) for name in names if not isinstance(name, str) or not SHARD_PATTERN.fullmatch(name))
            raise ValueError(f"{index}: the weight_map names files that are not shards of this folder: {odd[:3]}")
        files = [directory / name for name in sorted(names)]
        missing = [f.name for f in files if not f.exists()]
        if missing:
            raise FileNotFoundError(f"{index} lists shards that are missing: {missing[:3]}")
        return files
    if (directory / SINGLE_FILE).exists():
        return [directory / SINGLE_FILE]
    others = sorted(p.name for p in directory.glob("*.safetensors"))
    pickles = sorted(p.name for p in directory.glob("*.bin")) + sorted(p.name for p in directory.glob("*.pt"))
    hint = ""
    if others:
        hint = f" (found {', '.join(others)}, which are not a model's weights)"
    elif pickles:
        hint = f" (found {', '.join(pickles)}: pickled weights are not read; convert them to safetensors)"
    raise FileNotFoundError(f"no {SINGLE_FILE} or {INDEX_FILE} in {directory}{hint}")


def iter_safetensors_file(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """``(key, tensor)`` of one safetensors file, read one tensor at a time.

    Raises:
        FileNotFoundError: ``"<path> does not exist"``.
        ValueError: naming the file when it is not a complete safetensors file (truncated, corrupt, a folder).
    """
    if Path(path).is_dir():
        raise ValueError(f"{path} is a folder, not a safetensors file")
    try:
        with safe_open(path, framework="pt", device="cpu") as reader:
            for key in reader.keys():
                yield key, reader.get_tensor(key)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} does not exist") from None
    except (SafetensorError, OSError, RuntimeError) as error:
        raise ValueError(f"{path}: not a readable safetensors file ({error}); it may be truncated or corrupt") from None


def iter_safetensors(directory: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(key, tensor)`` over a checkpoint folder, so loading never holds two copies of it."""
    for path in safetensors_files(directory):
        yield from iter_safetensors_file(path)


def safetensors_keys(directory: Path) -> set[str]:
    """The tensor names of a checkpoint folder, without reading any tensor."""
    keys: set[str] = set()
    for path in safetensors_files(directory):
        if path.is_dir():
            raise ValueError(f"{path} is a folder, not a safetensors file")
        try:
            with safe_open(path, framework="pt") as reader:
                keys.update(reader.keys())
        except (SafetensorError, OSError, RuntimeError) as error:
            raise ValueError(f"{path}: not a readable safetensors file ({error}); it may be truncated or "
                             "corrupt") from None
    return keys


# ---------------------------------------------------------------------------------------- writing
def write_checkpoint(tensors: dict[str, torch.Tensor], config: dict[str, Any], directory: str | os.PathLike,
                     max_shard_size: int | str = "5GB") -> None:
    """Write ``config.json`` and safetensors shards of ``tensors`` to ``directory``, all or nothing.

    Everything is written to a sibling folder first, which then replaces ``directory`` by renames: a
    reader sees the old checkpoint or the new one, never a mix, and an interrupted save leaves the old
    one intact. Other files already in ``directory`` (a tokenizer, a run's notes) are kept.
    """
    directory = Path(directory)
    limit = parse_size(max_shard_size, "max_shard_size")
    shards: list[dict[str, torch.Tensor]] = [{}]
    shard_bytes = 0
    for key, tensor in tensors.items():
        size = tensor.numel() * tensor.element_size()
        if shards[-1] and shard_bytes + size > limit:
            shards.append({})
            shard_bytes = 0
        shards[-1][key] = tensor.detach().to("cpu").contiguous()
        shard_bytes += size
    names = ([SINGLE_FILE] if len(shards) == 1 else
             [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    with replace_folder(directory, keep=lambda p: not is_weights_file(p.name) and p.name != CONFIG_FILE) as staging:
        for name, shard in zip(names, shards):
            save_file(shard, staging / name, metadata={"format": "pt"})
        if len(shards) > 1:
            index = {
                "metadata": {"total_size": sum(t.numel() * t.element_size() for t in tensors.values())},
                "weight_map": {key: name for name, shard in zip(names, shards) for key in shard},
            }
            (staging / INDEX_FILE).write_text(json.dumps(index, indent=2))
        (staging / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True, default=str))


def is_weights_file(name: str) -> bool:
    return name in (SINGLE_FILE, INDEX_FILE) or bool(SHARD_PATTERN.fullmatch(name))


@contextmanager
def replace_folder(target: str | os.PathLike, keep: Callable[[Path], bool] = lambda path: False) -> Iterator[Path]:
    """``with replace_folder(target) as staging:`` write into ``staging``; on success it becomes ``target``.

    The staging folder is a sibling of ``target`` (same file system, so renames are atomic). Files of
    an existing ``target`` for which ``keep(path)`` is true are carried over first (hard links where
    possible, else copies). On success the old folder is renamed aside, the staging folder renamed to
    ``target``, and the old one removed; on an exception the staging folder is dropped and ``target``
    is untouched. A kill at any moment leaves ``target`` as it was before, as it is after, or (between
    the two renames) missing with ``.<name>.old-*/folder`` beside it holding the complete old folder:
    `recover_folder`, which every `replace_folder` runs first, moves that back and drops the leftovers
    of killed writes. One writer per folder at a time.

    Raises:
        ValueError: ``target`` (or a folder above it) exists and is not a folder.
    """
    target = Path(target)
    if target.exists() and not target.is_dir():
        raise ValueError(f"{target} exists and is not a folder; choose another path")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise ValueError(f"{target}: cannot create it, a file stands where a folder above it must be") from None
    recover_folder(target)
    staging = _new_folder(target.parent, f".{target.name}.staging-")
    try:
        if target.is_dir():
            for path in target.iterdir():
                if keep(path):
                    _carry(path, staging / path.name)
        yield staging
        _fsync_tree(staging)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if target.exists():
        old = _new_folder(target.parent, f".{target.name}.old-")
        os.replace(target, old / "folder")
        os.replace(staging, target)
        _fsync_dir(target.parent)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(staging, target)
    _fsync_dir(target.parent)


def interrupted_save_hint(target: str | os.PathLike) -> str:
    """For a missing ``target``: where a save killed between its renames left the previous version, or ""."""
    target = Path(target)
    if not target.parent.is_dir():
        return ""
    aside = sorted(target.parent.glob(f".{glob.escape(target.name)}.old-*/folder"))
    if not aside:
        return ""
    return (f"; a save of it was interrupted and left the previous version in {aside[-1]}: the next save to "
            f"{target} puts it back (hcx_extend.layout.recover_folder), or move it back yourself")


def _new_folder(parent: Path, prefix: str) -> Path:
    """A new empty folder ``parent/prefix<random>`` with the permissions of ``mkdir`` (tempfile's are 0700)."""
    while True:
        path = parent / f"{prefix}{secrets.token_hex(4)}"
        try:
            path.mkdir()
        except FileExistsError:
            continue
        return path


def recover_folder(target: str | os.PathLike) -> None:
    """Undo what a killed `replace_folder` left beside ``target``.

    When ``target`` is missing and a complete old folder waits in ``.<name>.old-*/folder`` (a kill
    between the two renames), it is moved back. Staging folders of killed writes and old folders
    whose replacement finished are removed. Nothing else is touched.
    """
    target = Path(target)
    if not target.parent.is_dir():
        return
    olds = sorted(target.parent.glob(f".{glob.escape(target.name)}.old-*"), key=lambda p: p.stat().st_mtime)
    if not target.exists():
        for old in reversed(olds):
            if (old / "folder").is_dir():
                os.replace(old / "folder", target)
                _fsync_dir(target.parent)
                break
    for leftover in olds + sorted(target.parent.glob(f".{glob.escape(target.name)}.staging-*")):
        shutil.rmtree(leftover, ignore_errors=True)


def _carry(source: Path, destination: Path) -> None:
    if source.is_dir():
        shutil.copytree(source, destination, copy_function=_link_or_copy)
    else:
        _link_or_copy(source, destination)


def _link_or_copy(source, destination) -> None:
    try:
        os.link(source, destination)
    except OSError:
        shutil.copy2(source, destination)


def _fsync_tree(root: Path) -> None:
    for path in sorted(root.rglob("*")):
        if path.is_file():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
    _fsync_dir(root)


def _fsync_dir(path: Path) -> None:
    try:
        descriptor = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write a small file so that readers see the old content or the new, never a part.

    The file gets the permissions a plain ``open(path, "w")`` would give it (an existing file's).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        os.chmod(temporary, path.stat().st_mode & 0o7777 if path.exists() else 0o666 & ~_umask())
        with os.fdopen(handle, "w", encoding="utf-8") as file:
            file.write(text)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def recover_file(path: str | os.PathLike) -> None:
    """Remove the temporary files a killed `atomic_write_text` of ``path`` left beside it (one writer per file)."""
    path = Path(path)
    if path.parent.is_dir():
        for leftover in path.parent.glob(f".{glob.escape(path.name)}.*"):
            if leftover.is_file() and len(leftover.name) == len(path.name) + 10:  # mkstemp adds 8 characters
                leftover.unlink(missing_ok=True)


def _umask() -> int:
    """The process's umask, read without changing it (Linux: /proc); 0o022 where it cannot be read."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    return 0o022


def iter_named(tensors: Iterable[tuple[str, torch.Tensor]], rename) -> Iterator[tuple[str, torch.Tensor]]:
    """``(rename(key), tensor)`` for each pair: a key layout applied to a tensor stream."""
    for key, tensor in tensors:
        yield rename(key), tensor
