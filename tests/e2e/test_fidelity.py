"""A replay is the answer that was given, byte for byte: words that merely look like credential
prefixes are never touched."""

from __future__ import annotations

from pathlib import Path

from openai import OpenAI
from replay_proxy.core.modes import Mode
from replay_proxy.tools.testing import SimulatorThread

from tests.conftest import SECRET_KEY, ProxyFactory, stored_bytes

# The simulator echoes a Responses request's instructions in its answer, plain and streamed.
INSTRUCTIONS = ("Be risk-averse and task-oriented. Keep it desk-based, ask-me-anything style; "
                "cc the proj_manager and the org-chart owner. Bearer of news: sk-learn.")


def _answers(client: OpenAI) -> dict[str, bytes]:
    request = {"model": "gpt-4o-mini", "input": "Plan the week.", "instructions": INSTRUCTIONS}
    plain = client.responses.with_raw_response.create(**request)
    assert plain.parse().instructions == INSTRUCTIONS  # the SDK reads the answer as usual
    with client.responses.with_streaming_response.create(**request, stream=True) as streamed:
        stream_bytes = b"".join(streamed.iter_bytes())
    with client.responses.stream(**request) as events:
        created = next(event for event in events if event.type == "response.created")
        assert created.response.instructions == INSTRUCTIONS
        events.until_done()
    return {"plain": plain.http_response.content, "stream": stream_bytes}


def test_lookalike_words_replay_byte_for_byte(make_proxy: ProxyFactory, simulator: SimulatorThread,
                                              cassettes: Path) -> None:
    with make_proxy(Mode.RECORD) as proxy, OpenAI(base_url=proxy.url + "/v1",
                                                  api_key=SECRET_KEY) as client:
        recorded = _answers(client)
    assert simulator.state.calls == 2
    simulator.stop()
    with make_proxy(Mode.REPLAY) as proxy, OpenAI(base_url=proxy.url + "/v1",
                                                  api_key="replay-needs-no-key") as client:
        replayed = _answers(client)
        assert proxy.state.totals["hits"] == 3 and proxy.state.totals["misses"] == 0
    assert INSTRUCTIONS.encode() in recorded["plain"] and INSTRUCTIONS.encode() in recorded["stream"]
    assert replayed == recorded
    stored = stored_bytes(cassettes)
    assert b"REDACTED" not in stored
    assert SECRET_KEY.encode() not in stored
