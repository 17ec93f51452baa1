"""pytest plugin: every test gets its own cassette, and its own session, through replay-proxy.

Installed with the package (entry point `pytest11`). Mark a test with `@pytest.mark.replay` (or
use the `replay_proxy` fixture) and unchanged application code talks to the proxy: the mark sets
OPENAI_BASE_URL and AZURE_OPENAI_ENDPOINT for the test. A replay miss fails the test with the
explanation of what differed, even if the code under test caught the error.

How it runs (the README's Performance section has the measurements that chose this):
- One proxy process per test session (`proxy_process`), on uvloop, started when the collected
  tests need it and shared by the xdist workers (one run id, one usage log). It is told the
  collected tests' cassettes, and reads them ahead while the tests run.
- Tests whose `replay_config` differs get a proxy process of their own; a `replay_config` with a
  Python `normalise` function gets a proxy in the test process, where the function lives.
- Each test is a session of its own (`/s/<id>/` in its base URL): its sequences start afresh,
  and its counters are its own, asked of the proxy only when the test reads them.
- A miss the code under test swallowed is found in the proxy's miss log, a file whose size the
  plugin looks at after each test: no request to the proxy.
- Importing this module imports neither click nor the server: a suite that never uses the proxy
  pays for the option table and nothing more.
"""

from __future__ import annotations

import contextlib
import os
import re
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import pytest

from .options import (
    DUMMY_API_KEY,
    ENV_PREFIX,
    MODES,
    NOT_FOR_PYTEST,
    SECRET_OPTIONS,
    SERVE_OPTIONS,
    OptionSpec,
    PytestInputs,
)

if TYPE_CHECKING:
    from ..core.settings import Settings
    from .proxy_process import ProxyProcess
    from .testing import ProxyThread

_RUN_KEY = pytest.StashKey["ReplayRun"]()
_SESSION_KEY = pytest.StashKey["ReplaySession"]()
_CASSETTE_KEY = pytest.StashKey[str]()
_BY_HOOK_KEY = pytest.StashKey[bool]()  # the mark's session is opened by a hook, not a fixture
_SAVED_ENV_KEY = pytest.StashKey[dict[str, "str | None"]]()
_UNSAFE = re.compile(r"[^A-Za-z0-9_.=+-]+")
_MAX_CASSETTE_NAME = 255
_DEFAULTS_SHOWN = {"cassettes": "<rootdir>/cassettes"}
# Proxies a process keeps for configurations of their own; past it the least recently used
# stops (a later test that needs it again starts it again).
_MAX_OWN_PROXIES = 8
_SHOWN_LOG_LINES = 20
# Folders of the cassette folder looked into for Python files before the collection skips it.
_LOOKED_INTO = 20


def _flag_specs() -> list[OptionSpec]:
    """The options the plugin takes as `--replay-*` flags and `replay_*` ini keys."""
    return [spec for spec in SERVE_OPTIONS
            if spec.name not in NOT_FOR_PYTEST and spec.name not in SECRET_OPTIONS]


def _dest(spec: OptionSpec) -> str:
    """`replay_openai_upstream` for `--openai-upstream` (and `replay_timing` for
    `--replay-timing`): the pytest dest and the ini key."""
    return "replay_" + spec.long_name.removeprefix("replay-").replace("-", "_")


def pytest_addoption(parser: pytest.Parser) -> None:
    # The same option table as `replay-proxy serve`: an option added there appears here.
    group = parser.getgroup("replay-proxy", "record and replay OpenAI calls (replay-proxy)")
    for spec in _flag_specs():
        dest = _dest(spec)
        flag = "--" + dest.replace("_", "-")
        default = _DEFAULTS_SHOWN.get(spec.name, spec.default)
        help_text = spec.help
        if not spec.is_flag and spec.show_default and default is not None:
            help_text += f" (default: {default})"
        help_text += f" [ini: {dest}; env: {spec.env_name}]"
        if spec.is_flag:
            group.addoption(flag, dest=dest, action="store_const", const=True, default=None,
                            help=help_text)
        elif spec.multiple:
            group.addoption(flag, dest=dest, action="append", default=None, metavar="VALUE",
                            help=help_text + " (repeatable)")
        else:
            group.addoption(flag, dest=dest, default=None, metavar="VALUE", help=help_text)
        ini_type: Literal["linelist", "bool", "string"] = (
            "linelist" if spec.multiple else "bool" if spec.is_flag else "string")
        parser.addini(dest, spec.help, type=ini_type, default=None)


def _inputs(config: pytest.Config, run_id: str) -> PytestInputs:
    """The session's options as given, each flag checked as far as the table allows: a bad
    choice or number is a usage error at once."""
    args: list[str] = []
    ini: list[tuple[str, object]] = []
    for spec in _flag_specs():
        dest = _dest(spec)
        given = config.getoption(dest)
        if given is not None:
            for value in (given if spec.multiple else [given]):
                if spec.is_flag:
                    args.append(spec.flag)
                else:
                    args += [spec.flag, _checked(spec, value, config)]
        value = config.getini(dest)
        if value not in (None, "", []):
            ini.append((spec.long_name, value))
    ini_base = config.inipath.parent if config.inipath else config.rootpath
    return PytestInputs(tuple(args), tuple(ini), str(config.inipath) if config.inipath else None,
                        str(ini_base), str(config.invocation_params.dir), str(config.rootpath),
                        run_id)


