"""`replay-proxy run -- COMMAND`: any language's test suite through a proxy of its own.

The proxy runs in this process, on a thread of its own, while COMMAND runs as a child: the
command line is parsed once, there is no second interpreter to start and wait for, and the
counters are read from the proxy itself when the command is done (measured in the README).
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict
from typing import Any

import click
import orjson

from ..core.modes import Mode
from ..core.settings import Settings
from ..server.access_log import LOGGER, Misses
from ..server.sessions import CounterName
from .configuration import DUMMY_API_KEY

_COUNTERS = (("hits", "hit", "hits"), ("misses", "miss", "misses"),
             ("recorded", "recorded", "recorded"),
             ("upstream_calls", "upstream call", "upstream calls"),
             ("store_errors", "store error", "store errors"))
# Shown only when there were some: answers the proxy gave itself, for want of one to give (the
# upstream out of reach, a corrupt cassette). They fail the run, as a miss does.
_ERRORS = ("errors", "proxy error", "proxy errors")
_SHOWN_MISSES = 20


def run_command(settings: Settings, command: Sequence[str], host: str = "127.0.0.1",
                port: int = 0, loop_choice: str = "auto", allow_misses: bool = False,
                environ: Mapping[str, str] | None = None) -> int:
    """Serve, run `command` against the proxy, stop; the exit code `replay-proxy run` gives."""
    from ..server.handler import ReplayProxy
    from .testing import ProxyThread

    environ = dict(os.environ if environ is None else environ)
    with _collecting_misses() as misses:
        proxy = ProxyThread(lambda: ReplayProxy(settings, environ), port, host, loop_choice)
        try:
            proxy.start()
        except OSError as exc:
            raise click.ClickException(f"Cannot listen on {host}:{port}: {exc.strerror}.") \
                from exc
        try:
            health = _wait_healthy(proxy.url)
            mode = Mode(health["mode"])
            code = _run_child(command, child_environment(environ, proxy.url, mode))
        finally:
            proxy.stop()  # finishes storing what was answered, then writes the counters
    state = proxy.state
    totals = state.snapshot()["totals"]
    click.echo(summary_text(f"replay-proxy run (mode {mode.value}, store {settings.store_spec})",
                            totals, misses, state.by_cassette, state.last_miss), err=True)
    failures = [_plural(totals[name], one, many) for name, one, many in (*_COUNTERS, _ERRORS)
                if name in ("misses", "store_errors", "errors") and totals.get(name)]
    if code == 0 and failures and not allow_misses:
        advice = ("record them (--mode record), or pass --allow-misses"
                  if totals.get("misses") else "see the proxy's log above")
        click.echo(f"replay-proxy run: the command passed, but the run had "
                   f"{' and '.join(failures)}: failing it; {advice}.", err=True)
        return 1
    return code


def child_environment(environ: Mapping[str, str], url: str, mode: Mode) -> dict[str, str]:
    """The command's environment: clients pointed at the proxy, dummy keys when replaying."""
    child = dict(environ)
    child["OPENAI_BASE_URL"] = f"{url}/v1"
    child["AZURE_OPENAI_ENDPOINT"] = url
    child["REPLAY_PROXY_URL"] = url
    if mode is Mode.REPLAY:
        for name in ("OPENAI_API_KEY", "AZURE_OPENAI_API_KEY"):
            if not child.get(name):
                child[name] = DUMMY_API_KEY
    # An HTTP proxy configured for the machine must not intercept calls to this one.
    if any(child.get(name) for name in ("HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy")):
        for name in ("NO_PROXY", "no_proxy"):
            present = [part for part in child.get(name, "").split(",") if part]
            child[name] = ",".join([*present, "127.0.0.1", "localhost", "::1"])
    return child


