"""`hcx-extend serve`: the official openai client (plain and streaming) against real server processes.

The servers serve a tiny checkpoint built here: a 2-layer Llama over the byte-level test tokenizer
whose output layer can only score lowercase letters and space (so answers are readable text and never
end early: every answer runs to max_tokens unless a stop string cuts it), extended with a small
``imu`` modality (6 channels, 10 Hz, at most 64 steps, 4 steps per token). Expected answers come from
`hcx_extend.inference.answer` run in this process on the same checkpoint, so each test checks that the
server asks the model exactly what the library would.

The page at ``/`` is tested in a real headless Chromium (Debian's chromium + chromium-driver, driven by
selenium): it uploads a CSV, checks the channels are plotted, asks, waits for the streamed answer (the
API's own answer to the same request) and saves a screenshot to benchmarks/results/serve_page.png.
Without chromium that test is skipped, except in CI (``CI`` set), where it fails: .ci/run installs it.
"""

from __future__ import annotations

import base64
import http.client
import io
import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from tiny_tokenizer import make_tokenizer  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from hcx_extend.checkpoint import extend  # noqa: E402
from hcx_extend.data.sensors import parse_csv_text, parse_npy_bytes, resample  # noqa: E402
from hcx_extend.inference import GenerationSettings, answer  # noqa: E402
from hcx_extend.presets import imu_modality  # noqa: E402
from hcx_extend.processor import OmniProcessor  # noqa: E402
from hcx_extend.runs import load_model  # noqa: E402
from hcx_extend.serve.batching import BatchWorker, Failed, Finished, Job, QueueFull, Started, WorkerClosed  # noqa: E402
from hcx_extend.serve.content import Prompt, read_messages  # noqa: E402
from hcx_extend.serve.protocol import parse_request  # noqa: E402
from hcx_extend.serve.streaming import StopHoldback  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

KEY = "sk-test-key"
MODEL = "tiny-imu"
CHANNELS = ["acc_x", "acc_y", "acc_z", "gyro_x", "gyro_y", "gyro_z"]
LONG = 1500  # tokens that keep the worker busy for a second or more while a test arranges the queue
QUESTION = "What is this?"
SCREENSHOT = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "serve_page.png"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--window-size=1280,820"]


# ---------------------------------------------------------------------------------------- helpers
def build_tiny_checkpoint(folder: Path) -> Path:
    """A tiny causal LM + the test tokenizer, extended with a small imu modality; returns the checkpoint folder."""
    tokenizer = make_tokenizer()
    torch.manual_seed(0)
    llm = LlamaForCausalLM(LlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
                                       max_position_embeddings=2048))
    allowed = [tokenizer(c, add_special_tokens=False)["input_ids"][0] for c in "abcdefghijklmnopqrstuvwxyz "]
    silenced = torch.ones(300, dtype=torch.bool)
    silenced[allowed] = False
    with torch.no_grad():
        llm.lm_head.weight[silenced] = 0  # every other token (end of turn included) scores 0, below the best letter
    llm.save_pretrained(folder / "llm")
    tokenizer.save_pretrained(folder / "llm")
    modality = imu_modality("imu", max_length=64, hidden_size=16, num_layers=1, num_heads=2, ffn_size=32, output_size=24)
    extend(folder / "llm", [modality], output_dir=folder / "checkpoint")
    return folder / "checkpoint"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class Server:
    """``hcx-extend serve CHECKPOINT ...`` in a subprocess on a free loopback port."""

    def __init__(self, checkpoint: Path, log: Path, *options: str):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log
        command = [sys.executable, "-m", "hcx_extend.cli", "serve", str(checkpoint), "--port", str(self.port),
                   "--model-name", MODEL, "--threads", "1", "--log-level", "warning", *options]
        with log.open("w") as output:
            self.process = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"the server exited with {self.process.returncode}:\n{self.log()}")
            try:
                if get(self.url, "/health")[0] == 200:
                    return
            except OSError:
                time.sleep(0.2)
        self.stop()
        raise AssertionError(f"the server did not answer /health within 120 s:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text()

    def health(self) -> dict:
        return get(self.url, "/health")[1]

    def client(self, key: str | None = KEY, **options) -> openai.OpenAI:
        return openai.OpenAI(api_key=key or "none", base_url=f"{self.url}/v1", max_retries=0, **options)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def request(url: str, method: str, path: str, body: bytes | None = None, key: str | None = None,
            headers: dict | None = None) -> tuple[int, bytes, dict]:
    """One raw HTTP request: (status, body bytes, headers)."""
    host, port = url.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=60)
    sent = {"Content-Type": "application/json", **(headers or {})}
    if key:
        sent["Authorization"] = f"Bearer {key}"
    connection.request(method, path, body=body, headers=sent)
    response = connection.getresponse()
    data = response.read()
    connection.close()
    return response.status, data, dict(response.getheaders())


def get(url: str, path: str, key: str | None = None) -> tuple[int, dict]:
    status, data, _ = request(url, "GET", path, key=key)
    return status, json.loads(data)


