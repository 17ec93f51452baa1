"""The `replay-proxy` command: serve the proxy, run the simulator, inspect and manage cassettes."""

from __future__ import annotations

import errno
import ipaddress
import os
import sys
from pathlib import Path

import click
from aiohttp import web

from .canonical import KeyPolicy
from .config import DEFAULT_MAX_BODY, DEFAULT_PORT, OPENAI_UPSTREAM, ReplayTiming, Settings
from .errors import ProxyError
from .modes import Mode, resolve_mode
from .providers import validate_cassette_name


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
def serve(host: str, port: int, mode: str, cassettes: Path, default_cassette: str,
          openai_upstream: str, azure_upstream: str | None, store: str | None,
          record_errors: bool, ignore_field: tuple[str, ...], match_field: tuple[str, ...],
          match_header: tuple[str, ...], max_body: int, fingerprint: str,
          replay_timing: ReplayTiming, inject_seed: int | None, openai_api_key: str | None,
          azure_api_key: str | None, auth_token: str | None, upstream_timeout: float) -> None:
    """Run the proxy."""
    from .server import create_app

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
    )
    effective = resolve_mode(settings.mode, os.environ)
    app = create_app(settings)
    click.echo(
        f"replay-proxy listening on http://{host}:{port} (mode {effective.value}"
        f"{' from --mode auto' if settings.mode is Mode.AUTO else ''}, store "
        f"{settings.store_spec}, cassette {default_cassette})\n"
        f"  export OPENAI_BASE_URL=http://{host}:{port}/v1",
        err=True,
    )
    _run(app, host, port)


def _run(app: web.Application, host: str, port: int) -> None:
    try:
        web.run_app(app, host=host, port=port, access_log=None, print=None)
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
    _run(create_simulator(state), host, port)


if __name__ == "__main__":
    sys.exit(main())
