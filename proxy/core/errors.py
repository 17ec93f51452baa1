"""Errors a client or a CLI user can meet, each rendered in the OpenAI error shape."""

from __future__ import annotations

from typing import Any

import orjson


class ProxyError(Exception):
    """An error answered to the client as `{"error": {"message", "type", "code"}}`."""

    status = 400
    type = "invalid_request_error"
    code = "invalid_request"

    def __init__(self, message: str, *, status: int | None = None, code: str | None = None,
                 type: str | None = None, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if status is not None:
            self.status = status
        if code is not None:
            self.code = code
        if type is not None:
            self.type = type
        self.param = param

    def body(self) -> bytes:
        return error_body(self.message, self.type, self.code, self.param)


class ReplayMiss(ProxyError):
    """No recording matches and the mode forbids going upstream."""

    status = 404
    type = "replay_miss"
    code = "replay_miss"


class CassetteError(ProxyError):
    """A stored cassette file cannot be used (corrupt, or from a newer format)."""

    status = 500
    type = "cassette_error"
    code = "cassette_corrupt"


class UpstreamError(ProxyError):
    """The upstream could not be reached or broke the exchange."""

    status = 502
    type = "upstream_error"
    code = "upstream_unreachable"


class StoreUnavailable(ProxyError):
    """The shared store cannot be reached (a Redis node down, a connection pool exhausted).
    Nothing was half-stored for the request (a write Redis did not confirm is stored whole
    once it answers again, or not at all); the same request succeeds once the store is back."""

    status = 503
    type = "store_error"
    code = "store_unavailable"


def error_body(message: str, type: str, code: str, param: str | None = None) -> bytes:
    payload: dict[str, Any] = {"message": message, "type": type, "param": param, "code": code}
    return orjson.dumps({"error": payload})