def post(url: str, body: dict | bytes, key: str | None = KEY) -> tuple[int, dict | bytes]:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    status, data, headers = request(url, "POST", "/v1/chat/completions", raw, key)
    return status, (json.loads(data) if headers.get("content-type", "").startswith("application/json") else data)


def recording(steps: int, seed: int) -> np.ndarray:
    """A (steps, 6) recording with 3 decimals (so CSV text and JSON numbers read back to the same floats)."""
    return np.random.default_rng(seed).normal(size=(steps, 6)).round(3)


def sensor_part(values: np.ndarray | None = None, **fields) -> dict:
    part = {"modality": "imu", **fields}
    if values is not None:
        part["data"] = np.asarray(values).tolist()
    return {"type": "input_sensor", "input_sensor": part}


def text_part(text: str) -> dict:
    return {"type": "text", "text": text}


def user(*parts: dict) -> list[dict]:
    return [{"role": "user", "content": list(parts)}]


def csv_base64(values: np.ndarray, names=CHANNELS) -> str:
    lines = [",".join(names)] + [",".join(f"{v:.3f}" for v in row) for row in values]
    return base64.b64encode("\n".join(lines).encode()).decode()


def npy_base64(values: np.ndarray) -> str:
    buffer = io.BytesIO()
    np.save(buffer, np.asarray(values, dtype=np.float64))
    return base64.b64encode(buffer.getvalue()).decode()


def wait_until(condition, what: str, timeout: float = 30.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.01)
    raise AssertionError(f"timed out waiting for {what}")


# ---------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return build_tiny_checkpoint(tmp_path_factory.mktemp("serve"))


@pytest.fixture(scope="module")
def server(checkpoint, tmp_path_factory):
    server = Server(checkpoint, tmp_path_factory.mktemp("logs") / "server.log", "--api-key", KEY, "--max-queue", "4",
                    "--max-batch-size", "8", "--max-body-bytes", "65536", "--max-tokens-limit", "1600",
                    "--default-max-tokens", "16")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def client(server):
    return server.client()


@pytest.fixture(scope="module")
def library(checkpoint):
    """The same checkpoint in this process: `expect` gives the answer the library gives."""
    model, tokenizer = load_model(checkpoint)
    processor = OmniProcessor(tokenizer, model.config)

    def expect(contents: list[str] | str, recordings: list[np.ndarray], max_tokens: int, stop=()) -> list:
        contents = [contents] if isinstance(contents, str) else contents
        chats = [[{"role": "user", "content": text}] for text in contents]
        items = {"imu": [np.asarray(r, dtype=np.float32) for r in recordings]} if recordings else {}
        return answer(model, processor, chats, items, GenerationSettings(max_new_tokens=max_tokens, stop=tuple(stop)))

    return SimpleNamespace(model=model, processor=processor, expect=expect)


def stream_text(stream) -> tuple[str, list]:
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    return text, chunks


# ---------------------------------------------------------------------------------------- answers
def test_models_lists_the_served_model_and_its_sensor_modality(client):
    models = client.models.list().data
    assert [m.id for m in models] == [MODEL]
    imu = models[0].model_extra["modalities"]["imu"]
    assert imu == {"kind": "sensor", "marker": "<imu>", "channels": 6, "channel_names": CHANNELS, "sample_rate": 10.0,
                   "max_length": 64}


def test_a_plain_completion_is_the_librarys_answer_with_usage_counts(client, library):
    values = recording(20, seed=1)
    response = client.chat.completions.create(model=MODEL, messages=user(sensor_part(values), text_part(QUESTION)),
                                              max_tokens=12)
    expected = library.expect(f"<imu> {QUESTION}", [values], 12)[0]
    assert response.object == "chat.completion" and response.id.startswith("chatcmpl-") and response.model == MODEL
    choice = response.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content == expected.text and len(expected.text) > 5
    assert choice.finish_reason == "length"
    # ChatML, one token per byte: <|im_start|> user\n [5 imu tokens: 20 steps / 4] " What is this?" <|im_end|> \n
    # <|im_start|> assistant\n
    prompt_tokens = 3 + len("user\n") + math.ceil(20 / 4) + len(" " + QUESTION) + len("\n") + len("assistant\n")
    assert (response.usage.prompt_tokens, response.usage.completion_tokens) == (prompt_tokens, 12)
    assert response.usage.total_tokens == prompt_tokens + 12


def test_max_completion_tokens_and_the_servers_default_length(client):
    messages = user(text_part(QUESTION))
    assert client.chat.completions.create(model=MODEL, messages=messages, max_completion_tokens=3).usage.completion_tokens == 3
    assert client.chat.completions.create(model=MODEL, messages=messages).usage.completion_tokens == 16  # --default-max-tokens


