"""Route classes: generation keeps one answer per key, stateful routes replay in order."""

from __future__ import annotations

import pytest
from replay_proxy.core.routes import RouteClass, SequencePolicy, is_sequenced, route_class

GENERATION = RouteClass.GENERATION
STATEFUL = RouteClass.STATEFUL


@pytest.mark.parametrize(("method", "route", "body", "expected"), [
    ("POST", "chat/completions", {"model": "m"}, GENERATION),
    ("POST", "completions", {}, GENERATION),
    ("POST", "embeddings", {}, GENERATION),
    ("POST", "responses", {"input": "hi"}, GENERATION),
    ("POST", "responses", {"input": "hi", "background": False}, GENERATION),
    ("POST", "responses", {"input": "hi", "background": True}, STATEFUL),
    ("GET", "responses/resp_123", None, STATEFUL),
    ("POST", "responses/resp_123/cancel", None, STATEFUL),
    ("POST", "images/generations", {}, GENERATION),
    ("POST", "images/edits", None, GENERATION),
    ("POST", "audio/speech", {}, GENERATION),
    ("POST", "audio/transcriptions", None, GENERATION),
    ("POST", "moderations", {}, GENERATION),
    ("GET", "models", None, GENERATION),
    ("GET", "models/gpt-4o", None, GENERATION),
    ("get", "models", None, GENERATION),
    ("POST", "files", None, STATEFUL),
    ("GET", "files/file-abc", None, STATEFUL),
    ("DELETE", "files/file-abc", None, STATEFUL),
    ("POST", "uploads", {}, STATEFUL),
    ("POST", "batches", {}, STATEFUL),
    ("GET", "batches/batch_abc", None, STATEFUL),
    ("POST", "vector_stores", {"name": "docs"}, STATEFUL),
    ("GET", "vector_stores/vs_1/files/file-1", None, STATEFUL),
    ("POST", "fine_tuning/jobs", {}, STATEFUL),
    ("GET", "threads/t/runs/r", None, STATEFUL),
    ("POST", "containers", {}, STATEFUL),
    ("POST", "conversations", {}, STATEFUL),
    ("POST", "videos", {}, STATEFUL),
    ("GET", "chat/completions", None, STATEFUL),  # stored completions: a list that grows
    ("POST", "some/route/nobody/listed", {}, STATEFUL),
])
def test_route_classes(method: str, route: str, body: object, expected: RouteClass) -> None:
    assert route_class(method, route, body) is expected


@pytest.mark.parametrize(("klass", "policy", "expected"), [
    (STATEFUL, SequencePolicy.STATEFUL, True),
    (GENERATION, SequencePolicy.STATEFUL, False),
    (GENERATION, SequencePolicy.ALL, True),
    (STATEFUL, SequencePolicy.ALL, True),
    (STATEFUL, SequencePolicy.NONE, False),
    (GENERATION, SequencePolicy.NONE, False),
])
def test_sequence_policy(klass: RouteClass, policy: SequencePolicy, expected: bool) -> None:
    assert is_sequenced(klass, policy) is expected
