"""pytest plugin: every test gets its own cassette through one in-process replay-proxy.

Installed with the package (entry point `pytest11`). Mark a test with `@pytest.mark.replay` (or
use the `replay_proxy` fixture) and unchanged application code talks to the proxy: the mark sets
OPENAI_BASE_URL and AZURE_OPENAI_ENDPOINT for the test. A replay miss fails the test with the
explanation of what differed.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import uuid
from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import pytest

from ..core.modes import Mode, resolve_mode
from ..core.settings import Settings
from ..server.state import CassetteOptions
from .testing import ProxyThread

DUMMY_API_KEY = "sk-replay-proxy-dummy"  # configuration.DUMMY_API_KEY, without importing click

_PROXIES_KEY = pytest.StashKey[dict[Settings, "ProxyThread"]]()
_OPTIONS_KEY = pytest.StashKey["SessionOptions"]()
_SESSION_KEY = pytest.StashKey["ReplaySession"]()
_TOTALS_KEY = pytest.StashKey[Counter[str]]()
_WORKER_USED_KEY = pytest.StashKey[set[str]]()
_UNSAFE = re.compile(r"[^A-Za-z0-9_.=+-]+")
_MAX_CASSETTE_NAME = 255
# serve's options that make no sense for a proxy inside pytest: it listens on a free loopback
# port, needs no token, gives each test its own cassette, and pytest shows its log.
_NOT_FOR_PYTEST = frozenset({"host", "port", "workers", "loop_choice", "auth_token",
                             "default_cassette", "log_format"})
_DEFAULTS_SHOWN = {"cassettes": "<rootdir>/cassettes"}
# Credentials are read from the environment only (OPENAI_API_KEY, ...): no flag, no ini key.
_FROM_ENVIRONMENT_ONLY = frozenset({"openai_api_key", "azure_api_key"})


def _serve_options() -> list[Any]:
    """serve's options (click.Option objects), as far as they apply in pytest."""
    from .configuration import serve_parameters

    return [param for param in serve_parameters()
            if param.name not in _NOT_FOR_PYTEST and param.opts and param.opts[0][:2] == "--"]


def _dest(option: Any) -> str:
    """`replay_openai_upstream` for `--openai-upstream` (and `replay_timing` for
    `--replay-timing`): the pytest dest and the ini key."""
    from .configuration import long_name

    return "replay_" + long_name(option).removeprefix("replay-").replace("-", "_")


def _with_flags(options: list[Any]) -> list[Any]:
    return [option for option in options if option.name not in _FROM_ENVIRONMENT_ONLY]


def pytest_addoption(parser: pytest.Parser) -> None:
    # The same option list as `replay-proxy serve`: an option added there appears here.
    group = parser.getgroup("replay-proxy", "record and replay OpenAI calls (replay-proxy)")
    for option in _with_flags(_serve_options()):
        dest = _dest(option)
        flag = "--" + dest.replace("_", "-")
        default = _DEFAULTS_SHOWN.get(option.name, option.default)
        help_text = option.help or ""
        if not option.is_flag and isinstance(default, str | int | float | Path):
            help_text += f" (default: {default})"
        help_text += f" [ini: {dest}; env: {option.envvar[0]}]"
        if option.is_flag:
            group.addoption(flag, dest=dest, action="store_const", const=True, default=None,
                            help=help_text)
        elif option.multiple:
            group.addoption(flag, dest=dest, action="append", default=None, metavar="VALUE",
                            help=help_text + " (repeatable)")
        else:
            group.addoption(flag, dest=dest, default=None, metavar="VALUE", help=help_text)
        ini_type: Literal["linelist", "bool", "string"] = (
            "linelist" if option.multiple else "bool" if option.is_flag else "string")
        parser.addini(dest, option.help or "", type=ini_type, default=None)


@dataclass(frozen=True)
class SessionOptions:
    """Where this session's options come from, below the per-test `replay_config`: the
    command line (as serve's arguments), the ini file and [tool.replay-proxy]."""

    args: tuple[str, ...]
    file_defaults: dict[str, Any]
    ini_defaults: dict[str, Any]
    settings: Settings


