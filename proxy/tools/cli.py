"""The `replay-proxy` command: serve the proxy, run the simulator, inspect and manage cassettes."""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import logging
import os
import sys
from collections.abc import Callable, Coroutine, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

import click
import orjson
from aiohttp import web

from ..core.cassette import Drift, Entry, encode_entry
from ..core.compaction import compact as compact_entry
from ..core.errors import ProxyError
from ..core.modes import Mode, resolve_mode
from ..core.settings import OPENAI_UPSTREAM, Settings
from ..server import serving
from ..server.usage import last_used, new_run_id, read_runs, read_usage, usage_since
from ..store import Store, StoredItem, describe_store, open_store, store_folder
from ..store.state_dir import state_dir
from .audit import Verdict
from .audit import probe as probe_upstream
from .audit import verify as verify_entries
from .config_file import CONFIG_ENV
from .configuration import (
    SHARED_OPTIONS,
    age_option,
    cassette_rules_from,
    default_maps,
    find_config,
    read_config,
    run_options,
    serve_options,
    settings_from,
    with_environment,
)
from .report import DRIFTS, collapse, drift_rows, ls_row, show_text, table, totals
from .run import run_command, summary_text

_T = TypeVar("_T")


class _Failed(click.ClickException):
    """A command that could not do its work for a reason the user can act on (a missing
    folder, a refused key, nothing to verify): exit 2, as for bad usage."""

    exit_code = 2


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="replay-proxy")
@click.option("--config", "config_path", envvar=CONFIG_ENV, show_envvar=True,
              type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Read options from this TOML file instead of the nearest replay-proxy.toml "
                   "or pyproject.toml [tool.replay-proxy].")
@click.pass_context
def main(ctx: click.Context, config_path: Path | None) -> None:
    """Record OpenAI and Azure OpenAI calls once, replay them forever.

    Options of serve and run can also be set in [tool.replay-proxy] of the nearest
    pyproject.toml (or a replay-proxy.toml) and as REPLAY_PROXY_<OPTION> variables; a flag
    beats the environment, which beats the file.
    """
    config = (read_config(config_path) if config_path is not None
              else find_config(Path.cwd()))
    commands = main.commands.items()
    ctx.default_map = default_maps(config, {name: command.params for name, command in commands})
    ctx.meta[_CONFIG_KEY] = config


_CONFIG_KEY = "replay_proxy.config"


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _settings(options: dict[str, Any]) -> Settings:
    """Settings from serve's options, every one checked before anything starts."""
    host = options["host"]
    if not _is_loopback(host) and not options["auth_token"]:
        raise click.UsageError(
            f"Refusing to bind {host}: off loopback anyone who can reach the port could spend "
            "your API key. Pass --auth-token TOKEN (clients then use TOKEN as their API key), "
            "or bind 127.0.0.1."
        )
    config = click.get_current_context().find_root().meta.get(_CONFIG_KEY)
    settings = settings_from(options, run_id=new_run_id(),
                             cassette_rules=cassette_rules_from(config))
    try:
        problem = serving.store_problem(settings, resolve_mode(settings.mode, os.environ))
        if problem is not None:
            raise click.UsageError(problem)
        asyncio.run(open_store(settings.store_spec).close())  # a bad --store fails here, clearly
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--store") from exc
    try:
        serving.new_event_loop(options["loop_choice"]).close()  # a missing uvloop fails here
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--loop") from exc
    return settings


def _configured_from(ctx: click.Context) -> str:
    config = ctx.find_root().meta.get(_CONFIG_KEY)
    return f", options from {config.where}" if config is not None else ""


@main.command()
@serve_options
@click.pass_context
def serve(ctx: click.Context, /, **options: Any) -> None:
    """Run the proxy on HOST:PORT until interrupted."""
    settings = _settings(options)
    host, port, workers = options["host"], options["port"], options["workers"]
    if workers > 1 and port == 0:
        raise click.UsageError("--workers shares one port between its processes: give "
                               "--port N (each worker would take a port of its own for 0).")
    try:
        # Before anything starts: no other serve may join the workers' port (see serving).
        serving.check_port_free(host, port)
    except OSError as exc:
        raise _port_error(exc, host, port) from exc
    logging_options = (options["log_level"], options["log_format"])
    effective = resolve_mode(settings.mode, os.environ)
    click.echo(
        f"replay-proxy listening on http://{host}:{port} (mode {effective.value}"
        f"{' from --mode auto' if settings.mode is Mode.AUTO else ''}, store "
        f"{describe_store(settings.store_spec)}, cassette {settings.default_cassette}"
        f"{f', {workers} workers' if workers > 1 else ''}{_configured_from(ctx)})\n"
        f"  export OPENAI_BASE_URL=http://{host}:{port}/v1",
        err=True,
    )
    if workers == 1:
        _serve_one(settings, host, port, options["loop_choice"], False, logging_options)
    else:
        sys.exit(run_workers(settings, host, port, workers, options["loop_choice"],
                             logging_options))


