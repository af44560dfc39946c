"""Crash safety: a run killed with SIGKILL at any moment resumes to the same result, and no writer leaves
a half-written folder that a reader would take for a checkpoint.

The SIGKILL test trains in forked processes (`crash_worker.py`; the forkserver imports torch and the
package once). Each process kills itself at a chosen moment of the run: a training step, the middle
of a file write, between the renames of a folder replacement. The moments are 20 positions drawn with
a fixed seed from the events of an uninterrupted run, so they spread over the whole run, its final
`save_run` included.
"""

import json
import multiprocessing
import random
import signal
from pathlib import Path

import pytest
import safetensors.torch
import torch
from safetensors.torch import load_file

import crash_worker
from hcx_extend import extend, load_model
from hcx_extend.layout import atomic_write_text, recover_folder
from hcx_extend.runs import save_run
from hcx_extend.training.resume import CHECKPOINT_FILES, TRAINED_FILE

KILLS = 20

forkserver = multiprocessing.get_context("forkserver")
forkserver.set_forkserver_preload(["torch", "transformers", "accelerate", "safetensors.torch", "hcx_extend",
                                   "hcx_extend.training.trainer", "hcx_extend.runs"])


def run_worker(run: Path, base: Path, kill_at: int | None) -> int:
    """The exit code of one worker process (``-SIGKILL`` when it killed itself)."""
    process = forkserver.Process(target=crash_worker.train, args=(run, base, kill_at))
    process.start()
    process.join()
    return process.exitcode


def checkpoint_state(folder: Path) -> str:
    """"absent", "complete" (every file present and readable), or what is wrong with ``folder``."""
    if not folder.exists():
        return "absent"
    missing = [name for name in CHECKPOINT_FILES if not (folder / name).is_file()]
    if missing:
        return f"missing {missing}"
    try:
        load_file(folder / TRAINED_FILE)
        torch.load(folder / "optimizer.pt", weights_only=True)
        json.loads((folder / "state.json").read_text())
        json.loads((folder / "config.json").read_text())
    except Exception as error:  # noqa: BLE001 - any failure to read is what the test reports
        return f"unreadable: {error}"
    return "complete"


def run_state(run: Path) -> str:
    """"absent" or "loads" for the run checkpoint, or why it does not load."""
    if not (run / "checkpoint").exists():
        return "absent"
    try:
        load_model(run / "checkpoint")
    except Exception as error:  # noqa: BLE001
        return f"does not load: {error}"
    return "loads"


def all_tensors(folder: Path) -> dict[str, torch.Tensor]:
    model, _ = load_model(folder)
    return model.state_dict()


