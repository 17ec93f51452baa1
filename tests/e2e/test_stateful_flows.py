"""Polling, background jobs and repeated calls: recorded once with the real openai SDK against
the simulator, then replayed in order with the simulator stopped."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx2
import openai
import orjson
import pytest
from click.testing import CliRunner
from openai import AzureOpenAI, OpenAI
from replay_proxy.core.modes import Mode
from replay_proxy.core.routes import SequencePolicy
from replay_proxy.core.settings import ReplayTiming
from replay_proxy.tools.cli import main
from replay_proxy.tools.testing import ProxyThread, SimulatorThread, run_proxy_process

from tests.conftest import SECRET_KEY, ProxyFactory, recorded_files

FINISHED = ("completed", "failed", "cancelled", "expired")
LINES = b"".join(orjson.dumps({
    "custom_id": f"line-{n}", "method": "POST", "url": "/v1/chat/completions",
    "body": {"model": "gpt-4o-mini", "seed": n,
             "messages": [{"role": "user", "content": f"Fact {n} about tides"}]},
}) + b"\n" for n in range(3))


def _client(proxy: ProxyThread, **headers: str) -> OpenAI:
    return OpenAI(base_url=proxy.url + "/v1", api_key=SECRET_KEY, max_retries=0,
                  default_headers=headers or None)


def batch_flow(client: OpenAI) -> dict[str, Any]:
    """Upload the input, create a batch, poll it until it ends, read its output."""
    uploaded = client.files.create(file=("lines.jsonl", LINES), purpose="batch")
    batch = client.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions",
                                  completion_window="24h")
    seen = [(batch.id, batch.status)]
    while batch.status not in FINISHED:
        batch = client.batches.retrieve(batch.id)
        seen.append((batch.id, batch.status))
    assert batch.output_file_id is not None
    output = client.files.content(batch.output_file_id).read()
    return {"file": uploaded.id, "statuses": seen, "output": output}


def background_flow(client: OpenAI) -> list[tuple[str, str | None, str]]:
    response = client.responses.create(model="gpt-4o-mini", input="Name a tide pool animal.",
                                       background=True)
    seen = [(response.id, response.status, response.output_text)]
    while response.status in ("queued", "in_progress"):
        response = client.responses.retrieve(response.id)
        seen.append((response.id, response.status, response.output_text))
    return seen


def vector_store_flow(client: OpenAI) -> dict[str, Any]:
    """The SDK's own polling helpers, with their default poll interval."""
    store = client.vector_stores.create(name="docs")
    uploaded = client.vector_stores.files.upload_and_poll(
        vector_store_id=store.id, file=("notes.txt", b"Tides follow the moon."))
    attached = client.files.create(file=("more.txt", b"Waves carry sand."), purpose="assistants")
    polled = client.vector_stores.files.create_and_poll(attached.id, vector_store_id=store.id)
    return {"store": store.id, "uploaded": (uploaded.id, uploaded.status),
            "attached": (polled.id, polled.status)}


def _record_then_replay(make_proxy: ProxyFactory, simulator: SimulatorThread,
                        flow: Callable[[OpenAI], Any]) -> tuple[Any, Any, ProxyThread]:
    with make_proxy(Mode.RECORD) as proxy, _client(proxy) as client:
        recorded = flow(client)
    simulator.stop()
    with make_proxy(Mode.REPLAY) as proxy, _client(proxy) as client:
        replayed = flow(client)
        assert proxy.state.totals["upstream_calls"] == 0
        assert proxy.state.totals["misses"] == 0
    return recorded, replayed, proxy


def test_a_batch_is_polled_to_completion_and_replayed_in_order(
        make_proxy: ProxyFactory, simulator: SimulatorThread) -> None:
    simulator.state.poll_steps = 2
    with make_proxy(Mode.RECORD) as proxy, _client(proxy) as client:
        recorded = batch_flow(client)
        polls = len(recorded["statuses"]) - 1
        # The record run asked the provider once per poll: no poll was answered from the store.
        assert simulator.state.calls_by_endpoint["GET batches/{batch_id}"] == polls
        assert proxy.state.totals["upstream_calls"] == simulator.state.calls
    statuses = [status for _, status in recorded["statuses"]]
    assert statuses[0] == "validating" and statuses[-1] == "completed"
    assert "in_progress" in statuses and "finalizing" in statuses
    assert len(recorded["output"].splitlines()) == 3

    simulator.stop()
    with make_proxy(Mode.REPLAY) as proxy, _client(proxy) as client:
        replayed = batch_flow(client)
        assert proxy.state.totals["upstream_calls"] == 0
    assert replayed == recorded  # the same ids, the same statuses in the same order