@main.command(context_settings={"allow_interspersed_args": False})
@run_options
@serve_options
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
@click.pass_context
def run(ctx: click.Context, /, command: tuple[str, ...], allow_misses: bool,
        **options: Any) -> None:
    """Run COMMAND through a proxy of its own: replay-proxy run [OPTIONS] -- COMMAND.

    The proxy listens on a free loopback port; COMMAND gets OPENAI_BASE_URL,
    AZURE_OPENAI_ENDPOINT and REPLAY_PROXY_URL pointing at it (and dummy API keys when
    replaying and none are set). Takes every serve option. Exits with COMMAND's code, or 1 when
    COMMAND passed but a request missed its recording or a recording could not be stored.
    """
    if options["workers"] != 1:
        raise click.UsageError("run serves from one process; --workers is for serve.")
    if ctx.get_parameter_source("port") is not click.core.ParameterSource.COMMANDLINE:
        options["port"] = 0  # a free port, so that suites can run side by side
    settings = _settings(options)
    _configure_logging(*(options["log_level"], options["log_format"]))
    sys.exit(run_command(settings, command, options["host"], options["port"],
                         options["loop_choice"], allow_misses))


def _configure_logging(level: str, log_format: str) -> None:
    from ..server.access_log import JsonLines

    handler = logging.StreamHandler(sys.stderr)
    handler.setLevel(level.upper())
    handler.setFormatter(JsonLines() if log_format == "json" else
                         logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    logger = logging.getLogger("replay_proxy")
    logger.handlers = [handler]
    logger.setLevel(level.upper())


def _serve_one(settings: Settings, host: str, port: int, loop_choice: str = "auto",
               reuse_port: bool = False,
               logging_options: tuple[str, str] = ("warning", "text")) -> None:
    from ..server.access_log import LOGGER, Misses
    from ..server.handler import ProxyRunner, ReplayProxy

    _configure_logging(*logging_options)
    misses = Misses()
    access = logging.getLogger(LOGGER)
    if access.isEnabledFor(logging.INFO):
        access.addHandler(misses)
    proxies: list[ReplayProxy] = []

    def make_runner() -> web.BaseRunner:
        proxies.append(ReplayProxy(settings))
        return ProxyRunner(proxies[-1])

    try:
        _run(make_runner, host, port, loop_choice, reuse_port)
    finally:
        access.removeHandler(misses)
    for proxy in proxies:
        state = proxy.state
        click.echo(summary_text("replay-proxy stopped", state.snapshot()["totals"], misses,
                                state.by_cassette, state.last_miss, logging_options[1]),
                   err=True)


def _run(make_runner: Callable[[], web.BaseRunner], host: str, port: int, loop_choice: str,
         reuse_port: bool = False) -> None:
    try:
        serving.serve(make_runner, host, port, reuse_port, loop_choice)
    except OSError as exc:
        raise _port_error(exc, host, port) from exc


def _port_error(exc: OSError, host: str, port: int) -> Exception:
    if exc.errno == errno.EADDRINUSE:
        return _Failed(f"{host}:{port} is already in use (another replay-proxy?). Stop it or "
                       "pass --port N.")
    return exc


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind.")
@click.option("--port", default=8788, show_default=True, type=int, help="Port to listen on.")
@click.option("--fingerprint", default="fp_sim_a1b2c3", show_default=True,
              help="The system_fingerprint every answer carries.")
@click.option("--api-key", default=None, help="Only accept this key (default: any non-empty key).")
@click.option("--latency", default=0.0, type=float, help="Seconds before each answer.")
@click.option("--event-delay", default=0.0, type=float, help="Seconds between stream events.")
def simulate(host: str, port: int, fingerprint: str, api_key: str | None, latency: float,
             event_delay: float) -> None:
    """Run the local OpenAI/Azure upstream simulator (for demos, tests and benchmarks)."""
    from .simulator import SimulatorState, create_simulator

    state = SimulatorState(fingerprint=fingerprint, api_key=api_key, latency=latency,
                           event_delay=event_delay)
    click.echo(f"simulated OpenAI upstream on http://{host}:{port} (fingerprint {fingerprint}); "
               f"steer it with POST /_sim/state", err=True)
    _run(lambda: web.AppRunner(create_simulator(state), access_log=None), host, port, "auto")


def run_workers(settings: Settings, host: str, port: int, workers: int,
                loop_choice: str = "auto",
                logging_options: tuple[str, str] = ("warning", "text")) -> int:
    """Start `workers` processes on one port; stop them all when one dies or on a signal."""
    import multiprocessing
    import signal

    context = multiprocessing.get_context("spawn")
    processes = [context.Process(target=_serve_one,
                                 args=(settings, host, port, loop_choice, True,
                                       logging_options))
                 for _ in range(workers)]
    for process in processes:
        process.start()

    def stop(signum: int, _frame: object) -> None:
        for process in processes:
            if process.is_alive():
                process.terminate()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    from multiprocessing.connection import wait

    wait([process.sentinel for process in processes])
    stop(signal.SIGTERM, None)
    for process in processes:
        process.join(timeout=10)
    return max((abs(process.exitcode or 0) for process in processes), default=0) and 1




# ---- inspecting and managing cassettes -------------------------------------------------------

def _store_options(command: Callable[..., None]) -> Callable[..., None]:
    command = click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")(
        command)
    command = click.option("--cassette", default=None,
                           help="Only this cassette (default: all).")(command)
    command = click.option("--store", default=None,
                           help="diskcache:PATH or redis://... instead of the directory.")(command)
    return click.option("--cassettes", type=click.Path(path_type=Path), default=Path("cassettes"),
                        show_default=True, help="Root folder of the cassettes.")(command)


