"""``hcx-extend serve``: an OpenAI-compatible chat-completions server for sensor inputs, and its page.

A request's ``input_sensor`` content parts become modality markers at their place in the chat and
items for the processor; a single worker thread owns the model and answers the requests that arrive
together as one padded batch through `hcx_extend.inference.answer`.

    protocol.py   request models, response and chunk shapes, OpenAI-shaped errors (`APIError`)
    content.py    messages with content parts -> chat with markers + modality items (sensor data decoded, checked)
    batching.py   `BatchWorker`: bounded queue, batch window, grouping by generation settings, events per request
    streaming.py  server-sent chunks of one answer; stop strings held back
    options.py    `ServeOptions`: address, key, batch size, queue, limits, timeout
    app.py        `create_app`: the FastAPI routes, key check, body limit, error shapes
    server.py     `run_server`: load a checkpoint once, run uvicorn, shut down gracefully
    page.html     the page at ``/`` (no external resources)
"""

from hcx_extend.serve.app import create_app
from hcx_extend.serve.options import ServeOptions
from hcx_extend.serve.server import default_model_name, run_server

__all__ = ["ServeOptions", "create_app", "default_model_name", "run_server"]
