"""Train the tiny preset for a few steps; run alone or under `accelerate launch --num_processes N --cpu`.

Writes the trained parameters (rank 0) to OUT/params.safetensors. Used by test_distributed.py, which
says why the model trains in float64 and why the process group is destroyed before exit.
"""

import gc
import sys
from pathlib import Path

import torch
from accelerate import Accelerator
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).parent))

from tiny_tokenizer import make_tokenizer  # noqa: E402

from hcx_extend import OmniForCausalLM, OmniProcessor, align_tokens, preset_config  # noqa: E402
from hcx_extend.data.examples import Example
from hcx_extend.training import TrainConfig, Trainer  # noqa: E402


def train(out: Path) -> Accelerator:
    """Train, save the parameters (rank 0) and return the accelerator; the trainer goes with this frame."""
    config = preset_config("tiny-hcx-omni")
    config.modality("sensor").encoder["dropout"] = 0.0  # processes draw different random numbers
    torch.manual_seed(0)
    model = OmniForCausalLM(config).to(torch.float64)  # rounding of other summation orders: see the test
    tokenizer = make_tokenizer()
    align_tokens(model, tokenizer)
    processor = OmniProcessor(tokenizer, model.config)
    generator = torch.Generator().manual_seed(0)
    examples = [
        Example([{"role": "user", "content": "<sensor> which way?"},
                 {"role": "assistant", "content": "up" if i % 2 else "down"}],
                {"sensor": [torch.randn(8 + i, 6, generator=generator)]})
        for i in range(8)
    ]
    train_config = TrainConfig(strategy="new-encoder", modalities=["sensor"], epochs=2, batch_size=4,
                               learning_rate=1e-3, progress=False)
    trainer = Trainer(model, processor, examples, train_config, log=lambda line: None)
    trainer.train()
    if trainer.accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        params = {n: p.detach().contiguous() for n, p in model.named_parameters() if p.requires_grad}
        save_file(params, out / "params.safetensors")
        (out / "world").write_text(str(trainer.accelerator.num_processes))
    return trainer.accelerator


def leave_process_group(accelerator: Accelerator) -> None:
    """Destroy the gloo group while Python is fully alive, so gloo's threads are joined before exit.

    A process that exits with the group alive can abort (SIGABRT, "terminate called without an active
    exception"): a gloo thread that drops the last collective's tensors needs the GIL, and a thread that
    asks for it while the interpreter finalises is ended with pthread_exit, which unwinds into C++ code
    that may not throw. Destroying the group is not enough while the DDP wrapper still holds it, so
    accelerate's references to the wrapper (the trainer's went with `train`'s frame) are dropped first.
    """
    accelerator.wait_for_everyone()
    accelerator.free_memory()
    gc.collect()
    accelerator.end_training()


if __name__ == "__main__":
    leave_process_group(train(Path(sys.argv[1])))
