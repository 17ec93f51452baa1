"""`prune` deletes only what a run could have used and did not: a partial run leaves the
cassettes it never touched alone, the workers of one `serve` are one run, and a key answered
inside a flight (recorded meanwhile by another proxy sharing the store) counts as used."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import orjson
from click.testing import CliRunner
from openai import OpenAI
from replay_proxy.core.modes import Mode
from replay_proxy.server.usage import UsageLog, read_runs
from replay_proxy.store import open_store
from replay_proxy.store.state_dir import state_dir
from replay_proxy.tools.cli import main
from replay_proxy.tools.testing import SimulatorThread, run_proxy_process

from tests.conftest import SECRET_KEY, ProxyFactory, recorded_files


def _ask(base_url: str, cassette: str, prompt: str) -> str:
    with OpenAI(base_url=f"{base_url}/c/{cassette}/v1", api_key=SECRET_KEY,
                max_retries=0) as client:
        reply = client.chat.completions.create(
            model="gpt-4o-mini", seed=1, messages=[{"role": "user", "content": prompt}])
    return reply.choices[0].message.content or ""


def _prune(cassettes: Path, *args: str) -> dict[str, object]:
    result = CliRunner().invoke(main, ["prune", "--cassettes", str(cassettes), "--json", *args])
    assert result.exit_code == 0, result.output
    document: dict[str, object] = orjson.loads(result.stdout)
    return document


def _deleted(report: dict[str, object]) -> list[str]:
    rows = report["deleted"]
    assert isinstance(rows, list)
    return sorted(row["cassette"] for row in rows)


def test_a_partial_run_prunes_only_the_cassettes_it_touched(make_proxy: ProxyFactory,
                                                            cassettes: Path) -> None:
    with make_proxy(Mode.RECORD) as proxy:  # the whole suite: two tests, two prompts each
        for cassette in ("test_one", "test_two"):
            _ask(proxy.url, cassette, "first")
            _ask(proxy.url, cassette, "second")
    with make_proxy(Mode.REPLAY) as proxy:  # `pytest -k test_one`, whose code changed
        _ask(proxy.url, "test_one", "first")
    report = _prune(cassettes, "--dry-run")
    assert _deleted(report) == ["test_one"]  # its stale second prompt, nothing of test_two
    assert report["cassettes_left"] == ["test_two"]
    text = CliRunner().invoke(main, ["prune", "--cassettes", str(cassettes), "--dry-run"])
    assert "left 1 cassette(s) that run did not touch as they are (test_two); --all" \
        in text.output
    assert _deleted(_prune(cassettes, "--dry-run", "--all")) == \
        ["test_one", "test_two", "test_two"]

    # A passthrough run never reads the recordings: it touches no cassette.
    with make_proxy(Mode.PASSTHROUGH) as proxy:
        _ask(proxy.url, "test_two", "third")
    assert _deleted(_prune(cassettes, "--dry-run")) == []

    assert len(recorded_files(cassettes)) == 4
    _prune(cassettes, "--since-run", str(read_runs(state_dir(cassettes))[1]["run"]))
    assert len(recorded_files(cassettes)) == 3  # test_one's second prompt, and only it


def test_the_workers_of_one_serve_are_one_run(simulator: SimulatorThread,
                                              cassettes: Path) -> None:
    prompts = [f"prompt {n}" for n in range(40)]
    with run_proxy_process("--mode", "record", "--cassettes", str(cassettes),
                           "--openai-upstream", simulator.url) as (url, _):
        for prompt in prompts:
            _ask(url, "suite", prompt)
    with run_proxy_process("--mode", "replay", "--workers", "2", "--cassettes",
                           str(cassettes)) as (url, process):
        time.sleep(1.0)  # both workers listening
        for prompt in prompts:  # a client, and so a connection, each: both workers serve
            _ask(url, "suite", prompt)
        process.terminate()
        process.wait(timeout=20)
    runs = read_runs(state_dir(cassettes))
    assert len(runs) == 2 and runs[-1]["processes"] == 2
    assert runs[-1]["totals"]["hits"] == 40  # each worker's counters, added up
    stats = orjson.loads(CliRunner().invoke(main, ["stats", "--cassettes", str(cassettes),
                                                   "--json"]).stdout)
    assert stats["totals"]["hits"] == 40 and stats["totals"]["recorded"] == 40
    assert _deleted(_prune(cassettes, "--dry-run")) == []


def test_a_key_answered_inside_a_flight_is_used(make_proxy: ProxyFactory, simulator: SimulatorThread,
                                                cassettes: Path, tmp_path: Path) -> None:
    """Another proxy sharing the store records the key while this one waits for its lock; this
    one then answers from that recording, which its run used."""
    elsewhere = tmp_path / "elsewhere"
    with make_proxy(Mode.RECORD, cassettes=elsewhere) as proxy:
        _ask(proxy.url, "suite", "shared")
    (entry_file,) = recorded_files(elsewhere)
    key = entry_file.stem.rpartition("-")[2]
    other = open_store(cassettes)  # the other proxy's hold on the store
    holding = other.lock("suite", key)
    loop = asyncio.new_event_loop()
    loop.run_until_complete(holding.__aenter__())
    try:
        with make_proxy(Mode.RECORD) as proxy:
            answers: list[str] = []
            waiting = threading.Thread(target=lambda: answers.append(
                _ask(proxy.url, "suite", "shared")))
            waiting.start()
            deadline = time.monotonic() + 10
            while not proxy.state.flights._flights and time.monotonic() < deadline:
                time.sleep(0.02)
            assert proxy.state.flights._flights, "the request waits for the key's lock"
            calls = simulator.state.calls
            (cassettes / "suite").mkdir(parents=True)
            (cassettes / "suite" / entry_file.name).write_bytes(entry_file.read_bytes())
            loop.run_until_complete(holding.__aexit__(None, None, None))
            waiting.join(timeout=10)
            assert answers and simulator.state.calls == calls  # replayed, not asked again
            assert proxy.state.totals["hits"] == 1
            run = proxy.state.usage.run if proxy.state.usage else ""
    finally:
        loop.run_until_complete(other.close())
        loop.close()
    assert _deleted(_prune(cassettes, "--dry-run", "--since-run", run)) == []
    lines = [orjson.loads(line) for line in
             (state_dir(cassettes) / "usage.jsonl").read_bytes().splitlines()]
    assert {"run": run, "cassette": "suite", "key": key} in [
        {name: line[name] for name in ("run", "cassette", "key") if name in line}
        for line in lines]


def test_each_process_keeps_its_own_counters_for_a_shared_run(tmp_path: Path) -> None:
    directory = tmp_path / ".replay-proxy"
    first, second = UsageLog(directory, run="shared-run"), UsageLog(directory, run="shared-run")
    first.flush({"totals": {"hits": 3}, "cassettes": {"a": {"hits": 3}}})
    second.flush({"totals": {"hits": 2, "misses": 1},
                  "cassettes": {"a": {"hits": 1}, "b": {"hits": 1, "misses": 1}}})
    (run,) = read_runs(directory)
    assert run["processes"] == 2
    assert run["totals"] == {"hits": 5, "misses": 1}
    assert run["cassettes"] == {"a": {"hits": 4}, "b": {"hits": 1, "misses": 1}}
