"""The trainer's resume checkpoints: written all at once, read back checked, found again after a kill.

A checkpoint folder (``output_dir/last`` after every save, ``output_dir/best`` at the best evaluation)::

    trainable.safetensors   trained parameters under their HCX names, and the RNG state (``RNG_KEY``)
    optimizer.pt            optimiser state, read back with torch.load(weights_only=True): tensors and
                            plain containers only; a file holding other Python objects is refused
    state.json              step, history, best score, schedule, the run's settings
    config.json             the model's full OmniConfig (normalisation statistics included)

`write_checkpoint_folder` replaces a folder atomically (`hcx_extend.layout.replace_folder`): a process
killed at any moment, even in the middle of a file, leaves the previous complete checkpoint (or, killed
between the two renames, none, with the previous one aside, which `recover_leftovers` puts back).
Every reader raises a ValueError naming the file for anything truncated, corrupt or of another shape.
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from hcx_extend.layout import read_json, recover_file, recover_folder, replace_folder

RNG_KEY = "__rng_state__"
TRAINED_FILE = "trainable.safetensors"
OPTIMIZER_FILE = "optimizer.pt"
STATE_FILE = "state.json"
CONFIG_FILE = "config.json"
CHECKPOINT_FILES = (TRAINED_FILE, OPTIMIZER_FILE, STATE_FILE, CONFIG_FILE)
LOG_FILE = "log.jsonl"
# What a state.json must hold, and the JSON type of each entry.
_STATE_TYPES = {"step": (int, "an integer"), "history": (list, "a list"),
                "evals_without_improvement": (int, "an integer"), "scheduler": (dict, "an object"),
                "train_config": (dict, "an object")}


def write_checkpoint_folder(directory: Path, tensors: dict[str, torch.Tensor], optimizer_state: dict[str, Any],
                            state: dict[str, Any], config: dict[str, Any]) -> None:
    """Write a checkpoint folder (layout in the module docstring), replacing ``directory`` atomically.

    Args:
        tensors: the trained parameters, on the CPU; the current RNG state is added under ``RNG_KEY``.
        optimizer_state: ``optimizer.state_dict()``.
        state: the trainer's progress (JSON-serialisable; at least the keys `read_state` checks).
        config: the model's config as a dict.
    """
    tensors = {**tensors, RNG_KEY: torch.get_rng_state()}
    with replace_folder(directory) as staging:
        save_file(tensors, staging / TRAINED_FILE, metadata={"format": "pt"})
        torch.save(optimizer_state, staging / OPTIMIZER_FILE)
        (staging / STATE_FILE).write_text(json.dumps(state, indent=1))
        (staging / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True, default=str))


def recover_leftovers(output_dir: Path) -> None:
    """Undo what a killed save left in ``output_dir`` (`hcx_extend.layout.recover_folder`); one process only."""
    recover_folder(output_dir / "last")
    recover_folder(output_dir / "best")
    recover_file(output_dir / LOG_FILE)


def find_resume_folder(output_dir: Path) -> Path | None:
    """The complete checkpoint to resume from, or None when there is none (a fresh run).

    That is ``last/``; a complete ``last.tmp/`` beside a missing or incomplete ``last/`` is what trainers
    before atomic checkpoints left when killed while replacing ``last/``, and is used then.

    Raises:
        ValueError: ``last/`` exists but lacks files, and there is nothing complete to resume from.
    """
    last = output_dir / "last"
    for candidate in (last, output_dir / "last.tmp"):
        if candidate.is_dir() and all((candidate / name).is_file() for name in CHECKPOINT_FILES):
            return candidate
    if last.exists():
        missing = [name for name in CHECKPOINT_FILES if not (last / name).is_file()]
        raise ValueError(f"{last} is an incomplete checkpoint (missing {', '.join(missing)}); delete it to start "
                         "over, or train with resume=False (CLI: without --resume)")
    return None


def read_state(path: Path) -> dict[str, Any]:
    """A checkpoint's ``state.json``, its entries' types checked.

    Raises:
        ValueError: naming the file and the entry.
    """
    state = read_json(path)
    if not isinstance(state, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(state).__name__}")
    for key, (kind, what) in _STATE_TYPES.items():
        if not isinstance(state.get(key), kind) or isinstance(state.get(key), bool):
            raise ValueError(f"{path}: '{key}' must be {what}, got {state.get(key)!r}; the checkpoint is corrupt")
    if state["step"] < 0 or not (state.get("best") is None or isinstance(state["best"], dict)):
        raise ValueError(f"{path}: 'step' or 'best' is malformed; the checkpoint is corrupt")
    return state


def read_trained(path: Path) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """A checkpoint's trained parameters and its RNG state.

    Raises:
        ValueError: naming the file: truncated, corrupt, or without an RNG state.
    """
    try:
        tensors = load_file(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} does not exist") from None
    except (SafetensorError, OSError, RuntimeError, ValueError) as error:
        raise ValueError(f"{path}: not a readable safetensors file ({error}); it may be truncated or corrupt") from None
    rng = tensors.pop(RNG_KEY, None)
    if rng is None or rng.dtype != torch.uint8:
        raise ValueError(f"{path}: lacks the RNG state ({RNG_KEY}); not a checkpoint this trainer wrote")
    return tensors, rng


def read_optimizer_state(path: Path) -> dict[str, Any]:
    """``optimizer.pt`` through ``torch.load(weights_only=True)``: tensors and plain containers, nothing else.

    Raises:
        ValueError: naming the file: it holds other Python objects (it is not unpickled), or is damaged.
    """
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} does not exist") from None
    except pickle.UnpicklingError as error:
        reason = " ".join(str(error).split()[:12])
        raise ValueError(f"{path}: holds Python objects other than tensors and plain containers, or is corrupt; it "
                         f"will not be unpickled ({reason} ...). Delete the checkpoint to start over") from None
    except Exception as error:  # noqa: BLE001 - torch.load raises many types for damaged archives
        raise ValueError(f"{path}: not a readable optimizer state ({type(error).__name__}: "
                         f"{' '.join(str(error).split())[:200]}); it may be truncated or corrupt") from None
    if not isinstance(state, dict) or not isinstance(state.get("state"), dict) or not isinstance(
            state.get("param_groups"), list):
        raise ValueError(f"{path}: not an optimizer state (expected 'state' and 'param_groups')")
    return state


def read_best(directory: Path, step: int | None) -> dict[str, torch.Tensor] | None:
    """The parameters in ``best/`` if it holds the evaluation at ``step`` (what ``last/`` records as best).

    ``best/`` is written before ``last/`` at an evaluation; a kill between the two leaves a ``best/``
    newer than ``last/`` knows, which is ignored: replaying those steps finds and writes it again.
    """
    if step is None or not all((directory / name).is_file() for name in (TRAINED_FILE, STATE_FILE)):
        return None
    if read_state(directory / STATE_FILE)["step"] != step:
        return None
    return read_trained(directory / TRAINED_FILE)[0]