def _on_store(work: Coroutine[Any, Any, _T]) -> _T:
    """Run work on a store: one that cannot be reached, or refuses what it is given, is a clear
    error (exit 1) rather than a traceback."""
    try:
        return asyncio.run(work)
    except ProxyError as exc:
        raise click.ClickException(exc.message) from exc
    except ValueError as exc:  # a --store value that names no store this version can open
        raise click.UsageError(str(exc)) from exc


def _existing(spec: str | Path, option: str) -> None:
    """Refuse a store folder that does not exist, before opening it (which for a diskcache
    would create it): a typo in --cassettes or --store would otherwise show nothing, and
    succeed."""
    try:
        folder = store_folder(spec)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint=option) from exc
    if folder is not None and not folder.is_dir():
        raise _Failed(f"{option} {spec}: no such folder. Give the folder that holds your "
                      "cassettes (the default is ./cassettes).")


async def _names(backend: Store, cassette: str | None) -> list[str]:
    """The cassettes to work on: all of them, or the one named, which must hold recordings."""
    names = await backend.cassettes()
    if cassette is None:
        return names
    if cassette not in names:
        raise _Failed(f"No cassette {cassette!r} in {backend.description}; `replay-proxy ls` "
                      "lists the keys of every cassette.")
    return [cassette]


def _items(cassettes: Path, store: str | None, cassette: str | None) -> list[StoredItem]:
    _existing(store or cassettes, "--store" if store else "--cassettes")

    async def load() -> list[StoredItem]:
        backend = open_store(store or cassettes)
        try:
            names = await _names(backend, cassette)
            found: list[StoredItem] = []
            for name in names:
                found += await backend.items(name)
            return found
        finally:
            await backend.close()

    return _on_store(load())


def _one(cassettes: Path, store: str | None, cassette: str | None, prefix: str) -> StoredItem:
    matches = [item for item in _items(cassettes, store, cassette) if item.key.startswith(prefix)]
    if not matches:
        raise click.ClickException(f"No key starts with {prefix!r}; `replay-proxy ls` lists them.")
    if len(matches) > 1:
        shown = ", ".join(f"{m.cassette}/{m.key[:16]}" for m in matches[:5])
        raise click.ClickException(f"{prefix!r} matches {len(matches)} keys ({shown}); give more "
                                   "characters or --cassette.")
    return matches[0]


@contextmanager
def _progress(total: int, label: str, quiet: bool) -> Iterator[Callable[[], None]]:
    """click's progress bar on stderr when it is a terminal; nothing at all when it is not (a
    log, a pipe) or with --json."""
    if quiet or total == 0 or not sys.stderr.isatty():
        yield lambda: None
        return
    with click.progressbar(length=total, label=label, file=sys.stderr) as bar:
        yield lambda: bar.update(1)


