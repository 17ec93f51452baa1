"""A Redis `--store` URL: where the server or cluster is, how to reach it (TLS, credentials),
and the store's own options, checked once, with a description that never holds the password.

    redis://[USER:PASSWORD@]HOST:PORT/DB?OPTIONS        one server (cluster=true: a cluster)
    rediss://...                                        the same over TLS
    redis+cluster://[USER:PASSWORD@]HOST:PORT/?OPTIONS  a Redis Cluster, found from one node
    rediss+cluster://...                                a cluster over TLS
    unix:///path/to/redis.sock?db=N&OPTIONS             one server on a local socket
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, quote, unquote, urlencode, urlsplit

SCHEMES = ("redis://", "rediss://", "redis+cluster://", "rediss+cluster://", "unix://")
# A key prefix is matched by SCAN patterns, so it may not hold glob characters.
_PREFIX = re.compile(r"[A-Za-z0-9_.=+\-:]{1,64}")
_TRUE, _FALSE = ("true", "yes", "1", "on"), ("false", "no", "0", "off")
_CERT_REQS = ("required", "optional", "none")
# Defaults, per proxy: connections per Redis node, and how long a call may wait for one.
# Each request makes one to three store calls in turn and Redis answers in well under a
# millisecond, so 50 connections keep up with hundreds of concurrent requests while the others
# wait their turn (bounded by pool_timeout); a fleet of N proxies opens at most 50 x N
# connections per node, far below Redis's default maxclients of 10,000.
MAX_CONNECTIONS = 50
POOL_TIMEOUT_S = 5.0
TIMEOUT_S = 5.0


class RedisOptionError(ValueError):
    """A `--store` URL that cannot be used, said without its password."""


@dataclass(frozen=True)
class RedisTarget:
    cluster: bool
    tls: bool
    host: str | None
    port: int | None
    socket_path: str | None
    db: int
    username: str | None
    password: str | None = field(repr=False)
    seeds: tuple[tuple[str, int], ...]  # more cluster nodes to start from (`nodes=`)
    prefix: str
    ttl: int | None
    max_connections: int
    pool_timeout: float
    timeout: float
    ssl: dict[str, Any]
    description: str

    def connection_kwargs(self) -> dict[str, Any]:
        """What redis-py's connections take: credentials, timeouts and TLS."""
        return {"username": self.username, "password": self.password,
                "socket_timeout": self.timeout, "socket_connect_timeout": self.timeout,
                **self.ssl}


def parse_redis_url(url: str) -> RedisTarget:
    scheme, sep, _ = url.partition("://")
    if not sep or f"{scheme}://" not in SCHEMES:
        raise RedisOptionError(f"A Redis store URL starts with one of {', '.join(SCHEMES)}.")
    parts = urlsplit(url)
    try:
        port = parts.port
    except ValueError as exc:
        raise RedisOptionError(f"The Redis store URL has a bad port ({redacted(url)}).") from exc
    options = dict(parse_qsl(parts.query, keep_blank_values=True))
    unix = scheme == "unix"
    cluster = scheme.endswith("+cluster") or _flag(options.pop("cluster", "false"), "cluster")
    tls = scheme.startswith("rediss")
    if unix and cluster:
        raise RedisOptionError("A Redis Cluster is reached over TCP, not a unix socket.")
    db_text = options.pop("db", None) if unix else parts.path.strip("/") or None
    if not unix and "db" in options:
        db_text = options.pop("db")
    db = _integer(db_text or "0", "db", 0, 1 << 16)
    if cluster and db != 0:
        raise RedisOptionError("A Redis Cluster has only database 0: drop /DB from the URL.")
    host = None if unix else (parts.hostname or "localhost")
    seeds = tuple(_seed(node) for node in options.pop("nodes", "").split(",") if node)
    if seeds and not cluster:
        raise RedisOptionError("nodes= lists more nodes of a Redis Cluster: use "
                               "redis+cluster:// (or cluster=true).")
    prefix = options.pop("prefix", "replay")
    if not _PREFIX.fullmatch(prefix):
        raise RedisOptionError(f"prefix={prefix!r}: use 1 to 64 letters, digits and '_ . = + - :'.")
    ttl = _integer(options.pop("ttl"), "ttl", 1, 10 * 365 * 86400) if "ttl" in options else None
    max_connections = _integer(options.pop("max_connections", str(MAX_CONNECTIONS)),
                               "max_connections", 1, 10_000)
    pool_timeout = _seconds(options.pop("pool_timeout", str(POOL_TIMEOUT_S)), "pool_timeout")
    timeout = _seconds(options.pop("timeout", str(TIMEOUT_S)), "timeout")
    ssl = _ssl_options(options, tls)
    if options:
        raise RedisOptionError(
            f"Unknown option(s) {', '.join(sorted(options))} in the Redis store URL; known: "
            "prefix, ttl, cluster, nodes, max_connections, pool_timeout, timeout, db, "
            "ssl_ca_certs, ssl_certfile, ssl_keyfile, ssl_cert_reqs, ssl_check_hostname.")
    username = unquote(parts.username) if parts.username else None
    password = unquote(parts.password) if parts.password is not None else None
    return RedisTarget(
        cluster=cluster, tls=tls, host=host, port=None if unix else (port or 6379),
        socket_path=unquote(parts.path) if unix else None, db=db, username=username,
        password=password, seeds=seeds, prefix=prefix, ttl=ttl,
        max_connections=max_connections, pool_timeout=pool_timeout, timeout=timeout, ssl=ssl,
        description=_describe(scheme, parts.hostname, port, parts.path, username,
                              password is not None, prefix, ttl, cluster, unix))