def _session_options(config: pytest.Config) -> SessionOptions:
    from .configuration import (
        ConfigError,
        checked_defaults,
        file_parameters,
        find_config,
        read_config,
    )

    options = _serve_options()
    applies = {option.name for option in options}
    args: list[str] = []
    ini: dict[str, Any] = {}
    for option in _with_flags(options):
        dest, flag = _dest(option), option.opts[0]
        given = config.getoption(dest)
        if given is not None:
            values = given if option.multiple else [given]
            for value in values:
                args += [flag] if option.is_flag else [flag, _absolute(option, value, config)]
        value = config.getini(dest)
        if value not in (None, "", []):
            ini[flag[2:]] = value
    try:
        named = os.environ.get("REPLAY_PROXY_CONFIG")
        file = (read_config(Path(named)) if named
                else find_config(config.invocation_params.dir))
        # The file is checked as the command checks it; options that make no sense in pytest
        # (port, workers, allow_misses, ...) are then left out.
        file_defaults = (checked_defaults(file_parameters(), file.values, file.where,
                                          file.path.parent) if file is not None else {})
        file_defaults = {name: value for name, value in file_defaults.items()
                         if name in applies}
        ini_base = config.inipath.parent if config.inipath else config.rootpath
        ini_defaults = checked_defaults(options, ini, f"the pytest ini file {config.inipath}",
                                        ini_base)
    except ConfigError as exc:
        raise pytest.UsageError(f"replay-proxy: {exc.format_message()}") from exc
    partial = SessionOptions(tuple(args), file_defaults, ini_defaults, Settings())
    return replace(partial, settings=_resolve(config, partial, {}))


def _absolute(option: Any, value: str, config: pytest.Config) -> str:
    """A path given on pytest's command line is relative to where pytest was started, even if
    a test changes the working directory."""
    import click

    if isinstance(option.type, click.Path):
        return str(config.invocation_params.dir / Path(value).expanduser())
    return value


def _resolve(config: pytest.Config, session: SessionOptions,
             replay_config: Mapping[str, Any]) -> Settings:
    """Settings for tests with this `replay_config`: the command line, then the environment,
    then `replay_config`, the ini file, [tool.replay-proxy], and serve's defaults."""
    import click

    from ..core.explain import PYTEST_OPTIONS
    from .configuration import ConfigError, checked_defaults, settings_from

    options = _serve_options()
    try:
        own = checked_defaults(options, replay_config, "replay_config",
                               config.invocation_params.dir)
        defaults = {**session.file_defaults, **session.ini_defaults, **own}
        command = click.Command("pytest", params=options)
        context = command.make_context("pytest", list(session.args), default_map=defaults)
        params = dict(context.params)
        if context.get_parameter_source("cassettes") is click.core.ParameterSource.DEFAULT:
            params["cassettes"] = config.rootpath / "cassettes"
        params["cassettes"] = config.invocation_params.dir / params["cassettes"]
        settings = settings_from(params, option_spelling=PYTEST_OPTIONS)
    except (ConfigError, click.ClickException) as exc:
        names = "--replay-* options, REPLAY_PROXY_* variables or replay_* ini keys"
        raise pytest.UsageError(f"replay-proxy ({names}): {exc.format_message()}") from exc
    level = params.get("log_level")
    if level is not None and context.get_parameter_source("log_level") is not \
            click.core.ParameterSource.DEFAULT:
        logging.getLogger("replay_proxy").setLevel(str(level).upper())
    return settings


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "replay(cassette=None, fingerprint=None, mode=None): run the test through replay-proxy "
        "with its own cassette; sets OPENAI_BASE_URL and AZURE_OPENAI_ENDPOINT",
    )
    config.stash[_OPTIONS_KEY] = _session_options(config)
    config.stash[_PROXIES_KEY] = {}
    config.stash[_TOTALS_KEY] = Counter()


def _settings(config: pytest.Config) -> Settings:
    return config.stash[_OPTIONS_KEY].settings


def _proxy(config: pytest.Config, settings: Settings) -> ProxyThread:
    """The proxy for these settings, started on first use on a free loopback port: one for the
    session, and one more for each different `replay_config`."""
    proxies = config.stash[_PROXIES_KEY]
    if settings not in proxies:
        from ..server.handler import ReplayProxy

        proxy = ProxyThread(lambda: ReplayProxy(settings, dict(os.environ)))
        proxy.start()
        proxies[settings] = proxy
    return proxies[settings]


def pytest_unconfigure(config: pytest.Config) -> None:
    for proxy in config.stash.get(_PROXIES_KEY, {}).values():
        proxy.stop()


