"""One configuration: every option of `replay-proxy serve`, and where its value comes from.

The options are declared once, in `_SERVE_OPTIONS`; `serve` and `run` wear them as one
decorator (`serve_options`), and the pytest plugin turns the same list into `--replay-*`
options and `replay_*` ini keys. A value comes from, first found:

1. the command line: `--mode replay` (pytest: `--replay-mode replay`);
2. the environment: `REPLAY_PROXY_MODE=replay` (space-separated for repeatable options);
3. the configuration file: `[tool.replay-proxy]` in the nearest pyproject.toml, or the nearest
   replay-proxy.toml, walking up from the working directory (`--config FILE` names one);
4. the option's default.

click does the work: each option gets its `REPLAY_PROXY_` variable, and the file becomes the
command's `default_map`, so an option added to `_SERVE_OPTIONS` (with a `Settings` field of the
same name) is configurable everywhere with no further code. Keys in the file are the long option
names, with dashes or underscores; repeatable options take lists; a relative path in the file is
relative to the file's folder.
"""

from __future__ import annotations

import tomllib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, TypeVar

import click

from ..core.canonical import KeyPolicy
from ..core.errors import ProxyError
from ..core.modes import Mode
from ..core.providers import validate_cassette_name
from ..core.routes import SequencePolicy
from ..core.rules import RuleError, Rules
from ..core.settings import (
    DEFAULT_CACHE_MB,
    DEFAULT_HEADER_TIMEOUT,
    DEFAULT_MAX_ANSWER,
    DEFAULT_MAX_BODY,
    DEFAULT_MAX_CONNECTIONS,
    DEFAULT_PORT,
    DEFAULT_UPSTREAM_TOTAL_TIMEOUT,
    OPENAI_UPSTREAM,
    ReplayTiming,
    Settings,
    parse_age,
)

ENV_PREFIX = "REPLAY_PROXY_"
CONFIG_FILE = "replay-proxy.toml"
# The same as server/serving.LOOPS (a test keeps them equal): reading the options must not
# import the server, since the pytest plugin reads them at every start.
LOOPS = ("auto", "uvloop", "asyncio")
LOG_LEVELS = ("debug", "info", "warning", "error")
LOG_FORMATS = ("text", "json")
DUMMY_API_KEY = "sk-replay-proxy-dummy"

# How the proxy process runs, not how it answers: not part of Settings.
PROCESS_OPTIONS = frozenset({"host", "port", "workers", "loop_choice", "log_level", "log_format"})
# The options that build Settings.key_policy.
KEY_POLICY_OPTIONS = ("ignore_field", "match_field", "match_header", "mask", "ignore_path",
                      "redact")
# Options the other commands (ls, verify, ...) share with serve, so one file configures them too.
SHARED_OPTIONS = frozenset({"cassettes", "store", "openai_upstream", "azure_upstream",
                            "openai_api_key", "azure_api_key", "max_age", "redact"})
# Credentials come from the environment only: a configuration file is committed.
SECRET_OPTIONS = frozenset({"openai_api_key", "azure_api_key", "auth_token"})

F = TypeVar("F", bound=Callable[..., Any])


class ConfigError(click.UsageError):
    """A configuration file that cannot be used: exit 2, naming the file and the key."""


def _mode(_ctx: click.Context, _param: click.Parameter, value: str) -> Mode:
    return Mode(value)


def _sequence(_ctx: click.Context, _param: click.Parameter, value: str) -> SequencePolicy:
    return SequencePolicy(value)


def _cassette_name(_ctx: click.Context, _param: click.Parameter, value: str) -> str:
    try:
        return validate_cassette_name(value)
    except ProxyError as exc:
        raise click.BadParameter(exc.message) from exc


def age_option(_ctx: click.Context, _param: click.Parameter, value: str | float | None
         ) -> float | None:
    if value is None or isinstance(value, float):
        return value
    try:
        return parse_age(str(value))
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from exc


