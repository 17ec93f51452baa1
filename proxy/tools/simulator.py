"""A local stand-in for the OpenAI and Azure OpenAI APIs, honest to their wire formats.

Tests, demos and benchmarks run against it because the real APIs are not reachable offline.
It answers chat, legacy completions, embeddings, responses, models, moderations, images and
audio on both URL layouts, streams like the real service, and can be steered while it runs:
change the `system_fingerprint`, make seeded answers vary, add latency, inject faults.
Control it in-process through `SimulatorState`, or over HTTP at `/_sim/state`.
"""

from __future__ import annotations

import asyncio
import base64
import gzip
import hashlib
import random
import struct
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web

from ..core.canonical import multipart_parts

_WORDS = (
    "the quick brown fox jumps over a lazy dog while seven bright stars shine above "
    "quiet hills and rivers carry stories of distant mountains toward patient oceans where "
    "curious whales sing ancient songs about tides moons planets comets and gentle winds"
).split()
_CREATED = 1_700_000_000


@dataclass
class SimulatorState:
    """Knobs a test can turn while the simulator runs."""

    fingerprint: str | None = "fp_sim_a1b2c3"
    variance: int = 0  # bump to change seeded answers under the same fingerprint
    api_key: str | None = None  # when set, only this key is accepted
    latency: float = 0.0  # seconds before the response head
    event_delay: float = 0.0  # seconds between stream events
    gzip: bool = True  # compress JSON bodies when the client accepts gzip
    faults: list[str] = field(default_factory=list)  # one-shot: status:500, reset, cut:N, hang:S
    calls: int = 0
    calls_by_route: Counter[str] = field(default_factory=Counter)
    last_headers: dict[str, str] = field(default_factory=dict)

    def update(self, changes: dict[str, Any]) -> None:
        for name in ("fingerprint", "variance", "api_key", "latency", "event_delay", "gzip"):
            if name in changes:
                setattr(self, name, changes[name])
        if "faults" in changes:
            self.faults = list(changes["faults"])
        if changes.get("reset_calls"):
            self.calls = 0
            self.calls_by_route.clear()

    def public(self) -> dict[str, Any]:
        return {"fingerprint": self.fingerprint, "variance": self.variance,
                "latency": self.latency, "event_delay": self.event_delay, "faults": self.faults,
                "calls": self.calls, "calls_by_route": dict(self.calls_by_route)}


SIM_STATE = web.AppKey("sim_state", SimulatorState)
Reply = Callable[[web.Request, "Call"], Awaitable[web.StreamResponse]]


@dataclass(frozen=True)
class Call:
    provider: str
    route: str
    deployment: str | None
    body: dict[str, Any]
    raw: bytes
    fault: str | None


def create_simulator(state: SimulatorState | None = None) -> web.Application:
    app = web.Application(client_max_size=64 * 1024 * 1024)
    app[SIM_STATE] = state or SimulatorState()
    app.router.add_get("/_sim/state", _get_state)
    app.router.add_post("/_sim/state", _set_state)
    app.router.add_route("*", "/{tail:.*}", _dispatch)
    return app


async def _get_state(request: web.Request) -> web.Response:
    return web.json_response(request.app[SIM_STATE].public())


async def _set_state(request: web.Request) -> web.Response:
    state = request.app[SIM_STATE]
    state.update(await request.json())
    return web.json_response(state.public())


_ROUTES: dict[tuple[str, str], Reply] = {}


def _route(method: str, route: str) -> Callable[[Reply], Reply]:
    def register(reply: Reply) -> Reply:
        _ROUTES[(method, route)] = reply
        return reply
    return register


def _split(path: str) -> tuple[str, str, str | None] | None:
    if path.startswith("/v1/"):
        return "openai", path[4:], None
    if path.startswith("/openai/deployments/"):
        deployment, _, tail = path[len("/openai/deployments/"):].partition("/")
        return "azure", tail, deployment
    if path.startswith("/openai/v1/"):
        return "azure", path[len("/openai/v1/"):], None
    if path.startswith("/openai/"):
        return "azure", path[len("/openai/"):], None
    return None