@dataclass
class ReplaySession:
    """What the `replay_proxy` fixture yields: where to point clients and what happened."""

    proxy: ProxyThread
    cassette: str
    mode: Mode
    _before: Counter[str]
    # Each test is a session of its own: a sequence (a create, then polls) starts at its first
    # recording in every test, whatever ran before.
    session: str = field(default_factory=lambda: "test-" + uuid.uuid4().hex[:16])

    @property
    def url(self) -> str:
        return f"{self.proxy.url}/s/{self.session}/c/{self.cassette}"

    @property
    def base_url(self) -> str:
        """OpenAI-style base URL, `/v1` included."""
        return self.url + "/v1"

    @property
    def azure_endpoint(self) -> str:
        return self.url

    def _count(self, name: str) -> int:
        self.proxy.call(self.proxy.state.flights.drain())  # answers already sent may be storing
        counts = self.proxy.state.by_cassette.get(self.cassette, Counter())
        return counts[name] - self._before[name]

    @property
    def hits(self) -> int:
        return self._count("hits")

    @property
    def misses(self) -> int:
        return self._count("misses")

    @property
    def recordings(self) -> int:
        return self._count("recorded")

    @property
    def upstream_calls(self) -> int:
        return self._count("upstream_calls")

    def last_miss(self) -> str | None:
        return self.proxy.state.last_miss.get(self.cassette)


def cassette_for(item: pytest.Item) -> str:
    """The test's own cassette, named after its node id: the folder under the rootdir, the
    module, the class, then the test (`tests/a/test_x.py::TestA::test_call[1]` ->
    `tests/a/test_x/TestA/test_call-1`), so that two tests can never share one by accident."""
    path, *names = item.nodeid.split("::")
    parts = [*path.removesuffix(".py").split("/"), *names]
    segments = [_segment(part) for part in parts if _segment(part)] or ["test"]
    name = "/".join(segments)
    if len(name) > _MAX_CASSETTE_NAME:  # keep it unique while it fits a folder name
        digest = hashlib.sha256(item.nodeid.encode()).hexdigest()[:12]
        name = name[: _MAX_CASSETTE_NAME - 13].rstrip("/.-") + "-" + digest
    return name


def _segment(part: str) -> str:
    """A part of a node id as a cassette name segment: safe characters, no leading dot."""
    return _UNSAFE.sub("-", part).strip("-").lstrip(".-")[:128].rstrip(".-")


@pytest.fixture
def replay_config() -> dict[str, Any]:
    """Options for the tests in this fixture's scope, as in [tool.replay-proxy]: override it in
    a conftest.py to configure a directory, e.g. `return {"ignore_field": ["user"]}`. The
    command line and REPLAY_PROXY_* variables still win; a mark's mode wins over all."""
    return {}


@pytest.fixture
def replay_proxy(request: pytest.FixtureRequest) -> Iterator[ReplaySession]:
    marker = request.node.get_closest_marker("replay")
    options: dict[str, Any] = dict(marker.kwargs) if marker else {}
    unknown = set(options) - {"cassette", "fingerprint", "mode"}
    if unknown:
        raise pytest.UsageError(f"@pytest.mark.replay got unknown arguments {sorted(unknown)}")
    proxy = _proxy(request.config, _settings_for(request))
    cassette = options.get("cassette") or cassette_for(request.node)
    mode = Mode(options["mode"]) if options.get("mode") else proxy.state.mode
    mode = resolve_mode(mode, os.environ)
    overrides = CassetteOptions(mode, options.get("fingerprint"))
    proxy.invoke(lambda: proxy.state.set_override(cassette, overrides))
    before = Counter(proxy.state.by_cassette.get(cassette, Counter()))
    proxy.state.last_miss.pop(cassette, None)
    session = ReplaySession(proxy, cassette, mode, before)
    request.node.stash[_SESSION_KEY] = session
    try:
        yield session
    finally:
        totals = request.config.stash[_TOTALS_KEY]
        for name in ("hits", "misses", "recorded", "upstream_calls"):
            totals[name] += session._count(name)
        totals["tests"] += 1


