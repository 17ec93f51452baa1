"""The simulator's aiohttp application: URL layouts, auth, faults and latency, then the route."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Mapping
from types import MappingProxyType
from typing import Any

import orjson
from aiohttp import web

from . import batches, files, fine_tuning, generation, responses, vector_stores
from .state import SIM_STATE, SimulatorState
from .wire import ApiError, Call, Endpoint, azure_error, openai_error


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


class _Routes:
    """Fixed routes by exact path (the hot path: chat, embeddings), the rest by pattern."""

    def __init__(self, endpoints: Iterable[Endpoint]) -> None:
        exact: dict[tuple[str, str], Endpoint] = {}
        patterns: list[tuple[Endpoint, tuple[str, ...]]] = []
        for endpoint in endpoints:
            if "{" in endpoint.pattern:
                patterns.append((endpoint, tuple(endpoint.pattern.split("/"))))
            else:
                exact[(endpoint.method, endpoint.pattern)] = endpoint
        self._exact: Mapping[tuple[str, str], Endpoint] = MappingProxyType(exact)
        self._patterns = tuple(patterns)

    def find(self, method: str, route: str) -> tuple[Endpoint, dict[str, str]] | None:
        endpoint = self._exact.get((method, route))
        if endpoint is not None:
            return endpoint, {}
        segments = route.split("/")
        for candidate, pattern in self._patterns:
            if candidate.method != method or len(pattern) != len(segments):
                continue
            params: dict[str, str] = {}
            for expected, actual in zip(pattern, segments, strict=True):
                if expected.startswith("{"):
                    if not actual:
                        break
                    params[expected[1:-1]] = actual
                elif expected != actual:
                    break
            else:
                return candidate, params
        return None


_ROUTES = _Routes((*generation.ENDPOINTS, *responses.ENDPOINTS, *files.ENDPOINTS,
                   *batches.ENDPOINTS, *vector_stores.ENDPOINTS,
                   *fine_tuning.ENDPOINTS))


def _split(path: str) -> tuple[str, str, str | None, bool] | None:
    """(provider, route, deployment, whether the layout needs `api-version`)."""
    if path.startswith("/v1/"):
        return "openai", path[4:], None, False
    if path.startswith("/openai/deployments/"):
        deployment, _, tail = path[len("/openai/deployments/"):].partition("/")
        return "azure", tail, deployment, True
    if path.startswith("/openai/v1/"):
        return "azure", path[len("/openai/v1/"):], None, False
    if path.startswith("/openai/"):
        return "azure", path[len("/openai/"):], None, True
    return None


async def _dispatch(request: web.Request) -> web.StreamResponse:
    state = request.app[SIM_STATE]
    located = _split(request.path)
    if located is None:
        return openai_error(404, f"Invalid URL ({request.method} {request.path})",
                            "invalid_request_error", None)
    provider, route, deployment, versioned = located
    found = _ROUTES.find(request.method, route)
    counted = found[0].pattern if found is not None else route
    state.calls += 1
    state.calls_by_route[counted] += 1
    state.calls_by_endpoint[f"{request.method} {counted}"] += 1
    state.last_headers = {k.lower(): v for k, v in request.headers.items()}
    fault = state.faults.pop(0) if state.faults else None
    resource = found is not None and found[0].resource
    if provider == "azure" and "api-version" not in request.query and (
            deployment is not None or (resource and versioned)):
        return azure_error(400, "MissingApiVersionParameter",
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
    if found is None:
        return openai_error(404, f"Invalid URL ({request.method} /v1/{route})",
                            "invalid_request_error", None)
    endpoint, params = found
    if resource and deployment is not None:
        return azure_error(404, "404", "Resource not found")
    body: dict[str, Any] = {}
    raw = b""
    content_type = request.headers.get("Content-Type", "")
    # A multipart body is left unread for its handler, which parses it with aiohttp's reader.
    if not content_type.startswith("multipart/"):
        raw = await request.read()
    if raw and content_type.startswith("application/json"):
        try:
            parsed = orjson.loads(raw)
        except orjson.JSONDecodeError:
            return openai_error(400, "We could not parse the JSON body of your request.",
                                "invalid_request_error", None)
        if not isinstance(parsed, dict):
            return openai_error(400, "The request body must be a JSON object.",
                                "invalid_request_error", None)
        body = parsed
    if deployment is not None:
        body.setdefault("model", deployment)
    call = Call(provider, route, deployment, body, raw, fault, params)
    try:
        return await endpoint.reply(request, call)
    except ApiError as error:
        return openai_error(error.status, error.message, error.type, error.code,
                            param=error.param)


def _check_auth(request: web.Request, state: SimulatorState, provider: str) -> web.Response | None:
    presented = request.headers.get("api-key", "")
    authorization = request.headers.get("Authorization", "")
    if authorization.lower().startswith("bearer "):
        presented = authorization[7:].strip()
    if presented and (state.api_key is None or presented == state.api_key):
        return None
    if provider == "azure":
        return azure_error(401, "401", "Access denied due to invalid subscription key or wrong "
                           "API endpoint. Make sure to provide a valid key for an active "
                           "subscription and use a correct regional API endpoint for your "
                           "resource.")
    if not presented:
        return openai_error(401, "You didn't provide an API key. You need to provide your API "
                            "key in an Authorization header using Bearer auth (i.e. "
                            "Authorization: Bearer YOUR_KEY).", "invalid_request_error", None)
    masked = presented[:3] + "*" * max(len(presented) - 7, 0) + presented[-4:]
    return openai_error(401, f"Incorrect API key provided: {masked}. You can find your API key "
                        "at https://platform.openai.com/account/api-keys.",
                        "invalid_request_error", "invalid_api_key")


async def _early_fault(request: web.Request, fault: str) -> web.StreamResponse | None:
    kind, _, argument = fault.partition(":")
    if kind == "status":
        status = int(argument)
        if status == 429:
            return openai_error(429, "Rate limit reached for requests. Please try again in 1s.",
                                "requests", "rate_limit_exceeded", {"retry-after": "1"})
        return openai_error(status, "The server had an error while processing your request. "
                            "Sorry about that!", "server_error", None)
    if kind == "hang":
        await asyncio.sleep(float(argument or 30))
        return None
    if kind == "reset":
        assert request.transport is not None
        request.transport.abort()
        raise ConnectionResetError("simulated reset")
    return None
