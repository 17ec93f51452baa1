"""A session's own counters, mode and fingerprint (`/_replay/sessions/<id>`), reading cassettes
ahead (`/_replay/warm`) and the miss log: what the pytest plugin asks of its proxy, through
the real openai SDK against the simulator."""

from __future__ import annotations

import time
from pathlib import Path

import httpx2
import openai
import orjson
import pytest
from openai import OpenAI
from replay_proxy.core.modes import Mode
from replay_proxy.core.settings import Settings
from replay_proxy.server.handler import ReplayProxy
from replay_proxy.server.sessions import Sessions
from replay_proxy.tools.testing import ProxyThread, SimulatorThread

from tests.conftest import SECRET_KEY, ProxyFactory, recorded_files

QUESTION = {"model": "gpt-4o-mini", "seed": 3,
            "messages": [{"role": "user", "content": "Name a moon of Mars."}]}


def _ask(proxy: ProxyThread, session: str, cassette: str = "shared", times: int = 1) -> None:
    with OpenAI(base_url=f"{proxy.url}/s/{session}/c/{cassette}/v1", api_key=SECRET_KEY,
                max_retries=0) as client:
        for _ in range(times):
            client.chat.completions.create(**QUESTION)


def _session(proxy: ProxyThread, name: str) -> dict[str, object]:
    answer = httpx2.get(f"{proxy.url}/_replay/sessions/{name}")
    assert answer.status_code == 200, answer.text
    found: dict[str, object] = answer.json()
    return found


def test_each_session_counts_what_was_done_for_it(make_proxy: ProxyFactory,
                                                  simulator: SimulatorThread) -> None:
    with make_proxy(Mode.RECORD) as proxy:
        _ask(proxy, "first")
        _ask(proxy, "second", times=2)  # the second byte-identical: the hot path
        httpx2.post(f"{proxy.url}/c/shared/v1/chat/completions", json=QUESTION,
                    headers={"Authorization": f"Bearer {SECRET_KEY}",
                             "X-Replay-Session": "by-header"})
        # The recording is stored after the answer: the counters wait for it.
        first = _session(proxy, "first")
        assert (first["recorded"], first["upstream_calls"], first["hits"]) == (1, 1, 0)
        assert _session(proxy, "second")["hits"] == 2
        assert _session(proxy, "second")["recorded"] == 0
        assert _session(proxy, "by-header")["hits"] == 1
        assert _session(proxy, "never-seen")["hits"] == 0
        assert simulator.state.calls == 1
        totals = httpx2.get(f"{proxy.url}/_replay/stats").json()["totals"]
        assert totals["hits"] == 3 and totals["recorded"] == 1


def test_a_session_has_its_own_mode_and_fingerprint(make_proxy: ProxyFactory,
                                                    simulator: SimulatorThread) -> None:
    with make_proxy(Mode.RECORD) as proxy:
        put = httpx2.put(f"{proxy.url}/_replay/sessions/strict",
                         json={"mode": "replay", "fingerprint": "fp_other"})
        assert put.status_code == 200 and put.json()["mode"] == "replay"
        with pytest.raises(openai.NotFoundError):
            _ask(proxy, "strict")
        strict = _session(proxy, "strict")
        assert strict["misses"] == 1 and "has no recording" in str(strict["last_miss"])
        assert simulator.state.calls == 0  # the session's mode held, the proxy's did not
        _ask(proxy, "free")  # record: recorded
        with pytest.raises(openai.NotFoundError) as missed:
            _ask(proxy, "strict")
        assert "fp_other" in str(missed.value)  # now recorded, but not with that fingerprint
        assert len(recorded_files(proxy.state.settings.cassettes)) == 1
        for wrong in ({"mode": "auto"}, {"mode": "loud"}, {"fingerprint": "x" * 201},
                      {"fingerprint": 7}):
            refused = httpx2.put(f"{proxy.url}/_replay/sessions/strict", json=wrong)
            assert refused.status_code == 400, wrong
        assert httpx2.put(f"{proxy.url}/_replay/sessions/bad%2Fname", json={}).status_code \
            in (400, 404)
        assert httpx2.delete(f"{proxy.url}/_replay/sessions/strict").status_code == 405


def test_warming_reads_cassettes_before_they_are_asked_for(
        make_proxy: ProxyFactory, simulator: SimulatorThread, cassettes: Path) -> None:
    with make_proxy(Mode.RECORD) as proxy:
        for number in range(3):
            _ask(proxy, f"rec-{number}", f"warm/test_{number}")
    settings = Settings(cassettes=cassettes, mode=Mode.REPLAY)
    proxy = ProxyThread(lambda: ReplayProxy(settings, {}))
    proxy.start()
    try:
        names = [f"warm/test_{number}" for number in range(3)] + ["warm/none", "warm/test_0"]
        queued = httpx2.post(f"{proxy.url}/_replay/warm", json={"cassettes": names})
        assert queued.json() == {"queued": 4}  # each name once
        deadline = time.monotonic() + 10
        while httpx2.get(f"{proxy.url}/_replay/stats").json()["memory"]["entries"] < 3:
            assert time.monotonic() < deadline, "the cassettes were not read ahead"
            time.sleep(0.02)
        # Read ahead, with no request for them yet (and nothing more: the missing one is none).
        assert httpx2.get(f"{proxy.url}/_replay/stats").json()["memory"]["entries"] == 3
        _ask(proxy, "replay", "warm/test_2")
        for wrong in ({"cassettes": "warm"}, {"cassettes": [1]}, [], {"cassettes": ["../x"]}):
            assert httpx2.post(f"{proxy.url}/_replay/warm", json=wrong).status_code == 400
    finally:
        proxy.stop()


def test_the_miss_log_has_a_line_before_the_client_has_its_404(
        simulator: SimulatorThread, cassettes: Path, tmp_path: Path) -> None:
    log = tmp_path / "misses.jsonl"
    settings = Settings(cassettes=cassettes, mode=Mode.REPLAY)
    proxy = ProxyThread(lambda: ReplayProxy(settings, {}, miss_log=log))
    proxy.start()
    try:
        with pytest.raises(openai.NotFoundError):
            _ask(proxy, "swallowed", "nothing")
        [line] = log.read_bytes().splitlines()  # already there when the client got its answer
        miss = orjson.loads(line)
        assert miss["session"] == "swallowed" and miss["cassette"] == "nothing"
        assert "has no recording for POST chat/completions" in miss["message"]
    finally:
        proxy.stop()


def test_sessions_are_bounded_by_count_and_by_the_bytes_of_their_explanations() -> None:
    sessions = Sessions(limit=3, miss_bytes=10_000)
    for name in ("a", "b", "c", "d"):
        sessions.record(name)
    assert len(sessions) == 3 and sessions.get("a") is None and sessions.evicted == 1
    record = sessions.record("e")
    sessions.note_miss(record, "x" * 100_000)  # one explanation is cut to its own bound
    assert record.last_miss is not None and len(record.last_miss) <= 4096
    for name in "fghij":
        sessions.note_miss(sessions.record(name), "y" * 4000)
    assert len(sessions) == 2  # 3 x 4000 bytes are over the 10,000 kept: the oldest go
    latest = sessions.get("j")
    assert latest is not None and latest.last_miss == "y" * 4000
    assert sessions.get("i") is not None and sessions.get("h") is None
