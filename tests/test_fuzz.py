"""Property-based tests: the readers, the processor and the config parser on generated input.

Each property runs 1,000 generated inputs (``derandomize=True``: the same inputs on every run, so CI is
reproducible) and allows only the error types the function documents: a ValueError (or a
FileNotFoundError where a file is named) whose message names the source. Anything else that escapes (a
TypeError, a KeyError, numpy's or torch's own errors) fails the test with the input that caused it.
Where an input is well formed, the result is checked against what was written.

Inputs are kept small so that a property runs in a few seconds on a shared 2-core machine.
"""

import json
import math
import string
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tiny_tokenizer import make_tokenizer

from hcx_extend import ModalityConfig, OmniConfig, OmniProcessor, align_tokens, build_preset
from hcx_extend.checkpoint.modality_file import read_modality_file
from hcx_extend.data.sensors import parse_csv_text, parse_npy_bytes, read_csv, read_npy

EXAMPLES = 1000
fuzz = settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much])

# Files written by the file-reading properties go here (a function-scoped tmp_path would be shared by
# all examples of a property anyway, and hypothesis warns about it).
SCRATCH = tempfile.TemporaryDirectory(prefix="hcx-fuzz-")
SCRATCH_DIR = Path(SCRATCH.name)


def teardown_module(module):
    SCRATCH.cleanup()


# ---------------------------------------------------------------------------------------- CSV
CHANNELS = ["acc_x", "acc_y", "acc_z", "gyro_x", "gyro_y", "gyro_z"]
numbers = st.floats(allow_nan=False, allow_infinity=False, width=32)
cells = st.one_of(
    numbers.map(repr),
    st.integers(-10**6, 10**6).map(str),
    st.sampled_from(["", " ", "nan", "NaN", "inf", "-inf", "1e400", "-1e400", "1e39", "0x10", "1,5", "one", '"2"',
                     '"', '""', "\x00", "\ufeff1", "1 2", "  3.5  ", "+4", ".5", "5.", "1_000"]),
    st.text(alphabet=string.printable + "\u00e9\u4e2d\ufeff", max_size=8),
)
names = st.one_of(st.sampled_from(CHANNELS + ["", "1", "nan", "a,b", '"q"', " acc_x "]), st.text(max_size=6))


@st.composite
def csv_texts(draw) -> str:
    """CSV-like text: a header and rows of cells; about half well formed, the rest with ragged rows, odd
    cells (quotes, NaN, 1e400, NUL, BOMs), odd headers and line ends."""
    width = draw(st.integers(0, 7))
    clean = draw(st.booleans())
    header_names = st.sampled_from(CHANNELS + ["t", "x"]) if clean else names
    header = draw(st.lists(header_names, min_size=width, max_size=width, unique=clean))
    row_cells = numbers.map(repr) if clean else cells
    low, high = (width, width) if clean else (max(0, width - 1), width + 1)
    rows = draw(st.lists(st.lists(row_cells, min_size=low, max_size=high), max_size=12))
    newline = draw(st.sampled_from(["\n", "\r\n", "\r"]))
    lines = [",".join(header)] + [",".join(row) for row in rows]
    text = newline.join(lines) + draw(st.sampled_from(["", newline, newline * 3]))
    return draw(st.sampled_from(["", "\ufeff", "\n"])) + text


@st.composite
def numeric_tables(draw) -> tuple[list[str], np.ndarray]:
    """A well-formed recording: distinct channel names and finite float32 values."""
    width = draw(st.integers(1, 6))
    header = draw(st.lists(st.sampled_from(CHANNELS + ["t", "x", "y"]), min_size=width, max_size=width, unique=True))
    length = draw(st.integers(1, 10))
    values = draw(st.lists(st.lists(numbers, min_size=width, max_size=width), min_size=length, max_size=length))
    return header, np.array(values, dtype=np.float32)


def check_recording(values: np.ndarray) -> None:
    assert values.dtype == np.float32 and values.ndim == 2 and values.shape[0] >= 1 and values.shape[1] >= 1
    assert np.isfinite(values).all()


@fuzz
@given(text=st.one_of(csv_texts(), st.text(max_size=200)),
       channel_names=st.one_of(st.none(), st.lists(st.sampled_from(CHANNELS + ["", "1"]), max_size=3)),
       max_length=st.one_of(st.none(), st.integers(1, 8)))
def test_parse_csv_text_returns_a_clean_recording_or_a_value_error(text, channel_names, max_length):
    """Raises: ValueError naming the source ("upload.csv: ...")."""
    try:
        values = parse_csv_text(text, "upload.csv", channel_names, max_length)
    except ValueError as error:
        assert str(error).startswith("upload.csv"), str(error)
        return
    check_recording(values)
    if max_length is not None:
        assert values.shape[0] <= max_length
    if channel_names is not None:
        assert values.shape[1] == len(channel_names)


