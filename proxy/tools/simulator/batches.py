"""The Batch API: a JSONL file of requests, answered by the same generators as direct calls.

A batch answers `validating` when created and moves one step per retrieve: `validating` ->
`in_progress` -> `finalizing` -> `completed` (with the default `poll_steps` of 2; more steps
stay `in_progress` longer). Once completed it has an `output_file_id`: one line per input line,
in input order, each the answer a direct call with that body gets (a seeded line says what the
same seeded call says). Lines the generators refuse go to `error_file_id`. An input file with
malformed lines fails on the first retrieve, with the lines named in `errors`. Cancelling shows
`cancelling` until the next retrieve, then `cancelled`.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

import orjson
from aiohttp import web

from .files import require_file, store_file
from .generation import (
    Payload,
    chat_payload,
    completion_payload,
    embeddings_payload,
    image_payload,
    moderation_payload,
)
from .lifecycle import Lifecycle, Progress
from .records import BatchRecord
from .responses import response_payload
from .state import SIM_STATE, SimulatorState
from .wire import ApiError, Call, Endpoint, json_response, missing, now, page

BATCH_LIFECYCLE = Lifecycle(created="validating", stages=("in_progress", "finalizing"),
                            working="in_progress", finished="completed")

# The batch endpoints the simulator can answer, by route; the API's others are refused.
_RUNNERS: Mapping[str, Payload] = MappingProxyType({
    "chat/completions": chat_payload,
    "completions": completion_payload,
    "embeddings": embeddings_payload,
    "responses": response_payload,
    "moderations": moderation_payload,
    "images/generations": image_payload,
})
_MAX_LISTED_ERRORS = 100


def _route_of(url: str) -> str:
    """`/v1/chat/completions` (OpenAI) and `/chat/completions` (Azure) name the same route."""
    return url.removeprefix("/v1/").removeprefix("/")


def _validate_lines(content: bytes, route: str) -> tuple[int, list[dict[str, Any]], str | None]:
    """(request count, errors by line, the first request's model)."""
    errors: list[dict[str, Any]] = []
    seen: set[str] = set()
    count = 0
    model: str | None = None

    def fail(line: int, code: str, message: str, param: str | None = None) -> None:
        if len(errors) < _MAX_LISTED_ERRORS:
            errors.append({"code": code, "message": message, "param": param, "line": line})

    for number, text in enumerate(content.splitlines(), start=1):
        if not text.strip():
            continue
        count += 1
        try:
            request = orjson.loads(text)
        except orjson.JSONDecodeError:
            fail(number, "invalid_json_line", "This line is not parseable as valid JSON.")
            continue
        if not isinstance(request, dict):
            fail(number, "invalid_json_line", "This line is not a JSON object.")
            continue
        for name in ("custom_id", "method", "url", "body"):
            if name not in request:
                fail(number, "missing_required_parameter", f"Missing required parameter: "
                     f"'{name}'.", name)
        custom_id = request.get("custom_id")
        if isinstance(custom_id, str):
            if custom_id in seen:
                fail(number, "duplicate_custom_id", "The custom_id for this request is a "
                     "duplicate of another request. The custom_id parameter must be unique "
                     "for each request in a batch.", "custom_id")
            seen.add(custom_id)
        if "method" in request and request["method"] != "POST":
            fail(number, "invalid_method", "The method must be POST.", "method")
        if "url" in request and _route_of(str(request["url"])) != route:
            fail(number, "mismatched_url", "The url of this request does not match the "
                 "endpoint of the batch.", "url")
        body = request.get("body")
        if "body" in request and not isinstance(body, dict):
            fail(number, "invalid_body", "The body must be a JSON object.", "body")
        elif isinstance(body, dict) and model is None and isinstance(body.get("model"), str):
            model = body["model"]
    if count == 0:
        fail(1, "empty_file", "The input file has no requests.")
    return count, errors, model


def _run(batch: BatchRecord, state: SimulatorState) -> None:
    """Answer every line through the route's generator, as a direct call would be answered."""
    if batch.pending_input is None or batch.output_lines is not None:
        return
    runner = _RUNNERS[batch.route]
    provider = batch.provider
    outputs: list[bytes] = []
    refusals: list[bytes] = []
    input_tokens = output_tokens = 0
    for text in batch.pending_input.splitlines():
        if not text.strip():
            continue
        request = orjson.loads(text)
        body = request["body"]
        call = Call(provider, batch.route, None, body, orjson.dumps(body), None)
        line_id = "batch_req_" + uuid.uuid4().hex
        request_id = uuid.uuid4().hex
        try:
            payload = runner(call, state)
        except ApiError as error:
            refusal = {"error": {"message": error.message, "type": error.type,
                                 "param": error.param, "code": error.code}}
            refusals.append(orjson.dumps({
                "id": line_id, "custom_id": request["custom_id"],
                "response": {"status_code": error.status, "request_id": request_id,
                             "body": refusal}, "error": None}))
            continue
        usage = payload.get("usage") or {}
        input_tokens += int(usage.get("prompt_tokens", usage.get("input_tokens", 0)))
        output_tokens += int(usage.get("completion_tokens", usage.get("output_tokens", 0)))
        outputs.append(orjson.dumps({
            "id": line_id, "custom_id": request["custom_id"],
            "response": {"status_code": 200, "request_id": request_id, "body": payload},
            "error": None}))
    batch.output_lines, batch.error_lines = outputs, refusals
    batch.completed, batch.failed = len(outputs), len(refusals)
    batch.usage = _usage(input_tokens, output_tokens)


def _usage(input_tokens: int, output_tokens: int) -> dict[str, Any]:
    return {"input_tokens": input_tokens, "input_tokens_details": {"cached_tokens": 0},
            "output_tokens": output_tokens, "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": input_tokens + output_tokens}


def _file_results(batch: BatchRecord, state: SimulatorState) -> None:
    if batch.output_lines:
        batch.output_file_id = store_file(state, f"{batch.id}_output.jsonl", "batch_output",
                                          b"".join(line + b"\n" for line in batch.output_lines)).id
    if batch.error_lines:
        batch.error_file_id = store_file(state, f"{batch.id}_error.jsonl", "batch_output",
                                         b"".join(line + b"\n" for line in batch.error_lines)).id
    batch.output_lines = batch.error_lines = None


def _advance(batch: BatchRecord, state: SimulatorState) -> None:
    batch.progress.advance(now())
    status = batch.progress.status
    if status in ("finalizing", "completed"):
        _run(batch, state)
    if batch.progress.done:
        # A batch cancelled while finalizing keeps the answers it had, like the API's partial
        # results.
        if batch.output_lines is not None:
            _file_results(batch, state)
        batch.pending_input = None


def batch_object(batch: BatchRecord) -> dict[str, Any]:
    status = batch.progress.status
    reached = batch.progress.reached_at
    counted = status not in ("validating", "failed")
    return {
        "id": batch.id, "object": "batch", "endpoint": batch.endpoint,
        "errors": {"object": "list", "data": batch.errors} if batch.errors else None,
        "input_file_id": batch.input_file_id, "completion_window": batch.completion_window,
        "status": status, "output_file_id": batch.output_file_id,
        "error_file_id": batch.error_file_id, "created_at": batch.created_at,
        "in_progress_at": reached.get("in_progress"), "expires_at": batch.created_at + 86_400,
        "finalizing_at": reached.get("finalizing"), "completed_at": reached.get("completed"),
        "failed_at": reached.get("failed"), "expired_at": None,
        "cancelling_at": reached.get("cancelling"), "cancelled_at": reached.get("cancelled"),
        "request_counts": {"total": batch.line_count if counted else 0,
                           "completed": batch.completed, "failed": batch.failed},
        "metadata": batch.metadata, "model": batch.model,
        "usage": batch.usage or _usage(0, 0),
    }


async def _create(request: web.Request, call: Call) -> web.StreamResponse:
    state = request.app[SIM_STATE]
    for name in ("input_file_id", "endpoint", "completion_window"):
        if not call.body.get(name):
            raise missing(name)
    endpoint = str(call.body["endpoint"])
    route = _route_of(endpoint)
    if route not in _RUNNERS:
        raise ApiError(400, f"Invalid value for 'endpoint': the simulator runs batches for "
                       f"{sorted('/v1/' + name for name in _RUNNERS)}, not {endpoint!r}.",
                       param="endpoint")
    if call.body["completion_window"] != "24h":
        raise ApiError(400, "Invalid value for 'completion_window': only '24h' is supported.",
                       param="completion_window")
    input_file = require_file(state, str(call.body["input_file_id"]), param="input_file_id")
    if input_file.purpose != "batch":
        raise ApiError(400, f"The input file must have purpose 'batch', not "
                       f"'{input_file.purpose}'.", param="input_file_id")
    count, errors, model = _validate_lines(input_file.content, route)
    created = now()
    progress = Progress(BATCH_LIFECYCLE, state.poll_steps, created)
    batch = BatchRecord(
        id="batch_" + uuid.uuid4().hex, provider=call.provider, endpoint=endpoint, route=route,
        input_file_id=input_file.id, completion_window="24h",
        metadata=call.body.get("metadata"), created_at=created, progress=progress,
        line_count=count, pending_input=None if errors else input_file.content, model=model,
        errors=errors or None)
    if errors:
        progress.interrupt("failed", created, showing="validating")
    state.resources.batches.add(batch.id, batch, state.resource_limit)
    return json_response(request, state, batch_object(batch))


def _batch(state: SimulatorState, call: Call) -> BatchRecord:
    batch_id = call.params["batch_id"]
    batch = state.resources.batches.get(batch_id)
    if batch is None:
        raise ApiError(404, f"No batch found with id '{batch_id}'.", param="batch_id")
    return batch


async def _retrieve(request: web.Request, call: Call) -> web.StreamResponse:
    state = request.app[SIM_STATE]
    batch = _batch(state, call)
    _advance(batch, state)
    return json_response(request, state, batch_object(batch))


async def _cancel(request: web.Request, call: Call) -> web.StreamResponse:
    state = request.app[SIM_STATE]
    batch = _batch(state, call)
    status = batch.progress.status
    if batch.progress.done and status != "cancelled":
        raise ApiError(400, f"Cannot cancel a batch with status '{status}'.")
    if status != "cancelled":
        batch.progress.interrupt("cancelled", now(), showing="cancelling")
    return json_response(request, state, batch_object(batch))


async def _list(request: web.Request, call: Call) -> web.StreamResponse:
    state = request.app[SIM_STATE]
    batches = [batch_object(batch) for batch in state.resources.batches.newest_first()]
    return json_response(request, state, page(request, batches))


ENDPOINTS = (
    Endpoint("POST", "batches", _create, resource=True),
    Endpoint("GET", "batches", _list, resource=True),
    Endpoint("GET", "batches/{batch_id}", _retrieve, resource=True),
    Endpoint("POST", "batches/{batch_id}/cancel", _cancel, resource=True),
)
