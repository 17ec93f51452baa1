"""`replay-proxy compact` on every store: copies of an answer go, what the SDK is replayed stays
byte for byte, sequences are left alone, files in an older format are upgraded."""

from __future__ import annotations

import asyncio
import shutil
from dataclasses import replace
from pathlib import Path

import orjson
import pytest
from click.testing import CliRunner
from openai import OpenAI
from replay_proxy.core.cassette import Drift, Entry, encode_entry
from replay_proxy.core.modes import Mode
from replay_proxy.store import open_store
from replay_proxy.tools.cli import main
from replay_proxy.tools.testing import SimulatorThread

from tests.conftest import SECRET_KEY, ProxyFactory, recorded_files
from tests.test_cli import _stderr_on_a_terminal

ROOT = Path(__file__).resolve().parents[2]
CHAT = {"model": "gpt-4o-mini", "seed": 5,
        "messages": [{"role": "user", "content": "Describe a river."}]}


@pytest.fixture(params=["directory", "diskcache", "redis"])
def store(request: pytest.FixtureRequest, cassettes: Path) -> str:
    if request.param == "directory":
        return str(cassettes)
    if request.param == "diskcache":
        return f"diskcache:{cassettes.parent / 'cache'}"
    url: str = request.getfixturevalue("redis_url")
    return url


def _entries(store: str) -> dict[str, Entry]:
    async def load() -> dict[str, Entry]:
        backend = open_store(store)
        try:
            return {item.key: item.entry for name in await backend.cassettes()
                    for item in await backend.items(name) if item.entry is not None}
        finally:
            await backend.close()

    return asyncio.run(load())


def _put(store: str, entries: list[Entry]) -> None:
    async def save() -> None:
        backend = open_store(store)
        try:
            for entry in entries:
                await backend.put("default", entry)
        finally:
            await backend.close()

    asyncio.run(save())


def _with_copies(entry: Entry) -> Entry:
    """The entry as a refresh of an older version left it: each answer stored again, later."""
    copies = [replace(recording, recorded_at=f"2027-01-0{n + 1}T00:00:00.000Z",
                      duration_ms=recording.duration_ms + 5, drift=Drift.SAME)
              for n, recording in enumerate(entry.recordings * 2)]
    return replace(entry, recordings=(*entry.recordings, *copies))


def _replies(proxy_url: str,
             policies: tuple[str, ...] = ("pinned", "latest", "fp_a", "fp_b")) -> list[bytes]:
    """The bytes the SDK is replayed, plain and streamed, under each fingerprint policy."""
    replies = []
    for fingerprint in policies:
        with OpenAI(base_url=proxy_url + "/v1", api_key="sk-replay", max_retries=0,
                    default_headers={"X-Replay-Fingerprint": fingerprint}) as client:
            completions = client.chat.completions.with_raw_response
            for extra in ({}, {"stream": True}):
                raw = completions.create(**CHAT, **extra)  # type: ignore[call-overload]
                replies.append(raw.http_response.read())
    return replies


