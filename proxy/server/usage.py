"""What each proxy run used and counted, kept beside the cassettes for `ls`, `prune` and `stats`.

A run is one `serve` (all its workers), one `replay-proxy run`, or one proxy of a pytest
session; the processes of one run share its id. `<cassettes>/.replay-proxy/usage.jsonl` gets a
line the first time a run touches a cassette (`{"run", "cassette", "at"}`: a request consulted
its recordings, whether it was answered from them, recorded into it or missed) and the first
time it uses a key (`{"run", "cassette", "key", "at"}`: answered from its recordings, or
recorded). `runs/<run>~<process>.json` holds one process's counters for the run; the readers
add up a run's processes. Both are written in the background every second and at shutdown,
never on the request path.
"""

from __future__ import annotations

import logging
import os
import secrets
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson

from ..core.cassette import now_iso
from ..store.state_dir import ensure_state_dir

log = logging.getLogger("replay_proxy")

# The counters that say a run consulted a cassette's recordings; a passthrough call, which
# never reads them, counts only `upstream_calls`.
CONSULTED = ("hits", "misses", "recorded")


def new_run_id() -> str:
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S")
    return f"{stamp}-{os.getpid()}-{secrets.token_hex(2)}"


def _process_part() -> str:
    return f"{os.getpid()}-{secrets.token_hex(3)}"


@dataclass
class UsageLog:
    directory: Path
    run: str = field(default_factory=new_run_id)
    started: str = field(default_factory=now_iso)
    # This process's share of the run: the workers of one `serve` share the run, and each one
    # writes its own counters rather than over another's.
    part: str = field(default_factory=_process_part)
    _pending: list[tuple[str, str | None, str]] = field(default_factory=list)
    seen: set[tuple[str, str]] = field(default_factory=set)
    touched: set[str] = field(default_factory=set)
    failing: bool = False  # the last flush could not write

    @property
    def run_file(self) -> Path:
        return self.directory / "runs" / f"{self.run}~{self.part}.json"

    def note(self, cassette: str, key: str) -> None:
        """`key` answered a request from its recordings, or recorded one."""
        self.touch(cassette)
        name = (cassette, key)
        if name not in self.seen:
            self.seen.add(name)
            self._pending.append((cassette, key, now_iso()))

    def touch(self, cassette: str) -> None:
        if cassette not in self.touched:
            self.touched.add(cassette)
            self._pending.append((cassette, None, now_iso()))

    def flush(self, counters: Mapping[str, Any]) -> None:
        """Write the run's counters and append the cassettes and keys first touched or used
        since the last flush."""
        for cassette, counts in (counters.get("cassettes") or {}).items():
            if any(counts.get(name) for name in CONSULTED):
                self.touch(cassette)
        try:
            ensure_state_dir(self.directory)
            (self.directory / "runs").mkdir(exist_ok=True)
        except OSError:
            return  # a read-only checkout still replays; it just keeps no usage log
        pending, self._pending = self._pending, []
        try:
            if pending:
                lines = b"".join(orjson.dumps(_line(self.run, cassette, key, at)) + b"\n"
                                 for cassette, key, at in pending)
                with open(self.directory / "usage.jsonl", "ab") as handle:
                    handle.write(lines)
            document = {"run": self.run, "started": self.started, "updated": now_iso(),
                        **counters}
            target = self.run_file
            temporary = target.with_name(f".{target.name}.tmp")
            temporary.write_bytes(orjson.dumps(document, option=orjson.OPT_INDENT_2))
            os.replace(temporary, target)
        except OSError as exc:
            # A full disk: the proxy keeps serving (and tries again at the next flush); the
            # usage log is a help for `prune`, not a recording.
            self._pending = pending + self._pending
            if not self.failing:
                log.warning("could not write the usage log in %s: %s", self.directory, exc)
            self.failing = True
            return
        self.failing = False