@fuzz
@given(table=numeric_tables())
def test_csv_round_trip_is_exact(table):
    header, values = table
    text = ",".join(header) + "\n" + "\n".join(",".join(repr(float(v)) for v in row) for row in values) + "\n"
    assert np.array_equal(parse_csv_text(text), values)
    picked = header[::-1]
    assert np.array_equal(parse_csv_text(text, channel_names=picked), values[:, ::-1])


@fuzz
@given(content=st.one_of(csv_texts().map(lambda t: t.encode("utf-8")),
                         csv_texts().map(lambda t: t.encode("utf-16")),
                         csv_texts().map(lambda t: t.encode("latin-1", errors="replace")),
                         st.binary(max_size=300)),
       max_length=st.one_of(st.none(), st.integers(1, 8)))
def test_read_csv_on_files_returns_a_clean_recording_or_a_value_error(content, max_length):
    """Raises: ValueError naming the file (bytes that are not UTF-8 included)."""
    path = SCRATCH_DIR / "fuzz.csv"
    path.write_bytes(content)
    try:
        values = read_csv(path, max_length=max_length)
    except ValueError as error:
        assert str(error).startswith(str(path)), str(error)
        return
    check_recording(values)


# ---------------------------------------------------------------------------------------- NPY
dtypes = st.sampled_from(["<f4", ">f4", "<f8", "<f2", "<i4", "<u1", "<i8", "<u8", "|b1", "<c8", "<U2", "|O", "|V4"])


@st.composite
def npy_bytes(draw) -> bytes:
    """An .npy file: a real array (any dtype, rank, values), then maybe truncated or with its header edited."""
    shape = draw(st.one_of(st.tuples(st.integers(1, 6), st.integers(1, 6)),
                           st.lists(st.integers(0, 5), max_size=3).map(tuple)))
    dtype = draw(dtypes)
    import io

    buffer = io.BytesIO()
    if dtype == "|O":
        np.save(buffer, np.array([{"a": 1}, None], dtype=object), allow_pickle=True)
    elif dtype == "<U2":
        np.save(buffer, np.full(shape, "ab"))
    elif dtype == "|V4":
        np.save(buffer, np.zeros(shape, dtype=[("a", "<f4")]))
    else:
        count = int(np.prod(shape)) if shape else 1
        raw = draw(st.lists(st.floats(allow_nan=True, allow_infinity=True, width=64), min_size=count,
                            max_size=count))
        with np.errstate(all="ignore"):
            array = np.array(raw, dtype=np.float64).reshape(shape)
            np.save(buffer, array.astype(dtype) if dtype[1] in "fc" else np.nan_to_num(array).clip(-100, 100)
                    .astype(dtype))
    data = buffer.getvalue()
    damage = draw(st.sampled_from(["none", "none", "truncate", "header", "flip"]))
    if damage == "truncate":
        data = data[:draw(st.integers(0, len(data)))]
    elif damage == "header":
        header_end = data.index(b"\n") if b"\n" in data else len(data)
        start = draw(st.integers(0, header_end))
        data = data[:start] + draw(st.binary(min_size=1, max_size=12)) + data[start + 1:]
    elif damage == "flip" and data:
        position = draw(st.integers(0, len(data) - 1))
        data = data[:position] + bytes([data[position] ^ draw(st.integers(1, 255))]) + data[position + 1:]
    return data


@fuzz
@given(data=st.one_of(npy_bytes(), st.binary(max_size=200)), max_length=st.one_of(st.none(), st.integers(1, 4)))
def test_parse_npy_bytes_returns_a_clean_recording_or_a_value_error(data, max_length):
    """Raises: ValueError naming the source; a pickled object is never loaded."""
    try:
        values = parse_npy_bytes(data, "upload.npy", max_length)
    except ValueError as error:
        assert str(error).startswith("upload.npy"), str(error)
        return
    check_recording(values)
    if max_length is not None:
        assert values.shape[0] <= max_length


@fuzz
@given(data=npy_bytes())
def test_read_npy_on_files_agrees_with_parse_npy_bytes(data):
    """Raises: ValueError naming the file; the file and the in-memory reader accept the same inputs."""
    path = SCRATCH_DIR / "fuzz.npy"
    path.write_bytes(data)
    try:
        from_bytes = parse_npy_bytes(data, "upload.npy")
    except ValueError:
        from_bytes = None
    try:
        from_file = read_npy(path)
    except ValueError as error:
        assert str(error).startswith(str(path)), str(error)
        from_file = None
    if from_bytes is None or from_file is None:
        return  # mmap-based and in-memory loading may disagree on damaged data; both refused or one did
    assert np.array_equal(from_bytes, from_file)