def _echo_json(value: object) -> None:
    click.echo(orjson.dumps(value, option=orjson.OPT_INDENT_2).decode())


@main.command("ls")
@_store_options
@click.option("--stale", is_flag=True,
              help="Only keys last recorded or confirmed longer ago than --max-age.")
@click.option("--max-age", default=None, callback=age_option, metavar="AGE",
              help="How old a stale recording is (30d, 12h, ...); also read from the "
                   "configuration file.")
def list_keys(cassettes: Path, store: str | None, cassette: str | None, as_json: bool,
              stale: bool, max_age: float | None) -> None:
    """One row per recorded key."""
    if stale and max_age is None:
        raise click.UsageError("--stale needs an age: pass --max-age 30d (or set max-age in "
                               "the configuration file).")
    used = last_used(read_usage(state_dir(cassettes)))
    items = _items(cassettes, store, cassette)
    if stale and max_age is not None:
        cutoff = (datetime.now(UTC) - timedelta(seconds=max_age)).isoformat(
            timespec="milliseconds").replace("+00:00", "Z")
        items = [item for item in items
                 if item.entry is not None and item.entry.last_confirmed() < cutoff]
    rows = [ls_row(item, used) for item in items]
    if as_json:
        _echo_json(rows)
        return
    for row in rows:
        row["key"] = row["key"][:12]
        if row.get("sequence"):
            row["sequence"] = collapse(row["sequence"])
        if "stream" in row:
            row["stream"] = "yes" if row["stream"] else "no"
    click.echo(table(rows, ["cassette", "key", "provider", "route", "model", "stream", "seed",
                            "temperature", "fingerprints", "recordings", "sequence", "confirmed",
                            "last_used", "size", "error"]))


@main.command()
@click.argument("key_prefix")
@_store_options
def show(key_prefix: str, cassettes: Path, store: str | None, cassette: str | None,
         as_json: bool) -> None:
    """The canonical request and recordings of one key."""
    item = _one(cassettes, store, cassette, key_prefix)
    if item.entry is None:
        raise click.ClickException(item.error.message if item.error else "unreadable entry")
    if as_json:
        click.echo(encode_entry(item.entry).decode(), nl=False)
        return
    click.echo(show_text(item.cassette, item.entry))


@main.command()
@_store_options
def drift(cassettes: Path, store: str | None, cassette: str | None, as_json: bool) -> None:
    """Keys whose answers changed (from refresh or verify --update). Exit 1 when any did."""
    rows = drift_rows(_items(cassettes, store, cassette))
    if as_json:
        _echo_json(rows)
    elif not rows:
        click.echo("no drift recorded")
    for row in rows if not as_json else []:
        click.echo(f"{row['drift']:<18} {row['cassette']}/{row['key'][:16]} {row['route']}  "
                   f"{row['fingerprint_old']} -> {row['fingerprint_new']}  "
                   f"({row['recorded_at']})\n    {row['diff']}")
    sys.exit(1 if rows else 0)


@main.command()
@_store_options
@click.option("--openai-upstream", default=OPENAI_UPSTREAM, show_default=True,
              help="Where OpenAI requests are re-sent.")
@click.option("--azure-upstream", envvar="AZURE_OPENAI_ENDPOINT", default=None,
              help="Your Azure OpenAI endpoint, where Azure requests are re-sent.")
@click.option("--openai-api-key", envvar="OPENAI_API_KEY", default=None, show_envvar=True,
              help="Key sent to OpenAI.")
@click.option("--azure-api-key", envvar="AZURE_OPENAI_API_KEY", default=None, show_envvar=True,
              help="Key sent to Azure OpenAI.")
@click.option("--redact", multiple=True, metavar="NAME_OR_REGEX",
              help="What serve's --redact removes from the answers it stores, removed from "
                   "what --update stores too (repeatable; read from the configuration file "
                   "like serve's, per-cassette rules included).")
@click.option("--update", is_flag=True, help="Store each drifted answer as a new recording.")
@click.option("--concurrency", default=4, show_default=True, type=int,
              help="Requests in flight at once.")
