"""The `replay-proxy` command: serve the proxy, run the simulator, inspect and manage cassettes."""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import os
import sys
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import click
import orjson
from aiohttp import web

from ..core.canonical import KeyPolicy
from ..core.cassette import Drift, Entry, encode_entry
from ..core.errors import ProxyError
from ..core.modes import Mode, resolve_mode
from ..core.providers import validate_cassette_name
from ..core.routes import SequencePolicy
from ..core.settings import DEFAULT_MAX_BODY, DEFAULT_PORT, OPENAI_UPSTREAM, ReplayTiming, Settings
from ..server import serving
from ..server.usage import last_used, new_run_id, read_runs, read_usage, used_since
from ..store import StoredItem, open_store
from ..store.state_dir import state_dir
from .audit import Upstreams, Verdict
from .audit import probe as probe_upstream
from .audit import verify as verify_entries
from .report import DRIFTS, collapse, drift_rows, ls_row, show_text, table, totals


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="replay-proxy")
def main() -> None:
    """Record OpenAI and Azure OpenAI calls once, replay them forever."""


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _cassette_name(_ctx: click.Context, _param: click.Parameter, value: str) -> str:
    try:
        return validate_cassette_name(value)
    except ProxyError as exc:
        raise click.BadParameter(exc.message) from exc


