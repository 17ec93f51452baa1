"""Redis `--store` URLs: the forms a team writes, what each means, and clear refusals."""

from __future__ import annotations

from pathlib import Path

import pytest
from replay_proxy.store.redis_url import (
    MAX_CONNECTIONS,
    RedisOptionError,
    parse_redis_url,
    redacted,
)


def test_one_server_with_credentials_and_store_options() -> None:
    target = parse_redis_url("redis://team:s%3Acret@redis.internal:6380/2?ttl=60&prefix=team-a")
    assert (target.cluster, target.tls, target.host, target.port, target.db) == \
        (False, False, "redis.internal", 6380, 2)
    assert (target.username, target.password, target.prefix, target.ttl) == \
        ("team", "s:cret", "team-a", 60)
    assert target.max_connections == MAX_CONNECTIONS
    assert target.description == "redis://team:***@redis.internal:6380/2?prefix=team-a&ttl=60"
    assert "s:cret" not in repr(target)


@pytest.mark.parametrize("url", ["redis+cluster://10.0.0.1:7000/",
                                 "redis://10.0.0.1:7000/0?cluster=true",
                                 "redis://10.0.0.1:7000?cluster=yes"])
def test_cluster_forms(url: str) -> None:
    target = parse_redis_url(url)
    assert target.cluster and (target.host, target.port, target.db) == ("10.0.0.1", 7000, 0)


def test_tls_options(tmp_path: Path) -> None:
    ca, cert, key = (tmp_path / name for name in ("ca.pem", "client.pem", "client-key.pem"))
    for path in (ca, cert, key):
        path.write_text("-")
    target = parse_redis_url(f"rediss+cluster://:pw@cache.example:6379/?ssl_ca_certs={ca}"
                             f"&ssl_certfile={cert}&ssl_keyfile={key}")
    assert target.cluster and target.tls and target.username is None and target.password == "pw"
    assert target.ssl == {"ssl": True, "ssl_ca_certs": str(ca), "ssl_certfile": str(cert),
                          "ssl_keyfile": str(key), "ssl_cert_reqs": "required",
                          "ssl_check_hostname": True}
    assert target.description == "rediss+cluster://:***@cache.example:6379/"
    relaxed = parse_redis_url("rediss://host:1/0?ssl_cert_reqs=none")
    assert relaxed.ssl["ssl_cert_reqs"] == "none" and relaxed.ssl["ssl_check_hostname"] is False


def test_unix_socket() -> None:
    target = parse_redis_url("unix:///run/redis.sock?db=3&prefix=ci")
    assert (target.socket_path, target.db, target.host, target.prefix) == \
        ("/run/redis.sock", 3, None, "ci")


@pytest.mark.parametrize(("url", "says"), [
    ("redis://h:1/0?ttl=soon", "ttl="),
    ("redis://h:1/0?max_connections=0", "max_connections="),
    ("redis://h:1/0?pool_timeout=-1", "pool_timeout="),
    ("redis://h:1/0?prefix=a*b", "prefix="),
    ("redis://h:1/0?colour=blue", "Unknown option(s) colour"),
    ("redis://h:1/0?ssl_ca_certs=/ca.pem", "need rediss://"),
    ("rediss://h:1/0?ssl_ca_certs=/no/such/ca.pem", "no such file"),
    ("rediss://h:1/0?ssl_cert_reqs=maybe", "ssl_cert_reqs="),
    ("redis+cluster://h:1/2", "only database 0"),
    ("redis://h:1/0?nodes=h:2", "nodes= lists more nodes"),
    ("redis+cluster://h:1/?nodes=h", "not HOST:PORT"),
    ("redis://h:port/0", "bad port"),
])
def test_refusals_say_what_to_change(url: str, says: str) -> None:
    with pytest.raises(RedisOptionError) as failure:
        parse_redis_url(url.replace("h:", "user:hunter2@h:"))
    assert says in str(failure.value)
    assert "hunter2" not in str(failure.value)


def test_redacted() -> None:
    assert redacted("redis://u:p%40ss@h:1/0?ttl=1") == "redis://u:***@h:1/0?ttl=1"
    assert redacted("rediss://:secret@h:1/0") == "rediss://:***@h:1/0"
    assert redacted("redis://h:1/0") == "redis://h:1/0"
    assert redacted("./cassettes") == "./cassettes"