@click.pass_context
def verify(ctx: click.Context, /, cassettes: Path, store: str | None, cassette: str | None,
           as_json: bool, openai_upstream: str, azure_upstream: str | None,
           openai_api_key: str | None, azure_api_key: str | None, redact: tuple[str, ...],
           update: bool, concurrency: int) -> None:
    """Re-send every recorded request upstream; report same or drift per key.

    Exit 1 on drift; 2 when a key could not be verified (an error answer, an unreachable
    upstream) or when nothing was (every key skipped).
    """
    items = _items(cassettes, store, cassette)
    entries = [(i.cassette, i.entry) for i in items if i.entry]
    # Scrubbed as the proxy scrubs what it records: the same redaction rules, by cassette.
    settings = settings_from(
        {"openai_upstream": openai_upstream, "azure_upstream": azure_upstream,
         "openai_api_key": openai_api_key, "azure_api_key": azure_api_key, "redact": redact},
        cassette_rules=cassette_rules_from(ctx.find_root().meta.get(_CONFIG_KEY)))
    with _progress(len(entries), "verifying", as_json) as done:
        verdicts = asyncio.run(verify_entries(entries, settings, concurrency, done))
    verdicts += [Verdict(i.cassette, i.key, "-", "error",
                         i.error.message if i.error else "unreadable entry")
                 for i in items if i.entry is None]
    drifted = [v for v in verdicts if v.result in DRIFTS]
    if update and drifted:
        by_key = {(cassette_name, entry.key): entry for cassette_name, entry in entries}
        _on_store(_store_drift(store or cassettes, by_key, drifted))
    if as_json:
        _echo_json([{"cassette": v.cassette, "key": v.key, "route": v.route, "result": v.result,
                     "detail": v.detail} for v in verdicts])
    else:
        for v in verdicts:
            click.echo(f"{v.result:<18} {v.cassette}/{v.key[:16]} {v.route}"
                       + (f"\n    {v.detail}" if v.detail else ""))
        counts = {name: sum(1 for v in verdicts if v.result == name)
                  for name in sorted({v.result for v in verdicts})}
        click.echo("summary: " + (", ".join(f"{n} {k}" for k, n in counts.items()) or "no keys")
                   + (" (drift stored)" if update and drifted else ""))
    errors = [v for v in verdicts if v.result == "error"]
    if errors:
        raise _Failed(f"{len(errors)} key(s) could not be verified, and nothing was stored for "
                      "them: each error says what to check.")
    if not any(v.result not in ("skipped", "error") for v in verdicts):
        if verdicts:
            raise _Failed(f"Nothing was verified: every key ({len(verdicts)}) was skipped, each "
                          "for the reason given.")
        where = describe_store(store or cassettes) + (f", cassette {cassette}" if cassette else "")
        raise _Failed(f"Nothing was verified: no recordings in {where}.")
    sys.exit(1 if drifted else 0)


async def _store_drift(spec: str | Path, entries: dict[tuple[str, str], Entry],
                       verdicts: list[Verdict]) -> None:
    backend = open_store(spec)
    try:
        for verdict in verdicts:
            assert verdict.recording is not None
            entry = entries[(verdict.cassette, verdict.key)]
            await backend.put(verdict.cassette,
                              entry.add(replace(verdict.recording, drift=Drift(verdict.result))))
    finally:
        await backend.close()


@main.command()
@click.option("--base-url", required=True, help="e.g. https://api.openai.com/v1")
@click.option("--api-key", envvar="OPENAI_API_KEY", required=True, show_envvar=True,
              help="Key sent with every request.")
@click.option("--model", required=True, help="Model (or Azure deployment) to ask.")
@click.option("--prompt", required=True, help="The user message sent N times.")
@click.option("-n", "count", default=5, show_default=True, type=click.IntRange(1, 100),
              help="How many identical requests to send at once.")
@click.option("--seed", type=int, default=None, help="seed sent with each request.")
@click.option("--temperature", type=float, default=None,
              help="temperature sent with each request.")
@click.option("--max-tokens", type=int, default=None, help="max_tokens sent with each request.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def probe(base_url: str, api_key: str, model: str, prompt: str, count: int, seed: int | None,
          temperature: float | None, max_tokens: int | None, as_json: bool) -> None:
    """The cookbook's seed experiment: one request N times at once, straight upstream."""
    try:
        with _progress(count, "probing", as_json) as done:
            result = asyncio.run(probe_upstream(base_url, api_key, model, prompt, count, seed,
                                                temperature, max_tokens, done))
    except (RuntimeError, OSError) as exc:
        raise click.ClickException(str(exc)) from exc
    if as_json:
        _echo_json(result.as_json())
        return
    click.echo(f"{result.n} requests, seed {seed}: {result.distinct_outputs} distinct output(s), "
               f"fingerprints {', '.join(str(f) for f in result.fingerprints)}, "
               f"average pairwise similarity {result.similarity:.3f}")
    for index, output in enumerate(result.outputs):
        click.echo(f"  {index}: {output}")