def test_a_second_record_run_replays_the_whole_sequence(make_proxy: ProxyFactory,
                                                       simulator: SimulatorThread) -> None:
    with make_proxy(Mode.RECORD) as proxy, _client(proxy) as client:
        first = batch_flow(client)
    calls = simulator.state.calls
    with make_proxy(Mode.RECORD) as proxy, _client(proxy) as client:
        second = batch_flow(client)
        assert proxy.state.totals["upstream_calls"] == 0
    assert simulator.state.calls == calls and second == first


def test_a_background_response_is_replayed_queued_to_completed(
        make_proxy: ProxyFactory, simulator: SimulatorThread) -> None:
    recorded, replayed, _ = _record_then_replay(make_proxy, simulator, background_flow)
    assert [status for _, status, _ in recorded][:2] == ["queued", "in_progress"]
    assert recorded[-1][1] == "completed" and recorded[-1][2]
    assert len({response_id for response_id, _, _ in recorded}) == 1
    assert replayed == recorded


def test_vector_store_poll_helpers_replay_without_waiting(make_proxy: ProxyFactory,
                                                         simulator: SimulatorThread,
                                                         cassettes: Path) -> None:
    simulator.state.poll_steps = 3  # each helper polls three times before the file is done
    with make_proxy(Mode.RECORD) as proxy, _client(proxy) as client:
        recorded = vector_store_flow(client)
    polls = simulator.state.calls_by_endpoint["GET vector_stores/{vector_store_id}/files/{file_id}"]
    assert polls >= 6 and recorded["uploaded"][1] == recorded["attached"][1] == "completed"
    simulator.stop()
    with make_proxy(Mode.REPLAY) as proxy, _client(proxy) as client:
        started = time.monotonic()
        replayed = vector_store_flow(client)
        elapsed = time.monotonic() - started
        raw = client.vector_stores.files.with_raw_response.retrieve(
            recorded["uploaded"][0], vector_store_id=recorded["store"])
    assert replayed == recorded
    # Replayed answers tell the helpers to ask again at once. Without that, each in-progress
    # poll waits the SDK's default second: six seconds here.
    assert raw.headers["openai-poll-after-ms"] == "0"
    assert "/" in raw.headers["x-replay-sequence"]
    assert elapsed < 3.0
    stored = [orjson.loads(path.read_bytes()) for path in recorded_files(cassettes)]
    polled = [doc for doc in stored if doc["label"].startswith("vector_stores")
              and doc["request"]["method"] == "GET"]
    assert polled and all(doc["sequence"] for doc in polled)
    # Record mode kept the provider's polling hint with the answer.
    assert any(r["headers"].get("openai-poll-after-ms") == str(simulator.state.poll_after_ms)
               for doc in polled for r in doc["recordings"])


def test_recorded_polling_hints_are_kept_with_recorded_timing(
        make_proxy: ProxyFactory, simulator: SimulatorThread) -> None:
    simulator.state.poll_after_ms = 40
    with make_proxy(Mode.RECORD) as proxy, _client(proxy) as client:
        recorded = vector_store_flow(client)
    simulator.stop()
    with make_proxy(Mode.REPLAY, replay_timing=ReplayTiming(1.0)) as proxy, \
            _client(proxy) as client:
        raw = client.vector_stores.files.with_raw_response.retrieve(
            recorded["uploaded"][0], vector_store_id=recorded["store"])
    assert raw.headers["openai-poll-after-ms"] == "40"


def test_creating_the_same_thing_twice_makes_two_resources(make_proxy: ProxyFactory,
                                                          simulator: SimulatorThread) -> None:
    def twice(client: OpenAI) -> list[str]:
        return [client.vector_stores.create(name="docs").id for _ in range(2)]

    recorded, replayed, _ = _record_then_replay(make_proxy, simulator, twice)
    assert recorded[0] != recorded[1]
    assert replayed == recorded