def test_streamed_chunks_join_to_the_plain_answer(client):
    messages = user(sensor_part(recording(20, seed=2)), text_part(QUESTION))
    plain = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=10)
    text, chunks = stream_text(client.chat.completions.create(model=MODEL, messages=messages, max_tokens=10, stream=True))
    assert text == plain.choices[0].message.content
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant" and chunks[0].choices[0].delta.content == ""
    assert [c.choices[0].finish_reason for c in chunks] == [None] * (len(chunks) - 1) + ["length"]
    assert all(c.usage is None for c in chunks)
    assert len(chunks) >= 4  # role, several pieces of text, finish: the answer came in pieces


def test_the_example_client_streams_the_answer_the_library_gives(server, library, tmp_path):
    """examples/openai_client.py, run as the README shows it, against the server."""
    values = recording(30, seed=11)
    csv = tmp_path / "walking.csv"
    csv.write_text(base64.b64decode(csv_base64(values)).decode() + "\n")
    example = Path(__file__).resolve().parents[1] / "examples" / "openai_client.py"
    printed = subprocess.run([sys.executable, str(example), str(csv), "--url", f"{server.url}/v1", "--api-key", KEY,
                              "--question", QUESTION], capture_output=True, text=True, timeout=120, check=True).stdout
    expected = library.expect(f"<imu> {QUESTION}", [values], max_tokens=8)[0].text
    assert expected and printed.strip() == expected


def test_the_stream_is_sent_as_openai_sends_it_with_a_final_usage_chunk(server):
    body = {"model": MODEL, "messages": user(sensor_part(recording(20, seed=2)), text_part(QUESTION)), "max_tokens": 10,
            "stream": True, "stream_options": {"include_usage": True}}
    status, data, headers = request(server.url, "POST", "/v1/chat/completions", json.dumps(body).encode(), KEY)
    assert status == 200 and headers["content-type"].startswith("text/event-stream")
    text = data.decode()
    assert text.startswith("data: {") and text.endswith("\n\ndata: [DONE]\n\n")
    events = text.split("\n\n")[:-1]
    assert all(e.startswith("data: ") and "\n" not in e for e in events)
    chunks = [json.loads(e.removeprefix("data: ")) for e in events[:-1]]
    assert all(c["usage"] is None for c in chunks[:-1])
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == {"prompt_tokens": 38, "completion_tokens": 10,
                                                                   "total_tokens": 48}
    assert chunks[-2]["choices"][0] == {"index": 0, "delta": {}, "finish_reason": "length", "logprobs": None}


def test_stop_strings_cut_plain_and_streamed_answers_alike(client, library):
    values = recording(20, seed=3)
    messages = user(sensor_part(values), text_part(QUESTION))
    full = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=20).choices[0].message.content
    stop = next(full[i:i + 2] for i in range(3, len(full) - 2) if full.index(full[i:i + 2]) == i and " " not in full[i:i + 2])
    expected = full[:full.index(stop)].strip()
    assert library.expect(f"<imu> {QUESTION}", [values], 20, stop=[stop])[0].text == expected

    plain = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=20, stop=stop)
    assert plain.choices[0].message.content == expected
    assert plain.choices[0].finish_reason == "stop"
    assert plain.usage.completion_tokens < 20
    text, chunks = stream_text(client.chat.completions.create(model=MODEL, messages=messages, max_tokens=20,
                                                              stop=["zzzz", stop], stream=True))
    assert text == expected
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_a_sensor_parts_place_in_the_text_is_where_the_model_sees_it(client, library):
    values = recording(20, seed=4)
    placements = {
        f"<imu> {QUESTION}": [sensor_part(values), text_part(QUESTION)],
        f"{QUESTION} <imu>": [text_part(QUESTION), sensor_part(values)],
        "Before <imu> after?": [text_part("Before"), sensor_part(values), text_part("after?")],
    }
    answers = {}
    for chat_text, parts in placements.items():
        answers[chat_text] = client.chat.completions.create(model=MODEL, messages=user(*parts), max_tokens=12)
        assert answers[chat_text].choices[0].message.content == library.expect(chat_text, [values], 12)[0].text
    first, second, _ = [a.choices[0].message.content for a in answers.values()]
    assert first != second  # same tokens, another order: another answer


def test_csv_and_npy_uploads_read_as_the_inline_array(client):
    values = recording(20, seed=5)

    def ask(part):
        return client.chat.completions.create(model=MODEL, messages=user(part, text_part(QUESTION)),
                                              max_tokens=12).choices[0].message.content

    inline = ask(sensor_part(values))
    assert ask(sensor_part(format="csv", data=csv_base64(values))) == inline
    assert ask(sensor_part(format="npy", data=npy_base64(values))) == inline
    # A CSV's columns are found by name: extra and reordered columns change nothing.
    shuffled = np.concatenate([values[:, ::-1], np.zeros((20, 1))], axis=1)
    assert ask(sensor_part(format="csv", data=csv_base64(shuffled, CHANNELS[::-1] + ["temperature"]))) == inline