@main.command()
@click.argument("key_prefix")
@click.option("--fingerprint", required=True,
              help="A system_fingerprint this key has recorded (null for none).")
@_store_options
def pin(key_prefix: str, fingerprint: str, cassettes: Path, store: str | None,
        cassette: str | None, as_json: bool) -> None:
    """Replay this key's recording under FINGERPRINT from now on."""
    item = _one(cassettes, store, cassette, key_prefix)
    if item.entry is None:
        raise click.ClickException(item.error.message if item.error else "unreadable entry")
    wanted = None if fingerprint == "null" else fingerprint
    if wanted not in item.entry.fingerprints():
        known = ", ".join(str(f) for f in item.entry.fingerprints())
        raise click.ClickException(f"Key {item.key[:16]} has no recording with fingerprint "
                                   f"{fingerprint}; recorded: {known}.")

    async def save(entry: Entry) -> None:
        backend = open_store(store or cassettes)
        try:
            await backend.put(item.cassette, entry)
        finally:
            await backend.close()

    _on_store(save(replace(item.entry, pinned_fingerprint=wanted)))
    if as_json:
        _echo_json({"cassette": item.cassette, "key": item.key, "pinned": wanted,
                    "previous": item.entry.pinned_fingerprint})
        return
    click.echo(f"pinned {item.cassette}/{item.key[:16]} to {fingerprint} "
               f"(was {item.entry.pinned_fingerprint}); a running proxy picks it up on restart")


@dataclass(frozen=True)
class _Compacted:
    """One key `compact` rewrote (or would): duplicates dropped, an older layout upgraded."""

    cassette: str
    label: str
    key: str
    dropped: int
    upgraded: bool
    bytes_before: int
    bytes_after: int

    def as_json(self) -> dict[str, Any]:
        return {"cassette": self.cassette, "label": self.label, "key": self.key,
                "dropped": self.dropped, "upgraded": self.upgraded,
                "bytes_before": self.bytes_before, "bytes_after": self.bytes_after}


@dataclass
class _Compaction:
    compacted: list[_Compacted] = field(default_factory=list)
    sequences: list[str] = field(default_factory=list)  # sequenced keys, left as they are
    refused: list[str] = field(default_factory=list)  # why each unreadable key was left


async def _compact_store(spec: str | Path, cassette: str | None, dry_run: bool,
                         quiet: bool) -> _Compaction:
    backend = open_store(spec)
    outcome = _Compaction()
    try:
        names = await _names(backend, cassette)
        items = [item for name in names for item in await backend.items(name)]
        with _progress(len(items), "compacting", quiet) as done:
            for item in items:
                await _compact_item(backend, item, dry_run, outcome)
                done()
    finally:
        await backend.close()
    return outcome


async def _compact_item(backend: Store, item: StoredItem, dry_run: bool,
                        outcome: _Compaction) -> None:
    name = f"{item.cassette}/{item.label}-{item.key[:16]}"
    if item.entry is None:
        outcome.refused.append(item.error.message if item.error else f"{name}: unreadable")
        return
    if item.entry.sequence:
        outcome.sequences.append(name)
        return
    # A file written by an older version (format 1 has no `sequence`, and sorted every key) or
    # laid out by hand is not the size of what this version writes for the same entry.
    upgraded = len(encode_entry(item.entry)) != item.size
    result = compact_entry(item.entry)
    if not result.dropped and not upgraded:
        return
    if not dry_run:
        # Under the key's lock, from what is stored now: a proxy sharing the store may have
        # added a recording since the listing, and it must not be written over.
        async with backend.lock(item.cassette, item.key):
            current = await backend.get(item.cassette, item.key, item.label)
            if current is None or current.sequence:
                return
            result = compact_entry(current)
            await backend.put(item.cassette, result.entry)
    outcome.compacted.append(_Compacted(item.cassette, item.label, item.key, result.dropped,
                                        upgraded, item.size, len(encode_entry(result.entry))))