# ---------------------------------------------------------------------------------------- processor
@pytest.fixture(scope="module")
def processor():
    """The tiny preset's processor, built once for all examples (hypothesis runs each test body many times)."""
    tokenizer = make_tokenizer()
    model = build_preset("tiny-hcx-omni", seed=0)
    align_tokens(model, tokenizer)
    return OmniProcessor(tokenizer, model.config)


MARKERS = ["<sensor>", "<image>", "<audio>", "<video>", "<lidar>", "<sensor", "sensor>", "<>"]
text_pieces = st.one_of(st.sampled_from(MARKERS), st.text(max_size=10))
contents = st.lists(text_pieces, max_size=5).map("".join)
messages = st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant", "system", ""]), "content": contents})
# The documented types (a chat is a list of {"role", "content"} string dicts, or a string), any values: keys
# may be missing, roles unknown, the list empty. Other types are a caller's programming error.
odd_messages = st.one_of(messages, st.dictionaries(st.sampled_from(["role", "content", "x"]), contents, max_size=3))
chats = st.one_of(st.lists(messages, min_size=1, max_size=3), st.lists(odd_messages, max_size=3), contents)


@st.composite
def items(draw, modality: str):
    """A raw item for ``modality``: mostly the right layout, sometimes the wrong rank, size, dtype or values."""
    if modality == "sensor":
        shape = draw(st.sampled_from([(draw(st.integers(0, 40)), 6), (5, draw(st.integers(0, 8))), (5,), (2, 3, 6),
                                      (513, 6)]))
    elif modality == "audio":
        shape = draw(st.sampled_from([(16, draw(st.integers(0, 70))), (8, 20), (16,), (1, 16, 10)]))
    else:
        side = draw(st.sampled_from([0, 14, 28, 56, 30]))
        shape = draw(st.sampled_from([(3, side, side), (1, 28, 28), (3, 28), (28, 28, 3)]))
    kind = draw(st.sampled_from(["tensor", "numpy", "list", "int", "nan", "object", "string", "bool"]))
    value = torch.zeros(shape)
    if kind == "numpy":
        return value.numpy()
    if kind == "list":
        return value.tolist()
    if kind == "int":
        return value.to(torch.int32)
    if kind == "nan":
        return torch.full(shape, draw(st.sampled_from([math.nan, math.inf, -math.inf])))
    if kind == "object":
        return [{"x": 1}] * 3
    if kind == "string":
        return "not an array"
    if kind == "bool":
        return value.bool()
    return value


@st.composite
def processor_inputs(draw):
    names = draw(st.lists(st.sampled_from(["sensor", "audio", "image", "lidar"]), max_size=3, unique=True))
    return {name: draw(st.lists(items("image" if name == "lidar" else name), max_size=3)) for name in names}


@fuzz
@given(samples=st.one_of(chats, st.lists(chats, min_size=1, max_size=3)), inputs=processor_inputs(),
       return_labels=st.booleans(), padding_side=st.sampled_from(["left", "right", "middle"]),
       use_chat_template=st.booleans())
def test_processor_returns_aligned_tensors_or_a_value_error(processor, samples, inputs, return_labels, padding_side,
                                                            use_chat_template):
    """Raises: ValueError (naming the modality for bad items); no TypeError/KeyError/IndexError from any input."""
    try:
        batch = processor(samples, inputs, return_labels=return_labels, padding_side=padding_side,
                          use_chat_template=use_chat_template)
    except ValueError:
        return
    ids, mask = batch["input_ids"], batch["attention_mask"]
    assert ids.dtype == torch.long and ids.shape == mask.shape
    placeholder = {name: processor.config.modality(name).token_id for name in batch["modality_inputs"]}
    for name, modality_batch in batch["modality_inputs"].items():
        counts = processor._token_counts(name, modality_batch)
        assert int((ids == placeholder[name]).sum()) == sum(counts)  # one placeholder per embedding
    if return_labels:
        assert batch["labels"].shape == ids.shape
        assert not (batch["labels"][mask == 0] != -100).any()


# ---------------------------------------------------------------------------------------- config parser
json_leaves = st.one_of(st.none(), st.booleans(), st.integers(-3, 200_000), st.floats(allow_nan=True),
                        st.text(max_size=8), st.sampled_from(["imu", "mlp", "linear", "sensor", "float32", "avgpool"]))
json_values = st.recursive(json_leaves, lambda inner: st.one_of(
    st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=6), inner, max_size=3)), max_leaves=8)

