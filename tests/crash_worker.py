"""Train the tiny preset with a checkpoint after every step, and SIGKILL itself at a chosen moment.

Used by test_crash_safety.py (in forked processes, so the imports are paid once); also runs alone::

    python tests/crash_worker.py RUN_FOLDER BASE_FOLDER [--kill-at K]

Every moment that matters for crash safety is an *event*: an optimiser step (the parameters are about
to change), each file a checkpoint writer writes (``trainable.safetensors``, ``optimizer.pt``,
``state.json``/``config.json``/``run.json``), each rename and each folder removal. An event is named
by where the run is (the trainer's step, or ``FINAL`` once training returned), what happens, and how
many times that already happened at this step in this process: ``[3, "write optimizer.pt", 2]``. The
same name means the same moment in any process that gets there, whether it started fresh or resumed.
A run without ``--kill-at`` writes the names of all its events to ``RUN_FOLDER.events`` (one JSON
list per line). With ``--kill-at '[STEP, "WHAT", N]'`` the process kills itself with SIGKILL at that
event, or at its first event past that step if it resumed beyond it; at a file write it first writes
half of the file, so the kill lands in the middle of a write. Before dying it writes the event to
``RUN_FOLDER.kill``.

The run: ``new-encoder`` on the sensor modality (dropout 0.1, so the RNG state matters), 8 examples,
batch 2, 3 epochs = 12 steps, an evaluation every 4 steps (``best/``), ``resume=True``, then the run
checkpoint (`hcx_extend.runs.save_run`) in ``RUN_FOLDER/checkpoint``. A run that was killed continues
from its last checkpoint when started again.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import pathlib
import re
import shutil
import signal
import sys
from pathlib import Path

import safetensors.torch
import torch

sys.path.insert(0, str(Path(__file__).parent))

from tiny_tokenizer import make_tokenizer  # noqa: E402

import hcx_extend.runs  # noqa: E402
import hcx_extend.training.resume  # noqa: E402
from hcx_extend import OmniForCausalLM, OmniProcessor, align_tokens, preset_config  # noqa: E402
from hcx_extend.config import IGNORE_INDEX  # noqa: E402
from hcx_extend.data.examples import Example  # noqa: E402
from hcx_extend.runs import prepare_run_folder, save_run  # noqa: E402
from hcx_extend.training import TrainConfig, Trainer  # noqa: E402

STEPS = 12
FINAL = 1_000  # the "step" of events after training returned (the run checkpoint)


def build():
    """The base model (the tiny preset, sensor dropout 0.1) and its tokenizer; the same in every process."""
    config = preset_config("tiny-hcx-omni")
    config.modality("sensor").encoder["dropout"] = 0.1
    torch.manual_seed(0)
    model = OmniForCausalLM(config)
    tokenizer = make_tokenizer()
    align_tokens(model, tokenizer)
    return model, tokenizer


def examples() -> list[Example]:
    generator = torch.Generator().manual_seed(0)
    return [Example([{"role": "user", "content": "<sensor> which way?"},
                     {"role": "assistant", "content": "up" if i % 2 else "down"}],
                    {"sensor": [torch.randn(8 + i, 6, generator=generator)]}) for i in range(8)]


class KillSwitch:
    """Names events (module docstring) and SIGKILLs the process at event ``kill_at`` (None: never)."""

    def __init__(self, kill_at: list | None, record: Path | None, report: Path):
        self.kill_at, self.record, self.report = kill_at, record, report
        self.progress = lambda: -1  # the trainer's step, once there is a trainer
        self.seen: dict[tuple[int, str], int] = {}
        self.events: list[list] = []
        self.write_bytes = pathlib.Path.write_bytes  # the real one, for the report and partial writes

    def event(self, what: str, partial: tuple[Path, bytes] | None = None) -> None:
        step = self.progress()
        occurrence = self.seen[step, what] = self.seen.get((step, what), 0) + 1
        name = [step, what, occurrence]
        if self.record is not None:
            self.events.append(name)
        if self.kill_at is None or (name != self.kill_at and step <= self.kill_at[0]):
            return
        self.write_bytes(self.report, json.dumps(name).encode())
        if partial is not None:
            path, data = partial
            with open(path, "wb") as handle:
                handle.write(data[:len(data) // 2])
        os.kill(os.getpid(), signal.SIGKILL)

    def install(self) -> None:
        switch = self
        save_file, torch_save = safetensors.torch.save_file, torch.save
        write_text, replace, rmtree = pathlib.Path.write_text, os.replace, shutil.rmtree
        adam_step = torch.optim.AdamW.step

        def patched_save_file(tensors, filename, metadata=None):
            switch.event(f"write {Path(filename).name}",
                         (Path(filename), safetensors.torch.save(tensors, metadata=metadata)))
            return save_file(tensors, filename, metadata=metadata)

        def patched_torch_save(obj, f, *args, **kwargs):
            if isinstance(f, (str, os.PathLike)):
                buffer = io.BytesIO()
                torch_save(obj, buffer, *args, **kwargs)
                switch.event(f"write {Path(f).name}", (Path(f), buffer.getvalue()))
            return torch_save(obj, f, *args, **kwargs)

        def patched_write_text(self, data, *args, **kwargs):
            switch.event(f"write {self.name}", (self, data.encode()))
            return write_text(self, data, *args, **kwargs)

        def patched_replace(source, destination, *args, **kwargs):
            switch.event(f"rename to {stable(Path(destination).name)}")
            return replace(source, destination, *args, **kwargs)

        def patched_rmtree(path, *args, **kwargs):
            switch.event(f"remove {stable(Path(path).name)}")
            return rmtree(path, *args, **kwargs)

        def patched_step(self, *args, **kwargs):
            switch.event("optimizer step")
            return adam_step(self, *args, **kwargs)

        for module in (hcx_extend.training.resume, hcx_extend.runs):
            module.save_file = patched_save_file
        torch.save = patched_torch_save
        pathlib.Path.write_text = patched_write_text
        os.replace = patched_replace
        shutil.rmtree = patched_rmtree
        torch.optim.AdamW.step = patched_step


def stable(name: str) -> str:
    """A file name without the random part a temporary name has: ``.last.staging-1f2e3d4c`` -> ``.last.staging``."""
    return re.sub(r"-[0-9a-f]{8}$", "", name)


def train(run: Path, base: Path, kill_at: list | None = None) -> int:
    """Train (resuming what is in ``run``) and write the run checkpoint; returns the number of events."""
    torch.set_num_threads(1)
    record = None if kill_at is not None else run.with_name(run.name + ".events")
    switch = KillSwitch(kill_at, record, run.with_name(run.name + ".kill"))
    switch.install()
    model, tokenizer = build()
    processor = OmniProcessor(tokenizer, model.config)
    held_out = examples()[:2]

    def evaluate(m) -> dict[str, float]:
        batch = processor([e.messages for e in held_out], {"sensor": [e.inputs["sensor"][0] for e in held_out]},
                          return_labels=True, padding_side="right")
        assert int((batch["labels"] != IGNORE_INDEX).sum()) > 0
        loss = float(m(**batch, logits_to_keep="labels").loss)
        return {"loss": loss, "score": -loss}

    config = TrainConfig(strategy="new-encoder", modalities=["sensor"], epochs=3, batch_size=2, learning_rate=1e-3,
                         warmup_steps=2, eval_every_steps=4, save_every_steps=1, progress=False,
                         output_dir=str(prepare_run_folder(run, resume=True) / "training"), resume=True)
    trainer = Trainer(model, processor, examples(), config, evaluate=evaluate, log=lambda line: None)
    switch.progress = lambda: trainer.step
    trainer.train()
    switch.progress = lambda: FINAL
    save_run(model, run / "checkpoint", base=base, components=trainer.components, tokenizer=tokenizer,
             strategy="new-encoder")
    if record is not None:
        switch.write_bytes(record, "".join(json.dumps(name) + "\n" for name in switch.events).encode())
    return len(switch.events)


def save_base(folder: Path) -> None:
    """The base model `train` starts from, as a checkpoint folder (what ``run.json`` refers to)."""
    model, tokenizer = build()
    model.save_pretrained(folder)
    tokenizer.save_pretrained(str(folder))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("base", type=Path)
    parser.add_argument("--kill-at", type=json.loads, default=None, help='an event, e.g. \'[3, "write optimizer.pt", 1]\'')
    arguments = parser.parse_args()
    if not arguments.base.exists():
        save_base(arguments.base)
    print(f"{train(arguments.run, arguments.base, arguments.kill_at)} events")
