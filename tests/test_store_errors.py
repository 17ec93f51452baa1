"""What each store does when what it holds, or the disk under it, is not what it wrote: an
error naming the entry and what to do, nothing written half-way, nothing opened or deleted
outside the store, and every other entry still served."""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path

import diskcache
import pytest
from replay_proxy.core.cassette import Entry, Recording
from replay_proxy.core.errors import CassetteError
from replay_proxy.store import open_store
from replay_proxy.store.diskcache_store import DiskcacheStore

GOOD, BAD = "a" * 64, "b" * 64


def entry(key: str, answer: bytes = b'{"answer":1}') -> Entry:
    return Entry(key, "chat.completions", {"route": "chat/completions", "body": {"seed": 1}}).add(
        Recording(200, {"content-type": "application/json"}, body=answer,
                  system_fingerprint="fp_a", recorded_at="t"))


def _large_answer() -> bytes:
    # Over diskcache's 32 KiB threshold: kept in a value file rather than in its database.
    return b'{"answer":"' + b"x" * 64 * 1024 + b'"}'


# ---- the directory store -------------------------------------------------------------------

async def test_a_cassette_file_that_cannot_be_read_is_an_error_naming_it(tmp_path: Path) -> None:
    store = open_store(str(tmp_path))
    try:
        await store.put("default", entry(GOOD))
        (tmp_path / "default" / f"chat.completions-{BAD}.json").mkdir()  # not a readable file
        with pytest.raises(CassetteError, match=f"chat.completions-{BAD}.json cannot be read"):
            await store.get("default", BAD, "chat.completions")
        assert await store.get("default", GOOD, "chat.completions") == entry(GOOD)
    finally:
        await store.close()


async def test_a_write_that_fails_leaves_no_partial_or_temporary_file(tmp_path: Path) -> None:
    store = open_store(str(tmp_path))
    try:
        await store.put("default", entry(GOOD))
        target = tmp_path / "default" / f"chat.completions-{BAD}.json"
        target.mkdir()  # the final rename fails, after the data was written aside
        with pytest.raises(OSError):
            await store.put("default", entry(BAD))
        assert sorted(path.name for path in (tmp_path / "default").iterdir()) == sorted(
            [f"chat.completions-{GOOD}.json", target.name])
        assert not any(target.iterdir())
        assert await store.cassettes() == ["default"]
    finally:
        await store.close()


async def test_a_store_folder_that_does_not_exist_yet_lists_nothing(tmp_path: Path) -> None:
    store = open_store(str(tmp_path / "not-yet"))
    try:
        assert await store.cassettes() == []
        assert await store.items("default") == []
        assert await store.get("default", GOOD, "chat.completions") is None
        assert not (tmp_path / "not-yet").exists()  # reading creates nothing
    finally:
        await store.close()


# ---- the diskcache store -------------------------------------------------------------------

@pytest.mark.parametrize("planted", [42, "text"])
async def test_a_diskcache_value_that_is_not_bytes_is_refused_by_name(
        tmp_path: Path, planted: object) -> None:
    store = open_store(f"diskcache:{tmp_path}")
    try:
        await store.put("default", entry(GOOD))
        with diskcache.Cache(str(tmp_path)) as cache:
            cache.set(f"default\x1f{BAD}", planted)  # what replay-proxy never writes
        with pytest.raises(CassetteError, match=f"default/chat.completions-{BAD}.* holds a "
                                                f"{type(planted).__name__}") as refused:
            await store.get("default", BAD, "chat.completions")
        assert "delete it" in refused.value.message
        items = {item.key: item for item in await store.items("default")}
        assert items[GOOD].entry == entry(GOOD)
        assert items[BAD].entry is None and isinstance(items[BAD].error, CassetteError)
    finally:
        await store.close()


async def test_a_diskcache_row_of_an_unknown_storage_mode_is_refused(tmp_path: Path) -> None:
    store = open_store(f"diskcache:{tmp_path}")
    try:
        await store.put("default", entry(GOOD))
        await store.put("default", entry(BAD))
        with sqlite3.connect(tmp_path / "cache.db") as db:
            db.execute("UPDATE Cache SET mode = 7 WHERE key = ?", (f"default\x1f{BAD}",))
        with pytest.raises(CassetteError, match=r"unknown storage mode \(7\); delete"):
            await store.get("default", BAD, "chat.completions")
        assert await store.get("default", GOOD, "chat.completions") == entry(GOOD)
    finally:
        await store.close()


async def test_large_diskcache_entries_live_in_value_files_and_go_with_their_key(
        tmp_path: Path) -> None:
    large = entry(GOOD, _large_answer())
    store = open_store(f"diskcache:{tmp_path}")
    try:
        await store.put("default", large)
        [value_file] = tmp_path.glob("??/??/*.val")
        assert await store.get("default", GOOD, "chat.completions") == large
        assert await store.delete("default", GOOD, "chat.completions")
        assert not value_file.exists()
        assert await store.get("default", GOOD, "chat.completions") is None
    finally:
        await store.close()


async def test_a_value_file_linked_out_of_the_store_is_never_opened(tmp_path: Path) -> None:
    root, outside = tmp_path / "cache", tmp_path / "outside.val"
    store = open_store(f"diskcache:{root}")
    try:
        await store.put("default", entry(BAD, _large_answer()))
        await store.put("default", entry(GOOD))
        [value_file] = root.glob("??/??/*.val")
        outside.write_bytes(value_file.read_bytes())
        value_file.unlink()
        value_file.symlink_to(outside)  # a name diskcache makes, pointing elsewhere
        with pytest.raises(CassetteError, match="not one diskcache made inside the store"):
            await store.get("default", BAD, "chat.completions")
        assert await store.get("default", GOOD, "chat.completions") == entry(GOOD)
    finally:
        await store.close()


async def test_deleting_a_row_that_names_a_foreign_file_deletes_only_the_row(
        tmp_path: Path) -> None:
    root, victim = tmp_path / "cache", tmp_path / "victim.json"
    victim.write_text("keep me")
    store = open_store(f"diskcache:{root}")
    assert isinstance(store, DiskcacheStore)
    try:
        await store.put("default", entry(BAD))
        await store.put("default", entry(GOOD))
        with sqlite3.connect(root / "cache.db") as db:
            db.execute("UPDATE Cache SET mode = 2, filename = ?, value = NULL WHERE key = ?",
                       (os.path.relpath(victim, root), f"default\x1f{BAD}"))
        assert await store.delete("default", BAD, "chat.completions")
        assert victim.read_text() == "keep me"
        assert [item.key for item in await store.items("default")] == [GOOD]
    finally:
        await store.close()


# ---- the Redis store -----------------------------------------------------------------------

async def test_an_indexed_redis_entry_that_expired_is_skipped_and_forgotten(
        redis_url: str) -> None:
    import asyncio

    import redis

    store = open_store(redis_url)
    client = redis.Redis.from_url(redis_url)
    try:
        await store.put("default", entry(GOOD))
        await store.put("default", entry(BAD))
        client.pexpire(f"replay:{{default}}:e:{BAD}", 1)  # as a ?ttl= store's entries do
        await asyncio.sleep(0.05)
        assert [item.key for item in await store.items("default")] == [GOOD]
        assert client.smembers("replay:{default}:index") == {GOOD.encode()}
        assert await store.cassettes() == ["default"]
    finally:
        client.close()
        await store.close()
