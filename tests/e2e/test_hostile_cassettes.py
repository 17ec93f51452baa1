"""Cassettes from a pull request, and stores shared by a fleet, against the running proxy and
the `replay-proxy` command: a file or row edited by someone the maintainers do not trust runs
no code, writes nothing outside the store, sends nothing the proxy did not allowlist, and
breaks nothing but itself: it is reported by name, and every other key keeps working.

Each test edits stored data the way an attacker would, then checks both halves: the attack
fails, and the honest keys beside it still replay.
"""

from __future__ import annotations

import http.client
import os
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import diskcache
import httpx2
import orjson
import pytest
from click.testing import CliRunner, Result
from replay_proxy.core.modes import Mode
from replay_proxy.core.settings import ReplayTiming
from replay_proxy.store.base import UNATTRIBUTED
from replay_proxy.tools.cli import main

from tests.conftest import SECRET_KEY, ProxyFactory, recorded_files

AUTH = {"Authorization": f"Bearer {SECRET_KEY}"}


def chat(seed: int, stream: bool = False) -> dict[str, Any]:
    return {"model": "gpt-4o-mini", "seed": seed, "stream": stream,
            "messages": [{"role": "user", "content": f"Say something about {seed}"}]}


def ask(url: str, seed: int, cassette: str = "default", stream: bool = False) -> httpx2.Response:
    return httpx2.post(f"{url}/c/{cassette}/v1/chat/completions", json=chat(seed, stream),
                       headers=AUTH, timeout=20)


def record(make_proxy: ProxyFactory, *seeds: int, stream: bool = False,
           **settings: Any) -> dict[int, str]:
    """Record one answer per seed; their keys by seed."""
    keys = {}
    with make_proxy(Mode.RECORD, **settings) as proxy:
        for seed in seeds:
            response = ask(proxy.url, seed, stream=stream)
            assert response.status_code == 200, response.text
            keys[seed] = response.headers["x-replay-key"]
    return keys


def file_of(cassettes: Path, key: str) -> Path:
    [path] = [p for p in recorded_files(cassettes) if p.name.endswith(f"-{key}.json")]
    return path


def edit(path: Path, change: Any) -> None:
    document = orjson.loads(path.read_bytes())
    change(document)
    path.write_bytes(orjson.dumps(document, option=orjson.OPT_INDENT_2))


def error_of(response: httpx2.Response) -> dict[str, Any]:
    error: dict[str, Any] = response.json()["error"]
    assert set(error) >= {"message", "type", "code"}
    return error


def cli(*args: str) -> Result:
    return CliRunner().invoke(main, list(args))


def files_outside(tmp_path: Path, root: Path) -> dict[Path, bytes]:
    """Every file under tmp_path but outside the store root, with its bytes."""
    return {path: path.read_bytes() for path in tmp_path.rglob("*")
            if path.is_file() and root not in path.parents and ".replay-proxy" not in path.parts}


