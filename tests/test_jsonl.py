"""`read_jsonl` streams a JSONL file: each line is checked as it is read, the first bad one stops reading."""

import json
import re

import numpy as np
import pytest

from hcx_extend import preset_config
from hcx_extend.data import examples as examples_module
from hcx_extend.data.examples import read_jsonl

GOOD = json.dumps({"messages": [{"role": "user", "content": "<sensor> which way?"},
                                {"role": "assistant", "content": "up"}], "inputs": {"sensor": ["up.npy"]}})


@pytest.fixture
def folder(tmp_path):
    np.save(tmp_path / "up.npy", np.arange(24, dtype=np.float32).reshape(4, 6))
    return tmp_path


@pytest.fixture
def config():
    return preset_config("tiny-hcx-omni")


def test_examples_are_read_with_item_paths_relative_to_the_file(folder, config):
    (folder / "data.jsonl").write_bytes(b"\xef\xbb\xbf" + (GOOD + "\n\n" + GOOD.replace('"up"', '"down"')).encode())
    examples = read_jsonl(folder / "data.jsonl", config)
    assert [e.answer for e in examples] == ["up", "down"]
    assert np.array_equal(examples[1].inputs["sensor"][0], np.arange(24, dtype=np.float32).reshape(4, 6))


def test_the_first_bad_line_stops_reading_and_is_named_with_its_number(folder, config):
    # Line 2 is truncated JSON; line 3 is not even UTF-8. A reader that took the whole file first
    # failed on line 3's bytes (or its missing item); streaming stops at line 2.
    path = folder / "data.jsonl"
    path.write_bytes(f"{GOOD}\n{GOOD[:30]}\n".encode() + b"\xff\xfe not text\n" + b'{"messages": []}\n')
    with pytest.raises(ValueError, match=f"^{re.escape(str(path))}:2: not JSON"):
        read_jsonl(path, config)
    path.write_bytes(f"{GOOD}\n{GOOD}\n".encode() + b"\xff\xfe not text\n" + GOOD[:30].encode())
    with pytest.raises(ValueError, match=f"^{re.escape(str(path))}:3: not UTF-8 text"):
        read_jsonl(path, config)
    path.write_text(f"{GOOD}\n{GOOD.replace('up.npy', 'gone.npy')}\n{GOOD[:30]}\n")
    with pytest.raises(FileNotFoundError, match=f"^{re.escape(str(path))}:2: .*gone.npy does not exist"):
        read_jsonl(path, config)


def test_items_of_lines_after_a_bad_one_are_never_read(folder, config, monkeypatch):
    read = []
    real = examples_module.read_npy  # the tiny preset's sensor declares no input contract: items are .npy arrays
    monkeypatch.setattr(examples_module, "read_npy", lambda path: read.append(path.name) or real(path))
    (folder / "data.jsonl").write_text(f"{GOOD}\n{{\"messages\": 3}}\n{GOOD}\n")
    with pytest.raises(ValueError, match=":2: needs 'messages'"):
        read_jsonl(folder / "data.jsonl", config)
    assert read == ["up.npy"]  # line 1's item only


def test_a_line_is_never_held_beyond_the_limit(folder, config, monkeypatch):
    monkeypatch.setattr(examples_module, "MAX_JSONL_LINE_BYTES", len(GOOD) + 1)
    path = folder / "data.jsonl"
    path.write_text(f"{GOOD}\n{GOOD}  \n")  # exactly the limit with its line break, then 2 bytes over
    with pytest.raises(ValueError, match=f"^{re.escape(str(path))}:2: longer than {len(GOOD) + 1} bytes"):
        read_jsonl(path, config)
    path.write_text(f"{GOOD}\n{GOOD}\n")
    assert len(read_jsonl(path, config)) == 2
