"""Talk to a real (or simulated) upstream outside the proxy: `verify` re-sends every recorded
request and classifies the answer; `probe` runs the cookbook's seed experiment."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import aiohttp
import orjson

from ..core import fingerprints
from ..core.cassette import Drift, Entry, Recording, SseEvent
from ..core.routes import RouteClass, route_class
from ..core.sse import EventSplitter
from ..server.recorder import body_recording, stream_recording

# How cassettes recorded before `body_kind` existed spelled a multipart or binary body.
_HASHED_BEFORE_BODY_KIND = ({"multipart"}, {"sha256", "size", "content_type"})


@dataclass(frozen=True)
class Upstreams:
    openai: str | None
    azure: str | None
    openai_key: str | None = None
    azure_key: str | None = None


@dataclass(frozen=True)
class Verdict:
    cassette: str
    key: str
    route: str
    result: str  # same, drift:fingerprint, drift:output, skipped, error
    detail: str = ""
    recording: Recording | None = None


def rebuild(entry: Entry, upstreams: Upstreams) -> tuple[str, str, dict[str, str], bytes] | str:
    """(method, url, headers, body) to re-send a recorded request, or why it cannot be."""
    request = entry.request
    body = request.get("body")
    if request.get("body_kind") is not None or (
            isinstance(body, dict) and set(body) in _HASHED_BEFORE_BODY_KIND):
        return "the request body is stored by hash only (multipart or binary)"
    provider = request.get("provider")
    base = upstreams.openai if provider == "openai" else upstreams.azure
    if not base:
        return f"no --{provider}-upstream given"
    path = str(entry.extra.get("path") or _default_path(request))
    query = dict(request.get("query") or [])
    if request.get("api_version"):
        query["api-version"] = request["api_version"]
    url = base.rstrip("/") + path
    if query:
        url += "?" + "&".join(f"{k}={v}" for k, v in sorted(query.items()))
    headers = dict(request.get("headers") or {})
    key = upstreams.openai_key if provider == "openai" else upstreams.azure_key
    if key:
        headers["authorization" if provider == "openai" else "api-key"] = \
            f"Bearer {key}" if provider == "openai" else key
    payload = b""
    if body is not None:
        headers["content-type"] = "application/json"
        payload = orjson.dumps(body)
    return str(request.get("method", "POST")), url, headers, payload


def _default_path(request: dict[str, Any]) -> str:
    if request.get("provider") == "openai":
        return f"/v1/{request.get('route')}"
    if request.get("deployment"):
        return f"/openai/deployments/{request['deployment']}/{request.get('route')}"
    return f"/openai/{request.get('route')}"


async def fetch(session: aiohttp.ClientSession, method: str, url: str, headers: dict[str, str],
                body: bytes) -> Recording:
    loop = asyncio.get_running_loop()
    started = loop.time()
    async with session.request(method, url, headers=headers, data=body or None) as response:
        if not response.headers.get("content-type", "").startswith("text/event-stream"):
            payload = await response.read()
            return body_recording(response.status, response.headers, payload, (),
                                  (loop.time() - started) * 1000)
        splitter = EventSplitter()
        events: list[SseEvent] = []
        async for chunk in response.content.iter_any():
            at_ms = (loop.time() - started) * 1000
            events += [SseEvent(at_ms, raw) for raw in splitter.feed(chunk)]
        if splitter.remainder():
            events.append(SseEvent((loop.time() - started) * 1000, splitter.remainder()))
        return stream_recording(response.status, response.headers, events, (),
                                (loop.time() - started) * 1000)


async def verify(items: Sequence[tuple[str, Entry]], upstreams: Upstreams,
                 concurrency: int = 4, done: Callable[[], object] = lambda: None
                 ) -> list[Verdict]:
    """Re-send each entry's request; `done` is called as each key is settled (progress)."""
    limit = asyncio.Semaphore(concurrency)
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=600)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        async def one(cassette: str, entry: Entry) -> Verdict:
            route = str(entry.request.get("route"))
            if entry.sequence or route_class(str(entry.request.get("method")), route,
                                             entry.request.get("body")) is RouteClass.STATEFUL:
                return Verdict(cassette, entry.key, route, "skipped",
                               "a stateful key: re-sending it would create or change a resource "
                               "upstream")
            request = rebuild(entry, upstreams)
            if isinstance(request, str):
                return Verdict(cassette, entry.key, route, "skipped", request)
            async with limit:
                try:
                    fresh = await fetch(session, *request)
                except (aiohttp.ClientError, TimeoutError) as exc:
                    return Verdict(cassette, entry.key, route, "error", str(exc) or repr(exc))
            before = fingerprints.baseline(entry, fresh.system_fingerprint)
            result = fingerprints.classify(before, fresh)
            detail = ""
            if result is not Drift.SAME and before is not None:
                detail = fingerprints.word_diff(fingerprints.answer_text(before),
                                                fingerprints.answer_text(fresh))
            return Verdict(cassette, entry.key, route, result.value, detail, fresh)

        async def counted(cassette: str, entry: Entry) -> Verdict:
            verdict = await one(cassette, entry)
            done()
            return verdict

        return list(await asyncio.gather(*(counted(c, e) for c, e in items)))


@dataclass(frozen=True)
class ProbeResult:
    n: int
    distinct_outputs: int
    fingerprints: list[str | None]
    similarity: float
    outputs: list[str]

    def as_json(self) -> dict[str, Any]:
        return {"n": self.n, "distinct_outputs": self.distinct_outputs,
                "fingerprints": self.fingerprints, "similarity": round(self.similarity, 4),
                "outputs": self.outputs}


async def probe(base_url: str, api_key: str, model: str, prompt: str, n: int,
                seed: int | None, temperature: float | None,
                max_tokens: int | None = None, done: Callable[[], object] = lambda: None
                ) -> ProbeResult:
    """Send one chat request n times at once, straight to the base URL, with no cache."""
    body: dict[str, Any] = {"model": model, "messages": [{"role": "user", "content": prompt}]}
    if seed is not None:
        body["seed"] = seed
    if temperature is not None:
        body["temperature"] = temperature
    if max_tokens is not None:
        body["max_tokens"] = max_tokens
    url = base_url.rstrip("/") + "/chat/completions"
    headers = {"Authorization": f"Bearer {api_key}", "api-key": api_key,
               "Content-Type": "application/json"}
    timeout = aiohttp.ClientTimeout(total=600)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        async def one() -> Recording:
            recording = await fetch(session, "POST", url, headers, orjson.dumps(body))
            done()
            return recording

        recordings = await asyncio.gather(*(one() for _ in range(n)))
    failed = [r for r in recordings if r.status != 200]
    if failed:
        raise RuntimeError(f"{len(failed)} of {n} requests failed; first: status "
                           f"{failed[0].status}: {failed[0].body[:300].decode(errors='replace')}")
    outputs = [fingerprints.answer_text(r) for r in recordings]
    seen: list[str | None] = []
    for recording in recordings:
        if recording.system_fingerprint not in seen:
            seen.append(recording.system_fingerprint)
    pairs = list(itertools.combinations(outputs, 2))
    similarity = (sum(fingerprints.similarity(a, b) for a, b in pairs) / len(pairs)) \
        if pairs else 1.0
    return ProbeResult(n, len(set(outputs)), seen, similarity, outputs)