@main.command()
@_store_options
@click.option("--dry-run", is_flag=True, help="Say what would change, change nothing.")
def compact(cassettes: Path, store: str | None, cassette: str | None, as_json: bool,
            dry_run: bool) -> None:
    """Drop recordings byte-identical to an earlier one of the same fingerprint.

    The first is kept, with the latest time a copy was recorded or verified as its
    verified_at; every fingerprint replays what it replayed before. Files in an older format
    are rewritten in the current one. Sequenced keys are left as they are: their recordings are
    replayed in order, so an equal answer in them is another place, not a copy. Exit 1 when a
    key could not be read.
    """
    spec = store or cassettes
    _existing(spec, "--store" if store else "--cassettes")
    outcome = _on_store(_compact_store(spec, cassette, dry_run, as_json))
    dropped = sum(change.dropped for change in outcome.compacted)
    before = sum(change.bytes_before for change in outcome.compacted)
    after = sum(change.bytes_after for change in outcome.compacted)
    if as_json:
        _echo_json({"store": describe_store(spec), "dry_run": dry_run,
                    "compacted": [change.as_json() for change in outcome.compacted],
                    "dropped": dropped, "bytes_before": before, "bytes_after": after,
                    "sequences_left": outcome.sequences, "refused": outcome.refused})
    else:
        verb = "would compact" if dry_run else "compacted"
        for change in outcome.compacted:
            what = [f"dropped {change.dropped} duplicate recording(s)"] if change.dropped else []
            what += ["rewritten in the current format"] if change.upgraded else []
            click.echo(f"{verb} {change.cassette}/{change.label}-{change.key[:16]}: "
                       f"{', '.join(what)} ({change.bytes_before} -> {change.bytes_after} bytes)")
        if outcome.sequences:
            click.echo(f"left {len(outcome.sequences)} sequenced key(s) as they are: their "
                       "recordings are replayed in order, so an equal answer is another place "
                       "in the sequence, not a copy")
        upgraded = sum(1 for change in outcome.compacted if change.upgraded)
        click.echo(f"{verb} {len(outcome.compacted)} key(s) in {describe_store(spec)}: "
                   f"{dropped} duplicate recording(s) dropped, {upgraded} file(s) upgraded to "
                   f"the current format, {before} -> {after} bytes")
        for reason in outcome.refused:
            click.echo(f"not compacted: {reason}", err=True)
    if outcome.refused:
        sys.exit(1)


@main.command()
@_store_options
@click.option("--since-run", default=None,
              help="Keep keys used by this run or later ones (default: the latest run).")
@click.option("--all", "everywhere", is_flag=True,
              help="Also delete from cassettes those runs did not touch (by default only the "
                   "cassettes whose recordings they consulted are pruned).")
@click.option("--dry-run", is_flag=True, help="List what would be deleted, delete nothing.")
def prune(cassettes: Path, store: str | None, cassette: str | None, as_json: bool,
          since_run: str | None, everywhere: bool, dry_run: bool) -> None:
    """Delete recordings no request used since a given run (see `replay-proxy stats`).

    Only cassettes that run (or a later one) touched are pruned: a run of part of a suite says
    nothing about the cassettes of the tests it did not run. --all prunes every cassette.
    """
    _existing(cassettes, "--cassettes")
    directory = state_dir(cassettes)
    runs = read_runs(directory)
    if not runs:
        raise _Failed(f"No usage recorded under {directory}: run your suite through the proxy "
                      "first, then prune.")
    since = since_run or str(runs[-1]["run"])
    try:
        usage = usage_since(read_usage(directory), runs, since)
    except KeyError as exc:
        raise _Failed(f"Unknown run {since}; `replay-proxy stats` lists runs.") from exc
    items = _items(cassettes, store, cassette)
    unused = [item for item in items if (item.cassette, item.key) not in usage.used
              and (everywhere or item.cassette in usage.touched)]
    left = [] if everywhere else sorted({item.cassette for item in items
                                         if item.cassette not in usage.touched})

    async def delete() -> None:
        backend = open_store(store or cassettes)
        try:
            for item in unused:
                await backend.delete(item.cassette, item.key, item.label)
        finally:
            await backend.close()

    if not dry_run:
        _on_store(delete())
    if as_json:
        _echo_json({"since_run": since, "dry_run": dry_run, "all": everywhere,
                    "deleted": [{"cassette": i.cassette, "key": i.key} for i in unused],
                    "cassettes_left": left})
        return
    verb = "would delete" if dry_run else "deleted"
    for item in unused:
        click.echo(f"{verb} {item.cassette}/{item.label}-{item.key[:16]}")
    click.echo(f"{verb} {len(unused)} key(s) not used since run {since}"
               + ("" if everywhere else " in the cassettes it touched"))
    if left:
        shown = ", ".join(left[:5]) + (", ..." if len(left) > 5 else "")
        click.echo(f"left {len(left)} cassette(s) that run did not touch as they are ({shown}); "
                   "--all prunes them too")


