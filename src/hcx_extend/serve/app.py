"""The FastAPI app: OpenAI-compatible routes over one `BatchWorker`.

Routes::

    GET  /                     the page (page.html): upload a recording, plot it, ask, watch the answer stream
    GET  /health               {"status": "ok" | "draining", "model", "queued", "in_flight", "batches", "requests",
                                "failed", "largest_batch", "batch_sizes": {"size": count}}
    GET  /v1/models            {"object": "list", "data": [{"id", "object": "model", "created", "owned_by",
                                "modalities": {name: {"kind", "marker", "channels", "channel_names",
                                "sample_rate", "max_length"}}}]}
    POST /v1/chat/completions  see protocol.py; JSON, or server-sent events with "stream": true

With an API key set, ``/v1/*`` needs ``Authorization: Bearer KEY``; ``/`` and ``/health`` are open (the
page asks for the key). Statuses: 400 bad request (the library's own message for bad sensor data),
401 no or wrong key, 404 unknown route or model, 405 wrong method, 413 body over the limit, 429 queue
full, 500 generation failed, 503 shutting down, 504 not answered within the request timeout. Every
error body is ``{"error": {"message", "type", "param", "code"}}``.
"""

from __future__ import annotations

import asyncio
import hmac
import itertools
import time
from contextlib import asynccontextmanager
from importlib.resources import files
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from hcx_extend.model import OmniForCausalLM
from hcx_extend.processor import OmniProcessor
from hcx_extend.serve.batching import BatchWorker, Failed, Finished, Inbox, Job, QueueFull, Started, WorkerClosed
from hcx_extend.serve.content import read_messages
from hcx_extend.serve.options import ServeOptions
from hcx_extend.serve.protocol import (
    APIError,
    CompletionIdentity,
    completion_body,
    generation_settings,
    parse_request,
)
from hcx_extend.serve.streaming import stream_completion

ROUTES = "GET /, GET /health, GET /v1/models, POST /v1/chat/completions"