@contextmanager
def _collecting_misses() -> Iterator[Misses]:
    """Turn on the per-request access log for this run (shown only at --log-level info) to
    name each request that missed."""
    misses = Misses()
    access = logging.getLogger(LOGGER)
    level = access.level
    access.setLevel(logging.INFO)
    access.addHandler(misses)
    try:
        yield misses
    finally:
        access.removeHandler(misses)
        access.setLevel(level)


def _wait_healthy(url: str, timeout: float = 30.0) -> dict[str, Any]:
    # A direct connection: an HTTP proxy set for the machine must not answer for this one.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    deadline = time.monotonic() + timeout
    while True:
        try:
            with opener.open(f"{url}/_replay/health", timeout=5) as answer:
                health: dict[str, Any] = orjson.loads(answer.read())
                return health
        except OSError as exc:
            if time.monotonic() > deadline:
                raise click.ClickException(f"replay-proxy did not answer on {url}: {exc}") \
                    from exc
            time.sleep(0.02)


def _run_child(command: Sequence[str], environ: dict[str, str]) -> int:
    try:
        process = subprocess.Popen(list(command), env=environ)
    except FileNotFoundError:
        click.echo(f"replay-proxy run: command not found: {command[0]}", err=True)
        return 127
    except PermissionError:
        click.echo(f"replay-proxy run: permission denied: {command[0]}", err=True)
        return 126
    with _forwarding_signals(process):
        code = process.wait()
    return 128 - code if code < 0 else code  # killed by signal N: 128 + N, as shells say


@contextmanager
def _forwarding_signals(process: subprocess.Popen[bytes]) -> Iterator[None]:
    """While the command runs, a SIGTERM is passed on to it, and Ctrl-C (which the terminal
    already sent to the command too) lets it finish rather than leaving it behind."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def forward(signum: int, _frame: object) -> None:
        if process.poll() is None:
            process.send_signal(signum)

    def wait_for_command(_signum: int, _frame: object) -> None:
        pass

    previous = {signal.SIGTERM: signal.signal(signal.SIGTERM, forward),
                signal.SIGINT: signal.signal(signal.SIGINT, wait_for_command)}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _plural(count: int, one: str, many: str) -> str:
    return f"{count} {one if count == 1 else many}"


def summary_text(head: str, totals: Mapping[str, Any], misses: Misses,
                 by_cassette: Mapping[str, Counter[CounterName]], last_miss: Mapping[str, str],
                 log_format: str = "text") -> str:
    """One line of counters, then the requests that missed: each one when the access log named
    them, else the count per cassette and the last explanation."""
    counts = {name: int(totals.get(name, 0)) for name, _, _ in (*_COUNTERS, _ERRORS)}
    if log_format == "json":
        return orjson.dumps({"summary": head, **counts,
                             "misses_named": [asdict(found) for found in misses.found]}).decode()
    lines = [f"{head}: " + ", ".join(_plural(counts[name], one, many)
                                     for name, one, many in _COUNTERS)]
    if counts["errors"]:
        lines[0] += f", {_plural(counts['errors'], *_ERRORS[1:])} (see the proxy's log)"
    stale = int(totals.get("stale", 0))
    if stale:
        lines[0] += (f"; {_plural(stale, 'stale recording', 'stale recordings')} replayed "
                     "(older than --max-age: `replay-proxy ls --stale` lists them)")
    for found in misses.found[:_SHOWN_MISSES]:
        lines.append(f"  miss: {found.method} {found.path} (cassette {found.cassette}, "
                     f"key {found.key})")
    hidden = len(misses.found) - _SHOWN_MISSES + misses.dropped
    if hidden > 0:
        lines.append(f"  ... and {hidden} more")
    if not misses.found and counts["misses"]:
        for cassette, cassette_counts in sorted(by_cassette.items()):
            if cassette_counts.get("misses"):
                last = last_miss.get(cassette, "").split(". ")[0]
                lines.append(f"  {_plural(cassette_counts['misses'], 'miss', 'misses')} in "
                             f"cassette '{cassette}'; the last: {last}")
    return "\n".join(lines)