def test_sample_rate_resamples_to_the_modalitys_rate(client, library):
    at_20_hz = recording(40, seed=6)
    response = client.chat.completions.create(
        model=MODEL, messages=user(sensor_part(at_20_hz, sample_rate=20), text_part(QUESTION)), max_tokens=12)
    at_10_hz = resample(at_20_hz, 20, 10)
    assert at_10_hz.shape == (20, 6)
    assert response.choices[0].message.content == library.expect(f"<imu> {QUESTION}", [at_10_hz], 12)[0].text
    assert response.usage.prompt_tokens == 38  # 20 steps after resampling: 5 imu tokens, as in the plain test


def test_seeded_sampling_repeats_and_differs_from_greedy(client):
    messages = user(sensor_part(recording(20, seed=7)), text_part(QUESTION))

    def ask(**settings):
        return client.chat.completions.create(model=MODEL, messages=messages, max_tokens=16, **settings).choices[0].message.content

    sampled = ask(temperature=1.0, top_p=0.9, seed=7)
    assert sampled == ask(temperature=1.0, top_p=0.9, seed=7)
    assert sampled != ask()


# ---------------------------------------------------------------------------------------- errors
def bad_sensor_cases(processor):
    """(name, input_sensor part, the library's ValueError message for it)."""
    def library_error(function, *args, **kwargs) -> str:
        with pytest.raises(ValueError) as raised:
            function(*args, **kwargs)
        return str(raised.value)

    source = "messages[0].content[0].input_sensor.data"
    three_channels = recording(20, 0)[:, :3]
    too_long = recording(65, 0)
    nan_csv = "\n".join([",".join(CHANNELS), *[",".join(["1.0"] * 6)] * 3, "1.0,nan,1.0,1.0,1.0,1.0"])
    text_csv = "\n".join([",".join(CHANNELS), "1.0,2.0,walking,1.0,1.0,1.0"])
    missing_csv = "\n".join(["acc_x,acc_y", "1,2"])
    garbage_npy = b"\x93NUMPY this is no array"
    return [
        ("wrong channels", sensor_part(three_channels),
         library_error(processor.placeholder_counts, "imu", [three_channels.astype(np.float32)])),
        ("too long", sensor_part(too_long),
         f"{source}: 65 time steps, more than the maximum of 64; split it into windows "
         "(hcx_extend.data.sensors.window) or raise the modality's input.max_length"),
        ("too long csv", sensor_part(format="csv", data=csv_base64(too_long)),
         library_error(parse_csv_text, base64.b64decode(csv_base64(too_long)).decode(), f"{source} (csv)", CHANNELS, 64)),
        ("NaN in a CSV", sensor_part(format="csv", data=base64.b64encode(nan_csv.encode()).decode()),
         library_error(parse_csv_text, nan_csv, f"{source} (csv)", CHANNELS, 64)),
        ("text in a CSV", sensor_part(format="csv", data=base64.b64encode(text_csv.encode()).decode()),
         library_error(parse_csv_text, text_csv, f"{source} (csv)", CHANNELS, 64)),
        ("missing CSV column", sensor_part(format="csv", data=base64.b64encode(missing_csv.encode()).decode()),
         library_error(parse_csv_text, missing_csv, f"{source} (csv)", CHANNELS, 64)),
        ("malformed NPY", sensor_part(format="npy", data=base64.b64encode(garbage_npy).decode()),
         library_error(parse_npy_bytes, garbage_npy, f"{source} (npy)", 64)),
        ("malformed base64", sensor_part(format="csv", data="not base64!"),
         f"{source}: not valid base64 (Only base64 data is allowed); with format 'csv', data is the file's bytes in "
         "standard base64"),
        ("NaN inline", sensor_part(np.where(np.arange(120).reshape(20, 6) == 7, np.nan, 1.0)),
         library_error(processor.placeholder_counts, "imu", [np.where(np.arange(120).reshape(20, 6) == 7, np.nan,
                                                                       1.0).astype(np.float32)])),
        ("ragged rows", {"type": "input_sensor", "input_sensor": {"modality": "imu", "data": [[1, 2, 3, 4, 5, 6], [1]]}},
         None),
    ]


def test_bad_sensor_data_is_a_400_carrying_the_librarys_own_message(server, library):
    for name, part, message in bad_sensor_cases(library.processor):
        status, body = post(server.url, {"model": MODEL, "messages": user(part, text_part(QUESTION))})
        assert status == 400, name
        error = body["error"]
        assert error["type"] == "invalid_request_error" and error["code"] == "invalid_sensor_data", name
        assert error["param"] == "messages[0].content[0].input_sensor.data", name
        if message is not None:
            assert error["message"] == message, name
        else:
            assert error["message"].startswith(f"{error['param']}: expected a (time, channels) array of numbers")


def test_an_unknown_modality_is_a_400_naming_the_known_ones(client):
    with pytest.raises(openai.BadRequestError) as raised:
        client.chat.completions.create(model=MODEL, messages=user({"type": "input_sensor", "input_sensor": {
            "modality": "ppg", "data": [[1.0]]}}, text_part(QUESTION)))
    assert raised.value.status_code == 400
    assert raised.value.body == {"message": "unknown modality 'ppg'; this model has ['imu']",
                                 "type": "invalid_request_error",
                                 "param": "messages[0].content[0].input_sensor.modality", "code": "unknown_modality"}


