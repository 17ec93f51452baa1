"""How `verify` rebuilds a recorded request, and which fresh answers it refuses to compare (and
what it tells the user to check), without a network."""

from __future__ import annotations

import orjson
import pytest
from replay_proxy.core.cassette import Entry, Recording, SseEvent
from replay_proxy.server.capture import Answer
from replay_proxy.tools.audit import Resend, answer_problem, resend

KEY = "b" * 64
JSON = {"content-type": "application/json"}
STREAM = {"content-type": "text/event-stream"}
RECORDED = Recording(200, JSON, b'{"choices": []}')


def _entry(request: dict[str, object], path: str | None = None) -> Entry:
    return Entry(KEY, "chat.completions", request, extra={"path": path} if path else {})


def _answer(status: int, body: bytes = b"{}", headers: dict[str, str] | None = None,
            events: list[SseEvent] | None = None, complete: bool = True) -> Answer:
    return Answer(status, headers or JSON, body, events, 1.0, complete)


def test_an_azure_request_is_sent_again_with_its_deployment_and_api_version() -> None:
    request = {"provider": "azure", "method": "POST", "route": "chat/completions",
               "deployment": "gpt-4o", "api_version": "2024-10-21",
               "query": [["note", "a&b"]], "headers": {"openai-beta": "assistants=v2"},
               "body": {"messages": [], "seed": 1}}
    for entry in (_entry(request), _entry(request, "/openai/deployments/gpt-4o/chat/completions")):
        again = resend(entry)
        assert isinstance(again, Resend)
        assert (again.route.provider, again.route.upstream_path, again.route.deployment) == \
            ("azure", "/openai/deployments/gpt-4o/chat/completions", "gpt-4o")
        assert again.query == {"note": "a&b", "api-version": "2024-10-21"}
        assert again.headers == {"openai-beta": "assistants=v2",
                                 "content-type": "application/json"}
        assert orjson.loads(again.body) == {"messages": [], "seed": 1}


def test_a_body_stored_by_hash_is_not_sent_again() -> None:
    for request in ({"provider": "openai", "route": "files", "body_kind": "multipart",
                     "body": {"parts": []}},
                    {"provider": "openai", "route": "audio/transcriptions",
                     "body": {"sha256": "0" * 64, "size": 3, "content_type": "audio/wav"}}):
        assert resend(_entry(request)) == \
            "the request body is stored by hash only (multipart or binary)"


@pytest.mark.parametrize(("status", "provider", "says"), [
    (401, "openai", "check the API key (--openai-api-key or OPENAI_API_KEY)"),
    (403, "azure", "check the API key (--azure-api-key or AZURE_OPENAI_API_KEY)"),
    (404, "openai", "check --openai-upstream (the API's address"),
    (429, "openai", "try again later, or lower --concurrency"),
    (503, "azure", "the provider failed: try again later"),
    (307, "openai", "a redirect, which is not followed: check --openai-upstream"),
    (400, "openai", "the provider refused the recorded request"),
])
def test_an_error_status_names_what_to_check(status: int, provider: str, says: str) -> None:
    body = orjson.dumps({"error": {"message": "Incorrect API key provided: "
                                              "sk-proj-abc*****************wxyz" + " x" * 200}})
    problem = answer_problem(_answer(status, body), RECORDED, provider,  # type: ignore[arg-type]
                             [])
    assert problem is not None
    assert problem.startswith(f"the upstream answered status {status}: ") and says in problem
    assert "It said: Incorrect API key provided: [REDACTED]" in problem
    assert problem.endswith("...") and "*" not in problem


def test_an_error_answer_recorded_on_purpose_is_compared() -> None:
    """A key recorded with --record-errors answered 404: a fresh 404 is compared, not refused."""
    recorded = Recording(404, JSON, b'{"error": {"message": "no such model"}}')
    assert answer_problem(_answer(404, recorded.body), recorded, "openai", []) is None
    assert answer_problem(_answer(200, b'{"choices": []}'), recorded, "openai", []) is None


def test_an_answer_of_another_kind_than_the_recording_is_refused() -> None:
    event = SseEvent(1.0, b'data: {"choices": []}\n\n')
    stream = Recording(200, STREAM, events=(event,))
    page = _answer(200, b"<html>sign in</html>", {"content-type": "text/html"})
    assert "a stream was recorded, but the answer is not one (content-type text/html)" in \
        str(answer_problem(page, stream, "azure", []))
    assert "check that --azure-upstream is the API's address" in \
        str(answer_problem(page, stream, "azure", []))
    assert "the answer is not JSON (content-type text/html, starting '<html>sign in</html>')" in \
        str(answer_problem(page, RECORDED, "openai", []))
    cut = _answer(200, b"", STREAM, [event], complete=False)
    assert "the stream was cut before its end" in str(answer_problem(cut, stream, "openai", []))
    whole = _answer(200, b"", STREAM, [event])
    assert answer_problem(whole, stream, "openai", []) is None
    binary = Recording(200, {"content-type": "audio/mpeg"}, b"ID3\x04")
    assert answer_problem(_answer(200, b"ID3\x05", {"content-type": "audio/mpeg"}), binary,
                          "openai", []) is None
