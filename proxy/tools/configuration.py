"""One configuration: every option of `replay-proxy serve`, and where its value comes from.

The options are declared once, as plain data, in `options.SERVE_OPTIONS`; here they become click
options, which `serve` and `run` wear as one decorator (`serve_options`), and the pytest plugin
turns the same table into `--replay-*` options and `replay_*` ini keys. A value comes from,
first found:

1. the command line: `--mode replay` (pytest: `--replay-mode replay`);
2. the environment: `REPLAY_PROXY_MODE=replay` (space-separated for repeatable options);
3. the configuration file: `[tool.replay-proxy]` in the nearest pyproject.toml, or the nearest
   replay-proxy.toml, walking up from the working directory (`--config FILE` names one);
4. the option's default.

click does the work: each option gets its `REPLAY_PROXY_` variable, and the file becomes the
command's `default_map`, so an option added to `SERVE_OPTIONS` (with a `Settings` field of the
same name) is configurable everywhere with no further code. Keys in the file are the long option
names, with dashes or underscores; repeatable options take lists; a relative path in the file is
relative to the file's folder.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import fields
from pathlib import Path
from typing import Any, TypeVar

import click

from ..core.canonical import KeyPolicy
from ..core.errors import ProxyError
from ..core.explain import PYTEST_OPTIONS
from ..core.modes import Mode
from ..core.providers import validate_cassette_name
from ..core.routes import SequencePolicy
from ..core.rules import RuleError, Rules
from ..core.settings import ReplayTiming, Settings, parse_age
from . import config_file
from .config_file import CONFIG_FILE, ConfigFile, ConfigFileError, normalise_key
from .options import (
    DUMMY_API_KEY,
    ENV_PREFIX,
    KEY_POLICY_OPTIONS,
    LOG_FORMATS,
    LOG_LEVELS,
    LOOPS,
    NOT_FOR_PYTEST,
    PROCESS_OPTIONS,
    RUN_OPTIONS,
    SECRET_OPTIONS,
    SERVE_OPTIONS,
    SHARED_OPTIONS,
    OptionSpec,
    PytestInputs,
)

__all__ = [
    "CONFIG_FILE", "DUMMY_API_KEY", "ENV_PREFIX", "LOG_FORMATS", "LOG_LEVELS", "LOOPS",
    "PROCESS_OPTIONS", "SECRET_OPTIONS", "SHARED_OPTIONS", "ConfigError", "ConfigFile",
    "checked_defaults", "default_maps", "env_name", "file_parameters", "find_config",
    "long_name", "plugin_settings", "read_config", "run_options", "serve_options",
    "serve_parameters", "settings_from", "unplumbed", "with_environment",
]

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


_CONVERSIONS: dict[str, Callable[[click.Context, click.Parameter, Any], Any]] = {
    "mode": _mode, "sequence": _sequence, "timing": _timing, "cassette": _cassette_name,
    "age": age_option,
}


def _click_type(spec: OptionSpec) -> click.ParamType[Any, Any] | None:
    bounded = spec.low is not None or spec.high is not None
    if spec.kind == "int":
        low, high = (None if bound is None else int(bound) for bound in (spec.low, spec.high))
        return click.IntRange(low, high, min_open=spec.low_open) if bounded else click.INT
    if spec.kind == "float":
        return (click.FloatRange(spec.low, spec.high, min_open=spec.low_open) if bounded
                else click.FLOAT)
    if spec.kind == "path":
        return click.Path(path_type=Path)
    if spec.choices:
        return click.Choice(spec.choices)
    return None


def click_option(spec: OptionSpec) -> click.Option:
    """The click option of one row of the table."""
    default: Any = Path(str(spec.default)) if spec.kind == "path" else spec.default
    return click.Option(
        [spec.flag, spec.name], type=_click_type(spec), default=default,
        is_flag=spec.is_flag or None, multiple=spec.multiple, help=spec.help,
        show_default=spec.show_default or None, envvar=spec.envvar, metavar=spec.metavar,
        callback=_CONVERSIONS.get(spec.kind),
    )


def _decorated(command: F, specs: Iterable[OptionSpec]) -> F:
    params = [with_environment(click_option(spec)) for spec in specs]
    # What click.option does: the decorator collects parameters in reverse order.
    existing = getattr(command, "__click_params__", [])
    command.__click_params__ = existing + list(reversed(params))  # type: ignore[attr-defined]
    return command


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
    return _decorated(command, SERVE_OPTIONS)


def run_options(command: F) -> F:
    """run's own options, with their variables; `run` wears these and `serve_options`."""
    return _decorated(command, RUN_OPTIONS)