def test_requests_cannot_name_server_files_or_smuggle_markers(server):
    status, body = post(server.url, {"model": MODEL, "messages": user(
        {"type": "input_sensor", "input_sensor": {"modality": "imu", "path": "/etc/passwd", "data": [[0] * 6]}})})
    assert status == 400
    assert body["error"]["param"] == "messages[0].content[0].input_sensor.path"
    assert "unknown field 'path'" in body["error"]["message"] and "reads no files" in body["error"]["message"]

    status, body = post(server.url, {"model": MODEL, "messages": [{"role": "user", "content": "<imu> what?"}]})
    assert status == 400 and body["error"]["param"] == "messages[0].content[0].text"
    assert "'<imu>', the imu marker" in body["error"]["message"]


@pytest.mark.parametrize("body, param, message", [
    ({"model": MODEL}, "messages", "messages: Field required"),
    ({"model": MODEL, "messages": user(text_part("hi")), "temperature": 3}, "temperature",
     "temperature: Input should be less than or equal to 2"),
    ({"model": MODEL, "messages": user(text_part("hi")), "n": 2}, "n", "n: Input should be 1"),
    ({"model": MODEL, "messages": user({"type": "image_url", "image_url": {"url": "x"}})}, "messages[0].content[0]",
     "messages[0].content[0]: Input tag 'image_url' found using 'type' does not match any of the expected tags: "
     "'text', 'input_sensor'"),
    ({"model": MODEL, "messages": user(text_part("hi")), "tools": []}, "tools",
     "unsupported field 'tools'; this server supports max_completion_tokens, max_tokens, messages, model, n, seed, stop, "
     "stream, stream_options, temperature, top_p"),
    ({"model": MODEL, "messages": user(text_part("hi")), "max_tokens": 1601}, "max_tokens",
     "max_tokens is 1601, more than this server's limit of 1600 tokens; ask for fewer (the limit is hcx-extend serve "
     "--max-tokens-limit)"),
    (b'{"model": "tiny-imu", "messages": [', None, "the body is not valid JSON (EOF while parsing a list at line 1 column 35)"),
])
def test_validation_problems_are_400_in_openai_shape(server, body, param, message):
    status, answer_body = post(server.url, body)
    assert status == 400
    assert answer_body["error"]["type"] == "invalid_request_error"
    assert answer_body["error"]["param"] == param
    assert answer_body["error"]["message"] == message


def test_without_the_key_v1_is_401_and_health_and_page_stay_open(server):
    with pytest.raises(openai.AuthenticationError) as raised:
        server.client(key="sk-wrong").chat.completions.create(model=MODEL, messages=user(text_part("hi")))
    assert raised.value.status_code == 401 and raised.value.code == "invalid_api_key"
    for method, path in (("GET", "/v1/models"), ("POST", "/v1/chat/completions")):
        status, data, _ = request(server.url, method, path, b"{}")
        assert status == 401
        assert json.loads(data)["error"]["type"] == "authentication_error"
    assert request(server.url, "GET", "/health")[0] == 200
    status, page, headers = request(server.url, "GET", "/")
    assert status == 200 and headers["content-type"].startswith("text/html") and b'id="answer"' in page


def test_unknown_routes_and_models_are_404(server, client):
    status, body = get(server.url, "/v1/embeddings", key=KEY)
    assert status == 404
    assert body["error"]["code"] == "not_found" and body["error"]["message"].startswith("unknown route GET /v1/embeddings")
    with pytest.raises(openai.NotFoundError) as raised:
        client.chat.completions.create(model="gpt-4o", messages=user(text_part("hi")))
    assert raised.value.code == "model_not_found" and raised.value.param == "model"


def test_a_body_over_the_limit_is_413(server):
    big = {"model": MODEL, "messages": user(text_part("x" * 70_000))}
    status, body = post(server.url, big)
    assert status == 413
    assert body["error"]["code"] == "request_too_large" and "65,536 bytes" in body["error"]["message"]


