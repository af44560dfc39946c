import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

from tiny_tokenizer import make_tokenizer  # noqa: E402

from hcx_extend import OmniProcessor, align_tokens, build_preset  # noqa: E402


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module of small steps: avoids oversubscription when the CPU is shared (5x
    faster then). Modules opt in with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def tokenizer():
    return make_tokenizer()


@pytest.fixture
def tiny_model(tokenizer):
    """The tiny HCX-Omni preset (image, video, audio, sensor) in eval mode, tokens aligned."""
    model = build_preset("tiny-hcx-omni", seed=0).eval()
    align_tokens(model, tokenizer)
    return model


@pytest.fixture
def processor(tiny_model, tokenizer):
    return OmniProcessor(tokenizer, tiny_model.config)


@pytest.fixture
def mixed_batch(processor):
    """Two chats using image, audio and sensor items, several per sample, of different sizes."""
    torch.manual_seed(1)
    samples = [
        [{"role": "user", "content": "<image> then <sensor> what?"}],
        [{"role": "user", "content": "<audio> and <sensor>, <image>, <sensor>?"}],
    ]
    inputs = {
        "image": [torch.rand(3, 56, 56), torch.rand(3, 28, 84)],
        "audio": [torch.randn(16, 50)],
        "sensor": [torch.randn(20, 6), torch.randn(7, 6), torch.randn(33, 6)],
    }
    return processor(samples, inputs, padding_side="left")
