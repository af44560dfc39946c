"""Ask a model about its inputs: chats with modality items in, answers out. Used by everything that generates.

`answer` runs one padded batch of chats through ``generate`` and returns an `Answer` per chat (text,
token counts, why it stopped). `with_markers` puts a marker for each item into a
prompt that has none. The CLI's ``chat``, the recipes' evaluation, ``hcx-extend evaluate`` and the
HTTP server all call these, so they all answer the same way.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
from transformers.generation.streamers import BaseStreamer

from hcx_extend.config import OmniConfig
from hcx_extend.model import OmniForCausalLM
from hcx_extend.processor import OmniProcessor

Chat = list[dict[str, str]]


@dataclass(frozen=True)
class GenerationSettings:
    """How to generate.

    Args:
        max_new_tokens: the most tokens an answer may have (>= 1).
        temperature: 0 = greedy (deterministic); > 0 samples from the softened distribution.
        top_p: nucleus sampling mass in (0, 1] (used when sampling).
        stop: strings that end an answer; the answer is cut before the first one.
        seed: seeds the sampler (None = torch's current state).
    """

    max_new_tokens: int = 32
    temperature: float = 0.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None

    def __post_init__(self):
        if not isinstance(self.max_new_tokens, int) or isinstance(self.max_new_tokens, bool) or self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be an integer >= 1, got {self.max_new_tokens!r}")
        if not isinstance(self.temperature, (int, float)) or not 0 <= self.temperature <= 100:
            raise ValueError(f"temperature must be a number in [0, 100], got {self.temperature!r}")
        if not isinstance(self.top_p, (int, float)) or not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise ValueError(f"stop must be non-empty strings, got {self.stop!r}")


@dataclass
class Answer:
    """One generated answer.

    Attributes:
        text: the answer, special tokens removed, cut before a stop string.
        prompt_tokens: tokens of the prompt (modality placeholders included).
        completion_tokens: tokens generated (up to the end-of-turn token or the stop string).
        finish_reason: "stop" (end of turn or a stop string) or "length" (``max_new_tokens`` reached).
    """

    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str


class _RowStreamer(BaseStreamer):
    """Calls ``on_text(row, new_text)`` as each row of a batched ``generate`` grows (the prompt is skipped)."""

    def __init__(self, processor: OmniProcessor, rows: int, on_text: Callable[[int, str], None]):
        self.processor = processor
        self.on_text = on_text
        self.tokens: list[list[int]] = [[] for _ in range(rows)]
        self.shown = [""] * rows
        self.prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        for row, token in enumerate(value.reshape(len(self.tokens), -1)[:, -1].tolist()):
            self.tokens[row].append(token)
            text = self.processor.decode(self.tokens[row])
            # Only emit text that cannot change any more (an incomplete UTF-8 sequence decodes to U+FFFD).
            if text.startswith(self.shown[row]) and not text.endswith("\ufffd") and len(text) > len(self.shown[row]):
                self.on_text(row, text[len(self.shown[row]):])
                self.shown[row] = text

    def end(self) -> None:
        pass


@torch.no_grad()
def answer(
    model: OmniForCausalLM,
    processor: OmniProcessor,
    chats: Sequence[Chat],
    inputs: dict[str, Sequence[Any]] | None = None,
    settings: GenerationSettings = GenerationSettings(),
    *,
    on_text: Callable[[int, str], None] | None = None,
) -> list[Answer]:
    """Answer ``chats`` (each ends with a user turn) in one padded batch.

    Args:
        model: the model (any device; the batch follows it).
        processor: builds the batch; its tokenizer decodes the answers.
        chats: one chat per answer; markers (``<imu>``) say where items go.
        inputs: ``{modality: [item, ...]}`` in order of appearance across the chats.
        settings: `GenerationSettings`.
        on_text: called with ``(chat index, new text)`` while answers are generated (streaming).

    Raises:
        ValueError: bad inputs (the processor's and the encoders' messages).
    """
    if not chats:
        return []
    batch = processor(list(chats), inputs or {}, padding_side="left")
    tokenizer = processor.tokenizer
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    sampling = settings.temperature > 0
    options: dict[str, Any] = {"max_new_tokens": settings.max_new_tokens, "do_sample": sampling, "pad_token_id": pad}
    if sampling:
        options.update(temperature=float(settings.temperature), top_p=float(settings.top_p), top_k=0)
        if settings.seed is not None:
            torch.manual_seed(settings.seed)
    else:
        options.update(temperature=None, top_p=None, top_k=None)
    if settings.stop:
        options.update(stop_strings=list(settings.stop), tokenizer=tokenizer)
    if on_text is not None:
        options["streamer"] = _RowStreamer(processor, len(chats), on_text)
    generated = model.generate(**batch, **options)
    prompt_width = batch["input_ids"].shape[1]
    prompt_lengths = batch["attention_mask"].sum(1).tolist()
    answers = []
    ends = {tokenizer.eos_token_id, pad} - {None}
    for row, length in zip(generated[:, prompt_width:].tolist(), prompt_lengths):
        tokens = []
        for token in row:
            if token in ends:
                break
            tokens.append(token)
        finish = "stop" if len(tokens) < settings.max_new_tokens else "length"
        text = processor.decode(tokens)
        for stop in settings.stop:
            if stop in text:
                text, finish = text[:text.index(stop)], "stop"
        answers.append(Answer(text=text.strip(), prompt_tokens=int(length), completion_tokens=len(tokens),
                              finish_reason=finish))
    return answers


def chat(model: OmniForCausalLM, processor: OmniProcessor, prompt: str, inputs: dict[str, Sequence[Any]] | None = None,
         settings: GenerationSettings = GenerationSettings()) -> str:
    """One question about some items; markers are added in front when the prompt has none."""
    prompt = with_markers(prompt, processor.config, {name: len(items) for name, items in (inputs or {}).items()})
    return answer(model, processor, [[{"role": "user", "content": prompt}]], inputs, settings)[0].text


def with_markers(prompt: str, config: OmniConfig, counts: dict[str, int]) -> str:
    """``prompt`` with a marker put in front for each item it does not mark itself.

    ``with_markers("What is this?", config, {"imu": 1})`` -> ``"<imu> What is this?"``. A prompt with
    more markers than items is left for the processor to reject.
    """
    missing = []
    for name, count in counts.items():
        marker = config.modality(name).marker
        missing += [marker] * max(0, count - prompt.count(marker))
    return " ".join(missing + [prompt]) if missing else prompt


@dataclass
class Conversation:
    """An interactive chat that keeps the model loaded: each `ask` is answered with the items given so far."""

    model: OmniForCausalLM
    processor: OmniProcessor
    settings: GenerationSettings = GenerationSettings()
    inputs: dict[str, list[Any]] = field(default_factory=dict)

    def ask(self, prompt: str) -> str:
        return chat(self.model, self.processor, prompt, self.inputs, self.settings)