# ---------------------------------------------------------------------------------------- batching and the queue
@pytest.fixture(scope="module")
def busy_worker(server, client):
    """A long request occupies the worker; four requests wait behind it (the queue holds 4), a fifth is refused.

    Returns the four answers, the refusal, /health before, while busy, and after.
    """
    before = server.health()
    long_answer = {}

    def occupy():
        stream = client.chat.completions.create(model=MODEL, messages=user(text_part("keep busy")), max_tokens=LONG,
                                                stream=True)
        long_answer["text"], long_answer["chunks"] = stream_text(stream)

    occupier = threading.Thread(target=occupy)
    occupier.start()
    wait_until(lambda: server.health()["in_flight"] == 1, "the long request to start")
    recordings = [recording(20, seed=10 + i) for i in range(4)]
    with ThreadPoolExecutor(4) as pool:
        waiting = [pool.submit(client.chat.completions.create, model=MODEL, max_tokens=8,
                               messages=user(sensor_part(r), text_part(QUESTION))) for r in recordings]
        busy = wait_until(lambda: (h := server.health())["queued"] == 4 and h, "four requests to wait")
        with pytest.raises(openai.RateLimitError) as refused:
            client.chat.completions.create(model=MODEL, messages=user(text_part(QUESTION)), max_tokens=8)
        still_busy = server.health()
        answers = [future.result(timeout=60) for future in waiting]
    occupier.join(60)
    return SimpleNamespace(before=before, busy=busy, still_busy=still_busy, after=server.health(), answers=answers,
                           recordings=recordings, refused=refused.value, long_answer=long_answer)


def test_a_full_queue_answers_429(busy_worker):
    assert busy_worker.still_busy["queued"] == 4 and busy_worker.still_busy["in_flight"] == 1
    assert busy_worker.refused.status_code == 429
    assert busy_worker.refused.body["type"] == "rate_limit_error" and busy_worker.refused.body["code"] == "queue_full"
    assert len(busy_worker.long_answer["chunks"]) > 2 and busy_worker.long_answer["chunks"][-1].choices[0].finish_reason == "length"


def test_requests_that_wait_together_are_generated_as_one_batch(busy_worker, library):
    sizes_before, sizes_after = busy_worker.before["batch_sizes"], busy_worker.after["batch_sizes"]
    assert sizes_after.get("4", 0) == sizes_before.get("4", 0) + 1
    assert busy_worker.after["requests"] == busy_worker.before["requests"] + 5  # the long one + the batch of four
    assert busy_worker.after["largest_batch"] == 4
    expected = library.expect([f"<imu> {QUESTION}"] * 4, busy_worker.recordings, 8)  # one batch of four, here too
    assert [a.choices[0].message.content for a in busy_worker.answers] == [e.text for e in expected]
    assert len({a.choices[0].message.content for a in busy_worker.answers}) > 1  # each row answered its own recording


# ---------------------------------------------------------------------------------------- the page
PAGE_TOOLS_HOWTO = ("apt-get install chromium chromium-driver (Debian's packages) and pip install selenium "
                    "(in the dev extra)")


def missing_page_tools(which=None) -> list[str]:
    """What the page test lacks of chromium, chromedriver and selenium (``which`` finds programs; default
    `shutil.which`, looked up at call time so a test can replace it)."""
    which = which or shutil.which
    missing = [name for name, program in (("chromium", ("chromium", "chromium-browser")),
                                          ("chromedriver", ("chromedriver",)))
               if not any(which(candidate) for candidate in program)]
    try:
        import selenium  # noqa: F401
    except ImportError:
        missing.append("the selenium package")
    return missing


def page_test_blocker(missing: list[str], environ) -> tuple[str, str] | None:
    """None when the page test can run; else ``("skip", reason)`` outside CI, ``("fail", reason)`` in CI.

    In CI (``CI`` set to anything but ""/0/false/no) .ci/run installs the browser, so a missing one is
    a failure there, by name; on a user's machine the README's test command must pass without it.
    """
    if not missing:
        return None
    reason = f"the page test needs {', '.join(missing)}; to run it: {PAGE_TOOLS_HOWTO}"
    if environ.get("CI", "").strip().lower() not in ("", "0", "false", "no"):
        return "fail", f"{reason}. .ci/run installs them, so CI must run this test"
    return "skip", reason


def chromium_driver():
    """A headless Chromium under chromedriver; skips (or fails, in CI) when they are not installed."""
    blocker = page_test_blocker(missing_page_tools(), os.environ)
    if blocker is not None:
        action, reason = blocker
        if action == "fail":
            pytest.fail(reason)
        pytest.skip(reason)
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver_path = shutil.which("chromedriver")
    options = Options()
    options.binary_location = chromium
    for argument in CHROMIUM_ARGS:
        options.add_argument(argument)
    return webdriver.Chrome(service=Service(executable_path=driver_path), options=options)