def _checked(spec: OptionSpec, value: str, config: pytest.Config) -> str:
    flag = "--" + _dest(spec).replace("_", "-")
    if spec.choices and value not in spec.choices:
        shown = ", ".join(repr(choice) for choice in spec.choices)
        raise pytest.UsageError(f"replay-proxy: Invalid value for '{flag}': {value!r} is not "
                                f"one of {shown}.")
    if spec.kind in ("int", "float"):
        try:
            number = int(value) if spec.kind == "int" else float(value)
        except ValueError:
            raise pytest.UsageError(f"replay-proxy: Invalid value for '{flag}': {value!r} is "
                                    f"not a valid {spec.kind}.") from None
        below = spec.low is not None and (number <= spec.low if spec.low_open
                                          else number < spec.low)
        if below or (spec.high is not None and number > spec.high):
            raise pytest.UsageError(f"replay-proxy: Invalid value for '{flag}': {value} is out "
                                    "of range.")
    if spec.kind == "path":
        # A path on pytest's command line is relative to where pytest was started, even if a
        # test changes the working directory.
        return str(config.invocation_params.dir / Path(value).expanduser())
    return value


def _new_run_id() -> str:
    """A run id of the same shape as the proxy's own (time, process, random), made without
    importing it: every proxy of this session, in every xdist worker, uses this one."""
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
    return f"{stamp}-{os.getpid()}-{os.urandom(2).hex()}"


# ---- talking to a proxy ----------------------------------------------------------------------

class ProxyClient:
    """Requests to one proxy's own endpoints, over one kept-alive connection."""

    def __init__(self, url: str, timeout: float = 60.0) -> None:
        host, _, port = url.removeprefix("http://").rpartition(":")
        self.url = url
        self._address = (host, int(port))
        self._timeout = timeout
        self._connection: Any = None

    def call(self, method: str, path: str, body: object = None) -> dict[str, Any]:
        import http.client
        import json

        payload = None if body is None else json.dumps(body).encode()
        headers = {"Content-Type": "application/json"} if payload is not None else {}
        for attempt in (1, 2):
            if self._connection is None:
                self._connection = http.client.HTTPConnection(*self._address,
                                                              timeout=self._timeout)
            try:
                self._connection.request(method, path, body=payload, headers=headers)
                answer = self._connection.getresponse()
                data = answer.read()
            except (http.client.HTTPException, ConnectionError):
                self.close()
                if attempt == 2:  # an idle connection the proxy had closed: once more
                    raise
                continue
            found: dict[str, Any] = json.loads(data)
            if answer.status >= 400:
                message = found.get("error", {}).get("message", data[:500])
                raise RuntimeError(f"replay-proxy answered {answer.status} to {method} {path}: "
                                   f"{message}")
            return found
        raise AssertionError("unreachable")

    def close(self) -> None:
        if self._connection is not None:
            self._connection.close()
            self._connection = None


@dataclass
class MissWatch:
    """The misses a proxy noted in its miss log, read from where the last look stopped: one
    stat() per test when nothing missed. Keeps the explanations of this process's sessions."""

    path: Path
    prefix: str  # the sessions this process names
    offset: int = 0
    partial: bytes = b""
    found: dict[str, list[tuple[str, str]]] = field(default_factory=dict)

    def take(self, session: str) -> list[tuple[str, str]]:
        """The (kind, explanation) of the misses and proxy errors `session` met (`miss` or
        `error`; an empty explanation when the log no longer carries it), forgotten once
        taken."""
        try:
            size = os.stat(self.path).st_size
        except FileNotFoundError:
            size = 0
        if size > self.offset:
            import json

            with open(self.path, "rb") as log:
                log.seek(self.offset)
                data = self.partial + log.read(size - self.offset)
            self.offset = size
            *lines, self.partial = data.split(b"\n")
            for line in lines:
                try:
                    miss = json.loads(line)
                except ValueError:
                    continue
                named = str(miss.get("session", ""))
                if named.startswith(self.prefix):
                    self.found.setdefault(named, []).append(
                        (str(miss.get("kind", "miss")), str(miss.get("message", ""))))
        return self.found.pop(session, [])


@dataclass
class ProxyHandle:
    """A proxy this process uses: where it listens, its mode, its client and its miss log."""

    url: str
    mode: str  # resolved: never auto
    cassettes: str  # the root folder of its cassettes
    client: ProxyClient
    watch: MissWatch | None
    process: ProxyProcess | None = None  # a child this process owns
    thread: ProxyThread | None = None  # a proxy in this process (a normalise hook)

    def stop(self) -> dict[str, Any] | None:
        """Stop a proxy this process owns; its final counters."""
        self.client.close()
        if self.process is not None:
            return self.process.stop()
        if self.thread is not None:
            from .proxy_process import final_counters

            self.thread.stop()
            return final_counters(self.thread.state)
        return None


