"""The answering routes: chat, completions, embeddings, models, moderations, images and audio.

Each answer is generated from the request (seeded when the request has a `seed`), so a seeded
request gets the same answer under the same fingerprint and variance. The `*_payload`
builders are shared with the batches route, which runs a batch's lines through them.
"""

from __future__ import annotations

import base64
import hashlib
import random
import struct
import time
import uuid
from collections.abc import Callable
from typing import Any

import orjson
from aiohttp import web

from .state import SIM_STATE, SimulatorState
from .wire import (
    ApiError,
    Call,
    Endpoint,
    json_response,
    maybe_cut_body,
    missing,
    openai_headers,
    read_form,
    send_events,
    sse_data,
)

_WORDS = (
    "the quick brown fox jumps over a lazy dog while seven bright stars shine above "
    "quiet hills and rivers carry stories of distant mountains toward patient oceans where "
    "curious whales sing ancient songs about tides moons planets comets and gentle winds"
).split()
_CREATED = 1_700_000_000

_DELIVERY = frozenset({"stream", "background"})

Payload = Callable[[Call, SimulatorState], dict[str, Any]]


def seeded_rng(call: Call, state: SimulatorState, salt: str = "") -> random.Random:
    seed = call.body.get("seed")
    if seed is None:
        return random.Random(uuid.uuid4().int)
    # How the answer is delivered (streamed, in the background) does not change what it says.
    prompt = orjson.dumps({k: v for k, v in call.body.items() if k not in _DELIVERY},
                          option=orjson.OPT_SORT_KEYS)
    material = f"{seed}|{state.fingerprint}|{state.variance}|{salt}|".encode() + prompt
    return random.Random(hashlib.sha256(material).digest())


def answer_words(call: Call, state: SimulatorState) -> list[str]:
    rng = seeded_rng(call, state)
    limit = call.body.get("max_tokens") or call.body.get("max_completion_tokens") \
        or call.body.get("max_output_tokens")
    # With a token limit the answer runs to it, which lets benchmarks ask for a size.
    count = max(1, min(int(limit), 4096)) if limit else 12 + rng.randint(0, 4)
    words = [rng.choice(_WORDS) for _ in range(count)]
    words[0] = words[0].capitalize()
    return words


