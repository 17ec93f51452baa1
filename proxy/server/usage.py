"""What each proxy run used and counted, kept beside the cassettes for `ls`, `prune` and `stats`.

`<cassettes>/.replay-proxy/runs/<run>.json` holds one run's counters; `usage.jsonl` gets a line
the first time a run uses a key. Both are written in the background every second and at
shutdown, never on the request path.
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


def new_run_id() -> str:
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S")
    return f"{stamp}-{os.getpid()}-{secrets.token_hex(2)}"


@dataclass
class UsageLog:
    directory: Path
    run: str = field(default_factory=new_run_id)
    started: str = field(default_factory=now_iso)
    _pending: list[tuple[str, str, str]] = field(default_factory=list)
    seen: set[tuple[str, str]] = field(default_factory=set)
    failing: bool = False  # the last flush could not write

    def note(self, cassette: str, key: str) -> None:
        name = (cassette, key)
        if name not in self.seen:
            self.seen.add(name)
            self._pending.append((cassette, key, now_iso()))

    def flush(self, counters: Mapping[str, Any]) -> None:
        """Write the run's counters and append the keys first used since the last flush."""
        try:
            ensure_state_dir(self.directory)
            (self.directory / "runs").mkdir(exist_ok=True)
        except OSError:
            return  # a read-only checkout still replays; it just keeps no usage log
        pending, self._pending = self._pending, []
        try:
            if pending:
                lines = b"".join(orjson.dumps({"run": self.run, "cassette": c, "key": k,
                                               "at": at}) + b"\n" for c, k, at in pending)
                with open(self.directory / "usage.jsonl", "ab") as handle:
                    handle.write(lines)
            document = {"run": self.run, "started": self.started, "updated": now_iso(),
                        **counters}
            target = self.directory / "runs" / f"{self.run}.json"
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


def read_runs(directory: Path) -> list[dict[str, Any]]:
    runs = []
    for path in sorted((directory / "runs").glob("*.json")):
        try:
            runs.append(orjson.loads(path.read_bytes()))
        except (OSError, orjson.JSONDecodeError):
            continue
    return sorted(runs, key=lambda run: str(run.get("started", "")))


def read_usage(directory: Path) -> list[dict[str, Any]]:
    path = directory / "usage.jsonl"
    if not path.exists():
        return []
    lines = []
    for line in path.read_bytes().splitlines():
        try:
            lines.append(orjson.loads(line))
        except orjson.JSONDecodeError:
            continue  # a line cut by a crash
    return lines


def last_used(usage: Iterable[Mapping[str, Any]]) -> dict[tuple[str, str], str]:
    latest: dict[tuple[str, str], str] = {}
    for line in usage:
        name = (str(line.get("cassette")), str(line.get("key")))
        at = str(line.get("at", ""))
        if at > latest.get(name, ""):
            latest[name] = at
    return latest


def used_since(usage: Iterable[Mapping[str, Any]], runs: list[dict[str, Any]],
               since_run: str) -> set[tuple[str, str]]:
    """Keys used by `since_run` or any run that started after it."""
    order = {str(run["run"]): index for index, run in enumerate(runs)}
    if since_run not in order:
        raise KeyError(since_run)
    threshold = order[since_run]
    return {(str(line["cassette"]), str(line["key"])) for line in usage
            if order.get(str(line.get("run")), -1) >= threshold}