def test_sigkill_at_20_moments_then_resume_ends_like_an_uninterrupted_run(tmp_path):
    base, reference, run = tmp_path / "base", tmp_path / "reference", tmp_path / "run"
    crash_worker.save_base(base)
    assert run_worker(reference, base, None) == 0
    events = [json.loads(line) for line in (tmp_path / "reference.events").read_text().splitlines()]
    # One moment in each twentieth of the run, so the kills cover all of it, the final save_run included.
    chooser, bounds = random.Random(2024), [len(events) * i // KILLS for i in range(KILLS + 1)]
    moments = [events[chooser.randrange(low, high)] for low, high in zip(bounds, bounds[1:])]

    killed_at, states = [], []
    for moment in moments:
        assert run_worker(run, base, moment) == -signal.SIGKILL
        killed_at.append(json.loads((tmp_path / "run.kill").read_text()))
        states.append((checkpoint_state(run / "training" / "last"), checkpoint_state(run / "training" / "best"),
                       run_state(run)))
    assert run_worker(run, base, None) == 0

    # Every kill left each folder complete or absent: never half-written.
    for moment, (last, best, checkpoint) in zip(killed_at, states):
        assert last in ("absent", "complete") and best in ("absent", "complete"), moment
        assert checkpoint in ("absent", "loads"), moment
    # The kills landed inside writes, between renames, in training steps and in save_run: all over the run.
    kinds = {what.split()[0] for _, what, _ in killed_at}
    assert {"write", "rename", "optimizer"} <= kinds, killed_at
    assert killed_at[0][0] <= 1 and killed_at[-1][0] == crash_worker.FINAL, killed_at
    assert ["rename to folder" in what for _, what, _ in killed_at].count(True) >= 1, killed_at  # between renames

    # Resuming after each kill ends with the same parameters, optimiser state and losses.
    expected, got = all_tensors(reference / "checkpoint"), all_tensors(run / "checkpoint")
    assert expected.keys() == got.keys()
    assert all(torch.equal(expected[key], got[key]) for key in expected)
    last_expected, last_got = reference / "training" / "last", run / "training" / "last"
    assert load_file(last_expected / TRAINED_FILE).keys() == load_file(last_got / TRAINED_FILE).keys()
    assert all(torch.equal(a, load_file(last_got / TRAINED_FILE)[k])
               for k, a in load_file(last_expected / TRAINED_FILE).items())
    optimizer_expected = torch.load(last_expected / "optimizer.pt", weights_only=True)["state"]
    optimizer_got = torch.load(last_got / "optimizer.pt", weights_only=True)["state"]
    assert all(torch.equal(optimizer_expected[i][name], optimizer_got[i][name])
               for i in optimizer_expected for name in optimizer_expected[i])

    def losses(folder: Path) -> list[tuple]:
        history = json.loads((folder / "state.json").read_text())["history"]
        return [(h["step"], h.get("loss"), h.get("eval_loss")) for h in history]

    assert losses(last_got) == losses(last_expected)
    assert len(losses(last_expected)) == crash_worker.STEPS + crash_worker.STEPS // 4
    log = [json.loads(line) for line in (run / "training" / "log.jsonl").read_text().splitlines()]
    assert [(h["step"], h.get("loss"), h.get("eval_loss")) for h in log] == losses(last_expected)


# ---------------------------------------------------------------------------------------- writers
def half_writing_save_file(tensors, filename, metadata=None):
    """safetensors' save_file that dies half-way: the first half of the file is on disk, then an error."""
    data = safetensors.torch.save(tensors, metadata=metadata)
    Path(filename).write_bytes(data[:len(data) // 2])
    raise OSError(28, "No space left on device (simulated)")


@pytest.fixture
def saved(tiny_model, tokenizer, tmp_path):
    """A complete checkpoint folder of the tiny model, and its tensors."""
    tiny_model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(str(tmp_path / "model"))
    return tmp_path / "model", {k: v.clone() for k, v in tiny_model.state_dict().items()}


def assert_loads_unchanged(folder: Path, tensors: dict[str, torch.Tensor]) -> None:
    model, _ = load_model(folder)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in tensors.items())


@pytest.mark.parametrize("writer", ["save_pretrained", "extend", "save_run"])
def test_a_writer_that_fails_mid_write_leaves_the_old_folder_intact(writer, saved, tiny_model, tokenizer, tmp_path,
                                                                    monkeypatch):
    folder, tensors = saved
    target = tmp_path / "target"
    if writer == "save_run":
        save_run(tiny_model, target, base=folder, components=["sensor_model"], tokenizer=tokenizer)
        monkeypatch.setattr("hcx_extend.runs.save_file", half_writing_save_file)
    else:
        tiny_model.save_pretrained(target)
        monkeypatch.setattr("hcx_extend.layout.save_file", half_writing_save_file)
    before = {p.name: p.read_bytes() for p in target.iterdir()}
    with torch.no_grad():
        next(tiny_model.model.sensor_model.parameters()).add_(1.0)  # what the failed write would have saved

    with pytest.raises(OSError, match="No space left"):
        if writer == "save_pretrained":
            tiny_model.save_pretrained(target)
        elif writer == "extend":
            extend(folder, [{"name": "imu", "encoder": {"model_type": "imu", "hidden_size": 16, "num_heads": 2,
                                                         "ffn_size": 16, "output_size": 16}}], output_dir=target)
        else:
            save_run(tiny_model, target, base=folder, components=["sensor_model"], tokenizer=tokenizer)

    assert {p.name: p.read_bytes() for p in target.iterdir()} == before  # the old folder, byte for byte
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no staging folder left
    monkeypatch.undo()
    assert_loads_unchanged(target, tensors)


def test_a_kill_between_the_two_renames_is_undone_by_the_next_writer_or_reader(saved, tiny_model, tmp_path,
                                                                             monkeypatch):
    folder, tensors = saved
    real_replace, calls = __import__("os").replace, []

    def replace_then_die(source, destination):
        calls.append(Path(destination).name)
        if len(calls) == 2:  # the old folder is aside, the new one not yet in place: the process "dies"
            raise KeyboardInterrupt
        real_replace(source, destination)

    monkeypatch.setattr("hcx_extend.layout.os.replace", replace_then_die)
    with pytest.raises(KeyboardInterrupt):
        tiny_model.save_pretrained(folder)
    monkeypatch.undo()
    assert not folder.exists()  # a reader sees no folder, never a partial one
    aside = list(tmp_path.glob(".model.old-*/folder"))
    assert len(aside) == 1 and (aside[0] / "model.safetensors").exists()
    with pytest.raises(FileNotFoundError, match=f"{folder} does not exist; a save of it was interrupted and left the "
                                                f"previous version in {aside[0]}"):
        load_model(folder)

    recover_folder(folder)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".model.")) == []
    assert_loads_unchanged(folder, tensors)


def test_saved_folders_and_notes_get_the_permissions_of_mkdir_and_open(tiny_model, tmp_path):
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain.txt").write_text("x")
    tiny_model.save_pretrained(tmp_path / "model")
    atomic_write_text(tmp_path / "notes.json", "{}")
    assert (tmp_path / "model").stat().st_mode == (tmp_path / "plain").stat().st_mode
    assert (tmp_path / "notes.json").stat().st_mode == (tmp_path / "plain.txt").stat().st_mode
