"""Two processes (DDP over gloo, CPU) train to the same parameters as one process with the same global batch."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

WORKER = Path(__file__).parent / "distributed_worker.py"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_equal_one_process(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, str(WORKER), str(tmp_path / "one")], check=True, env=env)
    # accelerate 1.15 starts a single process for `--cpu` (it expects MPI for several); `--multi_gpu`
    # starts them with torchrun, and our Trainer joins them in a gloo group when there is no CUDA.
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                "--main_process_port", str(free_port())]
    subprocess.run(launcher + [str(WORKER), str(tmp_path / "two")], check=True, env=env)
    assert (tmp_path / "one" / "world").read_text() == "1"
    assert (tmp_path / "two" / "world").read_text() == "2"
    one, two = load_file(tmp_path / "one" / "params.safetensors"), load_file(tmp_path / "two" / "params.safetensors")
    assert one.keys() == two.keys() and len(one) > 10
    for name in one:
        # Gradients are averaged in another order across processes: equal up to float rounding.
        assert torch.allclose(one[name], two[name], atol=1e-5, rtol=1e-4), name
    # And training moved the parameters (equal but untouched would prove nothing).
    from hcx_extend import OmniForCausalLM, preset_config

    torch.manual_seed(0)
    start = dict(OmniForCausalLM(preset_config("tiny-hcx-omni")).named_parameters())
    moved = {n for n in one if (one[n] - start[n]).abs().max() > 1e-4}
    assert moved == set(one)