def _timing(_ctx: click.Context, _param: click.Parameter, value: str) -> ReplayTiming:
    try:
        return ReplayTiming.parse(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from exc


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to bind. Anything but loopback requires --auth-token.")
@click.option("--port", default=DEFAULT_PORT, show_default=True, type=int)
@click.option("--mode", type=click.Choice([m.value for m in Mode]), default="auto",
              show_default=True, help="auto = replay when CI is true, else record.")
@click.option("--cassettes", type=click.Path(path_type=Path), default=Path("cassettes"),
              show_default=True, help="Root folder of the cassettes.")
@click.option("--cassette", "default_cassette", default="default", show_default=True,
              callback=_cassette_name, help="Cassette for requests that name none.")
@click.option("--openai-upstream", default=OPENAI_UPSTREAM, show_default=True)
@click.option("--azure-upstream", envvar="AZURE_OPENAI_ENDPOINT", default=None,
              help="Your Azure OpenAI endpoint [env: AZURE_OPENAI_ENDPOINT].")
@click.option("--store", default=None,
              help="Where recordings live: a directory (default: --cassettes) or diskcache:PATH.")
@click.option("--record-errors", is_flag=True,
              help="Also store non-2xx answers (never 5xx, 429 or timeouts).")
@click.option("--ignore-field", multiple=True, help="Body field left out of the key (repeatable).")
@click.option("--match-field", multiple=True,
              help="Body field put back into the key, e.g. user (repeatable).")
@click.option("--match-header", multiple=True, help="Request header made part of the key.")
@click.option("--max-body", default=DEFAULT_MAX_BODY, show_default=True, type=int,
              help="Largest request body accepted, in bytes (larger: 413).")
@click.option("--fingerprint", default="pinned", show_default=True,
              help="Which recording to replay: pinned, latest, or a system_fingerprint value.")
@click.option("--replay-timing", default="none", show_default=True, callback=_timing,
              help="Stream replay pace: none, recorded, or a speed such as 2x.")
@click.option("--inject-seed", type=int, default=None,
              help="Add seed N to chat/completions requests without one (changes their key).")
@click.option("--openai-api-key", envvar="OPENAI_API_KEY", default=None, show_envvar=True,
              help="Key the proxy sends upstream instead of the client's.")
@click.option("--azure-api-key", envvar="AZURE_OPENAI_API_KEY", default=None, show_envvar=True)
@click.option("--auth-token", envvar="REPLAY_PROXY_AUTH_TOKEN", default=None,
              help="Token clients must present as their API key; required off loopback.")
@click.option("--upstream-timeout", default=600.0, show_default=True, type=float,
              help="Seconds to wait for upstream data before answering 504.")
@click.option("--workers", default=1, show_default=True, type=click.IntRange(1, 64),
              help="Processes serving the same port (SO_REUSEPORT), sharing the store.")
@click.option("--loop", "loop_choice", type=click.Choice(serving.LOOPS), default="auto",
              show_default=True, help="Event loop: auto takes uvloop when it is installed.")
@click.option("--sequence", type=click.Choice([policy.value for policy in SequencePolicy]),
              default=SequencePolicy.STATEFUL.value, show_default=True,
              help="Which keys replay their recordings in order (the n-th identical request gets "
                   "the n-th answer): stateful routes (files, batches, polls, ...), all routes, "
                   "or none.")
def serve(host: str, port: int, mode: str, cassettes: Path, default_cassette: str,
          openai_upstream: str, azure_upstream: str | None, store: str | None,
          record_errors: bool, ignore_field: tuple[str, ...], match_field: tuple[str, ...],
          match_header: tuple[str, ...], max_body: int, fingerprint: str,
          replay_timing: ReplayTiming, inject_seed: int | None, openai_api_key: str | None,
          azure_api_key: str | None, auth_token: str | None, upstream_timeout: float,
          workers: int, loop_choice: str, sequence: str) -> None:
    """Run the proxy."""

    if not _is_loopback(host) and not auth_token:
        raise click.UsageError(
            f"Refusing to bind {host}: off loopback anyone who can reach the port could spend "
            "your API key. Pass --auth-token TOKEN (clients then use TOKEN as their API key), "
            "or bind 127.0.0.1."
        )
    try:
        policy = KeyPolicy.build(ignore_field, match_field, match_header)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--ignore-field") from exc
    settings = Settings(
        cassettes=cassettes, store=store, mode=Mode(mode), default_cassette=default_cassette,
        openai_upstream=openai_upstream, azure_upstream=azure_upstream,
        openai_api_key=openai_api_key, azure_api_key=azure_api_key,
        record_errors=record_errors, key_policy=policy, max_body=max_body,
        fingerprint=fingerprint, replay_timing=replay_timing, inject_seed=inject_seed,
        upstream_timeout=upstream_timeout, auth_token=auth_token,
        sequence=SequencePolicy(sequence), run_id=new_run_id(),
    )
    try:
        asyncio.run(open_store(settings.store_spec).close())  # a bad --store fails here, clearly
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--store") from exc
    try:
        serving.new_event_loop(loop_choice).close()  # a missing uvloop fails here, clearly
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--loop") from exc
    effective = resolve_mode(settings.mode, os.environ)
    click.echo(
        f"replay-proxy listening on http://{host}:{port} (mode {effective.value}"
        f"{' from --mode auto' if settings.mode is Mode.AUTO else ''}, store "
        f"{settings.store_spec}, cassette {default_cassette}"
        f"{f', {workers} workers' if workers > 1 else ''})\n"
        f"  export OPENAI_BASE_URL=http://{host}:{port}/v1",
        err=True,
    )
    if workers == 1:
        _serve_one(settings, host, port, loop_choice)
    else:
        sys.exit(run_workers(settings, host, port, workers, loop_choice))


def _serve_one(settings: Settings, host: str, port: int, loop_choice: str = "auto",
               reuse_port: bool = False) -> None:
    from ..server.handler import ProxyRunner, ReplayProxy

    _run(lambda: ProxyRunner(ReplayProxy(settings)), host, port, loop_choice, reuse_port)


def _run(make_runner: Callable[[], web.BaseRunner], host: str, port: int, loop_choice: str,
         reuse_port: bool = False) -> None:
    try:
        serving.serve(make_runner, host, port, reuse_port, loop_choice)
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            raise click.ClickException(
                f"{host}:{port} is already in use (another replay-proxy?). Stop it or pass "
                "--port N."
            ) from exc
        raise


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8788, show_default=True, type=int)
@click.option("--fingerprint", default="fp_sim_a1b2c3", show_default=True)
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
                loop_choice: str = "auto") -> int:
    """Start `workers` processes on one port; stop them all when one dies or on a signal."""
    import multiprocessing
    import signal

    context = multiprocessing.get_context("spawn")
    processes = [context.Process(target=_serve_one,
                                 args=(settings, host, port, loop_choice, True))
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


def _items(cassettes: Path, store: str | None, cassette: str | None) -> list[StoredItem]:
    async def load() -> list[StoredItem]:
        backend = open_store(store or cassettes)
        try:
            names = [cassette] if cassette else await backend.cassettes()
            found: list[StoredItem] = []
            for name in names:
                found += await backend.items(name)
            return found
        finally:
            await backend.close()

    return asyncio.run(load())


def _one(cassettes: Path, store: str | None, cassette: str | None, prefix: str) -> StoredItem:
    matches = [item for item in _items(cassettes, store, cassette) if item.key.startswith(prefix)]
    if not matches:
        raise click.ClickException(f"No key starts with {prefix!r}; `replay-proxy ls` lists them.")
    if len(matches) > 1:
        shown = ", ".join(f"{m.cassette}/{m.key[:16]}" for m in matches[:5])
        raise click.ClickException(f"{prefix!r} matches {len(matches)} keys ({shown}); give more "
                                   "characters or --cassette.")
    return matches[0]


def _echo_json(value: object) -> None:
    click.echo(orjson.dumps(value, option=orjson.OPT_INDENT_2).decode())


@main.command("ls")
@_store_options
def list_keys(cassettes: Path, store: str | None, cassette: str | None, as_json: bool) -> None:
    """One row per recorded key."""
    used = last_used(read_usage(state_dir(cassettes)))
    rows = [ls_row(item, used) for item in _items(cassettes, store, cassette)]
    if as_json:
        _echo_json(rows)
        return
    for row in rows:
        row["key"] = row["key"][:12]
        if row.get("sequence"):
            row["sequence"] = collapse(row["sequence"])
    click.echo(table(rows, ["cassette", "key", "route", "model", "seed", "temperature",
                            "fingerprints", "recordings", "sequence", "last_used", "size",
                            "error"]))


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
@click.option("--openai-upstream", default=OPENAI_UPSTREAM, show_default=True)
@click.option("--azure-upstream", envvar="AZURE_OPENAI_ENDPOINT", default=None)
@click.option("--openai-api-key", envvar="OPENAI_API_KEY", default=None, show_envvar=True)
@click.option("--azure-api-key", envvar="AZURE_OPENAI_API_KEY", default=None, show_envvar=True)
@click.option("--update", is_flag=True, help="Store each drifted answer as a new recording.")
@click.option("--concurrency", default=4, show_default=True, type=int)
def verify(cassettes: Path, store: str | None, cassette: str | None, as_json: bool,
           openai_upstream: str, azure_upstream: str | None, openai_api_key: str | None,
           azure_api_key: str | None, update: bool, concurrency: int) -> None:
    """Re-send every recorded request upstream; report same or drift per key. Exit 1 on drift."""
    entries = [(i.cassette, i.entry) for i in _items(cassettes, store, cassette) if i.entry]
    upstreams = Upstreams(openai_upstream, azure_upstream, openai_api_key, azure_api_key)
    verdicts = asyncio.run(verify_entries(entries, upstreams, concurrency))
    drifted = [v for v in verdicts if v.result in DRIFTS]
    if update and drifted:
        by_key = {(cassette_name, entry.key): entry for cassette_name, entry in entries}
        asyncio.run(_store_drift(store or cassettes, by_key, drifted))
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
    sys.exit(1 if drifted else 2 if errors else 0)


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
@click.option("--api-key", envvar="OPENAI_API_KEY", required=True, show_envvar=True)
@click.option("--model", required=True)
@click.option("--prompt", required=True)
@click.option("-n", "count", default=5, show_default=True, type=click.IntRange(1, 100))
@click.option("--seed", type=int, default=None)
@click.option("--temperature", type=float, default=None)
@click.option("--max-tokens", type=int, default=None)
@click.option("--json", "as_json", is_flag=True)
def probe(base_url: str, api_key: str, model: str, prompt: str, count: int, seed: int | None,
          temperature: float | None, max_tokens: int | None, as_json: bool) -> None:
    """The cookbook's seed experiment: one request N times at once, straight upstream."""
    try:
        result = asyncio.run(probe_upstream(base_url, api_key, model, prompt, count, seed,
                                            temperature, max_tokens))
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

    asyncio.run(save(replace(item.entry, pinned_fingerprint=wanted)))
    if as_json:
        _echo_json({"cassette": item.cassette, "key": item.key, "pinned": wanted,
                    "previous": item.entry.pinned_fingerprint})
        return
    click.echo(f"pinned {item.cassette}/{item.key[:16]} to {fingerprint} "
               f"(was {item.entry.pinned_fingerprint}); a running proxy picks it up on restart")


@main.command()
@_store_options
@click.option("--since-run", default=None,
              help="Keep keys used by this run or later ones (default: the latest run).")
@click.option("--dry-run", is_flag=True, help="List what would be deleted, delete nothing.")
def prune(cassettes: Path, store: str | None, cassette: str | None, as_json: bool,
          since_run: str | None, dry_run: bool) -> None:
    """Delete recordings that no request used since a given run (see `replay-proxy stats`)."""
    directory = state_dir(cassettes)
    runs = read_runs(directory)
    if not runs:
        raise click.ClickException(f"No usage recorded under {directory}: run your suite through "
                                   "the proxy first, then prune.")
    since = since_run or str(runs[-1]["run"])
    try:
        keep = used_since(read_usage(directory), runs, since)
    except KeyError as exc:
        raise click.ClickException(f"Unknown run {since}; `replay-proxy stats` lists runs.") \
            from exc
    unused = [item for item in _items(cassettes, store, cassette)
              if (item.cassette, item.key) not in keep]

    async def delete() -> None:
        backend = open_store(store or cassettes)
        try:
            for item in unused:
                await backend.delete(item.cassette, item.key, item.label)
        finally:
            await backend.close()

    if not dry_run:
        asyncio.run(delete())
    if as_json:
        _echo_json({"since_run": since, "dry_run": dry_run,
                    "deleted": [{"cassette": i.cassette, "key": i.key} for i in unused]})
        return
    verb = "would delete" if dry_run else "deleted"
    for item in unused:
        click.echo(f"{verb} {item.cassette}/{item.label}-{item.key[:16]}")
    click.echo(f"{verb} {len(unused)} key(s) not used since run {since}")


@main.command()
@click.option("--cassettes", type=click.Path(path_type=Path), default=Path("cassettes"),
              show_default=True)
@click.option("--cassette", default=None, help="Only this cassette's counters.")
@click.option("--run", "run_id", default=None, help="One run (default: every run, and totals).")
@click.option("--json", "as_json", is_flag=True)
def stats(cassettes: Path, cassette: str | None, run_id: str | None, as_json: bool) -> None:
    """Hits, misses, upstream calls and tokens replayed instead of paid, per run."""
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


def _copy(source: str, target: str, cassette: str | None) -> int:
    async def run() -> int:
        origin, destination = open_store(source), open_store(target)
        copied = 0
        try:
            names = [cassette] if cassette else await origin.cassettes()
            for name in names:
                for item in await origin.items(name):
                    if item.entry is None:
                        raise click.ClickException(item.error.message if item.error
                                                   else f"unreadable {item.key}")
                    await destination.put(name, item.entry)
                    copied += 1
        finally:
            await origin.close()
            await destination.close()
        return copied

    return asyncio.run(run())


@main.command("export")
@click.option("--from", "source", default="cassettes", show_default=True,
              help="Store to read: a directory, diskcache:PATH or redis://...")
@click.option("--to", "target", required=True, help="Store to write.")
@click.option("--cassette", default=None, help="Only this cassette.")
@click.option("--json", "as_json", is_flag=True)
def export_command(source: str, target: str, cassette: str | None, as_json: bool) -> None:
    """Copy recordings from one store to another, losslessly."""
    _report_copy(source, target, _copy(source, target, cassette), as_json)


def _report_copy(source: str, target: str, copied: int, as_json: bool) -> None:
    if as_json:
        _echo_json({"from": source, "to": target, "copied": copied})
    else:
        click.echo(f"copied {copied} key(s) from {source} to {target}")


@main.command("import")
@click.option("--from", "source", required=True, help="Store to read.")
@click.option("--to", "target", default="cassettes", show_default=True, help="Store to write.")
@click.option("--cassette", default=None, help="Only this cassette.")
@click.option("--json", "as_json", is_flag=True)
def import_command(source: str, target: str, cassette: str | None, as_json: bool) -> None:
    """Copy recordings into a store (by default ./cassettes), losslessly."""
    _report_copy(source, target, _copy(source, target, cassette), as_json)
