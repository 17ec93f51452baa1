from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from replay_proxy.core.modes import Mode
from replay_proxy.core.settings import Settings
from replay_proxy.tools.testing import (
    ProxyThread,
    SimulatorThread,
    run_proxy,
    run_redis,
    run_simulator,
)

# A key that looks like a real one, so the tests can search the store for it.
SECRET_KEY = "sk-proj-TESTSECRETkeyDoNotStore1234567890abcdef"
ORG_ID = "org-TESTORGANISATIONid42"
PROJECT_ID = "proj_TESTPROJECTid4242"


@pytest.fixture(scope="session")
def redis_server() -> Iterator[str]:
    """A real redis-server for the session (scripts/test installs it when missing)."""
    with run_redis() as url:
        yield url


@pytest.fixture
def redis_url(redis_server: str) -> str:
    """A clean database for one test."""
    import redis

    client = redis.Redis.from_url(redis_server)
    client.flushdb()
    client.close()
    return redis_server


@pytest.fixture
def simulator() -> Iterator[SimulatorThread]:
    with run_simulator() as sim:
        yield sim


@pytest.fixture
def cassettes(tmp_path: Path) -> Path:
    return tmp_path / "cassettes"


ProxyFactory = Callable[..., AbstractContextManager[ProxyThread]]


@pytest.fixture
def make_proxy(simulator: SimulatorThread, cassettes: Path) -> ProxyFactory:
    """Start a proxy on the test's cassette folder, upstream the simulator; kwargs override."""

    def factory(mode: Mode = Mode.RECORD, **overrides: Any) -> AbstractContextManager[ProxyThread]:
        settings = Settings(cassettes=cassettes, mode=mode, openai_upstream=simulator.url,
                            azure_upstream=simulator.url)
        return run_proxy(replace(settings, **overrides))

    return factory


def stored_bytes(root: Path) -> bytes:
    """Every byte under a store root, for searching it for secrets."""
    return b"".join(path.read_bytes() for path in sorted(root.rglob("*")) if path.is_file())


def recorded_files(root: Path) -> list[Path]:
    """The cassette files under a store root, without the proxy's own usage log."""
    return sorted(p for p in root.rglob("*.json") if ".replay-proxy" not in p.parts)