async def _dispatch(request: web.Request) -> web.StreamResponse:
    state = request.app[SIM_STATE]
    located = _split(request.path)
    if located is None:
        return _openai_error(404, f"Invalid URL ({request.method} {request.path})",
                             "invalid_request_error", None)
    provider, route, deployment = located
    state.calls += 1
    state.calls_by_route[route] += 1
    state.last_headers = {k.lower(): v for k, v in request.headers.items()}
    fault = state.faults.pop(0) if state.faults else None
    if provider == "azure" and deployment is not None and "api-version" not in request.query:
        return _azure_error(400, "MissingApiVersionParameter",
                            "The api-version query parameter (?api-version=) is required for all "
                            "requests.")
    denied = _check_auth(request, state, provider)
    if denied is not None:
        return denied
    if state.latency:
        await asyncio.sleep(state.latency)
    if fault is not None:
        faulted = await _early_fault(request, fault)
        if faulted is not None:
            return faulted
    reply = _ROUTES.get((request.method, route))
    if reply is None and request.method == "GET" and route.startswith("models/"):
        reply = _retrieve_model
    if reply is None:
        return _openai_error(404, f"Invalid URL ({request.method} /v1/{route})",
                             "invalid_request_error", None)
    raw = await request.read()
    body: dict[str, Any] = {}
    content_type = request.headers.get("Content-Type", "")
    if raw and content_type.startswith("application/json"):
        try:
            parsed = orjson.loads(raw)
        except orjson.JSONDecodeError:
            return _openai_error(400, "We could not parse the JSON body of your request.",
                                 "invalid_request_error", None)
        if not isinstance(parsed, dict):
            return _openai_error(400, "The request body must be a JSON object.",
                                 "invalid_request_error", None)
        body = parsed
    if deployment is not None:
        body.setdefault("model", deployment)
    return await reply(request, Call(provider, route, deployment, body, raw, fault))


def _check_auth(request: web.Request, state: SimulatorState, provider: str) -> web.Response | None:
    presented = request.headers.get("api-key", "")
    authorization = request.headers.get("Authorization", "")
    if authorization.lower().startswith("bearer "):
        presented = authorization[7:].strip()
    if presented and (state.api_key is None or presented == state.api_key):
        return None
    if provider == "azure":
        return _azure_error(401, "401", "Access denied due to invalid subscription key or wrong "
                            "API endpoint. Make sure to provide a valid key for an active "
                            "subscription and use a correct regional API endpoint for your "
                            "resource.")
    if not presented:
        return _openai_error(401, "You didn't provide an API key. You need to provide your API "
                             "key in an Authorization header using Bearer auth (i.e. "
                             "Authorization: Bearer YOUR_KEY).", "invalid_request_error", None)
    masked = presented[:3] + "*" * max(len(presented) - 7, 0) + presented[-4:]
    return _openai_error(401, f"Incorrect API key provided: {masked}. You can find your API key "
                         "at https://platform.openai.com/account/api-keys.",
                         "invalid_request_error", "invalid_api_key")


async def _early_fault(request: web.Request, fault: str) -> web.StreamResponse | None:
    kind, _, argument = fault.partition(":")
    if kind == "status":
        status = int(argument)
        if status == 429:
            return _openai_error(429, "Rate limit reached for requests. Please try again in 1s.",
                                 "requests", "rate_limit_exceeded", {"retry-after": "1"})
        return _openai_error(status, "The server had an error while processing your request. "
                             "Sorry about that!", "server_error", None)
    if kind == "hang":
        await asyncio.sleep(float(argument or 30))
        return None
    if kind == "reset":
        assert request.transport is not None
        request.transport.abort()
        raise ConnectionResetError("simulated reset")
    return None


def _openai_error(status: int, message: str, type: str, code: str | None,
                  headers: dict[str, str] | None = None) -> web.Response:
    body = {"error": {"message": message, "type": type, "param": None, "code": code}}
    return web.Response(status=status, body=orjson.dumps(body, option=orjson.OPT_INDENT_2) + b"\n",
                        content_type="application/json", headers=_headers() | (headers or {}))


def _azure_error(status: int, code: str, message: str) -> web.Response:
    return web.Response(status=status, body=orjson.dumps({"error": {"code": code,
                                                                    "message": message}}),
                        content_type="application/json")