def _line(run: str, cassette: str, key: str | None, at: str) -> dict[str, str]:
    if key is None:
        return {"run": run, "cassette": cassette, "at": at}
    return {"run": run, "cassette": cassette, "key": key, "at": at}


def read_runs(directory: Path) -> list[dict[str, Any]]:
    """Each run's counters, its processes' files added up, oldest run first."""
    runs: dict[str, dict[str, Any]] = {}
    for path in sorted((directory / "runs").glob("*.json")):
        try:
            document = orjson.loads(path.read_bytes())
        except (OSError, orjson.JSONDecodeError):
            continue
        if not isinstance(document, dict) or not isinstance(document.get("run"), str):
            continue
        run = document["run"]
        runs[run] = _merged(runs[run], document) if run in runs else {**document, "processes": 1}
    return sorted(runs.values(), key=lambda run: str(run.get("started", "")))


def _merged(run: dict[str, Any], part: dict[str, Any]) -> dict[str, Any]:
    merged = {**part, **run, "processes": run["processes"] + 1}
    merged["started"] = min(str(run.get("started", "")), str(part.get("started", "")))
    merged["updated"] = max(str(run.get("updated", "")), str(part.get("updated", "")))
    for name in ("totals", "cassettes", "retired_cassettes"):
        if name in run or name in part:
            merged[name] = _added(run.get(name), part.get(name))
    return merged


def _added(left: Any, right: Any) -> Any:
    """Counters added up, nested by name (a run's totals, its counters by cassette)."""
    if isinstance(left, dict) or isinstance(right, dict):
        left = left if isinstance(left, dict) else {}
        right = right if isinstance(right, dict) else {}
        return {name: _added(left.get(name), right.get(name)) for name in {*left, *right}}
    numbers = [value for value in (left, right)
               if isinstance(value, int | float) and not isinstance(value, bool)]
    return sum(numbers)


def read_usage(directory: Path) -> list[dict[str, Any]]:
    path = directory / "usage.jsonl"
    if not path.exists():
        return []
    lines = []
    for line in path.read_bytes().splitlines():
        try:
            parsed = orjson.loads(line)
        except orjson.JSONDecodeError:
            continue  # a line cut by a crash
        if isinstance(parsed, dict):
            lines.append(parsed)
    return lines


def last_used(usage: Iterable[Mapping[str, Any]]) -> dict[tuple[str, str], str]:
    latest: dict[tuple[str, str], str] = {}
    for line in usage:
        if "key" not in line:
            continue
        name = (str(line.get("cassette")), str(line.get("key")))
        at = str(line.get("at", ""))
        if at > latest.get(name, ""):
            latest[name] = at
    return latest


@dataclass(frozen=True)
class Usage:
    """What a span of runs did: the cassettes whose recordings they consulted, and the keys
    they used in them."""

    touched: frozenset[str]
    used: frozenset[tuple[str, str]]


def usage_since(usage: Iterable[Mapping[str, Any]], runs: list[dict[str, Any]],
                since_run: str) -> Usage:
    """What `since_run` and every run that started after it touched and used. Raises KeyError
    for a run that is not in `runs`."""
    order = {str(run["run"]): index for index, run in enumerate(runs)}
    if since_run not in order:
        raise KeyError(since_run)
    threshold = order[since_run]
    touched: set[str] = set()
    used: set[tuple[str, str]] = set()
    for line in usage:
        if order.get(str(line.get("run")), -1) < threshold:
            continue
        cassette = str(line.get("cassette"))
        touched.add(cassette)  # a used key's cassette was touched, in a log of any age
        if "key" in line:
            used.add((cassette, str(line["key"])))
    for run in runs[threshold:]:
        for cassette, counts in (run.get("cassettes") or {}).items():
            if isinstance(counts, dict) and any(counts.get(name) for name in CONSULTED):
                touched.add(str(cassette))
    return Usage(frozenset(touched), frozenset(used))