class Exploit:
    """What an attacker pickles: loading it creates `marker`."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (Path.touch, (str(self.marker),))  # type: ignore[return-value]


# ---- 1. nothing read from a store is ever unpickled, keys included --------------------------

def test_a_pickled_key_runs_no_code_and_breaks_no_command(make_proxy: ProxyFactory,
                                                          tmp_path: Path) -> None:
    cache_dir = tmp_path / "cache"
    store = f"diskcache:{cache_dir}"
    keys = record(make_proxy, 1, 2, store=store)
    marker = tmp_path / "pwned"
    planted = diskcache.Cache(str(cache_dir))  # diskcache's own Disk pickles what it must
    planted.set(Exploit(marker), b"{}")  # a row whose key is a pickle
    planted.set(f"default\x1f{keys[2]}", Exploit(marker))  # and one whose value is
    planted.close()

    listed = cli("ls", "--store", store)
    assert listed.exit_code == 0, listed.output
    assert keys[1][:12] in listed.output and UNATTRIBUTED in listed.output
    rows = orjson.loads(cli("ls", "--store", store, "--json").output)
    errors = [row["error"] for row in rows if row.get("error")]
    assert len(errors) == 2 and all(str(cache_dir) in error for error in errors)
    assert any("pickled key" in error for error in errors)
    assert [row["seed"] for row in rows if not row.get("error")] == [1]

    with make_proxy(Mode.REPLAY, store=store) as proxy:
        assert ask(proxy.url, 1).headers["x-replay-status"] == "hit"  # other keys keep working
        miss = ask(proxy.url, 3)  # a miss lists the cassette's keys to explain itself
        assert miss.status_code == 404 and keys[1][:16] in error_of(miss)["message"]
        poisoned = ask(proxy.url, 2)
        assert poisoned.status_code == 500 and "pickle" in error_of(poisoned)["message"]
        assert str(cache_dir) in error_of(poisoned)["message"]

    for command in (["show", keys[1][:8]], ["drift"], ["pin", keys[1][:8], "--fingerprint",
                                                       "fp_sim_a1b2c3"],
                    ["prune", "--dry-run"], ["stats"]):
        cli(*command, "--store", store, "--cassettes", str(tmp_path / "cassettes"))
    exported = cli("export", "--from", store, "--to", str(tmp_path / "out"))
    assert exported.exit_code == 1 and "copied 1 key(s)" in exported.output
    assert "pickle" in exported.output
    assert not marker.exists()


def test_a_planted_value_file_name_is_never_opened_nor_deleted(make_proxy: ProxyFactory,
                                                               tmp_path: Path) -> None:
    """diskcache keeps large values in files named by its database: a row naming a file
    outside the store must not be read, nor removed when its key is written again."""
    cache_dir = tmp_path / "cache"
    keys = record(make_proxy, 1, 2, store=f"diskcache:{cache_dir}")
    victim = tmp_path / "victim.json"
    victim.write_text("keep me")
    with sqlite3.connect(cache_dir / "cache.db") as db:
        db.execute("UPDATE Cache SET mode = 2, filename = ?, value = NULL WHERE key = ?",
                   (os.path.relpath(victim, cache_dir), f"default\x1f{keys[2]}"))
    with make_proxy(Mode.REPLAY, store=f"diskcache:{cache_dir}") as proxy:
        refused = ask(proxy.url, 2)
        assert refused.status_code == 500 and "victim.json" in error_of(refused)["message"]
        assert ask(proxy.url, 1).status_code == 200
    with make_proxy(Mode.REFRESH, store=f"diskcache:{cache_dir}") as proxy:
        assert ask(proxy.url, 2).status_code == 500  # refresh reads the entry before writing
    cli("prune", "--store", f"diskcache:{cache_dir}", "--cassettes", str(tmp_path / "cassettes"))
    assert victim.read_text() == "keep me"


async def test_the_sequence_counters_never_unpickle(tmp_path: Path) -> None:
    from replay_proxy.core.errors import CassetteError
    from replay_proxy.store import open_store

    root = tmp_path / "cassettes"
    marker = tmp_path / "pwned"
    store = open_store(root)
    assert await store.claim_occurrence("s", "c", "a" * 64) == 1
    await store.close()
    planted = diskcache.Cache(str(root / ".replay-proxy" / "sequences"))
    planted.set(Exploit(marker), 1, tag="s")
    planted.set("s\x1fc\x1f" + "b" * 64, Exploit(marker), tag="s")
    planted.set("s\x1fc\x1f" + "c" * 64, "three", tag="s")
    planted.close()
    store = open_store(root)
    try:
        assert await store.claim_occurrence("s", "c", "a" * 64) == 2  # others keep counting
        for key in ("b" * 64, "c" * 64):
            with pytest.raises(CassetteError, match="sequences"):
                await store.claim_occurrence("s", "c", key)
        await store.reset_session("s")
        assert await store.claim_occurrence("s", "c", "b" * 64) == 1
    finally:
        await store.close()
    assert not marker.exists()


# ---- 2. nothing is written, read or deleted outside the store --------------------------------

HOSTILE_NAME = {"label": "../../victim", "key": "x"}  # root/default/../../victim-x.json


def test_refresh_and_pin_never_write_where_a_file_says(make_proxy: ProxyFactory,
                                                       cassettes: Path, tmp_path: Path) -> None:
    keys = record(make_proxy, 1, 2, 3)
    victim = tmp_path / "victim-x.json"
    victim.write_text("keep me")
    edit(file_of(cassettes, keys[1]), lambda doc: doc.update(HOSTILE_NAME))
    edit(file_of(cassettes, keys[2]), lambda doc: doc.update(key="/../package"))
    # A valid key, but another one's: written back, it would replace that key's recording.
    edit(file_of(cassettes, keys[3]), lambda doc: doc.update(key=keys[1]))
    outside = files_outside(tmp_path, cassettes)
    inside = {path: path.read_bytes() for path in recorded_files(cassettes)}

    with make_proxy(Mode.REFRESH) as proxy:
        for seed in (1, 2, 3):
            refused = ask(proxy.url, seed)
            assert refused.status_code == 500, refused.text
            message = error_of(refused)["message"]
            assert str(file_of(cassettes, keys[seed])) in message
        assert ask(proxy.url, 4).status_code == 200  # a healthy key still records
    for seed in (1, 2, 3):
        result = cli("pin", keys[seed][:10], "--fingerprint", "fp_sim_a1b2c3",
                     "--cassettes", str(cassettes))
        assert result.exit_code == 1 and str(file_of(cassettes, keys[seed])) in result.output
    assert files_outside(tmp_path, cassettes) == outside
    for path, raw in inside.items():
        assert path.read_bytes() == raw


def test_prune_deletes_by_the_names_it_listed_never_by_what_a_file_says(
        make_proxy: ProxyFactory, cassettes: Path, tmp_path: Path) -> None:
    keys = record(make_proxy, 1, 2)
    victim = tmp_path / "victim-x.json"
    victim.write_text("keep me")
    edit(file_of(cassettes, keys[1]), lambda doc: doc.update(HOSTILE_NAME))
    with make_proxy(Mode.REPLAY) as proxy:
        assert ask(proxy.url, 2).status_code == 200  # a run that used key 2 only
    pruned = cli("prune", "--cassettes", str(cassettes))
    assert pruned.exit_code == 0, pruned.output
    assert victim.read_text() == "keep me"
    assert [p.name for p in recorded_files(cassettes)] == [f"chat.completions-{keys[2]}.json"]


def test_export_and_import_never_write_outside_the_target(
        make_proxy: ProxyFactory, cassettes: Path, tmp_path: Path, redis_url: str) -> None:
    import redis

    keys = record(make_proxy, 1, 2)
    good = file_of(cassettes, keys[2]).read_bytes()
    edit(file_of(cassettes, keys[1]), lambda doc: doc.update(HOSTILE_NAME))
    outside = files_outside(tmp_path, cassettes)
    cache = f"diskcache:{tmp_path / 'cache'}"

    exported = cli("export", "--from", str(cassettes), "--to", cache)
    assert exported.exit_code == 1 and "copied 1 key(s)" in exported.output
    assert str(file_of(cassettes, keys[1])) in exported.output
    # The same hostile bytes, planted under an honest row name of a diskcache store ...
    planted = diskcache.Cache(str(tmp_path / "cache"))
    planted.set(f"default\x1f{keys[1]}", file_of(cassettes, keys[1]).read_bytes())
    planted.close()
    # ... and under a cassette name that leaves the root, in Redis.
    client = redis.Redis.from_url(redis_url)
    client.sadd("replay:cassettes", "../../escape")
    client.sadd("replay:{../../escape}:index", keys[2])
    client.set(f"replay:{{../../escape}}:e:{keys[2]}", good)
    client.close()

    back = tmp_path / "back"
    for source in (cache, redis_url):
        imported = cli("import", "--from", source, "--to", str(back))
        assert imported.exit_code == 1, imported.output
    assert files_outside(tmp_path, cassettes).keys() - outside.keys() == {
        back / "default" / f"chat.completions-{keys[2]}.json",
        *(p for p in (tmp_path / "cache").rglob("*") if p.is_file())}
    assert (back / "default" / f"chat.completions-{keys[2]}.json").read_bytes() == good
    assert not (tmp_path / "escape").exists() and not (tmp_path / "victim-x.json").exists()


@pytest.fixture
def outside(tmp_path: Path) -> Iterator[Path]:
    folder = tmp_path / "outside"
    folder.mkdir()
    yield folder


def test_links_out_of_the_root_are_refused(make_proxy: ProxyFactory, cassettes: Path,
                                           tmp_path: Path, outside: Path) -> None:
    keys = record(make_proxy, 1, 2)
    # A cassette folder that is a link to a folder elsewhere, holding a valid recording ...
    (outside / file_of(cassettes, keys[1]).name).write_bytes(file_of(cassettes, keys[1])
                                                            .read_bytes())
    (cassettes / "linked").symlink_to(outside, target_is_directory=True)
    # ... and a cassette file that is a link to a file elsewhere.
    secret = outside / "secret.json"
    secret.write_bytes(file_of(cassettes, keys[2]).read_bytes())
    file_of(cassettes, keys[2]).unlink()
    (cassettes / "default" / f"chat.completions-{keys[2]}.json").symlink_to(secret)
    before = sorted(outside.iterdir())

    with make_proxy(Mode.RECORD) as proxy:
        refused = ask(proxy.url, 1, cassette="linked")
        assert refused.status_code == 500 and "symbolic link" in error_of(refused)["message"]
        assert ask(proxy.url, 5, cassette="linked").status_code == 500  # nothing recorded there
        assert ask(proxy.url, 2).status_code == 500
        assert ask(proxy.url, 1).headers["x-replay-status"] == "hit"
        assert ask(proxy.url, 6, cassette="linked/deeper").status_code == 500
    assert sorted(outside.iterdir()) == before
    rows = orjson.loads(cli("ls", "--cassettes", str(cassettes), "--json").output)
    refusals = {row["cassette"]: row["error"] for row in rows if row.get("error")}
    assert set(refusals) == {"default", "linked"}
    assert all("symbolic link" in error for error in refusals.values())


def test_a_linked_state_folder_is_not_written_through(make_proxy: ProxyFactory, cassettes: Path,
                                                      outside: Path) -> None:
    """`.replay-proxy/` (locks, counters, usage log) committed as a link to elsewhere."""
    import shutil

    record(make_proxy, 1)
    shutil.rmtree(cassettes / ".replay-proxy")
    (cassettes / ".replay-proxy").symlink_to(outside, target_is_directory=True)
    with make_proxy(Mode.RECORD) as proxy:
        assert ask(proxy.url, 1).headers["x-replay-status"] == "hit"
        refused = ask(proxy.url, 2)  # recording takes a lock, kept in that folder
        assert refused.status_code == 500 and "symbolic link" in error_of(refused)["message"]
    assert list(outside.iterdir()) == []


# ---- 3. replay sends only allowlisted headers and statuses ----------------------------------

SMUGGLED = ("HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 17\r\n\r\n"
            '{"smuggled":true}')


def test_a_recorded_content_length_cannot_poison_a_keep_alive_connection(
        make_proxy: ProxyFactory, cassettes: Path) -> None:
    keys = record(make_proxy, 1, 2)

    def poison(document: dict[str, Any]) -> None:
        recording = document["recordings"][0]
        recording["headers"]["content-length"] = "0"
        recording.update(body_encoding="text", body=SMUGGLED)

    edit(file_of(cassettes, keys[1]), poison)
    with make_proxy(Mode.REPLAY) as proxy:
        host, port = proxy.url.removeprefix("http://").split(":")
        connection = http.client.HTTPConnection(host, int(port), timeout=10)
        answers = []
        for seed in (1, 2):  # one connection, kept alive: the second answer must be its own
            connection.request("POST", "/v1/chat/completions", body=orjson.dumps(chat(seed)),
                               headers={**AUTH, "Content-Type": "application/json"})
            response = connection.getresponse()
            answers.append((response.status, response.getheader("x-replay-key"),
                            response.read()))
        connection.close()
    (first_status, _, first_body), (second_status, second_key, second_body) = answers
    assert first_status == 500 and b"content-length" in first_body
    assert str(file_of(cassettes, keys[1])).encode() in first_body
    assert second_status == 200 and second_key == keys[2]
    assert b"smuggled" not in second_body and orjson.loads(second_body)["choices"]


@pytest.mark.parametrize(("header", "status"), [
    ("set-cookie", 200), ("location", 302), ("transfer-encoding", 200), ("connection", 200),
    (None, 0), (None, 101), (None, 1000), (None, 199), (None, 600)])
def test_headers_and_statuses_replay_never_sends_are_refused(
        make_proxy: ProxyFactory, cassettes: Path, header: str | None, status: int) -> None:
    keys = record(make_proxy, 1, 2)

    def tamper(document: dict[str, Any]) -> None:
        recording = document["recordings"][0]
        recording["status"] = status
        if header is not None:
            recording["headers"][header] = "session=stolen; Path=/"

    edit(file_of(cassettes, keys[1]), tamper)
    with make_proxy(Mode.REPLAY) as proxy:
        refused = ask(proxy.url, 1)
        assert refused.status_code == 500
        assert "set-cookie" not in refused.headers and "location" not in refused.headers
        message = error_of(refused)["message"]
        assert str(file_of(cassettes, keys[1])) in message
        assert ("status" in message) if header is None else (header in message)
        assert ask(proxy.url, 2).status_code == 200


def test_a_stream_recorded_for_a_head_request_writes_no_body(make_proxy: ProxyFactory) -> None:
    """HTTP frames no body in an answer to HEAD: a stream's events would go out unframed, and
    be read as the next answer on the connection. (The key of a request is public: anyone can
    store a stream under the key of a HEAD request.)"""
    from dataclasses import replace

    with make_proxy(Mode.RECORD) as proxy:
        key = ask(proxy.url, 1, stream=True).headers["x-replay-key"]
        entry = proxy.call(proxy.state.store.get("default", key, "chat.completions"))
    body = orjson.dumps(chat(1, stream=True))
    headers = {**AUTH, "Content-Type": "application/json"}
    with make_proxy(Mode.REPLAY) as proxy:
        host, port = proxy.url.removeprefix("http://").split(":")
        connection = http.client.HTTPConnection(host, int(port), timeout=10)
        connection.request("HEAD", "/v1/chat/completions", body=body, headers=headers)
        missed = connection.getresponse()
        missed.read()
        head_key = missed.getheader("x-replay-key")
        assert missed.status == 404 and head_key
        proxy.invoke(lambda: proxy.state.remember("default", replace(entry, key=head_key)))
        connection.request("HEAD", "/v1/chat/completions", body=body, headers=headers)
        replayed = connection.getresponse()
        assert replayed.status == 200 and replayed.read() == b""
        connection.request("GET", "/_replay/health")  # the same connection, kept alive
        health = connection.getresponse()
        assert health.status == 200 and orjson.loads(health.read())["status"] == "ok"
        connection.close()


# ---- 4. one bad recording breaks only itself ---------------------------------------------------

@pytest.fixture(params=["directory", "diskcache", "redis"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> str | None:
    if request.param == "directory":
        return None
    if request.param == "diskcache":
        return f"diskcache:{tmp_path / 'cache'}"
    url: str = request.getfixturevalue("redis_url")
    return url


def overwrite(store: str | None, cassettes: Path, key: str, raw: bytes) -> str:
    """Replace the stored bytes of a key, as an edit to a store would; the store's name for it."""
    if store is None:
        path = file_of(cassettes, key)
        path.write_bytes(raw)
        return str(path)
    if store.startswith("diskcache:"):
        cache = diskcache.Cache(store.removeprefix("diskcache:"))
        cache.set(f"default\x1f{key}", raw)
        cache.close()
        return store.removeprefix("diskcache:")
    import redis

    client = redis.Redis.from_url(store)
    client.set(f"replay:{{default}}:e:{key}", raw)
    client.close()
    return store