def _headers() -> dict[str, str]:
    return {
        "openai-organization": "org-simulatedorg1234",
        "openai-project": "proj_simulatedproject1",
        "openai-processing-ms": "42",
        "openai-version": "2020-10-01",
        "x-request-id": "req_" + uuid.uuid4().hex,
        "x-ratelimit-remaining-requests": "9999",
        "set-cookie": "__cf_bm=simulatedcookievalue; path=/; HttpOnly",
    }


def _rng(call: Call, state: SimulatorState, salt: str = "") -> random.Random:
    seed = call.body.get("seed")
    if seed is None:
        return random.Random(uuid.uuid4().int)
    prompt = orjson.dumps({k: v for k, v in call.body.items() if k != "stream"},
                          option=orjson.OPT_SORT_KEYS)
    material = f"{seed}|{state.fingerprint}|{state.variance}|{salt}|".encode() + prompt
    return random.Random(hashlib.sha256(material).digest())


def _words(call: Call, state: SimulatorState) -> list[str]:
    rng = _rng(call, state)
    limit = call.body.get("max_tokens") or call.body.get("max_completion_tokens") \
        or call.body.get("max_output_tokens")
    # With a token limit the answer runs to it, which lets benchmarks ask for a size.
    count = max(1, min(int(limit), 4096)) if limit else 12 + rng.randint(0, 4)
    words = [rng.choice(_WORDS) for _ in range(count)]
    words[0] = words[0].capitalize()
    return words