def test_a_write_past_the_recorded_sequence_misses_with_its_place(
        make_proxy: ProxyFactory, simulator: SimulatorThread) -> None:
    with make_proxy(Mode.RECORD) as proxy, _client(proxy) as client:
        for _ in range(2):
            client.vector_stores.create(name="docs")
    simulator.stop()
    with make_proxy(Mode.REPLAY) as proxy, _client(proxy) as client:
        answers = [client.vector_stores.with_raw_response.create(name="docs") for _ in range(2)]
        with pytest.raises(openai.NotFoundError) as third:
            client.vector_stores.create(name="docs")
    assert [a.headers.get("x-replay-sequence") for a in answers] == ["1/2", "2/2"]
    error = third.value.response.json()["error"]
    assert error["code"] == "sequence_exhausted"
    assert "3rd identical POST vector_stores" in error["message"]
    assert "2 recorded" in error["message"]


def test_sessions_have_counters_of_their_own(make_proxy: ProxyFactory,
                                             simulator: SimulatorThread) -> None:
    with make_proxy(Mode.RECORD) as proxy, _client(proxy) as client:
        recorded = batch_flow(client)
    simulator.stop()
    results: dict[str, Any] = {}

    def run(session: str, proxy: ProxyThread) -> None:
        with _client(proxy, **{"X-Replay-Session": session}) as client:
            results[session] = batch_flow(client)

    with make_proxy(Mode.REPLAY) as proxy:
        threads = [threading.Thread(target=run, args=(name, proxy)) for name in ("a", "b")]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
        # A session can also be named in the base URL, for clients that cannot add a header.
        with OpenAI(base_url=proxy.url + "/s/c/v1", api_key="x", max_retries=0) as client:
            results["c"] = batch_flow(client)
    assert results == {"a": recorded, "b": recorded, "c": recorded}


def test_reset_starts_the_default_session_again(make_proxy: ProxyFactory,
                                                simulator: SimulatorThread) -> None:
    with make_proxy(Mode.RECORD) as proxy, _client(proxy) as client:
        recorded = batch_flow(client)
    simulator.stop()
    with make_proxy(Mode.REPLAY) as proxy, _client(proxy) as client:
        assert batch_flow(client) == recorded
        with pytest.raises(openai.NotFoundError, match="2nd identical POST files"):
            batch_flow(client)  # the same run again: its upload is the 2nd, and only 1 recorded
        reset = httpx2.post(proxy.url + "/_replay/reset")
        assert reset.status_code == 200 and reset.json()["reset"] is True
        assert batch_flow(client) == recorded


def test_a_seeded_chat_asked_twice_is_one_answer_unless_everything_is_sequenced(
        make_proxy: ProxyFactory, simulator: SimulatorThread) -> None:
    chat = {"model": "gpt-4o-mini", "seed": 3, "messages": [{"role": "user", "content": "Hi"}]}

    def ask_twice(client: OpenAI) -> list[str]:
        return [str(client.chat.completions.create(**chat).choices[0].message.content)
                for _ in range(2)]

    with make_proxy(Mode.RECORD) as proxy, _client(proxy) as client:
        once = ask_twice(client)
    assert simulator.state.calls == 1 and once[0] == once[1]

    simulator.state.update({"reset_calls": True})
    chat["seed"] = None  # an unseeded prompt sampled twice: two different answers
    with make_proxy(Mode.RECORD, sequence=SequencePolicy.ALL) as proxy, \
            _client(proxy) as client:
        sampled = ask_twice(client)
    assert simulator.state.calls == 2 and sampled[0] != sampled[1]
    simulator.stop()
    with make_proxy(Mode.REPLAY, sequence=SequencePolicy.ALL) as proxy, \
            _client(proxy) as client:
        assert ask_twice(client) == sampled


def test_azure_files_and_batches_replay_in_order(make_proxy: ProxyFactory,
                                                 simulator: SimulatorThread) -> None:
    def flow(proxy: ProxyThread) -> dict[str, Any]:
        with AzureOpenAI(azure_endpoint=proxy.url, api_version="2024-10-21", api_key="k",
                         max_retries=0) as client:
            return batch_flow(client)

    with make_proxy(Mode.RECORD) as proxy:
        recorded = flow(proxy)
    simulator.stop()
    with make_proxy(Mode.REPLAY) as proxy:
        assert flow(proxy) == recorded


