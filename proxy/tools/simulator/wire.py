"""What every simulated route shares: the call it receives, and answers in the API's formats."""

from __future__ import annotations

import asyncio
import gzip
import secrets
import string
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import BodyPartReader, web

from .state import SimulatorState


@dataclass(frozen=True)
class Call:
    provider: str
    route: str
    deployment: str | None
    body: dict[str, Any]
    raw: bytes  # empty for multipart bodies, which their handler reads itself
    fault: str | None
    params: Mapping[str, str] = field(default_factory=dict)  # path parameters, e.g. batch_id


Reply = Callable[[web.Request, Call], Awaitable[web.StreamResponse]]


@dataclass(frozen=True)
class Endpoint:
    method: str
    pattern: str  # "batches/{batch_id}"; also the key of `calls_by_route`
    reply: Reply
    # A stateful resource route: Azure serves it at /openai/<route>?api-version=... (never
    # under /deployments/), like its files, batches, vector stores and fine-tuning routes.
    resource: bool = False


class ApiError(Exception):
    """An answer in the OpenAI error shape, raised by a handler and rendered by the dispatcher."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 code: str | None = None, param: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.code = code
        self.param = param


@dataclass(frozen=True)
class FormPart:
    name: str
    filename: str | None  # set for a file part
    content: bytes


async def read_form(request: web.Request) -> dict[str, FormPart]:
    """A multipart/form-data body by part name, read with aiohttp's own multipart reader.

    The proxy keys multipart bodies with its own parser; reading them here with another one
    keeps the simulator from agreeing with the proxy merely by sharing its mistakes.
    """
    if not request.content_type.startswith("multipart/form-data"):
        raise ApiError(400, "Expected a multipart/form-data body.")
    parts: dict[str, FormPart] = {}
    try:
        reader = await request.multipart()
        while (part := await reader.next()) is not None:
            if not isinstance(part, BodyPartReader) or part.name is None:
                raise ApiError(400, "A multipart part has no name.")
            parts[part.name] = FormPart(part.name, part.filename,
                                        bytes(await part.read(decode=True)))
    except ValueError as error:
        raise ApiError(400, f"Could not parse the multipart body: {error}.") from None
    return parts


def missing(name: str) -> ApiError:
    return ApiError(400, f"Missing required parameter: '{name}'.",
                    code="missing_required_parameter", param=name)


def openai_error(status: int, message: str, type: str, code: str | None,
                 headers: dict[str, str] | None = None, param: str | None = None) -> web.Response:
    body = {"error": {"message": message, "type": type, "param": param, "code": code}}
    return web.Response(status=status, body=orjson.dumps(body, option=orjson.OPT_INDENT_2) + b"\n",
                        content_type="application/json", headers=openai_headers() | (headers or {}))


def azure_error(status: int, code: str, message: str) -> web.Response:
    return web.Response(status=status, body=orjson.dumps({"error": {"code": code,
                                                                    "message": message}}),
                        content_type="application/json")


def openai_headers() -> dict[str, str]:
    return {
        "openai-organization": "org-simulatedorg1234",
        "openai-project": "proj_simulatedproject1",
        "openai-processing-ms": "42",
        "openai-version": "2020-10-01",
        "x-request-id": "req_" + uuid.uuid4().hex,
        "x-ratelimit-remaining-requests": "9999",
        "set-cookie": "__cf_bm=simulatedcookievalue; path=/; HttpOnly",
    }


def json_response(request: web.Request, state: SimulatorState, payload: Any, status: int = 200,
                  extra_headers: dict[str, str] | None = None) -> web.Response:
    body = orjson.dumps(payload, option=orjson.OPT_INDENT_2) + b"\n"
    headers = openai_headers() | (extra_headers or {})
    if state.gzip and "gzip" in request.headers.get("Accept-Encoding", ""):
        body = gzip.compress(body)
        headers["Content-Encoding"] = "gzip"
    return web.Response(status=status, body=body, headers=headers,
                        content_type="application/json")


def poll_hint(state: SimulatorState, unfinished: bool) -> dict[str, str]:
    """The header the SDK's poll helpers sleep by (a second when it is missing)."""
    return {"openai-poll-after-ms": str(state.poll_after_ms)} if unfinished else {}


async def maybe_cut_body(request: web.Request, call: Call, response: web.Response
                         ) -> web.StreamResponse:
    """`reset_body` fault: send the head and half the body, then drop the connection."""
    if call.fault != "reset_body":
        return response
    body = response.body
    assert isinstance(body, bytes)
    partial = web.StreamResponse(status=response.status, headers={
        "Content-Type": "application/json", "Content-Length": str(len(body))})
    await partial.prepare(request)
    await partial.write(body[: len(body) // 2])
    assert request.transport is not None
    request.transport.abort()
    return partial


def _stream_response() -> web.StreamResponse:
    return web.StreamResponse(headers={**openai_headers(),
                                       "Content-Type": "text/event-stream; charset=utf-8",
                                       "Cache-Control": "no-cache"})


async def send_events(request: web.Request, call: Call, state: SimulatorState,
                      events: list[bytes]) -> web.StreamResponse:
    response = _stream_response()
    await response.prepare(request)
    cut_after = int(call.fault.partition(":")[2]) if call.fault and call.fault.startswith("cut:") \
        else None
    for index, event in enumerate(events):
        if cut_after is not None and index >= cut_after:
            assert request.transport is not None
            request.transport.abort()
            return response
        await response.write(event)
        if state.event_delay:
            await asyncio.sleep(state.event_delay)
    await response.write_eof()
    return response


def sse_data(payload: Any) -> bytes:
    return b"data: " + orjson.dumps(payload) + b"\n\n"


_ID_ALPHABET = string.ascii_letters + string.digits


def new_id(prefix: str, length: int = 24) -> str:
    """`file-` + base62, like the real ids (their length varies by kind)."""
    return prefix + "".join(secrets.choice(_ID_ALPHABET) for _ in range(length))


def now() -> int:
    return int(time.time())


def page(request: web.Request, items: Sequence[dict[str, Any]], default_limit: int = 20
         ) -> dict[str, Any]:
    """A cursor page (`after`, `limit`, `order`) as the list routes answer; items newest first."""
    ordered = list(items)
    if request.query.get("order") == "asc":
        ordered.reverse()
    after = request.query.get("after")
    if after is not None:
        ids = [item["id"] for item in ordered]
        ordered = ordered[ids.index(after) + 1:] if after in ids else []
    try:
        limit = int(request.query.get("limit", default_limit))
    except ValueError:
        raise ApiError(400, "Invalid 'limit': expected an integer.", param="limit") from None
    shown = ordered[: max(limit, 1)]
    return {"object": "list", "data": shown,
            "first_id": shown[0]["id"] if shown else None,
            "last_id": shown[-1]["id"] if shown else None,
            "has_more": len(ordered) > len(shown)}
