"""Talk to a real (or simulated) upstream outside the proxy: `verify` re-sends every recorded
request and classifies the answer; `probe` runs the cookbook's seed experiment.

Both reach the upstream as the proxy does: the same URL building and credential headers
(`server.upstream`), the same capture of a body or a stream (`server.capture`), and, for what
`verify --update` stores, the same scrubbed recording (`server.recorder`).
"""

from __future__ import annotations

import asyncio
import itertools
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Final, Literal

import aiohttp
import orjson
from yarl import URL

from ..core import fingerprints
from ..core.canonical import CanonicalRequest
from ..core.cassette import RULES_CHANGED, Drift, Entry, Recording
from ..core.errors import ProxyError
from ..core.providers import Provider, Route, parse_route
from ..core.routes import RouteClass, route_class
from ..core.scrub import scrub_text, secret_values
from ..core.settings import Settings
from ..server.capture import Answer, AnswerTooLarge, read_answer
from ..server.recorder import body_recording, stream_recording
from ..server.upstream import Upstream, client_timeout

# How cassettes recorded before `body_kind` existed spelled a multipart or binary body.
_HASHED_BEFORE_BODY_KIND = ({"multipart"}, {"sha256", "size", "content_type"})
_KEY_VARIABLES = {"openai": "OPENAI_API_KEY", "azure": "AZURE_OPENAI_API_KEY"}

# What verify found for a key: how the fresh answer compared with the recording, or why it
# has no comparison (the key was skipped, or the upstream gave no usable answer).
VerdictResult = Drift | Literal["skipped", "error"]
SAME: Final = Drift.SAME
SKIPPED: Final = "skipped"
ERROR: Final = "error"


@dataclass(frozen=True)
class Verdict:
    cassette: str
    key: str
    route: str
    result: VerdictResult
    detail: str = ""
    recording: Recording | None = None  # the fresh answer, scrubbed, when it was compared


@dataclass(frozen=True)
class Resend:
    """A recorded request, ready for `Upstream.send`."""

    method: str
    route: Route
    query: dict[str, str]
    headers: dict[str, str]
    body: bytes


def resend(entry: Entry) -> Resend | str:
    """How to send a recorded request again, or why it cannot be."""
    request = entry.request
    body = request.get("body")
    if request.get("body_kind") is not None or (
            isinstance(body, dict) and set(body) in _HASHED_BEFORE_BODY_KIND):
        return "the request body is stored by hash only (multipart or binary)"
    query = {str(name): str(value) for name, value in request.get("query") or []}
    if request.get("api_version"):
        query["api-version"] = str(request["api_version"])
    path = str(entry.extra.get("path") or _default_path(request))
    try:
        route = parse_route(path, query)
    except ProxyError as exc:
        return exc.message
    if route is None:
        return f"the recorded path {path!r} is not an OpenAI or Azure OpenAI API path"
    headers = {str(name): str(value) for name, value in (request.get("headers") or {}).items()}
    payload = b""
    if body is not None:
        headers["content-type"] = "application/json"
        payload = orjson.dumps(body)
    return Resend(str(request.get("method", "POST")), route, query, headers, payload)


def _default_path(request: CanonicalRequest) -> str:
    """The path of a recording made before entries kept theirs in `extra`."""
    if request.get("provider") == "openai":
        return f"/v1/{request.get('route')}"
    if request.get("deployment"):
        return f"/openai/deployments/{request['deployment']}/{request.get('route')}"
    return f"/openai/{request.get('route')}"


def _session(settings: Settings) -> aiohttp.ClientSession:
    # As the proxy's: no cookie passes from one answer to the next request.
    return aiohttp.ClientSession(timeout=client_timeout(settings),
                                 cookie_jar=aiohttp.DummyCookieJar())


def recording_of(answer: Answer, secrets: Sequence[bytes],
                 redactions: Sequence[re.Pattern[str]] = ()) -> Recording:
    """The answer as the proxy would store it: scrubbed of the exchange's credentials and what
    the redaction rules name, with its fingerprint, model, usage."""
    if answer.events is None:
        return body_recording(answer.status, answer.headers, answer.body, tuple(secrets),
                              answer.duration_ms, redactions)
    return stream_recording(answer.status, answer.headers, answer.events, tuple(secrets),
                            answer.duration_ms, redactions)