def _timing(_ctx: click.Context, _param: click.Parameter, value: str | ReplayTiming
            ) -> ReplayTiming:
    if isinstance(value, ReplayTiming):
        return value
    try:
        return ReplayTiming.parse(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from exc


_SERVE_OPTIONS: tuple[Callable[[Any], Any], ...] = (
    click.option("--host", default="127.0.0.1", show_default=True,
                 help="Address to bind. Anything but loopback requires --auth-token."),
    click.option("--port", default=DEFAULT_PORT, show_default=True, type=int,
                 help="Port to listen on (run: a free port unless given on its command line)."),
    click.option("--mode", type=click.Choice([m.value for m in Mode]), default="auto",
                 show_default=True, callback=_mode,
                 help="record: replay hits, record misses; replay: never reach upstream; "
                      "refresh: record everything again; passthrough: store nothing; "
                      "auto: replay when CI is true, else record."),
    click.option("--cassettes", type=click.Path(path_type=Path), default=Path("cassettes"),
                 show_default=True, help="Root folder of the cassettes."),
    click.option("--cassette", "default_cassette", default="default", show_default=True,
                 callback=_cassette_name, help="Cassette for requests that name none."),
    click.option("--openai-upstream", default=OPENAI_UPSTREAM, show_default=True,
                 help="Where OpenAI requests are forwarded when recording."),
    click.option("--azure-upstream", envvar="AZURE_OPENAI_ENDPOINT", default=None,
                 help="Your Azure OpenAI endpoint, where Azure requests are forwarded."),
    click.option("--store", default=None,
                 help="Where recordings live: a directory (default: --cassettes), "
                      "diskcache:PATH or redis://..."),
    click.option("--record-errors", is_flag=True,
                 help="Also store non-2xx answers (never 5xx, 429 or timeouts)."),
    click.option("--ignore-field", multiple=True,
                 help="Body field left out of the key (repeatable)."),
    click.option("--match-field", multiple=True,
                 help="Body field put back into the key, e.g. user (repeatable)."),
    click.option("--match-header", multiple=True,
                 help="Request header made part of the key (repeatable)."),
    click.option("--mask", multiple=True, metavar="[PATH:]NAME_OR_REGEX[=PLACEHOLDER]",
                 help="Replace what changes every run inside the body's strings before keying: "
                      "iso-date, iso-datetime, uuid, unix-ts, hex-id, tmp-path, or a regex "
                      "(repeatable; 'messages[*].content:iso-date' limits it to a path)."),
    click.option("--ignore-path", multiple=True, metavar="PATH",
                 help="Nested body field left out of the key, e.g. metadata.trace_id or "
                      "messages[*].name (repeatable)."),
    click.option("--redact", multiple=True, metavar="NAME_OR_REGEX",
                 help="Replace matches with [REDACTED] in the key, the stored request and the "
                      "stored answers: email, phone, or a regex (repeatable)."),
    click.option("--max-age", default=None, callback=age_option, metavar="AGE",
                 help="Recordings older than this (30d, 12h, ...) are stale: record mode records "
                      "them again, replay mode still replays them and counts them."),
    click.option("--max-body", default=DEFAULT_MAX_BODY, show_default=True, type=int,
                 help="Largest request body accepted, in bytes (larger: 413)."),
    click.option("--fingerprint", default="pinned", show_default=True,
                 help="Which recording to replay: pinned, latest, or a system_fingerprint "
                      "value."),
    click.option("--replay-timing", default="none", show_default=True, callback=_timing,
                 help="Stream replay pace: none, recorded, or a speed such as 2x."),
    click.option("--inject-seed", type=int, default=None,
                 help="Add seed N to chat/completions requests without one (changes their "
                      "key)."),
    click.option("--openai-api-key", envvar="OPENAI_API_KEY", default=None,
                 help="Key the proxy sends to OpenAI instead of the client's."),
    click.option("--azure-api-key", envvar="AZURE_OPENAI_API_KEY", default=None,
                 help="Key the proxy sends to Azure OpenAI instead of the client's."),
    click.option("--auth-token", default=None,
                 help="Token clients must present as their API key; required off loopback."),
    click.option("--upstream-timeout", default=600.0, show_default=True, type=float,
                 help="Seconds to wait for upstream data before answering 504."),
    click.option("--upstream-total-timeout", default=DEFAULT_UPSTREAM_TOTAL_TIMEOUT,
                 show_default=True, type=click.FloatRange(min=0, min_open=True),
                 help="Seconds one upstream call may take in all, answer included (504 past "
                      "it)."),
    click.option("--max-answer", default=DEFAULT_MAX_ANSWER, show_default=True,
                 type=click.IntRange(min=1),
                 help="Largest answer stored, in bytes; a larger one is passed through, not "
                      "stored."),
    click.option("--cache-mb", default=DEFAULT_CACHE_MB, show_default=True,
                 type=click.IntRange(min=0),
                 help="Memory for cached entries, replies and miss indexes, in MiB (per "
                      "worker)."),
    click.option("--header-timeout", default=DEFAULT_HEADER_TIMEOUT, show_default=True,
                 type=click.FloatRange(min=0, min_open=True),
                 help="Seconds a client may take to send a request's head; then it is closed."),
    click.option("--max-connections", default=DEFAULT_MAX_CONNECTIONS, show_default=True,
                 type=click.IntRange(min=1),
                 help="Open client connections per worker; past it, new ones get a 503."),
    click.option("--workers", default=1, show_default=True, type=click.IntRange(1, 64),
                 help="Processes serving the same port (SO_REUSEPORT), sharing the store."),
    click.option("--loop", "loop_choice", type=click.Choice(LOOPS), default="auto",
                 show_default=True, help="Event loop: auto takes uvloop when it is installed."),
    click.option("--sequence", type=click.Choice([policy.value for policy in SequencePolicy]),
                 default=SequencePolicy.STATEFUL.value, show_default=True, callback=_sequence,
                 help="Which keys replay their recordings in order (the n-th identical "
                      "request gets the n-th answer): stateful routes (files, batches, polls, "
                      "...), all routes, or none."),
    click.option("--log-level", type=click.Choice(LOG_LEVELS), default="warning",
                 show_default=True,
                 help="info: one line per request (method, path, cassette, key, status, ms)."),
    click.option("--log-format", type=click.Choice(LOG_FORMATS), default="text",
                 show_default=True, help="json: one JSON object per line."),
)


# run's own options: also valid in the file, where serve and the pytest plugin ignore them.
_RUN_OPTIONS: tuple[Callable[[Any], Any], ...] = (
    click.option("--allow-misses", is_flag=True,
                 help="Exit with the command's own code even when requests missed their "
                      "recording or a recording could not be stored."),
)


def long_name(param: click.Parameter) -> str:
    """`mode` for `--mode`: the name a configuration key or variable is made from."""
    for option in param.opts:
        if option.startswith("--"):
            return option[2:]
    return (param.name or "").replace("_", "-")


def env_name(param: click.Parameter) -> str:
    return ENV_PREFIX + long_name(param).upper().replace("-", "_")


def with_environment(param: click.Parameter) -> click.Parameter:
    """Give an option its REPLAY_PROXY_<NAME> variable, ahead of any it already reads."""
    if isinstance(param, click.Option):
        own = env_name(param)
        existing = [param.envvar] if isinstance(param.envvar, str) else list(param.envvar or [])
        param.envvar = [own, *(name for name in existing if name != own)]
        param.show_envvar = True
    return param


def serve_options(command: F) -> F:
    """Every option of `serve`, each with its variable: `serve` and `run` both wear this."""
    for option in reversed(_SERVE_OPTIONS):
        command = option(command)
    for param in getattr(command, "__click_params__", []):
        with_environment(param)
    return command


def run_options(command: F) -> F:
    """run's own options, with their variables; `run` wears these and `serve_options`."""
    for option in reversed(_RUN_OPTIONS):
        command = option(command)
    for param in getattr(command, "__click_params__", []):
        with_environment(param)
    return command


def serve_parameters() -> list[click.Parameter]:
    """Fresh copies of serve's options, in the order `--help` shows them."""

    def options() -> None:
        """A holder for the options."""

    return list(reversed(getattr(serve_options(options), "__click_params__", [])))


def file_parameters() -> list[click.Parameter]:
    """Every option a configuration file may set: serve's and run's."""

    def options() -> None:
        """A holder for the options."""

    return [*serve_parameters(),
            *reversed(getattr(run_options(options), "__click_params__", []))]


def unplumbed(params: Iterable[click.Parameter]) -> list[str]:
    """Options that neither build Settings nor run the process: a new option forgotten."""
    known = {f.name for f in fields(Settings)} | PROCESS_OPTIONS | set(KEY_POLICY_OPTIONS)
    return [str(param.name) for param in params if param.name not in known]


def settings_from(params: Mapping[str, Any], **fixed: Any) -> Settings:
    """Settings from resolved option values: an option named like a Settings field fills it."""
    names = {f.name for f in fields(Settings)}
    values = {name: value for name, value in params.items() if name in names}
    try:
        ignore, match, headers, masks, paths, redactions = (
            tuple(params.get(name) or ()) for name in KEY_POLICY_OPTIONS)
        rules = Rules.parse(masks, paths, redactions)
        policy = KeyPolicy.build(ignore, match, headers, rules, params.get("normalise"))
    except RuleError as exc:
        raise click.BadParameter(str(exc)) from exc
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--ignore-field") from exc
    return Settings(**{**values, "key_policy": policy, **fixed})


# ---- the configuration file ------------------------------------------------------------------

@dataclass(frozen=True)
class ConfigFile:
    path: Path
    values: Mapping[str, Any]

    @property
    def where(self) -> str:
        if self.path.name == "pyproject.toml":
            return f"[tool.replay-proxy] in {self.path}"
        return str(self.path)


def find_config(start: Path) -> ConfigFile | None:
    """The nearest replay-proxy.toml, or pyproject.toml with [tool.replay-proxy], from `start` up."""
    folder = start.resolve()
    for candidate in (folder, *folder.parents):
        own = candidate / CONFIG_FILE
        if own.is_file():
            return read_config(own)
        project = candidate / "pyproject.toml"
        if project.is_file():
            found = read_config(project, required=False)
            if found is not None:
                return found
    return None


def read_config(path: Path, required: bool = True) -> ConfigFile | None:
    """A file's [tool.replay-proxy] table; a file other than pyproject.toml may instead hold
    the options at its top level."""
    try:
        document = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"Cannot read the configuration file {path}: {exc.strerror}.") from exc
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path} is not valid TOML: {exc}.") from exc
    tool = document.get("tool")
    table = tool.get("replay-proxy") if isinstance(tool, dict) else None
    if table is None and path.name != "pyproject.toml":
        table = document
    if table is None:
        if required:
            raise ConfigError(f"{path} has no [tool.replay-proxy] table.")
        return None
    if not isinstance(table, dict):
        raise ConfigError(f"{path}: tool.replay-proxy must be a table of options.")
    return ConfigFile(path.resolve(), table)