def test_ls_and_show_print_the_sequence(make_proxy: ProxyFactory, simulator: SimulatorThread,
                                        cassettes: Path) -> None:
    with make_proxy(Mode.RECORD) as proxy, _client(proxy) as client:
        recorded = batch_flow(client)
    runner = CliRunner()
    rows = orjson.loads(runner.invoke(main, ["ls", "--cassettes", str(cassettes),
                                             "--json"]).output)
    [polls] = [row for row in rows if str(row["route"]).startswith("batches/")]
    assert polls["sequence"] == [f"200:{status}" for _, status in recorded["statuses"][1:]]
    listed = runner.invoke(main, ["ls", "--cassettes", str(cassettes)]).output
    assert "200:completed" in listed
    shown = runner.invoke(main, ["show", polls["key"][:10], "--cassettes", str(cassettes)])
    assert "occurrence 1: status 200, resource" in shown.output
    assert "replayed in order" in shown.output


def test_verify_skips_stateful_keys_with_a_reason(make_proxy: ProxyFactory,
                                                 simulator: SimulatorThread,
                                                 cassettes: Path) -> None:
    with make_proxy(Mode.RECORD) as proxy, _client(proxy) as client:
        client.vector_stores.create(name="docs")
    result = CliRunner().invoke(main, ["verify", "--cassettes", str(cassettes), "--json",
                                       "--openai-upstream", simulator.url])
    [verdict] = orjson.loads(result.stdout)
    assert verdict["result"] == "skipped" and "stateful" in verdict["detail"]
    assert result.exit_code == 2  # nothing was verified


def test_workers_agree_on_the_nth_request(simulator: SimulatorThread, tmp_path: Path) -> None:
    """Two processes on one port: each request may land on either; the counters are shared."""
    cassettes = str(tmp_path / "cassettes")
    common = ("--workers", "2", "--cassettes", cassettes, "--openai-upstream", simulator.url)

    def flow_on_fresh_connections(url: str) -> dict[str, Any]:
        # No keep-alive: every request is a new connection, spread over the workers.
        transport = httpx2.HTTPTransport(limits=httpx2.Limits(max_keepalive_connections=0))
        with httpx2.Client(transport=transport) as http, \
                OpenAI(base_url=url + "/v1", api_key="k", max_retries=0,
                       http_client=http) as client:
            # The port answers once the first worker listens; wait for the second too.
            pids: set[int] = set()
            deadline = time.monotonic() + 30
            while len(pids) < 2 and time.monotonic() < deadline:
                pids.add(http.get(url + "/_replay/health").json()["pid"])
            assert len(pids) == 2, "both workers answer"
            return batch_flow(client)

    with run_proxy_process("--mode", "record", *common) as (url, _):
        recorded = flow_on_fresh_connections(url)
    polls = simulator.state.calls_by_endpoint["GET batches/{batch_id}"]
    assert polls == len(recorded["statuses"]) - 1
    simulator.stop()
    with run_proxy_process("--mode", "replay", *common) as (url, _):
        replayed = flow_on_fresh_connections(url)
    assert replayed == recorded


def test_refresh_records_a_sequence_again_from_its_start(make_proxy: ProxyFactory,
                                                        simulator: SimulatorThread,
                                                        cassettes: Path) -> None:
    simulator.state.poll_steps = 3
    with make_proxy(Mode.RECORD) as proxy, _client(proxy) as client:
        first = background_flow(client)
    simulator.state.poll_steps = 1  # the provider got faster: fewer polls this time
    with make_proxy(Mode.REFRESH) as proxy, _client(proxy) as client:
        refreshed = background_flow(client)
    assert refreshed[0][0] != first[0][0] and len(refreshed) < len(first)
    simulator.stop()
    with make_proxy(Mode.REPLAY) as proxy, _client(proxy) as client:
        assert background_flow(client) == refreshed
    created = [orjson.loads(path.read_bytes()) for path in recorded_files(cassettes)
               if path.name.startswith("responses-")]
    [document] = created
    assert document["sequence"] and len(document["recordings"]) == 1
