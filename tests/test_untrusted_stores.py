"""The local stores build names from checked parts only, whatever an Entry says."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import pytest
from replay_proxy.core.cassette import Entry, Recording, encode_entry
from replay_proxy.core.errors import CassetteError, ProxyError
from replay_proxy.store import Store, open_store

KEY = "a" * 64
OTHER = "b" * 64


def entry(key: str = KEY, label: str = "chat.completions") -> Entry:
    return Entry(key, label, {"route": "chat/completions"}).add(
        Recording(200, {"content-type": "application/json"}, body=b"{}"))


@pytest.fixture(params=["directory", "diskcache"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Store]:
    spec = str(tmp_path / "root") if request.param == "directory" \
        else f"diskcache:{tmp_path / 'root'}"
    backend = open_store(spec)
    yield backend
    await backend.close()


@pytest.mark.parametrize(("cassette", "key", "label"), [
    ("default", "/../package", "chat.completions"), ("default", KEY, "../../x"),
    ("default", KEY.upper(), "chat.completions"), ("default", KEY, ""),
    ("../escape", KEY, "chat.completions"), ("/etc", KEY, "chat.completions"),
    ("a\n", KEY, "chat.completions"),
])
async def test_put_refuses_names_a_store_would_not_make(store: Store, tmp_path: Path,
                                                        cassette: str, key: str,
                                                        label: str) -> None:
    with pytest.raises(ProxyError):  # a CassetteError, or a 400 for the cassette name
        await store.put(cassette, entry(key, label))
    files = [p for p in tmp_path.rglob("*") if p.is_file() and "root" not in p.parts]
    assert files == []


async def test_an_entry_found_under_another_key_is_refused(store: Store, tmp_path: Path) -> None:
    await store.put("default", entry())
    moved = encode_entry(entry(OTHER))
    if isinstance(store.description, str) and store.description.startswith("diskcache:"):
        import diskcache

        cache = diskcache.Cache(str(tmp_path / "root"))
        cache.set(f"default\x1f{KEY}", moved)
        cache.close()
    else:
        (tmp_path / "root" / "default" / f"chat.completions-{KEY}.json").write_bytes(moved)
    with pytest.raises(CassetteError, match="stored as"):
        await store.get("default", KEY, "chat.completions")
    [item] = await store.items("default")
    assert item.entry is None and item.key == KEY and item.error is not None


async def test_a_directory_file_under_another_label_is_refused(tmp_path: Path) -> None:
    store = open_store(tmp_path)
    await store.put("default", entry())
    path = tmp_path / "default" / f"chat.completions-{KEY}.json"
    path.write_bytes(encode_entry(replace(entry(), label="embeddings")))
    with pytest.raises(CassetteError, match=str(path)):
        await store.get("default", KEY, "chat.completions")
    await store.close()


async def test_a_directory_lists_a_file_it_would_not_have_named(tmp_path: Path) -> None:
    store = open_store(tmp_path)
    await store.put("default", entry())
    (tmp_path / "default" / "notes.json").write_text("{}")
    (tmp_path / "default" / f"x-{OTHER}.json").mkdir()
    items = {item.key: item for item in await store.items("default")}
    assert items[KEY].entry == entry()
    assert "not named <label>-<key>.json" in str(items["notes"].error)
    assert "cannot be read" in str(items[OTHER].error)
    assert await store.delete("default", "notes", "") is False  # no name it would make
    assert (tmp_path / "default" / "notes.json").exists()
    await store.close()