def test_compact_drops_copies_and_replays_the_same_bytes(
        make_proxy: ProxyFactory, simulator: SimulatorThread, store: str) -> None:
    simulator.state.fingerprint = "fp_a"
    with make_proxy(Mode.RECORD, store=store) as proxy, OpenAI(
            base_url=proxy.url + "/v1", api_key=SECRET_KEY, max_retries=0) as client:
        client.chat.completions.create(**CHAT)  # type: ignore[arg-type]
        list(client.chat.completions.create(**CHAT, stream=True))  # type: ignore[arg-type]
    simulator.state.fingerprint = "fp_b"
    with make_proxy(Mode.REFRESH, store=store) as proxy, OpenAI(
            base_url=proxy.url + "/v1", api_key=SECRET_KEY, max_retries=0) as client:
        client.chat.completions.create(**CHAT)  # type: ignore[arg-type]
        list(client.chat.completions.create(**CHAT, stream=True))  # type: ignore[arg-type]
    recorded = _entries(store)
    sequence = next(iter(recorded.values()))
    sequence = replace(sequence, key="f" * 64, label="files").as_sequence(
        (sequence.recordings[0],) * 3)  # three equal answers in a row: three places
    _put(store, [_with_copies(entry) for entry in recorded.values()] + [sequence])
    with make_proxy(Mode.REPLAY, store=store) as proxy:
        before = _replies(proxy.url)

    runner = CliRunner()
    dry = runner.invoke(main, ["compact", "--store", store, "--dry-run"])
    assert dry.exit_code == 0, dry.output
    assert "would compact 2 key(s)" in dry.output and "8 duplicate recording(s)" in dry.output
    assert all(len(entry.recordings) == 6 for key, entry in _entries(store).items()
               if key != sequence.key)

    done = runner.invoke(main, ["compact", "--store", store])
    assert done.exit_code == 0, done.output
    assert done.output.count("dropped 4 duplicate recording(s)") == 2
    assert "left 1 sequenced key(s) as they are" in done.output
    after = _entries(store)
    assert after[sequence.key] == sequence
    for key, entry in recorded.items():
        kept = after[key].recordings
        assert [r.system_fingerprint for r in kept] == ["fp_a", "fp_b"]
        assert [r.recorded_at for r in kept] == [r.recorded_at for r in entry.recordings]
        assert kept[0].verified_at == "2027-01-03T00:00:00.000Z"  # its latest copy
        assert kept[1].verified_at == "2027-01-04T00:00:00.000Z"
    with make_proxy(Mode.REPLAY, store=store) as proxy:
        assert _replies(proxy.url) == before

    again = runner.invoke(main, ["compact", "--store", store, "--json"])
    assert again.exit_code == 0, again.output
    report = orjson.loads(again.stdout)
    assert (report["compacted"], report["dropped"]) == ([], 0)
    assert report["sequences_left"] == [f"default/files-{'f' * 16}"]


def test_compact_upgrades_format_1_files(make_proxy: ProxyFactory, cassettes: Path) -> None:
    with make_proxy(Mode.RECORD) as proxy, OpenAI(base_url=proxy.url + "/v1",
                                                  api_key=SECRET_KEY) as client:
        client.chat.completions.create(**CHAT)  # type: ignore[arg-type]
        list(client.chat.completions.create(**CHAT, stream=True))  # type: ignore[arg-type]
        client.embeddings.create(model="text-embedding-3-small", input="a river")
    files = recorded_files(cassettes)
    for path in files:  # as an older version wrote them: format 1, in another order
        document = orjson.loads(path.read_bytes())
        if path.name.startswith("chat."):
            document["recordings"].append(document["recordings"][0])
        document["format"] = 1
        del document["sequence"]
        path.write_bytes(orjson.dumps(dict(sorted(document.items())),
                                      option=orjson.OPT_INDENT_2))
    with make_proxy(Mode.REPLAY) as proxy:
        before = _replies(proxy.url, ("pinned", "latest"))

    result = CliRunner().invoke(main, ["compact", "--cassettes", str(cassettes), "--json"])
    assert result.exit_code == 0, result.output
    dropped = sorted((change["label"], change["dropped"], change["upgraded"])
                     for change in orjson.loads(result.stdout)["compacted"])
    assert dropped == [("chat.completions", 1, True)] * 2 + [("embeddings", 0, True)]
    entries = _entries(str(cassettes))
    for path in files:
        assert path.read_bytes().startswith(b'{\n  "format": 2,')
        assert path.read_bytes() == encode_entry(entries[path.stem.rpartition("-")[2]])
    with make_proxy(Mode.REPLAY) as proxy:
        assert _replies(proxy.url, ("pinned", "latest")) == before


def test_compact_shows_progress_on_a_terminal_and_names_an_unreadable_file(
        tmp_path: Path) -> None:
    copy = tmp_path / "cassettes"
    shutil.copytree(ROOT / "cassettes", copy, ignore=shutil.ignore_patterns(".replay-proxy"))
    code, shown = _stderr_on_a_terminal("compact", "--cassettes", str(copy))
    assert code == 0 and "compacting" in shown and "100%" in shown
    broken = copy / "tour" / f"chat.completions-{'0' * 64}.json"
    broken.write_text("{not json")
    result = CliRunner().invoke(main, ["compact", "--cassettes", str(copy)])
    assert result.exit_code == 1
    assert f"not compacted: Cassette file {broken} is not valid JSON" in result.output