@main.command()
@click.option("--cassettes", type=click.Path(path_type=Path), default=Path("cassettes"),
              show_default=True, help="Root folder of the cassettes.")
@click.option("--cassette", default=None, help="Only this cassette's counters.")
@click.option("--run", "run_id", default=None, help="One run (default: every run, and totals).")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def stats(cassettes: Path, cassette: str | None, run_id: str | None, as_json: bool) -> None:
    """Hits, misses, upstream calls and tokens replayed instead of paid, per run."""
    _existing(cassettes, "--cassettes")
    runs = read_runs(state_dir(cassettes))
    if cassette is not None:
        runs = [{**run, "totals": (run.get("cassettes") or {}).get(cassette, {})}
                for run in runs if cassette in (run.get("cassettes") or {})]
    if run_id is not None:
        runs = [run for run in runs if run.get("run") == run_id]
        if not runs:
            raise click.ClickException(f"Unknown run {run_id}.")
    summed = totals(runs)
    if as_json:
        _echo_json({"runs": runs, "totals": summed})
        return
    columns = ["hits", "misses", "recorded", "upstream_calls", "tokens_replayed"]
    rows = [{"run": run.get("run"), "mode": run.get("mode"),
             **{c: (run.get("totals") or {}).get(c, 0) for c in columns}} for run in runs]
    rows.append({"run": "total", **{c: summed.get(c, 0) for c in columns}})
    click.echo(table(rows, ["run", "mode", *columns]))


def _copy(source: str, target: str, cassette: str | None,
          quiet: bool) -> tuple[int, list[str]]:
    """(keys copied, why each other key was not): one unreadable key stops no other."""
    _existing(source, "--from")
    try:
        store_folder(target)  # an unknown kind of store, refused before anything is read
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--to") from exc

    async def run() -> tuple[int, list[str]]:
        origin, destination = open_store(source), open_store(target)
        copied, refused = 0, []
        try:
            names = await _names(origin, cassette)
            items = [item for name in names for item in await origin.items(name)]
            with _progress(len(items), "copying", quiet) as done:
                for item in items:
                    if item.entry is None:
                        refused.append(item.error.message if item.error
                                       else f"unreadable {item.key}")
                        done()
                        continue
                    try:
                        await destination.put(item.cassette, item.entry)
                    except ProxyError as exc:  # a name the destination will not store under
                        refused.append(exc.message)
                        done()
                        continue
                    copied += 1
                    done()
        finally:
            await origin.close()
            await destination.close()
        return copied, refused

    return _on_store(run())


@main.command("export")
@click.option("--from", "source", default="cassettes", show_default=True,
              help="Store to read: a directory, diskcache:PATH or redis://...")
@click.option("--to", "target", required=True, help="Store to write.")
@click.option("--cassette", default=None, help="Only this cassette.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def export_command(source: str, target: str, cassette: str | None, as_json: bool) -> None:
    """Copy recordings from one store to another, losslessly."""
    _report_copy(source, target, _copy(source, target, cassette, as_json), as_json)


def _report_copy(source: str, target: str, result: tuple[int, list[str]], as_json: bool) -> None:
    copied, refused = result
    if as_json:
        _echo_json({"from": describe_store(source), "to": describe_store(target),
                    "copied": copied, "refused": refused})
    else:
        click.echo(f"copied {copied} key(s) from {describe_store(source)} to "
                   f"{describe_store(target)}")
        for reason in refused:
            click.echo(f"not copied: {reason}", err=True)
    if refused:
        sys.exit(1)


@main.command("import")
@click.option("--from", "source", required=True, help="Store to read.")
@click.option("--to", "target", default="cassettes", show_default=True, help="Store to write.")
@click.option("--cassette", default=None, help="Only this cassette.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def import_command(source: str, target: str, cassette: str | None, as_json: bool) -> None:
    """Copy recordings into a store (by default ./cassettes), losslessly."""
    _report_copy(source, target, _copy(source, target, cassette, as_json), as_json)


def _share_environment() -> None:
    """The options other commands share with serve read the same REPLAY_PROXY_ variables."""
    for name, command in main.commands.items():
        if name in ("serve", "run"):
            continue
        for param in command.params:
            if param.name in SHARED_OPTIONS:
                with_environment(param)


_share_environment()
