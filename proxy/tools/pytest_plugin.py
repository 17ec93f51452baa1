"""pytest plugin: every test gets its own cassette through one in-process replay-proxy.

Installed with the package (entry point `pytest11`). Mark a test with `@pytest.mark.replay` (or
use the `replay_proxy` fixture) and unchanged application code talks to the proxy: the mark sets
OPENAI_BASE_URL and AZURE_OPENAI_ENDPOINT for the test. A replay miss fails the test with the
explanation of what differed.
"""

from __future__ import annotations

import os
import re
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from ..core.modes import Mode, resolve_mode
from ..core.routes import SequencePolicy
from ..core.settings import OPENAI_UPSTREAM, Settings
from ..server.state import CassetteOptions
from .testing import ProxyThread

MODES = [mode.value for mode in Mode]
SEQUENCES = [policy.value for policy in SequencePolicy]
_PROXY_KEY = pytest.StashKey["ProxyThread"]()
_SESSION_KEY = pytest.StashKey["ReplaySession"]()
_TOTALS_KEY = pytest.StashKey[Counter[str]]()
_WORKER_USED_KEY = pytest.StashKey[set[str]]()
_UNSAFE = re.compile(r"[^A-Za-z0-9_.=+-]+")
DUMMY_KEY = "sk-replay-proxy-dummy"


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("replay-proxy", "record and replay OpenAI calls (replay-proxy)")
    options = [
        ("mode", "auto", f"one of {', '.join(MODES)}; auto replays when CI is true"),
        ("cassettes", "", "cassette folder (default: <rootdir>/cassettes)"),
        ("openai_upstream", OPENAI_UPSTREAM, "OpenAI upstream base URL"),
        ("azure_upstream", "", "Azure OpenAI endpoint (default: $AZURE_OPENAI_ENDPOINT)"),
        ("sequence", "stateful", "which keys replay in order: stateful (default), all, or none"),
    ]
    for name, default, help_text in options:
        flag = "--replay-" + name.replace("_", "-")
        group.addoption(flag, dest=f"replay_{name}", default=None, help=help_text)
        parser.addini(f"replay_{name}", help_text, default=default)


def _option(config: pytest.Config, name: str) -> str:
    value = config.getoption(f"replay_{name}")
    return str(value if value is not None else config.getini(f"replay_{name}"))


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "replay(cassette=None, fingerprint=None, mode=None): run the test through replay-proxy "
        "with its own cassette; sets OPENAI_BASE_URL and AZURE_OPENAI_ENDPOINT",
    )
    mode = _option(config, "mode")
    if mode not in MODES:
        raise pytest.UsageError(f"--replay-mode {mode!r}: choose one of {', '.join(MODES)}")
    sequence = _option(config, "sequence")
    if sequence not in SEQUENCES:
        raise pytest.UsageError(f"--replay-sequence {sequence!r}: choose one of "
                                f"{', '.join(SEQUENCES)}")
    config.stash[_TOTALS_KEY] = Counter()


def _settings(config: pytest.Config) -> Settings:
    cassettes = _option(config, "cassettes") or str(config.rootpath / "cassettes")
    azure = _option(config, "azure_upstream") or os.environ.get("AZURE_OPENAI_ENDPOINT") or None
    return Settings(
        cassettes=Path(cassettes), mode=resolve_mode(Mode(_option(config, "mode")), os.environ),
        openai_upstream=_option(config, "openai_upstream"), azure_upstream=azure,
        openai_api_key=os.environ.get("OPENAI_API_KEY"),
        azure_api_key=os.environ.get("AZURE_OPENAI_API_KEY"),
        sequence=SequencePolicy(_option(config, "sequence")),
    )


def _proxy(config: pytest.Config) -> ProxyThread:
    """The session's proxy, started on first use on a free loopback port."""
    if _PROXY_KEY not in config.stash:
        from ..server.handler import ReplayProxy

        settings = _settings(config)
        proxy = ProxyThread(lambda: ReplayProxy(settings, dict(os.environ)))
        proxy.start()
        config.stash[_PROXY_KEY] = proxy
    return config.stash[_PROXY_KEY]


def pytest_unconfigure(config: pytest.Config) -> None:
    if _PROXY_KEY in config.stash:
        config.stash[_PROXY_KEY].stop()


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
    module = Path(str(item.path)).stem if hasattr(item, "path") else "tests"
    name = _UNSAFE.sub("-", item.name).strip("-.") or "test"
    return f"{_UNSAFE.sub('-', module).lstrip('.-')}/{name}"


@pytest.fixture
def replay_proxy(request: pytest.FixtureRequest) -> Iterator[ReplaySession]:
    marker = request.node.get_closest_marker("replay")
    options: dict[str, Any] = dict(marker.kwargs) if marker else {}
    unknown = set(options) - {"cassette", "fingerprint", "mode"}
    if unknown:
        raise pytest.UsageError(f"@pytest.mark.replay got unknown arguments {sorted(unknown)}")
    proxy = _proxy(request.config)
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
                monkeypatch.setenv(name, DUMMY_KEY)


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
    if _PROXY_KEY not in config.stash:
        return set()
    usage = config.stash[_PROXY_KEY].state.usage
    return {f"{c}\x1f{k}" for c, k in usage.seen} if usage is not None else set()


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
