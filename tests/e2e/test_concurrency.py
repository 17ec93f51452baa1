"""Many clients at once: one upstream call and one file per key, each client its own answer;
and a crash mid-burst leaves only whole files."""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time
from pathlib import Path

import httpx2
import orjson
import pytest
from replay_proxy.core.cassette import decode_entry
from replay_proxy.core.modes import Mode
from replay_proxy.tools.testing import SimulatorThread, run_proxy_process

from tests.conftest import ProxyFactory, recorded_files


def _body(seed: int) -> bytes:
    return orjson.dumps({"model": "gpt-4o-mini", "seed": seed,
                         "messages": [{"role": "user", "content": "Count to three."}]})


async def _burst(url: str, requests: int, keys: int) -> list[httpx2.Response]:
    limits = httpx2.Limits(max_connections=requests)
    async with httpx2.AsyncClient(limits=limits, timeout=60) as client:
        return await asyncio.gather(*(
            client.post(url + "/v1/chat/completions", content=_body(index % keys),
                        headers={"Authorization": "Bearer sk-x",
                                 "Content-Type": "application/json"})
            for index in range(requests)))


def _check(responses: list[httpx2.Response], keys: int) -> None:
    assert all(r.status_code == 200 for r in responses), {r.status_code for r in responses}
    by_seed: dict[int, set[bytes]] = {}
    for index, response in enumerate(responses):
        by_seed.setdefault(index % keys, set()).add(response.content)
    assert all(len(bodies) == 1 for bodies in by_seed.values()), "one answer per key"
    answers = {next(iter(bodies)) for bodies in by_seed.values()}
    assert len(answers) == keys, "every key its own answer"
    for index, response in enumerate(responses):
        assert response.json()["id"] == responses[index % keys].json()["id"]


async def test_300_requests_over_30_keys_make_30_calls(make_proxy: ProxyFactory,
                                                       simulator: SimulatorThread,
                                                       cassettes: Path) -> None:
    simulator.state.latency = 0.2
    with make_proxy(Mode.RECORD) as proxy:
        responses = await _burst(proxy.url, 300, 30)
    _check(responses, 30)
    assert simulator.state.calls == 30
    assert len(recorded_files(cassettes)) == 30


async def test_the_same_holds_with_two_worker_processes(simulator: SimulatorThread,
                                                        cassettes: Path) -> None:
    simulator.state.latency = 0.3
    with run_proxy_process("--workers", "2", "--mode", "record", "--cassettes", str(cassettes),
                           "--openai-upstream", simulator.url) as (url, _):
        await asyncio.sleep(1.0)  # both workers listening
        responses = await _burst(url, 300, 30)
    _check(responses, 30)
    assert simulator.state.calls == 30
    assert len(recorded_files(cassettes)) == 30


@pytest.mark.timeout(120)
def test_kill_9_mid_burst_leaves_only_whole_files(simulator: SimulatorThread,
                                                  cassettes: Path) -> None:
    simulator.state.latency = 0.01
    with run_proxy_process("--mode", "record", "--cassettes", str(cassettes),
                           "--openai-upstream", simulator.url) as (url, process):
        stop = threading.Event()

        def hammer() -> None:
            with httpx2.Client(timeout=5) as client:
                seed = 0
                while not stop.is_set():
                    seed += 1
                    try:
                        client.post(url + "/v1/chat/completions", content=_body(seed),
                                    headers={"Authorization": "Bearer sk-x",
                                             "Content-Type": "application/json"})
                    except httpx2.HTTPError:
                        return

        threads = [threading.Thread(target=hammer) for _ in range(8)]
        for thread in threads:
            thread.start()
        deadline = time.monotonic() + 20
        while len(recorded_files(cassettes)) < 40 and time.monotonic() < deadline:
            time.sleep(0.05)
        os.kill(process.pid, signal.SIGKILL)
        process.wait()
        stop.set()
        for thread in threads:
            thread.join()
    files = recorded_files(cassettes)
    assert len(files) >= 40
    for path in files:
        entry = decode_entry(path.read_bytes(), str(path))  # raises on a partial file
        assert entry.recordings and entry.recordings[0].status == 200
    with run_proxy_process("--mode", "replay", "--cassettes", str(cassettes)) as (url, _):
        seed = int(orjson.loads(files[0].read_bytes())["request"]["body"]["seed"])
        replayed = httpx2.post(url + "/v1/chat/completions", content=_body(seed),
                               headers={"Content-Type": "application/json"})
        assert replayed.headers["x-replay-status"] == "hit"
