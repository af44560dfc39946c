"""A catalogue of bad inputs: what a careless or demanding user may hand the library and the CLI.

Every case must end in a documented error (ValueError, or FileNotFoundError for a missing file) whose
message names the file (and the key or line) that is wrong; through the CLI, in exactly one line
``error: ...`` on stderr and exit code 2, never a traceback. Cases that carry a pickle check that its
payload did not run. The table is the specification: add a row for every new way to fail.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import shutil
import tracemalloc
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from hcx_extend import OmniConfig, build_preset, load_model, read_source
from hcx_extend.checkpoint.modality_file import read_modality_file
from hcx_extend.cli import main
from hcx_extend.config import ModalityConfig
from hcx_extend.data.examples import Example, read_jsonl, read_modality_files
from hcx_extend.data.sensors import parse_csv_text, read_csv, read_npy, read_recording
from hcx_extend.presets import smollm2_gguf_path
from hcx_extend.processor import OmniProcessor, align_tokens
from hcx_extend.runs import save_run
from hcx_extend.training import TrainConfig, Trainer

pytestmark = pytest.mark.usefixtures("one_thread")

CHANNELS = ["acc_x", "acc_y", "acc_z", "gyro_x", "gyro_y", "gyro_z"]


class Payload:
    """A pickle whose loading would create the folder ``marker``: proof that a reader ran code."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (str(self.marker),)


@dataclass
class Files:
    """What the cases start from, written once per module."""

    root: Path
    tiny: Path  # a complete checkpoint folder of the tiny preset, with its tokenizer
    run: Path  # a run checkpoint trained from it
    last: Path  # a trainer's resume checkpoint (training/last) of one step
    recording: Path  # a valid (20, 6) .npy recording


def tiny_examples() -> list[Example]:
    generator = torch.Generator().manual_seed(0)
    return [Example([{"role": "user", "content": "<sensor> which way?"},
                     {"role": "assistant", "content": "up" if i % 2 else "down"}],
                    {"sensor": [torch.randn(8 + i, 6, generator=generator)]}) for i in range(4)]


def tiny_trainer(output_dir: Path, tokenizer, **overrides) -> Trainer:
    model = build_preset("tiny-hcx-omni", seed=0)
    align_tokens(model, tokenizer)
    settings = dict(strategy="new-encoder", modalities=["sensor"], epochs=1, batch_size=2, max_steps=1,
                    save_every_steps=1, progress=False, output_dir=str(output_dir), resume=True)
    return Trainer(model, OmniProcessor(tokenizer, model.config), tiny_examples(),
                   TrainConfig(**{**settings, **overrides}), log=lambda line: None)


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> Files:
    import tiny_tokenizer

    root = tmp_path_factory.mktemp("catalogue")
    tokenizer = tiny_tokenizer.make_tokenizer()
    model = build_preset("tiny-hcx-omni", seed=0).eval()
    align_tokens(model, tokenizer)
    model.save_pretrained(root / "tiny")
    tokenizer.save_pretrained(str(root / "tiny"))
    save_run(model, root / "run", base=root / "tiny", components=["sensor_model", "sensor_projector"],
             tokenizer=tokenizer)
    tiny_trainer(root / "training", tokenizer).train()
    np.save(root / "recording.npy", np.random.default_rng(0).standard_normal((20, 6)).astype(np.float32))
    return Files(root, root / "tiny", root / "run", root / "training" / "last", root / "recording.npy")


# ---------------------------------------------------------------------------------------- builders
def write(path: Path, content: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content.encode() if isinstance(content, str) else content)
    return path


def checkpoint_with(files: Files, tmp: Path, config_edit: Callable[[dict], Any] | None = None,
                    replace: dict[str, str | bytes | None] | None = None) -> Path:
    """A copy of the tiny checkpoint (weights linked, not copied) with config.json edited or files replaced."""
    folder = tmp / "checkpoint"
    folder.mkdir()
    for path in files.tiny.iterdir():
        (folder / path.name).symlink_to(path)
    if config_edit is not None:
        config = json.loads((files.tiny / "config.json").read_text())
        config_edit(config)
        (folder / "config.json").unlink()
        write(folder / "config.json", json.dumps(config))
    for name, content in (replace or {}).items():
        if (folder / name).is_symlink() or (folder / name).exists():
            (folder / name).unlink()
        if content is not None:
            write(folder / name, content)
    return folder


