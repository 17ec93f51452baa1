"""Several proxies sharing one Redis: what one records, another replays; a burst across the
fleet makes one upstream call."""

from __future__ import annotations

import asyncio

import httpx2
import orjson
import pytest
from click.testing import CliRunner
from openai import OpenAI
from replay_proxy.tools.cli import main
from replay_proxy.tools.testing import SimulatorThread, run_proxy_process

CHAT = {"model": "gpt-4o-mini", "seed": 3, "messages": [{"role": "user", "content": "Fleet?"}]}


def test_record_on_one_proxy_replay_on_another(redis_url: str, simulator: SimulatorThread,
                                               tmp_path: object) -> None:
    common = ("--store", redis_url, "--cassettes", str(tmp_path))
    with run_proxy_process("--mode", "record", "--openai-upstream", simulator.url,
                           *common) as (recorder, _), \
            OpenAI(base_url=recorder + "/c/fleet/v1", api_key="sk-x") as client:
        recorded = client.chat.completions.create(**CHAT)
        streamed = list(client.chat.completions.create(**CHAT, stream=True))
    simulator.stop()
    with run_proxy_process("--mode", "replay", *common) as (replayer, _), \
            OpenAI(base_url=replayer + "/c/fleet/v1", api_key="x") as client:
        raw = client.chat.completions.with_raw_response.create(**CHAT)
        assert raw.headers["x-replay-status"] == "hit"
        assert raw.parse() == recorded
        assert list(client.chat.completions.create(**CHAT, stream=True)) == streamed


async def test_burst_across_two_proxies_makes_one_upstream_call(
        redis_url: str, simulator: SimulatorThread, tmp_path: object) -> None:
    simulator.state.latency = 0.5
    common = ("--mode", "record", "--store", redis_url, "--cassettes", str(tmp_path),
              "--openai-upstream", simulator.url)
    with run_proxy_process(*common) as (first, _), run_proxy_process(*common) as (second, _):
        async with httpx2.AsyncClient(timeout=30) as client:
            responses = await asyncio.gather(*(
                client.post(url + "/v1/chat/completions", content=orjson.dumps(CHAT),
                            headers={"Authorization": "Bearer sk-x",
                                     "Content-Type": "application/json"})
                for url in [first, second] * 10))
    assert {r.status_code for r in responses} == {200}
    assert len({r.content for r in responses}) == 1, "every client got the same answer"
    assert simulator.state.calls == 1
    statuses = sorted({r.headers["x-replay-status"] for r in responses})
    assert statuses == ["hit", "recorded"]


def test_export_import_between_directory_diskcache_and_redis(
        redis_url: str, simulator: SimulatorThread, tmp_path: object) -> None:
    from pathlib import Path

    root = Path(str(tmp_path))
    with run_proxy_process("--mode", "record", "--cassettes", str(root / "dir"),
                           "--openai-upstream", simulator.url) as (url, _), \
            OpenAI(base_url=url + "/c/suite/v1", api_key="sk-x") as client:
        client.chat.completions.create(**CHAT)
        list(client.chat.completions.create(**CHAT, stream=True))
    runner = CliRunner()
    cache = f"diskcache:{root / 'cache'}"
    for source, target in ((str(root / "dir"), redis_url), (redis_url, cache),
                           (cache, str(root / "back"))):
        result = runner.invoke(main, ["export", "--from", source, "--to", target])
        assert result.exit_code == 0 and "copied 2 key(s)" in result.output, result.output
    originals = sorted((root / "dir" / "suite").glob("*.json"))
    assert len(originals) == 2
    for path in originals:
        assert (root / "back" / "suite" / path.name).read_bytes() == path.read_bytes()


@pytest.mark.parametrize("store", ["redis_url", "redis_cluster_url"])
def test_a_session_spread_over_two_proxies_replays_its_sequence_in_order(
        store: str, request: pytest.FixtureRequest, simulator: SimulatorThread,
        tmp_path: object) -> None:
    """The n-th poll is counted in Redis (one server or a cluster), so it does not matter
    which proxy answers it."""
    simulator.state.poll_steps = 2
    common = ("--store", request.getfixturevalue(store), "--cassettes", str(tmp_path))

    def poll_alternating(urls: tuple[str, str], session: str) -> list[tuple[str, str]]:
        clients = [OpenAI(base_url=url + "/c/jobs/v1", api_key="sk-x", max_retries=0,
                          default_headers={"X-Replay-Session": session}) for url in urls]
        try:
            response = clients[0].responses.create(model="gpt-4o-mini", input="Tides?",
                                                   background=True)
            seen = [(response.id, str(response.status))]
            turn = 1
            while response.status in ("queued", "in_progress"):
                response = clients[turn % 2].responses.retrieve(response.id)
                seen.append((response.id, str(response.status)))
                turn += 1
            return seen
        finally:
            for client in clients:
                client.close()

    with run_proxy_process("--mode", "record", "--openai-upstream", simulator.url,
                           *common) as (first, _), \
            run_proxy_process("--mode", "record", "--openai-upstream", simulator.url,
                              *common) as (second, _):
        recorded = poll_alternating((first, second), "recording")
        # Another session records nothing new: it replays the sequence from its start ...
        assert poll_alternating((second, first), "again") == recorded
        # ... and so does a session started again.
        httpx2.post(first + "/_replay/reset?session=again").raise_for_status()
        assert poll_alternating((second, first), "again") == recorded
    assert [status for _, status in recorded] == ["queued", "in_progress", "in_progress",
                                                  "completed"]
    assert simulator.state.calls == len(recorded)
    simulator.stop()
    with run_proxy_process("--mode", "replay", *common) as (first, _), \
            run_proxy_process("--mode", "replay", *common) as (second, _):
        assert poll_alternating((first, second), "ci-run") == recorded