def redacted(url: str) -> str:
    """The URL with its password replaced by `***`: safe for logs, messages and files. Read
    from the URL's shape, not by parsing it, so that a URL too malformed to parse (a password
    with an unescaped `/`, say) is still shown without its password."""
    scheme, separator, rest = url.partition("://")
    authority_and_path, question, query = rest.partition("?")
    if not separator or "@" not in authority_and_path:
        return url
    credentials, _, where = authority_and_path.rpartition("@")
    if ":" not in credentials:
        return url  # a user name alone is no secret
    user = credentials.partition(":")[0]
    return f"{scheme}://{user}:***@{where}{question}{query}"


def _describe(scheme: str, host: str | None, port: int | None, path: str, username: str | None,
              has_password: bool, prefix: str, ttl: int | None, cluster: bool, unix: bool) -> str:
    credentials = ""
    if username or has_password:
        credentials = quote(username or "", safe="") + (":***" if has_password else "") + "@"
    where = path if unix else f"{host or 'localhost'}:{port or 6379}{path or '/'}"
    shown: dict[str, str] = {}
    if cluster and not scheme.endswith("+cluster"):
        shown["cluster"] = "true"
    if prefix != "replay":
        shown["prefix"] = prefix
    if ttl is not None:
        shown["ttl"] = str(ttl)
    query = f"?{urlencode(shown)}" if shown else ""
    return f"{scheme}://{credentials}{where}{query}"


def _ssl_options(options: dict[str, str], tls: bool) -> dict[str, Any]:
    names = ("ssl_ca_certs", "ssl_certfile", "ssl_keyfile", "ssl_cert_reqs", "ssl_check_hostname")
    given = {name: options.pop(name) for name in names if name in options}
    if not tls:
        if given:
            raise RedisOptionError(f"{', '.join(sorted(given))}: TLS options need rediss:// "
                                   "(or rediss+cluster://).")
        return {}
    ssl: dict[str, Any] = {"ssl": True}
    for name in ("ssl_ca_certs", "ssl_certfile", "ssl_keyfile"):
        if name in given:
            path = os.path.expanduser(given[name])
            if not os.path.isfile(path):
                raise RedisOptionError(f"{name}: no such file {path}")
            ssl[name] = path
    if ("ssl_certfile" in ssl) != ("ssl_keyfile" in ssl):
        raise RedisOptionError("A client certificate needs both ssl_certfile and ssl_keyfile.")
    reqs = given.get("ssl_cert_reqs", "required").lower()
    if reqs not in _CERT_REQS:
        raise RedisOptionError(f"ssl_cert_reqs={reqs!r}: use one of {', '.join(_CERT_REQS)}.")
    ssl["ssl_cert_reqs"] = reqs
    ssl["ssl_check_hostname"] = (reqs == "required"
                                 and _flag(given.get("ssl_check_hostname", "true"),
                                           "ssl_check_hostname"))
    return ssl


def _seed(node: str) -> tuple[str, int]:
    host, _, port = node.strip().rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise RedisOptionError(f"nodes: {node!r} is not HOST:PORT.")
    return host, int(port)


def _flag(value: str, name: str) -> bool:
    if value.lower() in _TRUE:
        return True
    if value.lower() in _FALSE:
        return False
    raise RedisOptionError(f"{name}={value!r}: use true or false.")


def _integer(value: str, name: str, low: int, high: int) -> int:
    if not value.isdigit() or not low <= int(value) <= high:
        raise RedisOptionError(f"{name}={value!r}: use a whole number from {low} to {high}.")
    return int(value)


def _seconds(value: str, name: str) -> float:
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.0
    if not 0 < seconds <= 3600:
        raise RedisOptionError(f"{name}={value!r}: use a number of seconds above 0, at most 3600.")
    return seconds
