from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from replay_proxy.core.modes import Mode
from replay_proxy.core.settings import Settings
from replay_proxy.tools.testing import (
    ProxyThread,
    RedisClusterNodes,
    SimulatorThread,
    TlsFiles,
    run_proxy,
    run_redis,
    run_redis_cluster,
    run_redis_tls,
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


@pytest.fixture(scope="session")
def redis_cluster() -> Iterator[RedisClusterNodes]:
    """A real three-node Redis Cluster for the session (no replicas)."""
    with run_redis_cluster() as cluster:
        yield cluster


@pytest.fixture
def redis_cluster_url(redis_cluster: RedisClusterNodes) -> str:
    """The cluster, emptied for one test: a `redis+cluster://` store URL."""
    import redis

    for port in redis_cluster.ports:
        client = redis.Redis(port=port)
        client.flushall()
        client.close()
    return redis_cluster.url


@pytest.fixture(scope="session")
def valkey_cluster() -> Iterator[RedisClusterNodes]:
    """A three-node Valkey cluster, where Valkey is installed (scripts/test installs Debian's
    valkey-server where the distribution has it)."""
    import shutil

    if shutil.which("valkey-server") is None or shutil.which("valkey-cli") is None:
        pytest.skip("valkey-server is not installed")
    with run_redis_cluster(binary="valkey-server", cli="valkey-cli") as cluster:
        yield cluster


@pytest.fixture
def valkey_cluster_url(valkey_cluster: RedisClusterNodes) -> str:
    import redis

    for port in valkey_cluster.ports:
        client = redis.Redis(port=port)
        client.flushall()
        client.close()
    return valkey_cluster.url


# A password that looks like one, so the tests can search for it everywhere it must not be.
REDIS_PASSWORD = "pw-TESTREDISsecret/Do+Not:Show42"


@pytest.fixture(scope="session")
def redis_tls_server() -> Iterator[tuple[str, TlsFiles]]:
    """A redis-server that speaks only TLS, wants a client certificate, a user and password."""
    with run_redis_tls("replay-team", REDIS_PASSWORD) as server:
        yield server


@pytest.fixture
def redis_tls_url(redis_tls_server: tuple[str, TlsFiles]) -> str:
    """The TLS server, emptied for one test: a `rediss://user:password@...` store URL."""
    import redis

    url = redis_tls_server[0]
    client = redis.Redis.from_url(url)
    client.flushdb()
    client.close()
    return url


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


@contextmanager
def exclusive(lock: Path) -> Iterator[None]:
    """Hold a lock file: a session fixture that installs something does it once, even when
    pytest-xdist runs it in every worker."""
    import fcntl

    lock.parent.mkdir(parents=True, exist_ok=True)
    with open(lock, "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