def prompt_tokens(call: Call) -> int:
    return max(1, len(call.raw.split()) // 2)


def _filters() -> dict[str, Any]:
    safe = {"filtered": False, "severity": "safe"}
    return {"hate": safe, "self_harm": safe, "sexual": safe, "violence": safe}


def _chat_usage(call: Call, words: list[str]) -> dict[str, Any]:
    return {"prompt_tokens": prompt_tokens(call), "completion_tokens": len(words),
            "total_tokens": prompt_tokens(call) + len(words),
            "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
            "completion_tokens_details": {"reasoning_tokens": 0, "audio_tokens": 0,
                                          "accepted_prediction_tokens": 0,
                                          "rejected_prediction_tokens": 0}}


def _served_model(call: Call) -> str:
    model = str(call.body.get("model", "gpt-4o-mini"))
    return model if call.provider == "azure" else f"{model}-2024-07-18"


def chat_payload(call: Call, state: SimulatorState) -> dict[str, Any]:
    if not call.body.get("messages"):
        raise missing("messages")
    words = answer_words(call, state)
    choice: dict[str, Any] = {"index": 0, "message": {"role": "assistant", "content": " ".join(words),
                              "refusal": None, "annotations": []},
                              "logprobs": None, "finish_reason": "stop"}
    payload: dict[str, Any] = {"id": "chatcmpl-" + uuid.uuid4().hex[:24],
                               "object": "chat.completion", "created": int(time.time()),
                               "model": _served_model(call), "choices": [choice],
                               "usage": _chat_usage(call, words), "service_tier": "default",
                               "system_fingerprint": state.fingerprint}
    if call.provider == "azure":
        choice["content_filter_results"] = _filters()
        payload["prompt_filter_results"] = [{"prompt_index": 0,
                                             "content_filter_results": _filters()}]
    return payload


async def _chat(request: web.Request, call: Call) -> web.StreamResponse:
    state = request.app[SIM_STATE]
    if not call.body.get("stream"):
        return await maybe_cut_body(request, call,
                                    json_response(request, state, chat_payload(call, state)))
    if not call.body.get("messages"):
        raise missing("messages")
    words = answer_words(call, state)
    include_usage = bool((call.body.get("stream_options") or {}).get("include_usage"))
    base = {"id": "chatcmpl-" + uuid.uuid4().hex[:24], "object": "chat.completion.chunk",
            "created": int(time.time()), "model": _served_model(call), "service_tier": "default",
            "system_fingerprint": state.fingerprint}
    extra = {"usage": None} if include_usage else {}
    events: list[bytes] = []
    if call.provider == "azure":
        events.append(sse_data({"choices": [], "created": 0, "id": "", "model": "", "object": "",
                                "prompt_filter_results": [{"prompt_index": 0,
                                                           "content_filter_results": _filters()}]}))
    events.append(sse_data({**base, "choices": [{"index": 0, "delta": {"role": "assistant",
                           "content": "", "refusal": None}, "logprobs": None,
                           "finish_reason": None}], **extra}))
    for index, word in enumerate(words):
        piece = word if index == 0 else " " + word
        events.append(sse_data({**base, "choices": [{"index": 0, "delta": {"content": piece},
                               "logprobs": None, "finish_reason": None}], **extra}))
    events.append(sse_data({**base, "choices": [{"index": 0, "delta": {}, "logprobs": None,
                           "finish_reason": "stop"}], **extra}))
    if include_usage:
        events.append(sse_data({**base, "choices": [], "usage": _chat_usage(call, words)}))
    events.append(b"data: [DONE]\n\n")
    return await send_events(request, call, state, events)


def completion_payload(call: Call, state: SimulatorState) -> dict[str, Any]:
    words = answer_words(call, state)
    return {
        "id": "cmpl-" + uuid.uuid4().hex[:24], "object": "text_completion",
        "created": int(time.time()), "model": str(call.body.get("model", "gpt-3.5-turbo-instruct")),
        "choices": [{"text": " " + " ".join(words), "index": 0, "logprobs": None,
                     "finish_reason": "stop"}],
        "usage": {"prompt_tokens": prompt_tokens(call), "completion_tokens": len(words),
                  "total_tokens": prompt_tokens(call) + len(words)},
    }


async def _completions(request: web.Request, call: Call) -> web.StreamResponse:
    state = request.app[SIM_STATE]
    if not call.body.get("stream"):
        return json_response(request, state, completion_payload(call, state))
    words = answer_words(call, state)
    model = str(call.body.get("model", "gpt-3.5-turbo-instruct"))
    completion_id = "cmpl-" + uuid.uuid4().hex[:24]
    created = int(time.time())
    events = [sse_data({"id": completion_id, "object": "text_completion", "created": created,
                        "choices": [{"text": " " + word, "index": 0, "logprobs": None,
                                     "finish_reason": None}], "model": model})
              for word in words]
    events.append(sse_data({"id": completion_id, "object": "text_completion", "created": created,
                            "choices": [{"text": "", "index": 0, "logprobs": None,
                                         "finish_reason": "stop"}], "model": model}))
    events.append(b"data: [DONE]\n\n")
    return await send_events(request, call, state, events)


def embeddings_payload(call: Call, state: SimulatorState) -> dict[str, Any]:
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
    return {"object": "list", "data": data,
            "model": str(call.body.get("model", "text-embedding-3-small")),
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}


async def _embeddings(request: web.Request, call: Call) -> web.StreamResponse:
    state = request.app[SIM_STATE]
    return json_response(request, state, embeddings_payload(call, state))


_MODELS = ["gpt-4o-mini", "gpt-4o", "text-embedding-3-small", "gpt-3.5-turbo-instruct"]


def _model(name: str) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": _CREATED, "owned_by": "system"}


async def _models(request: web.Request, call: Call) -> web.StreamResponse:
    return json_response(request, request.app[SIM_STATE],
                         {"object": "list", "data": [_model(name) for name in _MODELS]})


async def _retrieve_model(request: web.Request, call: Call) -> web.StreamResponse:
    name = call.params["model"]
    if name not in _MODELS:
        raise ApiError(404, f"The model '{name}' does not exist or you do not have access to it.",
                       code="model_not_found")
    return json_response(request, request.app[SIM_STATE], _model(name))


def moderation_payload(call: Call, state: SimulatorState) -> dict[str, Any]:
    categories = ["harassment", "hate", "self-harm", "sexual", "violence"]
    return {"id": "modr-" + uuid.uuid4().hex[:24], "model": "omni-moderation-latest",
            "results": [{"flagged": False, "categories": dict.fromkeys(categories, False),
                         "category_scores": dict.fromkeys(categories, 0.0001)}]}


async def _moderations(request: web.Request, call: Call) -> web.StreamResponse:
    state = request.app[SIM_STATE]
    return json_response(request, state, moderation_payload(call, state))


def image_payload(call: Call, state: SimulatorState) -> dict[str, Any]:
    pixels = bytes(seeded_rng(call, state, "image").getrandbits(8) for _ in range(64))
    return {"created": int(time.time()), "data": [
        {"b64_json": base64.b64encode(b"\x89PNG\r\n\x1a\n" + pixels).decode(),
         "revised_prompt": call.body.get("prompt")}]}


async def _images(request: web.Request, call: Call) -> web.StreamResponse:
    state = request.app[SIM_STATE]
    return json_response(request, state, image_payload(call, state))


async def _speech(request: web.Request, call: Call) -> web.StreamResponse:
    digest = hashlib.sha256(call.raw).digest()
    audio = b"ID3\x04\x00\x00\x00\x00\x00\x00" + bytes(range(256)) + digest * 8
    return web.Response(body=audio, content_type="audio/mpeg", headers=openai_headers())


async def _transcriptions(request: web.Request, call: Call) -> web.StreamResponse:
    file_part = (await read_form(request)).get("file")
    if file_part is None:
        raise missing("file")
    rng = random.Random(hashlib.sha256(file_part.content).hexdigest())
    text = " ".join(rng.choice(_WORDS) for _ in range(8)).capitalize() + "."
    return json_response(request, request.app[SIM_STATE], {"text": text})


ENDPOINTS = (
    Endpoint("POST", "chat/completions", _chat),
    Endpoint("POST", "completions", _completions),
    Endpoint("POST", "embeddings", _embeddings),
    Endpoint("GET", "models", _models),
    Endpoint("GET", "models/{model}", _retrieve_model),
    Endpoint("POST", "moderations", _moderations),
    Endpoint("POST", "images/generations", _images),
    Endpoint("POST", "audio/speech", _speech),
    Endpoint("POST", "audio/transcriptions", _transcriptions),
)
