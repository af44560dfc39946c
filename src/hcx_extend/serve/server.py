"""`run_server`: load a checkpoint once and serve it with uvicorn until SIGTERM or SIGINT.

On SIGTERM/SIGINT uvicorn stops accepting connections, lets the requests in flight finish (streams
included; at most ``request_timeout_s`` plus a few seconds), then the app's lifespan drains the batch
worker, `run_server` returns and ``hcx-extend serve`` exits 0. A second SIGINT stops at once.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import torch
import uvicorn

from hcx_extend.processor import OmniProcessor
from hcx_extend.runs import load_model
from hcx_extend.serve.app import create_app
from hcx_extend.serve.options import ServeOptions


def default_model_name(checkpoint: str | os.PathLike) -> str:
    """The id a checkpoint is served under: its folder name, with the run's name for a run's ``checkpoint/``.

    ``runs/imu-demo/checkpoint`` -> ``imu-demo``; ``llm-with-imu`` -> ``llm-with-imu``; ``x.gguf`` -> ``x``.
    """
    path = Path(checkpoint).resolve()
    if path.name == "checkpoint" and path.parent.name:
        return path.parent.name
    return path.stem if path.is_file() else path.name


def run_server(checkpoint: str | os.PathLike, options: ServeOptions, *, base: str | os.PathLike | None = None,
               threads: int | None = None, log_level: str = "info", device: str | None = "auto") -> None:
    """Load ``checkpoint`` (any kind `hcx_extend.runs.load_model` reads) and serve it until stopped.

    Args:
        device: where the model runs (`hcx_extend.devices.resolve_device`; "auto" = a GPU if there is one).
        threads: torch's CPU threads (None = torch's default, one per core). On a CPU shared with other
            processes, fewer threads than cores can be many times faster (no oversubscription).

    Raises:
        ValueError / FileNotFoundError: the checkpoint cannot be loaded, or it has no tokenizer.
    """
    if threads is not None:
        if threads < 1:
            raise ValueError(f"threads must be >= 1, got {threads}")
        torch.set_num_threads(threads)
    model, tokenizer = load_model(checkpoint, base=base, device=device)
    if tokenizer is None:
        raise ValueError(f"{checkpoint} has no tokenizer; save the LLM's tokenizer beside its weights")
    processor = OmniProcessor(tokenizer, model.config)
    app = create_app(model, processor, options)
    config = uvicorn.Config(app, host=options.host, port=options.port, log_level=log_level,
                            timeout_graceful_shutdown=int(options.request_timeout_s) + 5, lifespan="on")
    modalities = ", ".join(f"{m.name} ({m.marker})" for m in model.config.modalities.values()) or "none"
    print(f"serving {options.model_name!r} from {checkpoint}; modalities: {modalities}", flush=True)
    # uvicorn re-raises the signal it stopped for once it has shut down gracefully; that is a normal end here.
    previous = signal.signal(signal.SIGTERM, _raise_stopped)
    try:
        uvicorn.Server(config).run()
    except (_Stopped, KeyboardInterrupt):
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)
    stats = app.state.worker.stats()
    print(f"stopped after answering {stats['requests']} requests in {stats['batches']} batches", flush=True)


class _Stopped(Exception):
    """SIGTERM arrived (after uvicorn's graceful shutdown, or before it started)."""


def _raise_stopped(signum, frame) -> None:
    raise _Stopped()