def answer_problem(answer: Answer, recorded: Recording | None, provider: Provider,
                   secrets: Sequence[bytes]) -> str | None:
    """Why a fresh answer cannot be compared with the recording, or None. A refusal, a failure
    or something that is not the API's answer says nothing about drift."""
    content_type = answer.headers.get("content-type", "") or "none"
    if not 200 <= answer.status < 300 and (recorded is None or answer.status != recorded.status):
        said = _error_message(answer.body, secrets)
        return (f"the upstream answered status {answer.status}: "
                f"{_advice(answer.status, provider)}" + (f". It said: {said}" if said else ""))
    if answer.events is not None and not answer.complete:
        return "the stream was cut before its end; nothing was compared: try again"
    if recorded is None:
        return None
    if recorded.events is not None and answer.events is None:
        return (f"a stream was recorded, but the answer is not one (content-type "
                f"{content_type}): check that --{provider}-upstream is the API's address")
    if recorded.events is None and answer.events is None and _is_json(recorded.body) \
            and not _is_json(answer.body):
        start = answer.body[:60].decode("utf-8", "replace")
        return (f"the answer is not JSON (content-type {content_type}, starting {start!r}): "
                f"check that --{provider}-upstream is the API's address")
    return None


def _is_json(body: bytes) -> bool:
    try:
        orjson.loads(body)
    except orjson.JSONDecodeError:
        return False
    return True


def _error_message(body: bytes, secrets: Sequence[bytes]) -> str:
    """The provider's own words from an error body (scrubbed: a 401 quotes the key)."""
    try:
        parsed = orjson.loads(body)
    except orjson.JSONDecodeError:
        return ""
    error = parsed.get("error") if isinstance(parsed, dict) else None
    message = error.get("message") if isinstance(error, dict) else None
    if not isinstance(message, str):
        return ""
    cleaned = scrub_text(message, secrets)
    return cleaned if len(cleaned) <= 200 else cleaned[:197] + "..."


def _advice(status: int, provider: Provider) -> str:
    if status in (401, 403):
        return (f"check the API key (--{provider}-api-key or {_KEY_VARIABLES[provider]}) and "
                "its permissions")
    if status == 404:
        return (f"check --{provider}-upstream (the API's address, such as "
                "https://api.openai.com) and that the model or deployment exists")
    if status in (408, 429):
        return "the provider is busy or rate-limiting: try again later, or lower --concurrency"
    if status >= 500:
        return "the provider failed: try again later"
    if 300 <= status < 400:
        return f"a redirect, which is not followed: check --{provider}-upstream"
    return ("the provider refused the recorded request: check the key's access to the model "
            "(replay-proxy show KEY shows the request)")