def _settings_for(request: pytest.FixtureRequest) -> Settings:
    overrides = request.getfixturevalue("replay_config")
    if not isinstance(overrides, Mapping):
        raise pytest.UsageError(f"replay_config must return a dict of options, not "
                                f"{type(overrides).__name__}")
    session = request.config.stash[_OPTIONS_KEY]
    if not overrides:
        return session.settings
    return _resolve(request.config, session, overrides)


@pytest.fixture(autouse=True)
def _replay_environment(request: pytest.FixtureRequest,
                        monkeypatch: pytest.MonkeyPatch) -> None:
    if request.node.get_closest_marker("replay") is None:
        return
    session: ReplaySession = request.getfixturevalue("replay_proxy")
    monkeypatch.setenv("OPENAI_BASE_URL", session.base_url)
    monkeypatch.setenv("AZURE_OPENAI_ENDPOINT", session.azure_endpoint)
    if session.mode is Mode.REPLAY:
        for name in ("OPENAI_API_KEY", "AZURE_OPENAI_API_KEY"):
            if not os.environ.get(name):
                monkeypatch.setenv(name, DUMMY_API_KEY)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Iterator[None]:
    """A replay miss fails the test with the proxy's explanation, whatever the code did."""
    try:
        result = yield
    except BaseException:
        explanation = _miss_explanation(item)
        if explanation is not None:
            # The client's own error (often a bare 404) says less than the explanation.
            raise pytest.fail.Exception(explanation, pytrace=False) from None
        raise
    explanation = _miss_explanation(item)
    if explanation is not None:
        pytest.fail(explanation, pytrace=False)
    return result


def _miss_explanation(item: pytest.Item) -> str | None:
    session = item.stash.get(_SESSION_KEY, None)
    if session is None or session.misses == 0:
        return None
    return (f"replay-proxy: {session.misses} request(s) had no recording in cassette "
            f"'{session.cassette}' (mode {session.mode.value}).\n{session.last_miss()}")


def pytest_sessionfinish(session: pytest.Session) -> None:
    config = session.config
    workeroutput = getattr(config, "workeroutput", None)
    if workeroutput is not None:
        totals: Counter[str] = config.stash[_TOTALS_KEY]
        workeroutput["replay_proxy"] = dict(totals)
        workeroutput["replay_proxy_used"] = sorted(_used(config))


def _used(config: pytest.Config) -> set[str]:
    used = set()
    for proxy in config.stash.get(_PROXIES_KEY, {}).values():
        usage = proxy.state.usage
        used |= {f"{c}\x1f{k}" for c, k in usage.seen} if usage is not None else set()
    return used


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node: Any, error: Any) -> None:
    output = getattr(node, "workeroutput", {})
    config = node.config
    totals: Counter[str] = config.stash[_TOTALS_KEY]
    totals.update(output.get("replay_proxy", {}))
    used: set[str] = config.stash.setdefault(_WORKER_USED_KEY, set())
    used.update(output.get("replay_proxy_used", []))


def pytest_terminal_summary(terminalreporter: Any, config: pytest.Config) -> None:
    totals = config.stash[_TOTALS_KEY]
    if getattr(config, "workeroutput", None) is not None or not totals.get("tests"):
        return
    worker_used: set[str] = config.stash.get(_WORKER_USED_KEY, set())
    used = _used(config) | worker_used
    unused = _unused_recordings(_settings(config).cassettes, used)
    terminalreporter.section("replay-proxy")
    terminalreporter.write_line(
        f"{totals['tests']} test(s) through the proxy: {totals['hits']} hit(s), "
        f"{totals['misses']} miss(es), {totals['recorded']} recording(s) made, "
        f"{totals['upstream_calls']} upstream call(s)")
    if unused:
        terminalreporter.write_line(
            f"{len(unused)} recording(s) no test used this session (candidates for "
            f"`replay-proxy prune --cassettes {_settings(config).cassettes}`): "
            + ", ".join(sorted(unused)[:5]) + (" ..." if len(unused) > 5 else ""))


def _unused_recordings(cassettes: Path, used: set[str]) -> list[str]:
    if not cassettes.is_dir():
        return []
    found = []
    for path in cassettes.rglob("*.json"):
        relative = path.relative_to(cassettes)
        if any(part.startswith(".") for part in relative.parts):
            continue
        key = path.stem.rpartition("-")[2]
        name = f"{relative.parent.as_posix()}\x1f{key}"
        if name not in used:
            found.append(f"{relative.parent.as_posix()}/{path.stem[:40]}")
    return found