def test_the_page_plots_an_uploaded_csv_and_streams_the_answer(server, client, tmp_path, monkeypatch):
    monkeypatch.setenv("SE_OFFLINE", "true")  # selenium must not look for drivers on the internet
    driver = chromium_driver()
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    try:
        values = recording(40, seed=21)
        upload = tmp_path / "walking.csv"
        upload.write_text("\n".join([",".join(CHANNELS)] + [",".join(f"{v:.3f}" for v in row) for row in values]) + "\n")
        api = client.chat.completions.create(
            model=MODEL, max_tokens=32, messages=user(sensor_part(format="csv", data=csv_base64(values)),
                                                      text_part(QUESTION)))

        driver.get(server.url + "/")
        wait = WebDriverWait(driver, 60)
        wait.until(lambda d: "401" in d.find_element(By.ID, "model").text)  # no key yet: the model list is refused
        driver.find_element(By.ID, "key").send_keys(KEY + "\t")  # the key field's change event lists the model
        wait.until(lambda d: d.find_element(By.ID, "model").text == f"model {MODEL} · sensor modalities: imu")

        driver.find_element(By.ID, "file").send_keys(str(upload))
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#plot polyline")) == 6)
        lines = driver.find_elements(By.CSS_SELECTOR, "#plot polyline")
        assert [line.get_attribute("data-channel") for line in lines] == CHANNELS
        assert all(len(line.get_attribute("points").split()) == 40 for line in lines)
        assert driver.find_element(By.ID, "summary").text == "walking.csv: 40 steps × 6 channels"

        question = driver.find_element(By.ID, "question")
        question.clear()
        question.send_keys(QUESTION)
        driver.execute_script("""
            window.answerUpdates = 0;
            new MutationObserver(() => { window.answerUpdates += 1; })
              .observe(document.getElementById('answer'), {childList: true, characterData: true, subtree: true});""")
        driver.find_element(By.ID, "ask").click()
        wait.until(lambda d: d.find_element(By.ID, "answer").get_attribute("data-state") in ("done", "error"))

        answer = driver.find_element(By.ID, "answer")
        assert answer.get_attribute("data-state") == "done", driver.find_element(By.ID, "error").text
        assert answer.get_property("textContent") == api.choices[0].message.content
        assert driver.execute_script("return window.answerUpdates") > 3  # it arrived in pieces, not at once
        assert driver.find_element(By.ID, "usage").text == (
            f"finish: length · prompt {api.usage.prompt_tokens} + completion 32 = {api.usage.total_tokens} tokens")
        fetched = driver.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
        assert fetched and all(url.startswith(server.url + "/") for url in fetched), fetched  # nothing from elsewhere

        SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
        assert driver.save_screenshot(str(SCREENSHOT))
    finally:
        driver.quit()


# ---------------------------------------------------------------------------------------- timeouts and shutdown
def test_without_a_browser_the_page_test_skips_saying_how_to_enable_it_but_fails_in_ci(monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda name: None)
    assert missing_page_tools()[:2] == ["chromium", "chromedriver"]
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception) as skipped:
        chromium_driver()
    assert str(skipped.value).startswith("the page test needs chromium, chromedriver")
    assert "apt-get install chromium chromium-driver" in str(skipped.value)
    for ci in ("true", "1"):
        monkeypatch.setenv("CI", ci)
        with pytest.raises(pytest.fail.Exception) as failed:
            chromium_driver()
        assert "apt-get install chromium chromium-driver" in str(failed.value)
        assert "CI must run this test" in str(failed.value)
    monkeypatch.setenv("CI", "false")
    with pytest.raises(pytest.skip.Exception):
        chromium_driver()


def test_the_page_test_runs_when_every_tool_is_there():
    pytest.importorskip("selenium")  # in the dev extra
    found = {"chromium-browser": "/usr/bin/chromium-browser", "chromedriver": "/usr/bin/chromedriver"}
    assert missing_page_tools(found.get) == []
    assert missing_page_tools({"chromium": "/usr/bin/chromium"}.get) == ["chromedriver"]
    assert page_test_blocker([], {"CI": "true"}) is None
    assert page_test_blocker(["chromium"], {})[0] == "skip"
    assert page_test_blocker(["chromium"], {"CI": "true"})[0] == "fail"


@pytest.fixture(scope="module")
def impatient_server(checkpoint, tmp_path_factory):
    server = Server(checkpoint, tmp_path_factory.mktemp("logs") / "impatient.log", "--request-timeout", "0.3",
                    "--max-tokens-limit", "1600")
    yield server
    server.stop()


def test_a_request_not_answered_in_time_is_504(impatient_server):
    client = impatient_server.client(key=None)
    started = time.monotonic()
    with pytest.raises(openai.InternalServerError) as raised:
        client.chat.completions.create(model=MODEL, messages=user(text_part(QUESTION)), max_tokens=LONG)
    assert raised.value.status_code == 504
    assert raised.value.code == "timeout" and "not answered within 0.3 s" in raised.value.message
    assert time.monotonic() - started < 30


def test_a_stream_that_runs_out_of_time_ends_with_an_error_event(impatient_server):
    wait_until(lambda: (h := impatient_server.health())["in_flight"] == 0 and h["queued"] == 0, "an idle worker")
    body = {"model": MODEL, "messages": user(text_part(QUESTION)), "max_tokens": LONG, "stream": True}
    status, data, _ = request(impatient_server.url, "POST", "/v1/chat/completions", json.dumps(body).encode())
    assert status == 200
    events = data.decode().split("\n\n")[:-1]
    assert json.loads(events[0].removeprefix("data: "))["choices"][0]["delta"]["role"] == "assistant"
    last = json.loads(events[-1].removeprefix("data: "))
    assert last["error"]["code"] == "timeout" and "[DONE]" not in data.decode()