async def verify(items: Sequence[tuple[str, Entry]], settings: Settings,
                 concurrency: int = 4, done: Callable[[], object] = lambda: None
                 ) -> list[Verdict]:
    """Re-send each entry's request to the upstreams and with the keys of `settings`; `done` is
    called as each key is settled (progress)."""
    limit = asyncio.Semaphore(concurrency)
    loop = asyncio.get_running_loop()
    async with _session(settings) as session:
        upstream = Upstream(settings, session)

        async def one(cassette: str, entry: Entry) -> Verdict:
            route_name = str(entry.request.get("route"))

            def verdict(result: VerdictResult, detail: str = "",
                        recording: Recording | None = None) -> Verdict:
                return Verdict(cassette, entry.key, route_name, result, detail, recording)

            if entry.sequence or route_class(str(entry.request.get("method")), route_name,
                                             entry.request.get("body")) is RouteClass.STATEFUL:
                return verdict(SKIPPED, "a stateful key: re-sending it would create or change a "
                                        "resource upstream")
            changed_by = sorted(kind for kind in ("mask", "ignore_path", "redact")
                                if entry.rules.get(kind))
            if entry.extra.get(RULES_CHANGED) is True:
                # The stored request holds placeholders (or lacks fields): not what was sent,
                # so the provider's answer to it would say nothing about drift.
                rules = ", ".join("--" + kind.replace("_", "-") for kind in changed_by) or "rules"
                return verdict(SKIPPED, f"keyed under {rules}: the stored request is not the one "
                                        "that was sent; re-record it (--mode refresh) instead")
            request = resend(entry)
            if isinstance(request, str):
                return verdict(SKIPPED, request)
            provider = request.route.provider
            if provider == "azure" and not settings.azure_upstream:
                return verdict(SKIPPED, "no --azure-upstream given")
            # What the recorder would scrub: every credential sent, whatever its shape.
            secrets = secret_values(upstream.headers(request.route, request.headers), settings)
            async with limit:
                started = loop.time()
                try:
                    response = await upstream.send(request.method, request.route, request.query,
                                                   request.headers, request.body)
                    async with response:
                        answer = await read_answer(response, started, settings.max_answer)
                except ProxyError as exc:
                    return verdict(ERROR, exc.message)
                except AnswerTooLarge:
                    return verdict(ERROR, f"the answer is over {settings.max_answer} bytes, "
                                          "more than the proxy would store")
                except (aiohttp.ClientError, TimeoutError) as exc:
                    return verdict(ERROR, "the upstream broke off its answer mid-body "
                                          f"({exc.__class__.__name__}): try again")
            recorded = fingerprints.select(entry, fingerprints.PINNED).recording
            problem = answer_problem(answer, recorded, provider, secrets)
            if problem is not None:
                return verdict(ERROR, problem)
            fresh = recording_of(answer, secrets,
                                 settings.policy_for(cassette).rules.redaction_patterns)
            before = fingerprints.baseline(entry, fresh.system_fingerprint)
            result = fingerprints.classify(before, fresh)
            detail = ""
            if result is not Drift.SAME and before is not None:
                detail = fingerprints.word_diff(fingerprints.answer_text(before),
                                                fingerprints.answer_text(fresh))
            return verdict(result, detail, fresh)

        async def counted(cassette: str, entry: Entry) -> Verdict:
            settled = await one(cassette, entry)
            done()
            return settled

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


def probe_target(base_url: str, api_key: str) -> tuple[Settings, Route, dict[str, str]]:
    """Where `probe` sends its chat request: `base_url` + `/chat/completions`, as the SDK
    builds it from its base URL; an Azure base (`.../openai/deployments/NAME?api-version=...`)
    gets the key as `api-key`, any other as a bearer token."""
    base = URL(base_url)
    query = {name: value for name, value in base.query.items()}
    try:
        found = parse_route(base.path.rstrip("/") + "/chat/completions", query)
    except ProxyError as exc:
        raise RuntimeError(exc.message) from exc
    provider: Provider = found.provider if found is not None else "openai"
    route = Route(provider, "chat/completions", "/chat/completions",
                  api_version=query.get("api-version"))
    target = str(base.with_query(None))
    settings = (Settings(azure_upstream=target, azure_api_key=api_key) if provider == "azure"
                else Settings(openai_upstream=target, openai_api_key=api_key))
    return settings, route, query


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
    settings, route, query = probe_target(base_url, api_key)
    headers = {"content-type": "application/json"}
    payload = orjson.dumps(body)
    secrets = secret_values({}, settings)
    loop = asyncio.get_running_loop()
    async with _session(settings) as session:
        upstream = Upstream(settings, session)

        async def one() -> Recording:
            started = loop.time()
            try:
                response = await upstream.send("POST", route, query, headers, payload)
                async with response:
                    answer = await read_answer(response, started, settings.max_answer)
            except ProxyError as exc:
                raise RuntimeError(exc.message) from exc
            except AnswerTooLarge as exc:
                raise RuntimeError(f"an answer was over {settings.max_answer} bytes") from exc
            done()
            return recording_of(answer, secrets)

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