@dataclass
class ReplayRun:
    """This pytest process's part of the session: the proxies it uses or owns, and what its
    tests did."""

    inputs: PytestInputs
    worker: str
    folder: Path | None  # logs and miss logs; made by the process that owns the shared proxy
    owns_folder: bool = False
    shared: ProxyProcess | None = None  # the session's proxy, when this process owns it
    shared_url: str | None = None
    shared_miss_log: str | None = None
    shared_stopped: bool = False
    handles: dict[object, ProxyHandle] = field(default_factory=dict)
    sessions_made: int = 0
    tests: int = 0
    touched: set[tuple[str, str]] = field(default_factory=set)  # (cassettes root, cassette)
    used: set[tuple[str, str, str]] = field(default_factory=set)  # (root, cassette, key)
    totals: Counter[str] = field(default_factory=Counter)
    logs: list[str] = field(default_factory=list)
    failure: str | None = None  # why the session fails although its tests passed
    _settings_cache: dict[str, Settings] = field(default_factory=dict)

    # -- the folder and the shared proxy -------------------------------------------------------

    def ensure_folder(self) -> Path:
        if self.folder is None:
            import tempfile

            self.folder = Path(tempfile.mkdtemp(prefix="replay-proxy-"))
            self.owns_folder = True
        return self.folder

    def launch_shared(self) -> ProxyProcess:
        """The session's proxy, owned by this process (the controller, or a lone pytest):
        made on first need, its child started when asked (`start`)."""
        if self.shared is None:
            from .proxy_process import Launch, ProxyProcess

            folder = self.ensure_folder()
            miss_log = folder / "misses-shared.jsonl"
            self.shared = ProxyProcess(Launch(self.inputs, {}, str(miss_log)),
                                       folder / "proxy-shared.log", os.environ)
            self.shared_url, self.shared_miss_log = self.shared.url, str(miss_log)
        return self.shared

    def shared_handle(self) -> ProxyHandle:
        handle = self.handles.get("shared")
        if handle is None:
            if self.shared_url is None:
                self.launch_shared().start()
            elif self.shared is not None:
                self.shared.start()
            assert self.shared_url is not None
            client = ProxyClient(self.shared_url)
            health = self._health(client, self.shared)
            watch = (MissWatch(Path(self.shared_miss_log), self.session_prefix)
                     if self.shared_miss_log else None)
            handle = self.handles["shared"] = ProxyHandle(
                self.shared_url, health["mode"], health["cassettes"], client, watch)
        return handle

    def _health(self, client: ProxyClient, process: ProxyProcess | None) -> dict[str, Any]:
        """Wait for a proxy to answer (a child starting up is in the socket's backlog); one
        that could not start is a usage error with its own words."""
        try:
            return client.call("GET", "/_replay/health")
        except (OSError, RuntimeError) as exc:
            words = process.last_words() if process is not None else self._shared_words()
            raise pytest.UsageError(
                f"replay-proxy could not start for this session ({exc.__class__.__name__}: "
                f"{exc}).\n{words}".rstrip()) from None

    def _shared_words(self) -> str:
        log = self.folder / "proxy-shared.log" if self.folder is not None else None
        try:
            return log.read_text(errors="replace").strip() if log is not None else ""
        except OSError:
            return ""

    @property
    def session_prefix(self) -> str:
        return f"{self.inputs.run_id}.{self.worker}."

    def new_session(self) -> str:
        self.sessions_made += 1
        return f"{self.session_prefix}{self.sessions_made}"

    # -- proxies for a replay_config of their own ----------------------------------------------

    def handle_for(self, replay_config: Mapping[str, Any]) -> ProxyHandle:
        if not replay_config:
            return self.shared_handle()
        options = dict(replay_config)
        normalise = options.pop("normalise", None)
        if normalise is not None and not callable(normalise):
            raise pytest.UsageError(f"replay_config: key 'normalise' takes a function "
                                    f"(canonical_request) -> canonical_request, not "
                                    f"{type(normalise).__name__}")
        settings = self._settings(options)
        if normalise is None and settings == self._settings({}):
            return self.shared_handle()
        key: object = (settings, normalise)
        handle = self.handles.pop(key, None)
        if handle is None:
            handle = self._start_own(settings, options, normalise)
        self.handles[key] = handle  # the most recently used last
        own = [name for name in self.handles if name != "shared"]
        if len(own) > _MAX_OWN_PROXIES:
            self._stop_handle(own[0])
        return handle

    def _settings(self, replay_config: Mapping[str, Any]) -> Settings:
        """Settings for a replay_config (click and the core are imported here, for the first
        test that has one), remembered: tests of one directory share one."""
        name = repr(sorted(replay_config.items()))
        found = self._settings_cache.get(name)
        if found is not None:
            return found
        import click

        from .configuration import plugin_settings

        try:
            settings, _ = plugin_settings(self.inputs, replay_config)
        except click.ClickException as exc:
            message = exc.format_message()
            if message.startswith("replay_config"):  # it names its source itself
                raise pytest.UsageError(f"replay-proxy: {message}") from exc
            names = "--replay-* options, REPLAY_PROXY_* variables or replay_* ini keys"
            raise pytest.UsageError(f"replay-proxy ({names}): {message}") from exc
        if len(self._settings_cache) < 64:
            self._settings_cache[name] = settings
        return settings

    def _start_own(self, settings: Settings, options: Mapping[str, Any],
                   normalise: Callable[..., Any] | None) -> ProxyHandle:
        name = f"{self.worker}-{os.urandom(4).hex()}"
        miss_log = self.ensure_folder() / f"misses-{name}.jsonl"
        if normalise is not None:
            # A function cannot cross into another process: this proxy runs here, on a thread.
            from dataclasses import replace

            from ..server.handler import ReplayProxy
            from .testing import ProxyThread

            policy = replace(settings.key_policy, normalise=normalise)
            hooked = replace(settings, key_policy=policy)
            thread = ProxyThread(lambda: ReplayProxy(hooked, dict(os.environ),
                                                     miss_log=miss_log), loop="auto")
            thread.start()
            client = ProxyClient(thread.url)
            return ProxyHandle(thread.url, thread.state.mode.value, str(hooked.cassettes), client,
                               MissWatch(miss_log, self.session_prefix), thread=thread)
        from .proxy_process import Launch, ProxyProcess

        process = ProxyProcess(Launch(self.inputs, options, str(miss_log)),
                               miss_log.with_name(f"proxy-{name}.log"), os.environ)
        process.start()
        client = ProxyClient(process.url)
        health = self._health(client, process)
        return ProxyHandle(process.url, health["mode"], health["cassettes"], client,
                           MissWatch(miss_log, self.session_prefix), process=process)

    def _stop_handle(self, key: object) -> None:
        handle = self.handles.pop(key)
        self._count(handle.stop())
        if handle.process is not None:
            if handle.process.stuck:
                self.failure = ("a replay-proxy for a replay_config of its own did not stop in "
                                "time and was killed: what it had not stored is lost")
            words = handle.process.last_words(_SHOWN_LOG_LINES)
            if words:
                self.logs.append(words)

    def _count(self, final: Mapping[str, Any] | None) -> None:
        """Add a stopped proxy's counters and the keys it used."""
        if not final:
            return
        self.totals.update({name: int(value) for name, value in final["totals"].items()
                            if isinstance(value, int)})
        root = str(final["cassettes"])
        self.used.update((root, str(cassette), str(key)) for cassette, key in final["used"])

    def stop_own(self) -> None:
        """Stop every proxy this process owns, the shared one too, adding their counters."""
        for key in [name for name in self.handles if name != "shared"]:
            self._stop_handle(key)
        shared = self.handles.pop("shared", None)
        if shared is not None:
            shared.client.close()
        if self.shared is not None and not self.shared_stopped:
            self.shared_stopped = True
            died = self.shared.exit_code()  # before it was asked to stop
            used = self.tests > 0 or shared is not None
            # Started ahead of a session whose tests did not use it: ended at once.
            self._count(self.shared.stop(used=used))
            code = self.shared.exit_code()
            if not used:
                return
            if died is not None:
                self.failure = (f"the session's replay-proxy exited during the session (code "
                                f"{died})")
            elif self.shared.stuck:
                self.failure = ("the session's replay-proxy did not stop in time and was "
                                "killed: what it had not stored is lost, its counters too")
            elif code not in (0, None):
                self.failure = f"the session's replay-proxy exited with code {code}"
            words = self.shared.last_words(_SHOWN_LOG_LINES * (5 if self.failure else 1))
            if words:
                self.logs.append(words)


