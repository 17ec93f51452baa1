"""Which routes generate an answer and which act on a resource whose state changes. Pure.

*Generation* routes (chat, completions, embeddings, a foreground response, images, audio,
moderations, the model list) keep one answer per key: an identical seeded request gets the
identical answer, which is what makes a test deterministic.

Everything else creates, reads, lists, updates, cancels or deletes a resource (files, uploads,
batches, vector stores and their files, fine-tuning jobs, assistants, threads and runs,
containers, conversations, videos, a background response and `GET responses/{id}`). Its state
moves between two identical requests (a poll is the same bodyless GET every time), so on these
*stateful* routes the n-th identical request gets the n-th recorded answer.

A route nobody listed is stateful: replaying it in order never asks the provider less often
than the client did. A new generation route is one line in GENERATION_ROUTES.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum


class RouteClass(StrEnum):
    GENERATION = "generation"
    STATEFUL = "stateful"


class SequencePolicy(StrEnum):
    """Which keys replay their recordings in order (`--sequence`)."""

    STATEFUL = "stateful"  # stateful routes only (the default)
    ALL = "all"  # generation routes too: an unseeded prompt asked three times, three answers
    NONE = "none"  # one answer per key everywhere


@dataclass(frozen=True)
class GenerationRoute:
    method: str
    pattern: str  # '/'-separated segments; `*` matches any one segment
    unless_body: str | None = None  # a body field that, when true, makes the request stateful

    def matches(self, method: str, segments: list[str], body: object) -> bool:
        wanted = self.pattern.split("/")
        if method != self.method or len(wanted) != len(segments):
            return False
        if any(want not in ("*", got) for want, got in zip(wanted, segments, strict=True)):
            return False
        return not (self.unless_body and isinstance(body, Mapping)
                    and body.get(self.unless_body) is True)


GENERATION_ROUTES: tuple[GenerationRoute, ...] = (
    GenerationRoute("POST", "chat/completions"),
    GenerationRoute("POST", "completions"),
    GenerationRoute("POST", "embeddings"),
    GenerationRoute("POST", "responses", unless_body="background"),
    GenerationRoute("POST", "responses/input_tokens"),
    GenerationRoute("POST", "images/*"),  # generations, edits, variations
    GenerationRoute("POST", "audio/*"),  # speech, transcriptions, translations
    GenerationRoute("POST", "moderations"),
    GenerationRoute("GET", "models"),
    GenerationRoute("GET", "models/*"),
    GenerationRoute("POST", "extensions/chat/completions"),  # Azure "on your data"
)


def route_class(method: str, route: str, body: object) -> RouteClass:
    """The class of `METHOD route` (e.g. `POST chat/completions`); `body` is the parsed JSON."""
    segments = route.split("/")
    upper = method.upper()
    if any(rule.matches(upper, segments, body) for rule in GENERATION_ROUTES):
        return RouteClass.GENERATION
    return RouteClass.STATEFUL


def is_sequenced(klass: RouteClass, policy: SequencePolicy) -> bool:
    if policy is SequencePolicy.NONE:
        return False
    return policy is SequencePolicy.ALL or klass is RouteClass.STATEFUL
