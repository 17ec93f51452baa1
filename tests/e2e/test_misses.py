"""Replay misses on a large cassette name their nearest recording without holding up the
other requests (the timing itself is measured in scripts/bench, section misses)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import httpx2
import orjson
import pytest
from replay_proxy.core.canonical import IncomingRequest, KeyPolicy, canonical_request, request_key
from replay_proxy.core.cassette import Entry, Recording, encode_entry
from replay_proxy.core.modes import Mode
from replay_proxy.core.providers import parse_route

from tests.conftest import ProxyFactory

HEADERS = {"Authorization": "Bearer sk-test", "Content-Type": "application/json"}
ANSWER = Recording(status=200, headers={"content-type": "application/json"},
                   body=b'{"id": "chatcmpl-1", "object": "chat.completion", "choices": []}')


def _body(seed: int, max_tokens: int = 8) -> bytes:
    return orjson.dumps({"model": "gpt-4o-mini", "seed": seed, "max_tokens": max_tokens,
                         "messages": [{"role": "user", "content": f"Question {seed}?"}]})


def _fill(folder: Path, count: int) -> dict[int, str]:
    """A cassette of `count` recordings (seeds 0..count-1), written as the store writes them."""
    route = parse_route("/v1/chat/completions", {})
    assert route is not None
    folder.mkdir(parents=True)
    keys = {}
    for seed in range(count):
        incoming = IncomingRequest("POST", route, (), {"content-type": "application/json"},
                                   _body(seed))
        canonical = canonical_request(incoming, KeyPolicy())
        keys[seed] = key = request_key(canonical)
        entry = Entry(key, route.label, canonical).add(ANSWER)
        (folder / f"{route.label}-{key}.json").write_bytes(encode_entry(entry))
    return keys


@pytest.mark.load
async def test_misses_on_a_large_cassette_name_the_nearest_and_health_keeps_answering(
        make_proxy: ProxyFactory, cassettes: Path) -> None:
    keys = _fill(cassettes / "big", 3000)
    with make_proxy(Mode.REPLAY) as proxy:
        url = proxy.url + "/c/big/v1/chat/completions"
        waits: list[float] = []
        done = asyncio.Event()

        async def watch(client: httpx2.AsyncClient) -> None:
            while not done.is_set():
                started = time.monotonic()
                assert (await client.get(proxy.url + "/_replay/health")).status_code == 200
                waits.append(time.monotonic() - started)
                await asyncio.sleep(0.01)

        async with httpx2.AsyncClient(timeout=60, headers=HEADERS) as client:
            watcher = asyncio.ensure_future(watch(client))
            seeds = list(range(100, 3000, 180))
            answers = await asyncio.gather(*(client.post(url, content=_body(seed, 9))
                                             for seed in seeds))
            done.set()
            await watcher
    for seed, answer in zip(seeds, answers, strict=True):
        assert answer.status_code == 404
        message = answer.json()["error"]["message"]
        assert f"(key {keys[seed][:16]})" in message, message
        assert "differs in 1 field(s): max_tokens: 8 -> 9" in message
    assert waits and max(waits) < 2.0  # generous: the loop was never held for long


async def test_an_empty_or_missing_cassette_says_so(make_proxy: ProxyFactory,
                                                    cassettes: Path) -> None:
    with make_proxy(Mode.REPLAY) as proxy:
        async with httpx2.AsyncClient(headers=HEADERS) as client:
            answer = await client.post(proxy.url + "/c/none/v1/chat/completions",
                                       content=_body(1))
    assert answer.status_code == 404
    assert "The cassette is empty." in answer.json()["error"]["message"]


async def test_a_file_gone_bad_after_indexing_leaves_misses_explained_by_the_others(
        make_proxy: ProxyFactory, cassettes: Path) -> None:
    keys = _fill(cassettes / "small", 3)
    url_path = "/c/small/v1/chat/completions"
    with make_proxy(Mode.REPLAY) as proxy:
        async with httpx2.AsyncClient(base_url=proxy.url, headers=HEADERS, timeout=30) as client:
            first = await client.post(url_path, content=_body(1, 9))  # builds the index
            assert first.status_code == 404
            assert f"(key {keys[1][:16]})" in first.json()["error"]["message"]
            [bad] = (cassettes / "small").glob(f"*-{keys[1]}.json")
            bad.write_bytes(b'{"format": 2, "key": ')  # cut short by whoever edited it
            again = await client.post(url_path, content=_body(1, 10))
            assert again.status_code == 404, again.text  # still a miss, not a 500
            error = again.json()["error"]
            assert error["code"] == "replay_miss"
            assert keys[1][:16] not in error["message"]
            assert keys[0][:16] in error["message"] or keys[2][:16] in error["message"]
            own = await client.post(url_path, content=_body(1))  # the bad file's own key
            assert own.status_code == 500
            assert own.json()["error"]["code"] == "cassette_corrupt"
            assert bad.name in own.json()["error"]["message"]
            assert (await client.post(url_path, content=_body(2))).status_code == 200