def options_by_key(params: Iterable[click.Parameter]) -> dict[str, click.Option]:
    return {long_name(param): param for param in params if isinstance(param, click.Option)}


def normalise_key(key: str) -> str:
    return key.strip().replace("_", "-")


def checked_defaults(params: Iterable[click.Parameter], values: Mapping[str, Any], where: str,
                     base: Path | None) -> dict[str, Any]:
    """`values` (keys: long option names) as a click default_map (keys: parameter names),
    each checked now so that a bad one is an error naming `where` and the key."""
    by_key = options_by_key(params)
    command = click.Command("replay-proxy", params=list(by_key.values()))
    context = click.Context(command)
    defaults: dict[str, Any] = {}
    for key, value in values.items():
        option = by_key.get(normalise_key(str(key)))
        if option is None or option.name is None:
            known = ", ".join(sorted(by_key))
            raise ConfigError(f"{where}: unknown key {key!r}. The keys are the long names of "
                              f"replay-proxy serve's options: {known}.")
        if option.name in SECRET_OPTIONS:
            raise ConfigError(f"{where}: key {key!r} is a credential, and configuration is "
                              f"committed: set {env_name(option)} in the environment instead.")
        value = _shaped(option, value, f"{where}: key {key!r}")
        if base is not None and isinstance(option.type, click.Path):
            value = ([_relative_to(base, item) for item in value] if option.multiple
                     else _relative_to(base, value))
        elif base is not None and option.name == "store" and isinstance(value, str):
            value = _store_relative_to(base, value)
        try:
            option.process_value(context, value)
        except click.BadParameter as exc:
            raise ConfigError(f"{where}: key {key!r}: {exc.message}") from exc
        defaults[option.name] = value
    return defaults


