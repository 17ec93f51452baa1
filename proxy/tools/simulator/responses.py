"""The Responses API: create (plain, streamed or in the background), retrieve, cancel, delete.

A stored response (the API's default, `store` not false) can be retrieved afterwards. One
created with `"background": true` answers `queued` and moves one step per retrieve:
`queued` -> `in_progress` (`poll_steps` retrieves in all) -> `completed`, with its output
and usage only once completed. Its text is decided when it is created, so a seeded
background response says what the same request answered in the foreground says.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

from aiohttp import web

from .generation import answer_words, prompt_tokens
from .lifecycle import Lifecycle, Progress
from .records import StoredResponse
from .state import SIM_STATE, SimulatorState
from .wire import ApiError, Call, Endpoint, json_response, now, send_events, sse_data

RESPONSE_LIFECYCLE = Lifecycle(created="queued", stages=("in_progress",), working="in_progress",
                               finished="completed")


def _response_object(call: Call, response_id: str, message_id: str, text: str, status: str,
                     created: int, words: int, background: bool) -> dict[str, Any]:
    output = [] if status == "in_progress" else [{
        "id": message_id, "type": "message", "status": "completed", "role": "assistant",
        "content": [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}]}]
    usage = None if status == "in_progress" else {
        "input_tokens": prompt_tokens(call), "input_tokens_details": {"cached_tokens": 0},
        "output_tokens": words, "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": prompt_tokens(call) + words}
    return {"id": response_id, "object": "response", "created_at": created, "status": status,
            "background": background, "error": None, "incomplete_details": None,
            "instructions": call.body.get("instructions"), "max_output_tokens": None,
            "model": f"{call.body.get('model', 'gpt-4o-mini')}-2024-07-18", "output": output,
            "parallel_tool_calls": True, "previous_response_id": None,
            "reasoning": {"effort": None, "summary": None}, "store": True,
            "temperature": call.body.get("temperature", 1.0),
            "text": {"format": {"type": "text"}}, "tool_choice": "auto", "tools": [],
            "top_p": 1.0, "truncation": "disabled", "usage": usage, "user": None, "metadata": {}}


def response_payload(call: Call, state: SimulatorState) -> dict[str, Any]:
    """A completed response to `call`, as the plain create answers it."""
    words = answer_words(call, state)
    return _response_object(call, "resp_" + uuid.uuid4().hex, "msg_" + uuid.uuid4().hex,
                            " ".join(words), "completed", int(time.time()), len(words),
                            bool(call.body.get("background")))


def _unfinished_view(final: dict[str, Any], status: str) -> dict[str, Any]:
    return {**final, "status": status, "output": [], "usage": None}


def _remember(state: SimulatorState, call: Call, final: dict[str, Any],
              progress: Progress | None) -> None:
    if call.body.get("store") is False:
        return
    state.resources.responses.add(final["id"], StoredResponse(final["id"], final, progress),
                                  state.resource_limit)


async def _create(request: web.Request, call: Call) -> web.StreamResponse:
    state = request.app[SIM_STATE]
    background = bool(call.body.get("background"))
    if background and call.body.get("store") is False:
        raise ApiError(400, "Background mode requires 'store' to be true.", param="store")
    words = answer_words(call, state)
    text = " ".join(words)
    response_id = "resp_" + uuid.uuid4().hex
    message_id = "msg_" + uuid.uuid4().hex
    created = int(time.time())
    final = _response_object(call, response_id, message_id, text, "completed", created,
                             len(words), background)
    if background and not call.body.get("stream"):
        progress = Progress(RESPONSE_LIFECYCLE, state.poll_steps, created)
        _remember(state, call, final, progress)
        return json_response(request, state, _unfinished_view(final, progress.status))
    _remember(state, call, final, None)
    if not call.body.get("stream"):
        return json_response(request, state, final)
    started = _response_object(call, response_id, message_id, "", "in_progress", created, 0,
                               background)
    sequence = iter(range(1_000_000))

    def event(name: str, payload: dict[str, Any]) -> bytes:
        body = {"type": name, "sequence_number": next(sequence), **payload}
        return f"event: {name}\n".encode() + sse_data(body)

    item = {"id": message_id, "type": "message", "status": "in_progress", "role": "assistant",
            "content": []}
    part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
    where = {"item_id": message_id, "output_index": 0, "content_index": 0}
    events = [event("response.created", {"response": started}),
              event("response.in_progress", {"response": started}),
              event("response.output_item.added", {"output_index": 0, "item": item}),
              event("response.content_part.added", {**where, "part": part})]
    for index, word in enumerate(words):
        events.append(event("response.output_text.delta",
                            {**where, "delta": word if index == 0 else " " + word,
                             "logprobs": []}))
    done_part = {**part, "text": text}
    events += [event("response.output_text.done", {**where, "text": text, "logprobs": []}),
               event("response.content_part.done", {**where, "part": done_part}),
               event("response.output_item.done", {"output_index": 0,
                                                   "item": final["output"][0]}),
               event("response.completed", {"response": final})]
    return await send_events(request, call, state, events)


def _stored(state: SimulatorState, call: Call) -> StoredResponse:
    response_id = call.params["response_id"]
    stored = state.resources.responses.get(response_id)
    if stored is None:
        raise ApiError(404, f"Response with id '{response_id}' not found.")
    return stored


def _view(stored: StoredResponse) -> dict[str, Any]:
    if stored.progress is None or stored.progress.status == "completed":
        return stored.final
    return _unfinished_view(stored.final, stored.progress.status)


async def _retrieve(request: web.Request, call: Call) -> web.StreamResponse:
    state = request.app[SIM_STATE]
    stored = _stored(state, call)
    if stored.progress is not None:
        stored.progress.advance(now())
    return json_response(request, state, _view(stored))


async def _cancel(request: web.Request, call: Call) -> web.StreamResponse:
    state = request.app[SIM_STATE]
    stored = _stored(state, call)
    if stored.progress is None:
        raise ApiError(400, "Only responses created with background=true can be cancelled.")
    if stored.progress.done and stored.progress.status != "cancelled":
        raise ApiError(400, f"Cannot cancel a response with status '{stored.progress.status}'.")
    stored.progress.interrupt("cancelled", now())
    return json_response(request, state, _view(stored))


async def _delete(request: web.Request, call: Call) -> web.StreamResponse:
    state = request.app[SIM_STATE]
    stored = _stored(state, call)
    state.resources.responses.pop(stored.id)
    return json_response(request, state, {"id": stored.id, "object": "response",
                                          "deleted": True})


ENDPOINTS = (
    Endpoint("POST", "responses", _create),
    Endpoint("GET", "responses/{response_id}", _retrieve, resource=True),
    Endpoint("DELETE", "responses/{response_id}", _delete, resource=True),
    Endpoint("POST", "responses/{response_id}/cancel", _cancel, resource=True),
)
