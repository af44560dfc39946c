"""bitsandbytes is loaded only by a rung that quantises (or adapts: peft imports it), and quietly.

bitsandbytes 0.50, when imported on a CPU with AVX512-BF16, asks the Hugging Face Hub for an optional
CPU kernel and, offline, logs "Skipping publisher trust check for 'kernels-community/..." and "Failed to
load CPU gemm_4bit_forward from kernels-community: ..." (`hcx_extend.memory.quantize.KERNEL_LOOKUP_LOGS`).
A run that quantises nothing must not import it at all; one that does must not print those lines.
"""

import importlib.util
import json
import logging
import os
import subprocess
import sys

import pytest
from test_train_cli import make_workspace

from hcx_extend.memory.quantize import KERNEL_LOOKUP_LOGS, quiet_kernel_lookup

LOOKUP_WORDS = ("kernels-community", "publisher trust", "Failed to load")


def run_offline(script: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300,
                          check=False)


def test_a_run_that_quantises_nothing_imports_neither_bitsandbytes_nor_peft(tmp_path):
    workspace = make_workspace(tmp_path)
    script = f"""
import json, sys
from hcx_extend.cli import main
from hcx_extend.runs import load_model
run = {str(workspace / "run")!r}
assert main(["train", "--llm", {str(workspace / "llm")!r}, "--add-imu", "imu", "--data",
             {str(workspace / "data" / "train.jsonl")!r}, "--strategy", "new-encoder", "--epochs", "1",
             "--batch-size", "2", "--output", run]) == 0
assert main(["merge", run + "/checkpoint", "--output", run + "/merged"]) == 0
model, tokenizer = load_model(run + "/checkpoint")
print(json.dumps({{name: name in sys.modules for name in ("bitsandbytes", "peft")}}))
"""
    result = run_offline(script)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads(result.stdout.strip().splitlines()[-1]) == {"bitsandbytes": False, "peft": False}
    assert not [line for line in result.stderr.splitlines() if any(w in line for w in LOOKUP_WORDS)]


def test_a_rung_that_quantises_loads_bitsandbytes_without_hub_lookup_lines():
    if importlib.util.find_spec("bitsandbytes") is None:  # found without importing it here (that would log)
        pytest.skip("bitsandbytes is not installed (the train extra)")
    script = """
import sys
from hcx_extend import build_preset
from hcx_extend.training.strategies import apply_strategy
model = build_preset("tiny-hcx-omni", seed=0)
plan = apply_strategy(model, "qlora", ["sensor"])
quantised = sum(type(module).__name__ == "Linear4bit" for module in model.language_model.modules())
print(plan.quantize_llm, "bitsandbytes" in sys.modules, quantised > 0)
"""
    result = run_offline(script)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split() == ["nf4", "True", "True"]
    assert not [line for line in result.stderr.splitlines() if any(w in line for w in LOOKUP_WORDS)]


def test_only_the_two_lookup_lines_are_dropped_and_only_while_importing(caplog):
    caplog.set_level(logging.WARNING)
    lookup = {name: logging.getLogger(name) for name in KERNEL_LOOKUP_LOGS}
    trust = lookup["kernels._internals.hf_hub"]
    gemm = lookup["bitsandbytes.backends.cpu.ops"]
    with quiet_kernel_lookup():
        trust.warning("Skipping publisher trust check for 'kernels-community/quantization-bitsandbytes' because "
                      "Hugging Face Hub is in offline mode.")
        gemm.warning("Failed to load CPU gemm_4bit_forward from kernels-community: %s. Please make sure ...", "offline")
        gemm.warning("Failed to load CPU something else")
    gemm.warning("Failed to load CPU gemm_4bit_forward from kernels-community: after the import")
    assert [r.getMessage() for r in caplog.records] == [
        "Failed to load CPU something else", "Failed to load CPU gemm_4bit_forward from kernels-community: after the import"]
    assert all(not logger.filters for logger in lookup.values())