# ---- the session -----------------------------------------------------------------------------

def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "replay(cassette=None, fingerprint=None, mode=None): run the test through replay-proxy "
        "with its own cassette; sets OPENAI_BASE_URL and AZURE_OPENAI_ENDPOINT",
    )
    shared = getattr(config, "workerinput", {}).get("replay_proxy")
    run_id = shared["run_id"] if shared else _new_run_id()
    inputs = _inputs(config, run_id)
    worker = getattr(config, "workerinput", {}).get("workerid", "main")
    run = ReplayRun(inputs, worker, Path(shared["folder"]) if shared else None)
    if shared:
        run.shared_url, run.shared_miss_log = shared["url"], shared["miss_log"]
    config.stash[_RUN_KEY] = run
    # The proxy takes a few hundred milliseconds to start; collecting the tests (importing
    # their modules, the SDK's included) usually takes longer. Where this project evidently
    # uses replay-proxy, start it now, beside the collection, instead of after it (and let the
    # collection skip the cassette folder).
    if not _likely_used(config):
        return
    folder = _cassette_folder(inputs)
    if folder is not None:
        config.pluginmanager.register(CollectionSkip(folder), "replay-proxy-collection-skip")
    collect_only = config.getoption("collectonly", False)
    if not shared and not collect_only and not _distributing(config):
        run.launch_shared().start()


def _cassette_folder(inputs: PytestInputs) -> Path | None:
    """The cassette folder as the proxy resolves it (the command line, the environment, the
    ini file, the configuration file, then `<rootdir>/cassettes`), found without click; None
    where a configuration file that cannot be read leaves it unknown (the proxy says why).
    `plugin_settings` is the whole resolution; a test keeps the two in agreement."""
    folder = _given_cassette_folder(inputs)
    return Path(os.path.normpath(folder)) if folder is not None else None


