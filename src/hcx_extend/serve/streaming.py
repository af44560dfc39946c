"""A streamed answer as OpenAI sends it: ``chat.completion.chunk`` server-sent events.

The events of one completion, in order::

    data: {... "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": null}]}
    data: {... "choices": [{"index": 0, "delta": {"content": "walk"}, "finish_reason": null}]}
    ...
    data: {... "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}
    data: {... "choices": [], "usage": {"prompt_tokens": 40, ...}}      (with stream_options.include_usage)
    data: [DONE]

The text of the deltas joined is exactly the non-streamed answer: `StopHoldback` keeps back any text
that could still turn out to be (the start of) a stop string, and trailing whitespace, which the final
answer does not have. A failure after the first event (generation failed, the request timed out) is an
``data: {"error": {...}}`` event, after which the stream ends without ``[DONE]``; the official client
raises it as an ``APIError``.
"""

from __future__ import annotations

import asyncio
from typing import AsyncIterator, Sequence

from hcx_extend.serve.batching import Failed, Finished, Inbox, Job, TextDelta
from hcx_extend.serve.protocol import APIError, CompletionIdentity, chunk_body, sse_event, usage_body


class StopHoldback:
    """Passes text on as it grows, never showing a stop string or what follows it.

    ``push`` returns the text that is now safe to show; ``finish`` the rest, given the final answer.
    """

    def __init__(self, stops: Sequence[str]):
        self.stops = tuple(stops)
        self.longest = max((len(s) for s in self.stops), default=0)
        self.received = ""
        self.sent = ""
        self.stopped = False

    def push(self, text: str) -> str:
        if self.stopped:
            return ""
        self.received += text
        cut = [self.received.find(s) for s in self.stops if s in self.received]
        if cut:
            self.stopped = True
            safe = self.received[:min(cut)]
        else:
            safe = self.received[:len(self.received) - self.longest + 1] if self.longest else self.received
        return self._send(safe.rstrip())

    def finish(self, final: str) -> str:
        """The rest of ``final`` (the answer as `answer` returned it) not yet sent."""
        return final[len(self.sent):] if final.startswith(self.sent) else ""

    def _send(self, safe: str) -> str:
        if len(safe) <= len(self.sent) or not safe.startswith(self.sent):
            return ""
        new, self.sent = safe[len(self.sent):], safe
        return new


async def stream_completion(identity: CompletionIdentity, job: Job, inbox: Inbox, *, include_usage: bool,
                            deadline: float, timeout_message: str) -> AsyncIterator[bytes]:
    """The SSE byte chunks of ``job``'s answer, read from ``inbox`` until it finishes or ``deadline`` (loop time).

    The job has been `Started` already. Marks the job cancelled if the stream ends early (the client left).
    """
    loop = asyncio.get_running_loop()
    holdback = StopHoldback(job.settings.stop)

    def chunk(delta, finish_reason=None):
        return sse_event(chunk_body(identity, delta, finish_reason, with_usage_field=include_usage))

    finished = False
    try:
        yield chunk({"role": "assistant", "content": ""})
        while True:
            try:
                event = await inbox.next(deadline - loop.time())
            except asyncio.TimeoutError:
                error = APIError(504, timeout_message, type="server_error", code="timeout")
                yield sse_event(error.body())
                return
            if isinstance(event, TextDelta):
                text = holdback.push(event.text)
                if text:
                    yield chunk({"content": text})
            elif isinstance(event, Finished):
                finished = True
                rest = holdback.finish(event.answer.text)
                if rest:
                    yield chunk({"content": rest})
                yield chunk({}, event.answer.finish_reason)
                if include_usage:
                    yield sse_event(chunk_body(identity, None, usage=usage_body(event.answer), with_usage_field=True))
                yield sse_event("[DONE]")
                return
            elif isinstance(event, Failed):
                finished = True
                yield sse_event(event.error.body())
                return
    finally:
        if not finished:
            job.cancelled = True