def half(path: Path) -> bytes:
    data = path.read_bytes()
    return data[:len(data) // 2]


def modality_file(tmp: Path, content: Any, raw: bytes | None = None) -> Path:
    return write(tmp / "modality.json", raw if raw is not None else json.dumps(content))


IMU_FILE = {"name": "vowel", "encoder": {"model_type": "imu", "in_channels": 12, "hidden_size": 16, "num_heads": 2,
                                         "ffn_size": 16, "output_size": 16},
            "input": {"kind": "sensor", "channels": 12, "max_length": 64, "sample_rate": 100}}


def imu_file(**changes) -> dict:
    data = json.loads(json.dumps(IMU_FILE))
    for path, value in changes.items():
        node, *keys = path.split("__")
        target = data
        for key in [node, *keys][:-1]:
            target = target[key]
        if value is DROP:
            del target[[node, *keys][-1]]
        else:
            target[[node, *keys][-1]] = value
    return data


DROP = object()


def sensor_config(files: Files) -> OmniConfig:
    return load_model(files.tiny)[0].config


def one_million_rows(tmp: Path) -> Path:
    path = tmp / "long.csv"
    with path.open("w") as handle:
        handle.write(",".join(CHANNELS) + "\n")
        handle.write("0.1,0.2,0.3,0.4,0.5,0.6\n" * 1_000_000)
    return path


# ---------------------------------------------------------------------------------------- the table
@dataclass
class Case:
    """A bad input: ``make(tmp, files)`` -> (the call that must fail, substrings its message must hold)."""

    id: str
    make: Callable[[Path, Files], tuple[Callable[[], Any], list[str]]]
    error: type = ValueError


def case(id: str, error: type = ValueError):
    def register(make):
        API_CASES.append(Case(id, make, error))
        return make
    return register


API_CASES: list[Case] = []

# --- modality files (hcx-extend extend --modality, train --modality-file)
for _id, _changes, _words in [
    ("modality: encoder setting as a string", {"encoder__in_channels": "12"}, ["in_channels", "'12'"]),
    ("modality: audio encoder setting as a string", {"encoder": {"model_type": "qwen2_audio_encoder", "d_model": "32"}},
     ["d_model", "'32'"]),
    ("modality: no encoder", {"encoder": DROP}, ["'encoder'"]),
    ("modality: no name", {"name": DROP}, ["'name'"]),
    ("modality: input channels disagree with the encoder", {"input__channels": 6}, ["input.channels is 6", "12"]),
    ("modality: input kind disagrees with the encoder", {"input__kind": "audio"}, ["input.kind", "'audio'"]),
    ("modality: sample rate 0", {"input__sample_rate": 0}, ["input.sample_rate", "0"]),
    ("modality: negative sample rate", {"input__sample_rate": -100}, ["input.sample_rate", "-100"]),
    ("modality: max_length 0", {"input__max_length": 0}, ["input.max_length", "0"]),
    ("modality: misspelt field", {"chanels": 3}, ["unknown modality fields", "chanels"]),
    ("modality: unknown encoder setting", {"encoder__layers": 2}, ["unknown settings", "layers"]),
    ("modality: unknown projector type", {"projector": {"type": "transformer"}}, ["projector type 'transformer'"]),
    ("modality: compressor chunk as a string", {"compressor": {"type": "avgpool", "chunk_size": "4"}},
     ["chunk_size", "'4'"]),
    ("modality: normalization std of zero", {"normalization": {"mean": [0.0] * 12, "std": [0.0] * 12}},
     ["normalization std must be positive"]),
    ("modality: not an identifier", {"name": "IMU-1"}, ["'IMU-1'", "lower-case identifier"]),
    ("modality: input given as a string", {"input": "sensor"}, ["input must be", "'sensor'"]),
    ("modality: channel names disagree with channels", {"input__channel_names": ["x", "y"]},
     ["channel_names names 2 channels", "12"]),
    ("modality: heads do not divide the width", {"encoder__num_heads": 3}, ["not divisible", "num_heads 3"]),
]:
    def _make(tmp, files, changes=_changes, words=_words):
        path = modality_file(tmp, imu_file(**changes))
        return (lambda: read_modality_file(path)), [str(path), *words]
    API_CASES.append(Case(_id, _make))


@case("modality: truncated JSON")
def _(tmp, files):
    path = modality_file(tmp, None, json.dumps(IMU_FILE)[:40].encode())
    return (lambda: read_modality_file(path)), [str(path), "not valid JSON", "truncated"]


@case("modality: not UTF-8")
def _(tmp, files):
    path = modality_file(tmp, None, json.dumps(IMU_FILE).encode("utf-16"))
    return (lambda: read_modality_file(path)), [str(path), "not valid JSON"]


@case("modality: a JSON list")
def _(tmp, files):
    path = modality_file(tmp, [IMU_FILE])
    return (lambda: read_modality_file(path)), [str(path), "expected a JSON object", "list"]


@case("modality: empty file")
def _(tmp, files):
    path = modality_file(tmp, None, b"")
    return (lambda: read_modality_file(path)), [str(path), "not valid JSON"]


@case("modality: a folder")
def _(tmp, files):
    return (lambda: read_modality_file(tmp)), [str(tmp), "is a folder"]


@case("modality: missing file", FileNotFoundError)
def _(tmp, files):
    return (lambda: read_modality_file(tmp / "nowhere.json")), [str(tmp / "nowhere.json"), "does not exist"]


# --- config.json of a checkpoint (load_model, read_source, chat, evaluate, merge)
for _id, _edit, _words in [
    ("config.json: LLM width as a string", lambda c: c["text_config"].update(hidden_size="64"),
     ["text_config", "hidden_size", "'64'"]),
    ("config.json: LLM width 0", lambda c: c["text_config"].update(hidden_size=0), ["text_config", "hidden_size", "0"]),
    ("config.json: negative vocabulary", lambda c: c["text_config"].update(vocab_size=-5), ["vocab_size", "-5"]),
    ("config.json: LLM config a string", lambda c: c.update(text_config="hyperclovax"), ["text_config must be"]),
    ("config.json: unknown LLM type", lambda c: c["text_config"].update(model_type="gpt9"), ["text_config", "gpt9"]),
    ("config.json: modalities a list", lambda c: c.update(modalities=[1]), ["modalities must be"]),
    ("config.json: modality without encoder", lambda c: c["modalities"]["sensor"].pop("encoder"),
     ["sensor", "'encoder'"]),
    ("config.json: encoder setting as a string", lambda c: c["modalities"]["sensor"]["encoder"].update(hidden_size="32"),
     ["sensor", "hidden_size", "'32'"]),
    ("config.json: audio encoder setting as a string",
     lambda c: c["modalities"]["audio"]["encoder"].update(encoder_layers="2"), ["audio", "encoder_layers", "'2'"]),
    ("config.json: contract channels disagree with the encoder",
     lambda c: c["modalities"]["sensor"]["input"].update(channels=3), ["sensor", "input.channels is 3", "6"]),
    ("config.json: placeholder id a string", lambda c: c["modalities"]["sensor"].update(token_id="128080"),
     ["sensor", "token_id", "'128080'"]),
    ("config.json: dtype nonsense", lambda c: c.update(dtype="float99"), ["dtype", "float99"]),
    ("config.json: normalization NaN",
     lambda c: c["modalities"]["sensor"].update(normalization={"mean": [math.nan] * 6, "std": [1.0] * 6}),
     ["sensor", "normalization mean", "nan"]),
]:
    def _make(tmp, files, edit=_edit, words=_words):
        folder = checkpoint_with(files, tmp, edit)
        return (lambda: load_model(folder)), [str(folder / "config.json"), *words]
    API_CASES.append(Case(_id, _make))


for _id, _content, _words in [
    ("config.json: truncated", "half", ["not valid JSON", "truncated"]),
    ("config.json: not UTF-8", b"\xff\xfe{\x00", ["not valid JSON", "utf-8"]),
    ("config.json: a JSON list", "[1, 2]", ["expected a JSON object", "list"]),
    ("config.json: empty", "", ["not valid JSON"]),
]:
    def _make(tmp, files, content=_content, words=_words):
        data = half(files.tiny / "config.json") if content == "half" else content
        folder = checkpoint_with(files, tmp, replace={"config.json": data})
        return (lambda: load_model(folder)), [str(folder / "config.json"), *words]
    API_CASES.append(Case(_id, _make))


@case("config.json: a folder")
def _(tmp, files):
    folder = checkpoint_with(files, tmp, replace={"config.json": None})
    (folder / "config.json").mkdir()
    return (lambda: load_model(folder)), [str(folder / "config.json"), "is a folder"]


@case("checkpoint: no config.json", FileNotFoundError)
def _(tmp, files):
    folder = checkpoint_with(files, tmp, replace={"config.json": None})
    return (lambda: load_model(folder)), [str(folder), "no config.json"]


# --- weights
for _id, _content, _words in [
    ("safetensors: truncated", "half", ["not a readable safetensors file", "truncated"]),
    ("safetensors: garbage", b"not a safetensors file at all", ["not a readable safetensors file"]),
    ("safetensors: empty", b"", ["not a readable safetensors file"]),
]:
    def _make(tmp, files, content=_content, words=_words):
        data = half(files.tiny / "model.safetensors") if content == "half" else content
        folder = checkpoint_with(files, tmp, replace={"model.safetensors": data})
        return (lambda: load_model(folder)), [str(folder / "model.safetensors"), *words]
    API_CASES.append(Case(_id, _make))


@case("safetensors: a folder")
def _(tmp, files):
    folder = checkpoint_with(files, tmp, replace={"model.safetensors": None})
    (folder / "model.safetensors").mkdir()
    return (lambda: load_model(folder)), [str(folder / "model.safetensors"), "is a folder"]


@case("safetensors: an index naming a missing shard", FileNotFoundError)
def _(tmp, files):
    index = {"weight_map": {"model.x": "model-00001-of-00002.safetensors"}}
    folder = checkpoint_with(files, tmp, replace={"model.safetensors": None,
                                                  "model.safetensors.index.json": json.dumps(index)})
    return (lambda: load_model(folder)), [str(folder / "model.safetensors.index.json"), "missing"]


@case("safetensors: an index whose weight_map is a list")
def _(tmp, files):
    folder = checkpoint_with(files, tmp, replace={"model.safetensors": None,
                                                  "model.safetensors.index.json": '{"weight_map": []}'})
    return (lambda: load_model(folder)), [str(folder / "model.safetensors.index.json"), "weight_map"]


@case("safetensors: an index pointing outside the folder")
def _(tmp, files):
    index = {"weight_map": {"model.x": "../../etc/passwd"}}
    folder = checkpoint_with(files, tmp, replace={"model.safetensors": None,
                                                  "model.safetensors.index.json": json.dumps(index)})
    return (lambda: load_model(folder)), [str(folder / "model.safetensors.index.json"), "not shards"]


@case("safetensors: integer tensor where the model has floats")
def _(tmp, files):
    from safetensors.torch import load_file

    tensors = load_file(files.tiny / "model.safetensors")
    key = "model.sensor_projector.fc1.weight"
    tensors[key] = tensors[key].to(torch.int64)
    folder = checkpoint_with(files, tmp, replace={"model.safetensors": None})
    save_file(tensors, folder / "model.safetensors")
    return (lambda: load_model(folder)), [str(folder), key, "torch.int64"]


@case("safetensors: a tensor of the wrong shape")
def _(tmp, files):
    from safetensors.torch import load_file

    tensors = load_file(files.tiny / "model.safetensors")
    key = "model.sensor_projector.fc1.weight"
    tensors[key] = tensors[key][:, :3].contiguous()
    folder = checkpoint_with(files, tmp, replace={"model.safetensors": None})
    save_file(tensors, folder / "model.safetensors")
    return (lambda: load_model(folder)), [str(folder), key, "do not match"]


@case("weights: only a pickled pytorch_model.bin", FileNotFoundError)
def _(tmp, files):
    marker = tmp / "ran"
    folder = checkpoint_with(files, tmp, replace={"model.safetensors": None,
                                                  "pytorch_model.bin": pickle.dumps(Payload(marker))})
    return (lambda: load_model(folder)), [str(folder), "pickled weights are not read"]


@case("tokenizer: corrupt tokenizer.json")
def _(tmp, files):
    folder = checkpoint_with(files, tmp, replace={"tokenizer.json": half(files.tiny / "tokenizer.json")})
    return (lambda: read_source(folder)), [str(folder), "tokenizer", "cannot be read"]


@case("gguf: truncated")
def _(tmp, files):
    path = write(tmp / "model.gguf", smollm2_gguf_path().read_bytes()[:1_000_000])
    return (lambda: read_source(path)), [str(path), "could not read as a GGUF model"]


@case("gguf: not a GGUF file")
def _(tmp, files):
    path = write(tmp / "model.gguf", b"garbage")
    return (lambda: read_source(path)), [str(path), "GGUF"]


# --- recordings (chat --input, JSONL inputs, the server's uploads)
for _id, _content, _kwargs, _words in [
    ("csv: not UTF-8", b"acc_x,acc_y\n1,\xff\xfe\n", {}, ["not UTF-8", "byte"]),
    ("csv: missing channels", "acc_x,acc_y,acc_z\n1,2,3\n", {"channel_names": CHANNELS},
     ["missing channel(s)", "gyro_x"]),
    ("csv: a cell that is not a number", "a,b\n1,2\n3,oops\n", {}, ["line 3", "column 'b'", "'oops'"]),
    ("csv: NaN", "a,b\n1,2\n3,nan\n", {}, ["NaN/Inf", "[1]"]),
    ("csv: Inf", "a,b\ninf,2\n", {}, ["NaN/Inf", "[0]"]),
    ("csv: beyond float32", "a,b\n1e39,2\n", {}, ["float32", "[0]"]),
    ("csv: empty file", "", {}, ["empty file"]),
    ("csv: a header and no rows", "a,b\n", {}, ["empty (0 time steps)"]),
    ("csv: no header row", "1,2,3\n4,5,6\n", {}, ["first row holds numbers", "header"]),
    ("csv: a ragged row", "a,b\n1,2\n3\n", {}, ["line 3 has 1 cells", "header has 2"]),
    ("csv: a channel named twice", "acc_x,acc_x\n1,2\n", {"channel_names": ["acc_x"]}, ["more than once", "acc_x"]),
    ("csv: one line of 2 MB without a line break", "a," + "1" * 2_000_000, {}, ["longer than", "characters"]),
    ("csv: longer than max_length", "a\n" + "1\n" * 20, {"max_length": 10}, ["maximum of 10", "line 12"]),
]:
    def _make(tmp, files, content=_content, kwargs=_kwargs, words=_words):
        path = write(tmp / "recording.csv", content)
        return (lambda: read_csv(path, **kwargs)), [str(path), *words]
    API_CASES.append(Case(_id, _make))


@case("csv: a folder")
def _(tmp, files):
    folder = tmp / "walk.csv"
    folder.mkdir()
    return (lambda: read_csv(folder)), [str(folder), "is a folder"]


@case("csv: missing file", FileNotFoundError)
def _(tmp, files):
    return (lambda: read_recording(tmp / "nowhere.csv")), [str(tmp / "nowhere.csv"), "does not exist"]


@case("csv: an upload that is not text")
def _(tmp, files):
    return (lambda: parse_csv_text(b"a,b\n1,2\n", "upload.csv")), ["upload.csv", "expected the CSV as text"]


@case("recording: unsupported file type")
def _(tmp, files):
    path = write(tmp / "recording.txt", "1,2\n")
    return (lambda: read_recording(path)), [str(path), "unsupported file type '.txt'"]


for _id, _array, _words in [
    ("npy: 1-D", np.zeros(5), ["(time, channels)", "(5,)"]),
    ("npy: 3-D", np.zeros((2, 3, 4)), ["(time, channels)", "(2, 3, 4)"]),
    ("npy: no channels", np.zeros((4, 0)), ["no channels"]),
    ("npy: NaN", np.full((3, 2), np.nan), ["NaN/Inf"]),
    ("npy: complex numbers", np.ones((3, 2), dtype=np.complex64), ["real numbers", "complex64"]),
    ("npy: strings", np.array([["a", "b"]]), ["real numbers"]),
    ("npy: beyond float32", np.full((3, 2), 1e300), ["float32"]),
]:
    def _make(tmp, files, array=_array, words=_words):
        path = tmp / "recording.npy"
        np.save(path, array)
        return (lambda: read_npy(path)), [str(path), *words]
    API_CASES.append(Case(_id, _make))


@case("npy: truncated")
def _(tmp, files):
    path = write(tmp / "recording.npy", half(files.recording))
    return (lambda: read_npy(path)), [str(path), "not a plain numeric .npy file"]


@case("npy: an .npz archive named .npy")
def _(tmp, files):
    np.savez(tmp / "archive.npz", a=np.zeros((3, 2)))
    path = tmp / "archive.npz"
    return (lambda: read_npy(path)), [str(path), "expected one array"]


@case("npy: a header claiming a billion steps, refused before its data")
def _(tmp, files):
    header = np.lib.format.header_data_from_array_1_0(np.zeros((1, 6), dtype=np.float32))
    header["shape"] = (1_000_000_000, 6)
    path = tmp / "huge.npy"
    with path.open("wb") as handle:
        np.lib.format.write_array_header_1_0(handle, header)
        handle.write(b"\x00" * 24)
    return (lambda: read_npy(path, max_length=512)), [str(path)]


@case("rates: a rate for a modality without files")
def _(tmp, files):
    config = sensor_config(files)
    return (lambda: read_modality_files(config, {}, {"sensor": 10.0})), ["['sensor']", "no files"]


@case("rates: a rate of zero")
def _(tmp, files):
    config = sensor_config(files)
    return (lambda: read_modality_files(config, {"sensor": [files.recording]}, {"sensor": 0.0})), [
        "sensor", "positive number", "0.0"]


@case("rates: a rate for a modality that declares none")
def _(tmp, files):
    config = sensor_config(files)
    return (lambda: read_modality_files(config, {"sensor": [files.recording]}, {"sensor": 50.0})), [
        "sensor", "does not declare the rate", "input.sample_rate"]


# --- JSONL data (train --data, evaluate --data)
for _id, _content, _words in [
    ("jsonl: a line that is not JSON", '{"messages": [\n', [":1", "not JSON"]),
    ("jsonl: a message without content", '{"messages": [{"role": "user"}]}\n', [":1", "'content'"]),
    ("jsonl: inputs not a list", '{"messages": [{"role": "user", "content": "<sensor>"}], "inputs": {"sensor": "a.npy"}}\n',
     [":1", "'inputs'"]),
    ("jsonl: an unknown modality", '{"messages": [{"role": "user", "content": "x"}], "inputs": {"lidar": ["a.npy"]}}\n',
     [":1", "unknown modality 'lidar'"]),
    ("jsonl: no examples", "\n\n", ["holds no examples"]),
    ("jsonl: not UTF-8", b"\xff\xfe{}", ["not UTF-8"]),
]:
    def _make(tmp, files, content=_content, words=_words):
        path = write(tmp / "data.jsonl", content)
        config = sensor_config(files)
        return (lambda: read_jsonl(path, config)), [str(path), *words]
    API_CASES.append(Case(_id, _make))


@case("jsonl: an item file that is missing", FileNotFoundError)
def _(tmp, files):
    path = write(tmp / "data.jsonl", '{"messages": [{"role": "user", "content": "<sensor>"}], '
                                     '"inputs": {"sensor": ["gone.npy"]}}\n')
    config = sensor_config(files)
    return (lambda: read_jsonl(path, config)), [f"{path}:1", "gone.npy", "does not exist"]


@case("jsonl: a folder")
def _(tmp, files):
    config = sensor_config(files)
    return (lambda: read_jsonl(tmp, config)), [str(tmp), "is a folder"]


# --- a trainer's resume folder (train --resume)
def resume_case(corrupt: Callable[[Path, Path], None]):
    def make(tmp, files):
        import tiny_tokenizer

        output = tmp / "training"
        shutil.copytree(files.last, output / "last")
        corrupt(output / "last", tmp)
        trainer = tiny_trainer(output, tiny_tokenizer.make_tokenizer(), max_steps=2)
        return trainer.train, [str(output / "last")]
    return make


for _id, _corrupt, _words in [
    ("resume: a pickle in optimizer.pt",
     lambda last, tmp: torch.save({"state": Payload(tmp / "ran"), "param_groups": []}, last / "optimizer.pt"),
     ["optimizer.pt", "will not be unpickled"]),
    ("resume: truncated optimizer.pt", lambda last, tmp: write(last / "optimizer.pt", half(last / "optimizer.pt")),
     ["optimizer.pt", "truncated"]),
    ("resume: optimizer.pt of another shape",
     lambda last, tmp: torch.save({"state": {}, "param_groups": [{"params": [0]}]}, last / "optimizer.pt"),
     ["optimiser or schedule state does not fit"]),
    ("resume: truncated state.json", lambda last, tmp: write(last / "state.json", half(last / "state.json")),
     ["state.json", "not valid JSON"]),
    ("resume: state.json without a step",
     lambda last, tmp: write(last / "state.json", json.dumps({**json.loads((last / "state.json").read_text()),
                                                               "step": "one"})),
     ["state.json", "'step' must be an integer"]),
    ("resume: truncated trainable.safetensors",
     lambda last, tmp: write(last / "trainable.safetensors", half(last / "trainable.safetensors")),
     ["trainable.safetensors", "not a readable safetensors file"]),
    ("resume: an incomplete folder", lambda last, tmp: (last / "optimizer.pt").unlink(),
     ["incomplete checkpoint", "optimizer.pt"]),
]:
    def _make(tmp, files, corrupt=_corrupt, words=_words):
        call, where = resume_case(corrupt)(tmp, files)
        return call, [*where, *words]
    API_CASES.append(Case(_id, _make))


@case("train config: epochs as a string")
def _(tmp, files):
    return (lambda: TrainConfig(epochs="3")), ["epochs", "'3'"]


@case("train config: learning rate NaN")
def _(tmp, files):
    return (lambda: TrainConfig(learning_rate=math.nan)), ["learning_rate", "nan"]


# --- run checkpoints (load_model, chat, merge)
@case("run: truncated run.json")
def _(tmp, files):
    folder = tmp / "run"
    shutil.copytree(files.run, folder)
    write(folder / "run.json", half(folder / "run.json"))
    return (lambda: load_model(folder)), [str(folder / "run.json"), "not valid JSON"]


@case("run: truncated trainable.safetensors")
def _(tmp, files):
    folder = tmp / "run"
    shutil.copytree(files.run, folder)
    write(folder / "trainable.safetensors", half(folder / "trainable.safetensors"))
    return (lambda: load_model(folder)), [str(folder / "trainable.safetensors"), "not a readable safetensors"]


@case("modality config in code: fields of the wrong type")
def _(tmp, files):
    return (lambda: ModalityConfig.from_dict("imu", {"encoder": {"model_type": "imu"}, "input": {"kind": "sensor",
                                                                                                "channels": "6"}})), [
        "imu", "input.channels", "'6'"]


@case("omni config in code: flat sensor_config a list")
def _(tmp, files):
    return (lambda: OmniConfig(sensor_config=[6])), ["sensor_config", "[6]"]


@pytest.mark.parametrize("bad", API_CASES, ids=[c.id for c in API_CASES])
def test_api_raises_a_documented_error_naming_what_is_wrong(bad: Case, files, tmp_path):
    call, words = bad.make(tmp_path, files)
    with pytest.raises(Exception) as raised:
        call()
    error = raised.value
    assert type(error) is bad.error or (bad.error is ValueError and type(error) is ValueError), (
        f"{type(error).__name__}: {error}")
    message = str(error)
    for word in words:
        assert word in message, f"{word!r} not in {message!r}"
    assert not (tmp_path / "ran").exists()  # no pickle payload ran


def test_the_processor_names_the_modality_and_item_of_a_wrong_channel_count(files, processor):
    recording = np.zeros((10, 3), dtype=np.float32)
    with pytest.raises(ValueError, match=r"sensor: item 0 expected 6 channels, got 3 \(shape \(10, 3\)"):
        processor("<sensor> what?", {"sensor": [recording]})


def test_a_million_row_csv_is_refused_after_reading_max_length_rows(tmp_path):
    path = one_million_rows(tmp_path)
    tracemalloc.start()
    try:
        with pytest.raises(ValueError, match=rf"{path}: longer than the maximum of 512 time steps \(line 514\)"):
            read_csv(path, CHANNELS, max_length=512)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # 512 rows of 6 floats and one line buffer; reading the 24 MB file whole would take hundreds of MB.
    assert peak < 4 * 2 ** 20, peak


def test_a_pickled_npy_is_refused_and_its_payload_never_runs(tmp_path):
    path = tmp_path / "payload.npy"
    np.save(path, np.array([Payload(tmp_path / "ran")], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match=f"{path}: not a plain numeric .npy file"):
        read_npy(path)
    with pytest.raises(ValueError, match=f"{path}: not a plain numeric .npy file"):
        read_recording(path)
    assert not (tmp_path / "ran").exists()
    # And with the pickle's own bytes as the file: still refused, still not run.
    write(path, pickle.dumps(Payload(tmp_path / "ran")))
    with pytest.raises(ValueError, match="not a plain numeric .npy file"):
        read_npy(path)
    assert not (tmp_path / "ran").exists()


# ---------------------------------------------------------------------------------------- the CLI
@dataclass
class CliCase:
    """``make(tmp, files)`` -> (argv, substrings of the one error line).

    ``needs``: the fix (in a module this catalogue's author does not own) without which the case fails;
    the case is then a strict xfail, which turns into a failure the day the fix lands, as a reminder to
    drop the mark.
    """

    id: str
    make: Callable[[Path, Files], tuple[list[str], list[str]]]
    needs: str | None = None


CLI_CASES: list[CliCase] = []


def cli_case(id: str, needs: str | None = None):
    def register(make):
        CLI_CASES.append(CliCase(id, make, needs))
        return make
    return register


for _id, _args, _words in [
    ("chat --rate 0", ["--input", "sensor={rec}", "--rate", "0"], ["--rate", "positive", "'0'"]),
    ("chat --rate -5", ["--input", "sensor={rec}", "--rate", "-5"], ["--rate", "positive", "'-5'"]),
    ("chat --rate nan", ["--input", "sensor={rec}", "--rate", "nan"], ["--rate", "positive", "'nan'"]),
    ("chat --rate inf", ["--input", "sensor={rec}", "--rate", "inf"], ["--rate", "positive", "'inf'"]),
    ("chat --rate without input files", ["--rate", "50"], ["--rate 50", "no input files"]),
    ("chat --rate =50", ["--input", "sensor={rec}", "--rate", "=50"], ["--rate takes HZ or NAME=HZ"]),
    ("chat --input without NAME=", ["--input", "{rec}"], ["--input takes NAME=FILE"]),
    ("chat --max-new-tokens 0", ["--max-new-tokens", "0"], ["--max-new-tokens", ">= 1", "0"]),
    ("chat --temperature -1", ["--temperature", "-1"], ["--temperature", ">= 0", "-1.0"]),
    ("chat --max-new-tokens abc", ["--max-new-tokens", "abc"], ["--max-new-tokens", "invalid int value: 'abc'"]),
]:
    def _make(tmp, files, args=_args, words=_words):
        return ["chat", str(files.tiny), *[a.format(rec=files.recording) for a in args], "what?"], words
    CLI_CASES.append(CliCase(_id, _make))


@cli_case("chat: a checkpoint that does not exist")
def _(tmp, files):
    return ["chat", str(tmp / "nowhere"), "hi"], [str(tmp / "nowhere"), "does not exist"]


@cli_case("chat: a truncated config.json")
def _(tmp, files):
    folder = checkpoint_with(files, tmp, replace={"config.json": half(files.tiny / "config.json")})
    return ["chat", str(folder), "hi"], [str(folder / "config.json"), "not valid JSON"]


@cli_case("chat: an encoder setting as a string in config.json")
def _(tmp, files):
    folder = checkpoint_with(files, tmp, lambda c: c["modalities"]["audio"]["encoder"].update(d_model="32"))
    return ["chat", str(folder), "hi"], [str(folder / "config.json"), "audio", "d_model"]


@cli_case("chat: a truncated model.safetensors")
def _(tmp, files):
    folder = checkpoint_with(files, tmp, replace={"model.safetensors": half(files.tiny / "model.safetensors")})
    return ["chat", str(folder), "hi"], [str(folder / "model.safetensors"), "truncated"]


@cli_case("chat: a CSV that is not UTF-8")
def _(tmp, files):
    path = write(tmp / "walk.csv", b"a,b\n1,\xe9\n")
    return ["chat", str(files.tiny), "--input", f"sensor={path}", "hi"], [str(path), "not UTF-8"]


@cli_case("chat: a CSV of a million rows (refused at row 513)")
def _(tmp, files):
    path = one_million_rows(tmp)
    return ["chat", str(files.tiny), "--input", f"sensor={path}", "hi"], [str(path), "maximum of 512", "line 514"]


@cli_case("chat: a recording with 3 channels for a 6-channel modality")
def _(tmp, files):
    path = tmp / "three.npy"
    np.save(path, np.zeros((10, 3), dtype=np.float32))
    return ["chat", str(files.tiny), "--input", f"sensor={path}", "hi"], ["sensor", "expected 6 channels, got 3"]


@cli_case("chat: a pickled .npy")
def _(tmp, files):
    path = tmp / "payload.npy"
    np.save(path, np.array([Payload(tmp / "ran")], dtype=object), allow_pickle=True)
    return ["chat", str(files.tiny), "--input", f"sensor={path}", "hi"], [str(path), "not a plain numeric .npy"]


@cli_case("chat: a recording that is a folder")
def _(tmp, files):
    return ["chat", str(files.tiny), "--input", f"sensor={tmp}", "hi"], [str(tmp), "is not a file"]


@cli_case("chat: a rate for a modality without a declared rate")
def _(tmp, files):
    return ["chat", str(files.tiny), "--input", f"sensor={files.recording}", "--rate", "50", "hi"], [
        "sensor", "does not declare the rate"]


@cli_case("extend: a modality file with a string setting")
def _(tmp, files):
    path = modality_file(tmp, imu_file(encoder__in_channels="12"))
    return ["extend", str(files.tiny), "--modality", str(path), "--output", str(tmp / "out")], [
        str(path), "in_channels", "'12'"]


@cli_case("extend: a modality file disagreeing with its encoder")
def _(tmp, files):
    path = modality_file(tmp, imu_file(input__channels=6))
    return ["extend", str(files.tiny), "--modality", str(path), "--output", str(tmp / "out")], [
        str(path), "input.channels is 6"]


@cli_case("extend: --output is a file")
def _(tmp, files):
    path = write(tmp / "file", "x")
    return ["extend", str(files.tiny), "--add-imu", "imu", "--output", str(path)], [str(path), "not a folder"]


@cli_case("extend: --output under a file")
def _(tmp, files):
    path = write(tmp / "file", "x")
    return ["extend", str(files.tiny), "--add-imu", "imu", "--output", str(path / "out")], [
        str(path / "out"), "a file stands where a folder"]


@cli_case("extend: nothing to add")
def _(tmp, files):
    return ["extend", str(files.tiny), "--output", str(tmp / "out")], ["nothing to add"]


@cli_case("extend: a modality name that is taken")
def _(tmp, files):
    return ["extend", str(files.tiny), "--add-imu", "sensor", "--output", str(tmp / "out")], [
        "'sensor' already exists"]


for _id, _args, _words in [
    ("train --epochs 0", ["--epochs", "0"], ["--epochs", ">= 1", "0"]),
    ("train --batch-size -1", ["--batch-size", "-1"], ["--batch-size", ">= 1"]),
    ("train --lr 0", ["--lr", "0"], ["--lr", "> 0"]),
    ("train --lr nan", ["--lr", "nan"], ["--lr", "nan"]),
    ("train --warmup-steps -1", ["--warmup-steps", "-1"], ["--warmup-steps", ">= 0"]),
]:
    def _make(tmp, files, args=_args, words=_words):
        data = write(tmp / "data.jsonl", '{"messages": [{"role": "user", "content": "x"}]}\n')
        return ["train", "--llm", str(files.tiny), "--data", str(data), "--output", str(tmp / "run"), *args], words
    CLI_CASES.append(CliCase(_id, _make))


@cli_case("train: --output is a file")
def _(tmp, files):
    path = write(tmp / "file", "x")
    return ["train", "--llm", str(files.tiny), "--output", str(path)], [str(path), "not a folder"]


@cli_case("train: --data does not exist")
def _(tmp, files):
    return ["train", "--llm", str(files.tiny), "--data", str(tmp / "none.jsonl"), "--output", str(tmp / "run")], [
        str(tmp / "none.jsonl"), "does not exist"]


@cli_case("train: --modality-file truncated")
def _(tmp, files):
    path = modality_file(tmp, None, b'{"name": "vowel", "enc')
    return ["train", "--llm", str(files.tiny), "--modality-file", str(path), "--output", str(tmp / "run")], [
        str(path), "not valid JSON"]


@cli_case("demo --epochs 0 (was silently replaced by the default)")
def _(tmp, files):
    return ["demo", "--epochs", "0", "--output", str(tmp / "demo")], ["--epochs", ">= 1"]


@cli_case("evaluate: data that is not UTF-8")
def _(tmp, files):
    path = write(tmp / "eval.jsonl", b"\xff\xfe")
    return ["evaluate", str(files.tiny), "--data", str(path)], [str(path), "not UTF-8"]


@cli_case("evaluate --batch-size 0")
def _(tmp, files):
    return ["evaluate", str(files.tiny), "--data", "x.jsonl", "--batch-size", "0"], ["--batch-size", ">= 1"]


@cli_case("merge: not a run")
def _(tmp, files):
    return ["merge", str(tmp / "nowhere"), "--output", str(tmp / "merged")], [str(tmp / "nowhere")]


@cli_case("estimate --batch 0")
def _(tmp, files):
    return ["estimate", "tiny-hcx-omni", "--batch", "0"], ["--batch", ">= 1"]


@cli_case("plan: a budget that is not a size")
def _(tmp, files):
    return ["plan", "tiny-hcx-omni", "--budget", "cpu=lots"], ["cpu", "'lots'"]


@cli_case("an unknown command")
def _(tmp, files):
    return ["fly"], ["invalid choice: 'fly'"]


@cli_case("an unknown option")
def _(tmp, files):
    return ["info", "tiny-hcx-omni", "--colour"], ["unrecognized arguments: --colour"]


@cli_case("chat: a run.json whose base paths are numbers")
def _(tmp, files):
    folder = tmp / "run"
    shutil.copytree(files.run, folder)
    record = json.loads((folder / "run.json").read_text())
    record["base"].update(relative=5, absolute=["x"])
    write(folder / "run.json", json.dumps(record))
    return ["chat", str(folder), "hi"], [str(folder / "run.json"), "base"]


@cli_case("info: an encoder setting as a string in config.json")
def _(tmp, files):
    folder = checkpoint_with(files, tmp, lambda c: c["modalities"]["sensor"]["encoder"].update(hidden_size="32"))
    return ["info", str(folder)], [str(folder / "config.json"), "hidden_size"]


@cli_case("estimate: an LLM width as a string in config.json")
def _(tmp, files):
    folder = checkpoint_with(files, tmp, lambda c: c["text_config"].update(hidden_size="64"))
    return ["estimate", str(folder)], [str(folder / "config.json"), "hidden_size"]


@pytest.mark.parametrize("bad", [
    pytest.param(c, id=c.id, marks=[pytest.mark.xfail(strict=True, reason=f"needs {c.needs}")] if c.needs else [])
    for c in CLI_CASES])
def test_cli_prints_one_error_line_and_exits_2(bad: CliCase, files, tmp_path, capsys):
    argv, words = bad.make(tmp_path, files)
    assert main(argv) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err and "unexpected error" not in err, err
    for word in words:
        assert word in lines[0], f"{word!r} not in {lines[0]!r}"
    assert not (tmp_path / "ran").exists()


def test_cli_debug_shows_the_traceback_and_still_ends_with_the_error_line(files, tmp_path, capsys):
    assert main(["--debug", "chat", str(tmp_path / "nowhere"), "hi"]) == 2
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err
    assert err.strip().splitlines()[-1] == f"error: {tmp_path / 'nowhere'} does not exist"


def test_help_still_exits_0(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["chat", "--help"])
    assert exit_info.value.code == 0
    assert "--rate" in capsys.readouterr().out