@pytest.mark.parametrize("recordings", [["abc"], "abc", [[]]])
def test_a_bad_recording_breaks_only_its_own_key(
        make_proxy: ProxyFactory, cassettes: Path, store: str | None,
        recordings: Any) -> None:
    keys = record(make_proxy, 1, 2, store=store)
    if store is None:
        document = orjson.loads(file_of(cassettes, keys[2]).read_bytes())
    else:
        document = {"format": 2, "key": keys[2], "label": "chat.completions", "request": {}}
    named = overwrite(store, cassettes, keys[2], orjson.dumps({**document,
                                                               "recordings": recordings}))
    with make_proxy(Mode.REPLAY, store=store) as proxy:
        broken = ask(proxy.url, 2)
        assert broken.status_code == 500 and named in error_of(broken)["message"]
        assert error_of(broken)["code"] == "cassette_corrupt"
        miss = ask(proxy.url, 3)
        assert miss.status_code == 404, miss.text  # explained against the readable key
        assert keys[1][:16] in error_of(miss)["message"]
        assert ask(proxy.url, 1).headers["x-replay-status"] == "hit"
    listed = cli("ls", "--cassettes", str(cassettes), *(["--store", store] if store else []))
    assert listed.exit_code == 0, listed.output
    assert keys[1][:12] in listed.output and named in listed.output


