"""Memory is bounded by bytes: large prompts recorded and hit many times, and many cassette
names, leave the proxy's memory within its --cache-mb budget."""

from __future__ import annotations

import re
from pathlib import Path

import httpx2
import orjson
import pytest
from replay_proxy.core.modes import Mode
from replay_proxy.tools.testing import SimulatorThread, run_proxy_process

from tests.conftest import ProxyFactory

MIB = 1024 * 1024
HEADERS = {"Authorization": "Bearer sk-test", "Content-Type": "application/json"}


def _rss_mb(pid: int) -> float:
    status = Path(f"/proc/{pid}/status").read_text()
    match = re.search(r"VmRSS:\s+(\d+)", status)
    assert match is not None
    return int(match.group(1)) / 1024


def _prompt(seed: int, size: int) -> bytes:
    return orjson.dumps({"model": "gpt-4o-mini", "seed": seed,
                         "messages": [{"role": "user", "content": f"{seed} " + "x" * size}]})


@pytest.mark.load
@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads RSS from /proc")
def test_large_prompts_recorded_and_hit_stay_within_the_cache_budget(
        simulator: SimulatorThread, cassettes: Path) -> None:
    # 40 prompts of 1 MiB, recorded then hit twice each: without a byte budget the entries and
    # the hot replies (whose keys hold the request bodies) keep about 80 MiB.
    with run_proxy_process("--mode", "record", "--cassettes", str(cassettes), "--cache-mb", "8",
                           "--openai-upstream", simulator.url) as (url, process), \
            httpx2.Client(timeout=60, headers=HEADERS) as client:
        for seed in range(5):  # warm up: imports, first allocations
            client.post(url + "/v1/chat/completions", content=_prompt(10_000 + seed, 1000))
        before = _rss_mb(process.pid)
        for seed in range(40):
            response = client.post(url + "/v1/chat/completions", content=_prompt(seed, MIB))
            assert response.headers["x-replay-status"] == "recorded"
        for _ in range(2):
            for seed in range(40):
                response = client.post(url + "/v1/chat/completions", content=_prompt(seed, MIB))
                assert response.headers["x-replay-status"] == "hit"
        growth = _rss_mb(process.pid) - before
        memory = client.get(url + "/_replay/stats").json()["memory"]
    assert memory["entries_bytes"] + memory["hot_bytes"] <= 8 * MIB
    assert memory["hot_replies"] >= 1  # the hot path still works inside the budget
    assert growth < 40, f"RSS grew {growth:.0f} MB with an 8 MB cache budget"


def test_counters_of_many_cassettes_are_bounded_and_the_totals_kept(
        make_proxy: ProxyFactory) -> None:
    with make_proxy(Mode.REPLAY) as proxy:
        proxy.invoke(lambda: setattr(proxy.state, "counted_cassettes", 50))
        with httpx2.Client(headers=HEADERS) as client:
            for index in range(200):
                response = client.post(f"{proxy.url}/c/made-up-{index}/v1/chat/completions",
                                       content=_prompt(index, 10))
                assert response.status_code == 404
            stats = client.get(proxy.url + "/_replay/stats").json()
    assert len(stats["cassettes"]) == 50
    assert stats["retired_cassettes"] == 150
    assert stats["totals"]["misses"] == 200
    # The latest are kept one by one.
    assert "made-up-199" in stats["cassettes"] and "made-up-0" not in stats["cassettes"]