def _prompt_tokens(call: Call) -> int:
    return max(1, len(call.raw.split()) // 2)


def _json(request: web.Request, state: SimulatorState, payload: Any,
          status: int = 200) -> web.Response:
    body = orjson.dumps(payload, option=orjson.OPT_INDENT_2) + b"\n"
    headers = _headers()
    if state.gzip and "gzip" in request.headers.get("Accept-Encoding", ""):
        body = gzip.compress(body)
        headers["Content-Encoding"] = "gzip"
    return web.Response(status=status, body=body, headers=headers,
                        content_type="application/json")


async def _maybe_cut_body(request: web.Request, call: Call, response: web.Response
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
    return web.StreamResponse(headers={**_headers(), "Content-Type": "text/event-stream; charset=utf-8",
                                       "Cache-Control": "no-cache"})


async def _send_events(request: web.Request, call: Call, state: SimulatorState,
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


def _data(payload: Any) -> bytes:
    return b"data: " + orjson.dumps(payload) + b"\n\n"


def _filters() -> dict[str, Any]:
    safe = {"filtered": False, "severity": "safe"}
    return {"hate": safe, "self_harm": safe, "sexual": safe, "violence": safe}


@_route("POST", "chat/completions")
async def _chat(request: web.Request, call: Call) -> web.StreamResponse:
    state = request.app[SIM_STATE]
    if not call.body.get("messages"):
        return _openai_error(400, "Missing required parameter: 'messages'.",
                             "invalid_request_error", "missing_required_parameter")
    words = _words(call, state)
    model = str(call.body.get("model", "gpt-4o-mini"))
    served_model = model if call.provider == "azure" else f"{model}-2024-07-18"
    completion_id = "chatcmpl-" + uuid.uuid4().hex[:24]
    created = int(time.time())
    usage = {"prompt_tokens": _prompt_tokens(call), "completion_tokens": len(words),
             "total_tokens": _prompt_tokens(call) + len(words),
             "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
             "completion_tokens_details": {"reasoning_tokens": 0, "audio_tokens": 0,
                                           "accepted_prediction_tokens": 0,
                                           "rejected_prediction_tokens": 0}}
    if call.body.get("stream"):
        include_usage = bool((call.body.get("stream_options") or {}).get("include_usage"))
        base = {"id": completion_id, "object": "chat.completion.chunk", "created": created,
                "model": served_model, "service_tier": "default",
                "system_fingerprint": state.fingerprint}
        extra = {"usage": None} if include_usage else {}
        events: list[bytes] = []
        if call.provider == "azure":
            events.append(_data({"choices": [], "created": 0, "id": "", "model": "", "object": "",
                                 "prompt_filter_results": [{"prompt_index": 0,
                                                            "content_filter_results": _filters()}]}))
        events.append(_data({**base, "choices": [{"index": 0, "delta": {"role": "assistant",
                            "content": "", "refusal": None}, "logprobs": None,
                            "finish_reason": None}], **extra}))
        for index, word in enumerate(words):
            piece = word if index == 0 else " " + word
            events.append(_data({**base, "choices": [{"index": 0, "delta": {"content": piece},
                                "logprobs": None, "finish_reason": None}], **extra}))
        events.append(_data({**base, "choices": [{"index": 0, "delta": {}, "logprobs": None,
                            "finish_reason": "stop"}], **extra}))
        if include_usage:
            events.append(_data({**base, "choices": [], "usage": usage}))
        events.append(b"data: [DONE]\n\n")
        return await _send_events(request, call, state, events)
    choice: dict[str, Any] = {"index": 0, "message": {"role": "assistant", "content": " ".join(words),
                              "refusal": None, "annotations": []},
                              "logprobs": None, "finish_reason": "stop"}
    payload: dict[str, Any] = {"id": completion_id, "object": "chat.completion",
                               "created": created, "model": served_model, "choices": [choice],
                               "usage": usage, "service_tier": "default",
                               "system_fingerprint": state.fingerprint}
    if call.provider == "azure":
        choice["content_filter_results"] = _filters()
        payload["prompt_filter_results"] = [{"prompt_index": 0,
                                             "content_filter_results": _filters()}]
    return await _maybe_cut_body(request, call, _json(request, state, payload))


@_route("POST", "completions")
async def _completions(request: web.Request, call: Call) -> web.StreamResponse:
    state = request.app[SIM_STATE]
    words = _words(call, state)
    model = str(call.body.get("model", "gpt-3.5-turbo-instruct"))
    completion_id = "cmpl-" + uuid.uuid4().hex[:24]
    created = int(time.time())
    if call.body.get("stream"):
        events = [_data({"id": completion_id, "object": "text_completion", "created": created,
                         "choices": [{"text": " " + word, "index": 0, "logprobs": None,
                                      "finish_reason": None}], "model": model})
                  for word in words]
        events.append(_data({"id": completion_id, "object": "text_completion", "created": created,
                             "choices": [{"text": "", "index": 0, "logprobs": None,
                                          "finish_reason": "stop"}], "model": model}))
        events.append(b"data: [DONE]\n\n")
        return await _send_events(request, call, state, events)
    return _json(request, state, {
        "id": completion_id, "object": "text_completion", "created": created, "model": model,
        "choices": [{"text": " " + " ".join(words), "index": 0, "logprobs": None,
                     "finish_reason": "stop"}],
        "usage": {"prompt_tokens": _prompt_tokens(call), "completion_tokens": len(words),
                  "total_tokens": _prompt_tokens(call) + len(words)},
    })


@_route("POST", "embeddings")
async def _embeddings(request: web.Request, call: Call) -> web.StreamResponse:
    state = request.app[SIM_STATE]
    inputs = call.body.get("input", "")
    items = inputs if isinstance(inputs, list) else [inputs]
    dimensions = int(call.body.get("dimensions") or 16)
    data = []
    for index, item in enumerate(items):
        digest = hashlib.sha256(orjson.dumps(item) + str(call.body.get("model")).encode()).digest()
        rng = random.Random(digest)
        vector = [struct.unpack("<f", struct.pack("<f", rng.uniform(-1, 1)))[0]
                  for _ in range(dimensions)]
        embedding: Any = vector
        if call.body.get("encoding_format") == "base64":
            embedding = base64.b64encode(struct.pack(f"<{dimensions}f", *vector)).decode()
        data.append({"object": "embedding", "index": index, "embedding": embedding})
    tokens = sum(len(str(item).split()) for item in items)
    return _json(request, state, {"object": "list", "data": data,
                                  "model": str(call.body.get("model", "text-embedding-3-small")),
                                  "usage": {"prompt_tokens": tokens, "total_tokens": tokens}})


def _response_object(call: Call, state: SimulatorState, response_id: str, message_id: str,
                     text: str, status: str, created: int, words: int) -> dict[str, Any]:
    output = [] if status == "in_progress" else [{
        "id": message_id, "type": "message", "status": "completed", "role": "assistant",
        "content": [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}]}]
    usage = None if status == "in_progress" else {
        "input_tokens": _prompt_tokens(call), "input_tokens_details": {"cached_tokens": 0},
        "output_tokens": words, "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": _prompt_tokens(call) + words}
    return {"id": response_id, "object": "response", "created_at": created, "status": status,
            "background": False, "error": None, "incomplete_details": None,
            "instructions": call.body.get("instructions"), "max_output_tokens": None,
            "model": f"{call.body.get('model', 'gpt-4o-mini')}-2024-07-18", "output": output,
            "parallel_tool_calls": True, "previous_response_id": None,
            "reasoning": {"effort": None, "summary": None}, "store": True,
            "temperature": call.body.get("temperature", 1.0),
            "text": {"format": {"type": "text"}}, "tool_choice": "auto", "tools": [],
            "top_p": 1.0, "truncation": "disabled", "usage": usage, "user": None, "metadata": {}}


@_route("POST", "responses")
async def _responses(request: web.Request, call: Call) -> web.StreamResponse:
    state = request.app[SIM_STATE]
    words = _words(call, state)
    text = " ".join(words)
    response_id = "resp_" + uuid.uuid4().hex
    message_id = "msg_" + uuid.uuid4().hex
    created = int(time.time())
    final = _response_object(call, state, response_id, message_id, text, "completed", created,
                             len(words))
    if not call.body.get("stream"):
        return _json(request, state, final)
    started = _response_object(call, state, response_id, message_id, "", "in_progress", created, 0)
    sequence = iter(range(1_000_000))

    def event(name: str, payload: dict[str, Any]) -> bytes:
        body = {"type": name, "sequence_number": next(sequence), **payload}
        return f"event: {name}\n".encode() + _data(body)

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
    return await _send_events(request, call, state, events)


_MODELS = ["gpt-4o-mini", "gpt-4o", "text-embedding-3-small", "gpt-3.5-turbo-instruct"]


def _model(name: str) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": _CREATED, "owned_by": "system"}


@_route("GET", "models")
async def _models(request: web.Request, call: Call) -> web.StreamResponse:
    return _json(request, request.app[SIM_STATE],
                 {"object": "list", "data": [_model(name) for name in _MODELS]})


async def _retrieve_model(request: web.Request, call: Call) -> web.StreamResponse:
    name = call.route.partition("/")[2]
    if name not in _MODELS:
        return _openai_error(404, f"The model '{name}' does not exist or you do not have access "
                             "to it.", "invalid_request_error", "model_not_found")
    return _json(request, request.app[SIM_STATE], _model(name))


@_route("POST", "moderations")
async def _moderations(request: web.Request, call: Call) -> web.StreamResponse:
    categories = ["harassment", "hate", "self-harm", "sexual", "violence"]
    return _json(request, request.app[SIM_STATE], {
        "id": "modr-" + uuid.uuid4().hex[:24], "model": "omni-moderation-latest",
        "results": [{"flagged": False, "categories": dict.fromkeys(categories, False),
                     "category_scores": dict.fromkeys(categories, 0.0001)}]})


@_route("POST", "images/generations")
async def _images(request: web.Request, call: Call) -> web.StreamResponse:
    state = request.app[SIM_STATE]
    pixels = bytes(_rng(call, state, "image").getrandbits(8) for _ in range(64))
    return _json(request, state, {"created": int(time.time()), "data": [
        {"b64_json": base64.b64encode(b"\x89PNG\r\n\x1a\n" + pixels).decode(),
         "revised_prompt": call.body.get("prompt")}]})


@_route("POST", "audio/speech")
async def _speech(request: web.Request, call: Call) -> web.StreamResponse:
    digest = hashlib.sha256(call.raw).digest()
    audio = b"ID3\x04\x00\x00\x00\x00\x00\x00" + bytes(range(256)) + digest * 8
    return web.Response(body=audio, content_type="audio/mpeg", headers=_headers())


@_route("POST", "audio/transcriptions")
async def _transcriptions(request: web.Request, call: Call) -> web.StreamResponse:
    parts = multipart_parts(call.raw, request.headers.get("Content-Type", ""))
    file_part = next((p for p in parts if p["name"] == "file"), None)
    if file_part is None:
        return _openai_error(400, "Missing required parameter: 'file'.",
                             "invalid_request_error", "missing_required_parameter")
    rng = random.Random(file_part["sha256"])
    text = " ".join(rng.choice(_WORDS) for _ in range(8)).capitalize() + "."
    return _json(request, request.app[SIM_STATE], {"text": text})
