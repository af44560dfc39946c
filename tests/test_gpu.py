"""Every entry point with the model on CUDA (issue 10): run with ``pytest -m gpu`` on a GPU machine.

Skipped where CUDA is not available (the whole module). What each test would have caught: the main
job crashed on a GPU because batches built outside the Trainer's prepared dataloader (the evaluate
callback's generate, chat, evaluation) stayed on the CPU. Batches are handed over as the processor
makes them, on the CPU; `OmniForCausalLM.forward`/``generate`` must move them.

Tolerances: CPU and GPU runs are compared in float32 with TF32 switched off for both matmuls and cuDNN
convolutions (the vision encoder's patch embedding is a convolution, and cuDNN uses TF32 by default),
so the only differences are the order of float32 reductions: relative errors of a few 1e-7 per op,
growing through the tiny preset's ~10 layers to ~1e-5 of logits of order 1. We allow 1e-4.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from test_train_cli import workspace  # noqa: F401  (the tiny LLM + tokenizer + JSONL fixture)

from hcx_extend import OmniForCausalLM, OmniProcessor, align_tokens, build_preset
from hcx_extend.cli import main
from hcx_extend.compressors import mamba2, ssd
from hcx_extend.compressors.mambamia import MambaMiaCompressor
from hcx_extend.data.examples import Example, read_jsonl
from hcx_extend.evaluation import evaluate_examples
from hcx_extend.inference import GenerationSettings, chat
from hcx_extend.runs import load_model
from hcx_extend.training import TrainConfig, Trainer

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
CUDA = torch.device("cuda")
STRATEGIES = ["projector", "new-encoder", "lora-encoder", "lora-all", "qlora", "full"]


@pytest.fixture(autouse=True)
def exact_float32():
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn


def sensor_examples(count=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [Example([{"role": "user", "content": "<sensor> which way?"},
                     {"role": "assistant", "content": "up" if i % 2 else "down"}],
                    {"sensor": [torch.randn(10 + i, 6, generator=g)]}) for i in range(count)]


def test_forward_and_generate_on_cuda_take_cpu_batches_and_match_the_cpu(tiny_model, mixed_batch):
    assert mixed_batch["input_ids"].device.type == "cpu"
    with torch.no_grad():
        expected = tiny_model(**mixed_batch).logits
        expected_ids = tiny_model.generate(**mixed_batch, max_new_tokens=4, do_sample=False, pad_token_id=0)
        model = tiny_model.to(CUDA)
        assert model.input_device.type == "cuda"
        got = model(**mixed_batch).logits
        got_ids = model.generate(**mixed_batch, max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert got.device.type == "cuda"
    assert ((got.cpu() - expected).abs().max() / expected.abs().max()).item() < 1e-4
    assert torch.equal(got_ids.cpu(), expected_ids)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_every_strategy_trains_on_cuda_with_an_evaluation_that_generates(tokenizer, strategy):
    """The crash case: the evaluate callback builds its own CPU batch and generates with the CUDA model."""
    model = build_preset("tiny-hcx-omni", seed=0)
    align_tokens(model, tokenizer)
    processor = OmniProcessor(tokenizer, model.config)
    question = sensor_examples(2, seed=9)
    evaluations = []

    def evaluate(m):
        batch = processor([e.messages[:1] for e in question], {"sensor": [e.inputs["sensor"][0] for e in question]},
                          padding_side="left")
        ids = m.generate(**batch, max_new_tokens=3, do_sample=False, pad_token_id=0)
        evaluations.append(ids.device.type)
        return {"score": float(ids.shape[1])}

    config = TrainConfig(strategy=strategy, modalities=["sensor"], epochs=2, batch_size=4, learning_rate=1e-3,
                         progress=False)
    result = Trainer(model, processor, sensor_examples(), config, evaluate=evaluate, log=lambda line: None).train()
    assert result.steps == 4 and evaluations == ["cuda", "cuda"]
    assert all(np.isfinite(h["loss"]) for h in result.history if "loss" in h)
    trained = [p for p in model.parameters() if p.requires_grad]
    assert trained and all(p.device.type == "cuda" for p in trained)
    if strategy == "qlora":  # bitsandbytes' CUDA kernels hold the LLM
        linear = model.language_model.model.layers[0].self_attn.q_proj
        base = getattr(linear, "base_layer", linear)
        assert type(base).__name__ == "Linear4bit" and base.weight.device.type == "cuda"


def test_bf16_mixed_precision_trains_on_cuda(tokenizer):
    model = build_preset("tiny-hcx-omni", seed=0)
    align_tokens(model, tokenizer)
    processor = OmniProcessor(tokenizer, model.config)
    config = TrainConfig(strategy="new-encoder", modalities=["sensor"], epochs=3, batch_size=4, learning_rate=1e-2,
                         weight_decay=0.0, mixed_precision="bf16", progress=False)
    result = Trainer(model, processor, sensor_examples(), config, log=lambda line: None).train()
    losses = [h["loss"] for h in result.history if "loss" in h]
    assert len(losses) == 6 and all(np.isfinite(losses)) and losses[-1] < losses[0]


def test_the_cli_trains_merges_chats_evaluates_and_extends_on_cuda(workspace, capsys):  # noqa: F811
    out = workspace / "run"
    torch.cuda.reset_peak_memory_stats()
    assert main(["train", "--llm", str(workspace / "llm"), "--add-imu", "imu", "--data",
                 str(workspace / "data" / "train.jsonl"), "--eval-data", str(workspace / "data" / "eval.jsonl"),
                 "--strategy", "lora-all", "--epochs", "2", "--batch-size", "2", "--select-by", "accuracy",
                 "--output", str(out)]) == 0
    assert torch.cuda.max_memory_allocated() > 0  # the Trainer put the model on the GPU
    checkpoint = out / "checkpoint"
    assert json.loads((out / "train_summary.json").read_text())["steps"] == 6
    assert main(["merge", str(checkpoint), "--output", str(workspace / "merged")]) == 0
    recording = workspace / "data" / "recordings" / "r0.npy"
    assert main(["chat", str(checkpoint), "--imu", str(recording), "--max-new-tokens", "3", "what?"]) == 0
    assert main(["evaluate", str(checkpoint), "--data", str(workspace / "data" / "eval.jsonl"),
                 "--output", str(workspace / "evaluation")]) == 0
    assert (workspace / "evaluation" / "evaluation.json").exists()
    assert main(["extend", str(workspace / "llm"), "--add-imu", "imu", "--output", str(workspace / "extended")]) == 0
    assert main(["estimate", "tiny-hcx-omni", "--strategy", "lora-all", "--seq", "64"]) == 0
    assert main(["plan", "tiny-hcx-omni", "--budget", "cuda:0=1GB", "--budget", "cpu=4GB"]) == 0
    assert "cuda:0" in capsys.readouterr().out

    # The library under the chat and evaluate commands, with the model on the GPU: CPU inputs, same answers.
    model, tokenizer = load_model(checkpoint)
    processor = OmniProcessor(tokenizer, model.config)
    item = {"imu": [np.load(recording)]}
    settings = GenerationSettings(max_new_tokens=4)
    on_cpu = chat(model, processor, "what?", item, settings)
    model.to(CUDA)
    assert chat(model, processor, "what?", item, settings) == on_cpu
    examples = read_jsonl(workspace / "data" / "eval.jsonl", model.config)
    evaluation = evaluate_examples(model, processor, examples, settings)
    assert evaluation.report.total == len(examples)


def test_the_activity_demo_runs_on_cuda(tmp_path):
    torch.cuda.reset_peak_memory_stats()
    assert main(["demo", "--epochs", "1", "--output", str(tmp_path), "--seed", "3"]) == 0
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["test_total"] == 40 and metrics["steps"] == 4
    assert torch.cuda.max_memory_allocated() > 100e6  # SmolLM2 (135 M parameters) was on the GPU


def test_mambamia_kernel_and_pure_scan_agree_with_random_weights_and_a_planted_error_fails(monkeypatch):
    pytest.importorskip("mamba_ssm")

    torch.manual_seed(0)
    compressor = MambaMiaCompressor(128, chunk_size=25, num_layers=1, head_dim=64, state_size=64, scan_block=64)
    with torch.no_grad():
        for name, parameter in compressor.named_parameters():
            if name.endswith(("out_proj.weight", "weight_fc.weight", "gate_fc.weight")):
                parameter.normal_(0.0, parameter.shape[-1] ** -0.5)
    compressor.to(CUDA)
    x = torch.randn(3, 300, 128, device=CUDA)
    lengths = torch.tensor([300, 170, 26])

    # Compared at the scan's output inside the compressor: the compressor's own output dilutes a scan error
    # ~100x (a planted 5 % dt error moves it by ~5e-4 only; docs/gpu.md).
    scans = []
    real_scan = mamba2.ssd_scan
    monkeypatch.setattr(mamba2, "ssd_scan", lambda *a, **k: scans.append(real_scan(*a, **k)) or scans[-1])

    def run(use_kernels):
        for module in compressor.modules():
            if hasattr(module, "use_kernels"):
                module.use_kernels = use_kernels
        compressor.zero_grad(set_to_none=True)
        out, _ = compressor(x, lengths)
        out.pow(2).mean().backward()
        return scans[-1].detach(), compressor.model.layers[0].mixer.A_log.grad.clone()

    pure, pure_grad = run(False)
    fast, fast_grad = run(True)
    # Triton multiplies float32 in TF32 (10-bit mantissa): 5e-3 is ten unit roundoffs (docs/gpu.md).
    assert ((fast - pure).abs().max() / pure.abs().max()).item() < 5e-3
    assert ((fast_grad - pure_grad).abs().max() / pure_grad.abs().max()).item() < 5e-2
    kernel = ssd.mamba_ssm_scan_kernel()
    wrong = lambda x, dt, *args, **kwargs: kernel(x, dt * 1.05, *args, **kwargs)  # noqa: E731
    monkeypatch.setattr(ssd, "scan_kernel_for", lambda x, use_kernels: wrong if use_kernels else None)
    planted, _ = run(True)
    assert ((planted - pure).abs().max() / pure.abs().max()).item() > 5e-3