def _given_cassette_folder(inputs: PytestInputs) -> Path | None:
    spec = next(spec for spec in SERVE_OPTIONS if spec.name == "cassettes")
    flags = {option.flag for option in SERVE_OPTIONS if option.is_flag}
    folder, args, at = None, inputs.args, 0
    while at < len(args):  # (flag, value) pairs, and flags alone; the last one given wins
        if args[at] == spec.flag and at + 1 < len(args):
            folder = Path(args[at + 1])  # made absolute by `_checked`
        at += 1 if args[at] in flags else 2
    if folder is not None:
        return folder
    if os.environ.get(spec.env_name):
        return Path(inputs.invocation_dir) / os.environ[spec.env_name]
    for name, value in inputs.ini:
        if name == spec.long_name:
            return Path(inputs.ini_base) / Path(str(value)).expanduser()
    from .config_file import ConfigFileError, named_or_found

    try:
        file = named_or_found(Path(inputs.invocation_dir), os.environ)
    except ConfigFileError:
        return None
    value = file.value(spec.long_name) if file is not None else None
    if value is None:
        return Path(inputs.rootdir) / "cassettes"
    if file is not None and isinstance(value, str):
        return file.path.parent / Path(value).expanduser()
    return None


@dataclass(frozen=True)
class CollectionSkip:
    """The cassette folder holds recordings, not tests: the collection skips it rather than
    walk a folder per test (half a second of every run at 1,000 tests). A folder named on the
    command line is still collected, and so is one that holds Python files. Registered only
    in sessions that use the proxy: other suites pay nothing per collected path."""

    folder: Path

    def pytest_ignore_collect(self, collection_path: Path) -> bool | None:
        if collection_path != self.folder:
            return None
        # A folder configured as the cassettes' that turns out to hold tests is collected: no
        # Python file at its top, nor in the first of its folders.
        try:
            with os.scandir(collection_path) as entries:
                top = [(entry.name, entry.is_dir(follow_symlinks=False)) for entry in entries]
            if any(name.endswith(".py") for name, _ in top):
                return None
            for name in [name for name, is_dir in top if is_dir][:_LOOKED_INTO]:
                if any(inner.endswith(".py") for inner in os.listdir(collection_path / name)):
                    return None
        except OSError:
            return None
        return True


def _distributing(config: pytest.Config) -> bool:
    """Whether this is an xdist controller: its workers run the tests."""
    return bool(getattr(config.option, "dist", "no") != "no"
                and getattr(config.option, "numprocesses", None))


def _likely_used(config: pytest.Config) -> bool:
    """Cheap evidence that this project uses replay-proxy: its options given anywhere, its
    configuration file, or the cassette folder (committed, so it is there in CI too)."""
    if any(name.startswith(ENV_PREFIX) for name in os.environ):
        return True
    inputs = config.stash[_RUN_KEY].inputs
    if inputs.args or inputs.ini:
        return True
    root = config.rootpath
    if (root / "replay-proxy.toml").is_file() or (root / "cassettes").is_dir():
        return True
    try:
        return b"[tool.replay-proxy]" in (root / "pyproject.toml").read_bytes()
    except OSError:
        return False


@pytest.hookimpl(optionalhook=True)
def pytest_configure_node(node: Any) -> None:
    """An xdist controller: the workers share one proxy, started now where the project
    evidently uses it (while the workers start), else when a worker first connects."""
    run = node.config.stash[_RUN_KEY]
    process = run.launch_shared()
    if _likely_used(node.config):
        process.start()
    else:
        process.start_on_first_client()
    node.workerinput["replay_proxy"] = {"url": process.url, "run_id": run.inputs.run_id,
                                        "folder": str(run.folder),
                                        "miss_log": run.shared_miss_log}


def _needs_proxy(item: pytest.Item) -> bool:
    return (item.get_closest_marker("replay") is not None
            or "replay_proxy" in getattr(item, "fixturenames", ()))


def pytest_itemcollected(item: pytest.Item) -> None:
    """The first test that needs the proxy starts it, while the rest is collected."""
    run = item.config.stash.get(_RUN_KEY, None)
    if (run is not None and run.shared is None and run.shared_url is None
            and _needs_proxy(item) and not item.config.getoption("collectonly", False)):
        run.launch_shared().start()


def _plugin_fixtures_only(item: pytest.Item, known: dict[object, bool]) -> bool:
    """Whether the test sees this plugin's own `replay_config` and `replay_proxy`, overridden
    by no conftest, module or class (remembered in `known` by the test's parent). pytest has no
    public way to ask; where its fixture manager does not answer, the answer is no, and the
    mark uses the fixtures."""
    parent = item.parent
    found = known.get(parent)
    if found is None:
        manager = getattr(item.session, "_fixturemanager", None)
        try:
            definitions = [manager.getfixturedefs(name, item)  # type: ignore[union-attr]
                           for name in ("replay_config", "replay_proxy")]
            found = all(definition and getattr(definition[-1].func, "__module__", None)
                        == __name__ for definition in definitions)
        except Exception:  # another pytest's internals: use the fixtures
            found = False
        known[parent] = found
    return found