def _shaped(option: click.Option, value: Any, where: str) -> Any:
    if option.multiple:
        if isinstance(value, str):
            return [value]
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{where} takes a list of values, e.g. [\"a\", \"b\"].")
        return list(value)
    if isinstance(value, list | tuple | dict):
        raise ConfigError(f"{where} takes one value, not {type(value).__name__}.")
    return value


def _relative_to(base: Path, value: Any) -> str:
    path = Path(str(value)).expanduser()
    return str(path if path.is_absolute() else base / path)


def _store_relative_to(base: Path, spec: str) -> str:
    """A store's folder (a directory, or diskcache:PATH) is a path too; a URL is not."""
    if "://" in spec:
        return spec
    if spec.startswith("diskcache:"):
        return "diskcache:" + _relative_to(base, spec.removeprefix("diskcache:"))
    return _relative_to(base, spec)


CASSETTE_RULES = "cassette-rules"
_RULE_KEYS = {"mask": "masks", "ignore-path": "ignore_paths", "redact": "redactions"}


def cassette_rules_from(config: ConfigFile | None) -> tuple[tuple[str, Rules], ...]:
    """`[tool.replay-proxy.cassette-rules."NAME"]` tables: matching rules (mask, ignore-path,
    redact) that apply to one cassette's requests, on top of the shared ones."""
    if config is None:
        return ()
    tables = next((value for key, value in config.values.items()
                   if normalise_key(str(key)) == CASSETTE_RULES), None)
    if tables is None:
        return ()
    where = f"{config.where}: {CASSETTE_RULES}"
    if not isinstance(tables, dict):
        raise ConfigError(f'{where} is a table of cassettes: [tool.replay-proxy.cassette-rules.'
                          f'"suite/name"] with mask, ignore-path or redact lists.')
    found = []
    for cassette, table in tables.items():
        try:
            validate_cassette_name(str(cassette))
        except ProxyError as exc:
            raise ConfigError(f"{where}: {exc.message}") from exc
        if not isinstance(table, dict):
            raise ConfigError(f"{where}.{cassette!r} is a table of mask, ignore-path and redact.")
        lists: dict[str, list[str]] = {}
        for key, value in table.items():
            name = _RULE_KEYS.get(normalise_key(str(key)))
            if name is None:
                raise ConfigError(f"{where}.{cassette!r}: unknown key {key!r}; a cassette's "
                                  "rules are mask, ignore-path and redact.")
            values = [value] if isinstance(value, str) else value
            if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
                raise ConfigError(f"{where}.{cassette!r}: {key!r} takes a list of strings.")
            lists[name] = values
        try:
            found.append((str(cassette), Rules.parse(**lists)))
        except RuleError as exc:
            raise ConfigError(f"{where}.{cassette!r}: {exc}") from exc
    return tuple(found)


def default_maps(config: ConfigFile | None,
                 commands: Mapping[str, Iterable[click.Parameter]]) -> dict[str, Any]:
    """click's default_map for a group: each command gets the file's values it takes. `serve` and
    `run` take every key; the others (ls, verify, ...) only those in SHARED_OPTIONS. A key no
    command of the two takes is an error."""
    if config is None:
        return {}
    full = {name: list(params) for name, params in commands.items() if name in ("serve", "run")}
    known = [param for params in full.values() for param in params]
    options = {key: value for key, value in config.values.items()
               if normalise_key(str(key)) != CASSETTE_RULES}
    checked = checked_defaults(known, options, config.where, config.path.parent)
    maps: dict[str, Any] = {}
    for name, params in commands.items():
        taken = {param.name for param in params}
        maps[name] = {key: value for key, value in checked.items() if key in taken
                      and (name in full or key in SHARED_OPTIONS)}
    return maps