def create_app(model: OmniForCausalLM, processor: OmniProcessor, options: ServeOptions = ServeOptions(), *,
               worker: BatchWorker | None = None) -> FastAPI:
    """The app serving ``model``; its lifespan starts the batch worker and, at shutdown, drains it.

    Args:
        worker: the batch worker (default: one built from ``options``).
    """
    worker = worker or BatchWorker(model, processor, max_batch_size=options.max_batch_size,
                                   window_s=options.batch_window_s, max_queue=options.max_queue)
    page = files("hcx_extend.serve").joinpath("page.html").read_text(encoding="utf-8")
    created = int(time.time())
    numbers = itertools.count()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        worker.start()
        yield
        # uvicorn has stopped accepting connections and waited for the requests in flight; what is still
        # queued belongs to requests whose clients are waiting too, so the worker answers it before stopping.
        await run_in_threadpool(worker.close)

    app = FastAPI(title="hcx-extend", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.worker = worker

    @app.exception_handler(APIError)
    async def api_error(request: Request, error: APIError) -> JSONResponse:
        return JSONResponse(error.body(), status_code=error.status)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, error: HTTPException) -> JSONResponse:
        if error.status_code == 404:
            message = f"unknown route {request.method} {request.url.path}; this server has {ROUTES}"
            code = "not_found"
        elif error.status_code == 405:
            message = f"{request.method} is not allowed on {request.url.path}; this server has {ROUTES}"
            code = "method_not_allowed"
        else:
            message, code = str(error.detail), None
        return JSONResponse(APIError(error.status_code, message, code=code).body(), status_code=error.status_code,
                            headers=getattr(error, "headers", None))

    def check_key(request: Request) -> None:
        if options.api_key is None:
            return
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), options.api_key.encode()):
            raise APIError(401, "missing or wrong API key; send the header 'Authorization: Bearer KEY' with the key "
                           "given to hcx-extend serve --api-key", type="authentication_error", code="invalid_api_key")

    @app.get("/", response_class=HTMLResponse)
    async def index() -> HTMLResponse:
        return HTMLResponse(page)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "draining" if worker.closed else "ok", "model": options.model_name, **worker.stats()}

    @app.get("/v1/models")
    async def models(request: Request) -> dict[str, Any]:
        check_key(request)
        return {"object": "list", "data": [{"id": options.model_name, "object": "model", "created": created,
                                             "owned_by": "hcx-extend", "modalities": _modalities(processor)}]}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        check_key(request)
        body = await _read_body(request, options.max_body_bytes)
        parsed = parse_request(body)
        if parsed.model != options.model_name:
            raise APIError(404, f"model {parsed.model!r} is not served here; this server serves {options.model_name!r} "
                           "(GET /v1/models)", param="model", code="model_not_found")
        settings = generation_settings(parsed, default_max_tokens=options.default_max_tokens,
                                       max_tokens_limit=options.max_tokens_limit)
        prompt = await run_in_threadpool(read_messages, parsed.messages, processor)

        loop = asyncio.get_running_loop()
        deadline = loop.time() + options.request_timeout_s
        inbox = Inbox(loop)
        job = Job(prompt, settings, inbox.deliver, streams=parsed.stream)
        try:
            worker.submit(job)
        except QueueFull:
            raise APIError(429, f"the server is busy: {options.max_queue} requests are already waiting; retry shortly",
                           type="rate_limit_error", code="queue_full") from None
        except WorkerClosed:
            raise APIError(503, "the server is shutting down and takes no new requests", type="server_error",
                           code="shutting_down") from None
        identity = CompletionIdentity.new(options.model_name, next(numbers))
        timeout_message = (f"the request was not answered within {options.request_timeout_s:g} s (the server is busy "
                           "or max_tokens is large); retry later, ask for fewer tokens, or raise --request-timeout")
        try:
            event = await _next_outcome(inbox, deadline, loop, stop_at_start=parsed.stream)
        except asyncio.TimeoutError:
            job.cancelled = True
            raise APIError(504, timeout_message, type="server_error", code="timeout") from None
        except asyncio.CancelledError:
            job.cancelled = True
            raise
        if isinstance(event, Failed):
            raise event.error
        if isinstance(event, Finished):
            return completion_body(identity, event.answer)
        include_usage = bool(parsed.stream_options and parsed.stream_options.include_usage)
        stream = stream_completion(identity, job, inbox, include_usage=include_usage, deadline=deadline,
                                   timeout_message=timeout_message)
        return StreamingResponse(stream, media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    return app


async def _next_outcome(inbox: Inbox, deadline: float, loop: asyncio.AbstractEventLoop, *, stop_at_start: bool):
    """Wait for `Finished`/`Failed`, or for `Started` when streaming (the stream takes the events after it)."""
    while True:
        event = await inbox.next(deadline - loop.time())
        if isinstance(event, (Finished, Failed)) or (stop_at_start and isinstance(event, Started)):
            return event


async def _read_body(request: Request, limit: int) -> bytes:
    """The body, refused (413) as soon as it is known to pass ``limit`` bytes, before it is read whole."""
    too_large = APIError(413, f"the request body is larger than this server's limit of {limit:,} bytes; send a "
                         "shorter recording or split it (the limit is hcx-extend serve --max-body-bytes)",
                         code="request_too_large")
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise too_large
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise too_large
    return bytes(body)


def _modalities(processor: OmniProcessor) -> dict[str, dict[str, Any]]:
    described = {}
    for name, modality in processor.config.modalities.items():
        contract = modality.input
        described[name] = {"kind": contract.kind if contract else None, "marker": modality.marker}
        if contract is not None and contract.kind == "sensor":
            described[name].update(channels=contract.channels, channel_names=contract.channel_names,
                                   sample_rate=contract.sample_rate, max_length=contract.max_length)
    return described