def pytest_collection_finish(session: pytest.Session) -> None:
    """Start the session's proxy as soon as the collected tests show they need it, and tell it
    their cassettes, which it reads ahead while the first tests run."""
    run = session.config.stash.get(_RUN_KEY, None)
    if run is None or session.config.getoption("collectonly"):
        return
    cassettes = []
    plain: dict[object, bool] = {}
    for item in session.items:
        if _needs_proxy(item):
            marker = item.get_closest_marker("replay")
            named = marker.kwargs.get("cassette") if marker is not None else None
            if not (named and _cassette_problem(named)):  # (else the test fails with why)
                cassette = item.stash[_CASSETTE_KEY] = named or cassette_for(item)
                cassettes.append(cassette)
            names = getattr(item, "fixturenames", None)
            if marker is None or names is None or names[:1] == ["replay_proxy"]:
                continue
            callspec = getattr(item, "callspec", None)
            parametrized = callspec is not None and "replay_config" in callspec.params
            if ("replay_proxy" not in names and not parametrized
                    and _plugin_fixtures_only(item, plain)):
                # The mark alone: its session is opened by `pytest_runtest_setup`.
                item.stash[_BY_HOOK_KEY] = True
                continue
            # The mark asks for the fixture, first, so that the environment it sets is there
            # for the test's other fixtures. (A list of its own: parametrized siblings share
            # theirs, and not every one of them need carry the mark.)
            item.fixturenames = [  # type: ignore[attr-defined]
                "replay_proxy", *(name for name in names if name != "replay_proxy")]
    if not cassettes:
        return
    if hasattr(session.config, "workerinput"):
        # A proxy that cannot start fails the tests that use it, with its words.
        with contextlib.suppress(pytest.UsageError, OSError, RuntimeError):
            run.shared_handle().client.call("POST", "/_replay/warm", {"cassettes": cassettes})
        return
    run.shared_handle().client.call("POST", "/_replay/warm", {"cassettes": cassettes})


def pytest_sessionfinish(session: pytest.Session) -> None:
    config = session.config
    run = config.stash.get(_RUN_KEY, None)
    if run is None:
        return
    run.stop_own()
    workeroutput = getattr(config, "workeroutput", None)
    if workeroutput is not None:
        workeroutput["replay_proxy"] = {"tests": run.tests,
                                        "touched": [list(pair) for pair in sorted(run.touched)],
                                        "used": [list(name) for name in sorted(run.used)],
                                        "totals": dict(run.totals), "logs": run.logs,
                                        "failure": run.failure}
        return
    if run.tests and run.totals.get("store_errors") and run.failure is None:
        errors = run.totals["store_errors"]
        run.failure = (f"{errors} recording(s) could not be stored (the proxy's log above "
                       "says why); the answers reached the tests but are not in the cassettes")
    if run.failure and session.exitstatus == pytest.ExitCode.OK:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node: Any, error: Any) -> None:
    output = getattr(node, "workeroutput", {}).get("replay_proxy")
    run = node.config.stash.get(_RUN_KEY, None)
    if not output or run is None:
        return
    run.tests += output["tests"]
    run.touched.update((root, cassette) for root, cassette in output["touched"])
    run.used.update((root, cassette, key) for root, cassette, key in output["used"])
    run.totals.update(output["totals"])
    run.logs += output["logs"]
    run.failure = run.failure or output["failure"]


def pytest_unconfigure(config: pytest.Config) -> None:
    run = config.stash.get(_RUN_KEY, None)
    if run is None:
        return
    run.stop_own()  # (already done unless the session was cut short)
    if run.owns_folder and run.folder is not None:
        import shutil

        shutil.rmtree(run.folder, ignore_errors=True)


def pytest_terminal_summary(terminalreporter: Any, config: pytest.Config) -> None:
    run = config.stash.get(_RUN_KEY, None)
    if run is None or getattr(config, "workeroutput", None) is not None or not run.tests:
        return
    totals = run.totals
    terminalreporter.section("replay-proxy")
    terminalreporter.write_line(
        f"{run.tests} test(s) through the proxy: {totals['hits']} hit(s), "
        f"{totals['misses']} miss(es), {totals['recorded']} recording(s) made, "
        f"{totals['upstream_calls']} upstream call(s), {totals['store_errors']} store error(s)")
    for root in sorted({root for root, _ in run.touched}):
        unused = _unused_recordings(Path(root), run)
        if unused:
            terminalreporter.write_line(
                f"{len(unused)} recording(s) no test used this session, in the cassettes its "
                f"tests used (candidates for `replay-proxy prune --cassettes {root}`): "
                + ", ".join(unused[:5]) + (" ..." if len(unused) > 5 else ""))
    for words in run.logs:
        terminalreporter.write_line("the proxy's log:")
        for line in words.splitlines():
            terminalreporter.write_line("  " + line)
    if run.failure:
        terminalreporter.write_line(f"replay-proxy: failing the session: {run.failure}.",
                                    red=True)


def _unused_recordings(cassettes: Path, run: ReplayRun) -> list[str]:
    """Recordings in the cassettes this session's tests used that none of its requests used:
    a partial run (`-k`) never makes the other tests' recordings look unused."""
    root = str(cassettes)
    used = {(cassette, key) for where, cassette, key in run.used if where == root}
    found = []
    for cassette in sorted(name for root, name in run.touched if root == str(cassettes)):
        try:
            names = sorted(os.listdir(cassettes / cassette))
        except OSError:
            continue
        for name in names:
            if not name.endswith(".json") or name.startswith("."):
                continue
            stem = name[:-5]
            if (cassette, stem.rpartition("-")[2]) not in used:
                found.append(f"{cassette}/{stem[:40]}")
    return found