IMU = {"encoder": {"model_type": "imu", "in_channels": 6, "hidden_size": 16, "num_layers": 1, "num_heads": 2,
                   "ffn_size": 16, "output_size": 16, "stride": 2},
       "projector": {"type": "mlp", "activation": "silu"},
       "input": {"kind": "sensor", "channels": 6, "max_length": 64, "sample_rate": 10.0, "channel_names": CHANNELS},
       "compressor": {"type": "avgpool", "chunk_size": 4},
       "normalization": {"mean": [0.0] * 6, "std": [1.0] * 6}}
AUDIO = {"encoder": {"model_type": "qwen2_audio_encoder", "num_mel_bins": 8, "encoder_layers": 1,
                     "encoder_attention_heads": 2, "encoder_ffn_dim": 16, "d_model": 16, "max_source_positions": 8},
         "projector": {"type": "linear"}}
TEXT = {"model_type": "hyperclovax", "vocab_size": 300, "hidden_size": 16, "intermediate_size": 32,
        "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1}


@st.composite
def mutated(draw, base: dict) -> dict:
    """``base`` with 0-3 edits at random places: a value replaced by any JSON value, a key dropped, an
    unknown key added. Most results are near misses of a valid config, which reach the deeper checks."""
    data = json.loads(json.dumps(base))
    for _ in range(draw(st.integers(0, 3))):
        node = data
        while True:  # walk down to a random dict
            children = [k for k, v in node.items() if isinstance(v, dict)]
            if not children or draw(st.booleans()):
                break
            node = node[draw(st.sampled_from(sorted(children)))]
        action = draw(st.sampled_from(["replace", "replace", "drop", "add"]))
        if action == "add" or not node:
            node[draw(st.sampled_from(["extra", "chanels", "type", "kind", "model_type"]))] = draw(json_values)
        else:
            key = draw(st.sampled_from(sorted(node)))
            if action == "drop":
                del node[key]
            else:
                node[key] = draw(st.one_of(json_values, st.integers(-2, 2), st.sampled_from(["", "16", "x"])))
    return data


modality_dicts = st.one_of(mutated(IMU), mutated(AUDIO), json_values)
text_configs = st.one_of(mutated(TEXT), json_values)


@st.composite
def omni_dicts(draw) -> dict:
    """A config.json: the LLM and two modalities, edited (`mutated`), with maybe HCX hub / guide flat fields
    and transformers fields of any value."""
    data = draw(mutated({"text_config": TEXT, "modalities": {"imu": IMU, "audio": AUDIO}}))
    extra = draw(st.lists(st.sampled_from(["sensor_config", "vision_config", "mm_projector_type", "sensor_start_id",
                                           "model_type", "dtype", "torch_dtype", "id2label", "num_labels",
                                           "problem_type", "tie_word_embeddings", "chunk_size_feed_forward"]),
                          max_size=2, unique=True))
    for key in extra:
        data[key] = draw(st.one_of(json_values, st.just(IMU["encoder"]), st.sampled_from(["vlm", "float32", "x"])))
    return data


@fuzz
@given(data=omni_dicts())
def test_omni_config_accepts_or_raises_a_value_error(data):
    """Raises: ValueError only; a config that is accepted round-trips through its dict."""
    try:
        config = OmniConfig(**data)
    except ValueError:
        return
    again = OmniConfig(**json.loads(json.dumps(config.to_dict(), default=str)))
    assert again.modalities == config.modalities
    assert again.text_config.to_dict() == config.text_config.to_dict()


@fuzz
@given(name=st.one_of(st.sampled_from(["imu", "sensor", "x1"]), st.text(max_size=5)), data=modality_dicts)
def test_modality_config_from_dict_accepts_or_raises_a_value_error(name, data):
    """Raises: ValueError naming the modality; an accepted modality round-trips through its dict."""
    try:
        modality = ModalityConfig.from_dict(name, data)
    except ValueError:
        return
    assert ModalityConfig.from_dict(name, modality.to_dict()) == modality


@fuzz
@given(data=st.one_of(st.fixed_dictionaries({"name": st.sampled_from(["vowel", "imu", "Bad"])}).flatmap(
    lambda named: modality_dicts.map(lambda m: {**m, **named} if isinstance(m, dict) else m)), json_values),
    encoding=st.sampled_from(["utf-8"] * 5 + ["utf-16"]), truncate=st.sampled_from([False] * 5 + [True]))
def test_read_modality_file_checks_or_raises_a_value_error_naming_the_file(data, encoding, truncate):
    """Raises: ValueError naming the file (FileNotFoundError only for a missing file)."""
    text = json.dumps(data)
    if truncate:
        text = text[:len(text) // 2]
    path = SCRATCH_DIR / "modality.json"
    path.write_bytes(text.encode(encoding))
    try:
        modality = read_modality_file(path)
    except ValueError as error:
        assert str(error).startswith(str(path)), str(error)
        return
    assert modality.name == data["name"]
    assert modality.input is not None and modality.input.kind  # checked: the contract was resolved