def test_sigterm_finishes_the_requests_in_flight_then_exits(checkpoint, tmp_path):
    server = Server(checkpoint, tmp_path / "server.log", "--max-tokens-limit", "1600")
    try:
        client = server.client(key=None)
        results = {}

        def ask(name, **settings):
            try:
                response = client.chat.completions.create(model=MODEL, messages=user(text_part(QUESTION)), **settings)
                results[name] = stream_text(response)[0] if settings.get("stream") else response
            except Exception as error:  # noqa: BLE001 - recorded and asserted on below
                results[name] = error

        running = threading.Thread(target=ask, args=("running",), kwargs={"max_tokens": LONG})
        running.start()
        wait_until(lambda: server.health()["in_flight"] == 1, "the first request to start")
        queued = threading.Thread(target=ask, args=("queued",), kwargs={"max_tokens": 5, "stream": True})
        queued.start()
        wait_until(lambda: server.health()["queued"] == 1, "the second request to wait")

        server.process.send_signal(signal.SIGTERM)

        def refused() -> bool:
            try:
                socket.create_connection(("127.0.0.1", server.port), timeout=1).close()
                return False
            except OSError:
                return True

        wait_until(refused, "the server to stop accepting connections", timeout=10)
        assert running.is_alive()  # it stopped listening while the long request was still being generated
        running.join(60)
        queued.join(60)
        assert server.process.wait(60) == 0, server.log()
        assert not isinstance(results["running"], Exception), results["running"]
        assert results["running"].usage.completion_tokens == LONG
        assert isinstance(results["queued"], str) and len(results["queued"]) >= 3, results["queued"]
    finally:
        server.stop()


# ---------------------------------------------------------------------------------------- parts of the server, alone
def test_stop_holdback_never_shows_a_stop_string_even_across_pieces():
    holdback = StopHoldback(["cd"])
    shown = [holdback.push(piece) for piece in ["ab", "c", "de", "fg"]]
    assert shown == ["a", "b", "", ""]  # "c" might start "cd": held back, and it did
    assert holdback.finish("ab") == ""

    holdback = StopHoldback([])
    assert [holdback.push(p) for p in ["one ", "two", " "]] == ["one", " two", ""]  # trailing space waits
    assert holdback.finish("one two") == ""


def test_content_parts_become_markers_where_they_stand(library):
    values = recording(8, 0).tolist()
    parsed = parse_request(json.dumps({"model": MODEL, "messages": [
        {"role": "developer", "content": "Be brief."},
        {"role": "user", "content": [text_part("Compare"), sensor_part(values), text_part(" with\n"),
                                     sensor_part(values, sample_rate=20), text_part("please.")]},
    ]}).encode())
    prompt = read_messages(parsed.messages, library.processor)
    assert prompt.chat == [{"role": "system", "content": "Be brief."},
                           {"role": "user", "content": "Compare <imu> with\n<imu> please."}]
    assert [r.shape for r in prompt.inputs["imu"]] == [(8, 6), (4, 6)]  # the second was resampled from 20 Hz to 10 Hz


def test_the_worker_groups_by_settings_refuses_a_full_queue_and_drains_on_close(library):
    calls = []

    def generate(model, processor, chats, inputs, settings, on_text=None):
        calls.append((len(chats), settings.max_new_tokens))
        return [SimpleNamespace(text=f"{settings.max_new_tokens}:{i}") for i in range(len(chats))]

    worker = BatchWorker(library.model, library.processor, max_batch_size=8, window_s=0.5, max_queue=4,
                         generate=generate)
    events = [[] for _ in range(4)]
    settings = [GenerationSettings(max_new_tokens=n) for n in (4, 4, 9, 4)]
    for i in range(4):  # queued before the worker starts: one window collects them all
        worker.submit(Job(Prompt([{"role": "user", "content": "hi"}]), settings[i], events[i].append))
    with pytest.raises(QueueFull):
        worker.submit(Job(Prompt([{"role": "user", "content": "hi"}]), settings[0], lambda event: None))
    refused = []
    bad = Job(Prompt([{"role": "user", "content": "<imu> hi"}]), settings[0], refused.append)  # a marker, no item
    worker.start()
    wait_until(lambda: len(calls) == 2, "two generate calls")
    worker.submit(bad)
    assert worker.close(timeout=30)
    assert calls == [(3, 4), (1, 9)]  # the three with max_tokens 4 together, then the one with 9
    assert [type(e) for e in events[0]] == [Started, Finished] and events[0][0].batch_size == 3
    assert [e[-1].answer.text for e in events] == ["4:0", "4:1", "9:0", "4:2"]
    assert [type(e) for e in refused] == [Failed] and refused[0].error.status == 400
    assert "1 <imu> marker(s) but 0 item(s)" in refused[0].error.message or "more <imu> markers" in refused[0].error.message
    with pytest.raises(WorkerClosed):
        worker.submit(bad)
    assert worker.stats()["batch_sizes"] == {"1": 1, "3": 1} and worker.stats()["failed"] == 1
