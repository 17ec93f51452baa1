"""Key locks belong to a store: two stores on one folder exclude each other, in one process or
in two, and closing one store never lets go of the other's locks."""

from __future__ import annotations

import asyncio
import hashlib
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from replay_proxy.store import Store, locking, open_store
from replay_proxy.store.locking import StripedLocks

pytestmark = pytest.mark.skipif(not locking.PER_STORE,
                                reason="locks are per process where there are no OFD locks")

KEY = "k" * 64
# A second process that holds KEY until told to let go (a line on its stdin).
HOLDER = """
import asyncio, sys
from pathlib import Path
from replay_proxy.store.locking import StripedLocks

async def main():
    locks = StripedLocks(Path(sys.argv[1]))
    async with locks.hold("default", sys.argv[2]):
        print("held", flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    locks.close()

asyncio.run(main())
"""
# A second process that only tries to take KEY: prints taken or busy.
PROBE = """
import asyncio, sys
from pathlib import Path
from replay_proxy.store.locking import StripedLocks

async def main():
    locks = StripedLocks(Path(sys.argv[1]))
    try:
        async with locks.hold("default", sys.argv[2], timeout=0.2):
            print("taken")
    except TimeoutError:
        print("busy")

asyncio.run(main())
"""


async def _taken(locks: StripedLocks, key: str = KEY) -> bool:
    try:
        async with locks.hold("default", key, timeout=0.2):
            return True
    except TimeoutError:
        return False


def _probe(folder: Path) -> str:
    return subprocess.run([sys.executable, "-c", PROBE, str(folder), KEY], capture_output=True,
                          text=True, check=True, timeout=30).stdout.strip()


@contextmanager
def _held_elsewhere(folder: Path) -> Iterator[subprocess.Popen[str]]:
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(folder), KEY],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        yield holder
    finally:
        holder.communicate("\n", timeout=30)  # let go, and wait for it to end


async def test_two_stores_in_one_process_exclude_each_other(tmp_path: Path) -> None:
    first, second = StripedLocks(tmp_path), StripedLocks(tmp_path)
    try:
        async with first.hold("default", KEY):
            assert not await _taken(second)
            assert await _taken(second, "another key on another stripe" + "x" * 30)
        assert await _taken(second)
        order: list[str] = []

        async def holder(locks: StripedLocks, name: str) -> None:
            async with locks.hold("default", KEY):
                order.append(f"{name} in")
                await asyncio.sleep(0.05)
                order.append(f"{name} out")

        await asyncio.gather(holder(first, "a"), holder(second, "b"))
        assert order in (["a in", "a out", "b in", "b out"], ["b in", "b out", "a in", "a out"])
    finally:
        first.close()
        second.close()


async def test_closing_one_store_keeps_the_others_locks(tmp_path: Path) -> None:
    first, second = StripedLocks(tmp_path), StripedLocks(tmp_path)
    try:
        async with first.hold("default", KEY):
            assert not await _taken(second)  # the second store has the lock file open too
            second.close()
            assert _probe(tmp_path) == "busy"
            third = StripedLocks(tmp_path)
            assert not await _taken(third)
            third.close()
        assert _probe(tmp_path) == "taken"
    finally:
        first.close()


async def test_stores_in_two_processes_exclude_each_other(tmp_path: Path) -> None:
    locks = StripedLocks(tmp_path)
    try:
        with _held_elsewhere(tmp_path):
            assert not await _taken(locks)
        assert await _taken(locks)
        async with locks.hold("default", KEY):
            assert _probe(tmp_path) == "busy"
        assert _probe(tmp_path) == "taken"
    finally:
        locks.close()


@pytest.mark.parametrize("spec", ["{root}/cassettes", "diskcache:{root}/cache"])
async def test_two_stores_on_one_path_make_one_recording_at_a_time(tmp_path: Path,
                                                                    spec: str) -> None:
    first, second = (open_store(spec.format(root=tmp_path)) for _ in range(2))
    order: list[str] = []

    async def record(store: Store, name: str) -> None:
        async with store.lock("default", KEY):
            order.append(f"{name} in")
            await asyncio.sleep(0.05)
            order.append(f"{name} out")

    try:
        await asyncio.gather(record(first, "a"), record(second, "b"))
        await second.close()
        async with first.lock("default", KEY):  # still exclusive after the other store closed
            assert _probe(tmp_path / ("cassettes/.replay-proxy/locks" if "cassettes" in spec
                                      else "cache/locks")) == "busy"
    finally:
        await first.close()
    assert order in (["a in", "a out", "b in", "b out"], ["b in", "b out", "a in", "a out"])


def _same_stripe(cassette: str = "default") -> tuple[str, str]:
    """Two different keys whose locks fall on one stripe of the lock file."""
    seen: dict[int, str] = {}
    for number in range(100_000):
        key = f"{number:064x}"
        digest = hashlib.sha256(f"{cassette}\x1f{key}".encode()).digest()
        stripe = int.from_bytes(digest[:4], "big") % locking.STRIPES
        if stripe in seen:
            return seen[stripe], key
        seen[stripe] = key
    raise AssertionError("no two keys share a stripe")


async def test_two_keys_on_one_stripe_both_wait_and_keep_it_until_the_last_leaves(
        tmp_path: Path) -> None:
    first_key, second_key = _same_stripe()
    locks, other = StripedLocks(tmp_path), StripedLocks(tmp_path)
    inside: list[str] = []
    try:
        first_out, second_out = asyncio.Event(), asyncio.Event()

        async def hold(key: str, out: asyncio.Event) -> None:
            async with locks.hold("default", key, timeout=10):
                inside.append(key)
                await out.wait()

        async with other.hold("default", first_key):  # another store holds the stripe
            waiting = [asyncio.create_task(hold(first_key, first_out)),
                       asyncio.create_task(hold(second_key, second_out))]
            await asyncio.sleep(0.05)
            assert inside == []  # both keys wait for the other store
        for _ in range(200):
            if len(inside) == 2:
                break
            await asyncio.sleep(0.01)
        assert sorted(inside) == sorted([first_key, second_key])
        first_out.set()
        await waiting[0]
        # The stripe is still the second key's: the other store cannot take that key yet,
        # while this store takes the first key again at once.
        assert not await _taken(other, second_key)
        assert await _taken(locks, first_key)
        assert not await _taken(other, second_key)
        second_out.set()
        await waiting[1]
        assert await _taken(other, second_key) and await _taken(other, first_key)
    finally:
        locks.close()
        other.close()