# ---- each test -------------------------------------------------------------------------------

@dataclass
class ReplaySession:
    """What the `replay_proxy` fixture yields: where to point clients, and what happened."""

    handle: ProxyHandle
    cassette: str
    mode: str
    session: str  # the test's own session: its sequences and counters

    @property
    def proxy_url(self) -> str:
        """The proxy itself, for its own endpoints (`/_replay/health`, `/_replay/stats`)."""
        return self.handle.url

    @property
    def url(self) -> str:
        return f"{self.handle.url}/s/{self.session}/c/{self.cassette}"

    @property
    def base_url(self) -> str:
        """OpenAI-style base URL, `/v1` included."""
        return self.url + "/v1"

    @property
    def azure_endpoint(self) -> str:
        return self.url

    def counters(self) -> dict[str, Any]:
        """This test's counters, from the proxy (once what it recorded is stored)."""
        return self.handle.client.call("GET", f"/_replay/sessions/{self.session}")

    def _count(self, name: str) -> int:
        return int(self.counters()[name])

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

    @property
    def store_errors(self) -> int:
        return self._count("store_errors")

    @property
    def errors(self) -> int:
        """Requests the proxy answered with an error of its own (the upstream out of reach, a
        corrupt cassette): nothing was replayed or recorded for them."""
        return self._count("errors")

    def last_miss(self) -> str | None:
        last = self.counters()["last_miss"]
        return str(last) if last is not None else None


def cassette_for(item: pytest.Item) -> str:
    """The test's own cassette, named after its node id: the folder under the rootdir, the
    module, the class, then the test (`tests/a/test_x.py::TestA::test_call[1]` ->
    `tests/a/test_x/TestA/test_call-1`), so that two tests can never share one by accident: a
    part that loses characters on the way (`test_q[a/b]`, `test_q[a b]`) ends with a digest of
    what it was (`test_q-a-b-3f2c9a1b`)."""
    path, *names = item.nodeid.split("::")
    parts = [*path.removesuffix(".py").split("/"), *names]
    segments = [_segment(part) for part in parts if _segment(part)] or ["test"]
    name = "/".join(segments)
    if len(name) > _MAX_CASSETTE_NAME:  # keep it unique while it fits a folder name
        import hashlib

        digest = hashlib.sha256(item.nodeid.encode()).hexdigest()[:12]
        name = name[: _MAX_CASSETTE_NAME - 13].rstrip("/.-") + "-" + digest
    return name


def _cassette_problem(name: object) -> str | None:
    """Why a cassette name given in a mark cannot be used (None when it can)."""
    if not isinstance(name, str):
        return f"a cassette name is a string, not {type(name).__name__}"
    from ..core.errors import ProxyError
    from ..core.providers import validate_cassette_name

    try:
        validate_cassette_name(name)
    except ProxyError as exc:
        return exc.message
    return None


def _segment(part: str) -> str:
    """A part of a node id as a cassette name segment: safe characters, no leading dot. A
    parametrized test's id in brackets becomes `-id`; any other change is made unique by a
    digest of the part as it was."""
    name, bracket, rest = part.partition("[")
    readable = name + ("-" + rest.removesuffix("]") if bracket else "")
    segment = _UNSAFE.sub("-", readable).strip("-").lstrip(".-")[:128].rstrip(".-")
    if segment != readable:
        import hashlib

        digest = hashlib.sha256(part.encode()).hexdigest()[:8]
        segment = f"{segment[:119]}-{digest}".lstrip("-")
    return segment


@pytest.fixture
def replay_config() -> dict[str, Any]:
    """Options for the tests in this fixture's scope, as in [tool.replay-proxy]: override it in
    a conftest.py to configure a directory, e.g. `return {"ignore_field": ["user"]}`. The
    command line and REPLAY_PROXY_* variables still win; a mark's mode wins over all. The key
    `normalise` takes a function (canonical_request) -> canonical_request, run after the
    built-in rules when recording and when matching; such tests get a proxy in the test process."""
    return {}


@pytest.fixture
def replay_proxy(request: pytest.FixtureRequest, replay_config: Mapping[str, Any]
                 ) -> Iterator[ReplaySession]:
    """The test's proxy session. With `@pytest.mark.replay`, also OPENAI_BASE_URL and
    AZURE_OPENAI_ENDPOINT for the test (and dummy keys when replaying)."""
    item = request.node
    if item.stash.get(_BY_HOOK_KEY, False) and _SESSION_KEY in item.stash:
        yield item.stash[_SESSION_KEY]  # asked for by name: the session the mark opened
        return
    replay = _open_session(item, replay_config)
    try:
        yield replay
    finally:
        _close_session(item, replay)


