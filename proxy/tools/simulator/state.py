"""The simulator's knobs, counters and in-memory resources: one `SimulatorState` per app."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from .records import Resources


@dataclass
class SimulatorState:
    """Knobs a test can turn while the simulator runs."""

    fingerprint: str | None = "fp_sim_a1b2c3"
    variance: int = 0  # bump to change seeded answers under the same fingerprint
    api_key: str | None = None  # when set, only this key is accepted
    latency: float = 0.0  # seconds before the response head
    event_delay: float = 0.0  # seconds between stream events
    gzip: bool = True  # compress JSON bodies when the client accepts gzip
    faults: list[str] = field(default_factory=list)  # one-shot: status:500, reset, cut:N, hang:S
    # Stateful resources (batches, background responses, vector stores, fine-tuning jobs):
    # how many retrieves see a resource unfinished before the next one finishes it (read when
    # the resource is created), and the `openai-poll-after-ms` value sent while it is unfinished.
    poll_steps: int = 2
    poll_after_ms: int = 50
    resource_limit: int = 1000  # per kind of resource; the oldest are dropped past it
    file_bytes_limit: int = 128 * 1024 * 1024  # uploaded and generated file content
    calls: int = 0
    calls_by_route: Counter[str] = field(default_factory=Counter)  # "batches/{batch_id}"
    calls_by_endpoint: Counter[str] = field(default_factory=Counter)  # "GET batches/{batch_id}"
    last_headers: dict[str, str] = field(default_factory=dict)
    resources: Resources = field(default_factory=Resources)

    def update(self, changes: dict[str, Any]) -> None:
        for name in ("fingerprint", "variance", "api_key", "latency", "event_delay", "gzip"):
            if name in changes:
                setattr(self, name, changes[name])
        for name in ("poll_steps", "poll_after_ms", "resource_limit", "file_bytes_limit"):
            if name in changes:
                setattr(self, name, max(0, int(changes[name])))
        if "faults" in changes:
            self.faults = list(changes["faults"])
        if changes.get("reset_calls"):
            self.calls = 0
            self.calls_by_route.clear()
            self.calls_by_endpoint.clear()
        if changes.get("reset_resources"):
            self.resources.clear()

    def public(self) -> dict[str, Any]:
        return {"fingerprint": self.fingerprint, "variance": self.variance,
                "latency": self.latency, "event_delay": self.event_delay, "faults": self.faults,
                "poll_steps": self.poll_steps, "poll_after_ms": self.poll_after_ms,
                "resource_limit": self.resource_limit, "file_bytes_limit": self.file_bytes_limit,
                "calls": self.calls, "calls_by_route": dict(self.calls_by_route),
                "calls_by_endpoint": dict(self.calls_by_endpoint),
                "resources": self.resources.counts()}


SIM_STATE = web.AppKey("sim_state", SimulatorState)
