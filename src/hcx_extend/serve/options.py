"""`ServeOptions`: how the server listens, batches and limits requests (``hcx-extend serve`` options)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ServeOptions:
    """Settings of one server.

    Args:
        host: address to bind; 127.0.0.1 (this machine only) unless told otherwise.
        port: TCP port.
        api_key: when set, ``/v1/*`` requests need ``Authorization: Bearer <api_key>`` (401 otherwise).
        model_name: the model id in ``/v1/models`` and responses; requests must name it.
        max_batch_size: the most requests generated together in one batch.
        batch_window_s: how long the batch worker waits for more requests after the first arrives.
        max_queue: the most requests waiting for the worker; more are answered 429.
        max_body_bytes: the largest request body; larger ones are answered 413.
        max_tokens_limit: the most tokens a request may ask for (``max_tokens``); more is a 400.
        default_max_tokens: the answer length when a request does not say.
        request_timeout_s: a request not answered within this many seconds (queueing included) gets 504.
    """

    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    model_name: str = "model"
    max_batch_size: int = 32
    batch_window_s: float = 0.01
    max_queue: int = 128
    max_body_bytes: int = 8 * 1024 * 1024
    max_tokens_limit: int = 1024
    default_max_tokens: int = 128
    request_timeout_s: float = 300.0

    def __post_init__(self):
        for name in ("max_batch_size", "max_queue", "max_body_bytes", "max_tokens_limit", "default_max_tokens"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be in 0..65535, got {self.port}")
        if self.batch_window_s < 0 or not self.request_timeout_s > 0:
            raise ValueError(f"batch_window_s must be >= 0 and request_timeout_s > 0, got {self.batch_window_s} and "
                             f"{self.request_timeout_s}")
        if self.default_max_tokens > self.max_tokens_limit:
            raise ValueError(f"default_max_tokens ({self.default_max_tokens}) is above max_tokens_limit "
                             f"({self.max_tokens_limit}); lower it or raise the limit")
        if self.api_key is not None and not self.api_key.strip():
            raise ValueError("api_key must not be empty; leave it out to serve without a key")
        if not self.model_name:
            raise ValueError("model_name must not be empty")