def _open_session(item: pytest.Item, replay_config: object) -> ReplaySession:
    """The test's session on the proxy its `replay_config` needs; with the mark, the
    environment that points its clients there."""
    marker = item.get_closest_marker("replay")
    options: dict[str, Any] = dict(marker.kwargs) if marker else {}
    unknown = set(options) - {"cassette", "fingerprint", "mode"}
    if unknown:
        raise pytest.UsageError(f"@pytest.mark.replay got unknown arguments {sorted(unknown)}")
    if not isinstance(replay_config, Mapping):
        raise pytest.UsageError(f"replay_config must return a dict of options, not "
                                f"{type(replay_config).__name__}")
    named = options.get("cassette")
    if named is not None:
        problem = _cassette_problem(named)
        if problem is not None:
            pytest.fail(f"@pytest.mark.replay(cassette=...): {problem}", pytrace=False)
    run: ReplayRun = item.config.stash[_RUN_KEY]
    handle = run.handle_for(replay_config)
    cassette = named or item.stash.get(_CASSETTE_KEY, None) or cassette_for(item)
    session = run.new_session()
    mode = handle.mode
    if options.get("mode") or options.get("fingerprint"):
        if options.get("mode"):
            if options["mode"] not in MODES:
                raise pytest.UsageError(f"@pytest.mark.replay(mode=...) takes one of "
                                        f"{', '.join(MODES)}, not {options['mode']!r}")
            from ..core.modes import Mode, resolve_mode

            mode = resolve_mode(Mode(options["mode"]), os.environ).value
        handle.client.call("PUT", f"/_replay/sessions/{session}",
                           {"mode": mode if options.get("mode") else None,
                            "fingerprint": options.get("fingerprint")})
    replay = ReplaySession(handle, cassette, mode, session)
    item.stash[_SESSION_KEY] = replay
    plugins = item.config.pluginmanager
    if not plugins.has_plugin(SessionHooks.NAME):  # (before this test's call and teardown)
        plugins.register(SessionHooks(), SessionHooks.NAME)
    saved: dict[str, str | None] = {}
    if marker is not None:
        wanted = {"OPENAI_BASE_URL": replay.base_url, "AZURE_OPENAI_ENDPOINT": replay.url}
        if mode == "replay":
            wanted.update({name: DUMMY_API_KEY for name in ("OPENAI_API_KEY",
                                                             "AZURE_OPENAI_API_KEY")
                           if not os.environ.get(name)})
        for name, value in wanted.items():
            saved[name] = os.environ.get(name)
            os.environ[name] = value
    item.stash[_SAVED_ENV_KEY] = saved
    return replay


def _close_session(item: pytest.Item, replay: ReplaySession) -> None:
    """The environment as it was before the test; the session counted."""
    for name, previous in item.stash.get(_SAVED_ENV_KEY, {}).items():
        if previous is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = previous
    item.stash[_SAVED_ENV_KEY] = {}
    run: ReplayRun = item.config.stash[_RUN_KEY]
    run.tests += 1
    run.touched.add((replay.handle.cassettes, replay.cassette))


def pytest_runtest_setup(item: pytest.Item) -> None:
    """A test with the mark alone opens its session here, before any fixture is set up (two
    fixtures per test cost more than the session itself), and after pytest's own tryfirst
    hook has checked the skip and xfail marks: a skipped test opens none."""
    if _SESSION_KEY in item.stash:  # the session of an earlier run of this test (a rerun)
        del item.stash[_SESSION_KEY]
    if item.stash.get(_BY_HOOK_KEY, False):
        _open_session(item, {})


class SessionHooks:
    """The hooks of tests that have a proxy session, registered when the first session opens:
    a suite that never uses the proxy pays nothing for them per test."""

    NAME = "replay-proxy-session-hooks"

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_call(self, item: pytest.Item) -> Iterator[None]:
        """A replay miss, or an error of the proxy's own, fails the test with the proxy's
        explanation, whatever the code did with the error it got."""
        return (yield from _failing_on_misses(item))

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_teardown(self, item: pytest.Item) -> Iterator[None]:
        """The same for the requests a fixture makes as it is torn down; then a session the
        mark opened is closed."""
        try:
            return (yield from _failing_on_misses(item))
        finally:
            replay = item.stash.get(_SESSION_KEY, None)
            if replay is not None and item.stash.get(_BY_HOOK_KEY, False):
                _close_session(item, replay)


def _failing_on_misses(item: pytest.Item) -> Iterator[None]:
    try:
        result = yield
    except (KeyboardInterrupt, SystemExit):
        raise  # Ctrl-C stops the session, whatever the test met
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
    replay = item.stash.get(_SESSION_KEY, None)
    if replay is None or replay.handle.watch is None:
        return None
    noted = replay.handle.watch.take(replay.session)
    if not noted:
        return None
    missed = [message for kind, message in noted if kind == "miss"]
    errors = [message for kind, message in noted if kind != "miss"]
    parts = []
    if missed:
        last = missed[-1] or replay.last_miss() or ""
        parts.append(f"replay-proxy: {len(missed)} request(s) had no recording in cassette "
                     f"'{replay.cassette}' (mode {replay.mode}).\n{last}")
    if errors:
        parts.append(f"replay-proxy: {len(errors)} request(s) got an error of the proxy's own, "
                     f"not an answer (cassette '{replay.cassette}', mode {replay.mode}): "
                     "nothing was replayed or recorded for them.\n" + errors[-1])
    return "\n\n".join(parts)
