"""The OpenAI chat-completions protocol as this server speaks it: request models, response shapes, errors.

A request (``POST /v1/chat/completions``)::

    {"model": "imu-demo",
     "messages": [{"role": "user", "content": [
         {"type": "input_sensor", "input_sensor": {"modality": "imu", "data": [[ax, ay, az, gx, gy, gz], ...],
                                                   "sample_rate": 10}},
         {"type": "text", "text": "What activity is the person doing? Answer with one word: ..."}]}],
     "max_tokens": 16, "temperature": 0, "top_p": 1, "stop": ["\\n"], "stream": false,
     "stream_options": {"include_usage": true}}

``content`` is a string or a list of parts; a part is ``{"type": "text", "text": ...}`` or an
``input_sensor`` part, whose ``data`` is a ``(time, channels)`` array of numbers, or with
``"format": "csv"`` / ``"npy"`` the base64 of a CSV file (header row naming the channels) or a ``.npy``
file. Requests carry their data inline: no field names a file on the server. Unknown fields are
refused rather than ignored, so a client never believes an option took effect when it did not.

Responses are ``chat.completion`` objects, or with ``stream: true`` server-sent events of
``chat.completion.chunk`` objects ending with ``data: [DONE]``. Every error is
``{"error": {"message", "type", "param", "code"}}`` with the HTTP status of `APIError`.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from hcx_extend.inference import Answer, GenerationSettings

# Fields a request may carry that change nothing here; accepted so that common clients work unchanged.
IGNORED_FIELDS = ("user", "metadata", "store")


# ---------------------------------------------------------------------------------------- errors
class APIError(Exception):
    """An error answered as ``{"error": {"message", "type", "param", "code"}}`` with HTTP ``status``.

    Args:
        status: 400 bad request, 401 no or wrong key, 404 unknown route or model, 413 body too large,
            429 queue full, 500 the server failed, 503 shutting down, 504 timed out.
        message: what was expected, what came, and what to do.
        type: OpenAI's error type (``invalid_request_error``, ``authentication_error``, ...).
        param: the request field at fault, e.g. ``messages[0].content[1].input_sensor.data``.
        code: a short machine-readable code (``invalid_api_key``, ``queue_full``, ...).
    """

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def invalid_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    """A 400 ``invalid_request_error``."""
    return APIError(400, message, param=param, code=code)


# ---------------------------------------------------------------------------------------- requests
class SensorInput(BaseModel):
    """One recording: ``data`` is a ``(time, channels)`` array, or base64 text of a CSV / NPY file."""

    model_config = ConfigDict(extra="forbid")

    modality: str
    data: Any
    sample_rate: float | None = Field(None, gt=0, allow_inf_nan=False)
    format: Literal["csv", "npy"] | None = None


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["text"]
    text: str


class SensorPart(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["input_sensor"]
    input_sensor: SensorInput


ContentPart = Annotated[Union[TextPart, SensorPart], Field(discriminator="type")]
_PART_TYPES = ("text", "input_sensor")


class Message(BaseModel):
    """A chat message; string content is read as one text part. ``developer`` is read as ``system``."""

    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "developer", "user", "assistant"]
    content: list[ContentPart]
    name: str | None = None

    @field_validator("content", mode="before")
    @classmethod
    def _string_is_one_text_part(cls, value: Any) -> Any:
        return [{"type": "text", "text": value}] if isinstance(value, str) else value


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    include_usage: bool = False


class ChatCompletionRequest(BaseModel):
    """The body of ``POST /v1/chat/completions`` (the fields this server supports; others are refused)."""

    model_config = ConfigDict(extra="forbid")

    model: str
    messages: list[Message] = Field(min_length=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    stop: list[str] | None = Field(None, max_length=4)
    seed: int | None = None
    n: Literal[1] | None = None
    user: str | None = None
    metadata: dict[str, str] | None = None
    store: bool | None = None

    @field_validator("stop", mode="before")
    @classmethod
    def _one_stop_string_is_a_list(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value

    @field_validator("stop")
    @classmethod
    def _stop_strings_are_not_empty(cls, value: list[str] | None) -> list[str] | None:
        if value is not None and any(not s for s in value):
            raise ValueError("stop strings must not be empty")
        return value


def parse_request(body: bytes) -> ChatCompletionRequest:
    """The request in ``body`` (JSON bytes).

    Raises:
        APIError: 400 naming the first field at fault (``param``) and what it should be.
    """
    try:
        return ChatCompletionRequest.model_validate_json(body)
    except ValidationError as error:
        raise _validation_error(error) from None


def _validation_error(error: ValidationError) -> APIError:
    problems = error.errors(include_url=False)
    first = problems[0]
    loc = list(first["loc"])
    if first["type"] == "json_invalid":
        return invalid_request(f"the body is not valid JSON ({first['msg'].removeprefix('Invalid JSON: ')})")
    if first["type"] == "model_type" and not loc:
        return invalid_request("the body must be a JSON object with 'model' and 'messages'")
    param = _param(loc)
    if first["type"] == "extra_forbidden":
        field = loc[-1]
        if len(loc) == 1:
            supported = sorted(set(ChatCompletionRequest.model_fields) - set(IGNORED_FIELDS))
            message = f"unsupported field {field!r}; this server supports {', '.join(supported)}"
        elif "input_sensor" in loc:
            message = (f"{param}: unknown field {field!r}; an input_sensor part has modality, data, sample_rate and "
                       "format, and carries its data inline (the server reads no files)")
        else:
            message = f"{param}: unknown field {field!r}"
    else:
        message = f"{param}: {first['msg']}" if param else first["msg"]
    if len(problems) > 1:
        message += f" (and {len(problems) - 1} more problem(s))"
    return invalid_request(message, param=param or None)


def _param(loc: list[Any]) -> str:
    """``['messages', 0, 'content', 1, 'input_sensor', 'input_sensor', 'data']`` -> ``messages[0].content[1].input_sensor.data``.

    A content part's loc repeats its type (the union's tag) after its index; that repetition is dropped.
    """
    text = ""
    for position, key in enumerate(loc):
        if isinstance(key, int):
            text += f"[{key}]"
            continue
        after_part_index = position >= 2 and isinstance(loc[position - 1], int) and loc[position - 2] == "content"
        if after_part_index and key in _PART_TYPES:
            continue
        text += f".{key}" if text else str(key)
    return text


def generation_settings(request: ChatCompletionRequest, *, default_max_tokens: int,
                        max_tokens_limit: int) -> GenerationSettings:
    """The request's `GenerationSettings`: greedy unless ``temperature`` > 0.

    ``max_completion_tokens`` wins over ``max_tokens`` (OpenAI's newer name); neither gives ``default_max_tokens``.

    Raises:
        APIError: 400 when the request asks for more than ``max_tokens_limit`` tokens.
    """
    asked, param = request.max_completion_tokens, "max_completion_tokens"
    if asked is None:
        asked, param = request.max_tokens, "max_tokens"
    if asked is not None and asked > max_tokens_limit:
        raise invalid_request(f"{param} is {asked}, more than this server's limit of {max_tokens_limit} tokens; ask for "
                              "fewer (the limit is hcx-extend serve --max-tokens-limit)", param=param,
                              code="max_tokens_too_large")
    return GenerationSettings(
        max_new_tokens=asked if asked is not None else default_max_tokens,
        temperature=request.temperature if request.temperature is not None else 0.0,
        top_p=request.top_p if request.top_p is not None else 1.0,
        stop=tuple(request.stop or ()),
        seed=request.seed,
    )


# ---------------------------------------------------------------------------------------- responses
@dataclass(frozen=True)
class CompletionIdentity:
    """What every object of one completion shares: ``id`` (``chatcmpl-...``), ``created`` (Unix s), ``model``."""

    id: str
    created: int
    model: str

    @classmethod
    def new(cls, model: str, request_number: int) -> CompletionIdentity:
        return cls(f"chatcmpl-{time.time_ns():x}{request_number:x}", int(time.time()), model)


def usage_body(answer: Answer) -> dict[str, int]:
    return {"prompt_tokens": answer.prompt_tokens, "completion_tokens": answer.completion_tokens,
            "total_tokens": answer.prompt_tokens + answer.completion_tokens}


def completion_body(identity: CompletionIdentity, answer: Answer) -> dict[str, Any]:
    """A ``chat.completion`` object with one choice and the usage counts."""
    return {
        "id": identity.id,
        "object": "chat.completion",
        "created": identity.created,
        "model": identity.model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": answer.text},
                     "finish_reason": answer.finish_reason, "logprobs": None}],
        "usage": usage_body(answer),
    }


def chunk_body(identity: CompletionIdentity, delta: dict[str, str] | None, finish_reason: str | None = None,
               *, usage: dict[str, int] | None = None, with_usage_field: bool = False) -> dict[str, Any]:
    """A ``chat.completion.chunk``: one choice with ``delta`` (None = the usage-only chunk, no choices).

    With ``stream_options.include_usage`` every chunk has a ``usage`` field: null except on the last
    chunk, whose ``choices`` is empty.
    """
    chunk: dict[str, Any] = {"id": identity.id, "object": "chat.completion.chunk", "created": identity.created,
                             "model": identity.model, "choices": []}
    if delta is not None:
        chunk["choices"] = [{"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}]
    if with_usage_field:
        chunk["usage"] = usage
    return chunk


def sse_event(data: dict[str, Any] | str) -> bytes:
    """One server-sent event: ``data: <json>\\n\\n`` (or ``data: [DONE]\\n\\n`` for the string ``[DONE]``)."""
    text = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    return f"data: {text}\n\n".encode()