def serve_parameters() -> list[click.Parameter]:
    """Fresh copies of serve's options, in the order `--help` shows them."""
    return [with_environment(click_option(spec)) for spec in SERVE_OPTIONS]


def file_parameters() -> list[click.Parameter]:
    """Every option a configuration file may set: serve's and run's."""
    return [*serve_parameters(),
            *(with_environment(click_option(spec)) for spec in RUN_OPTIONS)]


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


# ---- the pytest plugin's options ----------------------------------------------------------

def pytest_specs() -> list[OptionSpec]:
    """serve's options as far as they apply in pytest, credentials included (they come from
    the environment only: the plugin gives them no flag and no ini key)."""
    return [spec for spec in SERVE_OPTIONS if spec.name not in NOT_FOR_PYTEST]


def plugin_settings(inputs: PytestInputs, replay_config: Mapping[str, Any]
                    ) -> tuple[Settings, str]:
    """(Settings, log level) for pytest tests with this `replay_config`: the command line, then
    the environment, then `replay_config`, the ini file, [tool.replay-proxy], and serve's
    defaults. A bad value raises a click exception that names where it came from."""
    import os

    options = [with_environment(click_option(spec)) for spec in pytest_specs()]
    applies = {option.name for option in options}
    invocation = Path(inputs.invocation_dir)
    try:
        file = config_file.named_or_found(invocation, os.environ)
    except ConfigFileError as exc:
        raise ConfigError(str(exc)) from exc
    # The file is checked as the command checks it; options that make no sense in pytest
    # (port, workers, allow_misses, ...) are then left out.
    file_defaults = (checked_defaults(file_parameters(), file.values, file.where,
                                      file.path.parent) if file is not None else {})
    file_defaults = {name: value for name, value in file_defaults.items() if name in applies}
    ini_defaults = checked_defaults(options, dict(inputs.ini),
                                    f"the pytest ini file {inputs.ini_file}",
                                    Path(inputs.ini_base))
    own = checked_defaults(options, replay_config, "replay_config", invocation)
    command = click.Command("pytest", params=options)
    context = command.make_context("pytest", list(inputs.args),
                                   default_map={**file_defaults, **ini_defaults, **own})
    params = dict(context.params)
    if context.get_parameter_source("cassettes") is click.core.ParameterSource.DEFAULT:
        params["cassettes"] = Path(inputs.rootdir) / "cassettes"
    params["cassettes"] = invocation / params["cassettes"]
    settings = settings_from(params, option_spelling=PYTEST_OPTIONS, run_id=inputs.run_id)
    return settings, str(params["log_level"])


# ---- the configuration file ------------------------------------------------------------------

def find_config(start: Path) -> ConfigFile | None:
    """The nearest replay-proxy.toml, or pyproject.toml with [tool.replay-proxy], from `start`
    up; one that cannot be used is a usage error naming it."""
    try:
        return config_file.find_config(start)
    except ConfigFileError as exc:
        raise ConfigError(str(exc)) from exc


def read_config(path: Path, required: bool = True) -> ConfigFile | None:
    """A file's [tool.replay-proxy] table (or, outside pyproject.toml, its top level)."""
    try:
        return config_file.read_config(path, required)
    except ConfigFileError as exc:
        raise ConfigError(str(exc)) from exc


def options_by_key(params: Iterable[click.Parameter]) -> dict[str, click.Option]:
    return {long_name(param): param for param in params if isinstance(param, click.Option)}


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
            known = ", ".join(sorted(name for name, found in by_key.items()
                                     if found.name not in SECRET_OPTIONS))
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
    tables = config.value(CASSETTE_RULES)
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
