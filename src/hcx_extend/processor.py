"""`OmniProcessor`: chats with modality markers plus raw inputs -> model inputs.

Where placeholders go is decided here, and only here. A prompt such as ``"<imu> What is the person
doing?"`` is rendered with the LLM's chat template; every marker is then replaced by as many
placeholder ids as the item yields embeddings (after the encoder's own downsampling and any
compressor), and the raw items are packed into the batch dict their encoder takes.

Items are given per modality as one flat list in order of appearance across the batch: the first
``<imu>`` marker of the first sample takes ``imu[0]``, and so on.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import torch
from tokenizers import AddedToken

from hcx_extend.compressors import compressed_length
from hcx_extend.config import IGNORE_INDEX, OmniConfig
from hcx_extend.encoders import get_encoder

Message = dict[str, str]
Sample = str | Sequence[Message]


SPECIAL_ID_FIELDS = ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id")


def declared_special_ids(sections: Iterable[tuple[str, Any]]) -> dict[int, str]:
    """``{token id: "<where> <field>"}`` for every BOS/EOS/PAD/UNK id in ``(where, config dict)`` pairs.

    A field may hold one id or a list (generation configs often list several EOS ids); values that are
    not integers are left to the config's own checks. The first place that declares an id names it.
    """
    declared: dict[int, str] = {}
    for where, section in sections:
        if not isinstance(section, dict):
            continue
        for name in SPECIAL_ID_FIELDS:
            value = section.get(name)
            for token_id in value if isinstance(value, list) else [value]:
                if isinstance(token_id, int) and not isinstance(token_id, bool):
                    declared.setdefault(token_id, f"{where} {name}")
    return declared


def reserved_token_ids(model, tokenizer, declared: dict[int, str] | None = None) -> dict[int, str]:
    """The ids no placeholder may take, each with what claims it: ``{id: "the tokenizer's BOS token"}``.

    They are the tokenizer's BOS/EOS/PAD/UNK, those of the LLM config and ``declared`` (what a checkpoint's
    config.json and generation_config.json declare: `hcx_extend.checkpoint.Source.special_ids`). A
    placeholder on one of them would turn every BOS (or EOS, PAD) into a modality item.
    """
    reserved = {getattr(tokenizer, f"{kind}_token_id"): f"the tokenizer's {kind.upper()} token"
                for kind in ("bos", "eos", "pad", "unk")}
    reserved.pop(None, None)
    text_config = {name: getattr(model.config.text_config, name, None) for name in SPECIAL_ID_FIELDS}
    for token_id, where in [*declared_special_ids([("the LLM config", text_config)]).items(),
                            *(declared or {}).items()]:
        reserved.setdefault(token_id, where)
    return reserved


def align_tokens(model, tokenizer, declared: dict[int, str] | None = None) -> list[str]:
    """Make tokenizer, config and embeddings agree on every modality's placeholder token.

    * token in the tokenizer, id unset: take the tokenizer's id, if the token is an added token of its
      own (not an ordinary vocabulary entry and not a reserved id, see below);
    * token in the tokenizer with another id than the config's: ValueError (one of them is wrong);
    * token missing and id unset: add the token as a special token and take its id;
    * token missing but id set: the config's id is used as is (the processor inserts ids directly),
      unless the tokenizer already uses that id for another token.

    No placeholder may end on a reserved id (`reserved_token_ids`: BOS/EOS/PAD/UNK of the tokenizer, of
    the LLM config and ``declared``), whichever way it got its id; the existing modalities are checked too.

    Then the model's embeddings grow if the tokenizer has more ids than the model has rows (existing
    rows stay bit-identical). An explicit id outside the vocabulary raises ValueError.

    Returns the tokens that were added.

    Raises:
        ValueError: an empty tokenizer, or a placeholder that would collide with another token.
    """
    if tokenizer is None or len(tokenizer) == 0:
        raise ValueError("the tokenizer is missing or empty; pass the LLM's own tokenizer (a folder with "
                         "tokenizer.json, or the .gguf file it came with)")
    vocab = tokenizer.get_vocab()
    added_vocab = set(tokenizer.get_added_vocab())
    reserved = reserved_token_ids(model, tokenizer, declared)
    to_add = []
    for modality in model.config.modalities.values():
        known = vocab.get(modality.token)
        if known is not None:
            if known in reserved or modality.token not in added_vocab:
                owner = reserved.get(known, "the tokenizer's ordinary token")
                raise ValueError(
                    f"{modality.name}: placeholder token {modality.token!r} is already {owner} {known}; give the "
                    "modality a token string of its own (e.g. '<|NAME_PAD|>')"
                )
            if modality.token_id is None:
                modality.token_id = known
            elif modality.token_id != known:
                raise ValueError(
                    f"{modality.name}: config says placeholder id {modality.token_id} but the tokenizer has "
                    f"{modality.token!r} at {known}; fix token_id or token"
                )
        elif modality.token_id is None:
            to_add.append(modality)
        elif modality.token_id < len(tokenizer):
            other = tokenizer.convert_ids_to_tokens(modality.token_id)
            if other is not None:
                raise ValueError(
                    f"{modality.name}: placeholder id {modality.token_id} is the tokenizer's token {other!r}; "
                    "unset token_id so a new token is added, or pick an id the tokenizer does not use"
                )
    if to_add:
        tokenizer.add_tokens([AddedToken(m.token, special=True, normalized=False) for m in to_add], special_tokens=True)
        for modality in to_add:
            modality.token_id = tokenizer.convert_tokens_to_ids(modality.token)
    added = {m.name for m in to_add}
    for modality in model.config.modalities.values():
        if modality.token_id not in reserved:
            continue
        if modality.name in added:  # the configs declare an id beyond the tokenizer's own: not the LLM's tokenizer
            raise ValueError(
                f"{modality.name}: the tokenizer gave the new placeholder {modality.token!r} id {modality.token_id}, "
                f"which is {reserved[modality.token_id]}; this tokenizer does not match the checkpoint: pass the "
                "LLM's own tokenizer"
            )
        raise ValueError(
            f"{modality.name}: placeholder id {modality.token_id} is {reserved[modality.token_id]}; set token_id to "
            "an id no special token uses, or unset it so a new token is added"
        )
    # Grow for the tokenizer's ids only; an explicit id outside the vocabulary is an error (below).
    vocab = tokenizer.get_vocab()
    needed = max([len(tokenizer)] + [vocab[m.token] + 1 for m in model.config.modalities.values() if m.token in vocab])
    if needed > model.get_input_embeddings().num_embeddings:
        model.resize_vocab(needed)
    model.config.validate_modalities()
    model.check_placeholder_ids()
    return [m.token for m in to_add]


@dataclass
class _Piece:
    """Part of a rendered prompt: text to tokenize, or the placeholder run of one item."""

    text: str | None = None
    modality: str | None = None


class OmniProcessor:
    """Builds ``input_ids``/``attention_mask``/``labels`` and per-modality batches.

    Args:
        tokenizer: the LLM's tokenizer (its chat template renders chats).
        config: the model's `OmniConfig`; run `align_tokens` first so every modality has a token id.
    """

    def __init__(self, tokenizer, config: OmniConfig):
        self.tokenizer = tokenizer
        self.config = config
        missing = [m.name for m in config.modalities.values() if m.token_id is None]
        if missing:
            raise ValueError(f"modalities {missing} have no placeholder id; call align_tokens(model, tokenizer) first")
        for modality in config.modalities.values():
            if modality.input is None:  # a config not yet used to build a model
                modality.input = get_encoder(modality.encoder["model_type"]).resolve_contract(modality)

    # ------------------------------------------------------------------ public
    def __call__(
        self,
        samples: Sample | Sequence[Sample],
        inputs: dict[str, Sequence[Any]] | None = None,
        *,
        add_generation_prompt: bool = True,
        return_labels: bool = False,
        padding_side: str = "left",
        use_chat_template: bool = True,
    ) -> dict[str, Any]:
        """Tokenize a batch.

        Args:
            samples: one sample or a list; a sample is a chat (list of ``{"role", "content"}``) or a plain
                string (used verbatim, no template).
            inputs: ``{modality name: [item, ...]}``, items in order of appearance across the batch.
            add_generation_prompt: end prompts with the assistant header (inference). Ignored for samples
                whose last message is the assistant's answer when ``return_labels`` is set.
            return_labels: for chats ending with an assistant message, label only the answer tokens.
            padding_side: "left" for generation, "right" for training.
            use_chat_template: render chats with the tokenizer's chat template.

        Returns:
            ``{"input_ids", "attention_mask", ["labels"], "modality_inputs"}`` as tensors.
        """
        if isinstance(samples, str) or (isinstance(samples, (list, tuple)) and samples and isinstance(samples[0], dict)):
            samples = [samples]
        if not isinstance(samples, (list, tuple)) or not samples or not all(
                isinstance(sample, (str, list, tuple)) for sample in samples):
            raise ValueError("samples must be a string, a chat (a list of {'role', 'content'} messages) or a non-empty "
                             f"list of those; got {type(samples).__name__}")
        if inputs is not None and not isinstance(inputs, dict):
            raise ValueError(f"inputs must be a dict of modality name -> list of items, got {type(inputs).__name__}")
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        inputs = dict(inputs or {})
        for name in inputs:
            self.config.modality(name)
        batches = {name: self._collate(name, items) for name, items in inputs.items() if len(items)}
        counts = {name: self._token_counts(name, batch) for name, batch in batches.items()}
        used = {name: 0 for name in inputs}

        rows, label_rows = [], []
        for sample in samples:
            prompt, answer = self._render(sample, add_generation_prompt, return_labels, use_chat_template)
            prompt_ids = self._tokenize(prompt, counts, used)
            answer_ids = self._tokenize(answer, counts, used) if answer else []
            rows.append(prompt_ids + answer_ids)
            label_rows.append([IGNORE_INDEX] * len(prompt_ids) + answer_ids)
        for name, items in inputs.items():
            if used[name] != len(items):
                marker = self.config.modality(name).marker
                raise ValueError(
                    f"{name}: the text has {used[name]} {marker} marker(s) but {len(items)} item(s) were given; "
                    "give one item per marker"
                )

        output = self._pad(rows, label_rows if return_labels else None, padding_side)
        output["modality_inputs"] = batches
        return output

    def decode(self, token_ids: torch.Tensor | Sequence[int]) -> str:
        return self.tokenizer.decode(token_ids, skip_special_tokens=True).strip()

    # ------------------------------------------------------------------ steps
    def _collate(self, name: str, items: Sequence[Any]) -> dict[str, torch.Tensor]:
        modality = self.config.modality(name)
        return get_encoder(modality.encoder["model_type"]).collate(list(items), modality)

    def _token_counts(self, name: str, batch: dict[str, torch.Tensor]) -> list[int]:
        modality = self.config.modality(name)
        encoder_counts = get_encoder(modality.encoder["model_type"]).token_counts(batch, modality)
        return [compressed_length(modality.compressor, n) for n in encoder_counts]

    def placeholder_counts(self, name: str, items: Sequence[Any]) -> list[int]:
        """How many placeholder tokens (LLM positions) each item of modality ``name`` takes."""
        return self._token_counts(name, self._collate(name, items))

    def _render(self, sample: Sample, add_generation_prompt: bool, return_labels: bool, use_chat_template: bool):
        """(prompt text, answer text or None)."""
        if isinstance(sample, str):
            return sample, None
        messages = list(sample)
        if not messages or any(not isinstance(m, dict) or "role" not in m or "content" not in m for m in messages):
            raise ValueError("a chat must be a non-empty list of {'role': ..., 'content': ...} messages")
        template = self._template if use_chat_template else self._plain
        if return_labels and messages[-1]["role"] == "assistant":
            prompt = template(messages[:-1], True)
            full = template(messages, False)
            if not full.startswith(prompt):
                raise ValueError("the chat template does not render the prompt as a prefix of the full chat")
            return prompt, full[len(prompt):]
        return template(messages, add_generation_prompt), None

    def _template(self, messages: list[Message], add_generation_prompt: bool) -> str:
        if getattr(self.tokenizer, "chat_template", None) is None:
            return self._plain(messages, add_generation_prompt)
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)

    @staticmethod
    def _plain(messages: list[Message], add_generation_prompt: bool) -> str:
        text = "".join(f"{m['role']}: {m['content']}\n" for m in messages)
        return text + ("assistant: " if add_generation_prompt else "")

    def _split(self, text: str) -> list[_Piece]:
        by_marker = {m.marker: m.name for m in self.config.modalities.values()}
        pattern = "|".join(re.escape(marker) for marker in sorted(by_marker, key=len, reverse=True))
        pieces, position = [], 0
        for match in re.finditer(pattern, text) if pattern else ():
            if match.start() > position:
                pieces.append(_Piece(text=text[position:match.start()]))
            pieces.append(_Piece(modality=by_marker[match.group(0)]))
            position = match.end()
        if position < len(text):
            pieces.append(_Piece(text=text[position:]))
        return pieces

    def _tokenize(self, text: str, counts: dict[str, list[int]], used: dict[str, int]) -> list[int]:
        ids: list[int] = []
        for piece in self._split(text):
            if piece.text is not None:
                ids.extend(self.tokenizer(piece.text, add_special_tokens=False)["input_ids"])
                continue
            name = piece.modality
            modality = self.config.modality(name)
            available = counts.get(name, [])
            index = used.get(name, 0)
            if index >= len(available):
                raise ValueError(
                    f"{name}: the text has more {modality.marker} markers than the {len(available)} item(s) given"
                )
            ids.extend([modality.token_id] * available[index])
            used[name] = index + 1
        return ids

    def _pad(self, rows: list[list[int]], label_rows: list[list[int]] | None, side: str) -> dict[str, Any]:
        pad_id = self.tokenizer.pad_token_id
        if pad_id is None:
            pad_id = self.tokenizer.eos_token_id if self.tokenizer.eos_token_id is not None else 0
        width = max(len(r) for r in rows)
        input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
        labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
        for i, row in enumerate(rows):
            span = slice(width - len(row), width) if side == "left" else slice(0, len(row))
            input_ids[i, span] = torch.tensor(row, dtype=torch.long)
            attention_mask[i, span] = 1
            if label_rows is not None:
                labels[i, span] = torch.tensor(label_rows[i], dtype=torch.long)
        output: dict[str, Any] = {"input_ids": input_ids, "attention_mask": attention_mask}
        if label_rows is not None:
            output["labels"] = labels
        return output