# ---- 5. pacing from a recording cannot hang a stream -------------------------------------------

@pytest.mark.parametrize("at_ms", ["inf", 1e300, -5, 86_400_001, None])
def test_an_event_time_that_is_no_time_is_refused_on_load(
        make_proxy: ProxyFactory, cassettes: Path, at_ms: Any) -> None:
    keys = record(make_proxy, 1, 2, stream=True)
    edit(file_of(cassettes, keys[1]),
         lambda doc: doc["recordings"][0]["events"][0].update(at_ms=at_ms))
    with make_proxy(Mode.REPLAY, replay_timing=ReplayTiming(1.0)) as proxy:
        started = time.monotonic()
        refused = ask(proxy.url, 1, stream=True)
        assert refused.status_code == 500 and "at_ms" in error_of(refused)["message"]
        assert ask(proxy.url, 2, stream=True).status_code == 200
        assert time.monotonic() - started < 5


def test_pacing_is_bounded_whatever_made_the_events(make_proxy: ProxyFactory) -> None:
    """Loading refuses such times; the replay loop bounds them too (they wait not at all)."""
    from dataclasses import replace

    with make_proxy(Mode.RECORD) as proxy:
        key = ask(proxy.url, 1, stream=True).headers["x-replay-key"]
        entry = proxy.call(proxy.state.store.get("default", key, "chat.completions"))
    recording = entry.recordings[0]
    events = tuple(replace(event, at_ms=float("inf" if index % 2 else "nan"))
                   for index, event in enumerate(recording.events))
    odd = replace(entry, recordings=(replace(recording, events=events),))
    with make_proxy(Mode.REPLAY, replay_timing=ReplayTiming(1.0)) as proxy:
        proxy.invoke(lambda: proxy.state.remember("default", odd))
        started = time.monotonic()
        replayed = ask(proxy.url, 1, stream=True)
        assert replayed.status_code == 200 and b"[DONE]" in replayed.content
        assert time.monotonic() - started < 5
